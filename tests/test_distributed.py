"""torchrun with 2 CPU processes (gloo, loopback) gives the same outputs as a single process."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import brain_tumor_segmentation as bts

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--amp", "off", "--image-size", "32", "--base-width", "4", "--batch-size", "4", "--epochs", "1", "--device", "cpu",
        "--test-samples", "2", "--panel-images", "2", "--workers", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_torchrun_two_cpu_processes_write_one_model_and_the_same_files(tmp_path):
    data = bts.make_synthetic_dataset(tmp_path / "data", n=40, size=64, seed=3)
    single, multi = tmp_path / "single", tmp_path / "ddp"
    assert bts.main(["--data-dir", str(data), "--out-dir", str(single), *TINY]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "brain_tumor_segmentation.py"),
         "--data-dir", str(data), "--out-dir", str(multi), *TINY],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    assert result.stdout.count("Total params") == 1  # only rank 0 prints
    assert outputs(multi) == outputs(single)
    assert len(list(multi.rglob("*.pth"))) == 2  # one model.pth and one last.pth, written by rank 0
    m_single = json.loads((single / "metrics.json").read_text())
    m_multi = json.loads((multi / "metrics.json").read_text())
    assert m_multi.keys() == m_single.keys() and m_multi["test"].keys() == m_single["test"].keys()
    assert m_multi["test"]["images"] == m_single["test"]["images"]
    assert json.loads((multi / "split.json").read_text())["test"] == json.loads((single / "split.json").read_text())["test"]
    history = bts.load_checkpoint(multi / "last.pth")["history"]
    assert history["epoch"] == [1] and 0 <= history["val_dice"][0] <= 1
