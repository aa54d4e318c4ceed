"""bench/gpu_report.sh at toy sizes on the CPU: both phases run end to end, every command is logged
with its exit code, and a failing command is recorded while the rest still runs."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REAL_DIR, REPO_ROOT


def report(phase: str, data, tmp_path) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
           "PYTHON": sys.executable}
    result = subprocess.run(["bash", "bench/gpu_report.sh", phase, str(data)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    return result, (tmp_path / "out" / f"gpu_{phase}.txt").read_text()


@pytest.fixture
def real_data():
    if not (REAL_DIR / "brain-tumor-segmentation").is_dir():
        pytest.skip(f"{REAL_DIR} not present")
    return REAL_DIR


@pytest.mark.slow
def test_both_phases_run_end_to_end_at_toy_sizes(real_data, tmp_path):
    result, log = report("core", real_data, tmp_path)
    assert result.returncode == 0, log[-3000:]
    assert log.count("(exit 0,") == 5 and "0 of 5 commands failed" in log
    assert "training loop" in log and "seed loop, 8 workers" in log and "test (" in log
    result, log = report("extra", real_data, tmp_path)
    assert result.returncode == 0, log[-3000:]
    assert log.count("test (") == 4 and "recipe=seed" in log and (tmp_path / "out" / "recipes" / "comparison.png").is_file()


@pytest.mark.slow
def test_a_failing_command_is_recorded_and_the_rest_still_runs(real_data, tmp_path):
    data = tmp_path / "data"  # the 256x256 data, but no 512x512 sample: the seed-loop benchmark fails
    data.mkdir()
    (data / "brain-tumor-segmentation").symlink_to(real_data / "brain-tumor-segmentation")
    result, log = report("core", data, tmp_path)
    assert result.returncode == 1
    assert "no 512x512 sample" in log and "(exit 1," in log
    assert "1 of 5 commands failed" in log
    assert log.index("(exit 1,") < log.index("test (")  # the 20-epoch run after the failure still ran
