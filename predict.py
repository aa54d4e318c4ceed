#!/usr/bin/env python3
"""Segment MRI slices with a model trained by brain_tumor_segmentation.py.

    python predict.py --model outputs/RUN scan1.png scans/                # masks, overlays, predictions.csv
    python predict.py --model outputs/RUN scans/ --masks truth/           # also scores each scan
    python predict.py --model outputs/RUN patients/ --recursive            # a folder per patient
    python predict.py --model model.onnx scans/                           # exported (export.py): onnxruntime

It writes into a new folder it creates (--out, or predictions/DATE-TIME-RUN): for each input image
masks/NAME.png (0/255, at the input's size), overlays/NAME.png (the scan with the predicted tumour in
red and, with --masks, the true one in green) and one row of predictions.csv. The preprocessing, the
image size, the threshold, the post-processing, the mirror averaging and the precision are the
run's own (from the trainer's code and the checkpoint), and so is the scoring against --masks.
"""
from __future__ import annotations

import json
import sys
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
from brain_tumor_segmentation import Config, UserError, setting  # noqa: E402


def training_setting(name: str, **rules):
    """A field that is also training's: the same default, help and rules."""
    return setting(Config.__dataclass_fields__[name].default, **{**Config.__dataclass_fields__[name].metadata, **rules})


@dataclass
class PredictConfig:
    inputs: list[str] = setting([], "image files and/or folders of images", positional=True, metavar="INPUT")
    model: str = setting("", "a finished run's folder (its model.pth: the best epoch), a checkpoint file, or an "
                             ".onnx file written by export.py")
    out: str = setting("", "the folder to create for the outputs (it must not exist); default: a new "
                           "predictions/DATE-TIME-RUN")
    masks: str = setting("", "folder of true masks (same file names): score each prediction on every metric")
    recursive: bool = setting(False, "also read the subfolders of input folders (and of --masks); outputs keep "
                                     "their relative paths")
    eval_batch_size: int = training_setting("eval_batch_size", aliases=("--batch-size",))
    device: str = training_setting("device")
    amp: Literal["run", "bf16", "fp16", "off"] = setting(
        "run", "precision; run: the one the run was tested at (float32 where this device lacks it)")

    def __post_init__(self):
        bts.check_fields(self)
        if not self.model:
            raise UserError("--model: name a finished run's folder (or its model.pth)")


def read_image(path: Path | str) -> np.ndarray:
    """Any PNG/JPEG/TIFF/BMP (gray or colour, 8 or 16 bit, float) -> float32 gray in [0, 1], original size."""
    return bts.decode_file(path, bts.gray_in_unit_range)[0]


def read_mask(path: Path | str) -> np.ndarray:
    """A mask file -> bool array at its original size (the trainer's tumour_pixels says how)."""
    return bts.decode_file(path, bts.tumour_pixels)[0]


def model_caveat(path: Path, state: dict) -> str:
    """Why a checkpoint that predict.py or export.py uses may predict worse than its run's test, or ''."""
    if state.get("optimizer") is not None:  # a resumable state
        return (f"{path} is the latest training state (epoch {state['epoch']}), not the best model: it predicts with "
                f"the untuned threshold {state['threshold']:.2f}; model.pth beside it holds the best epoch and the "
                f"threshold chosen on validation")
    if (Path(path).parent / "config.json").is_file() and not bts.is_finished(Path(path).parent):  # in a run's folder
        return (f"{path} is from an unfinished run (epoch {state['epoch']}, no metrics.json beside it): its threshold "
                f"{state['threshold']:.2f} and post-processing may not be chosen yet (--resume finishes it)")
    return ""


def predict(cfg: PredictConfig) -> list[dict]:
    """Segment every input image into a new folder: a mask at its own size, an overlay and a CSV row
    each (with scores when --masks has its mask). A failure leaves no partial folder behind."""
    bts.RUN_WARNINGS.clear()
    model_path = Path(cfg.model) / "model.pth" if Path(cfg.model).is_dir() else Path(cfg.model)
    probabilities, how, where = onnx_model(model_path) if model_path.suffix == ".onnx" else torch_model(model_path, cfg)
    if how["demo"]:
        bts.warn(f"{model_path} was trained on --demo's synthetic slices: its masks of real scans mean nothing")
    files = collect_inputs(cfg.inputs, cfg.recursive)
    truth = collect_inputs([cfg.masks], cfg.recursive, quiet=True) if cfg.masks else {}
    out = bts.new_folder(cfg.out, "predictions", model_path.resolve().parent.name, "predict")
    t0, written = time.time(), []
    try:
        rows = segment(probabilities, how, files, truth, cfg, out, written)
        if not rows:
            raise UserError("none of the inputs could be read; nothing was written")
        bts.save_csv(out / "predictions.csv", rows)
    except BaseException:
        bts.discard(out, [*written, "predictions.csv"])
        raise
    seconds = time.time() - t0
    skipped = len(files) - len(rows)
    bts.log(f"{len(rows)} images segmented in {seconds:.2f} s ({seconds / len(rows):.3f} s each) on {where}"
            + (f", {skipped} unreadable skipped" if skipped else "")
            + f"; masks, overlays and predictions.csv in {out}/")
    scored = [r for r in rows if "dice" in r]
    report_scores(scored)
    if cfg.masks and len(scored) < len(rows):
        bts.warn(f"{len(rows) - len(scored)} of the {len(rows)} segmented scans are not scored: their mask is missing "
                 f"from {cfg.masks}, unreadable, or of another size (warned above)")
    return rows


def torch_model(path: Path, cfg: PredictConfig):
    """A checkpoint's probabilities function (uint8 images (N,1,S,S) -> probabilities (N,S,S)), the
    settings it predicts with, and where it runs."""
    state = bts.load_checkpoint(path)
    device = bts.pick_device(cfg.device)
    machine = bts.Machine(device, run_precision(state, cfg.amp, device))
    model = bts.model_from_checkpoint(state, path, device)
    if model_caveat(path, state):
        bts.warn(model_caveat(path, state))
    how = {"image_size": state["config"]["image_size"], "threshold": float(state["threshold"]),
           "tta": bool(state["config"].get("tta", bts.BEFORE_FIELD_EXISTED["tta"])),
           "postprocess": state.get("postprocess", []), "demo": bool(state["config"].get("demo"))}

    def probabilities(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images)
        return bts.predict_probabilities(model, x, len(x), machine, flip=how["tta"]).cpu().numpy()[:, 0]

    return probabilities, how, f"{device}, {bts.precision_name(machine)}"


def onnx_model(path: Path):
    """The same for an .onnx file of export.py, run by onnxruntime on the CPU: no PyTorch computes."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"{path}: predicting with an .onnx file needs onnxruntime: pip install onnxruntime") from None
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        how = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    except Exception as e:  # onnxruntime raises its own kinds for files it cannot read
        raise UserError(f"{path}: not an ONNX model onnxruntime can load ({bts.first_line(e)})") from None
    if how.get("format") != "brain-tumor-segmentation-unet-onnx":
        raise UserError(f"{path}: not an ONNX file written by export.py (its metadata names no image size or threshold)")
    if how.get("caveat"):
        bts.warn(f"exported from a checkpoint with a caveat: {how['caveat']}")
    if how.get("tested_precision", "float32") != "float32":  # onnxruntime computes in float32
        bts.warn(f"{path} computes in float32, its run was tested in {how['tested_precision']}: a few pixels near "
                 f"the threshold can differ from predict.py --model on the run (--amp off there gives these masks)")

    def probabilities(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) / 255
        probs = session.run(None, {"images": x})[0]
        if how["tta"]:  # the mean with the mirror image's prediction, as in training's test
            probs = (probs + session.run(None, {"images": np.ascontiguousarray(x[..., ::-1])})[0][..., ::-1]) / 2
        return probs[:, 0]

    return probabilities, how, "CPU, onnxruntime, float32"


def run_precision(state: dict, amp: str, device: torch.device):
    """--amp run: the precision the run was tested at, so that predict --masks on the test images
    gives the test's Dice; else the precision named."""
    if amp != "run":
        return bts.precision(amp, device)[0]
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(state.get("precision", "float32"))
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return None
    return dtype


NOT_2D = {".nii": "a NIfTI volume", ".nii.gz": "a compressed NIfTI volume", ".dcm": "a DICOM file",
          ".mha": "a MetaImage volume", ".nrrd": "an NRRD volume"}


def not_2d(path: Path) -> str:
    """What a volume or DICOM file is, by its name ('' for anything else)."""
    name = path.name.lower()
    return next((what for ext, what in NOT_2D.items() if name.endswith(ext)), "")


def collect_inputs(inputs: list[str], recursive: bool = False, quiet: bool = False) -> dict[str, Path]:
    """Image files named directly or found in the named folders (and their subfolders with
    `recursive`), by name: a file's name without its extension, with its folder relative to the
    folder named, so that outputs keep the layout and equal names in two subfolders never collide.
    A second file of the same name is skipped."""
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            folders = [path, *sorted(p for p in path.rglob("*") if p.is_dir())] if recursive else [path]
            found += [(f, f.parent.relative_to(path)) for folder in folders for f in sorted(
                bts.list_images(folder).values(), key=lambda p: bts.name_order(p.stem))]
        elif path.is_file():
            found.append((path, Path()))
        else:
            raise UserError(f"{path}: no such file or folder")
    volumes = [f for item in inputs for f in ([Path(item)] if Path(item).is_file() else Path(item).glob(
        "**/*" if recursive else "*")) if not_2d(f) and not f.name.startswith(".")]
    if volumes:
        raise UserError(f"{volumes[0]}: {not_2d(volumes[0])}, which predict.py does not read: it reads 2D images "
                        f"(PNG, JPEG, TIFF, BMP); save the slices as PNG first")
    unique: dict[str, Path] = {}
    for f, folder in found:
        name = (folder / bts.image_name(f.name)).as_posix()
        if name in unique:
            bts.warn(f"{f}: same name as {unique[name]}, and outputs are named after the file; skipped")
        else:
            unique[name] = f
    if not unique:
        raise UserError(f"{', '.join(inputs)}: no {'masks' if quiet else 'images'} found (PNG, JPEG, TIFF or BMP)")
    return unique


def segment(probabilities, how: dict, files: dict, truth: dict, cfg: PredictConfig, out: Path, written: list) -> list:
    """Masks, overlays and CSV rows of the readable files (name -> path), written into `out` (each
    written file's name appended to `written`); the image size, threshold, post-processing and mirror
    averaging are the checkpoint's."""
    size, threshold, steps = how["image_size"], how["threshold"], how["postprocess"]
    rows, items = [], list(files.items())
    for start in tqdm(range(0, len(items), cfg.eval_batch_size), desc="predicting", unit="batch", leave=False):
        batch = []
        for name, f in items[start:start + cfg.eval_batch_size]:
            try:
                batch.append((name, f, read_image(f)))
            except ValueError as e:
                bts.warn(f"{e}; skipped")
        if not batch:
            continue
        probs = probabilities(np.stack([bts.preprocess_image(gray, size) for _, _, gray in batch])[:, None])
        for (name, f, gray), prob in zip(batch, probs):
            full = cv2.resize(prob, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
            mask = bts.postprocess(full[None], threshold, steps)[0]
            target = true_mask(name, f, gray.shape, truth, cfg.masks)
            for sub, picture in (("masks", mask.astype(np.uint8) * 255), ("overlays", make_overlay(gray, mask, target))):
                bts.save_png(out / sub / f"{name}.png", picture)
                written.append(f"{sub}/{name}.png")
            rows.append({"image": str(f), "width": gray.shape[1], "height": gray.shape[0],
                         "tumor_pixels": int(mask.sum()), "tumor_fraction": round(float(mask.mean()), 6),
                         "mean_probability": round(float(full[mask].mean()) if mask.any() else 0.0, 4),
                         **score(mask, target)})
    return rows


def true_mask(name: str, f: Path, shape: tuple, truth: dict, masks_dir: str) -> np.ndarray | None:
    """The --masks file of a scan as a bool mask at the scan's own size, or None (with a warning when
    --masks was given): a mask of another size than its scan is not scored."""
    if name not in truth:
        if masks_dir:
            bts.warn(f"{f.name}: no mask named {name}.* in {masks_dir}; no scores for it")
        return None
    try:
        target = read_mask(truth[name])
    except ValueError as e:
        bts.warn(f"{e}; no scores for {f.name}")
        return None
    if target.shape != tuple(shape[:2]):
        bts.warn(f"{truth[name]}: mask is {target.shape[1]}x{target.shape[0]} but its scan is {shape[1]}x{shape[0]}; "
                 f"no scores for {f.name}")
        return None
    return target


def score(mask: np.ndarray, target: np.ndarray | None) -> dict:
    """The METRICS and HD95 of the mask written against the true one, both at the scan's size: the
    numbers describe the files (the training test scores at the model's size instead)."""
    if target is None:
        return {}
    scores = bts.scores_from_counts([(mask & target).sum(), (mask & ~target).sum(), (~mask & target).sum()])
    hd = bts.hd95(mask, target)
    return {"scored_at": f"{mask.shape[1]}x{mask.shape[0]}", "true_tumor_pixels": int(target.sum()),
            **{name: round(float(v[0]), 5) for name, v in scores.items()},
            "hd95_px": round(hd, 3) if np.isfinite(hd) else ""}


def make_overlay(gray: np.ndarray, mask: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """The scan in gray with the predicted tumour tinted red and outlined in yellow, and the true one
    (if given) outlined in green (BGR, uint8)."""
    scan = cv2.cvtColor(np.clip(gray * 255 + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    tinted = scan.copy()
    tinted[mask] = (0, 0, 255)
    overlay = cv2.addWeighted(tinted, 0.35, scan, 0.65, 0)
    thickness = max(1, round(min(mask.shape) / 256))
    for outline, colour in ((target, (0, 200, 0)), (mask, (0, 255, 255))):
        if outline is not None:
            contours, _ = cv2.findContours(outline.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(overlay, contours, -1, colour, thickness)
    return overlay


def report_scores(scored: list[dict]) -> None:
    if scored and not any(r["true_tumor_pixels"] for r in scored):
        bts.warn(f"THE {len(scored)} --masks FILES HOLD NO TUMOUR PIXEL: the scores below only say whether anything "
                 f"was predicted, not how well tumours are outlined")
    if scored:
        hd = [r["hd95_px"] for r in scored if r["hd95_px"] != ""]
        bts.log(f"against {len(scored)} masks (mean over images, at each scan's own size): "
                + ", ".join(f"{name} {np.mean([r[name] for r in scored]):.4f}" for name in bts.METRICS)
                + (f", HD95 {np.mean(hd):.1f} px over {len(hd)} images" if hd else ""))


def main(argv: list[str] | None = None) -> int:
    return bts.run_tool(PredictConfig, predict, __doc__.split("\n\n")[0], "predict.py", argv)


if __name__ == "__main__":
    sys.exit(main())
