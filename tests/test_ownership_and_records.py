"""The classes of issue #21, each through the command line on tiny synthetic data, with checksums of
every input and sentinel file. A: a run replaces or deletes only what its own record lists, and never
writes where it reads. B: the record of a run describes exactly what it measured. C: one sentence,
never a traceback."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import brain_tumor_segmentation as bts
from conftest import REAL_DIR, SCRIPT, TINY_ARGS, make_dataset, run_cli, snapshot, square_pair, write_pair


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    out = root / "run"
    assert bts.main(["--data-dir", str(make_dataset(root / "data")), "--out-dir", str(out), *TINY_ARGS,
                     "--epochs", "2"]) == 0
    return out


@pytest.fixture
def finished(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "run"))


def one_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 1 and "Traceback" not in err, err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# -----------------------------------------------------------------------------
# A. Files: a run owns what it made, and nothing else


def test_cleanup_touches_only_its_own_temporaries_in_its_own_folder(dataset, finished, capsys):
    mine = [finished / ".notes.tmp", finished / "sub" / ".model.pth.x.tmp", finished / ".user-data.tmp" / "a.png",
            finished / ".model.pth.backup.tmp" / "notes.txt", finished / ".metrics.json.old.tmp",
            finished / ".model.pth.snapshot.tmp" / "weights_v1.txt"]  # eight letters, but a file's temporary is a file
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a user's file")
    ours = finished / ".model.pth.q1w2e3r4.tmp"  # mkstemp's eight letters
    ours.write_bytes(b"\0" * 100)  # what a kill inside a write of model.pth leaves
    before = {p: p.read_bytes() for p in mine}
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", finished, *TINY_ARGS, "--overwrite")
    assert rc == 0, err
    assert {p: p.read_bytes() for p in mine} == before and not ours.exists()


@pytest.mark.parametrize("name", ["config.json", "metrics.json", "visualizations/loss_curves.png", ".outputs.json",
                                  ".lock"])
def test_a_file_no_run_wrote_is_never_replaced_whatever_the_flags(name, dataset, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_text("a user's own file\n")
    before = snapshot(out)
    for flags in ([], ["--overwrite"], ["--resume"]):
        rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS, *flags)
        assert rc == 1 and "Traceback" not in err, err
        assert snapshot(out) == before


def test_overwrite_deletes_only_the_earlier_runs_own_files(dataset, finished, capsys):
    keep = [finished / "visualizations" / "demo_overlay.png", finished / "notes.txt", finished / "demo" / "x.png"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"committed picture")
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", finished, *TINY_ARGS, "--overwrite", "--epochs",
                         "1")
    assert rc == 0, err
    assert all(p.read_bytes() == b"committed picture" for p in keep)
    assert not (finished / "visualizations" / "epochs" / "epoch_002.png").exists()  # the earlier run's, gone


@pytest.mark.parametrize("where", ["parent", "same", "below"])
def test_no_output_folder_is_holds_or_lies_inside_the_data_however_it_is_named(where, dataset, tmp_path, capsys,
                                                                                monkeypatch):
    work = tmp_path / "work"
    default = work / bts.DEFAULT_DATA_DIR
    shutil.copytree(dataset, default)
    monkeypatch.chdir(work)
    (work / "link").symlink_to(default)
    before = snapshot(default)
    out = {"parent": work, "same": work / "link", "below": work / "link" / "run"}[where]
    data_args = [] if where == "parent" else ["--data-dir", work / "link"]
    for extra in ([], ["--overwrite"]):
        rc, _, err = run_cli(capsys, *data_args, "--out-dir", out, *TINY_ARGS, *extra)
        one_error(rc, err, "the data folder")
    assert snapshot(default) == before


def test_a_resumed_run_continues_only_in_its_own_folder(dataset, finished, tmp_path, capsys):
    before = snapshot(finished)
    rc, _, err = run_cli(capsys, "--resume", finished / "last.pth", "--out-dir", tmp_path / "elsewhere", "--epochs", "3")
    one_error(rc, err, "name two folders", str(finished))
    assert snapshot(finished) == before and not (tmp_path / "elsewhere").exists()


def test_a_folder_that_holds_other_things_stays_usable(dataset, tmp_path, capsys):
    outputs = tmp_path / "outputs"
    (outputs / "demo").mkdir(parents=True)
    (outputs / "demo" / "model.pth").write_bytes(b"another run's")
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", outputs, *TINY_ARGS)
    assert rc == 0, err
    assert (outputs / "demo" / "model.pth").read_bytes() == b"another run's" and (outputs / "model.pth").is_file()


def test_a_setting_a_resumed_run_cannot_honour_is_refused(dataset, finished, capsys):
    before = snapshot(finished)
    rc, _, err = run_cli(capsys, "--resume", "--out-dir", finished, "--epochs", "3", "--lr", "0.1")
    one_error(rc, err, "--lr", "keeps the settings it was trained with")
    assert snapshot(finished) == before


# -----------------------------------------------------------------------------
# B. Numbers: the record of a run describes exactly what it measured


def test_a_finished_run_is_finished(dataset, finished, capsys):
    before = snapshot(finished, ignore=".lock")
    rc, _, err = run_cli(capsys, "--resume", "--out-dir", finished)
    one_error(rc, err, "finished run", "--resume --epochs N")
    assert snapshot(finished, ignore=".lock") == before


def test_data_are_identified_by_content_not_by_name(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS)
    assert rc == 0, err
    first = json.loads((out / "metrics.json").read_text())
    split = json.loads((out / "split.json").read_text())
    changed = split["test"][0]
    image = cv2.imread(str(dataset / "images" / f"{changed}.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(dataset / "images" / f"{changed}.png"), 255 - image)  # other pixels, the same name
    rc, _, err = run_cli(capsys, "--resume", "--out-dir", out, "--data-dir", dataset, "--epochs", "2")
    one_error(rc, err, "the data changed", repr(changed))
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "again", *TINY_ARGS)
    assert rc == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert json.loads((tmp_path / "again" / "split.json").read_text())["test"] == split["test"]
    assert again["test_split"] != first["test_split"] and again["data"] != first["data"]


def test_a_resume_after_the_data_shifted_names_the_cause(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS, "--limit", "15", "--epochs", "2")
    assert rc == 0, err
    state = bts.load_checkpoint(out / "last.pth")
    state.update(epoch=1, step=0)
    bts.save_checkpoint(out / "last.pth", state)
    (out / "metrics.json").unlink()
    write_pair(dataset, "0", *square_pair(seed=99))  # sorts first: --limit 15 now takes other files
    rc, _, err = run_cli(capsys, "--resume", "--out-dir", out, "--data-dir", dataset)
    one_error(rc, err, "the data changed since this run's split was made")


def test_fractions_that_whole_patients_cannot_honour_are_flagged_and_recorded(dataset, tmp_path, capsys):
    groups = tmp_path / "groups.csv"
    groups.write_text("image,patient_id\n" + "".join(f"{i},p{(i - 1) // 5}\n" for i in range(1, 21)))
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "o", *TINY_ARGS, "--groups", groups)
    assert rc == 0, err
    split = json.loads((tmp_path / "o" / "split.json").read_text())
    assert split["fractions"] == {"train": 0.5, "val": 0.25, "test": 0.25}
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert "could not honour" in err and "could not honour" in metrics["warning"]
    assert metrics["test"]["dice_ci95"] is None and "too few for a 95% interval" in metrics["warning"]


def test_non_finite_pixels_are_skipped_in_training_and_predict(dataset, trained, tmp_path, capsys):
    image, mask = square_pair(seed=5)
    float_image = image.astype(np.float32)
    float_image[3, 3] = np.nan
    cv2.imwrite(str(dataset / "images" / "nan.tiff"), float_image)
    cv2.imwrite(str(dataset / "masks" / "nan.tiff"), mask)
    before = snapshot(dataset)
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "o", *TINY_ARGS)
    assert rc == 0 and "nan.tiff: holds NaN or infinite pixels" in err and "pair nan skipped" in err, err
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--model", trained / "model.pth", "--out",
                         tmp_path / "p", "--device", "cpu")
    assert rc == 0 and "nan.tiff: holds NaN or infinite pixels" in err, err
    assert not (tmp_path / "p" / "masks" / "nan.png").exists() and snapshot(dataset) == before


def test_predict_skips_the_score_of_a_mask_of_another_size(dataset, trained, tmp_path, capsys):
    masks = Path(shutil.copytree(dataset / "masks", tmp_path / "masks"))
    cv2.imwrite(str(masks / "3.png"), np.zeros((40, 30), np.uint8))
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--masks", masks, "--model", trained / "model.pth",
                         "--out", tmp_path / "p", "--device", "cpu")
    assert rc == 0 and "3.png: mask is 30x40 but its image is 48x48; no scores for 3.png" in err, err
    rows = (tmp_path / "p" / "predictions.csv").read_text().splitlines()
    row = next(r for r in rows if "/3.png" in r)
    assert row.count(",") == rows[0].count(",") - 5 or row.endswith(",,,,,")  # no scores for that one


def test_predict_with_last_pth_says_its_threshold_is_untuned(dataset, trained, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--model", trained / "last.pth", "--out",
                         tmp_path / "p", "--device", "cpu")
    assert rc == 0 and "untuned threshold 0.50" in err and "model.pth beside it" in err, err


# -----------------------------------------------------------------------------
# C. One sentence, never a traceback


@pytest.mark.parametrize("old, new, message", [
    ('epochs: int = setting(20,', 'epochs: int = setting("20",', "--epochs '20': must be int"),
    ('batch_size: int = setting(16,', 'batch_size: int = setting(16.0,', "--batch-size 16.0: must be int"),
    ('augment: bool = setting(True,', 'augment: bool = setting("False",', "--augment 'False': must be bool"),
    ('low=16,\n                              high=4096)', 'low=16,\n                              high="4096")',
     "bounds of image_size must be numbers"),  # the rules beside a field are edited too
    ('SEED_RECIPE = dict(optimizer="adam", lr=1e-3,', 'SEED_RECIPE = dict(optimizer="adam", learning_rate=1e-3,',
     "SEED_RECIPE sets learning_rate, which is not a field"),
])
def test_a_default_edited_to_the_wrong_type_is_one_sentence(old, new, message, dataset, tmp_path):
    source = SCRIPT.read_text()
    assert source.count(old) == 1, old
    copy = tmp_path / "edited.py"
    copy.write_text(source.replace(old, new))
    result = subprocess.run([sys.executable, str(copy), "--data-dir", str(dataset), "--out-dir", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr and not (tmp_path / "o").exists()


def test_an_int_where_a_float_is_annotated_is_a_valid_float():
    cfg = bts.Config(lr=1, threshold=0)
    assert cfg.lr == 1.0 and type(cfg.lr) is float and type(cfg.threshold) is float


def test_the_split_of_data_rarer_than_the_folds_is_made_not_a_crash(real_dir, tmp_path, capsys):
    # the project's own 24-image 512x512 sample, with the default settings
    rc, _, err = run_cli(capsys, "--data-dir", real_dir / "brain-tumor-segmentation-512-sample", "--out-dir",
                         tmp_path / "o", *TINY_ARGS)
    assert rc == 0 and "Traceback" not in err, err


@pytest.fixture
def real_dir():
    if not REAL_DIR.is_dir():
        pytest.skip(f"{REAL_DIR} not present")
    return REAL_DIR


def test_predict_reruns_over_its_own_leftovers(dataset, trained, tmp_path, capsys):
    out = tmp_path / "p"
    args = ["predict", dataset / "images", "--model", trained / "model.pth", "--out", out, "--device", "cpu"]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    (out / ".lock").write_text("pid 1 on elsewhere, since long ago\n")  # a killed run's lock
    (out / ".predict-staging.k2j4x_9a.tmp" / "masks").mkdir(parents=True)  # and its staging folder (mkdtemp's name)
    (out / ".predict-staging.k2j4x_9a.tmp" / "masks" / "1.png").write_bytes(b"half")
    rc, _, err = run_cli(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert not (out / ".predict-staging.k2j4x_9a.tmp").exists()


def test_unicode_digit_file_names_do_not_crash_the_order(tmp_path, capsys):
    for name in ("²5", "٣", "12", "3"):
        write_pair(tmp_path / "data", name, *square_pair(seed=len(name)))
    assert [n for n, _, _ in bts.find_pairs(tmp_path / "data")] == ["3", "٣", "12", "²5"]


def test_a_groups_file_keeps_dots_that_are_part_of_a_name(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text("image,patient_id\nscan.v2,P1\nscan.v3.png,P2\n")
    assert bts.read_groups_csv(path) == {"scan.v2": ("P1", ""), "scan.v3": ("P2", "")}


@pytest.mark.slow
def test_a_bad_matplotlib_backend_or_an_ascii_terminal_changes_nothing(dataset, trained, tmp_path):
    (dataset / "images" / "scan-ü.png").write_bytes((dataset / "images" / "1.png").read_bytes())
    env = {**os.environ, "MPLBACKEND": "no-such-backend", "PYTHONIOENCODING": "ascii"}
    for args in (["--data-dir", str(dataset), "--out-dir", str(tmp_path / "o"), *TINY_ARGS],
                 ["predict", str(dataset / "images"), "--model", str(trained / "model.pth"), "--out",
                  str(tmp_path / "p"), "--device", "cpu"]):
        result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                                timeout=300)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (tmp_path / "o" / "visualizations" / "loss_curves.png").is_file()
    assert (tmp_path / "p" / "masks" / "scan-ü.png").is_file()


@pytest.mark.parametrize("where", ["tune_threshold", "evaluate_test"])
def test_a_stop_signal_after_training_leaves_a_run_that_resume_finishes(where, dataset, tmp_path, capsys,
                                                                      monkeypatch):
    real = getattr(bts, where)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(bts, where, signalled)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS)
    assert rc == 143 and "stopped after training" in err and "--resume" in err and "Traceback" not in err, err
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(bts, where, real)
    rc, _, err = run_cli(capsys, "--resume", "--out-dir", out)
    assert rc == 0, err
    assert json.loads((out / "metrics.json").read_text())["test"]["images"] > 0


@pytest.mark.slow
def test_an_error_that_one_process_meets_stops_all_of_them_printed_once(tmp_path):
    code = ("import os, sys, brain_tumor_segmentation as bts\n"
            "def entry():\n"
            "    machine = bts.set_up_machine(bts.Config(device='cpu'))\n"
            "    with bts.together(machine):\n"
            "        if machine.rank == 1:\n"
            "            raise bts.UserError('only the second process saw this')\n"
            "    print('never reached', flush=True)\n"
            "sys.exit(bts.run_cli(entry))\n")
    script = tmp_path / "one_rank_fails.py"
    script.write_text(code)
    from test_distributed import free_port
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script)],
                            capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent,
                            env={**os.environ, "PYTHONPATH": str(SCRIPT.parent), "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "never reached" not in result.stdout
    assert result.stderr.count("error: only the second process saw this") == 1, result.stderr[-3000:]
    assert "UserError" not in result.stderr  # one sentence, no traceback of ours (torchrun reports the exit)


def test_predict_overwrite_leaves_one_prediction_in_the_folder(dataset, trained, tmp_path, capsys):
    out = tmp_path / "p"
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--model", trained / "model.pth", "--out", out,
                         "--device", "cpu")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "predict", dataset / "images" / "3.png", "--model", trained / "model.pth", "--out",
                         out, "--device", "cpu", "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["3.png"]
    assert len((out / "predictions.csv").read_text().splitlines()) == 2


def test_predict_records_only_what_it_wrote_so_a_file_put_at_a_skipped_name_survives(dataset, trained, tmp_path,
                                                                                      capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(dataset / "images" / "3.png", scans)
    (scans / "broken.png").write_bytes(b"")  # unreadable: skipped, so its outputs are never written
    out = tmp_path / "p"
    rc, _, err = run_cli(capsys, "predict", scans, "--model", trained / "model.pth", "--out", out, "--device", "cpu")
    assert rc == 0 and "broken.png" in err, err
    assert "masks/broken.png" not in json.loads((out / bts.MANIFEST).read_text())["files"]
    (out / "masks" / "broken.png").write_text("my hand-drawn mask")
    rc, _, err = run_cli(capsys, "predict", scans / "3.png", "--model", trained / "model.pth", "--out", out,
                         "--device", "cpu", "--overwrite")
    assert rc == 0, err
    assert (out / "masks" / "broken.png").read_text() == "my hand-drawn mask"


def test_a_model_pth_of_another_epoch_than_the_state_records_is_chosen_anew(dataset, finished, capsys):
    state = bts.load_checkpoint(finished / "model.pth")
    bts.save_checkpoint(finished / "model.pth", {**state, "epoch": state["epoch"] + 5})  # a kill between writes
    rc, _, err = run_cli(capsys, "--resume", "--out-dir", finished, "--epochs", "3")
    assert rc == 0 and "not the best epoch this state records" in err and "chosen anew" in err, err
    assert bts.load_checkpoint(finished / "model.pth")["epoch"] == 3


@pytest.mark.slow
def test_cross_validation_trains_finished_folds_on_and_overwrite_replaces_them_all(dataset, tmp_path, capsys):
    out = tmp_path / "cv"
    args = ["--data-dir", dataset, "--out-dir", out, *TINY_ARGS, "--folds", "3", "--split", "random"]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, *args, "--resume", "--epochs", "2")  # the same folds, trained one epoch more
    assert rc == 0, err
    for k in (1, 2, 3):
        assert len(json.loads((out / f"fold_{k}" / "metrics.json").read_text())["history"]["epoch"]) == 2
    assert json.loads((out / "cv_summary.json").read_text())["folds"] == 3
    stray = out / "fold_2" / "notes.txt"
    stray.write_text("mine")
    rc, _, err = run_cli(capsys, *args, "--epochs", "2", "--lr", "5e-4", "--overwrite", "--fold", "0")
    assert rc == 1 and "other settings (--lr)" in err  # one fold alone cannot change the folder's settings
    rc, _, err = run_cli(capsys, *args, "--epochs", "2", "--lr", "5e-4", "--overwrite")
    assert rc == 0, err
    for k in (1, 2, 3):
        assert json.loads((out / f"fold_{k}" / "config.json").read_text())["lr"] == 5e-4
    assert stray.read_text() == "mine"


@pytest.mark.slow
def test_a_cross_validation_holds_only_its_own_folds_on_its_own_data(dataset, tmp_path, capsys):
    """Each fold is checked against the folder's settings and the others' data before it counts: a plain run
    at fold_N, a fold on other images, fewer epochs or more epochs for one fold alone are refused."""
    other = bts.make_synthetic_dataset(tmp_path / "other", n=40, size=48, seed=9)
    out = tmp_path / "cv"
    args = ["--out-dir", out, *TINY_ARGS, "--folds", "3", "--split", "random"]
    for data, fold in ((dataset, "0"), (other, "1"), (dataset, "2")):
        rc, _, err = run_cli(capsys, "--data-dir", data, *args, "--fold", fold)
    one_error(rc, err, "different data")
    assert not (out / "cv_summary.json").exists()
    shutil.rmtree(out / "fold_2")  # a plain run put where fold 2 belongs is not fold 2
    assert run_cli(capsys, "--data-dir", dataset, *TINY_ARGS, "--out-dir", out / "fold_2")[0] == 0
    rc, _, err = run_cli(capsys, "--data-dir", dataset, *args, "--resume")
    one_error(rc, err, "not fold 2 of this cross-validation")
    record = (out / bts.MANIFEST).read_bytes()
    rc, _, err = run_cli(capsys, "--data-dir", dataset, *args, "--resume", "--epochs", "2", "--fold", "0")
    one_error(rc, err, "all folds together")
    assert (out / bts.MANIFEST).read_bytes() == record


def test_the_data_reached_through_links_is_still_the_data(dataset, tmp_path, capsys):
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "images").symlink_to(dataset / "images")
    (linked / "masks").symlink_to(dataset / "masks")
    before = snapshot(dataset)
    for out in (dataset / "images", dataset):
        rc, _, err = run_cli(capsys, "--data-dir", linked, "--out-dir", out, *TINY_ARGS)
        one_error(rc, err, "the data folder")
    assert snapshot(dataset) == before


def test_demo_data_is_never_deleted_to_make_another_size(tmp_path, capsys):
    common = ["--demo", "--data-dir", tmp_path / "demo", *TINY_ARGS]
    rc, _, err = run_cli(capsys, *common, "--demo-images", "12", "--out-dir", tmp_path / "a")
    assert rc == 0, err
    (tmp_path / "demo" / "NOTES.txt").write_text("mine")
    before = snapshot(tmp_path / "demo")
    rc, _, err = run_cli(capsys, *common, "--demo-images", "14", "--out-dir", tmp_path / "b")
    one_error(rc, err, "holds 12", "never deleted")
    assert snapshot(tmp_path / "demo") == before


def test_a_fold_and_a_run_cannot_be_trained_back_or_apart(dataset, finished, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--resume", "--out-dir", finished, "--epochs", "1")
    one_error(rc, err, "finished run")  # metrics.json: finished, whatever the epochs
    (finished / "metrics.json").unlink()
    rc, _, err = run_cli(capsys, "--resume", "--out-dir", finished, "--epochs", "1")
    one_error(rc, err, "--epochs 1", "trained 2 epochs already")
    cv = tmp_path / "cv"
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", cv, *TINY_ARGS, "--folds", "3", "--split", "random")
    assert rc == 0, err
    before = snapshot(cv, ignore=".lock")
    rc, _, err = run_cli(capsys, "--resume", cv / "fold_1", "--epochs", "2")
    one_error(rc, err, "fold 1 of a cross-validation", "--folds 3 --resume --epochs 2")
    assert snapshot(cv, ignore=".lock") == before


def test_a_resumed_run_keeps_the_warnings_of_its_split(dataset, tmp_path, capsys, monkeypatch):
    groups = tmp_path / "groups.csv"
    groups.write_text("image,patient_id\n" + "".join(f"{i},p{(i - 1) // 5}\n" for i in range(1, 21)))
    real = bts.end_epoch

    def stop_after_epoch_1(run, seconds):
        real(run, seconds)
        if run.epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(bts, "end_epoch", stop_after_epoch_1)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS, "--epochs", "3",
                         "--groups", groups)
    assert rc == 130, err
    monkeypatch.setattr(bts, "end_epoch", real)
    rc, _, err = run_cli(capsys, "--resume", "--out-dir", out)
    assert rc == 0, err
    assert "could not honour" in json.loads((out / "metrics.json").read_text())["warning"]


def test_a_cross_validation_that_cannot_start_leaves_no_folder(dataset, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "cv", *TINY_ARGS, "--folds", "40",
                         "--split", "random")
    one_error(rc, err, "too few for 40 folds")
    assert not (tmp_path / "cv").exists()


@pytest.mark.parametrize("entry", [".", "visualizations/", "model.pth\u0000x", ""])
def test_a_record_that_lists_no_plain_file_is_refused_before_anything_is_deleted(entry, dataset, finished, capsys):
    record = json.loads((finished / bts.MANIFEST).read_text())
    (finished / bts.MANIFEST).write_text(json.dumps({**record, "files": [*record["files"], entry]}))
    before = snapshot(finished, ignore=".lock")
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", finished, *TINY_ARGS, "--overwrite")
    one_error(rc, err, "is not a record of this script's outputs")
    assert snapshot(finished, ignore=".lock") == before


def test_the_data_reached_through_a_bind_mount_is_still_the_data(dataset, tmp_path, capsys):
    """Another name for the same folder that resolve() cannot see: compared by device and inode."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    if subprocess.run(["mount", "--bind", str(dataset), str(mirror)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        before = snapshot(dataset)
        rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", mirror / "images" / "run", *TINY_ARGS)
        one_error(rc, err, "the data folder")
        assert snapshot(dataset) == before
    finally:
        subprocess.run(["umount", str(mirror)], check=True)
