"""bench/gpu_report.sh (and the bench/bench.py it calls) at toy sizes on the CPU (SMOKE=1). Its phases:
speed (the sync check, bench.py with compile off and on, the seed loop), run (the default run, start
to finish), core (speed, then run, in one call) and extra (both recipes on two seeds, compare, CUDA
graphs and channels-first). Every command is logged with its exit code into $OUT/gpu_PHASE.txt, a
failing one is recorded and the rest still runs, and the script exits 1 if any failed.

At toy sizes the compiled variants run without torch.compile (a CPU compile takes a minute each):
the tests check the plan's commands and their plumbing; compiling is tested in test_device.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REAL_DIR, REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def report(phase: str, data, tmp_path, timeout: int = 1800) -> tuple[subprocess.CompletedProcess, str]:
    """gpu_report.sh PHASE DATA at toy sizes, with this Python; returns the process and its log."""
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["bash", "bench/gpu_report.sh", phase, str(data)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    log = tmp_path / "out" / f"gpu_{phase}.txt"
    return result, log.read_text() if log.is_file() else ""


def commands(log: str) -> list[str]:
    """The commands the log records, in order (each `$ ...` line)."""
    return [line[2:] for line in log.splitlines() if line.startswith("$ ")]


@pytest.fixture
def real_data():
    if not (REAL_DIR / "brain-tumor-segmentation" / "images").is_dir() or \
            not (REAL_DIR / "brain-tumor-segmentation-512-sample" / "images").is_dir():
        pytest.skip(f"{REAL_DIR} (brain-tumor-segmentation and its 512x512 sample) not present")
    return REAL_DIR


def test_core_is_speed_then_run_end_to_end_at_toy_sizes(real_data, tmp_path):
    result, log = report("core", real_data, tmp_path)
    assert result.returncode == 0, log[-3000:] + result.stderr[-2000:]
    assert log.count("(exit 0,") == 5 and "== core done: 0 of 5 commands failed" in log, log[-3000:]
    ran = commands(log)
    assert [("bench/bench.py" in c, "--seed-loops" in c and "--no-seed-loops" not in c,
             "brain_tumor_segmentation.py" in c) for c in ran[1:]] == [
        (True, False, False), (True, False, False), (True, True, False),
        (False, False, True)]  # speed (sync check first, then bench.py off and "on"), then the run
    assert "training loop" in log and "seed loop, 2 workers" in log
    assert "--compile on" not in log and "not compiled" in log  # SMOKE: no minute-long CPU compile
    assert log.index("seed loop, 2 workers") < log.index("test (")  # the run comes after the speed phase
    if "no CUDA here" not in log:  # on a GPU the sync check ran
        assert "a training epoch ran under set_sync_debug_mode('error'): True" in log
    # the run went into a new folder of its own under RUNS/core-DATE-TIME/, and finished
    (run,) = (tmp_path / "runs").glob("core-*/default")
    assert (run / "metrics.json").is_file() and f"run folder: {run}" in log


def test_extra_runs_both_recipes_on_two_seeds_and_compares_them(real_data, tmp_path):
    result, log = report("extra", real_data, tmp_path)
    assert result.returncode == 0, log[-3000:] + result.stderr[-2000:]
    assert "== extra done: 0 of 7 commands failed" in log, log[-3000:]
    assert log.count("test (") == 4
    assert re.search(r"recipe=seed.* vs .*recipe=improved|recipe=improved.* vs .*recipe=seed", log), log[-3000:]
    assert (tmp_path / "out" / "recipes" / "comparison.png").is_file()  # compare's new folder, under OUT
    assert "reduce-overhead" in log and "channels-last False" in log


def test_a_failing_command_is_recorded_and_the_rest_still_runs(tmp_path):
    """Data without the datasets: every command that reads them fails quickly (no compile), each is
    recorded with its exit code, and every later one still runs. The phases hold the commands they
    should: speed 4, run 1 (core, both, is checked by the test above)."""
    data = tmp_path / "data"
    data.mkdir()
    counts = {}
    for phase, expected in (("speed", 4), ("run", 1)):  # core is both: test_core_is_speed_then_run...
        result, log = report(phase, data, tmp_path / phase, timeout=600)
        assert result.returncode == 1, log
        ran = commands(log)
        failed = log.count("(exit 1,")
        assert len(ran) == log.count("(exit ") == expected, log
        assert failed >= expected - 1 and f"== {phase} done: {failed} of {expected} commands failed" in log, log
        counts[phase] = [re.sub(r"--out-dir \S+", "--out-dir RUN", c) for c in ran]  # RUNS/PHASE-DATE-TIME/...
        if phase != "run":
            assert "bench.py times the real data" in log  # bench.py's one sentence for a folder without them
        if phase != "speed":
            assert "folder not found" in log and "Traceback" not in log  # the run's one sentence
    result = subprocess.run(["bash", "bench/gpu_report.sh", "nonsense", str(data)], cwd=REPO_ROOT,
                            env={**os.environ, "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs")},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown phase nonsense" in result.stderr
