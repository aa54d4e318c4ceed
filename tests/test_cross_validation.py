"""Cross-validation through its command line, cross_validate.py: `--folds K` creates ROOT with its
record (cross_validation.json) and one run per fold in ROOT/fold_1 .. fold_K (`--fold N` is 1-based);
`--resume ROOT` continues it (finished folds kept, more epochs for all folds, never fewer, never for
one fold alone); cv_summary.json only once all K folds are finished and their test parts are one
partition of the same data. Tiny data (20 slices of 10 patients), one epoch per fold."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import cv2
import pytest

import brain_tumor_segmentation as bts
import compare
import cross_validate
from conftest import REPO_ROOT, TINY_ARGS, make_dataset, one_error, run_cli, snapshot, train_tiny

CV_SCRIPT = REPO_ROOT / "cross_validate.py"


def run_cv(capsys, *args) -> tuple[int, str, str]:
    """cross_validate.main(args) in this process; returns (return code, stdout, stderr)."""
    capsys.readouterr()
    rc = cross_validate.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def write_groups(path: Path, patient_of) -> Path:
    path.write_text("image,patient_id\n" + "".join(f"{i},p{patient_of(i)}\n" for i in range(1, 21)))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """20 slices of 10 patients (two each), and their groups file."""
    root = tmp_path_factory.mktemp("source")
    return make_dataset(root / "data"), write_groups(root / "groups.csv", lambda i: (i + 1) // 2)


@pytest.fixture(scope="module")
def cv(source, tmp_path_factory):
    """A finished 3-fold cross-validation of `source`, by a groups file given by its absolute path. Never
    changed: the tests that change one work on a copy."""
    root = tmp_path_factory.mktemp("cv")
    data, groups = source
    printed = io.StringIO()
    with redirect_stdout(printed):
        rc = cross_validate.main(["--data-dir", str(data), "--groups", str(groups), "--folds", "3", "--out-dir",
                       str(root / "cv"), *TINY_ARGS])
    assert rc == 0
    return {"root": root / "cv", "data": data, "groups": groups, "stdout": printed.getvalue(),
            "args": ["--data-dir", data, "--groups", groups, *TINY_ARGS]}


def copy_of(cv, tmp_path) -> Path:
    return Path(shutil.copytree(cv["root"], tmp_path / "cv"))


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def advice(message: str, pattern: str) -> list[str]:
    """The command a refusal names, as arguments."""
    match = re.search(pattern, message)
    assert match, (pattern, message)
    return match.group(0).split()


# -----------------------------------------------------------------------------
# A cross-validation's folder


@pytest.mark.slow
def test_folds_k_creates_its_folder_with_the_record_and_fold_1_to_k(cv):
    root = cv["root"]
    assert sorted(p.name for p in root.iterdir()) == ["cross_validation.json", "cv_summary.json", "fold_1", "fold_2",
                                                      "fold_3"]
    record = read(root / "cross_validation.json")
    assert record["folds"] == 3 and record["config"]["folds"] == 3 and record["config"]["groups"] == str(cv["groups"])
    groups = {str(i): f"p{(i + 1) // 2}" for i in range(1, 21)}
    names = sorted(groups, key=int)
    fold_of = bts.group_folds([groups[n] for n in names], [""] * 20, 3, 42)  # the folds 0..2 of the patients
    tests = []
    for k in (1, 2, 3):
        fold = root / f"fold_{k}"
        config = read(fold / "config.json")
        assert (config["folds"], config["fold"]) == (3, k)
        split = read(fold / "split.json")
        assert f"fold {k} of 3 is the test part" in split["how"]
        assert set(split["train"]) | set(split["val"]) | set(split["test"]) == {str(i) for i in range(1, 21)}
        assert not set(split["train_patients"]) & set(split["test_patients"])
        assert sorted(split["test"], key=int) == [n for n, f in zip(names, fold_of) if f == k - 1]  # 1-based
        tests.append(split["test"])
        assert (fold / "metrics.json").is_file() and (fold / "last.pth").is_file()
    assert sorted((n for t in tests for n in t), key=int) == [str(i) for i in range(1, 21)]  # a partition
    summary = read(root / "cv_summary.json")
    assert summary["folds"] == 3 and summary["test_images"] == 20
    assert summary["test_dice_per_fold"] == [read(root / f"fold_{k}" / "metrics.json")["test"]["dice"]
                                             for k in (1, 2, 3)]
    assert cv["stdout"].strip().splitlines()[-1] == f"folder: {root}"


@pytest.mark.slow
def test_fold_n_is_one_based_and_folds_k_on_an_existing_folder_names_the_way_on(cv, tmp_path, capsys):
    """--fold 2 trains fold_2 alone, the fold_2 of the whole cross-validation; --folds 3 --out-dir on that
    folder is refused at once, naming --resume ROOT, which then finishes it with the folds kept."""
    root = tmp_path / "cv"
    rc, out, err = run_cv(capsys, *cv["args"], "--folds", "3", "--fold", "2", "--out-dir", root)
    assert rc == 0, err
    assert sorted(p.name for p in root.iterdir()) == ["cross_validation.json", "fold_2"]
    assert read(root / "fold_2" / "split.json")["test"] == read(cv["root"] / "fold_2" / "split.json")["test"]
    assert "1 of 3 folds finished; the summary waits for the rest" in out

    before = snapshot(root)
    rc, out, err = run_cv(capsys, *cv["args"], "--folds", "3", "--out-dir", root)
    message = one_error(rc, err, f"{root} exists already")
    assert "=== fold" not in out and snapshot(root) == before  # refused before any training
    kept = (root / "fold_2" / "model.pth").stat()

    rc, out, err = run_cv(capsys, *advice(message, r"--resume \S+$"))
    assert rc == 0, err
    assert "fold 2: finished already, kept" in out
    assert (root / "fold_2" / "model.pth").stat().st_mtime_ns == kept.st_mtime_ns
    assert read(root / "cv_summary.json")["test_dice_per_fold"] == read(cv["root"] / "cv_summary.json")[
        "test_dice_per_fold"]  # the same folds as those trained in one go


@pytest.mark.slow
@pytest.mark.parametrize("foreign", ["another fold", "a plain run"])
def test_a_plain_run_or_another_fold_at_fold_n_is_refused_naming_it(foreign, cv, tmp_path, capsys):
    root = copy_of(cv, tmp_path)
    shutil.rmtree(root / "fold_2")
    if foreign == "another fold":
        shutil.copytree(root / "fold_1", root / "fold_2")
    else:
        train_tiny(capsys, cv["data"], root / "fold_2", "--groups", cv["groups"])
    before = snapshot(root)
    rc, _, err = run_cv(capsys, "--resume", root)
    one_error(rc, err, f"{root / 'fold_2'} is not fold 2 of this cross-validation",
              "--fold" if foreign == "another fold" else "--folds")
    assert snapshot(root) == before


@pytest.mark.slow
def test_the_way_on_from_a_foreign_fold_retrains_that_fold_alone(cv, tmp_path, capsys):
    root = copy_of(cv, tmp_path)
    shutil.rmtree(root / "fold_2")
    shutil.copytree(root / "fold_1", root / "fold_2")
    rc, _, err = run_cv(capsys, "--resume", root)
    message = one_error(rc, err, "move it out of")
    shutil.move(root / "fold_2", tmp_path / "moved")
    others = {k: snapshot(root / f"fold_{k}") for k in (1, 3)}
    rc, _, err = run_cv(capsys, *advice(message, r"--resume \S+ --fold 2$"))
    assert rc == 0, err
    assert read(root / "fold_2" / "config.json")["fold"] == 2
    assert {k: snapshot(root / f"fold_{k}") for k in (1, 3)} == others
    assert read(root / "cv_summary.json")["test_images"] == 20


# -----------------------------------------------------------------------------
# More epochs: for all folds together


@pytest.fixture(scope="module")
def extended(cv, tmp_path_factory):
    """A copy of the cross-validation that one fold alone was refused to train further, then trained
    further (--epochs 2) by the command that refusal named."""
    root = Path(shutil.copytree(cv["root"], tmp_path_factory.mktemp("extended") / "cv"))
    result = {"root": root, "before": snapshot(root)}
    for step, args in (("refused", ["--resume", str(root / "fold_1"), "--epochs", "2"]), ("advised", None)):
        printed, errors = io.StringIO(), io.StringIO()
        program = bts.main
        if args is None:  # the trainer names the cross-validation's own command
            command = shlex.split(result["refused"][1].strip().split("further with ")[-1])
            assert command[:2] == [sys.executable, str(CV_SCRIPT)], command
            args, program = command[2:], cross_validate.main
        with redirect_stdout(printed), redirect_stderr(errors):
            rc = program(args)
        result[step] = (rc, errors.getvalue(), printed.getvalue())
        if step == "refused":
            result["after refusal"] = snapshot(root)
    return result


@pytest.mark.slow
def test_one_fold_alone_is_refused_more_epochs_and_the_command_named_trains_them_all(extended):
    rc, err, _ = extended["refused"]
    one_error(rc, err, f"{extended['root'] / 'fold_1'} is fold 1 of a cross-validation",
              f"--resume {extended['root']} --epochs 2")
    assert extended["after refusal"] == extended["before"]
    rc, err, _ = extended["advised"]
    assert rc == 0, err
    root = extended["root"]
    for k in (1, 2, 3):
        assert read(root / f"fold_{k}" / "metrics.json")["history"]["epoch"] == [1, 2]
        assert bts.load_checkpoint(root / f"fold_{k}" / "last.pth")["epoch"] == 2
    assert read(root / "cv_summary.json")["test_dice_per_fold"] == [
        read(root / f"fold_{k}" / "metrics.json")["test"]["dice"] for k in (1, 2, 3)]


@pytest.mark.slow
def test_fewer_epochs_than_the_folds_train_are_refused(source, tmp_path, capsys):
    root = tmp_path / "cv"
    data, groups = source
    rc, _, err = run_cv(capsys, "--data-dir", data, "--groups", groups, *TINY_ARGS, "--epochs", "2", "--folds", "3",
                         "--fold", "3", "--out-dir", root)
    assert rc == 0, err
    before = snapshot(root)
    rc, out, err = run_cv(capsys, "--resume", root, "--epochs", "1")
    one_error(rc, err, f"{root}: its folds train 2 epochs", "never fewer")
    assert "=== fold" not in out and snapshot(root) == before


@pytest.mark.slow
def test_a_cross_validation_trained_further_resumes_and_refuses_fewer_epochs(extended, tmp_path, capsys):
    root = Path(shutil.copytree(extended["root"], tmp_path / "cv"))
    before = snapshot(root, ignore="cv_summary.json")
    rc, out, err = run_cv(capsys, "--resume", root)
    assert rc == 0, err
    assert out.count("finished already, kept") == 3 and snapshot(root, ignore="cv_summary.json") == before
    rc, _, err = run_cv(capsys, "--resume", root, "--epochs", "1")
    one_error(rc, err, "never fewer")


@pytest.mark.slow
@pytest.mark.parametrize("folds", [["--folds", "3"], []], ids=["with-folds", "alone"])
def test_more_epochs_for_one_fold_alone_are_refused(folds, cv, capsys):
    before = snapshot(cv["root"])
    rc, out, err = run_cv(capsys, "--resume", cv["root"], *folds, "--fold", "1", "--epochs", "2")
    one_error(rc, err, "add epochs to all folds together (without --fold)")
    assert "=== fold" not in out and snapshot(cv["root"]) == before


# -----------------------------------------------------------------------------
# The summary: all folds, one partition of the same data


def changed_image(cv):
    path = cv["data"] / "images" / "5.png"
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), 255 - image)  # other pixels, the same name


def changed_groups(cv):
    write_groups(cv["groups"], lambda i: i % 7)  # other patients, the same file


@pytest.mark.slow
@pytest.mark.parametrize("change", [changed_image, changed_groups], ids=["data", "groups-file"])
def test_folds_of_other_data_or_groups_are_refused_at_the_summary(change, cv, tmp_path, capsys):
    """Fold 3 trained after the data (or the groups file's content) changed: its test part is not the rest
    of the same data, so no summary is written."""
    root = copy_of(cv, tmp_path)
    shutil.rmtree(root / "fold_3")
    (root / "cv_summary.json").unlink()
    saved = {p: p.read_bytes() for p in (cv["data"] / "images" / "5.png", cv["groups"])}
    try:
        change(cv)
        rc, out, err = run_cv(capsys, "--resume", root)
    finally:
        for path, content in saved.items():
            path.write_bytes(content)
    one_error(rc, err, f"{root}: its folds' test parts are not one partition of the same data", "changed between folds")
    assert "=== fold 3 of 3" in out and (root / "fold_3" / "metrics.json").is_file()
    assert not (root / "cv_summary.json").exists()


@pytest.mark.slow
def test_a_fold_trained_after_the_groups_file_changed_is_refused_by_the_summary_and_by_compare(cv, tmp_path, capsys):
    """Issue class H as the issue tells it: fold 3 trained alone (--fold 3) after the groups file's content
    changed tests some images that fold 1 or 2 tested too. cv_summary.json reported such folds as one
    cross-validation, and compare accepted them; both refuse them now."""
    root = copy_of(cv, tmp_path)
    shutil.rmtree(root / "fold_3")
    (root / "cv_summary.json").unlink()
    saved = cv["groups"].read_bytes()
    try:
        changed_groups(cv)
        rc, out, err = run_cv(capsys, "--resume", root, "--fold", "3")
    finally:
        cv["groups"].write_bytes(saved)
    one_error(rc, err, "not one partition of the same data")
    assert "=== fold 3 of 3" in out and (root / "fold_3" / "metrics.json").is_file()
    tested = [name for k in (1, 2, 3) for name in read(root / f"fold_{k}" / "split.json")["test"]]
    assert len(tested) > len(set(tested))  # the folds' test parts overlap: the case of the issue
    assert not (root / "cv_summary.json").exists()
    capsys.readouterr()
    rc = compare.main([str(cv["root"]), str(root), "--out", str(tmp_path / "c")])
    one_error(rc, capsys.readouterr().err, str(root), "not one cross-validation")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_relative_groups_path_is_the_same_groups_file_for_every_fold(cv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(cv["groups"], tmp_path / "groups.csv")
    rc, out, err = run_cv(capsys, "--data-dir", cv["data"], "--groups", "groups.csv", *TINY_ARGS, "--folds", "3",
                           "--fold", "1", "--out-dir", "cv")
    assert rc == 0, err
    assert "1 of 3 folds finished" in out


# -----------------------------------------------------------------------------
# Known before, refused before: nothing trains when a fold's folder cannot be made


def test_a_file_where_a_fold_folder_goes_is_refused_before_any_fold_trains(source, tmp_path, capsys):
    """Issue class Q: a file named fold_2 in the folder of a new cross-validation was found only after fold
    1 had trained. A new cross-validation's folder must not exist at all now: refused at once."""
    root = tmp_path / "cv"
    root.mkdir()
    (root / "fold_2").write_text("a user's file\n")
    before = snapshot(tmp_path)
    data, groups = source
    rc, out, err = run_cv(capsys, "--data-dir", data, "--groups", groups, *TINY_ARGS, "--folds", "3", "--out-dir", root)
    one_error(rc, err, f"{root} exists already")
    assert "=== fold" not in out and "epoch" not in out
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_file_where_a_fold_folder_goes_stops_a_resumed_cross_validation_before_any_fold_trains(source, tmp_path,
                                                                                               capsys):
    """Issue class Q: what stands where a fold's folder goes is known before any fold trains; a cross-
    validation continued with --resume ROOT must say so at once, naming it, not after training fold 1."""
    root = tmp_path / "cv"
    data, groups = source
    rc, _, err = run_cv(capsys, "--data-dir", data, "--groups", groups, *TINY_ARGS, "--folds", "3", "--fold", "3",
                         "--out-dir", root)
    assert rc == 0, err
    (root / "fold_2").write_text("a user's file\n")
    before = snapshot(root)
    rc, out, err = run_cv(capsys, "--resume", root)
    assert "=== fold 1" not in out, "fold 1 trained before the file at fold_2 was found"
    one_error(rc, err, str(root / "fold_2"))
    assert snapshot(root) == before


@pytest.mark.parametrize("args, message", [
    (["--folds", "40"], "too few for 40 folds"),
    (["--folds", "3", "--fold", "4"], "--fold 4"),
    (["--folds", "3", "--groups", "{tmp}/nul.csv"], "NUL bytes"),
    (["--folds", "3", "--val-fraction", "0.3"], "drop them"),
])
def test_a_cross_validation_that_cannot_start_leaves_no_folder(args, message, source, tmp_path, capsys):
    (tmp_path / "nul.csv").write_text("image,patient_id\n1,\0\n")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--groups" not in args:
        args += ["--groups", str(source[1])]
    before = snapshot(tmp_path)
    rc, _, err = run_cv(capsys, "--data-dir", source[0], *TINY_ARGS, *args, "--out-dir", tmp_path / "cv")
    one_error(rc, err, message)
    assert snapshot(tmp_path) == before


# -----------------------------------------------------------------------------
# A stopped cross-validation: the command it prints continues it


@pytest.mark.slow
def test_a_stopped_cross_validation_prints_a_command_that_continues_it(source, tmp_path, capsys, monkeypatch):
    """Issue class S: the command to continue is this Python, this script's own path, and the cross-
    validation's folder, quoted (here it has a space); run as printed, it finishes the folds."""
    real, sent = bts.compute_loss, []

    def stop_in_fold_2(logits, target, cfg):
        if logits.requires_grad and cfg.fold == 2 and not sent:  # fold 2's first training step
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return real(logits, target, cfg)

    monkeypatch.setattr(bts, "compute_loss", stop_in_fold_2)
    data, groups = source
    root = tmp_path / "my cv"
    rc, _, err = run_cv(capsys, "--data-dir", data, "--groups", groups, *TINY_ARGS, "--folds", "3", "--out-dir", root)
    assert rc == 130 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1].strip()
    command = shlex.split(line)
    assert command == [sys.executable, str(CV_SCRIPT), "--resume", str(root.resolve())] and line == shlex.join(command)
    monkeypatch.setattr(bts, "compute_loss", real)
    rc, out, err = run_cv(capsys, *command[2:])
    assert rc == 0, err
    assert "fold 1: finished already, kept" in out and "=== fold 2 of 3" in out
    assert read(root / "cv_summary.json")["test_images"] == 20


# -----------------------------------------------------------------------------
# The trainer and the cross-validation: each refuses the other's work, naming the command that does it


def test_the_trainer_refuses_folds_without_fold_naming_cross_validate(source, tmp_path, capsys):
    before = snapshot(tmp_path)
    rc, out, err = run_cli(capsys, "--data-dir", source[0], *TINY_ARGS, "--folds", "3", "--out-dir", tmp_path / "cv")
    one_error(rc, err, "--folds 3 without --fold N", "python cross_validate.py --folds 3")
    assert snapshot(tmp_path) == before and "epoch" not in out


@pytest.mark.slow
def test_the_trainer_trains_one_fold_alone_as_a_plain_run(source, cv, tmp_path, capsys):
    data, groups = source
    rc, _, err = run_cli(capsys, "--data-dir", data, "--groups", groups, *TINY_ARGS, "--folds", "3", "--fold", "2",
                         "--out-dir", tmp_path / "f2")
    assert rc == 0, err
    assert read(tmp_path / "f2" / "split.json")["test"] == read(cv["root"] / "fold_2" / "split.json")["test"]


def test_resuming_a_cross_validation_with_the_trainer_names_cross_validate(cv, capsys):
    before = snapshot(cv["root"])
    rc, _, err = run_cli(capsys, "--resume", cv["root"])
    one_error(rc, err, "it is a cross-validation", f"cross_validate.py --resume {cv['root']}")
    assert snapshot(cv["root"]) == before


def test_cross_validate_needs_folds_or_resume_and_its_resume_needs_a_record(tmp_path, capsys):
    rc, _, err = run_cv(capsys, "--epochs", "1")
    one_error(rc, err, "--folds K")
    (tmp_path / "run").mkdir()
    rc, _, err = run_cv(capsys, "--resume", tmp_path / "run")
    one_error(rc, err, "not a cross-validation's record", "brain_tumor_segmentation.py --resume")


# -----------------------------------------------------------------------------
# A resumed cross-validation: checked before its record changes, its old summary gone before a fold trains


@pytest.mark.slow
def test_a_refused_extension_changes_nothing_and_a_plain_resume_then_finishes(cv, tmp_path, capsys):
    root = copy_of(cv, tmp_path)
    shutil.rmtree(root / "fold_3")
    (root / "cv_summary.json").unlink()
    (root / "fold_3").write_text("a user's file\n")
    before = snapshot(root)
    rc, out, err = run_cv(capsys, "--resume", root, "--epochs", "2")
    one_error(rc, err, str(root / "fold_3"))
    assert snapshot(root) == before and read(root / "cross_validation.json")["config"]["epochs"] == 1
    (root / "fold_3").unlink()
    rc, out, err = run_cv(capsys, "--resume", root)
    assert rc == 0, err
    assert read(root / "cv_summary.json")["test_images"] == 20


@pytest.mark.slow
def test_an_extension_stopped_in_its_first_fold_has_removed_the_old_summary_and_continues(cv, tmp_path, capsys,
                                                                                        monkeypatch):
    root = copy_of(cv, tmp_path)
    real = bts.compute_loss

    def stop(logits, target, cfg):
        if logits.requires_grad:
            raise KeyboardInterrupt
        return real(logits, target, cfg)

    monkeypatch.setattr(bts, "compute_loss", stop)
    rc, _, err = run_cv(capsys, "--resume", root, "--epochs", "2")
    assert rc == 130 and "Traceback" not in err, err
    assert not (root / "cv_summary.json").exists()  # it described the 1-epoch folds
    monkeypatch.setattr(bts, "compute_loss", real)
    rc, _, err = run_cv(capsys, *shlex.split(err.strip().splitlines()[-1])[2:])
    assert rc == 0, err  # the printed command trains every fold to the record's 2 epochs
    assert [len(read(root / f"fold_{k}" / "metrics.json")["history"]["epoch"]) for k in (1, 2, 3)] == [2, 2, 2]


def test_folds_or_fold_on_a_resume_are_refused(cv, capsys):
    before = snapshot(cv["root"])
    rc, _, err = run_cli(capsys, "--resume", cv["root"] / "fold_1", "--folds", "3", "--fold", "1", "--epochs", "2")
    one_error(rc, err, "a resumed run keeps its own", "cross_validate.py --resume")
    rc, _, err = run_cv(capsys, "--resume", cv["root"], "--folds", "4")
    one_error(rc, err, "--folds", "a resumed run keeps the settings it was trained with")
    assert snapshot(cv["root"]) == before
