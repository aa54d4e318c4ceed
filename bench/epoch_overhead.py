#!/usr/bin/env python3
"""The work between two epochs that is not validation, at the default size (256x256, width 32):
what end_epoch costs the training loop (copying the states for the checkpoints, handing the files to
the background writer), and what the writer then does beside the next epoch.

    .venv/bin/python bench/epoch_overhead.py --data-dir ../shared/data/brain-tumor-segmentation
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import brain_tumor_segmentation as bts  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "brain-tumor-segmentation"))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="epoch-overhead-"))
    cfg, _ = bts.config_from_args(["--data-dir", args.data_dir, "--out-dir", str(out), "--compile", "off"])
    with contextlib.redirect_stdout(io.StringIO()):
        machine = bts.set_up_machine(cfg)
        data = bts.load_dataset(args.data_dir, cfg.image_size, limit=48)
        split = {"train": data["names"][:32], "val": data["names"][32:48], "test": [], "files": data["hashes"],
                 "unit": "images", "how": "", "train_patients": [], "val_patients": [], "test_patients": []}
        idx = bts.split_indices(split, data)
        run = bts.build_run(cfg, machine, data, split, idx, None)
    real_evaluate, spent = bts.evaluate, {}

    def timed_evaluate(*a, **k):
        t0 = time.perf_counter()
        result = real_evaluate(*a, **k)
        spent["validation"] = time.perf_counter() - t0
        return result

    bts.evaluate = timed_evaluate
    loop, writer = [], []
    with run.writer:
        for _ in range(args.repeats):
            run.losses = torch.ones(2)
            run.best = {"epoch": 0, "val_dice": -1.0}  # every epoch improves: model.pth is written too
            t0 = time.perf_counter()
            bts.end_epoch(run, 1.0)
            loop.append(time.perf_counter() - t0 - spent["validation"])
            t0 = time.perf_counter()
            run.writer.drain()
            writer.append(time.perf_counter() - t0)
    print(f"{bts.torch.__version__}, {bts.precision_name(machine)}, 256x256, width 32, {args.repeats} epochs' ends")
    print(f"end of an epoch, besides validation, on the training path: median {statistics.median(loop):.3f} s "
          f"({', '.join(f'{t:.3f}' for t in loop)})")
    print(f"then in the background (model.pth, last.pth, panel, curves): median {statistics.median(writer):.3f} s")


if __name__ == "__main__":
    main()
