#!/usr/bin/env python3
"""Score finished runs again on their own validation and test images, at the threshold 0.5 and at
the run's chosen threshold, with and without a horizontal-flip test-time average. Trains nothing:
it measures what the threshold choice and flipping add to models that already exist.

    .venv/bin/python bench/rescore.py --data-dir ../shared/data/brain-tumor-segmentation outputs/ablation/*-s1

Each run folder needs the model.pth and split.json that brain_tumor_segmentation.py wrote.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import brain_tumor_segmentation as bts  # noqa: E402


def mean_dice(probs, masks, threshold) -> float:
    return float(bts.scores_from_counts(bts.confusion_counts(probs > threshold, masks.bool()))["dice"].mean())


def rescore(run: Path, data_cache: dict, data_dir: Path) -> dict:
    state = bts.load_checkpoint(run / "model.pth")
    split = json.loads((run / "split.json").read_text())
    size = state["config"]["image_size"]
    if size not in data_cache:
        data_cache[size] = bts.load_dataset(data_dir, size)
    data = data_cache[size]
    idx = bts.split_indices(split, data)
    model = bts.model_from_checkpoint(state, run / "model.pth", torch.device("cpu"))
    row = {"run": run.name, "threshold": float(state["threshold"])}
    for part in ("val", "test"):
        images, masks = data["images"][idx[part]], data["masks"][idx[part]]
        for flip in (False, True):
            probs = bts.predict_probabilities(model, images, 64, bts.Machine(images.device), flip=flip)
            for t in sorted({0.5, row["threshold"]}):
                row[f"{part} t={t:.2f}{' +flip' if flip else ''}"] = mean_dice(probs, masks, t)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with model.pth and split.json)")
    p.add_argument("--data-dir", type=Path, required=True, help="the data folder the runs trained on")
    args = p.parse_args()
    cache = {}
    rows = [rescore(run, cache, args.data_dir) for run in args.runs]
    for row in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    keys = [k for k in rows[0] if k.startswith(("val", "test"))]
    if all(set(r) == set(rows[0]) for r in rows):
        print("mean:", json.dumps({k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys}))


if __name__ == "__main__":
    main()
