"""--resume FOLDER: a stopped run continues in its own folder exactly, from its last finished epoch; a finished one
says so, or trains on with more --epochs; everything a resume cannot honour (other data, settings that
decided what the run learned, another folder, fewer epochs, a missing, damaged, foreign or locked
state) is one sentence that changes nothing."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
from filelock import FileLock

import brain_tumor_segmentation as bts
from conftest import TINY_ARGS, make_dataset, one_error, run_cli, snapshot

# 20 pairs named 1..20: patients.csv splits them 12 train / 7 val / 1 test, so batches of 4 make
# 3 training steps an epoch. The default recipe (augmentation, one-cycle, mirror average), in float32.
STEPS = 3
TINY = [*TINY_ARGS, "--batch-size", "4", "--epochs", "2"]
CPU = ["--device", "cpu"]  # exact repeats are a CPU's (float32)
TEST_FILES = ["metrics.json", "test_per_image.csv", "visualizations/test_samples.png",
              "visualizations/worst_predictions.png", "visualizations/test_dice_histogram.png"]
MISSING = object()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("resume") / "data")


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """A finished 2-epoch run, never stopped."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert bts.main(["--data-dir", str(data), "--out-dir", str(out), *TINY, *CPU]) == 0
    return out


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    """The same run stopped by Ctrl-C in its last epoch, at its first step: last.pth holds epoch 1."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.MonkeyPatch.context() as mp:
        on_training_step(mp, STEPS + 1, lambda: os.kill(os.getpid(), signal.SIGINT))
        assert bts.main(["--data-dir", str(data), "--out-dir", str(out), *TINY, *CPU]) == 130
    return out


@pytest.fixture(scope="module")
def resumed(stopped, tmp_path_factory):
    """A copy of the stopped run, resumed to its end."""
    out = Path(shutil.copytree(stopped, tmp_path_factory.mktemp("resumed") / "run"))
    assert bts.main(["--resume", str(out), *CPU]) == 0
    return out


@pytest.fixture
def finished(straight, tmp_path):
    """A copy of the finished run, for this test to change."""
    return Path(shutil.copytree(straight, tmp_path / "run"))


@pytest.fixture
def unfinished(stopped, tmp_path):
    """A copy of the stopped run (1 of 2 epochs), for this test to change."""
    return Path(shutil.copytree(stopped, tmp_path / "run"))


def on_training_step(mp, step: int, action) -> None:
    """Call action() at the step-th training step (1-based over epochs; validation is not a step)."""
    real, count = bts.compute_loss, [0]

    def patched(logits, target, cfg):
        if logits.requires_grad:
            count[0] += 1
            if count[0] == step:
                action()
        return real(logits, target, cfg)

    mp.setattr(bts, "compute_loss", patched)


def without_timing(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    for key in ("total_seconds", "images_per_second", "compile_seconds"):
        m.pop(key)
    for key in ("epoch_seconds", "images_per_second"):
        m["history"].pop(key)
    return m


def edit_checkpoint(path: Path, field: str, value) -> None:
    """Set (or with MISSING delete) a field of a saved checkpoint; `config.NAME` for a setting."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    top, _, sub = field.partition(".")
    holder, key = (state[top], sub) if sub else (state, top)
    if value is MISSING:
        del holder[key]
    else:
        holder[key] = value
    torch.save(state, path)


def refused(capsys, folder: Path, *args, fragments=(), ignore: str = "") -> str:
    """Run the command, which must be refused in one sentence holding `fragments`, with nothing in
    `folder` changed (but the file named `ignore`); returns stderr."""
    before = snapshot(folder, ignore=ignore)
    rc, _, err = run_cli(capsys, *args)
    one_error(rc, err, *fragments)
    assert snapshot(folder, ignore=ignore) == before
    return err


# -----------------------------------------------------------------------------
# A stopped run continues exactly


@pytest.mark.slow
def test_a_stopped_run_keeps_its_last_finished_epoch(stopped):
    state = bts.load_checkpoint(stopped / "last.pth", resumable=True)
    assert state["epoch"] == 1 and state["history"]["epoch"] == [1]
    assert bts.load_checkpoint(stopped / "model.pth")["epoch"] == 1
    assert not (stopped / "metrics.json").exists()


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_and_resumed_ends_exactly_as_one_never_stopped(straight, resumed):
    assert without_timing(resumed) == without_timing(straight)
    assert "could not honour" in without_timing(resumed)["warning"]  # its split's warning, said again
    for name in ("model.pth", "last.pth"):
        a, b = bts.load_checkpoint(straight / name), bts.load_checkpoint(resumed / name)
        assert (a["epoch"], a["best"]) == (b["epoch"], b["best"])
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    assert bts.load_checkpoint(resumed / "last.pth")["history"]["epoch"] == [1, 2]  # one curve, extended
    assert (resumed / "history.csv").read_text().count("\n") == 3
    log = (resumed / "train.log").read_text()  # one log, the resumed session's lines after the first's
    assert log.index("stopped in epoch 2") < log.index(f"run folder: {resumed} (resumed)") < log.index("epoch   2/2")


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_printed_command_continues_the_run_as_it_is_from_another_working_folder(data, tmp_path, monkeypatch,
                                                                                   capsys):
    """Issue class S: the run was started with relative --data-dir, --groups and --out-dir (a folder with a
    space) and stopped by Ctrl-C. The command it printed, copied as it is and run in a fresh process from
    another working folder, finishes it: it names this Python and the script by their paths, quotes the
    folder, and the run's saved paths do not depend on the working folder."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(data, work / "data")
    (work / "groups.csv").write_text("image,patient_id\n" + "".join(f"{i},p{(i + 1) // 2}\n" for i in range(1, 21)))
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    with pytest.MonkeyPatch.context() as mp:
        on_training_step(mp, STEPS + 1, lambda: os.kill(os.getpid(), signal.SIGINT))  # epoch 2, its first step
        rc, _, err = run_cli(capsys, "--data-dir", "data", "--groups", "groups.csv", "--out-dir", "my run", *TINY, *CPU)
    assert rc == 130 and "Traceback" not in err, err
    run = work / "my run"
    assert bts.load_checkpoint(run / "last.pth", resumable=True)["epoch"] == 1
    command = shlex.split(err.strip().splitlines()[-1])
    result = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"resuming {run / 'last.pth'} at epoch 2" in result.stdout
    assert json.loads((run / "metrics.json").read_text())["history"]["epoch"] == [1, 2]
    assert "groups.csv" in json.loads((run / "split.json").read_text())["how"]
    assert list(elsewhere.iterdir()) == []  # nothing written where it was run from


# -----------------------------------------------------------------------------
# A finished run, and more epochs


@pytest.mark.parametrize("more", [[], ["--epochs", "2"], ["--epochs", "1"]], ids=["same", "its-epochs", "fewer"])
def test_resuming_a_finished_run_says_it_is_finished(more, finished, capsys):
    err = refused(capsys, finished, "--resume", finished, *more,
                  fragments=[f"{finished} holds a finished run", f"--resume {finished} --epochs N"])
    assert len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def trained_on(straight, tmp_path_factory):
    """A copy of the finished run trained one epoch further, in bf16 this time, with its own
    settings typed again, and its last.pth claiming a best epoch no later epoch can beat."""
    out = Path(shutil.copytree(straight, tmp_path_factory.mktemp("trained_on") / "run"))
    edit_checkpoint(out / "last.pth", "best.val_dice", 2.0)
    before = {"snapshot": snapshot(out, inodes=True), "model": bts.load_checkpoint(out / "model.pth")}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out.parent)  # --out-dir, relative, names the same folder: allowed
        rc, printed, err = run_cli_plain("--resume", out / "last.pth", "--out-dir", "run", "--epochs", "3",
                                         "--amp", "bf16", "--image-size", "32", "--lr", "0.002")
    assert rc == 0, err
    return out, before, printed, err


def run_cli_plain(*args):
    """bts.main in this process for a module fixture (no capsys there): stdout and stderr captured."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = bts.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_more_epochs_train_a_finished_run_further_and_rewrite_its_test(trained_on):
    out, before, printed, err = trained_on
    assert "resuming" in printed and "at epoch 3" in printed
    assert "one-cycle schedule is stretched" in err  # a warning, not a refusal
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"]["epoch"] == [1, 2, 3]
    assert bts.load_checkpoint(out / "last.pth")["epoch"] == 3
    assert [r.split(",")[0] for r in (out / "history.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]
    after = snapshot(out, inodes=True)
    for name in TEST_FILES:  # written anew for the model it has now
        assert name in after and after[name][1:] != before["snapshot"][name][1:], name
    assert json.loads((out / "config.json").read_text())["epochs"] == 3


@pytest.mark.slow
def test_a_best_model_that_no_later_epoch_beats_is_kept(trained_on):
    out, before, _, _ = trained_on
    after = bts.load_checkpoint(out / "model.pth")
    assert after["epoch"] == before["model"]["epoch"] <= 2
    assert all(torch.equal(after["model"][k], before["model"]["model"][k]) for k in after["model"])
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == after["epoch"]


@pytest.mark.slow
def test_the_precision_may_change_on_resume_and_the_record_says_so(trained_on):
    out, _, printed, _ = trained_on
    assert "precision: bfloat16 (--amp bf16)" in printed
    assert json.loads((out / "config.json").read_text())["amp"] == "bf16"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "bfloat16"
    assert metrics["history"]["precision"] == ["float32", "float32", "bfloat16"]
    assert bts.load_checkpoint(out / "model.pth")["precision"] == "bfloat16"  # the precision it was tested in


@pytest.mark.slow
def test_a_stopped_resume_has_removed_the_earlier_test_and_continues_from_its_last_epoch(finished, monkeypatch,
                                                                                       capsys):
    on_training_step(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    rc, _, err = run_cli(capsys, "--resume", finished, "--epochs", "3")
    assert rc == 143 and "stopped in epoch 3" in err and "Traceback" not in err, err
    assert not any((finished / name).exists() for name in TEST_FILES)  # they described the model before
    assert (finished / "model.pth").is_file() and (finished / "history.csv").is_file()
    assert not bts.is_finished(finished)
    command = shlex.split(err.strip().splitlines()[-1])  # its last.pth is epoch 2's, saved with --epochs 2
    assert command[2:] == ["--resume", str(finished.resolve()), "--epochs", "3"], command
    cfg, typed = bts.config_from_args(command[2:])
    resumed, state = bts.resumed_state(cfg, typed)
    assert (state["epoch"], resumed.epochs) == (2, 3)


@pytest.mark.slow
def test_a_stop_after_training_leaves_a_run_that_resume_finishes(data, tmp_path, monkeypatch, capsys):
    """Stopped while choosing the threshold, then, resumed, in the test; resumed again, it finishes."""
    def signalled(real):
        def call(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)
        return call

    out = tmp_path / "run"
    message = "stopped after training, before the test was written"
    for where, args in (("choose_on_validation", ["--data-dir", data, "--out-dir", out, *TINY_ARGS]),
                        ("evaluate_test", ["--resume", out])):
        with monkeypatch.context() as mp:
            mp.setattr(bts, where, signalled(getattr(bts, where)))
            rc, _, err = run_cli(capsys, *args)
        assert rc == 143 and message in err and f"--resume {out}" in err and "Traceback" not in err, err
        assert not (out / "metrics.json").exists() and bts.load_checkpoint(out / "model.pth")["epoch"] == 1
    rc, _, err = run_cli(capsys, "--resume", out)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["images"] > 0 and metrics["history"]["epoch"] == [1]


# -----------------------------------------------------------------------------
# What a resume cannot honour: one sentence, nothing changed


@pytest.mark.parametrize("trained, epochs", [(2, 1), (3, 2)])
def test_fewer_epochs_than_a_state_has_trained_are_refused(trained, epochs, unfinished, capsys):
    edit_checkpoint(unfinished / "last.pth", "epoch", trained)
    edit_checkpoint(unfinished / "last.pth", "config.epochs", trained)
    refused(capsys, unfinished, "--resume", unfinished, "--epochs", epochs,
            fragments=[f"--epochs {epochs}: {unfinished / 'last.pth'} has trained {trained} epochs already; pass more"])


@pytest.mark.parametrize("option, value", [("--lr", "0.1"), ("--image-size", "64"), ("--seed", "7"),
                                           ("--batch-size", "2"), ("--recipe", "seed"), ("--no-augment", None)])
def test_a_setting_that_decided_what_the_run_learned_cannot_change_on_resume(option, value, finished, capsys):
    args = [option] if value is None else [option, value]
    refused(capsys, finished, "--resume", finished, "--epochs", "3", *args,
            fragments=[option.replace("--no-", "--"), "keeps the settings it was trained with", "start a new run"])


def test_out_dir_naming_another_folder_is_refused(finished, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    refused(capsys, finished, "--resume", finished / "last.pth", "--out-dir", elsewhere, "--epochs", "3",
            fragments=["name two folders", str(finished), "Leave out --out-dir"])
    assert not elsewhere.exists()


@pytest.mark.parametrize("change", ["other-pixels", "missing-image"])
def test_a_stopped_run_refuses_other_data(change, unfinished, data, tmp_path, capsys):
    copy = Path(shutil.copytree(data, tmp_path / "moved"))  # --data-dir may change: the data may move
    name = json.loads((unfinished / "split.json").read_text())["test"][0]
    image = copy / "images" / f"{name}.png"
    if change == "other-pixels":  # the same name, other contents
        cv2.imwrite(str(image), 255 - cv2.imread(str(image), cv2.IMREAD_UNCHANGED))
    else:
        image.unlink()
        (copy / "masks" / f"{name}.png").unlink()
    refused(capsys, unfinished, "--resume", unfinished, "--data-dir", copy, ignore="train.log",
            fragments=["the data changed since this run's split was made", repr(name), "start a new run"])


@pytest.mark.parametrize("change", ["other-pixels", "no-data-folder"])
def test_a_finished_run_resumed_with_other_data_keeps_its_test(change, finished, data, tmp_path, capsys):
    copy = Path(shutil.copytree(data, tmp_path / "moved"))
    name = json.loads((finished / "split.json").read_text())["test"][0]
    if change == "other-pixels":
        image = copy / "images" / f"{name}.png"
        cv2.imwrite(str(image), 255 - cv2.imread(str(image), cv2.IMREAD_UNCHANGED))
        fragment = "the data changed since this run's split was made"
    else:
        shutil.rmtree(copy)
        fragment = f"{copy}: folder not found"
    refused(capsys, finished, "--resume", finished, "--epochs", "3", "--data-dir", copy, ignore="train.log",
            fragments=[fragment])


# -----------------------------------------------------------------------------
# model.pth and last.pth, missing or damaged


def test_a_finished_run_without_model_pth_is_still_finished(finished, capsys):
    (finished / "model.pth").unlink()
    refused(capsys, finished, "--resume", finished, fragments=["holds a finished run"])


def test_a_best_model_removed_by_hand_is_named_when_the_test_needs_it(finished, capsys):
    """A resumed run trusts that model.pth holds the best epoch its state records: a user who removed
    it gets one sentence naming it when the test needs it."""
    (finished / "metrics.json").unlink()
    (finished / "model.pth").unlink()
    rc, _, err = run_cli(capsys, "--resume", finished)
    one_error(rc, err, f"{finished / 'model.pth'}: checkpoint not found")


def test_a_folder_with_model_pth_but_no_last_pth_cannot_be_continued(finished, capsys):
    (finished / "last.pth").unlink()
    (finished / "metrics.json").unlink()
    refused(capsys, finished, "--resume", finished,
            fragments=[f"{finished / 'last.pth'}: no resumable state (last.pth) to continue", "start a new run"])


def test_a_folder_without_any_state_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    refused(capsys, tmp_path, "--resume", tmp_path / "empty",
            fragments=["no resumable state (last.pth)", "start a new run without --resume"])


def test_a_typed_wrong_folder_of_last_pth_is_no_such_run_folder(tmp_path, capsys):
    refused(capsys, tmp_path, "--resume", tmp_path / "rnu" / "last.pth",
            fragments=[f"{tmp_path / 'rnu'}: no such run folder to resume"])
    assert not (tmp_path / "rnu").exists()


def test_a_typed_wrong_run_folder_is_no_such_run_folder(finished, capsys):
    typo = finished.parent / "rnu"  # beside the real run, in a folder that exists
    refused(capsys, finished.parent, "--resume", typo, "--epochs", "3",
            fragments=[f"{typo}: no such run folder to resume"])


def test_model_pth_given_as_the_state_is_refused(unfinished, capsys):
    refused(capsys, unfinished, "--resume", unfinished / "model.pth",
            fragments=["a best-model file, not a resumable state (that is last.pth, beside it)",
                       "cannot be continued"])


def save_code_holding(path: Path) -> None:
    torch.save({"format": bts.CHECKPOINT_FORMAT, "version": bts.CHECKPOINT_VERSION,
                "payload": argparse.Namespace(run="os.system")}, path)


DAMAGES = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:100_000]),
    "empty": lambda p: p.write_bytes(b""),
    "text": lambda p: p.write_text("epoch,loss\n1,0.5\n"),
    "code-holding": save_code_holding,
    "foreign": lambda p: torch.save(bts.UNet(width=4).state_dict(), p),
    "other-version": lambda p: edit_checkpoint(p, "version", 0),
    "best-none": lambda p: edit_checkpoint(p, "best", None),
    "best-missing": lambda p: edit_checkpoint(p, "best", MISSING),
    "optimizer-missing": lambda p: edit_checkpoint(p, "optimizer", MISSING),
    "split-empty": lambda p: edit_checkpoint(p, "split", {}),
    "split-list": lambda p: edit_checkpoint(p, "split", []),
    "threshold-text": lambda p: edit_checkpoint(p, "threshold", "x"),
    "epoch-text": lambda p: edit_checkpoint(p, "epoch", "1"),
    "model-not-tensors": lambda p: edit_checkpoint(p, "model", {"a": 1}),
    "image-size-text": lambda p: edit_checkpoint(p, "config.image_size", "abc"),
    "base-width-float": lambda p: edit_checkpoint(p, "config.base_width", 2.5),
    "saved-mid-epoch-by-an-earlier-version": lambda p: edit_checkpoint(p, "step", 1),
    "lr-text": lambda p: edit_checkpoint(p, "config.lr", "fast"),
    "epoch-negative": lambda p: edit_checkpoint(p, "epoch", -5),
    "epoch-minus-one-best-zero": lambda p: (edit_checkpoint(p, "epoch", -1),
                                            edit_checkpoint(p, "best", {"epoch": 0, "val_dice": -1.0})),
    "image-size-17": lambda p: edit_checkpoint(p, "config.image_size", 17),
    "history-text": lambda p: edit_checkpoint(p, "history", {"epoch": "x"}),
    "config-none": lambda p: edit_checkpoint(p, "config", None),
    "nan-weights": lambda p: edit_checkpoint(p, "model", {k: torch.full_like(v, float("nan")) if v.is_floating_point()
                                                          else v for k, v in torch.load(p, weights_only=True)["model"].items()}),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_foreign_or_code_holding_state_is_one_sentence(damage, unfinished, capsys):
    last = unfinished / "last.pth"
    DAMAGES[damage](last)
    err = refused(capsys, unfinished, "--resume", unfinished,
                  fragments=[str(last), "It cannot be continued: start a new run"])
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("damage, value, fragment", [
    ("config.base_width", 8, "its saved weights or optimizer state do not fit this model"),
    ("optimizer", {"param_groups": "x"}, "its saved weights or optimizer state do not fit this model"),
])
def test_a_state_that_does_not_fit_the_model_is_one_sentence(damage, value, fragment, unfinished,
                                                                          capsys):
    """Refused after the lock is taken: train.log records the attempt, nothing else changes."""
    edit_checkpoint(unfinished / "last.pth", damage, value)
    refused(capsys, unfinished, "--resume", unfinished, ignore="train.log",
            fragments=[str(unfinished / "last.pth"), fragment, "start a new run"])


@pytest.mark.parametrize("field", ["image_size", "base_width", "loss", "lr"])
def test_a_state_lacking_a_learned_setting_is_refused_naming_the_file(field, unfinished, capsys):
    """A last.pth without image_size used to resume at the default 256, silently."""
    edit_checkpoint(unfinished / "last.pth", f"config.{field}", MISSING)
    refused(capsys, unfinished, "--resume", unfinished,
            fragments=[str(unfinished / "last.pth"), f"its settings lack {field}", "decide what it learned"])


def test_settings_older_than_their_field_get_the_values_of_before(unfinished):
    for field in ("tta", "split_seed", "postprocess", "panel_images", "workers"):  # 3 learned, 2 how it runs
        edit_checkpoint(unfinished / "last.pth", f"config.{field}", MISSING)
    cfg, typed = bts.config_from_args(["--resume", str(unfinished)])
    resumed, state = bts.resumed_state(cfg, typed)
    assert bts.BEFORE_FIELD_EXISTED == {"tta": False, "split_seed": 42, "postprocess": False}
    assert resumed.tta is False and bts.Config().tta is True  # mirror averaging was not done before tta existed
    assert resumed.postprocess is False and bts.Config().postprocess is True
    assert resumed.split_seed == 42
    assert (resumed.panel_images, resumed.workers) == (bts.Config().panel_images, bts.Config().workers)
    assert (resumed.image_size, resumed.base_width, state["epoch"]) == (32, 4, 1)
    config = {k: v for k, v in bts.dataclasses.asdict(bts.Config()).items() if k != "tta"}
    assert bts.saved_config(config, "x.json").tta is False
    old = {**bts.dataclasses.asdict(bts.Config(folds=3, fold=2)), "overwrite": False}  # before --fold was 1-based
    assert bts.saved_config({**old, "fold": 1}, "x.json").fold == 2
    assert bts.saved_config({**old, "folds": 0, "fold": -1}, "x.json").fold == 0


# -----------------------------------------------------------------------------
# The folder's lock


def test_a_folder_another_process_is_resuming_is_refused(unfinished, capsys):
    with FileLock(unfinished / ".lock"):
        refused(capsys, unfinished, "--resume", unfinished, fragments=[f"{unfinished} is in use by another run"])


@pytest.mark.subprocess
def test_a_process_killed_while_holding_the_lock_leaves_the_folder_free(unfinished, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, filelock\n"
                               "lock = filelock.FileLock(sys.argv[1]); lock.acquire()\n"
                               "print('locked', flush=True); time.sleep(60)", str(unfinished / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(capsys, unfinished, "--resume", unfinished, fragments=["in use by another run"])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    cfg, typed = bts.config_from_args(["--resume", str(unfinished)])
    cfg, state = bts.resumed_state(cfg, typed)
    with bts.run_folder(cfg, state) as folder:  # what a resume takes first: the folder, locked
        assert folder == unfinished
        with pytest.raises(bts.UserError, match="in use by another run"):
            with bts.run_folder(cfg, state):
                pass
