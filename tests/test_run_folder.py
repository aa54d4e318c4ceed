"""The one-folder rule, for all three programs (training, predict.py, compare.py), through their real
commands on real folders, with checksums of everything before and after: each writes only into a
folder it creates in that command, each file whole; an existing path given as its output folder is
refused in one sentence and left as it was; a run that fails before its first checkpoint takes its
folder away again (but never a file someone else put there); the run's lock is held while it writes."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest

import brain_tumor_segmentation as bts
import compare
import predict
from conftest import (REPO_ROOT, SCRIPT, TINY_ARGS, make_dataset, one_error, run_cli, run_folders, snapshot,
                      without_root_override)

STAMP = re.compile(r"^(\d{8}-\d{6})-(.+)$")
REFUSED = "writes only into a folder it creates"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A dataset and two finished tiny runs of it (seeds 1 and 2), shared by the module and never changed
    (the tests that change a run work on a copy)."""
    root = tmp_path_factory.mktemp("base")
    data = make_dataset(root / "data")
    runs = []
    for seed in (1, 2):
        out = root / f"run{seed}"
        assert bts.main(["--data-dir", str(data), "--out-dir", str(out), *TINY_ARGS, "--seed", str(seed)]) == 0
        runs.append(out)
    return {"data": data, "runs": runs, "scan": data / "images" / "3.png"}


def run_predict(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = predict.main([str(a) for a in args] + ["--device", "cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def run_compare(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = compare.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def run_program(program: str, capsys, base, out, *extra) -> tuple[int, str, str]:
    """One command of `program` writing into `out` ("" = its default folder)."""
    out_flag = ([] if out == "" else ["--out-dir" if program == "training" else "--out", out])
    if program == "training":
        return run_cli(capsys, "--data-dir", base["data"], *out_flag, *TINY_ARGS, *extra)
    if program == "predict":
        return run_predict(capsys, base["scan"], "--model", base["runs"][0], *out_flag, *extra)
    return run_compare(capsys, *base["runs"], *out_flag, *extra)


def everything(work: Path, base) -> dict:
    """Checksums of the working folder, the data and the runs: what no refusal may change."""
    state = {"work": snapshot(work), "data": snapshot(base["data"]),
             **{str(run): snapshot(run) for run in base["runs"]}}
    state["inodes"] = [snapshot(folder, inodes=True) for folder in (work, base["data"], *base["runs"])]  # no rewrite
    state["links"] = {str(p): os.readlink(p) for p in work.rglob("*") if p.is_symlink()}
    return state


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder (the current one) holding every kind of existing path an output may be given."""
    work = tmp_path / "work"
    (work / "full" / "sub").mkdir(parents=True)
    (work / "full" / "notes.txt").write_text("a user's notes\n")
    (work / "full" / "sub" / "scan.png").write_bytes(b"\x89PNG not really")
    (work / "empty").mkdir()
    (work / "afile").write_text("in the way\n")
    (work / "link").symlink_to(work / "full")
    (work / "dangling").symlink_to(work / "nowhere")
    (work / "outputs" / "20260101-000000-improved-seed42").mkdir(parents=True)
    (work / "outputs" / "20260101-000000-improved-seed42" / "model.pth").write_bytes(b"another run's model")
    monkeypatch.chdir(work)
    return work


PROGRAMS = ["training", "predict", "compare"]
KINDS = ["folder with files", "empty folder", "file", "symlink to a folder", "dangling symlink", "dataset root",
         "run folder", "outputs/"]


def target_of(kind: str, work: Path, base) -> str:
    return {"folder with files": str(work / "full"), "empty folder": str(work / "empty"), "file": str(work / "afile"),
            "symlink to a folder": str(work / "link"), "dangling symlink": str(work / "dangling"),
            "dataset root": str(base["data"]), "run folder": str(base["runs"][0]), "outputs/": "outputs"}[kind]


# -----------------------------------------------------------------------------
# An existing path is never an output folder


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("program", PROGRAMS)
def test_an_existing_output_path_of_any_kind_is_refused_and_left_unchanged(program, kind, work, base, capsys):
    target = target_of(kind, work, base)
    before = everything(work, base)
    rc, out, err = run_program(program, capsys, base, target)
    message = one_error(rc, err, f"{target} exists already", REFUSED)
    assert len(err.strip().splitlines()) == 1, err  # the sentence alone
    if program == "training":
        assert f"--resume {target}" in message  # the way on, should it be a run to continue
        assert "epoch" not in out and "data:" not in out  # refused before anything was read
    assert everything(work, base) == before


@pytest.mark.parametrize("where", ["masks", "images", "."])
def test_predict_never_writes_into_the_folders_it_reads(where, work, base, capsys):
    """The ground truth of --masks, the scans' folder, the dataset: all exist, so none is an output."""
    data = base["data"]
    before = everything(work, base)
    rc, _, err = run_predict(capsys, data / "images", "--masks", data / "masks", "--model", base["runs"][0], "--out",
                             data / where)
    one_error(rc, err, f"{data / where} exists already", REFUSED)
    assert everything(work, base) == before


DEFAULT_PARENT = {"training": "outputs", "predict": "predictions", "compare": "comparisons"}


@pytest.mark.parametrize("given", [True, False], ids=["given", "default"])
@pytest.mark.parametrize("program", PROGRAMS)
def test_a_file_where_a_parent_folder_should_be_is_refused_before_anything_runs(program, given, work, base, capsys):
    if given:
        target, named = work / "afile" / "below" / "new", str(work / "afile" / "below")
    else:  # the default folder's parent (outputs/, predictions/, comparisons/) is a file
        parent = work / DEFAULT_PARENT[program]
        if parent.is_dir():
            shutil.rmtree(parent)
        parent.write_text("a file of the same name\n")
        target, named = "", f"cannot write {DEFAULT_PARENT[program]}:"
    before = everything(work, base)
    rc, out, err = run_program(program, capsys, base, target)
    one_error(rc, err, named, "a file stands where one of its folders should be")
    assert "epoch" not in out and "data:" not in out and "segmented" not in out
    assert everything(work, base) == before


def test_a_file_where_the_runs_subfolder_goes_is_refused_before_anything_trains(base, tmp_path, capsys):
    """Issue class Q: --out-dir on a folder holding a file named visualizations trained a whole epoch before
    the file was found. A run's folder is new now: the existing one is refused before any data is read."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "visualizations").write_text("a user's file\n")
    before = snapshot(tmp_path)
    rc, stdout, err = run_cli(capsys, "--data-dir", base["data"], "--out-dir", out, *TINY_ARGS)
    one_error(rc, err, f"{out} exists already")
    assert "epoch" not in stdout and "data:" not in stdout
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_file_where_a_resumed_runs_subfolder_goes_is_refused_before_the_run_changes(base, tmp_path, capsys):
    """Issue class Q: what stands where an output folder goes is known before anything is done, in a
    resumed run's own folder too: one sentence naming it, and the run (a finished one) left as it was."""
    run = Path(shutil.copytree(base["runs"][0], tmp_path / "run"))
    shutil.rmtree(run / "visualizations")
    (run / "visualizations").write_text("a user's file\n")
    before = snapshot(run, ignore="train.log")
    rc, stdout, err = run_cli(capsys, "--resume", run, "--epochs", "2")
    one_error(rc, err, str(run / "visualizations"))
    assert not re.search(r"^epoch +2/2", stdout, re.M) and bts.load_checkpoint(run / "last.pth")["epoch"] == 1
    assert snapshot(run, ignore="train.log") == before, "the finished run was changed before the refusal"


@pytest.mark.subprocess
def test_a_parent_folder_without_write_permission_is_one_sentence(base, tmp_path):
    locked = tmp_path / "read-only"
    locked.mkdir(mode=0o555)
    os.chmod(tmp_path, 0o777)
    command = [sys.executable, str(SCRIPT), "--data-dir", str(base["data"]), "--out-dir", str(locked / "run"),
               *TINY_ARGS]
    result = subprocess.run(without_root_override(command), capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    one_error(result.returncode, result.stderr, "no permission to write", str(locked / "run"))
    assert list(locked.iterdir()) == []


def test_a_resumed_run_continues_only_in_its_own_folder(base, tmp_path, capsys):
    run = base["runs"][0]
    before = snapshot(run)
    rc, _, err = run_cli(capsys, "--resume", run / "last.pth", "--out-dir", tmp_path / "elsewhere", "--epochs", "3")
    one_error(rc, err, "name two folders", str(run))
    assert snapshot(run) == before and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("last", [None, b"a user's file named last.pth"], ids=["no-last-pth", "a-foreign-last-pth"])
def test_resume_on_a_folder_that_holds_no_run_changes_nothing(last, work, capsys):
    folder = work / "full"
    for name in ("config.json", "metrics.json", ".lock", "model.pth"):
        (folder / name).write_text("a user's own file\n")
    if last:
        (folder / "last.pth").write_bytes(last)
    before = snapshot(folder, inodes=True)
    rc, _, err = run_cli(capsys, "--resume", folder, "--epochs", "2")
    one_error(rc, err, str(folder / "last.pth"), "no resumable state" if last is None else "not a checkpoint this "
              "script can load")
    assert snapshot(folder, inodes=True) == before


# -----------------------------------------------------------------------------
# Default folders: new, time-stamped, in time order, unique


def test_the_default_training_folder_is_new_time_stamped_unique_and_named_last(base, work, tmp_path, capsys,
                                                                              monkeypatch):
    """One real run with the default folder: two runs that start in the same second get -2; the last line
    names the folder and the one before the predict command; the run holds RUN/.lock while it trains and
    writes nothing outside its folder (not even a temporary file)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    start = time.time()
    taken = []  # another run's folder at every second the run may start in
    for t in range(int(start) - 1, int(start) + 60):
        folder = work / "outputs" / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(t))}-improved-seed42"
        if not folder.exists():
            folder.mkdir()
            (folder / "notes.txt").write_text("another run's\n")
            taken.append(folder)
    before = snapshot(work)

    probes = []
    real_end_epoch = bts.end_epoch

    def probing(run, seconds):  # another process trying the run's lock while it trains
        with open(run.out / ".lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                probes.append("free")
                fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                probes.append("held")
        real_end_epoch(run, seconds)

    monkeypatch.setattr(bts, "end_epoch", probing)
    rc, out, err = run_cli(capsys, "--data-dir", base["data"], *TINY_ARGS)
    end = time.time()
    assert rc == 0, err
    lines = out.strip().splitlines()
    match = re.fullmatch(rf"run folder: {re.escape(str(work))}/(outputs/(\d{{8}}-\d{{6}})-improved-seed42-2)", lines[-1])
    assert match, lines[-3:]
    folder = work / match.group(1)
    stamp = datetime.strptime(match.group(2), "%Y%m%d-%H%M%S").timestamp()
    assert start - 1 <= stamp <= end + 1
    assert str(REPO_ROOT / "predict.py") in lines[-2] and f"--model {folder}" in lines[-2]
    assert probes == ["held"]
    with open(folder / ".lock", "a") as f:  # released at the end
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    after = snapshot(work)
    prefix = match.group(1)
    assert {k: v for k, v in after.items() if k != prefix and not k.startswith(prefix + "/")} == before
    assert (folder / "metrics.json").is_file() and all((p / "notes.txt").is_file() for p in taken)
    assert [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")] == []  # torch's own cache aside


def test_default_tool_folders_are_new_unique_and_sorted_by_time(base, work, capsys, monkeypatch):
    """predict and compare: three starts, two in the same second, each in a folder of its own, in the
    order they started; nothing outside them is written."""
    stamps = iter(["20261204-101010"] * 4 + ["20261204-101011"] * 2)  # predict, compare, predict, ...
    real_strftime = time.strftime
    monkeypatch.setattr(bts.time, "strftime", lambda fmt, *a: next(stamps) if fmt == "%Y%m%d-%H%M%S" and not a
                        else real_strftime(fmt, *a))
    before = snapshot(work)
    name = base["runs"][0].name
    made = {"predictions": [], "comparisons": []}
    for _ in range(3):
        rc, out, err = run_predict(capsys, base["scan"], "--model", base["runs"][0])
        assert rc == 0, err
        made["predictions"].append(run_folders(work / "predictions")[-1].name)
        rc, out, err = run_compare(capsys, *base["runs"])
        assert rc == 0, err
        made["comparisons"].append(run_folders(work / "comparisons")[-1].name)
    assert made["predictions"] == [f"20261204-101010-{name}", f"20261204-101010-{name}-2", f"20261204-101011-{name}"]
    assert made["comparisons"] == ["20261204-101010-compare", "20261204-101010-compare-2", "20261204-101011-compare"]
    for parent, names in made.items():
        assert [p.name for p in run_folders(work / parent)] == names  # oldest first
    after = snapshot(work)
    assert {k: v for k, v in after.items() if not k.startswith(("predictions", "comparisons"))} == before
    for folder in run_folders(work / "predictions"):
        assert sorted(p.name for p in folder.rglob("*")) == ["3.png", "3.png", "masks", "overlays", "predictions.csv"]
    for folder in run_folders(work / "comparisons"):
        assert sorted(p.name for p in folder.iterdir()) == ["comparison.csv", "comparison.png", "differences.csv"]


# -----------------------------------------------------------------------------
# A run that fails before its first checkpoint takes its folder away


def bad_groups(tmp_path, monkeypatch):
    groups = tmp_path / "groups.csv"
    groups.write_text("image,patient_id\n1,\0\n")
    return ["--groups", groups], 1, [str(groups), "NUL bytes"]


def data_error(tmp_path, monkeypatch):
    (tmp_path / "nomasks" / "images").mkdir(parents=True)
    return ["--data-dir", tmp_path / "nomasks"], 1, ["nomasks/masks: folder not found"]


def nan_in_epoch_1(tmp_path, monkeypatch):
    real = bts.compute_loss
    monkeypatch.setattr(bts, "compute_loss", lambda logits, target, cfg: real(logits, target, cfg) * float("nan"))
    return [], 1, ["became nan at epoch 1, step 1", "no checkpoint had been written"]


def ctrl_c_while_decoding(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(bts, "load_dataset", interrupted)
    return [], 130, ["aborted"]


@pytest.mark.parametrize("user_file", [False, True], ids=["alone", "with-a-users-file"])
@pytest.mark.parametrize("failure", [bad_groups, data_error, nan_in_epoch_1, ctrl_c_while_decoding],
                         ids=["bad-groups", "data-error", "nan-in-epoch-1", "ctrl-c-before-a-checkpoint"])
def test_a_run_that_fails_before_its_first_checkpoint_removes_its_folder(failure, user_file, base, tmp_path, capsys,
                                                                        monkeypatch):
    extra, code, fragments = failure(tmp_path, monkeypatch)
    out = tmp_path / "runs" / "run"
    (tmp_path / "runs").mkdir()
    if user_file:  # someone puts files into the new folder while the run starts
        real_set_up = bts.set_up_machine

        def meanwhile(cfg):
            (Path(cfg.out_dir) / "visualizations").mkdir()
            (Path(cfg.out_dir) / "visualizations" / "mine.png").write_bytes(b"my picture")
            (Path(cfg.out_dir) / "notes.txt").write_text("mine")
            return real_set_up(cfg)

        monkeypatch.setattr(bts, "set_up_machine", meanwhile)
    data_before = snapshot(base["data"])
    rc, _, err = run_cli(capsys, "--data-dir", base["data"], "--out-dir", out, *TINY_ARGS, *extra)
    assert rc == code and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    if user_file:
        assert snapshot(out) == {"notes.txt": snapshot(tmp_path / "runs")["run/notes.txt"],
                                 "visualizations": "<dir>", "visualizations/mine.png":
                                     snapshot(tmp_path / "runs")["run/visualizations/mine.png"]}
        assert (out / "notes.txt").read_text() == "mine"
    else:
        assert list((tmp_path / "runs").iterdir()) == []
    assert snapshot(base["data"]) == data_before


def test_a_failed_run_with_the_default_folder_leaves_no_trace(base, work, tmp_path, capsys):
    shutil.rmtree(work / "outputs")
    before = snapshot(work)
    rc, _, err = run_cli(capsys, "--data-dir", tmp_path / "typo", *TINY_ARGS)
    one_error(rc, err, "typo: folder not found")
    assert snapshot(work) == before


def test_predict_that_can_read_no_input_leaves_no_folder(base, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "bad.png").write_bytes(b"\x89PNG garbage")
    before = snapshot(scans)
    rc, _, err = run_predict(capsys, scans, "--model", base["runs"][0], "--out", tmp_path / "p")
    one_error(rc, err, "bad.png", "none of the inputs could be read")
    assert not (tmp_path / "p").exists() and snapshot(scans) == before


# -----------------------------------------------------------------------------
# Each file written whole


def failing_write(monkeypatch, code: int, nth: int = 0, name: str = ""):
    """atomic_write that fails like a full disk (or a file-size limit) inside the write of the nth file,
    or of the file called `name`: the OSError of a write names no file."""
    real, calls = bts.atomic_write, []

    def write(path, fill):
        calls.append(Path(path))
        if len(calls) == nth or Path(path).name == name:
            def fail(f):
                f.write(b"part of it")
                raise OSError(code, os.strerror(code))
            return real(path, fail)
        return real(path, fill)

    monkeypatch.setattr(bts, "atomic_write", write)
    return calls


CAUSE = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is larger than this system allows"}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG], ids=["ENOSPC", "EFBIG"])
@pytest.mark.parametrize("program", ["predict", "compare"])
def test_a_full_disk_in_a_tool_is_one_sentence_naming_the_file_and_leaves_no_folder(program, code, base, work, capsys,
                                                                                   monkeypatch):
    calls = failing_write(monkeypatch, code, nth=2)
    before = everything(work, base)
    rc, _, err = run_program(program, capsys, base, work / "new")
    message = one_error(rc, err, CAUSE[code], f"(writing {calls[1]})", "written whole")
    assert "--resume" not in message and ".tmp" not in err
    assert not (work / "new").exists() and everything(work, base) == before


@pytest.mark.parametrize("program", ["predict", "compare"])
def test_a_tool_stopped_by_ctrl_c_never_suggests_resume(program, base, work, capsys, monkeypatch):
    """Issue class S: predict and compare, stopped while writing, told the user to continue with --resume,
    which is training's option alone; they say they were aborted, and remove their new folder."""
    def interrupted(path, fill):
        raise KeyboardInterrupt

    monkeypatch.setattr(bts, "atomic_write", interrupted)
    before = everything(work, base)
    rc, _, err = run_program(program, capsys, base, work / "new")
    assert rc == 130 and "aborted" in err and "Traceback" not in err, err
    assert "--resume" not in err
    assert not (work / "new").exists() and everything(work, base) == before


@pytest.mark.slow
def test_a_full_disk_at_the_end_of_training_names_the_file_and_resume_finishes_it(base, tmp_path, capsys,
                                                                                 monkeypatch):
    real = bts.atomic_write
    failing_write(monkeypatch, errno.ENOSPC, name="metrics.json")
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", base["data"], "--out-dir", out, *TINY_ARGS)
    one_error(rc, err, "the disk is full", f"(writing {out / 'metrics.json'})", "--resume")
    assert not (out / "metrics.json").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(bts, "atomic_write", real)
    rc, _, err = run_cli(capsys, "--resume", out)  # the way the message names
    assert rc == 0, err
    assert (out / "metrics.json").is_file()


def test_a_file_size_limit_while_writing_the_first_checkpoint_names_the_file(base, tmp_path, capsys, monkeypatch):
    failing_write(monkeypatch, errno.EFBIG, name="model.pth")
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", base["data"], "--out-dir", out, *TINY_ARGS)
    one_error(rc, err, "the file is larger than this system allows", f"(writing {out / 'model.pth'})")
    assert not list(tmp_path.rglob("*.tmp")) and not (out / "model.pth").exists()


@pytest.mark.root
def test_a_really_full_disk_during_training_is_one_sentence(base, tmp_path, capsys):
    """A real full disk (a small tmpfs): the error comes from the kernel, through torch.save's buffer."""
    disk = tmp_path / "small"
    disk.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        rc, _, err = run_cli(capsys, "--data-dir", base["data"], "--out-dir", disk / "run", *TINY_ARGS,
                             "--base-width", "8")
        message = one_error(rc, err, "the disk is full (writing " + str(disk / "run"))
        assert ".tmp" not in message
        assert not list(disk.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_files_are_written_whole_with_the_permissions_the_umask_gives(tmp_path):
    previous = os.umask(0o027)
    try:
        bts.save_json(tmp_path / "a.json", {"x": 1})
        bts.save_json(tmp_path / "a.json", {"x": 2})  # replaced whole
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_a_scan_with_a_249_character_name_is_predicted(base, tmp_path, capsys):
    name = "scan-" + "x" * 240  # 245 characters, 249 with .png: the temporary beside it must still fit
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(base["scan"], scans / f"{name}.png")
    out = tmp_path / "p"
    rc, stdout, err = run_predict(capsys, scans, "--model", base["runs"][0], "--out", out)
    assert rc == 0, err
    assert (out / "masks" / f"{name}.png").is_file() and (out / "overlays" / f"{name}.png").is_file()
    assert name in (out / "predictions.csv").read_text()
    assert ".tmp" not in stdout + err and not [p for p in out.rglob("*") if p.name.startswith(".")]


# -----------------------------------------------------------------------------
# The lock: one process per run folder


@pytest.mark.slow
def test_a_run_in_use_is_refused_and_free_again_when_its_holder_is_killed(base, tmp_path, capsys):
    run = Path(shutil.copytree(base["runs"][0], tmp_path / "run"))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(run / '.lock')!r}, 'a')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        rc, _, err = run_cli(capsys, "--resume", run, "--epochs", "2")
        one_error(rc, err, f"{run} is in use by another run")
        assert snapshot(run) == before
        with open(run / ".lock", "a") as f:  # the refused run left the holder's lock as it was
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    (run / "notes.txt").write_text("mine")  # a user's files in the run's folder stay as they are
    (run / "visualizations" / "mine.png").write_bytes(b"my picture")
    rc, _, err = run_cli(capsys, "--resume", run, "--epochs", "2")  # the kernel dropped the dead holder's lock
    assert rc == 0, err
    assert bts.load_checkpoint(run / "last.pth")["epoch"] == 2
    assert (run / "notes.txt").read_text() == "mine" and (run / "visualizations" / "mine.png").read_bytes() == \
        b"my picture"
