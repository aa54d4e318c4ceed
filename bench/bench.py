#!/usr/bin/env python3
"""Training speed of brain_tumor_segmentation.py's fast path against the seed's plain loop, on one device.

    .venv/bin/python bench/bench.py --data-dir ../shared/data                     # CPU or GPU
    .venv/bin/python bench/bench.py --data-dir ../shared/data --full-run          # + a timed 20-epoch run (GPU)

Prints, for each loop, training images/s (median of --repeats timings after warm-up), the ratios,
the model's FLOPs per training image (torch.utils.flop_counter), the achieved FLOP/s and that as a
fraction of a large matrix product's FLOP/s measured here in the same precision.

- fast path: the script's own code: uint8 tensors already on the device, batches sliced there,
  its precision, channels-last and torch.compile settings (`auto` as in training).
- seed loop: the seed README's loop: a Dataset that reads and resizes the original-size PNGs with
  OpenCV on every access, a DataLoader (num_workers=0 and a tuned count), float32, no compile.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
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


def cpu_name() -> str:
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else "cpu"


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


def time_loops(loops, batch_size, steps, warmup, repeats, device):
    """Median images/s of each loop over `repeats` timings of `steps` steps, after `warmup` steps.
    The loops take turns within each repeat, so a drift in the machine's speed (other processes,
    clock changes) affects all of them alike and their ratios stay fair."""
    for step in loops.values():
        for _ in range(warmup):
            step()
    sync(device)
    rates = {name: [] for name in loops}
    for _ in range(repeats):
        for name, step in loops.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            rates[name].append(steps * batch_size / (time.perf_counter() - t0))
    return {name: (statistics.median(r), r) for name, r in rates.items()}


def fast_path(cfg, images, masks, device):
    """A step of the script's training loop: slice uint8 tensors on the device, its precision."""
    torch.manual_seed(0)
    model = bts.UNet(width=cfg.base_width).to(device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = bts.amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer = bts.make_optimizer(model, cfg, device)
    train_model = torch.compile(model, mode=cfg.compile_mode) if bts.use_compile(cfg, device) else model
    model.train()
    order = torch.randperm(len(images), device=device)
    state = {"i": 0}

    def step():
        start = (state["i"] * cfg.batch_size) % (len(images) - cfg.batch_size + 1)
        batch = order[start:start + cfg.batch_size]
        state["i"] += 1
        x = bts.to_input(images[batch], device, channels_last)
        bts.forward_backward(train_model, optimizer, scaler, x, masks[batch].float(), cfg, dtype)
        scaler.step(optimizer)
        scaler.update()

    return step, dtype


def seed_loop(pairs, cfg, device, workers):
    torch.manual_seed(0)
    model = bts.UNet(width=cfg.base_width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(SeedDataset(pairs, cfg.image_size), batch_size=cfg.batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda")
    state = {"it": iter(loader)}

    def step():
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

    return step


def flops_per_image(cfg, device):
    model = bts.UNet(width=cfg.base_width).to(device)
    x = torch.rand(2, 1, cfg.image_size, cfg.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        bts.dice_loss(model(x), (x > 0.5).float()).backward()
    return counter.get_total_flops() / 2


def matmul_flops(device, dtype, n=4096 if torch.cuda.is_available() else 2048, repeats=5):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                   help="folder with brain-tumor-segmentation/ (256x256) and brain-tumor-segmentation-512-sample/")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="the tuned DataLoader's workers")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="auto")
    p.add_argument("--recipe", default="seed", choices=("seed", "improved"),
                   help="the fast path's loss and optimizer; seed (the default) matches the seed loop's, so the "
                        "ratio measures the data path and the precision, not a different recipe")
    p.add_argument("--compile-mode", default="default", help="default, reduce-overhead (CUDA graphs) or max-autotune")
    p.add_argument("--amp", default="auto", help="the fast path's precision: auto (as in training), bf16, fp16 or off")
    p.add_argument("--full-run", action="store_true", help="also time a whole 20-epoch run of the script")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="the fast path's memory format on CUDA")
    p.add_argument("--seed-loops", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the seed's DataLoader loops (0 and --workers workers) in the same run")
    args = p.parse_args()
    device = bts.pick_device(args.device)
    cfg = bts.dataclasses.replace(bts.config_from_args(["--recipe", args.recipe]), batch_size=args.batch_size,
                                  image_size=args.image_size, base_width=args.base_width, compile=args.compile,
                                  compile_mode=args.compile_mode, amp=args.amp,
                                  channels_last=args.channels_last)
    data = Path(args.data_dir)
    originals = data / "brain-tumor-segmentation-512-sample"
    pairs = [(p, originals / "masks" / p.name) for p in sorted((originals / "images").glob("*.png"))]
    # The seed loop decodes original-size files; repeat the 512x512 sample to a full epoch's worth.
    pairs = (pairs * (2000 // max(1, len(pairs)) + 1))[:2000]
    t0 = time.perf_counter()
    loaded = bts.load_dataset(data / "brain-tumor-segmentation", args.image_size, limit=512)
    images, masks = loaded["images"].to(device), loaded["masks"].to(device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()}"
          f" ({torch.get_num_threads()} threads), torch {torch.__version__}; batch {args.batch_size}, compile "
          f"{args.compile} ({args.compile_mode}), channels-last {args.channels_last}, "
          f"{args.image_size}x{args.image_size}, width {args.base_width}; data decoded in {time.perf_counter() - t0:.1f} s")

    step, dtype = fast_path(cfg, images, masks, device)
    precision = str(dtype or torch.float32).removeprefix("torch.")
    if device.type == "cpu":
        print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {bts.cpu_has_native_bf16()}; "
              f"fast path precision {precision} (--amp {args.amp}); seed loop float32")
    loops = {"fast path": step}
    for workers in (0, args.workers) if args.seed_loops else ():
        loops[f"seed loop, {workers} workers"] = seed_loop(pairs, cfg, device, workers)
    timed = time_loops(loops, args.batch_size, args.steps, args.warmup, args.repeats, device)
    fast = timed["fast path"][0]
    flops = flops_per_image(cfg, device)
    peak = matmul_flops(device, dtype or torch.float32)
    print(f"model: {flops / 1e9:.1f} GFLOP per training image (forward + backward)")
    print(f"matrix product, {dtype or torch.float32}: {peak / 1e9:.1f} GFLOP/s")
    for name, (rate, repeats) in timed.items():
        ratio = "" if name == "fast path" or not rate else f"  fast path x{fast / rate:.2f}"
        name = f"{name} ({precision if name == 'fast path' else 'float32'})"
        print(f"{name:34s} {rate:9.3f} images/s  {rate * flops / 1e9:9.1f} GFLOP/s  "
              f"{rate * flops / peak:6.1%} of the matrix product  (repeats: "
              f"{', '.join(f'{r:.3f}' for r in repeats)}){ratio}")
    if args.full_run:
        cmd = [sys.executable, str(ROOT / "brain_tumor_segmentation.py"), "--data-dir",
               str(data / "brain-tumor-segmentation"), "--out-dir", "/tmp/bench-full-run", "--overwrite"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"whole 20-epoch run, start to finish: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
