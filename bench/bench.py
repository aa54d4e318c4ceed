#!/usr/bin/env python3
"""Training speed of brain_tumor_segmentation.py's own training loop against the seed's plain loop,
on one device, in the same run.

    .venv/bin/python bench/bench.py --data-dir ../shared/data                     # CPU or GPU
    .venv/bin/python bench/bench.py --data-dir ../shared/data --compile on --batch-size 32

Prints, for each loop, training images/s (median of --repeats timings after warm-up), the ratios,
the model's FLOPs per training image (torch.utils.flop_counter), the achieved FLOP/s and that as a
share of a large matrix product's FLOP/s measured here in the same precision.

- training loop: `train_epoch` itself, the function the script trains with (augmentation, the
  learning rate, the non-finite checks, its precision, layout and torch.compile rules), on uint8
  tensors already on the device. A compile happens before the timing and is reported apart.
- seed loop: the seed README's loop: a Dataset that reads and resizes the original-size PNGs with
  OpenCV on every access, a DataLoader (num_workers=0 and a tuned count), float32, no compile.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import brain_tumor_segmentation as bts  # noqa: E402


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0] if names else 'cpu'} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SeedDataset(Dataset):
    """The seed's per-item loading: decode, resize and scale on every access."""

    def __init__(self, pairs, size):
        self.pairs, self.size = pairs, size

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        image_path, mask_path = self.pairs[i]
        image = cv2.resize(cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE), (self.size, self.size)) / 255.0
        mask = cv2.resize(cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE), (self.size, self.size)) > 127
        return torch.tensor(image[None], dtype=torch.float32), torch.tensor(mask[None], dtype=torch.float32)


def training_loop(cfg, data, steps):
    """One timed call = one epoch of `steps` steps of the script's train_epoch."""
    with contextlib.redirect_stdout(io.StringIO()):
        machine = bts.set_up_machine(cfg)
    names = data["names"][:steps * cfg.batch_size]
    split = {"train": names, "val": [], "test": [], "files": data["hashes"], "unit": "images"}
    idx = {"train": torch.arange(len(names)), "val": torch.arange(0), "test": torch.arange(0)}
    with contextlib.redirect_stdout(io.StringIO()):
        run = bts.build_run(cfg, machine, data, split, idx, None)

    def step():
        run.epoch = 0
        with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
            bts.train_epoch(run)

    return step, machine, run.compile_seconds


def seed_loop(pairs, cfg, device, workers, steps):
    torch.manual_seed(0)
    model = bts.UNet(width=cfg.base_width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(SeedDataset(pairs, cfg.image_size), batch_size=cfg.batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda")
    state = {"it": iter(loader)}

    def one():
        try:
            x, y = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            x, y = next(state["it"])
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = bts.dice_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return lambda: [one() for _ in range(steps)]


def time_loops(loops, images, warmup, repeats, device):
    """Median images/s of each loop over `repeats` timings, after one warm-up call. The loops take
    turns within each repeat, so a drift in the machine's speed affects all of them alike."""
    for step in loops.values():
        for _ in range(warmup):
            step()
    sync(device)
    rates = {name: [] for name in loops}
    for _ in range(repeats):
        for name, step in loops.items():
            t0 = time.perf_counter()
            step()
            sync(device)
            rates[name].append(images / (time.perf_counter() - t0))
    return {name: (statistics.median(r), r) for name, r in rates.items()}


def flops_per_image(cfg, device):
    model = bts.UNet(width=cfg.base_width).to(device)
    x = torch.rand(2, 1, cfg.image_size, cfg.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        bts.dice_loss(model(x), (x > 0.5).float()).backward()
    return counter.get_total_flops() / 2


def matmul_flops(device, dtype, seconds=2.0):
    """A large matrix product's FLOP/s, timed for at least `seconds` (a few products take a
    millisecond on an H100: too short to mean anything)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
        if count % 8 == 0:
            sync(device)
    sync(device)
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                   help="folder with brain-tumor-segmentation/ (256x256) and brain-tumor-segmentation-512-sample/")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="training steps per timing")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each loop first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="the tuned DataLoader's workers")
    p.add_argument("--device", default="auto")
    p.add_argument("--matmul-seconds", type=float, default=2.0, help="how long the matrix product is timed")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--compile-mode", default="default", help="default, reduce-overhead (CUDA graphs) or max-autotune")
    p.add_argument("--amp", default="auto", help="the training loop's precision: auto (the script's rule), bf16, fp16 "
                                                  "or off")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--recipe", default="seed", choices=("seed", "improved"),
                   help="the training loop's recipe; seed (the default) matches the seed loop's loss and optimizer, "
                        "so the ratio measures the data path, precision and layout, not another recipe")
    p.add_argument("--seed-loops", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the seed's DataLoader loops (0 and --workers workers) in the same run")
    args = p.parse_args()
    cfg, _ = bts.config_from_args(["--recipe", args.recipe, "--batch-size", str(args.batch_size), "--image-size",
                                   str(args.image_size), "--base-width", str(args.base_width), "--compile",
                                   args.compile, "--compile-mode", args.compile_mode, "--amp", args.amp, "--device",
                                   args.device, "--channels-last" if args.channels_last else "--no-channels-last"])
    data_dir = Path(args.data_dir)
    if not (data_dir / "brain-tumor-segmentation" / "images").is_dir():
        sys.exit(f"bench.py times the real data: {data_dir} has no brain-tumor-segmentation/images; pass "
                 f"--data-dir DIR (make bench ARGS=\"--data-dir DIR\"), a folder with brain-tumor-segmentation/ "
                 f"(images/, masks/) and, for the seed loop, brain-tumor-segmentation-512-sample/")
    t0 = time.perf_counter()
    limit = max(args.steps * args.batch_size, 64)
    data = bts.load_dataset(data_dir / "brain-tumor-segmentation", args.image_size, limit=limit)
    loop, machine, compile_seconds = training_loop(cfg, data, args.steps)
    device = machine.device
    precision = str(machine.dtype or torch.float32).removeprefix("torch.")
    print(f"device: {device_name(device)}, torch {torch.__version__}; batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, width {args.base_width}; precision {precision}, channels-last "
          f"{machine.channels_last}, compile {args.compile} ({args.compile_mode}): "
          + (f"compiled, first compile and warm-up {compile_seconds:.1f} s" if compile_seconds else "not compiled")
          + f"; set-up {time.perf_counter() - t0:.1f} s")
    loops = {"training loop": loop}
    if args.seed_loops:
        originals = data_dir / "brain-tumor-segmentation-512-sample"
        pairs = [(p, originals / "masks" / p.name) for p in sorted((originals / "images").glob("*.png"))]
        if not pairs:
            sys.exit(f"{originals}: no 512x512 sample for the seed loop (or pass --no-seed-loops)")
        pairs = (pairs * (2000 // len(pairs) + 1))[:2000]  # the seed loop decodes original-size files
        for workers in (0, args.workers):
            loops[f"seed loop, {workers} workers"] = seed_loop(pairs, cfg, device, workers, args.steps)
    timed = time_loops(loops, args.steps * args.batch_size, args.warmup, args.repeats, device)
    fast = timed["training loop"][0]
    flops = flops_per_image(cfg, device)
    peak = matmul_flops(device, machine.dtype or torch.float32, args.matmul_seconds)
    print(f"model: {flops / 1e9:.1f} GFLOP per training image (forward + backward)")
    print(f"matrix product, {machine.dtype or torch.float32}: {peak / 1e9:.1f} GFLOP/s")
    for name, (rate, repeats) in timed.items():
        ratio = "" if name == "training loop" or not rate else f"  training loop x{fast / rate:.2f}"
        label = f"{name} ({precision if name == 'training loop' else 'float32'})"
        print(f"{label:34s} {rate:9.3f} images/s  {rate * flops / 1e9:9.1f} GFLOP/s  "
              f"{rate * flops / peak:6.1%} of the matrix product  (repeats: "
              f"{', '.join(f'{r:.3f}' for r in repeats)}){ratio}")


if __name__ == "__main__":
    main()
