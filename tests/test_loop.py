"""The training loop and the end of an epoch: the batch order, the learning-rate schedule, the
augmentation, the NaN/inf stop, exact repeats on a CPU, the background writer, a stop signal during
training (last.pth and the command that continues), history.csv and the loss curves."""
from __future__ import annotations

import csv
import errno
import inspect
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import brain_tumor_segmentation as bts
from conftest import REPO_ROOT, SCRIPT, TINY_ARGS, make_dataset, one_error, run_cli

# 20 pairs named 1..20: patients.csv splits them 12 train / 7 val / 1 test, so batches of 4 make
# 3 training steps an epoch.
STEPS = 3
TINY = [*TINY_ARGS, "--batch-size", "4"]
TIMING = ("epoch_seconds", "images_per_second")
CPU = ["--device", "cpu"]  # exact repeats are a CPU's (float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("loop") / "data")


def on_training_step(monkeypatch, step: int, action) -> None:
    """At the step-th training step of the run (1-based, counted over epochs; validation's loss
    calls are not steps), the loss is `action(real_loss, logits, target, cfg)` instead."""
    real, count = bts.compute_loss, [0]

    def patched(logits, target, cfg):
        if logits.requires_grad:  # a training step: validation's logits come without gradients
            count[0] += 1
            if count[0] == step:
                return action(real, logits, target, cfg)
        return real(logits, target, cfg)

    monkeypatch.setattr(bts, "compute_loss", patched)


def signal_at(sig):
    def action(real, logits, target, cfg):
        os.kill(os.getpid(), sig)
        return real(logits, target, cfg)
    return action


def read_history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metrics_without_timing(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    for key in ("total_seconds", "images_per_second", "compile_seconds"):
        m.pop(key)
    for key in TIMING:
        m["history"].pop(key)
    return m


# -----------------------------------------------------------------------------
# batch_order


def test_batch_order_takes_no_rank_or_world_any_more():
    assert list(inspect.signature(bts.batch_order).parameters) == ["n", "batch_size", "seed", "epoch"]


def test_batch_order_is_deterministic_in_seed_and_epoch():
    a = bts.batch_order(50, 8, seed=3, epoch=0)
    assert a.shape == (6, 8) and a.dtype == torch.long
    assert torch.equal(a, bts.batch_order(50, 8, seed=3, epoch=0))
    assert not torch.equal(a, bts.batch_order(50, 8, seed=3, epoch=1))
    assert not torch.equal(a, bts.batch_order(50, 8, seed=4, epoch=0))


@pytest.mark.parametrize("n, batch", [(50, 8), (48, 8), (33, 1), (9, 4)])
def test_batch_order_drops_only_the_ragged_remainder(n, batch):
    dropped = set()
    for epoch in range(6):
        order = bts.batch_order(n, batch, seed=0, epoch=epoch)
        assert order.shape == (n // batch, batch)
        flat = order.flatten().tolist()
        assert len(set(flat)) == len(flat) and min(flat) >= 0 and max(flat) < n
        dropped |= set(range(n)) - set(flat)
    if n % batch:  # a different remainder each epoch: over a few epochs, more images than one remainder
        assert len(dropped) > n % batch


@pytest.mark.parametrize("n, batch", [(7, 16), (1, 4), (5, 5)])
def test_a_dataset_smaller_than_a_batch_is_one_batch_of_all(n, batch):
    order = bts.batch_order(n, batch, seed=1, epoch=0)
    assert order.shape == (1, n) and sorted(order.flatten().tolist()) == list(range(n))


# -----------------------------------------------------------------------------
# learning_rate


def test_learning_rate_constant():
    cfg = bts.Config(schedule="constant", lr=3e-4)
    assert {bts.learning_rate(cfg, s, 100) for s in (0, 1, 50, 99, 100)} == {3e-4}


def test_learning_rate_onecycle_warms_up_then_falls_along_a_cosine():
    cfg = bts.Config(schedule="onecycle", lr=2e-3, warmup_fraction=0.3)
    total = 1000
    lrs = [bts.learning_rate(cfg, s, total) for s in range(total)]
    assert lrs[0] == pytest.approx(cfg.lr / 25)
    assert int(np.argmax(lrs)) == 300 and lrs[300] == pytest.approx(cfg.lr) and max(lrs) <= cfg.lr * (1 + 1e-12)
    assert lrs[150] == pytest.approx(cfg.lr / 25 + (cfg.lr - cfg.lr / 25) / 2)  # linear warm-up
    assert all(a < b for a, b in zip(lrs[:300], lrs[1:301]))
    assert all(a >= b for a, b in zip(lrs[300:], lrs[301:]))
    middle = 300 + 700 // 2  # half-way down the cosine: half-way between lr and lr/1e4
    assert lrs[middle] == pytest.approx(cfg.lr / 1e4 + (cfg.lr - cfg.lr / 1e4) / 2)
    assert cfg.lr / 1e4 <= lrs[-1] < 2 * cfg.lr / 1e4
    assert bts.learning_rate(cfg, total, total) == pytest.approx(cfg.lr / 1e4)
    assert bts.learning_rate(cfg, 5 * total, total) == pytest.approx(cfg.lr / 1e4)  # never back up


def test_learning_rate_without_warm_up_starts_the_cosine_at_once():
    cfg = bts.Config(schedule="onecycle", lr=1e-3, warmup_fraction=0.0)
    assert bts.learning_rate(cfg, 1, 100) == pytest.approx(cfg.lr)
    assert bts.learning_rate(cfg, 99, 100) < bts.learning_rate(cfg, 50, 100) < cfg.lr


# -----------------------------------------------------------------------------
# augment_batch


def square_batch(n: int = 4):
    x = torch.zeros(n, 1, 32, 32)
    x[:, :, 6:14, 4:12] = 1.0  # a bright square, off-centre so that a flip or rotation moves it
    return x, x.clone()


def test_augment_batch_shapes_binary_mask_and_range():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 32, generator=gen)
    y = torch.zeros(3, 1, 32, 32)
    y[:, :, 8:20, 10:24] = 1
    xa, ya = bts.augment_batch(x, y, torch.Generator().manual_seed(1), bts.Config())
    assert xa.shape == x.shape and ya.shape == y.shape and xa.dtype == ya.dtype == torch.float32
    assert set(ya.unique().tolist()) <= {0.0, 1.0} and xa.min() >= 0 and xa.max() <= 1
    assert not torch.equal(xa, x)
    area, area_a = y.sum((1, 2, 3)), ya.sum((1, 2, 3))  # +-15 degrees, 0.9-1.1 zoom: about the same area
    assert torch.all((area_a / area - 1).abs() < 0.35)


def test_augment_batch_moves_the_mask_with_the_image():
    x, y = square_batch(8)
    xa, ya = bts.augment_batch(x, y, torch.Generator().manual_seed(3), bts.Config(aug_gamma=0.0))
    for i in range(8):
        bright, tumour = xa[i, 0] > 0.5, ya[i, 0] > 0
        assert (bright & tumour).sum() / (bright | tumour).sum() > 0.8, i
    assert not torch.equal(ya[0], y[0])  # it did move


def test_augment_batch_draws_parameters_for_each_image():
    x, y = square_batch(8)  # eight identical pairs
    xa, ya = bts.augment_batch(x, y, torch.Generator().manual_seed(5), bts.Config())
    assert len({tuple(ya[i].flatten().tolist()) for i in range(8)}) > 4
    assert len({tuple(xa[i].flatten().tolist()) for i in range(8)}) > 4


def test_augment_batch_is_seeded_by_its_generator():
    x, y = square_batch()
    a = bts.augment_batch(x, y, torch.Generator().manual_seed(7), bts.Config())
    b = bts.augment_batch(x, y, torch.Generator().manual_seed(7), bts.Config())
    c = bts.augment_batch(x, y, torch.Generator().manual_seed(8), bts.Config())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_augment_batch_ranges_are_the_aug_fields():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    y = (x > 0.5).float()
    none = dict(aug_flip=0.0, aug_rotation=0.0, aug_scale=0.0, aug_gamma=0.0)
    xa, ya = bts.augment_batch(x, y, torch.Generator().manual_seed(0), bts.Config(**none))
    torch.testing.assert_close(xa, x, atol=1e-5, rtol=0)
    assert torch.equal(ya, y)
    xf, yf = bts.augment_batch(x, y, torch.Generator().manual_seed(0), bts.Config(**{**none, "aug_flip": 1.0}))
    torch.testing.assert_close(xf, x.flip(-1), atol=1e-5, rtol=0)  # left-right, never upside down
    assert torch.equal(yf, y.flip(-1))


# -----------------------------------------------------------------------------
# The loop itself


def a_run(dataset, out: Path, steps: int) -> bts.Run:
    """A Run of `steps` training steps of 4 images, built as train() builds one."""
    cfg, _ = bts.config_from_args([*TINY, "--data-dir", str(dataset), "--out-dir", str(out)])
    machine = bts.set_up_machine(cfg)
    data = bts.load_dataset(dataset, cfg.image_size, workers=1)
    split = {"train": data["names"][:steps * 4], "val": [], "test": [], "files": data["hashes"], "unit": "images"}
    idx = {"train": torch.arange(steps * 4), "val": torch.arange(0), "test": torch.arange(0)}
    return bts.build_run(cfg, machine, data, split, idx, None)


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


def test_an_epoch_copies_to_the_device_a_constant_number_of_times_not_one_per_step(data, tmp_path):
    counts = []
    for steps in (2, 4):
        run = a_run(data, tmp_path, steps)
        with DeviceCopies() as copies:
            bts.train_epoch(run)
        assert len(run.losses) == steps and torch.isfinite(run.losses).all()
        counts.append(copies.count)
    assert counts[0] == counts[1] <= 2, counts
    assert not any(tmp_path.iterdir())  # the steps themselves write nothing


def test_the_benchmark_times_the_training_loop_itself(data, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import bench
    calls = []
    real = bts.train_epoch
    monkeypatch.setattr(bts, "train_epoch", lambda run: calls.append(run.cfg.batch_size) or real(run))
    cfg, _ = bts.config_from_args([*TINY, "--recipe", "seed", *CPU])
    loaded = bts.load_dataset(data, 32, workers=1)
    step, machine, compile_seconds = bench.training_loop(cfg, loaded, steps=3)
    step()
    assert calls == [4] and compile_seconds == 0.0 and machine.device.type == "cpu"


class Watchdog(BaseException):
    """Raised by the alarm of the test below: a BaseException, so that no handler of the trainer takes it."""


def test_a_million_epochs_start_training_within_seconds(data, tmp_path, monkeypatch, capsys):
    """Issue class U: bookkeeping that grew with --epochs kept --epochs 1000000 from ever training (the
    first epoch had not begun after 5 minutes). Now its first epoch begins as soon as that of a 1-epoch
    run (about 2 s here: decoding 20 slices, the split, the model); a Ctrl-C there stops it. The alarm
    stops a run that hangs, so that the test fails instead of waiting."""
    started = []

    def first_epoch(run):
        started.append(time.perf_counter())
        raise KeyboardInterrupt

    def hung(signum, frame):
        raise Watchdog("no epoch began within 60 s")

    monkeypatch.setattr(bts, "train_epoch", first_epoch)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        t0 = time.perf_counter()
        rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", tmp_path / "run", *TINY, "--epochs", "1000000")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert started, err
    assert started[0] - t0 < 10, f"the first epoch began after {started[0] - t0:.1f} s"
    assert rc == 130 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # stopped before its first checkpoint: nothing left


# -----------------------------------------------------------------------------
# Runs shared by the tests below: two epochs, observed as they end, and the same run again


@pytest.fixture(scope="module")
def two_epochs(data, tmp_path_factory):
    """A 2-epoch run of the default recipe (augmentation, one-cycle) in float32; history.csv as it
    stood when the second epoch began."""
    out = tmp_path_factory.mktemp("two") / "run"
    seen = []
    real = bts.train_epoch

    def observing(run):
        if run.epoch:  # an epoch has ended: what its end wrote, once the writer is done
            run.writer.drain()
            seen.append(read_history(out / "history.csv"))
        return real(run)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bts, "train_epoch", observing)
        assert bts.main(["--data-dir", str(data), "--out-dir", str(out), *TINY, "--epochs", "2", *CPU]) == 0
    return out, seen


@pytest.fixture(scope="module")
def same_again(data, two_epochs, tmp_path_factory):
    out = tmp_path_factory.mktemp("again") / "run"
    assert bts.main(["--data-dir", str(data), "--out-dir", str(out), *TINY, "--epochs", "2", *CPU]) == 0
    return out


@pytest.mark.slow
def test_history_csv_has_one_row_per_epoch_written_as_each_epoch_ends(two_epochs):
    out, seen = two_epochs
    rows = read_history(out / "history.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for column in ("train_loss", "val_loss", "val_dice", "val_iou", "lr", "images_per_second", "epoch_seconds"):
        assert all(math.isfinite(float(r[column])) for r in rows), column
    assert all(0 <= float(r["val_dice"]) <= 1 and 0 <= float(r["val_iou"]) <= float(r["val_dice"]) + 1e-9
               for r in rows)
    assert seen == [rows[:1]]  # at the start of epoch 2: epoch 1's row, as it stays


@pytest.mark.slow
def test_history_records_the_schedule_and_the_speed_of_each_epoch(two_epochs):
    out, _ = two_epochs
    cfg = bts.saved_config(json.loads((out / "config.json").read_text()), out / "config.json")
    assert len(json.loads((out / "split.json").read_text())["train"]) // 4 == STEPS
    for r in read_history(out / "history.csv"):
        epoch = int(r["epoch"])  # lr: that of the epoch's last step
        assert float(r["lr"]) == bts.learning_rate(cfg, epoch * STEPS - 1, 2 * STEPS)
        assert float(r["images_per_second"]) == pytest.approx(STEPS * 4 / float(r["epoch_seconds"]), rel=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    speeds = metrics["history"]["images_per_second"]
    assert len(speeds) == 2 and metrics["images_per_second"] == pytest.approx(speeds[1])  # once warm
    assert metrics["compile_seconds"] == 0.0


@pytest.mark.slow
def test_each_epoch_draws_its_panel_and_the_run_its_loss_curves(two_epochs):
    out, _ = two_epochs
    vis = out / "visualizations"
    for name in ("loss_curves.png", "epochs/epoch_001.png", "epochs/epoch_002.png"):
        picture = cv2.imread(str(vis / name))
        assert picture is not None and picture.shape[0] > 50 and picture.shape[1] > 50, name
    assert not list(out.rglob(".*.tmp"))  # every write finished under its own name


@pytest.mark.slow
def test_the_same_run_twice_on_a_cpu_in_float32_is_the_same_run(two_epochs, same_again):
    a, b = two_epochs[0], same_again
    assert metrics_without_timing(a) == metrics_without_timing(b)
    assert metrics_without_timing(a)["tta"] is True  # the default recipe: augmentation, one-cycle, mirror
    for name in ("model.pth", "last.pth"):
        sa, sb = (bts.load_checkpoint(f / name) for f in (a, b))
        assert sa["epoch"] == sb["epoch"] and sa.keys() == sb.keys()
        assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"]), name
    oa, ob = (bts.load_checkpoint(f / "last.pth", resumable=True)["optimizer"]["state"] for f in (a, b))
    assert all(torch.equal(oa[p][k], ob[p][k]) for p in oa for k in oa[p])
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in read_history(a / "history.csv")]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in read_history(b / "history.csv")]


# -----------------------------------------------------------------------------
# A NaN or infinite loss or gradient stops the run


def nan_loss(real, logits, target, cfg):
    return real(logits, target, cfg) * float("nan")


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def infinite_gradient(real, logits, target, cfg):
    return real(InfiniteGradient.apply(logits), target, cfg)


@pytest.mark.slow
def test_a_nan_after_the_first_epoch_names_the_step_and_the_checkpoints_from_before_it(data, tmp_path, monkeypatch,
                                                                                        capsys):
    on_training_step(monkeypatch, STEPS + 2, nan_loss)  # epoch 2, step 2
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", out, *TINY, "--epochs", "2")
    message = one_error(rc, err, "became nan at epoch 2, step 2", f"the checkpoints in {out} are from before it",
                        "--lr")
    assert "removed" not in message
    last = bts.load_checkpoint(out / "last.pth", resumable=True)
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert bts.load_checkpoint(out / "model.pth")["epoch"] == 1
    assert len(read_history(out / "history.csv")) == 1 and not (out / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("step, action, value", [(2, nan_loss, "nan"), (1, infinite_gradient, "")],
                         ids=["nan-loss", "inf-gradient"])
def test_a_non_finite_step_before_any_checkpoint_says_the_folder_is_removed_and_removes_it(
        step, action, value, data, tmp_path, monkeypatch, capsys):
    on_training_step(monkeypatch, step, action)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", out, *TINY, "--epochs", "2")
    one_error(rc, err, f"became {value}", f"at epoch 1, step {step}",
              "no checkpoint had been written, so the run's folder is removed")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# A stop signal during training: last.pth and the command that continues


def slow_saves(monkeypatch, seconds: float):
    """torch.save that takes `seconds`: the background writer is busy when the signal comes."""
    real = torch.save

    def slow(obj, f, *args, **kwargs):
        time.sleep(seconds)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(bts.torch, "save", slow)


@pytest.mark.slow
def test_ctrl_c_while_the_writer_is_busy_writes_last_pth_and_prints_a_copyable_command(data, tmp_path,
                                                                                       monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    slow_saves(monkeypatch, 0.2)  # epoch 1's checkpoints are still being written in epoch 2
    on_training_step(monkeypatch, STEPS + 1, signal_at(signal.SIGINT))  # epoch 2, step 1
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", "my run", *TINY, "--epochs", "2")
    assert rc == 130 and "Traceback" not in err, err
    folder = (tmp_path / "my run").resolve()
    assert "stopped in epoch 2;" in err and "last.pth holds its last finished epoch" in err
    command = err.strip().splitlines()[-1].strip()
    expected = [sys.executable, str(SCRIPT), "--resume", str(folder)]
    assert shlex.split(command) == expected and command == shlex.join(expected)  # quoted: the folder has a space
    assert Path(expected[0]).is_absolute() and Path(expected[1]).is_absolute()
    state = bts.load_checkpoint(folder / "last.pth", resumable=True)
    assert state["epoch"] == 1
    assert bts.load_checkpoint(folder / "model.pth")["epoch"] == 1
    assert not (folder / "metrics.json").exists() and not list(folder.rglob(".*.tmp"))
    assert "stopped in epoch 2" in (folder / "train.log").read_text()


@pytest.mark.slow
def test_sigterm_in_the_first_epoch_keeps_nothing_and_says_so(data, tmp_path, monkeypatch, capsys):
    """A run resumes from its last finished epoch: stopped in its first, it has none, so its folder goes."""
    on_training_step(monkeypatch, 1, signal_at(signal.SIGTERM))
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", out, *TINY, "--epochs", "2")
    assert rc == 143 and "Traceback" not in err, err
    assert "stopped in epoch 1, before the first checkpoint: nothing was kept; start the run again" in err
    assert not out.exists()


def test_a_stop_outside_the_training_loop_says_the_way_on_for_training_only(capsys):
    def stopped_while_decoding():
        raise KeyboardInterrupt

    assert bts.run_cli(stopped_while_decoding, "training") == 130
    err = capsys.readouterr().err
    assert "aborted" in err and "--resume" in err and "Traceback" not in err
    assert bts.run_cli(stopped_while_decoding, "predict") == 130
    err = capsys.readouterr().err
    assert "aborted" in err and "--resume" not in err


# -----------------------------------------------------------------------------
# The background writer


def test_the_writer_runs_its_jobs_in_order_and_leaving_it_waits_for_them():
    done = []
    with bts.Writer() as writer:
        for i in range(5):
            writer.submit(lambda i=i: (time.sleep(0.01 * (5 - i)), done.append(i)))
    assert done == [0, 1, 2, 3, 4]


def test_a_failed_background_write_surfaces_at_the_next_drain_submit_or_exit():
    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "model.pth")

    writer = bts.Writer()
    writer.submit(full_disk)
    with pytest.raises(OSError, match="No space left"):
        writer.drain()
    writer.drain()  # reported once
    writer.submit(full_disk)
    while not writer.jobs[0].done():
        time.sleep(0.01)
    with pytest.raises(OSError, match="No space left"):
        writer.submit(lambda: None)
    writer.shutdown()
    with pytest.raises(OSError, match="No space left"):
        with bts.Writer() as writer:
            writer.submit(full_disk)


@pytest.mark.slow
def test_a_full_disk_while_the_writer_saves_is_one_sentence_and_the_earlier_state_stays(data, tmp_path,
                                                                                        monkeypatch, capsys):
    real, writes = bts.atomic_write, []

    def full_at_the_second_last_pth(path, write):
        writes.append(Path(path).name)
        if writes.count("last.pth") == 2 and writes[-1] == "last.pth":
            def fill(f):
                f.write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, fill)
        return real(path, write)

    monkeypatch.setattr(bts, "atomic_write", full_at_the_second_last_pth)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", out, *TINY_ARGS, "--epochs", "2")
    one_error(rc, err, "the disk is full", f"writing {out / 'last.pth'}", "--resume")
    assert bts.load_checkpoint(out / "last.pth", resumable=True)["epoch"] == 1  # epoch 1's, whole
    assert not list(out.rglob(".*.tmp")) and not (out / "metrics.json").exists()


@pytest.fixture(scope="module")
def full_disk_run(data, tmp_path_factory):
    """A run on a real full disk (a 600 KiB tmpfs, where the first model.pth does not fit), whose
    checkpoint writes take a while, as on a real disk: its return code, stderr and what it left there."""
    import contextlib
    import io
    disk = tmp_path_factory.mktemp("small")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(io.StringIO()) as err:
            slow_saves(mp, 0.3)
            rc = bts.main(["--data-dir", str(data), "--out-dir", str(disk / "run"), *TINY_ARGS, "--base-width", "8"])
        left = sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    return rc, err.getvalue(), left, disk / "run"


@pytest.mark.slow
@pytest.mark.root
def test_a_real_full_disk_during_a_checkpoint_write_is_one_sentence_naming_the_file(full_disk_run):
    rc, err, left, out = full_disk_run
    one_error(rc, err, "the disk is full", f"writing {out / 'model.pth'}")
    assert not [name for name in left if name.endswith(".tmp") or name.endswith(".pth")]  # nothing half-written


@pytest.mark.slow
@pytest.mark.root
def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_no_folder(full_disk_run):
    rc, err, left, out = full_disk_run
    assert rc == 1 and left == []


# A process whose background writer saves a checkpoint twice: the second write blocks halfway (half of
# its bytes in atomic_write's temporary file, flushed), says "mid-write" and waits to be killed.
KILLED = """
import io, os, sys, time
sys.path.insert(0, {root!r})
import brain_tumor_segmentation as bts
real, calls = bts.atomic_write, []
def half_then_wait(path, write):
    calls.append(path)
    if len(calls) == 2:
        def half(f):
            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            print("mid-write", flush=True)
            time.sleep(600)
        return real(path, half)
    return real(path, write)
bts.atomic_write = half_then_wait
state = bts.load_checkpoint({source!r}, resumable=True)
with bts.Writer() as writer:
    writer.submit(bts.save_checkpoint, bts.Path({path!r}), {{**state, "epoch": 1}})
    writer.drain()
    print("written", flush=True)
    writer.submit(bts.save_checkpoint, bts.Path({path!r}), {{**state, "epoch": 2}})
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_kill_inside_a_background_checkpoint_write_leaves_the_previous_one_readable(two_epochs, tmp_path):
    path = tmp_path / "last.pth"
    code = KILLED.format(root=str(REPO_ROOT), source=str(two_epochs[0] / "last.pth"), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert [proc.stdout.readline().strip() for _ in range(2)] == ["written", "mid-write"]
        partial = list(tmp_path.glob(".last.pth.*.tmp"))
        assert len(partial) == 1 and 0 < partial[0].stat().st_size < path.stat().st_size
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert bts.load_checkpoint(path, resumable=True)["epoch"] == 1  # the previous state, whole


@pytest.mark.slow
def test_a_stop_between_the_best_model_and_the_state_of_epoch_1_leaves_no_folder(data, tmp_path, monkeypatch,
                                                                                  capsys):
    """A stop as epoch 1 ends, after model.pth but before last.pth is written: nothing can continue the
    run, so it says so and removes its folder, model.pth too (a folder holding only model.pth could
    neither be resumed nor started again)."""
    real = bts.save_checkpoint

    def stop_before_the_state(path, state):
        if path.name == "last.pth":
            return os.kill(os.getpid(), signal.SIGINT)  # the writer thread: the signal reaches training
        real(path, state)

    monkeypatch.setattr(bts, "save_checkpoint", stop_before_the_state)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", out, *TINY, "--epochs", "3")
    assert rc == 130 and "nothing was kept; start the run again" in err and "Traceback" not in err, err
    assert not out.exists()
