"""Whole commands, each in a fresh Python process, as a user types them in a working folder of their
own: `--demo` at a tiny size (two seeds), the predict command it prints, compare on the two runs, a
run on real data, and the Makefile's targets. The processes that do not depend on each other run side
by side (each demo generates its slices into its own run folder)."""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REAL_DIR, REPO_ROOT, SCRIPT, run_folders, snapshot

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

DEMO = [sys.executable, str(SCRIPT), "--demo", "--demo-images", "60", "--epochs", "2", "--image-size", "32",
        "--base-width", "4"]
TIMEOUT = 300


@pytest.fixture(scope="module")
def temp(tmp_path_factory) -> Path:
    """The commands' temporary folder (TMPDIR), instead of the system's: the demo leaves nothing there."""
    return tmp_path_factory.mktemp("tmp")


def start(command, cwd, temp: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}  # 2 cores shared with other test runs
    return subprocess.Popen([str(c) for c in command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def demos(tmp_path_factory, temp):
    """Two demo runs (seeds 42 and 1) started together in one fresh working folder, and, beside them, a
    run on a few real slices at 32x32 (when ../shared/data is there)."""
    work = tmp_path_factory.mktemp("work")
    real_run = tmp_path_factory.mktemp("real") / "run"
    procs = {"seed42": start(DEMO, work, temp), "seed1": start([*DEMO, "--seed", "1"], work, temp)}
    if REAL_DIR.is_dir():
        procs["real"] = start([sys.executable, SCRIPT, "--data-dir", REAL_DIR / "brain-tumor-segmentation", "--limit",
                               "40", "--image-size", "32", "--base-width", "4", "--epochs", "1", "--out-dir", real_run],
                              real_run.parent, temp)
    results = {name: finish(proc) for name, proc in procs.items()}
    return {"work": work, "results": results, "real_run": real_run}


def run_of(demos, seed: int) -> Path:
    result = succeeded(demos["results"][f"seed{seed}"])
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(rf"run folder: {re.escape(str(demos['work']))}/(outputs/\d{{8}}-\d{{6}}-demo-seed{seed})", last)
    assert match, result.stdout[-2000:]
    return demos["work"] / match.group(1)


def readme_outputs() -> list[str]:
    """The files the README's Outputs table lists for a run's folder."""
    text = (REPO_ROOT / "README.md").read_text()
    table = text[text.index("\n## Outputs"):]
    table = table[:table.index("\n\n", table.index("|"))]
    return re.findall(r"^\| `([^`]+)` \|", table, flags=re.M)


def test_the_demo_writes_every_file_the_readme_lists_into_a_new_folder_named_last(demos, temp):
    work = demos["work"]
    runs = [run_of(demos, 42), run_of(demos, 1)]
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]  # nothing else written
    assert sorted(run_folders(work / "outputs")) == sorted(runs)
    listed = readme_outputs()
    assert {"config.json", "train.log", "history.csv", "model.pth", "metrics.json", "demo-data/"} <= set(listed)
    for run in runs:
        files = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "demo-data" not in p.parts}
        expected = {name.replace("NNN", "001") for name in listed if name != "demo-data/"}
        assert files == expected | {"visualizations/epochs/epoch_002.png", ".lock"}
        assert all((run / name).stat().st_size > 0 for name in expected)
        for part in ("images", "masks"):
            assert sorted(p.name for p in (run / "demo-data" / part).iterdir()) == sorted(f"{i}.png" for i in
                                                                                        range(1, 61))
        with open(run / "history.csv", newline="") as f:
            assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
        log = (run / "train.log").read_text()
        assert f"run folder: {run.relative_to(work)}" in log  # the console
        assert "(bottleneck): Sequential(" in log  # and the model's layers
        assert "generating 60 synthetic slices" in log
        metrics = json.loads((run / "metrics.json").read_text())
        assert 0 <= metrics["test"]["dice"] <= 1 and len(metrics["history"]["epoch"]) == 2
        config = json.loads((run / "config.json").read_text())
        assert config["data_dir"] == str((run / "demo-data").resolve())  # absolute: resumable from anywhere
    assert snapshot(runs[0] / "demo-data") == snapshot(runs[1] / "demo-data")  # the same slices for every seed
    assert [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")] == []  # torch's cache aside


def test_the_paths_a_run_in_its_default_folder_saves_are_absolute(demos):
    run = run_of(demos, 42)
    for config in (json.loads((run / "config.json").read_text()),
                   torch.load(run / "model.pth", weights_only=True)["config"]):
        assert config["out_dir"] == str(run.resolve())


@pytest.fixture(scope="module")
def tools(demos, tmp_path_factory, temp):
    """Side by side: the predict command the seed-42 demo printed, copied as it is with two scans (and
    their masks) in place of SCAN.png ..., from another working folder; and compare on "outputs/*"."""
    work = demos["work"]
    data = run_of(demos, 42) / "demo-data"
    printed = succeeded(demos["results"]["seed42"]).stdout.strip().splitlines()[-2].strip()
    command = shlex.split(printed)
    assert command[-2:] == ["SCAN.png", "..."], printed
    where = {"predict": tmp_path_factory.mktemp("predict"), "compare": tmp_path_factory.mktemp("compare")}
    before = {"data": snapshot(data), "outputs": snapshot(work / "outputs")}
    procs = {"predict": start([*command[:-2], data / "images" / "1.png", data / "images" / "2.png", "--masks",
                               data / "masks"], where["predict"], temp),
             "compare": start([sys.executable, REPO_ROOT / "compare.py", f"{work}/outputs/*"], where["compare"],
                              temp)}
    results = {name: finish(proc) for name, proc in procs.items()}
    after = {"data": snapshot(data), "outputs": snapshot(work / "outputs")}
    return {"command": command, "where": where, "results": results, "before": before, "after": after}


def test_the_predict_command_the_demo_prints_works_when_copied(demos, tools):
    run, cwd = run_of(demos, 42), tools["where"]["predict"]
    assert tools["command"][-3] == str(run.resolve()) and tools["command"][-4] == "--model"
    result = succeeded(tools["results"]["predict"])
    folders = run_folders(cwd / "predictions")
    assert sorted(os.listdir(cwd)) == ["predictions"]
    assert [p.name for p in folders] == [f"{folders[0].name[:15]}-{run.name}"]
    out = folders[0]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "masks/1.png", "masks/2.png", "overlays/1.png", "overlays/2.png", "predictions.csv"]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in rows] == ["1.png", "2.png"] and all(r["dice"] != "" for r in rows)
    assert f"{out.relative_to(cwd)}/" in result.stdout and tools["after"]["data"] == tools["before"]["data"]


def test_compare_on_the_two_demo_runs(demos, tools):
    runs, cwd = [run_of(demos, 42), run_of(demos, 1)], tools["where"]["compare"]
    result = succeeded(tools["results"]["compare"])
    folders = run_folders(cwd / "comparisons")
    assert sorted(os.listdir(cwd)) == ["comparisons"]
    assert len(folders) == 1 and re.fullmatch(r"\d{8}-\d{6}-compare", folders[0].name)
    assert sorted(p.name for p in folders[0].iterdir()) == ["comparison.csv", "comparison.png", "differences.csv"]
    with open(folders[0] / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(run.name in result.stdout for run in runs)
    assert tools["after"]["outputs"] == tools["before"]["outputs"]


def test_a_run_on_a_few_real_slices(demos):
    if "real" not in demos["results"]:
        pytest.skip(f"{REAL_DIR} not present")
    result = succeeded(demos["results"]["real"])
    run = demos["real_run"]
    assert result.stdout.strip().splitlines()[-1] == f"run folder: {run}"
    split = json.loads((run / "split.json").read_text())
    assert "patients.csv" in split["how"] and len(split["files"]) == 40
    assert not set(split["train_patients"]) & set(split["test_patients"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["images"] == len(split["test"]) > 0


def make(*args) -> subprocess.CompletedProcess:
    """A dry run (-n): what the target would do, without doing it."""
    return subprocess.run(["make", "-n", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LC_ALL": "C"})


def test_make_demo_runs_the_demo_into_a_new_folder():
    result = make("demo")
    assert result.returncode == 0, result.stderr
    assert "brain_tumor_segmentation.py --demo" in result.stdout and "--overwrite" not in result.stdout


def test_make_clean_is_gone_or_removes_only_what_make_demo_made():
    """make demo writes a new outputs/DATE-TIME-demo-seed42 beside the user's other runs: a clean that
    removes outputs/ would take those runs too."""
    result = make("clean")
    if result.returncode != 0:
        assert "No rule to make target 'clean'" in result.stderr, result.stderr
        return
    for command in result.stdout.splitlines():
        if re.search(r"\brm\b", command):
            for word in shlex.split(command):
                assert word.rstrip("/") not in ("outputs", "data", "predictions", "comparisons"), command
