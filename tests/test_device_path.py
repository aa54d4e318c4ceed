"""What a GPU would lose or a first GPU user would meet, checked on the CPU (issues #23 and #24): no
copy to the device per step, the benchmark timing the training loop itself, the background writer
under signals and kills, out-of-memory advice, --amp on resume, the steady-state speed on record."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import brain_tumor_segmentation as bts
from conftest import REPO_ROOT, TINY_ARGS, run_cli, square_pair, write_pair


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "data"
    for i in range(1, 41):
        write_pair(folder, str(i), *square_pair(top=4 + i % 20, left=24 - i % 20, side=8 + i % 5, seed=i))
    return folder


class DeviceCopies(TorchFunctionMode):
    """Counts the calls in the trainer's own code that name a device (`.to(device)`, `.cuda()`,
    `torch.tensor(..., device=...)`): on CUDA each copies from the host and waits for the GPU. On a
    CPU they copy nothing, so the call itself is what is counted; torch's internal calls are not."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        names_device = func in (torch.Tensor.to, torch.Tensor.cuda, torch.tensor, torch.as_tensor) and (
            "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:]))
        self.count += names_device and sys._getframe(1).f_code.co_filename == bts.__file__
        return func(*args, **kwargs)


def a_run(dataset, steps: int, **changes) -> bts.Run:
    cfg, _ = bts.config_from_args([*TINY_ARGS, "--data-dir", str(dataset), "--batch-size", "4"])
    cfg = bts.dataclasses.replace(cfg, **changes)
    machine = bts.set_up_machine(cfg)
    bts.choose_precision(machine, cfg)
    data = bts.load_dataset(dataset, cfg.image_size, workers=1)
    split = {"train": data["names"][:steps * 4], "val": [], "test": [], "files": data["hashes"], "unit": "images"}
    idx = {"train": torch.arange(steps * 4), "val": torch.arange(0), "test": torch.arange(0)}
    return bts.build_run(cfg, machine, data, split, idx, None)


def test_an_epoch_copies_to_the_device_a_constant_number_of_times_not_one_per_step(dataset):
    counts = []
    for steps in (2, 8):
        run = a_run(dataset, steps)
        with DeviceCopies() as copies:
            bts.train_epoch(run, bts.StopFlag())
        assert run.step == steps
        counts.append(copies.count)
    assert counts[0] == counts[1] <= 2, counts


def test_the_benchmark_times_the_training_loop_itself(dataset, monkeypatch):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bench
    calls = []
    real = bts.train_epoch
    monkeypatch.setattr(bts, "train_epoch", lambda run, stop: calls.append(run.cfg.batch_size) or real(run, stop))
    cfg, _ = bts.config_from_args([*TINY_ARGS, "--batch-size", "4", "--recipe", "seed"])
    data = bts.load_dataset(dataset, 32, workers=1)
    step, machine, compile_seconds = bench.training_loop(cfg, data, steps=3)
    step()
    assert calls == [4] and compile_seconds == 0.0 and machine.device.type == "cpu"


def slow_saves(monkeypatch, seconds: float):
    """torch.save that takes `seconds`: the background writer is busy when a signal comes."""
    real = torch.save

    def slow(obj, f, *args, **kwargs):
        time.sleep(seconds)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(bts.torch, "save", slow)


def test_a_stop_signal_while_the_writer_is_busy_still_writes_last_pth(dataset, tmp_path, monkeypatch, capsys):
    slow_saves(monkeypatch, 0.3)
    calls = {"n": 0}
    real_loss = bts.compute_loss

    def ctrl_c_in_epoch_2(logits, target, cfg):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2, step 2 (3 steps and 1 validation batch an epoch): epoch 1's are still written
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(logits, target, cfg)

    monkeypatch.setattr(bts, "compute_loss", ctrl_c_in_epoch_2)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS, "--epochs", "3")
    assert rc == 130 and "--resume" in err, err
    state = bts.load_checkpoint(out / "last.pth", resumable=True)
    assert state["epoch"] == 1 and state["step"] >= 1
    assert bts.load_checkpoint(out / "model.pth")["epoch"] == 1
    monkeypatch.setattr(bts, "compute_loss", real_loss)
    rc, _, err = run_cli(capsys, "--resume", "--out-dir", out)
    assert rc == 0, err


KILLED = """
import io, sys, time
sys.path.insert(0, {root!r})
import brain_tumor_segmentation as bts
real, writes = bts.atomic_write, []
def slow(path, write):
    writes.append(bts.Path(path).name)
    if writes.count("last.pth") == 2 and writes[-1] == "last.pth":  # epoch 2's state: half of it, then be killed
        def half(f):
            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            f.flush()
            print("mid-write", flush=True)
            time.sleep(600)
        return real(path, half)
    return real(path, write)
bts.atomic_write = slow
sys.exit(bts.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_kill_during_a_background_checkpoint_write_leaves_the_previous_one(dataset, tmp_path):
    out = tmp_path / "run"
    code = KILLED.format(root=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, "--data-dir", str(dataset), "--out-dir", str(out),
                             *TINY_ARGS, "--epochs", "3"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while proc.stdout.readline().strip() != "mid-write":
        assert proc.poll() is None, "the run ended before the write it was to be killed in"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert bts.load_checkpoint(out / "last.pth", resumable=True)["epoch"] == 1  # epoch 1's, whole
    assert list(out.glob(".*.tmp"))  # the half-written one, under a temporary name
    assert bts.main(["--resume", "--out-dir", str(out)]) == 0
    assert not list(out.glob(".*.tmp"))


def test_out_of_memory_advice_names_the_batch_size_that_matters(dataset, tmp_path, monkeypatch, capsys):
    real_forward = bts.UNet.forward

    def oom_when_evaluating(self, x):
        if not self.training:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, x)

    monkeypatch.setattr(bts.UNet, "forward", oom_when_evaluating)
    monkeypatch.setattr(bts, "print_model_summary", lambda *args: None)
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "a", *TINY_ARGS)
    assert rc == 1 and "--eval-batch-size 32" in err and "Traceback" not in err, err

    def oom_when_training(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bts.UNet, "forward", oom_when_training)
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "b", *TINY_ARGS)
    assert rc == 1 and "--batch-size 4" in err and "Traceback" not in err, err


def test_amp_may_change_on_resume_and_the_log_says_so(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS, "--epochs", "1")
    assert rc == 0, err
    rc, printed, err = run_cli(capsys, "--resume", "--out-dir", out, "--epochs", "2", "--amp", "bf16")
    assert rc == 0, err
    assert "precision: bfloat16 (--amp bf16)" in printed
    assert json.loads((out / "config.json").read_text())["amp"] == "bf16"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "bfloat16" and metrics["history"]["precision"] == ["float32", "bfloat16"]


def test_the_record_holds_the_steady_state_speed_and_the_compile_time_apart(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS, "--epochs", "3")
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    speeds = metrics["history"]["images_per_second"]
    assert len(speeds) == 3 and metrics["images_per_second"] == pytest.approx(sorted(speeds[1:])[0] / 2
                                                                              + sorted(speeds[1:])[1] / 2)
    assert metrics["compile_seconds"] == 0.0
