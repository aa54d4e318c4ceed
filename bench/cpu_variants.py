#!/usr/bin/env python3
"""One training step of the U-Net (batch 8, 256x256, width 32, Adam, Dice loss) in one of the
layouts the CPU could use, to choose the CPU's fast path:

    for v in eager cl comp; do .venv/bin/python bench/cpu_variants.py $v; done

eager: float32, contiguous; cl: channels-last; comp: torch.compile (inductor); add bf16 to any of
them (for example eager-bf16) for bf16 autocast. Prints the first step's seconds (compile time
included) and images/s over 3 timings of 2 steps.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import brain_tumor_segmentation as bts  # noqa: E402

mode = sys.argv[1] if len(sys.argv) > 1 else "eager"
bs = 8
torch.manual_seed(0)
model = bts.UNet(width=32)
x = torch.rand(bs, 1, 256, 256)
t = (torch.rand(bs, 1, 256, 256) > 0.9).float()
if "cl" in mode:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
opt = torch.optim.Adam(model.parameters(), 1e-3)
m = torch.compile(model) if "comp" in mode else model


def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in mode):
        out = m(x)
    loss = bts.dice_loss(out, t)
    loss.backward()
    opt.step()


t0 = time.perf_counter()
step()
print(mode, "first step", round(time.perf_counter() - t0, 1), "s", flush=True)
rates = []
for _ in range(3):
    t0 = time.perf_counter()
    step()
    step()
    rates.append(2 * bs / (time.perf_counter() - t0))
print(mode, "images/s", [round(v, 3) for v in rates], "median", round(statistics.median(rates), 3), flush=True)
