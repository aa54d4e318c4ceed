#!/usr/bin/env python3
"""Segment MRI slices with a model trained by brain_tumor_segmentation.py.

    python predict.py --model outputs/model.pth scan1.png scans/ --out predictions
    python predict.py --model outputs/model.pth scans/ --masks truth/ --out predictions   # also scores

For each input image it writes OUT/masks/NAME.png (0/255, at the input's size), OUT/overlays/NAME.png
(the scan with the tumour tinted red, outlined in yellow) and one row of OUT/predictions.csv. The
preprocessing, the image size, the threshold and the mirror averaging are the trainer's own (from
its code and the checkpoint), and so is the scoring against --masks.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import brain_tumor_segmentation as bts  # noqa: E402
from brain_tumor_segmentation import UserError, setting, training_setting  # noqa: E402

STAGE = "predict-staging"  # outputs are written into OUT/.predict-staging.*.tmp, then moved into place


@dataclass
class PredictConfig:
    inputs: list[str] = setting([], "image files and/or folders of images", positional=True, metavar="INPUT")
    model: str = setting("outputs/model.pth", "checkpoint written by training (model.pth: the best epoch)")
    out: str = setting("predictions", "output folder")
    masks: str = setting("", "folder of true masks (same file names): score each prediction on every metric")
    eval_batch_size: int = training_setting("eval_batch_size", aliases=("--batch-size",))
    device: str = training_setting("device")
    amp: Literal["auto", "bf16", "fp16", "off"] = training_setting("amp")
    overwrite: bool = setting(False, "replace the outputs of an earlier prediction in OUT (never other files)")

    def __post_init__(self):
        bts.check_fields(self)


def predict(cfg: PredictConfig) -> list[dict]:
    """Segment every input image: a mask at its own size, an overlay and a CSV row each (with scores
    when --masks has its mask). Everything is written into a hidden staging folder inside OUT and
    renamed into place, file by file, only once all of it is written: a failure while writing (a
    full disk) leaves the earlier outputs as they were and no partial ones."""
    bts.RUN_WARNINGS.clear()
    state = bts.load_checkpoint(cfg.model)
    if state.get("optimizer") is not None:  # a resumable state: last.pth
        bts.warn(f"{cfg.model} is the latest training state (epoch {state['epoch']}), not the best model: it predicts "
                 f"with the untuned threshold {state['threshold']:.2f}; model.pth beside it holds the best epoch and "
                 f"the threshold chosen on validation")
    files = collect_inputs(cfg.inputs)
    truth = bts.list_images(Path(cfg.masks)) if cfg.masks else {}
    if cfg.masks and not truth:
        raise UserError(f"{cfg.masks}: no masks found (PNG, JPEG, TIFF or BMP)")
    reads = {f.parent: (f"the folder of the input {f}", False) for f in files.values()}
    reads.update({Path(i): (f"the input folder {i}", True) for i in cfg.inputs if Path(i).is_dir()})
    if cfg.masks:
        reads[Path(cfg.masks)] = (f"the --masks folder {cfg.masks}", True)
    if (Path(cfg.model).parent / bts.MANIFEST).is_file():  # a training run's folder, not a model.pth copied anywhere
        reads[Path(cfg.model).parent] = (f"the run folder of {cfg.model}", True)
    targets = [STAGE, "predictions.csv", *(f"{sub}/{name}.png" for name in files for sub in ("masks", "overlays"))]
    device = bts.pick_device(cfg.device)
    machine = bts.Machine(device, bts.precision(cfg.amp, device)[0])
    model = bts.model_from_checkpoint(state, cfg.model, device)
    size, threshold = state["config"]["image_size"], float(state["threshold"])
    flip = bool(state["config"].get("tta", bts.BEFORE_FIELD_EXISTED["tta"]))
    inputs = tuple(p.resolve() for p in [*files.values(), *truth.values(), Path(cfg.model)])
    t0 = time.time()
    with bts.claim_folder(Path(cfg.out), "predict", targets, reads, cfg.overwrite, earlier_prediction, inputs) as out:
        out.begin()
        stage = Path(tempfile.mkdtemp(prefix=f".{STAGE}.", suffix=".tmp", dir=out.folder))
        try:
            rows = segment(model, machine, files, (size, threshold, flip), truth, cfg, stage)
            if not rows:
                raise UserError("none of the inputs could be read; nothing was written")
            written = move_into_place(stage, out.folder)
            out.settle(written, prune=cfg.overwrite)  # --overwrite: the earlier prediction's other outputs go
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    seconds = time.time() - t0
    skipped = len(files) - len(rows)
    bts.log(f"{len(rows)} images segmented in {seconds:.2f} s ({seconds / len(rows):.3f} s each) on {device}"
            + (f", {skipped} unreadable skipped" if skipped else "") + f"; masks, overlays and predictions.csv in "
            f"{cfg.out}/")
    scored = [r for r in rows if "dice" in r]
    report_scores(scored, size)
    if cfg.masks and len(scored) < len(rows):
        bts.warn(f"{len(rows) - len(scored)} of the {len(rows)} segmented scans are not scored: their mask is missing "
                 f"from {cfg.masks}, unreadable, or of another size (warned above)")
    return rows


def earlier_prediction(out: Path, found: list[Path]) -> str:
    return (f"{out}: {len(found)} outputs of an earlier prediction exist already (for example {found[0]}); pass "
            f"--overwrite to replace them, or choose another --out")


def collect_inputs(inputs: list[str]) -> dict[str, Path]:
    """Image files named directly or found in the named folders (not recursive), by name: outputs are
    named after the file, so a second file of the same name is skipped."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(bts.list_images(path).values(), key=lambda p: bts.name_order(p.stem))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    unique: dict[str, Path] = {}
    for f in files:
        name = bts.image_name(f.name)
        if name in unique:
            bts.warn(f"{f}: same name as {unique[name]}, and outputs are named after the file; skipped")
        else:
            unique[name] = f
    if not unique:
        raise UserError(f"no images (PNG, JPEG, TIFF or BMP) in {', '.join(inputs)}")
    return unique


def segment(model, machine, files: dict, how: tuple, truth: dict, cfg: PredictConfig, stage: Path) -> list:
    """Masks, overlays and CSV rows of the readable files (name -> path), written into `stage`; `how`
    is the checkpoint's (image size, threshold, mirror averaging)."""
    size, threshold, flip = how
    rows, items = [], list(files.items())
    for start in tqdm(range(0, len(items), cfg.eval_batch_size), desc="predicting", unit="batch",
                      disable=bts.process_rank() != 0):
        batch = []
        for name, f in items[start:start + cfg.eval_batch_size]:
            try:
                batch.append((name, f, bts.read_image(f)))
            except ValueError as e:
                bts.warn(f"{e}; skipped")
        if not batch:
            continue
        x = torch.from_numpy(np.stack([bts.preprocess_image(gray, size) for _, _, gray in batch])).unsqueeze(1)
        probs = bts.predict_probabilities(model, x, len(batch), machine, flip=flip).cpu().numpy()[:, 0]
        for (name, f, gray), prob in zip(batch, probs):
            full = cv2.resize(prob, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
            mask = full > threshold
            bts.save_png(stage / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)
            bts.save_png(stage / "overlays" / f"{name}.png", make_overlay(gray, mask))
            rows.append({"image": str(f), "width": gray.shape[1], "height": gray.shape[0],
                         "tumor_pixels": int(mask.sum()), "tumor_fraction": round(float(mask.mean()), 6),
                         "mean_probability": round(float(full[mask].mean()) if mask.any() else 0.0, 4),
                         **score(name, f, gray.shape, prob > threshold, truth, cfg.masks, size)})
    if rows:
        bts.save_csv(stage / "predictions.csv", rows)
    return rows


def score(name: str, f: Path, shape: tuple, pred: np.ndarray, truth: dict, masks_dir: str, size: int) -> dict:
    """The METRICS of one prediction against its --masks file, at the model's resolution, as the
    training test scores them; {} (with a warning) when there is no usable mask."""
    if name not in truth:
        if masks_dir:
            bts.warn(f"{f.name}: no mask named {name}.* in {masks_dir}; no scores for it")
        return {}
    try:
        target, _, note = bts.mask_for(truth[name], shape, size)
    except ValueError as e:
        bts.warn(f"{e}; no scores for {f.name}")
        return {}
    if note:
        bts.warn(note)
    scores = bts.scores_from_counts(bts.confusion_counts(torch.from_numpy(pred)[None], torch.from_numpy(target)[None]))
    return {"true_tumor_pixels": int(target.sum()), **{name: round(float(v[0]), 5) for name, v in scores.items()}}


def make_overlay(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The scan in gray with the tumour tinted red and outlined in yellow (BGR, uint8)."""
    scan = cv2.cvtColor(np.clip(gray * 255 + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    tinted = scan.copy()
    tinted[mask] = (0, 0, 255)
    overlay = cv2.addWeighted(tinted, 0.35, scan, 0.65, 0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(overlay, contours, -1, (0, 255, 255), max(1, round(min(mask.shape) / 256)))
    return overlay


def move_into_place(stage: Path, out: Path) -> set[str]:
    """Each staged file replaces its namesake in `out` (a rename: no copy, no extra space); returns
    their names."""
    written = set()
    for path in sorted(stage.rglob("*")):
        if path.is_file():
            written.add(path.relative_to(stage).as_posix())
            (out / path.relative_to(stage)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, out / path.relative_to(stage))
    for folder in (out, out / "masks", out / "overlays"):
        bts.fsync_folder(folder)
    return written


def report_scores(scored: list[dict], size: int) -> None:
    if scored and not any(r["true_tumor_pixels"] for r in scored):
        bts.warn(f"THE {len(scored)} --masks FILES HOLD NO TUMOUR PIXEL at {size}x{size}: the scores below only say "
                 f"whether anything was predicted, not how well tumours are outlined")
    if scored:
        bts.log(f"against {len(scored)} masks (mean over images, at {size}x{size}): "
                + ", ".join(f"{name} {np.mean([r[name] for r in scored]):.4f}" for name in bts.METRICS))


def main(argv: list[str] | None = None) -> int:
    return bts.run_tool(PredictConfig, predict, __doc__.split("\n\n")[0], "predict.py", argv)


if __name__ == "__main__":
    sys.exit(main())
