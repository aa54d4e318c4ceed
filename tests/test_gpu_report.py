"""bench/gpu_report.sh, the one command for issue #16's GPU figures, at toy sizes on the CPU: it runs
end to end and logs every command with its results (the GPU sizes are not exercised here)."""
import os
import subprocess
import sys

import pytest

from conftest import REAL_DIR, REPO_ROOT


@pytest.mark.slow
def test_the_dice_phase_runs_both_recipes_compares_them_and_cross_validates(tmp_path):
    if not (REAL_DIR / "brain-tumor-segmentation").is_dir():
        pytest.skip(f"{REAL_DIR} not present")
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
           "PYTHON": sys.executable}
    result = subprocess.run(["bash", "bench/gpu_report.sh", "dice", str(REAL_DIR)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "out" / "gpu_dice.txt").read_text()
    assert log.count("test (") == 4 + 5  # two recipes x two seeds, then five folds
    assert "cross-validation over 5 folds" in log and "recipe=seed" in log
    assert (tmp_path / "out" / "dice_comparison.png").stat().st_size > 0
