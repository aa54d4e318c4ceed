"""torchrun with 2 CPU processes (gloo, loopback): the same files as a single process, and metrics
that one process computes alike from the same weights."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import brain_tumor_segmentation as bts

from conftest import REPO_ROOT, TINY_ARGS

TINY = [*TINY_ARGS, "--batch-size", "4", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_torchrun_two_cpu_processes_write_one_model_and_the_same_files(tmp_path):
    data = bts.make_synthetic_dataset(tmp_path / "data", n=40, size=64, seed=3)
    single, multi = tmp_path / "single", tmp_path / "ddp"
    assert bts.main(["--data-dir", str(data), "--out-dir", str(single), *TINY]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO_ROOT / "brain_tumor_segmentation.py"),
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

    # The metrics of the 2 processes (validation split over both and summed; the test on rank 0)
    # equal one process's evaluation of the same weights.
    state = bts.load_checkpoint(multi / "model.pth")
    cfg = bts.Config(**state["config"])
    model = bts.model_from_checkpoint(state, multi / "model.pth", "cpu")
    data = bts.load_dataset(data, cfg.image_size, workers=1)
    idx = bts.split_indices(state["split"], data)
    one, _ = bts.evaluate(model, bts.Machine(bts.torch.device("cpu")), data["images"], data["masks"], idx["val"],
                          cfg, cfg.threshold)
    for name in bts.EPOCH_METRICS:  # from pixel counts: exactly the same
        assert abs(one[name] - state["best"][f"val_{name}"]) < 1e-6, name
    assert one["loss"] == pytest.approx(state["best"]["val_loss"], rel=1e-3)  # float32 sums in another order
    probs = bts.predict_probabilities(model, data["images"][idx["test"]], 64, bts.Machine(bts.torch.device("cpu")),
                                      flip=cfg.tta)
    scores = bts.scores_from_counts(bts.confusion_counts(probs > m_multi["threshold"], data["masks"][idx["test"]]))
    assert abs(float(scores["dice"].mean()) - m_multi["test"]["dice"]) < 1e-5
