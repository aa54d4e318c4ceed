#!/usr/bin/env python3
"""The post-processing steps on a finished run's validation and test images, with and without each:

    .venv/bin/python bench/postprocess.py RUN_OR_CHECKPOINT [...] --data-dir DIR

For each run: the probabilities of its validation and test images (with its mirror averaging), its
threshold, then the mean Dice of the masks with no step, each step alone, and the steps chosen on
validation (as the trainer chooses them: in POSTPROCESSING's order, each kept if it raises the
validation Dice), with 95% bootstrap intervals over patients. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import brain_tumor_segmentation as bts  # noqa: E402


def dice_per_image(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return bts.scores_from_counts(bts.confusion_counts(torch.from_numpy(pred), torch.from_numpy(target)))["dice"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                             "brain-tumor-segmentation"))
    args = p.parse_args()
    print("| run | steps | validation Dice [95% CI] | test Dice [95% CI] |\n|---|---|---|---|")
    for run in args.runs:
        path = Path(run) / "model.pth" if Path(run).is_dir() else Path(run)
        state = bts.load_checkpoint(path)
        cfg = bts.saved_config(state["config"], path)
        data = bts.load_dataset(args.data_dir, cfg.image_size)
        idx = bts.split_indices(state["split"], data)
        model = bts.model_from_checkpoint(state, path, torch.device("cpu"))
        machine = bts.Machine(torch.device("cpu"), bts.precision("auto", torch.device("cpu"))[0])
        parts = {}
        for part in ("val", "test"):
            probs = bts.predict_probabilities(model, data["images"][idx[part]], 32, machine, flip=cfg.tta)
            groups = [state["split"]["groups"][data["names"][i]] for i in idx[part].tolist()]
            parts[part] = (probs.float().numpy()[:, 0], data["masks"][idx[part]].bool().numpy()[:, 0], groups)
        threshold = float(state["threshold"])

        def scored(part, steps):
            probs, targets, groups = parts[part]
            dice = dice_per_image(bts.postprocess(probs, threshold, steps), targets)
            low, high = bts.bootstrap_interval(dice, groups)
            return f"{dice.mean():.4f} [{low:.4f}-{high:.4f}]"

        chosen, best = [], float(dice_per_image(bts.postprocess(parts["val"][0], threshold, []), parts["val"][1]).mean())
        for step in bts.POSTPROCESSING:
            trial = float(dice_per_image(bts.postprocess(parts["val"][0], threshold, [*chosen, step]),
                                         parts["val"][1]).mean())
            if trial > best:
                chosen, best = [*chosen, step], trial
        name = f"{path.parent.name}/{path.name} ({cfg.image_size}x{cfg.image_size}, threshold {threshold:.2f})"
        for steps, label in [([], "none"), *(([s], s) for s in bts.POSTPROCESSING),
                             (chosen, f"chosen on validation: {', '.join(chosen) or 'none'}")]:
            print(f"| {name} | {label} | {scored('val', steps)} | {scored('test', steps)} |", flush=True)


if __name__ == "__main__":
    main()
