#!/usr/bin/env python3
"""Brain tumour segmentation from MRI: a U-Net trained end to end in one file.

    python brain_tumor_segmentation.py --demo            # offline, synthetic data, minutes on a CPU
    python brain_tumor_segmentation.py                   # the Kaggle dataset (downloaded if needed)
    python brain_tumor_segmentation.py --data-dir DIR    # any folder with images/ and masks/
    python brain_tumor_segmentation.py predict --model outputs/model.pth SCAN.png --out preds
    python brain_tumor_segmentation.py compare outputs/run1 outputs/run2   # did my change help?

Every constant is a field of `Config` below: edit a default there, or override it for one run on
the command line (`--epochs 5 --batch-size 8`); `--help` lists them all. Sections follow the data:
config, data and its download, the patient split, model, losses and metrics, checking the settings,
training steps, the machine, checkpoints, evaluation, plots, the runs table, the run, comparing
runs, prediction, command line. Each helper stands
above its first use; `train()` near the end reads as the whole run in a few named steps.

Measured (commands and details in bench/RESULTS.md; on 2 cores of an AMD EPYC with AVX-512 and
native bf16, PyTorch 2.14.1, 2026-11-26):
    make demo                  synthetic slices, 64x64, width 16, 12 epochs: test Dice 0.980
                               (95% CI 0.972-0.985) in 31.5 s start to finish (--amp auto chose bf16)
    bench/bench.py --amp bf16  256x256, width 32, batch 8: 5.49 training images/s, x2.14 the seed's
                               float32 DataLoader loop in the same run (float32 here: 2.39)
    bench/split_balance.py     patient split within 0.0012 of 70/20/10, tumour types within 0.0056
Not yet measured: anything on a GPU, and a full 20-epoch run at 256x256 on the real data.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# -----------------------------------------------------------------------------
# Config


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data
    data_dir: str = _f("", "folder with images/ and masks/; empty: ./data/brain-tumor-segmentation, "
                           "downloaded from Kaggle when missing")
    out_dir: str = _f("outputs", "where model.pth, metrics, split and visualizations/ go")
    demo: bool = _f(False, "train on a generated synthetic dataset (offline, minutes on a CPU)")
    demo_images: int = _f(600, "number of synthetic slices generated for --demo")
    limit: int = _f(0, "use only the first N image pairs (0: all); for quick experiments")
    image_size: int = _f(256, "images and masks are resized to this square size (multiple of 16)")
    split: str = _f("patient", "patient: no patient in two parts (patients.csv, --groups, or "
                               "similar neighbouring slices); random: by image, as the seed did")
    groups: str = _f("", "CSV with columns image,patient_id[,tumor_type] for your own data")
    val_fraction: float = _f(0.2, "fraction of the data for validation")
    test_fraction: float = _f(0.1, "fraction of the data for the final test")
    seed: int = _f(42, "seed of the split, the initial weights, the batch order and augmentation")
    folds: int = _f(0, "K >= 3: K-fold cross-validation over patients, one model per fold in OUT_DIR/fold_N "
                       "(the next fold validates); 0: one 70/20/10 split")
    fold: int = _f(-1, "with --folds: run only this fold (0-based); -1: all of them, then a summary")
    # model
    base_width: int = _f(32, "channels of the first encoder block; the U-Net doubles it 4 times")
    # training recipe
    recipe: str = _f("improved", "improved: per-image Dice+BCE, AdamW, one-cycle, augmentation, threshold "
                                 "tuned on validation, mirror averaging; seed: the original script's recipe "
                                 "exactly. Fields you set win")
    epochs: int = _f(20, "training epochs")
    batch_size: int = _f(16, "images per training step")
    lr: float = _f(2e-3, "learning rate (the peak one with --schedule onecycle)")
    optimizer: str = _f("adamw", "adam or adamw")
    weight_decay: float = _f(1e-4, "weight decay (decoupled with adamw)")
    schedule: str = _f("onecycle", "learning-rate schedule: constant or onecycle")
    loss: str = _f("dice+bce", "dice: the seed's batch Dice loss; dice+bce: per-image Dice plus BCE")
    smooth: float = _f(1.0, "smoothing term of the Dice loss")
    warmup_fraction: float = _f(0.3, "with --schedule onecycle: share of the steps spent warming up to lr")
    augment: bool = _f(True, "random flips, rotations, scaling and gamma, applied on the device")
    aug_flip: float = _f(0.5, "augmentation: probability of a left-right flip")
    aug_rotation: float = _f(15.0, "augmentation: largest rotation, in degrees either way")
    aug_scale: float = _f(0.1, "augmentation: zoom factor drawn log-uniformly in exp(+-aug_scale)")
    aug_gamma: float = _f(0.3, "augmentation: gamma drawn log-uniformly in exp(+-aug_gamma)")
    threshold: float = _f(0.5, "probability above which a pixel is tumour: in per-epoch validation, and in "
                               "the test and predict unless --tune-threshold replaces it after training")
    tune_threshold: bool = _f(True, "after training, pick the threshold with the best validation Dice")
    threshold_min: float = _f(0.2, "with --tune-threshold: the lowest threshold tried")
    threshold_max: float = _f(0.8, "with --tune-threshold: the highest threshold tried")
    threshold_step: float = _f(0.05, "with --tune-threshold: the step between thresholds tried")
    tta: bool = _f(True, "average each image's prediction with its left-right mirror's in the test, the "
                          "threshold choice and predict (not in per-epoch validation)")
    # machine
    device: str = _f("auto", "auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    amp: str = _f("auto", "mixed precision: auto (bf16 on CUDA, else fp16 with a scaler; on a CPU with "
                          "native bf16, bf16 when a short measurement at start-up shows it faster, else "
                          "float32), bf16, fp16 or off")
    channels_last: bool = _f(True, "channels-last memory format on CUDA")
    deterministic: bool = _f(False, "repeatable CUDA runs: deterministic kernels, no cuDNN autotuning (slower)")
    compile: str = _f("auto", "torch.compile the model: auto (on CUDA), on or off")
    compile_mode: str = _f("default", "torch.compile mode: default, reduce-overhead (CUDA graphs) or "
                                      "max-autotune (autotuned kernels and CUDA graphs; longer compile)")
    nan_check_every: int = _f(20, "on GPUs, check the loss for NaN every N steps (each check waits for the "
                                  "GPU); on a CPU every step is checked")
    eval_batch_size: int = _f(64, "images per step in validation, test and prediction")
    workers: int = _f(0, "threads that decode images once at start-up (0: one per CPU core, max 8)")
    # outputs and run control
    panel_images: int = _f(4, "validation images shown in the per-epoch prediction panel")
    test_samples: int = _f(10, "random test images in the final Original | Ground truth | Prediction panel")
    resume: str = _f("", "continue from a checkpoint: a path, or 'auto' for OUT_DIR/last.pth")
    overwrite: bool = _f(False, "allow a new run to replace the outputs of a previous run in OUT_DIR")


# The default recipe, `improved`, is the dataclass above: edit a field there and runs use it. Leaving
# out its loss, its optimizer and schedule, or its augmentation lowered validation Dice on two
# patient splits, and the mirror average raised it on both (bench/RESULTS.md).
# `--recipe seed` is the original script's recipe, kept to reproduce it: it sets these fields,
# except those given on the command line.
SEED_RECIPE = dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", loss="dice",
                   augment=False, tune_threshold=False, tta=False)
# --demo: a synthetic dataset small enough to train well in a few CPU minutes.
DEMO_DEFAULTS = dict(image_size=64, base_width=16, epochs=12, batch_size=16, out_dir="outputs/demo",
                     data_dir="data/synthetic-demo")
DEMO_MARKER = ".synthetic-demo"  # marks a folder --demo generated, and so may regenerate
KAGGLE_DATASET = "nikhilroxtomar/brain-tumor-segmentation"
KAGGLE_PAIRS = 3064  # image/mask pairs in that dataset, as patients.csv lists them
DEFAULT_DATA_DIR = "data/brain-tumor-segmentation"
PATIENTS_CSV = Path(__file__).resolve().parent / "patients.csv"
CHECKPOINT_FORMAT = "brain-tumor-segmentation-unet"
CHECKPOINT_VERSION = 1
# For checkpoints written before a field existed: the value that keeps their behaviour (not the
# current default, which may differ). Used by --resume and predict.
BEFORE_FIELD_EXISTED = {"tta": False}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


class UserError(Exception):
    """A problem the user can fix; printed as one message without a traceback."""


# -----------------------------------------------------------------------------
# Small utilities: messages, atomic writes


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(*args) -> None:
    if is_main_process():
        print(*args, flush=True)


def warn(message: str) -> None:
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path | str, write) -> None:
    """Write through `write(file)` to a temporary file, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with contextlib.suppress(AttributeError, OSError):  # no fchmod on Windows
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def strict_json(obj):
    """NaN and infinity, which strict JSON readers reject, become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def save_json(path, obj) -> None:
    text = json.dumps(strict_json(obj), indent=2, allow_nan=False)
    atomic_write(path, lambda f: f.write((text + "\n").encode()))


def save_csv(path, rows: list[dict]) -> None:
    """Rows as CSV; the columns are every key that appears, in order of first appearance."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def save_png(path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"could not encode {path} as PNG")
    atomic_write(path, lambda f: f.write(buf.tobytes()))


def save_figure(path, fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


# -----------------------------------------------------------------------------
# Data: find the pairs, decode each file once, keep the dataset as uint8 tensors


def decode_file(path: Path | str, convert) -> np.ndarray:
    """`convert` of the file's pixels as OpenCV decodes them (any depth and channels). Every way a
    read can fail (no permission, a folder, a corrupt or empty file, a header claiming a size the
    decoder refuses, pixels that memory cannot hold or convert) raises ValueError naming the file,
    so callers skip it with one warning."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # imdecode also copes with non-ASCII paths
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    except (cv2.error, MemoryError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[-1][:120]
        raise ValueError(f"{path}: the decoder refused it (too large, or a damaged header: {detail})") from None
    if image is None or image.size == 0:
        raise ValueError(f"{path}: not a readable image (corrupt, empty or unsupported format)")
    try:
        return convert(image)
    except MemoryError:
        raise ValueError(f"{path}: too large to convert in the memory there is") from None


def gray_in_unit_range(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        elif channels == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        else:
            image = image[:, :, 0]
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    image -= min(float(image.min()), 0.0)
    peak = float(image.max())
    return image / peak if peak > 0 else image


def read_image(path: Path | str) -> np.ndarray:
    """Any PNG/JPEG/TIFF/BMP (gray, RGB, RGBA, 8 or 16 bit) -> float32 gray in [0, 1], original size.

    8-bit images are divided by 255 as the seed did; 16-bit and float images by their own
    maximum, because their value range depends on the scanner. Raises ValueError when unreadable."""
    return decode_file(path, gray_in_unit_range)


def tumour_pixels(mask: np.ndarray) -> np.ndarray:
    if mask.ndim == 3:
        value = mask[:, :, :3].max(axis=2)
        if mask.shape[2] == 4:
            value = np.where(mask[:, :, 3] > 0, value, 0)
        mask = value
    values, counts = np.unique(mask[mask > 0], return_counts=True)
    if not len(values):
        return np.zeros(mask.shape, bool)
    lowest_level = values[counts >= 0.1 * counts.max()].min()
    return mask > lowest_level / 2


def read_mask(path: Path | str) -> np.ndarray:
    """A mask file -> bool array at its original size.

    A pixel's value is its strongest colour channel (gray, or the largest of red, green and blue;
    fully transparent pixels count as 0). The mask's levels are the non-zero values that cover at
    least a tenth of the area of the most common one: a lone stray value (JPEG noise, a slip of the
    brush) is not a level. A pixel is tumour when its value is above half the lowest level: 0/255
    and 0/1 masks, noisy or not, 16-bit ones, and masks with several labels (every label is tumour)."""
    return decode_file(path, tumour_pixels)


def preprocess_image(gray: np.ndarray, size: int) -> np.ndarray:
    """Float gray [0,1] at any size -> uint8 (size, size). Shared by training and prediction."""
    interpolation = cv2.INTER_AREA if gray.shape[0] > size else cv2.INTER_LINEAR
    resized = cv2.resize(gray, (size, size), interpolation=interpolation)
    return np.clip(resized * 255.0 + 0.5, 0, 255).astype(np.uint8)


def preprocess_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Bool mask at any size -> uint8 0/1 (size, size): area resize, re-binarized at 50%."""
    resized = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (resized >= 0.5).astype(np.uint8)


def _sort_key(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def folder_entries(folder: Path) -> list[Path]:
    """What a folder holds; a folder that cannot be read stops the run with one sentence."""
    try:
        return list(Path(folder).iterdir())
    except OSError as e:
        raise UserError(f"{folder}: cannot read this folder ({e.strerror or type(e).__name__}); check its "
                        f"permissions") from None


def list_images(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem; other files are ignored."""
    files = {}
    for path in sorted(folder_entries(folder)):
        if path.is_dir() and path.suffix.lower() in IMAGE_EXTENSIONS:
            warn(f"{path}: a folder, not an image; skipped")
        elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
            if path.stem in files:
                warn(f"{path}: another file has the same name {path.stem!r} ({files[path.stem].name}); "
                     f"skipped, keep one of them")
                continue
            files[path.stem] = path
    return files


def find_pairs(data_dir: Path | str) -> list[tuple[str, Path, Path]]:
    """(name, image path, mask path) for every image in images/ with a mask of the same name in masks/.

    A missing or empty folder stops the run; an image without a mask, or a mask without an
    image, is skipped with a warning."""
    data_dir = Path(data_dir)
    images_dir, masks_dir = data_dir / "images", data_dir / "masks"
    for folder in (data_dir, images_dir, masks_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: folder not found. The data folder must hold images/ and masks/ "
                            f"with one mask per image, of the same name.")
    images, masks = list_images(images_dir), list_images(masks_dir)
    if not images:
        raise UserError(f"{images_dir}: no images found (PNG, JPEG, TIFF or BMP)")
    if not masks:
        raise UserError(f"{masks_dir}: no masks found (PNG, JPEG, TIFF or BMP)")
    for name in sorted(set(images) - set(masks), key=_sort_key):
        warn(f"{images[name]}: no mask named {name}.* in {masks_dir}; image skipped")
    for name in sorted(set(masks) - set(images), key=_sort_key):
        warn(f"{masks[name]}: no image named {name}.* in {images_dir}; mask skipped")
    names = sorted(set(images) & set(masks), key=_sort_key)
    if not names:
        raise UserError(f"{data_dir}: no image in images/ has a mask of the same name in masks/")
    return [(name, images[name], masks[name]) for name in names]


def vanished_tumour(mask_path, mask: np.ndarray, resized: np.ndarray) -> str:
    """A warning when a mask with tumour pixels has none left at the training size, else ''."""
    if mask.any() and not resized.any():
        return (f"{mask_path}: its {int(mask.sum())} tumour pixels vanish at {resized.shape[0]}x{resized.shape[1]} "
                f"(re-binarized at 50% after resizing); it counts as tumour-free")
    return ""


def _load_pair(pair, size):
    """(name, (image, mask) or None when skipped, a warning or '')."""
    name, image_path, mask_path = pair
    try:
        image = read_image(image_path)
        mask = read_mask(mask_path)
    except ValueError as e:
        return name, None, f"{e}; pair {name} skipped"
    if image.shape != mask.shape:
        return name, None, (f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{image.shape[1]}x{image.shape[0]}; pair {name} skipped")
    try:
        resized = preprocess_mask(mask, size)
        return name, (preprocess_image(image, size), resized), vanished_tumour(mask_path, mask, resized)
    except MemoryError:
        return name, None, f"{image_path}: too large to resize in the memory there is; pair {name} skipped"


def load_dataset(data_dir: Path | str, size: int, limit: int = 0, workers: int = 0) -> dict:
    """Decode every pair once into uint8 tensors: images (N,1,S,S) 0..255, masks (N,1,S,S) 0/1.

    Unreadable files and size mismatches are skipped with a warning naming the file; nothing
    in the data folder is ever written."""
    pairs = find_pairs(data_dir)
    if limit:
        pairs = pairs[:limit]
    workers = workers or min(8, os.cpu_count() or 1)
    images, masks, names = [], [], []
    with ThreadPoolExecutor(workers) as pool:  # OpenCV releases the GIL while decoding
        results = pool.map(lambda p: _load_pair(p, size), pairs)
        for name, arrays, problem in tqdm(results, total=len(pairs), desc="decoding", unit="img",
                                          leave=False, disable=not is_main_process()):
            if problem:
                warn(problem)
            if arrays is None:
                continue
            names.append(name)
            images.append(arrays[0])
            masks.append(arrays[1])
    if not names:
        raise UserError(f"{data_dir}: none of the {len(pairs)} image/mask pairs could be read")
    if len(names) < len(pairs):
        warn(f"{len(pairs) - len(names)} of {len(pairs)} pairs skipped (see the warnings above)")
    mostly = [n for n, m in zip(names, masks) if m.mean() > 0.5]
    if mostly:
        warn(f"{len(mostly)} of {len(names)} masks are more than half tumour (for example {mostly[0]}): inverted "
             f"masks (tumour dark on a bright background)? Tumour must be the bright or coloured part")
    if not any(m.any() for m in masks):
        warn(f"NO TUMOUR PIXEL in any of the {len(names)} masks of {data_dir}: the model can only learn to "
             f"predict nothing, and its Dice will say nothing. Check the masks (tumour non-zero on black, "
             f"gray or colour)")
    return {"names": names,
            "images": torch.from_numpy(np.stack(images)).unsqueeze(1),
            "masks": torch.from_numpy(np.stack(masks)).unsqueeze(1)}


def make_synthetic_dataset(folder: Path | str, n: int, size: int = 128, seed: int = 0) -> Path:
    """Write n MRI-like slices and masks: a skull ring, textured brain, ventricles, noise and
    tumours of varied size, shape and contrast (about 15% of slices have none)."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def ellipse(cx, cy, ax, ay, angle):
        c, s = math.cos(angle), math.sin(angle)
        u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
        return (u / ax) ** 2 + (v / ay) ** 2

    def smooth_noise(scale, amplitude):
        noise = rng.standard_normal((size, size)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), scale)
        return noise / (noise.std() + 1e-6) * amplitude

    for i in range(n):
        head = ellipse(0.5 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02), rng.uniform(0.36, 0.44),
                       rng.uniform(0.41, 0.47), rng.uniform(-0.3, 0.3))
        brain = head < 0.78
        image = np.where(head < 1.0, 0.8, 0.0).astype(np.float32)  # skull and scalp
        image[brain] = 0.0
        image += brain * (0.38 + smooth_noise(size / 20, 0.06))
        ventricles = ellipse(0.5, 0.5 + rng.normal(0, 0.02), rng.uniform(0.03, 0.07), rng.uniform(0.08, 0.14),
                             rng.uniform(-0.2, 0.2)) < 1
        image[ventricles] = 0.12
        mask = np.zeros((size, size), bool)
        if rng.random() > 0.15:
            radius = rng.uniform(0.04, 0.14)
            angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.22)
            cx, cy = 0.5 + dist * math.cos(angle), 0.5 + dist * math.sin(angle)
            blob = ellipse(cx, cy, radius * rng.uniform(0.7, 1.3), radius * rng.uniform(0.7, 1.3),
                           rng.uniform(0, math.pi)) + smooth_noise(size / 25, 0.25)
            mask = (blob < 1) & brain
            contrast = rng.uniform(0.18, 0.5)
            ring = rng.random() < 0.3  # ring-enhancing tumours have a darker core
            core = blob < 0.45
            image[mask] = 0.38 + contrast
            if ring:
                image[mask & core] = 0.38 + contrast * 0.3
            image += mask * smooth_noise(size / 40, 0.04)
        image = cv2.GaussianBlur(image, (0, 0), 0.8) + rng.normal(0, 0.03, (size, size)).astype(np.float32)
        image *= rng.uniform(0.8, 1.15)  # scanners differ in overall brightness
        cv2.imwrite(str(folder / "images" / f"{i + 1}.png"), np.clip(image * 255, 0, 255).astype(np.uint8))
        cv2.imwrite(str(folder / "masks" / f"{i + 1}.png"), mask.astype(np.uint8) * 255)
    return folder


# -----------------------------------------------------------------------------
# Data: getting the Kaggle dataset (kagglehub, else the kaggle client)


def kaggle_credentials_found() -> bool:
    """Whether the `kaggle` client would find credentials (see NOTES: env vars, token, kaggle.json)."""
    if os.environ.get("KAGGLE_API_TOKEN") or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        return True
    folders = [os.environ.get("KAGGLE_CONFIG_DIR", ""), Path.home() / ".kaggle", Path.home() / ".config" / "kaggle"]
    return any(folder and (Path(folder) / name).is_file() for folder in folders
               for name in ("kaggle.json", "access_token"))


def download_failure(e: BaseException) -> str:
    """Why a download client failed, in words a user can act on."""
    network = (ConnectionError, TimeoutError)
    with contextlib.suppress(ImportError):  # both clients speak HTTP through requests
        import requests
        network += (requests.ConnectionError, requests.Timeout)
    if isinstance(e, ImportError):
        return (f"the Python package {e.name or 'it needs'} is missing: install the project's requirements "
                f"(pip install -r requirements.txt)")
    if isinstance(e, PermissionError):  # no or refused credentials, or a folder that cannot be written
        return str(e)
    if isinstance(e, network):
        return "no network: Kaggle could not be reached (name lookup or connection failed)"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return f"refused by Kaggle (HTTP {status}): the dataset asks for an account or for consent"
    if status is not None:
        return f"Kaggle answered HTTP {status}"
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


def fetch_with_kagglehub(folder: Path) -> None:
    """Way 1: kagglehub, no account needed for this public dataset."""
    import kagglehub
    kagglehub.dataset_download(KAGGLE_DATASET, output_dir=str(folder))


def fetch_with_kaggle(folder: Path) -> None:
    """Way 2: the kaggle client, which needs credentials."""
    if not kaggle_credentials_found():
        raise PermissionError("no Kaggle credentials (kaggle.json in ~/.kaggle, or KAGGLE_USERNAME and KAGGLE_KEY)")
    # `import kaggle` authenticates at import and calls exit(1) on failure, printing help.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi
            api = KaggleApi()
            api.authenticate()
        except SystemExit:
            raise PermissionError("the Kaggle credentials were not accepted") from None
    api.dataset_download_files(KAGGLE_DATASET, path=str(folder), unzip=True, quiet=False)


def check_kaggle_download(root: Path) -> None:
    """Refuse a partial or changed download: it must hold exactly the pairs 1..3064 (as patients.csv)."""
    expected = {str(i) for i in range(1, KAGGLE_PAIRS + 1)}
    images, masks = set(list_images(root / "images")), set(list_images(root / "masks"))
    if images != expected or masks != expected:
        missing = len(expected - (images & masks))
        raise UserError(f"{root}: {len(images)} images and {len(masks)} masks, but {KAGGLE_DATASET} has "
                        f"{KAGGLE_PAIRS} pairs named 1..{KAGGLE_PAIRS} ({missing} missing, "
                        f"{len((images | masks) - expected)} unexpected): a partial or changed download, "
                        f"not trained on. Delete {root} and run again to download it anew, or pass --data-dir")


def download_dataset(dest: Path) -> Path:
    """Download the Kaggle dataset into a temporary folder beside `dest`, check it, then move it into place.
    kagglehub first (no account needed), then the kaggle client (needs credentials)."""
    parent_created = not dest.parent.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    causes = []
    try:
        for way, fetch in (("kagglehub", fetch_with_kagglehub), ("kaggle", fetch_with_kaggle)):
            log(f"downloading {KAGGLE_DATASET} with {way} into {tmp} ...")
            try:
                fetch(tmp / way)
            except (Exception, SystemExit) as e:
                causes.append(f"{way}: {download_failure(e)}")
                if "no network" in causes[-1]:
                    break  # the other way needs the network too
                continue
            roots = [p.parent for p in sorted((tmp / way).rglob("images"))
                     if p.is_dir() and (p.parent / "masks").is_dir()]
            if not roots:
                raise UserError(f"the download of {KAGGLE_DATASET} has no images/ and masks/ folders; "
                                f"download it by hand and pass --data-dir")
            check_kaggle_download(roots[0])
            os.replace(roots[0], dest)
            log(f"dataset ready in {dest}")
            return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if parent_created and not dest.exists():
            with contextlib.suppress(OSError):
                dest.parent.rmdir()  # only if empty: a failed download leaves no trace
    raise UserError(f"the dataset is not at {dest} and could not be downloaded:\n  " + "\n  ".join(causes) +
                    f"\nWays forward:\n"
                    f"  1. with network, run again: kagglehub downloads {KAGGLE_DATASET} without an account\n"
                    f"  2. Kaggle credentials (kaggle.json in ~/.kaggle/, or KAGGLE_USERNAME and KAGGLE_KEY) "
                    f"for the kaggle client\n"
                    f"  3. download it by hand from https://www.kaggle.com/datasets/{KAGGLE_DATASET} and pass "
                    f"--data-dir DIR (a folder with images/ and masks/)\n"
                    f"  4. --demo: train on generated synthetic data, offline")


def resolve_data_dir(cfg: Config) -> Path:
    if cfg.demo:
        folder = Path(cfg.data_dir)
        marker = folder / DEMO_MARKER
        wanted = f"{cfg.demo_images} {cfg.seed}"
        if marker.is_file() and marker.read_text().strip() == wanted:
            return folder
        if folder.exists() and not marker.is_file():
            raise UserError(f"{folder}: --demo writes synthetic data there, but the folder exists and was not made "
                            f"by --demo; pass another --data-dir (it is never deleted or changed)")
        log(f"generating {cfg.demo_images} synthetic slices in {folder}")
        shutil.rmtree(folder, ignore_errors=True)  # only ever a folder that --demo made itself
        folder.mkdir(parents=True)
        marker.write_text("incomplete\n")  # written first: an interrupted generation is still ours
        make_synthetic_dataset(folder, cfg.demo_images, seed=cfg.seed)
        marker.write_text(wanted + "\n")
        return folder
    if cfg.data_dir:
        return Path(cfg.data_dir)
    if Path(DEFAULT_DATA_DIR).is_dir():  # downloaded by an earlier run: checked, never fetched again
        check_kaggle_download(Path(DEFAULT_DATA_DIR))
        return Path(DEFAULT_DATA_DIR)
    return download_dataset(Path(DEFAULT_DATA_DIR))


# -----------------------------------------------------------------------------
# Patient-level splits


def read_groups_csv(path: Path | str) -> dict[str, tuple[str, str]]:
    """image name -> (patient id, tumour type or '') from a CSV with image,patient_id[,tumor_type]."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets add a byte-order mark
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"{path}: cannot read the groups file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: the groups file is not UTF-8 text; save it as CSV (UTF-8)") from None
    except csv.Error as e:  # a field over the csv module's size limit, a NUL byte
        raise UserError(f"{path}: not a readable CSV groups file ({e}); save it as plain CSV") from None
    if not rows or not {"image", "patient_id"} <= set(rows[0]):
        raise UserError(f"{path}: a groups file needs the columns image,patient_id (and optionally tumor_type)")
    if any(not r["image"] or not r["patient_id"] for r in rows):
        raise UserError(f"{path}: every row needs an image and a patient_id")
    table = {}
    for r in rows:
        name, entry = Path(r["image"]).stem, (r["patient_id"], r.get("tumor_type") or "")
        if table.setdefault(name, entry) != entry:
            raise UserError(f"{path}: image {r['image']!r} is listed twice with different patients or types "
                            f"({table[name]} and {entry}); keep one row per image")
    return table


def neighbour_correlations(images: torch.Tensor, names: list[str]) -> tuple[list[int], np.ndarray]:
    """Images in name order, and the correlation of each one's 64x64 thumbnail with the previous one's."""
    order = sorted(range(len(names)), key=lambda i: _sort_key(names[i]))
    thumbs = F.interpolate(images[order].float(), size=(64, 64), mode="area").flatten(1)
    thumbs = thumbs - thumbs.mean(1, keepdim=True)
    thumbs = thumbs / thumbs.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return order, (thumbs[1:] * thumbs[:-1]).sum(1).numpy()


def group_by_similarity(images: torch.Tensor, names: list[str], min_corr: float = 0.8) -> list[str]:
    """Approximate patients: consecutive slices (by name) whose 64x64 thumbnails correlate
    above `min_corr` are put in one group. Neighbouring slices of one patient do so in most
    cases, of different patients rarely (see patients.csv's README)."""
    order, corr = neighbour_correlations(images, names)
    groups = [""] * len(names)
    for position, i in enumerate(order):
        groups[i] = f"similar-{int((corr[:position] < min_corr).sum())}"
    return groups


def table_fits_images(images: torch.Tensor, names: list[str], patients: list[str]) -> bool:
    """Whether a patient table describes these pixels: in the Figshare data, neighbouring slices
    of one patient correlate above 0.8 in 86% of cases, of two patients in 1%. Other data that
    merely has numbered files (the demo's, a user's) shows no such difference."""
    order, corr = neighbour_correlations(images, names)
    same = np.array([patients[a] == patients[b] for a, b in zip(order[:-1], order[1:])])
    if same.sum() < 2 or (~same).sum() < 1:
        return bool(same.sum()) or len(names) < 3  # too few slices to tell: trust the names
    return float((corr[same] > 0.8).mean() - (corr[~same] > 0.8).mean()) > 0.3


def find_groups(cfg: Config, names: list[str], images: torch.Tensor) -> tuple[list[str], list[str], str]:
    """Patient id and tumour type of each image, and a sentence saying where they came from."""
    if cfg.split == "random":
        return list(names), [""] * len(names), "random split by image (--split random)"
    table, source = {}, ""
    if cfg.groups:
        table, source = read_groups_csv(cfg.groups), cfg.groups
    elif PATIENTS_CSV.is_file():
        table, source = read_groups_csv(PATIENTS_CSV), "patients.csv of the Figshare dataset"
    if cfg.groups:
        missing = [n for n in names if n not in table]
        if missing:
            raise UserError(f"{cfg.groups}: no patient for {len(missing)} images, for example {missing[0]!r}")
    if table and all(n in table for n in names):
        patients = [table[n][0] for n in names]
        if cfg.groups or table_fits_images(images, names, patients):
            return patients, [table[n][1] for n in names], f"split by patient ({source})"
    groups = group_by_similarity(images, names)
    return groups, [""] * len(names), ("split by groups of similar neighbouring slices: APPROXIMATE, "
                                       "pass --groups FILE.csv with the patient of each image for an exact one")


def group_folds(groups: list[str], strata: list[str], n_folds: int, seed: int) -> np.ndarray:
    """The fold (0..n_folds-1) of each image: whole groups (patients), each stratum (tumour type)
    spread evenly over the folds, by scikit-learn's StratifiedGroupKFold."""
    from sklearn.model_selection import StratifiedGroupKFold
    if len(set(groups)) < n_folds:
        raise UserError(f"{len(set(groups))} patients/groups are too few for {n_folds} folds; add data or "
                        f"use --split random")
    fold = np.zeros(len(groups), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a tumour type rarer than the folds: spread as evenly as it goes
        for k, (_, members) in enumerate(splitter.split(np.zeros(len(groups)), strata, groups)):
            fold[members] = k
    return fold


def split_by_group(groups: list[str], strata: list[str], fractions: tuple[float, float], seed: int) -> dict:
    """Indices of train/val/test such that no group is in two parts and each stratum is split in
    the same proportions: 20 stratified group folds (fewer when there are fewer groups), the first
    ones test, the next ones validation, the rest training. `fractions` are (val, test)."""
    k = min(20, len(set(groups)))
    n_test, n_val = max(1, round(fractions[1] * k)), max(1, round(fractions[0] * k))
    if n_test + n_val >= k:
        raise UserError(f"{len(set(groups))} patients/groups are too few for a train/val/test split; "
                        f"add data or use --split random")
    fold = group_folds(groups, strata, k, seed)
    return {"train": np.flatnonzero(fold >= n_test + n_val).tolist(),
            "val": np.flatnonzero((fold >= n_test) & (fold < n_test + n_val)).tolist(),
            "test": np.flatnonzero(fold < n_test).tolist()}


def make_split(cfg: Config, data: dict) -> dict:
    """Train/val/test by group. With --folds K: fold --fold is the test part, the next fold
    validation, the other K-2 train."""
    groups, strata, how = find_groups(cfg, data["names"], data["images"])
    if cfg.folds > 1:
        fold = group_folds(groups, strata, cfg.folds, cfg.seed)
        test, val = cfg.fold % cfg.folds, (cfg.fold + 1) % cfg.folds
        parts = {"train": np.flatnonzero((fold != test) & (fold != val)).tolist(),
                 "val": np.flatnonzero(fold == val).tolist(), "test": np.flatnonzero(fold == test).tolist()}
        how += f"; fold {test + 1} of {cfg.folds} is the test part"
    else:
        parts = split_by_group(groups, strata, (cfg.val_fraction, cfg.test_fraction), cfg.seed)
    names = data["names"]
    split = {"how": how, "seed": cfg.seed}
    for part, idx in parts.items():
        split[part] = [names[i] for i in idx]
        split[f"{part}_patients"] = sorted({groups[i] for i in idx})
    split["groups"] = dict(zip(names, groups))
    split["tumor_types"] = {n: s for n, s in zip(names, strata) if s}
    return split


def group_unit(split: dict) -> str:
    """What the split's groups are: patients, or groups of similar slices standing in for them."""
    return "patients" if "by patient" in split["how"] else "groups"


def split_indices(split: dict, names: list[str]) -> dict[str, torch.Tensor]:
    position = {n: i for i, n in enumerate(names)}
    out = {}
    for part in ("train", "val", "test"):
        missing = [n for n in split[part] if n not in position]
        if missing:
            raise UserError(f"the split names {len(missing)} images that are not in the data folder "
                            f"(for example {missing[0]!r}): resume with the same --data-dir")
        out[part] = torch.tensor([position[n] for n in split[part]], dtype=torch.long)
    return out


# -----------------------------------------------------------------------------
# Model


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True))


class UNet(nn.Module):
    """U-Net: 4 encoder blocks 1->w->2w->4w->8w with max pooling, a 16w bottleneck (512 channels
    at 16x16 for w=32 and a 256x256 input), 4 decoder blocks that upsample with 2x2 transposed
    convolutions and concatenate the encoder features, and a 1x1 convolution to one logit."""

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()
        widths = [width * 2 ** i for i in range(4)]
        self.encoders = nn.ModuleList()
        channels = in_channels
        for w in widths:
            self.encoders.append(conv_block(channels, w))
            channels = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = conv_block(widths[-1], widths[-1] * 2)
        self.upsamples = nn.ModuleList(nn.ConvTranspose2d(w * 2, w, 2, stride=2) for w in reversed(widths))
        self.decoders = nn.ModuleList(conv_block(w * 2, w) for w in reversed(widths))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for upsample, decoder, skip in zip(self.upsamples, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


# -----------------------------------------------------------------------------
# Losses and metrics (always float32)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, per_image: bool = False):
    """The seed's loss, 1 - (2*sum(p*t) + smooth) / (sum(p^2) + sum(t^2) + smooth), on sigmoid
    probabilities; sums over the whole batch, or per image and then averaged."""
    p, t = torch.sigmoid(logits.float()), target.float()
    dims = (1, 2, 3) if per_image else (0, 1, 2, 3)
    intersection = (p * t).sum(dims)
    denominator = (p * p).sum(dims) + (t * t).sum(dims)
    return (1 - (2 * intersection + smooth) / (denominator + smooth)).mean()


# The training losses `--loss` chooses from: name -> function(logits, target, cfg). Adding a loss is
# one entry here (its name becomes a valid --loss).
LOSSES = {
    "dice": lambda logits, target, cfg: dice_loss(logits, target, cfg.smooth),
    "dice+bce": lambda logits, target, cfg: (dice_loss(logits, target, cfg.smooth, per_image=True)
                                             + F.binary_cross_entropy_with_logits(logits.float(), target.float())),
}


def compute_loss(logits, target, cfg: Config) -> torch.Tensor:
    return LOSSES[cfg.loss](logits, target, cfg)


def confusion_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image (N, 3): true positives, false positives, false negatives of binary masks."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    return torch.stack([tp, fp, fn], 1).double()


# The overlap metrics, as (numerator, denominator) of an image's true positive, false positive and
# false negative pixel counts. Each one is scored per image in the test (metrics.json, the per-image
# CSV, the by-type table) and in predict --masks; those in EPOCH_METRICS also after every epoch on
# validation (the log, the history, the curves). Adding a metric is one entry here.
METRICS = {
    "dice": lambda tp, fp, fn: (2 * tp, 2 * tp + fp + fn),
    "iou": lambda tp, fp, fn: (tp, tp + fp + fn),
    "precision": lambda tp, fp, fn: (tp, tp + fp),
    "recall": lambda tp, fp, fn: (tp, tp + fn),
}
EPOCH_METRICS = ("dice", "iou")  # "dice" must stay: the best epoch is the one with the best validation Dice


def scores_from_counts(counts: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per-image scores of every metric in METRICS from (N, 3) counts.

    Convention for empty masks: an empty ground truth with an empty prediction scores 1 on
    every metric, and any metric whose denominator is otherwise 0 scores 0 (so a prediction on
    a tumour-free slice, or a missed tumour, counts as a full miss). No image is skipped."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1, 3)
    tp, fp, fn = c[:, 0], c[:, 1], c[:, 2]
    both_empty = (tp + fp + fn) == 0

    def ratio(num, den):
        return np.where(both_empty, 1.0, np.divide(num, den, out=np.zeros_like(num), where=den > 0))

    return {name: ratio(*fraction(tp, fp, fn)) for name, fraction in METRICS.items()}


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels between two binary masks (as MONAI:
    the larger of the two directed 95th percentiles). NaN when both are empty, inf when one is."""
    pred, target = pred.astype(bool), target.astype(bool)
    if not pred.any() and not target.any():
        return float("nan")
    if not pred.any() or not target.any():
        return float("inf")

    def border(m):  # pixels outside the image count as background, so edge pixels are border
        eroded = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
        return m & ~eroded.astype(bool)

    def distances_to(m):  # distance of each pixel to the nearest border pixel of m
        return cv2.distanceTransform((~border(m)).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)

    d_pt = distances_to(target)[border(pred)]
    d_tp = distances_to(pred)[border(target)]
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def bootstrap_interval(values: np.ndarray, groups: list[str], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean over images, resampling whole groups (patients) with replacement."""
    keys = sorted(set(groups))
    index = {k: i for i, k in enumerate(keys)}
    g = np.array([index[x] for x in groups])
    sums = np.bincount(g, weights=values, minlength=len(keys))
    counts = np.bincount(g, minlength=len(keys)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(keys), size=(n, len(keys)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# -----------------------------------------------------------------------------
# Checking the settings


def check_batch_fits(cfg: Config, n_train: int) -> None:
    """Batch norm needs two values per channel: at 16x16 the bottleneck is 1x1, so a batch of one fails."""
    if n_train < 1:
        raise UserError("no training image for each process: add data, or run fewer processes")
    values = min(cfg.batch_size, max(n_train, 1)) * (cfg.image_size // 16) ** 2
    if values < 2:
        raise UserError(f"--image-size {cfg.image_size} with batches of {min(cfg.batch_size, n_train)} image: the "
                        f"bottleneck is 1x1 and batch norm needs 2 values; use --batch-size 2 or more (and at least "
                        f"2 training images), or --image-size 32")


def check_config(cfg: Config) -> None:
    """Every field of the right type and in range before anything is read, written or deleted."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), type(f.default)
        if not (type(value) is kind or (kind is float and type(value) is int)):
            raise UserError(f"--{f.name.replace('_', '-')} {value!r}: must be {kind.__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} {value}: must be a finite number")
    if not 0 <= cfg.seed < 2 ** 31:
        raise UserError(f"--seed {cfg.seed}: must be from 0 to 2147483647")
    if cfg.image_size > 4096:
        raise UserError(f"--image-size {cfg.image_size}: at most 4096 (the dataset's slices are 512x512)")
    for name, high in (("aug_rotation", 180), ("aug_scale", 1), ("aug_gamma", 2)):
        if getattr(cfg, name) > high:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: at most {high}")
    if cfg.image_size < 16 or cfg.image_size % 16:
        raise UserError(f"--image-size {cfg.image_size}: must be a multiple of 16 (the U-Net halves it 4 times)")
    if not 0 < cfg.val_fraction < 1 or not 0 < cfg.test_fraction < 1 or cfg.val_fraction + cfg.test_fraction >= 1:
        raise UserError("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
    choices = dict(split=("patient", "random"), recipe=("improved", "seed"), optimizer=("adam", "adamw"),
                   schedule=("constant", "onecycle"), loss=tuple(LOSSES),
                   amp=("auto", "bf16", "fp16", "off"), compile=("auto", "on", "off"),
                   compile_mode=("default", "reduce-overhead", "max-autotune"))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    if cfg.folds != 0 and cfg.folds < 3:
        raise UserError(f"--folds {cfg.folds}: must be 0 (one split) or at least 3 (test, validation and training folds)")
    if not -1 <= cfg.fold < max(cfg.folds, 1) or (cfg.fold >= 0 and not cfg.folds):
        raise UserError(f"--fold {cfg.fold}: must be -1 (all folds) or a fold number from 0 to --folds minus 1, "
                        f"with --folds")
    for name, low in (("epochs", 1), ("batch_size", 1), ("base_width", 1), ("eval_batch_size", 1),
                      ("demo_images", 10), ("panel_images", 0), ("test_samples", 0), ("workers", 0), ("limit", 0),
                      ("nan_check_every", 1), ("lr", 1e-12), ("weight_decay", 0), ("smooth", 0),
                      ("aug_rotation", 0), ("aug_scale", 0), ("aug_gamma", 0), ("threshold_step", 1e-6)):
        if getattr(cfg, name) < low:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be "
                            + ("above 0" if 0 < low < 1e-3 else f"at least {low}"))
    for name in ("threshold", "threshold_min", "threshold_max", "aug_flip", "warmup_fraction"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be between 0 and 1")
    if cfg.threshold_min > cfg.threshold_max:
        raise UserError("--threshold-min must not be above --threshold-max")
    check_batch_fits(cfg, cfg.batch_size)


# -----------------------------------------------------------------------------
# Training steps


def to_input(images_u8: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = images_u8.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def augment_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, cfg: Config):
    """Random left-right flip, rotation, scaling and gamma per image, on the device (the ranges are
    the aug_* fields). Left-right flips keep anatomy plausible; vertical ones would not. Written by
    hand because torchvision's transforms draw one set of parameters per call, not per image of a batch."""
    n = x.shape[0]

    def uniform(low, high):
        return torch.rand(n, device=x.device, generator=generator) * (high - low) + low

    angle = uniform(-math.radians(cfg.aug_rotation), math.radians(cfg.aug_rotation))
    scale = torch.exp(uniform(-cfg.aug_scale, cfg.aug_scale))
    flip = torch.where(uniform(0, 1) < cfg.aug_flip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos * flip, -sin, zero], 1), torch.stack([sin * flip, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    gamma = torch.exp(uniform(-cfg.aug_gamma, cfg.aug_gamma)).view(n, 1, 1, 1)
    return x.clamp(0, 1).pow(gamma), y


def learning_rate(cfg: Config, step: int, total_steps: int) -> float:
    """Constant, or one-cycle: linear warm-up over `warmup_fraction` of the steps to lr, cosine down to lr/1e4."""
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = max(1, int(cfg.warmup_fraction * total_steps))
    if step < warmup:
        return cfg.lr / 25 + (cfg.lr - cfg.lr / 25) * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.lr / 1e4 + (cfg.lr - cfg.lr / 1e4) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_order(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Shuffled indices of one epoch, as (steps, batch) for this process: deterministic in
    (seed, epoch), so a resumed run sees the same batches. The ragged remainder is dropped
    (a different one each epoch) to keep shapes fixed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    per_rank = n // world
    mine = perm[rank * per_rank:(rank + 1) * per_rank]
    steps = max(1, len(mine) // batch_size)
    if len(mine) < batch_size:  # tiny datasets: one smaller batch
        return mine.view(1, -1)
    return mine[:steps * batch_size].view(steps, batch_size)


class StopFlag:
    """Set by SIGINT/SIGTERM; training stops at the end of the current step. A second Ctrl-C
    interrupts at once."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # only the main thread can install handlers
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        log(f"\n{signal.Signals(signum).name} received: stopping after this step (again to abort)")

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def stop_requested(stop: StopFlag, world: int, device: torch.device) -> bool:
    """Whether any process got a stop signal: all stop at the same step."""
    if world == 1:
        return stop.signal is not None
    import torch.distributed as dist
    flag = torch.tensor([1.0 if stop.signal is not None else 0.0], device=device)
    dist.all_reduce(flag)
    return flag.item() > 0


class Interrupted(UserError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class NonFiniteLoss(UserError):
    pass


def check_finite(step_losses: torch.Tensor, first: int, last: int, epoch: int, out: Path, world: int = 1) -> None:
    """Stop, naming the first bad step, when a loss or gradient of steps first..last is NaN or inf
    (in any process: under torchrun all stop together)."""
    finite = torch.isfinite(step_losses[first:last + 1])
    if world > 1:
        finite = finite.float()
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        finite = finite.bool()
    bad = (~finite).nonzero()
    if len(bad):
        step = first + int(bad[0])
        raise NonFiniteLoss(f"the loss or its gradient became {float(step_losses[step])} at epoch {epoch + 1}, "
                            f"step {step + 1} (in this or another process); nothing was saved after that, so the "
                            f"checkpoints in {out} are from before it. Start anew with --overwrite and a lower --lr, "
                            f"or --amp off")


def forward_backward(model, optimizer, scaler, x, y, cfg: Config, dtype) -> torch.Tensor:
    """Loss and gradients of one batch; the caller then steps the optimizer. Returns the loss
    without a device sync, turned NaN when a gradient is not finite."""
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(x)
    loss = compute_loss(logits, y, cfg)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if scaler.is_enabled():  # a grad scaler skips steps with non-finite gradients by itself
        return loss.detach()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return loss.detach() + 0 * nn.utils.get_total_norm(grads)


def first_compiled_step(compiled_model, eager_model, model, optimizer, scaler, x, y, cfg: Config, dtype):
    """forward_backward through the compiled model, which compiles now. If that fails (no compiler,
    an unsupported GPU), warn, undo what the failed step changed and redo it without compiling.
    Returns the loss and the model to train with from then on."""
    # The backward pass compiles after the forward ran and moved the batch-norm statistics.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        return forward_backward(compiled_model, optimizer, scaler, x, y, cfg, dtype), compiled_model
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        warn(f"the first compiled step failed ({type(e).__name__}: {first_line}); redoing it and "
             f"training without torch.compile. Pass --compile off to skip the attempt.")
        model.load_state_dict(before)
        return forward_backward(eager_model, optimizer, scaler, x, y, cfg, dtype), eager_model


# -----------------------------------------------------------------------------
# The machine: device, precision, compile, optimizer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # libraries that say just "cuda" (torchsummary) mean this one
    return device


def setup_device(cfg: Config) -> tuple[torch.device, int, int]:
    """Device, rank and world size; under torchrun also joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(cfg.device)
    if world > 1:
        import torch.distributed as dist
        if device.type == "cuda":
            device = pick_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


@dataclass
class Machine:
    """Where and how the model runs; shared by training, evaluation and prediction."""
    device: torch.device
    dtype: torch.dtype | None = None  # autocast precision; None: float32
    channels_last: bool = False
    rank: int = 0
    world: int = 1


def cpu_has_native_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_is_faster_on_cpu(cfg: Config, steps: int = 2) -> tuple[bool, float, float]:
    """Time a few training steps of this run's U-Net (a copy, random data, batch 2) in float32 and
    under bf16 autocast, taking turns; returns (bf16 at least 5% faster, s/step float32, s/step bf16)."""
    model = UNet(width=cfg.base_width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.rand(2, 1, cfg.image_size, cfg.image_size)
    y = (x > 0.5).float()
    best = {None: math.inf, torch.bfloat16: math.inf}
    for i in range(steps + 1):
        for dtype in best:
            t0 = time.perf_counter()
            forward_backward(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), x, y, cfg, dtype)
            if i:  # the first turn warms up
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.bfloat16] < 0.95 * best[None], best[None], best[torch.bfloat16]


def amp_dtype(cfg: Config, device: torch.device):
    """The autocast precision; None means float32. On a CPU, auto measures (bf16_is_faster_on_cpu)."""
    if cfg.amp == "auto" and device.type == "cpu":
        if not cpu_has_native_bf16():
            return None
        faster, fp32, bf16 = bf16_is_faster_on_cpu(cfg)
        log(f"--amp auto on a CPU with native bf16 ({torch.backends.cpu.get_cpu_capability()}): a training step "
            f"took {fp32:.3f} s in float32, {bf16:.3f} s in bf16; using {'bf16' if faster else 'float32'}")
        return torch.bfloat16 if faster else None
    if cfg.amp == "off":
        return None
    # bf16 only where it is native (compute capability 8+); older GPUs would emulate it slowly.
    if cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.get_device_capability(device)[0] >= 8):
        return torch.bfloat16
    return torch.float16


def set_up_machine(cfg: Config) -> Machine:
    """The device (joining the process group under torchrun) and layout; logs the configuration.
    The precision comes later (choose_precision)."""
    device, rank, world = setup_device(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic  # autotuned kernels differ run to run
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
    log("configuration:\n" + "\n".join(f"  {k} = {v!r}" for k, v in dataclasses.asdict(cfg).items()))
    log(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                               f" ({torch.get_num_threads()} threads)") + (f", {world} processes" if world > 1 else ""))
    return Machine(device, None, cfg.channels_last and device.type == "cuda", rank, world)


def choose_precision(cfg: Config, machine: Machine, resume: dict | None) -> None:
    """Set machine.dtype: the resumed run's own, else amp_dtype's choice (on a CPU with --amp auto a
    measurement, taken once the data is known to be there)."""
    if resume and resume.get("precision") in ("bfloat16", "float16", "float32"):
        machine.dtype = None if resume["precision"] == "float32" else getattr(torch, resume["precision"])
        return
    machine.dtype = amp_dtype(cfg, machine.device)
    if machine.world > 1 and machine.device.type == "cpu" and cfg.amp == "auto":  # measurements may differ
        choice = torch.tensor([machine.dtype is not None], dtype=torch.float32)
        torch.distributed.broadcast(choice, 0)
        machine.dtype = torch.bfloat16 if choice.item() else None


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    opt_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # One kernel for all parameters: on a 2-core CPU 9 ms a step instead of 34 ms for the foreach version.
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    return opt_class(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def use_compile(cfg: Config, device: torch.device) -> bool:
    # Triton, which torch.compile uses on GPUs, needs compute capability 7.0 or newer.
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"
                                   and torch.cuda.get_device_capability(device) >= (7, 0))


def print_model_summary(model: nn.Module, cfg: Config, device: torch.device) -> None:
    from torchsummary import summary  # its device argument must match the model's (see NOTES)
    model.eval()  # its forward pass must not update the batch-norm statistics
    with contextlib.redirect_stdout(io.StringIO()) as text, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsummary 1.5.1 reads tensors that require grad
        summary(model, (1, cfg.image_size, cfg.image_size), device=device.type)
    print(text.getvalue(), flush=True)
    model.train()


# -----------------------------------------------------------------------------
# Checkpoints and the output folder


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def checkpoint_state(model, optimizer, scaler, cfg, split, history, epoch, step, extra) -> dict:
    """Everything needed to use or resume a model, as tensors and plain Python types only,
    so that torch.load(weights_only=True) can read it."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model": {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "config": dataclasses.asdict(cfg), "split": split, "history": history,
            "epoch": epoch, "step": step,
            # the threshold in use: config's, until --tune-threshold replaces it after training
            "threshold": cfg.threshold, **extra}


def saved_config(config: dict) -> Config:
    """A checkpoint's configuration as a Config; fields it predates get BEFORE_FIELD_EXISTED's values."""
    return Config(**{**BEFORE_FIELD_EXISTED, **{k: v for k, v in config.items() if k in Config.__dataclass_fields__}})


# What every checkpoint holds, and of which type (checked before any of it is used).
CHECKPOINT_TYPES = {"model": dict, "config": dict, "split": dict, "history": dict, "threshold": (int, float),
                    "epoch": int, "step": int}


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path | str) -> dict:
    """Load and check a checkpoint without running any code stored in it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about old pickle protocols before refusing
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            raw_pickle = f.read(1) == b"\x80"  # a bare pickle, not torch.save's zip: may hold code
        if "Unsupported global" in str(e) or raw_pickle:
            raise UserError(f"{path}: refused, it holds Python objects that could run code when loaded; "
                            f"only checkpoints written by this script can be used") from None
        raise UserError(f"{path}: not a PyTorch checkpoint (another kind of file)") from None
    except Exception as e:  # torch raises many kinds for damaged files: all mean the same to a user
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        detail = detail if len(detail) <= 120 else detail[:120].rsplit(" ", 1)[0] + " ..."
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated or another kind of "
                        f"file: {detail})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this script's U-Net")
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint format version {state.get('version')}, but this script reads "
                        f"version {CHECKPOINT_VERSION}; use the script version that wrote it")
    missing = [k for k in CHECKPOINT_TYPES if k not in state]
    if missing:
        raise UserError(f"{path}: incomplete checkpoint, {', '.join(missing)} missing")
    config = state["config"] if isinstance(state["config"], dict) else {}
    wrong = [k for k, kind in CHECKPOINT_TYPES.items() if not isinstance(state[k], kind) or isinstance(state[k], bool)]
    wrong += [f"config.{k}" for k in ("image_size", "base_width") if type(config.get(k)) is not int or config[k] < 1]
    if not wrong and not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        wrong.append("model")
    if wrong:
        raise UserError(f"{path}: damaged checkpoint, {', '.join(wrong)} of the wrong type; use another "
                        f"checkpoint, or train anew (--overwrite)")
    try:
        check_config(saved_config(config))
        problem = ("threshold not between 0 and 1" if not 0 <= state["threshold"] <= 1 else
                   "epoch or step below 0" if min(state["epoch"], state["step"]) < 0 else
                   "weights that are not finite" if not all(torch.isfinite(v).all() for v in state["model"].values()
                                                           if v.is_floating_point()) else "")
    except (UserError, TypeError) as e:
        problem = f"its settings are invalid: {e}"
    if problem:
        raise UserError(f"{path}: damaged checkpoint, {problem}; use another checkpoint, or train anew (--overwrite)")
    return state


def model_from_checkpoint(state: dict, path, device) -> nn.Module:
    model = UNet(width=state["config"]["base_width"])
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError):
        raise UserError(f"{path}: its weights do not fit this U-Net (saved with other channel widths "
                        f"or another architecture)") from None
    return model.to(device).eval()


RUN_OUTPUTS = ("model.pth", "last.pth", "metrics.json", "test_per_image.csv", "split.json", "config.json")
# What --resume may change; the rest of a resumed run's settings come from its checkpoint.
RESUMABLE_FIELDS = ("device", "workers", "eval_batch_size", "compile", "compile_mode", "data_dir", "panel_images",
                    "test_samples", "epochs")


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of writes a crash (kill -9) cut short: never read, safe to delete once the
    folder is ours."""
    for path in folder.rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def lock_file(path: Path):
    """An open file holding an exclusive lock on `path`, or UserError naming the owner. The lock is
    taken on the file that `path` names once it is held (a finished run may delete it meanwhile)."""
    while True:
        handle = open(path, "a+")
        try:
            import fcntl
        except ImportError:
            return handle
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{path.parent} is in use by another run ({owner}); wait for it to end, or choose "
                            f"another output folder") from None
        with contextlib.suppress(OSError):
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                return handle
        handle.close()  # locked a file that was deleted meanwhile: take the new one


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Own `folder` while writing into it: a second run into the same folder is refused. The
    operating system drops the lock when its process ends, by kill -9 too, so a crashed run leaves
    nothing stuck. (No such lock on Windows, which lacks fcntl.)"""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = lock_file(folder / ".lock")
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        remove_stale_temporaries(folder)
        yield
    finally:
        if created and [p.name for p in folder.iterdir()] == [".lock"]:  # a run that wrote nothing leaves nothing
            with contextlib.suppress(OSError):
                (folder / ".lock").unlink()
                folder.rmdir()
        handle.close()


def check_out_dir(cfg: Config) -> Path:
    """A new run never silently replaces an earlier run's model: it stops, before anything is read or
    deleted, unless --resume or --overwrite is given. Every state a crash can leave has a way on."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {out} is a file, not a folder; choose another --out-dir")
    data = Path(cfg.data_dir).resolve() if cfg.data_dir and not cfg.demo else None
    if data and (out.resolve() == data or data in out.resolve().parents):
        raise UserError(f"--out-dir {out} is inside the data folder {cfg.data_dir}: a run never writes into its data "
                        f"(and its runs.csv would land there too). Choose an --out-dir outside it")
    has_model, has_last = (out / "model.pth").exists(), (out / "last.pth").exists()
    if cfg.resume or cfg.overwrite or not (has_model or has_last):
        return out
    if has_last and (out / "metrics.json").exists():
        raise UserError(f"{out} holds a finished run (metrics.json). Train it further with --resume --epochs N (N "
                        f"above its epochs), pick another --out-dir, or replace it with --overwrite")
    if has_last:
        raise UserError(f"{out} already holds the outputs of an earlier run (last.pth). Continue it with "
                        f"--resume, pick another --out-dir, or replace it with --overwrite")
    raise UserError(f"{out} holds the model.pth of an earlier run but no last.pth (it stopped before its first "
                    f"resumable state was written), so --resume cannot continue it. Keep it and pick another "
                    f"--out-dir, or replace it with --overwrite")


def check_writable(out: Path) -> None:
    """Every folder a run writes into takes a file, before --overwrite deletes anything."""
    for folder in (out, out / "visualizations", out / "visualizations" / "epochs"):
        if folder.is_dir():
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-", suffix=".tmp"):
                pass


def clear_previous_outputs(out: Path) -> None:
    """--overwrite: delete the earlier run's outputs, once everything that can be checked was."""
    for name in RUN_OUTPUTS:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    shutil.rmtree(out / "visualizations", ignore_errors=True)


def resume_config(cfg: Config, explicit: frozenset, state: dict, path: Path) -> Config:
    """The checkpoint's configuration, with the few fields --resume may change that the user typed."""
    saved = saved_config(state["config"])
    ignored = sorted(explicit - set(RESUMABLE_FIELDS) - {"resume", "out_dir", "overwrite", "folds", "fold"})
    if ignored:
        warn(f"resuming with the checkpoint's settings: {', '.join('--' + k.replace('_', '-') for k in ignored)} "
             f"ignored (only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE_FIELDS)} can change)")
    keep = {k: getattr(cfg, k) for k in explicit if k in RESUMABLE_FIELDS}
    if "epochs" in keep and keep["epochs"] != saved.epochs and saved.schedule == "onecycle":
        warn(f"--epochs {keep['epochs']} (was {saved.epochs}): the one-cycle schedule is stretched to the new length, "
             f"so the learning rate jumps to where that schedule is at this epoch")
    # The run continues in the folder of the checkpoint it resumes.
    return dataclasses.replace(saved, **keep, resume=str(path), out_dir=str(path.parent))


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def logits_in_batches(model, images_u8: torch.Tensor, batch_size: int, machine: Machine):
    """Eval-mode logits of uint8 images, one batch at a time: yields (first index, logits)."""
    model.eval()
    for start in range(0, len(images_u8), batch_size):
        x = to_input(images_u8[start:start + batch_size], machine.device, machine.channels_last)
        with torch.autocast(machine.device.type, dtype=machine.dtype or torch.float32, enabled=machine.dtype is not None):
            yield start, model(x)


def predict_probabilities(model, images_u8: torch.Tensor, batch_size: int, machine: Machine, flip: bool = False):
    """Sigmoid probabilities (N,1,S,S) float32 for uint8 images, in eval mode, in large batches;
    with `flip`, the mean of the image's and its left-right mirror's (test-time augmentation)."""
    probs = torch.cat([torch.sigmoid(logits.float()) for _, logits in
                       logits_in_batches(model, images_u8, batch_size, machine)])
    if flip:
        mirrored = predict_probabilities(model, images_u8.flip(-1), batch_size, machine)
        probs = (probs + mirrored.flip(-1)) / 2
    return probs


def evaluate(model, machine: Machine, images, masks, indices, cfg: Config, threshold: float) -> dict:
    """Loss and the EPOCH_METRICS of one split part, each the mean over its images (summed over
    the processes under torchrun)."""
    mine = indices[machine.rank::machine.world].to(machine.device)
    targets = masks[mine]
    sums = dict.fromkeys(("loss", *EPOCH_METRICS), 0.0)
    for start, logits in logits_in_batches(model, images[mine], cfg.eval_batch_size, machine):
        y = targets[start:start + len(logits)]
        sums["loss"] += float(compute_loss(logits, y, cfg)) * len(y)
        scores = scores_from_counts(confusion_counts(torch.sigmoid(logits.float()) > threshold, y).cpu())
        for name in EPOCH_METRICS:
            sums[name] += scores[name].sum()
    totals = torch.tensor([*sums.values(), len(mine)], dtype=torch.float64, device=machine.device)
    if machine.world > 1:
        import torch.distributed as dist
        dist.all_reduce(totals)
    n = max(float(totals[-1]), 1.0)
    return {name: float(total) / n for name, total in zip(sums, totals)}


def tune_threshold(model, machine: Machine, images, masks, val_idx, cfg: Config) -> float:
    """The threshold of the grid threshold_min..threshold_max with the best validation Dice."""
    probs = predict_probabilities(model, images[val_idx.to(machine.device)], cfg.eval_batch_size, machine,
                                  flip=cfg.tta)
    target = masks[val_idx.to(machine.device)]
    candidates = np.round(np.arange(cfg.threshold_min, cfg.threshold_max + cfg.threshold_step / 2, cfg.threshold_step), 4)
    dice = [scores_from_counts(confusion_counts(probs > t, target).cpu())["dice"].mean() for t in candidates]
    return float(candidates[int(np.argmax(dice))])


def summarize(scores: dict[str, np.ndarray], counts: np.ndarray) -> dict:
    """Means over images of every metric; HD95 over the images where it is defined (None if none)."""
    hd = scores["hd95"][np.isfinite(scores["hd95"])]
    c = counts.sum(0)
    return {"images": int(len(counts)),
            **{k: float(scores[k].mean()) for k in METRICS},
            "hd95": float(hd.mean()) if len(hd) else None,
            "hd95_images": int(len(hd)),
            "pooled_dice": float(2 * c[0] / max(2 * c[0] + c[1] + c[2], 1))}


# -----------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no screen needed: servers and CI
    import matplotlib.pyplot as plt
    return plt


def plot_curves(path: Path, history: dict) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(history["epoch"], history["train_loss"], "o-", label="training loss")
    ax1.plot(history["epoch"], history["val_loss"], "o-", label="validation loss")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax1.legend()
    for name in EPOCH_METRICS:
        ax2.plot(history["epoch"], history[f"val_{name}"], "o-", label=f"validation {name}")
    ax2.set(xlabel="epoch", ylabel="score", title="Validation " + ", ".join(EPOCH_METRICS), ylim=(0, 1))
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    save_figure(path, fig)
    plt.close(fig)


def save_epoch_panel(path, model, machine: Machine, images_u8, masks_u8, cfg, title) -> None:
    """One row per validation image: Original | Ground truth | Prediction, written with OpenCV
    because it costs milliseconds, which matters once an epoch takes seconds on a GPU."""
    probs = predict_probabilities(model, images_u8, cfg.eval_batch_size, machine)
    model.train()
    scale = max(1, 256 // cfg.image_size)
    rows = []
    for img, gt, p in zip(images_u8.cpu().numpy()[:, 0], masks_u8.cpu().numpy()[:, 0], probs.cpu().numpy()[:, 0]):
        tiles = [cv2.resize(t, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
                 for t in (img, gt * 255, (p > cfg.threshold).astype(np.uint8) * 255)]
        gap = np.full((tiles[0].shape[0], 4), 96, np.uint8)  # gray lines keep the black tiles apart
        rows.append(np.hstack([tiles[0], gap, tiles[1], gap, tiles[2]]))
        rows.append(np.full((4, rows[-1].shape[1]), 96, np.uint8))
    panel = np.vstack(rows[:-1])
    header = np.zeros((28, panel.shape[1]), np.uint8)
    cv2.putText(header, title + "   (original | ground truth | prediction)", (6, 19), cv2.FONT_HERSHEY_SIMPLEX,
                0.5, 255, 1, cv2.LINE_AA)
    save_png(path, np.vstack([header, panel]))


def plot_samples(path, images, targets, preds, dice, names, which, title) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(len(which), 3, figsize=(8, 2.7 * len(which)), squeeze=False)
    for row, i in zip(axes, which):
        for ax, picture, label in zip(row, (images[i], targets[i], preds[i]), ("Original", "Ground truth", "Prediction")):
            ax.imshow(picture, cmap="gray", vmin=0, vmax=255 if picture.dtype == np.uint8 and picture.max() > 1 else 1)
            ax.set_title(f"{label}: {names[i]}" if label == "Original" else
                         f"{label}, Dice {dice[i]:.3f}" if label == "Prediction" else label, fontsize=9)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    save_figure(path, fig)
    plt.close(fig)


def plot_dice_histogram(path, dice: np.ndarray, mean: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(dice, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    ax.axvline(mean, color="tab:red", label=f"mean {mean:.3f}")
    ax.set(xlabel="Dice per test image", ylabel="images", title="Test Dice per image")
    ax.legend()
    save_figure(path, fig)
    plt.close(fig)


def plot_test_results(vis: Path, images_np, target_np, pred_np, dice: np.ndarray, names: list[str], cfg: Config):
    """Random test images, the worst ones, and the Dice histogram."""
    rng = np.random.default_rng(cfg.seed)
    sample = rng.choice(len(names), size=min(cfg.test_samples, len(names)), replace=False)
    worst = np.argsort(dice, kind="stable")[:min(cfg.test_samples, len(names))]
    if len(sample):
        plot_samples(vis / "test_samples.png", images_np, target_np, pred_np, dice, names, sample,
                     f"{len(sample)} random test images")
        plot_samples(vis / "worst_predictions.png", images_np, target_np, pred_np, dice, names, worst,
                     f"the {len(worst)} test images with the lowest Dice")
    plot_dice_histogram(vis / "test_dice_histogram.png", dice, float(dice.mean()))


# -----------------------------------------------------------------------------
# The runs table: one row per finished run, for comparing runs


# Settings that do not change what a run learns: left out of "what differs".
NOT_COMPARED = ("out_dir", "resume", "overwrite", "workers", "eval_batch_size", "panel_images", "test_samples",
                "device", "fold")


def changed_fields(config: dict, reference: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_COMPARED and k in reference and reference[k] != v}


def script_version() -> str:
    """The git commit of the script's checkout, when it is one, and the file's own sha256."""
    here = Path(__file__).resolve()
    digest = hashlib.sha256(here.read_bytes()).hexdigest()[:12]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here.parent, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        if commit:
            return f"git {commit}, sha256 {digest}"
    return f"sha256 {digest}"


def split_fingerprint(test_names: list[str]) -> str:
    """Runs tested on the same images share this; their Dice then compares image for image."""
    return hashlib.sha256("\n".join(sorted(test_names)).encode()).hexdigest()[:12]


def append_run_row(table: Path, row: dict) -> None:
    """Add one row to a runs table, rewriting it whole (atomically) under a lock that concurrent
    runs wait for, so that none of their rows is lost and the file is never half-written."""
    try:
        table.parent.mkdir(parents=True, exist_ok=True)
        with open(table.parent / f".{table.name}.lock", "a") as lock:
            with contextlib.suppress(ImportError):
                import fcntl
                fcntl.flock(lock, fcntl.LOCK_EX)
            rows = []
            if table.is_file():
                with open(table, newline="", encoding="utf-8") as f:
                    reader = csv.DictReader(f)
                    rows = list(reader)
                if not {"when", "run", "test_dice"} <= set(reader.fieldnames or []):
                    warn(f"{table} is not a runs table of this script: left as it is, and this run is not "
                         f"recorded in it")
                    return
            save_csv(table, rows + [row])
    except (OSError, UnicodeDecodeError, csv.Error) as e:  # the run itself is done: say so, do not fail it
        warn(f"this run could not be added to {table} ({getattr(e, 'strerror', None) or e}); its results are in "
             f"its own folder")


def run_row_start(cfg: Config, out: Path) -> dict:
    """The first columns of a runs.csv row: when, which folder, what differs from the defaults."""
    changed = changed_fields(dataclasses.asdict(cfg), dataclasses.asdict(Config()))
    return {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "run": str(out),
            "changed": "; ".join(f"{k}={v}" for k, v in changed.items())}


def record_run(run: Run, metrics: dict) -> None:
    """One row in runs.csv beside the run's folder: what differs from the defaults, and the results."""
    t, history = metrics["test"], run.history
    row = {**run_row_start(run.cfg, run.out),
           "best_epoch": metrics["best_epoch"], "best_val_dice": round(metrics["best_val_dice"], 5),
           "test_dice": round(t["dice"], 5), "test_dice_ci95_low": round(t["dice_ci95"][0], 5),
           "test_dice_ci95_high": round(t["dice_ci95"][1], 5),
           "dice_by_tumor_type": "; ".join(f"{k}={v['dice']:.4f}" for k, v in metrics["by_tumor_type"].items()),
           "test_split": metrics["test_split"],
           "images_per_second": round(float(np.mean(history["images_per_second"])), 2) if history["epoch"] else "",
           "seconds": round(metrics["total_seconds"], 1),
           "device": torch.cuda.get_device_name(run.machine.device) if run.machine.device.type == "cuda" else "cpu",
           "script": script_version()}
    append_run_row(run.out.resolve().parent / "runs.csv", row)


# -----------------------------------------------------------------------------
# The run: checks, set-up, one epoch at a time, validation and checkpoints, the test


NO_BEST = {"epoch": 0, "val_dice": -1.0}  # before the first epoch: any validation Dice is better
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", *(f"val_{m}" for m in EPOCH_METRICS), "lr", "epoch_seconds",
                "images_per_second")


@dataclass
class Run:
    """Everything a training run carries from step to step: set up once by `set_up_run`, then
    advanced by `train_one_epoch` and `end_epoch`. `epoch` and `step` say where training resumes."""
    cfg: Config
    out: Path
    machine: Machine
    names: list[str]
    images: torch.Tensor  # uint8 (N,1,S,S) on the training device
    masks: torch.Tensor
    split: dict
    idx: dict[str, torch.Tensor]
    model: nn.Module  # the raw model: checkpoints and evaluation
    train_model: nn.Module  # what the training steps call: compiled and/or DistributedDataParallel
    eager_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    compile_unproven: bool
    history: dict = field(default_factory=lambda: {k: [] for k in HISTORY_KEYS})
    best: dict = field(default_factory=lambda: dict(NO_BEST))
    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0  # the training loss summed over the steps of this epoch done so far

    @property
    def main(self) -> bool:
        return self.machine.rank == 0


def evaluate_test(model, run: Run, threshold: float) -> dict:
    """Per-image and pooled scores of every metric and HD95 on the test part, a 95% bootstrap
    interval over patients, a per-image CSV and the test plots."""
    cfg, test_idx = run.cfg, run.idx["test"]
    idx = test_idx.to(run.machine.device)
    probs = predict_probabilities(model, run.images[idx], cfg.eval_batch_size, run.machine, flip=cfg.tta)
    pred = (probs > threshold)
    target = run.masks[idx].bool()
    counts = confusion_counts(pred, target).cpu().numpy()
    scores = scores_from_counts(counts)
    pred_np, target_np = pred.cpu().numpy()[:, 0], target.cpu().numpy()[:, 0]
    scores["hd95"] = np.array([hd95(p, t) for p, t in zip(pred_np, target_np)])
    test_names = [run.names[i] for i in test_idx.tolist()]
    groups = [run.split["groups"].get(n, n) for n in test_names]
    types = np.array([run.split.get("tumor_types", {}).get(n, "") for n in test_names])
    summary = summarize(scores, counts)
    summary["patients"] = len(set(groups))
    summary["dice_ci95"] = list(bootstrap_interval(scores["dice"], groups, seed=cfg.seed))
    by_type = {t: summarize({k: v[types == t] for k, v in scores.items()}, counts[types == t])
               for t in sorted(set(types)) if t}
    rows = [{"image": n, "patient": g, "tumor_type": t, "gt_pixels": int(c[0] + c[2]), "pred_pixels": int(c[0] + c[1]),
             **{k: round(float(scores[k][i]), 5) for k in (*METRICS, "hd95")}}
            for i, (n, g, t, c) in enumerate(zip(test_names, groups, types, counts))]
    save_csv(run.out / "test_per_image.csv", rows)
    plot_test_results(run.out / "visualizations", run.images[idx].cpu().numpy()[:, 0], target_np, pred_np,
                      scores["dice"], test_names, cfg)
    metrics = {"test": summary, "by_tumor_type": by_type, "threshold": threshold, "tta": cfg.tta,
               "split": run.split["how"],
               "empty_masks": "an empty ground truth with an empty prediction scores 1 on every metric; "
                              "otherwise a zero denominator scores 0; HD95 is averaged over images where both "
                              "masks are non-empty, and is null when there is no such image",
               "hd95_unit": f"pixels at {cfg.image_size}x{cfg.image_size}"}
    if not target_np.any():
        metrics["warning"] = (f"the {len(test_names)} test images hold no tumour pixel at all: the Dice only says "
                              f"whether anything was predicted, not how well tumours are outlined")
        warn("THE TEST SET HOLDS NO TUMOUR PIXEL: " + metrics["warning"])
    return metrics


def check_best_model(state: dict, path: Path, epochs: int) -> None:
    """A resumed run needs the model.pth its state says was saved: if a crash or a user removed or
    damaged it, the best model is chosen anew from the epochs still to run."""
    best_path = path.parent / "model.pth"
    if state["best"]["epoch"] < 1:
        return
    try:
        load_checkpoint(best_path)
        return
    except UserError:
        problem = f"{best_path} is missing or damaged"
    if state["epoch"] >= epochs:
        raise UserError(f"{problem}, and its run has no epoch left to choose a best model from: train on with "
                        f"--resume --epochs {state['epoch'] + 1} or more, start anew with --overwrite (without "
                        f"--resume), or pick another --out-dir")
    warn(f"{problem}: the best model is chosen anew from the epochs still to run")
    state["best"] = dict(NO_BEST)


def resumed_state(cfg: Config, explicit: frozenset) -> tuple[Config, dict | None]:
    """With --resume: the checkpoint to continue and its configuration; else (cfg, None). Each
    state a crash can leave is either continued or answered with the way forward."""
    if not cfg.resume:
        return cfg, None
    path = Path(cfg.out_dir) / "last.pth" if cfg.resume == "auto" else Path(cfg.resume)
    if path.is_dir():
        path = path / "last.pth"
    anew = f"start anew there with --overwrite (without --resume), or pick another --out-dir"
    if not path.exists():
        hint = (f"; {path.parent} holds only model.pth, which cannot be continued: {anew}"
                if (path.parent / "model.pth").exists() else "; start a new run without --resume")
        raise UserError(f"{path}: no resumable state (last.pth) to continue" + hint)
    try:
        state = load_checkpoint(path)
    except UserError as e:
        if "format version" in str(e):
            raise
        raise UserError(f"{e}. It cannot be continued: {anew}") from None
    if state.get("optimizer") is None or "epoch_loss_sum" not in state:
        last = path.parent / "last.pth"
        raise UserError(f"{path}: a best-model file, not a resumable state; " + (
            f"resume from {last}" if last.is_file() else f"{path.parent} has no last.pth: {anew}"))
    resumable = {"optimizer": dict, "epoch_loss_sum": (int, float), "best": dict, "world": int}
    wrong = [k for k, kind in resumable.items() if not isinstance(state.get(k, 1), kind)]
    wrong += [k for k in ("train", "val", "test") if not isinstance(state["split"].get(k), list)]
    wrong += [k for k, v in state["history"].items() if not isinstance(v, list)]
    if not wrong and not (isinstance(state["best"].get("epoch"), int) and
                          isinstance(state["best"].get("val_dice"), (int, float))):
        wrong.append("best")
    if wrong:
        raise UserError(f"{path}: damaged checkpoint ({', '.join(wrong)}); it cannot be continued: {anew}")
    cfg = resume_config(cfg, explicit, state, path)
    check_best_model(state, path, cfg.epochs)
    log(f"resuming {path} at epoch {state['epoch'] + 1}, step {state['step']}")
    return cfg, state


def load_data_and_split(cfg: Config, machine: Machine, resume: dict | None) -> tuple[dict, dict, dict]:
    """The dataset decoded once, and its split (the checkpoint's when resuming)."""
    if machine.rank == 0:  # one process downloads or generates; the others wait, then read
        data_dir = resolve_data_dir(cfg)
    if machine.world > 1:
        torch.distributed.barrier()
    if machine.rank != 0:
        data_dir = resolve_data_dir(cfg)
    t0 = time.time()
    data = load_dataset(data_dir, cfg.image_size, cfg.limit, cfg.workers)
    split = resume["split"] if resume else make_split(cfg, data)
    idx = split_indices(split, data["names"])
    log(f"data: {len(data['names'])} pairs from {data_dir} at {cfg.image_size}x{cfg.image_size}, decoded in "
        f"{time.time() - t0:.1f} s; {split['how']}")
    unit = group_unit(split)
    log(f"split: train {len(idx['train'])} images ({len(split['train_patients'])} {unit}), val "
        f"{len(idx['val'])} ({len(split['val_patients'])}), test {len(idx['test'])} ({len(split['test_patients'])})")
    check_batch_fits(cfg, len(idx["train"]) // machine.world)
    return data, split, idx


def set_up_run(cfg: Config, machine: Machine, resume: dict | None) -> Run:
    """Data and split, the earlier outputs replaced (--overwrite: only now, once everything
    above was checked), the model, optimizer and precision, and the resumed state."""
    out = Path(cfg.out_dir)
    data, split, idx = load_data_and_split(cfg, machine, resume)
    if machine.rank == 0:
        check_writable(out)
        if cfg.overwrite and not cfg.resume:
            clear_previous_outputs(out)
        save_json(out / "config.json", dataclasses.asdict(cfg))
        save_json(out / "split.json", split)
    choose_precision(cfg, machine, resume)
    torch.manual_seed(cfg.seed)
    model = UNet(width=cfg.base_width).to(machine.device)
    if machine.rank == 0:
        print_model_summary(model, cfg, machine.device)
    if machine.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg, machine.device)
    scaler = torch.amp.GradScaler(machine.device.type, enabled=machine.dtype == torch.float16)
    eager_model = model
    if machine.world > 1:
        device_ids = [machine.device.index] if machine.device.type == "cuda" else None
        eager_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    compiled = use_compile(cfg, machine.device)
    log(f"precision: {machine.dtype or torch.float32}, channels-last: {machine.channels_last}, "
        f"compiled: {cfg.compile_mode if compiled else False}")
    run = Run(cfg, out, machine, data["names"], data["images"].to(machine.device), data["masks"].to(machine.device),
              split, idx, model, torch.compile(eager_model, mode=cfg.compile_mode) if compiled else eager_model,
              eager_model, optimizer, scaler,
              # A missing compiler or an unsupported GPU shows at the first compiled step, which is then
              # redone without compiling. Under DDP a retry by one rank alone would hang the others.
              compile_unproven=compiled and machine.world == 1)
    if resume:
        try:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            if resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{cfg.resume}: its saved weights or optimizer state do not fit this model "
                            f"({type(e).__name__}); it cannot be continued: start anew with --overwrite "
                            f"(without --resume), or pick another --out-dir") from None
        run.history, run.best = resume["history"], resume["best"]
        run.epoch, run.step, run.loss_sum = resume["epoch"], resume["step"], resume["epoch_loss_sum"]
    return run


def training_step(run: Run, batch: torch.Tensor, global_step: int, total_steps: int) -> torch.Tensor:
    """One optimizer step on a batch of training indices; returns its loss, still on the device."""
    cfg, m = run.cfg, run.machine
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, global_step, total_steps)
    x = to_input(run.images[batch], m.device, m.channels_last)
    y = run.masks[batch].float()
    if cfg.augment:
        g = torch.Generator(device=m.device).manual_seed((cfg.seed * 7919 + global_step) * m.world + m.rank)
        x, y = augment_batch(x, y, g, cfg)
    if run.compile_unproven:
        run.compile_unproven = False
        loss, run.train_model = first_compiled_step(run.train_model, run.eager_model, run.model, run.optimizer,
                                                    run.scaler, x, y, cfg, m.dtype)
        return loss
    return forward_backward(run.train_model, run.optimizer, run.scaler, x, y, cfg, m.dtype)


def train_one_epoch(run: Run, stop: StopFlag) -> tuple[torch.Tensor, int, bool]:
    """The steps of epoch `run.epoch` from `run.step` on. Returns the per-step losses, the images
    seen, and whether a stop signal came (run.step is then where it stopped)."""
    cfg, m = run.cfg, run.machine
    n_train = len(run.idx["train"])
    order = batch_order(n_train, cfg.batch_size, cfg.seed, run.epoch, m.rank, m.world)
    total_steps = cfg.epochs * len(order)
    train_idx = run.idx["train"].to(m.device)
    if run.step > len(order):
        raise UserError(f"{run.cfg.resume}: the resumed state is at step {run.step} of an epoch of {len(order)} "
                        f"steps: damaged, or saved with other data or batch size; start anew with --overwrite")
    step_losses = torch.zeros(len(order), device=m.device)
    run.model.train()
    first, seen = run.step, 0
    bar = tqdm(total=len(order) * order.shape[1] * m.world, initial=first * order.shape[1] * m.world,
               desc=f"epoch {run.epoch + 1}/{cfg.epochs}", unit="img", dynamic_ncols=True, leave=False,
               mininterval=1, disable=not run.main)
    stopped = False
    for step in range(first, len(order)):
        step_losses[step] = training_step(run, train_idx[order[step].to(m.device)], run.epoch * len(order) + step,
                                          total_steps)
        last = step == len(order) - 1
        # Reading the loss waits for the device: on a GPU only every nan_check_every steps (on a CPU
        # every step, so that bad numbers never reach the weights).
        if m.device.type == "cpu" or step % cfg.nan_check_every == 0 or last:
            check_finite(step_losses, first, step, run.epoch, run.out, m.world)
            bar.set_postfix(loss=f"{float(step_losses[step]):.4f}", refresh=False)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        seen += order.shape[1] * m.world
        bar.update(order.shape[1] * m.world)
        run.step = step + 1
        if (m.world == 1 or step % 20 == 0 or last) and stop_requested(stop, m.world, m.device):
            stopped = True
            break
    bar.close()
    check_finite(step_losses, first, run.step - 1, run.epoch, run.out, m.world)
    run.loss_sum += float(step_losses[first:run.step].sum())
    return step_losses, seen, stopped


def save_last(run: Run) -> None:
    """last.pth: the state --resume continues from (rank 0 only)."""
    if run.main:
        save_checkpoint(run.out / "last.pth", checkpoint_state(
            run.model, run.optimizer, run.scaler, run.cfg, run.split, run.history, run.epoch, run.step,
            {"epoch_loss_sum": run.loss_sum, "best": run.best, "world": run.machine.world,
             "precision": str(run.machine.dtype or torch.float32).removeprefix("torch.")}))


def end_epoch(run: Run, steps: int, seen: int, seconds: float) -> None:
    """Validate, record the history, keep the best model.pth, write last.pth and the plots."""
    cfg = run.cfg
    if run.machine.world > 1:  # each process's batch-norm statistics saw its own last batches: take rank 0's
        for buffer in run.model.buffers():
            torch.distributed.broadcast(buffer, 0)
    val = evaluate(run.model, run.machine, run.images, run.masks, run.idx["val"], cfg, cfg.threshold)
    record = {"epoch": run.epoch + 1, "train_loss": run.loss_sum / steps, "val_loss": val["loss"],
              **{f"val_{m}": val[m] for m in EPOCH_METRICS}, "lr": run.optimizer.param_groups[0]["lr"],
              "epoch_seconds": seconds, "images_per_second": seen / seconds}
    for key in HISTORY_KEYS:
        run.history.setdefault(key, []).append(record[key])
    improved = val["dice"] > run.best["val_dice"]
    if improved:
        run.best = {"epoch": run.epoch + 1, "val_loss": val["loss"], **{f"val_{m}": val[m] for m in EPOCH_METRICS}}
    log(f"epoch {run.epoch + 1:3d}/{cfg.epochs}  train loss {record['train_loss']:.4f} | val loss {val['loss']:.4f} "
        + " ".join(f"{m} {val[m]:.4f}" for m in EPOCH_METRICS) + f" | {seconds:.1f} s, {seen / seconds:.1f} img/s"
        + ("  * best, saved" if improved else ""))
    run.epoch, run.step, run.loss_sum = run.epoch + 1, 0, 0.0
    if not run.main:
        return
    if improved:
        save_checkpoint(run.out / "model.pth", checkpoint_state(
            run.model, None, None, cfg, run.split, run.history, run.epoch, 0, {"best": run.best}))
    save_last(run)
    panel = run.idx["val"][torch.randperm(len(run.idx["val"]), generator=torch.Generator().manual_seed(cfg.seed))
                           [:cfg.panel_images]].to(run.machine.device)
    if len(panel):
        save_epoch_panel(run.out / "visualizations" / "epochs" / f"epoch_{run.epoch:03d}.png", run.model,
                         run.machine, run.images[panel], run.masks[panel], cfg,
                         f"epoch {run.epoch}: val Dice {val['dice']:.3f}")
    plot_curves(run.out / "visualizations" / "loss_curves.png", run.history)


def finish_run(run: Run, t_start: float) -> dict:
    """The best epoch's weights: the threshold chosen on validation, then one evaluation on the test part."""
    cfg, out = run.cfg, run.out
    state = load_checkpoint(out / "model.pth")
    best_model = model_from_checkpoint(state, out / "model.pth", run.machine.device)
    threshold = cfg.threshold
    if cfg.tune_threshold:
        threshold = tune_threshold(best_model, run.machine, run.images, run.masks, run.idx["val"], cfg)
        state["threshold"] = threshold
        save_checkpoint(out / "model.pth", state)
        log(f"threshold chosen on validation: {threshold:.2f}")
    metrics = evaluate_test(best_model, run, threshold)
    # From model.pth itself: after a crash between its write and last.pth's, `best` would be older.
    metrics.update(best_epoch=state["best"]["epoch"], best_val_dice=state["best"]["val_dice"],
                   total_seconds=time.time() - t_start, history=run.history,
                   test_split=split_fingerprint(run.split["test"]))
    save_json(out / "metrics.json", metrics)
    record_run(run, metrics)
    t = metrics["test"]
    unit = group_unit(run.split)
    log(f"test ({t['images']} images, {t['patients']} {unit}): Dice {t['dice']:.4f} [95% CI {t['dice_ci95'][0]:.4f}-"
        f"{t['dice_ci95'][1]:.4f}], " + ", ".join(f"{name} {t[name]:.4f}" for name in METRICS if name != "dice")
        + (f", HD95 {t['hd95']:.1f} px" if t["hd95"] is not None else ", HD95 undefined (no image where both "
                                                                         "masks have tumour)"))
    log(f"outputs in {out}/: model.pth, last.pth, metrics.json, test_per_image.csv, split.json, config.json, "
        f"visualizations/  ({time.time() - t_start:.1f} s in all)")
    return metrics


def interrupted(run: Run, stop: StopFlag) -> Interrupted:
    launcher = f"torchrun --nproc_per_node={run.machine.world}" if run.machine.world > 1 else "python"
    in_cross_validation = run.cfg.folds and run.out.name == f"fold_{run.cfg.fold + 1}"
    folder = run.out.parent if in_cross_validation else run.out
    return Interrupted(f"stopped at epoch {run.epoch + 1}, step {run.step}; {run.out / 'last.pth'} holds the run. "
                       f"Continue it with:\n  {launcher} {Path(sys.argv[0]).name} --resume --out-dir {folder}"
                       + (f" --folds {run.cfg.folds}" if in_cross_validation else ""),
                       code=130 if stop.signal == signal.SIGINT else 143)


def train(cfg: Config, explicit: frozenset = frozenset()) -> dict:
    """The whole pipeline: data, split, training with validation, test evaluation, plots.
    `explicit` names the fields typed on the command line. Returns the test metrics."""
    t_start = time.time()
    cfg, resume = resumed_state(cfg, explicit)
    check_config(cfg)
    out = check_out_dir(cfg)
    machine = set_up_machine(cfg)
    if resume and resume["step"] and resume.get("world", 1) != machine.world:
        raise UserError(f"{cfg.resume} stopped in the middle of an epoch with {resume.get('world', 1)} "
                        f"processes; resume it with that many (the batches of an epoch depend on it)")
    with folder_lock(out) if machine.rank == 0 else contextlib.nullcontext():
        run = set_up_run(cfg, machine, resume)
        with StopFlag() as stop:
            while run.epoch < cfg.epochs:
                t_epoch = time.time()
                step_losses, seen, stop_asked = train_one_epoch(run, stop)
                if run.step < len(step_losses):  # stopped within the epoch
                    save_last(run)
                else:
                    end_epoch(run, len(step_losses), seen, time.time() - t_epoch)  # writes last.pth too
                if stop_asked and run.epoch < cfg.epochs:
                    sys.stdout.flush()
                    raise interrupted(run, stop)
        metrics = finish_run(run, t_start) if run.main else {}  # the test evaluation runs on rank 0 alone
        if machine.world > 1:  # leave together: a process that exits early can abort the others' shutdown
            torch.distributed.barrier()
        return metrics


def cross_validate(cfg: Config, explicit: frozenset = frozenset()) -> dict:
    """One model per fold in OUT_DIR/fold_N, then the mean and spread of the test Dice. With
    --resume, finished folds are kept, an interrupted one continues, and folds not yet begun
    take the settings of the first fold. Each fold's own run replaces its earlier outputs
    (--overwrite) only once it has checked everything."""
    out, results = Path(cfg.out_dir), []
    for k in range(cfg.folds):
        fold_cfg = dataclasses.replace(cfg, fold=k, out_dir=str(out / f"fold_{k + 1}"))
        fold_out = Path(fold_cfg.out_dir)
        if cfg.resume and (fold_out / "metrics.json").is_file():
            log(f"fold {k + 1}: done already, kept")
            results.append(json.loads((fold_out / "metrics.json").read_text()))
            continue
        if cfg.resume and (fold_out / "last.pth").is_file():
            fold_cfg = dataclasses.replace(fold_cfg, resume=str(fold_out / "last.pth"))
        elif cfg.resume:
            first = out / "fold_1" / "last.pth"
            if first.is_file():
                saved = resume_config(cfg, explicit, load_checkpoint(first), first)
                fold_cfg = dataclasses.replace(saved, fold=k, out_dir=str(fold_out))
            fold_cfg = dataclasses.replace(fold_cfg, resume="")
        log(f"=== fold {k + 1} of {cfg.folds} ===")
        results.append(train(fold_cfg, explicit))
    if not is_main_process():
        return {}
    dice = np.array([r["test"]["dice"] for r in results])
    summary = {"folds": cfg.folds, "test_dice_per_fold": dice.tolist(), "test_dice_mean": float(dice.mean()),
               "test_dice_std": float(dice.std(ddof=1)),
               "test_iou_mean": float(np.mean([r["test"]["iou"] for r in results])),
               "test_images": int(sum(r["test"]["images"] for r in results))}
    caveats = sorted({r["warning"] for r in results if r.get("warning")})
    if caveats:
        summary["warning"] = "; ".join(caveats)
        warn(f"cross-validation: {summary['warning']}")
    save_json(out / "cv_summary.json", summary)
    spread = summary["test_dice_std"]
    append_run_row(out.resolve().parent / "runs.csv", {
        **run_row_start(cfg, out),
        "test_dice": round(summary["test_dice_mean"], 5), "test_dice_sd_over_folds": round(spread, 5),
        "folds": cfg.folds, "script": script_version()})
    log(f"cross-validation over {cfg.folds} folds of patients: test Dice {summary['test_dice_mean']:.4f} "
        f"+- {summary['test_dice_std']:.4f} (mean +- sd over folds); {out / 'cv_summary.json'}")
    return summary


# -----------------------------------------------------------------------------
# Comparing runs: `compare`


def load_finished_run(folder: Path) -> dict:
    """A run folder, or a cross-validation folder (its folds as mean and spread), for `compare`."""
    folder = Path(folder)
    folds = sorted(folder.glob("fold_*/metrics.json"))
    if (folder / "metrics.json").is_file():
        parts = [folder]
    elif folds:
        parts = [f.parent for f in folds]
    else:
        raise UserError(f"{folder}: not a finished run (no metrics.json, nor fold_*/metrics.json of a "
                        f"cross-validation)")
    try:
        metrics = [json.loads((p / "metrics.json").read_text()) for p in parts]
        config = json.loads((parts[0] / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: its metrics.json or config.json cannot be read ({e})") from None
    dice = np.array([m["test"]["dice"] for m in metrics])
    if len(parts) == 1:
        low, high = metrics[0]["test"]["dice_ci95"]
    else:  # over folds: the mean and its spread (one standard deviation either side)
        low, high = dice.mean() - dice.std(ddof=1), dice.mean() + dice.std(ddof=1)
    epochs = min(len(m.get("history", {}).get("epoch", [])) for m in metrics)
    curves = {k: np.mean([m["history"][k][:epochs] for m in metrics], axis=0) if epochs else np.array([])
              for k in ("val_dice", "val_loss", "train_loss")}
    return {"folder": folder, "config": config, "folds": len(parts) if folds and len(parts) > 1 else 0,
            "dice": float(dice.mean()), "low": float(low), "high": float(high), "curves": curves,
            "best_val_dice": float(np.mean([m["best_val_dice"] for m in metrics])),
            "split": ",".join(m.get("test_split", "?") for m in metrics)}


def run_labels(runs: list[dict]) -> list[str]:
    """Each run named by the settings in which the runs differ (the folder when none differ)."""
    keys = sorted({k for r in runs for o in runs for k in changed_fields(r["config"], o["config"])})
    labels = [", ".join(f"{k}={r['config'].get(k)}" for k in keys) or r["folder"].name for r in runs]
    return [f"{label} ({r['folder'].name})" if labels.count(label) > 1 else label for label, r in zip(labels, runs)]


def plot_comparison(path: Path, runs: list[dict], labels: list[str]) -> None:
    plt = _pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (r, label) in enumerate(zip(runs, labels)):
        epochs = np.arange(1, len(r["curves"]["val_dice"]) + 1)
        line, = ax1.plot(epochs, r["curves"]["val_dice"], "o-", label=label)
        ax2.plot(epochs, r["curves"]["val_loss"], "o-", color=line.get_color(), label=f"{label}: validation")
        ax2.plot(epochs, r["curves"]["train_loss"], "--", color=line.get_color(), alpha=0.6)
        ax3.errorbar([r["dice"]], [i], xerr=[[r["dice"] - r["low"]], [r["high"] - r["dice"]]], fmt="o", capsize=5,
                     color=line.get_color())
    ax1.set(xlabel="epoch", ylabel="Dice", title="Validation Dice")
    ax2.set(xlabel="epoch", ylabel="loss", title="Validation loss (training loss dashed)")
    ax3.set_yticks(np.arange(len(runs)), labels)
    ax3.set(ylim=(len(runs) - 0.5, -0.5), xlabel="test Dice",
            title="Test Dice: 95% interval over patients\n(cross-validation: mean +- sd over folds)")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    save_figure(path, fig)
    plt.close(fig)


def compare_runs(folders: list[str], out: str) -> list[dict]:
    """Overlay the curves and test Dice of finished runs, labelled by what differs between them; say
    when intervals overlap and when runs were tested on different images."""
    runs = [load_finished_run(Path(f)) for f in folders]
    labels = run_labels(runs)
    width = max(len(label) for label in labels)
    log(f"{'run':{width}s}  best val Dice  test Dice  interval")
    for r, label in zip(runs, labels):
        spread = "mean +- sd over folds" if r["folds"] else "95% over patients"
        log(f"{label:{width}s}  {r['best_val_dice']:13.4f}  {r['dice']:9.4f}  {r['low']:.4f}-{r['high']:.4f} ({spread})")
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            a, b = runs[i], runs[j]
            if a["low"] <= b["high"] and b["low"] <= a["high"]:
                log(f"{labels[i]} vs {labels[j]}: the intervals overlap, so this test set cannot tell them apart")
            if a["split"] != b["split"]:
                log(f"{labels[i]} vs {labels[j]}: tested on different splits (other test images), so their Dice "
                    f"is not comparable image for image")
    plot_comparison(Path(out), runs, labels)
    log(f"figure: {out}")
    return runs


def subcommand_parser(name: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"{Path(sys.argv[0]).name} {name}", description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def compare_main(argv: list[str]) -> None:
    parser = subcommand_parser("compare", "Did my change help? Overlay the validation curves and the test Dice of "
                                          "finished runs (run folders, or cross-validation folders), labelled by the "
                                          "settings that differ.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of finished runs (a glob works)")
    parser.add_argument("--out", default="comparison.png", help="the figure to write")
    args = parser.parse_args(argv)
    folders = []
    for pattern in args.runs:  # the shell expands globs; quoted ones (and Windows shells) are expanded here
        if any(c in pattern for c in "*?["):
            folders += [str(p) for p in sorted(Path().glob(pattern)) if p.is_dir() and not p.name.startswith(".")]
        else:
            folders.append(pattern)
    if len(folders) < 2:
        parser.error("give at least two run folders")
    compare_runs(folders, args.out)



# -----------------------------------------------------------------------------
# Prediction: segment new scans with a trained model.pth


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Image files named directly or found in the named folders (not recursive), one per name."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(list_images(path).values(), key=lambda p: _sort_key(p.stem))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    unique: dict[str, Path] = {}
    for f in files:
        if f.stem in unique:
            warn(f"{f}: same name as {unique[f.stem]}, and outputs are named after the file; skipped")
        else:
            unique[f.stem] = f
    if not unique:
        raise UserError(f"no images (PNG, JPEG, TIFF or BMP) in {', '.join(inputs)}")
    return list(unique.values())


def make_overlay(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The scan in gray with the tumour tinted red and outlined in yellow (BGR, uint8)."""
    scan = cv2.cvtColor(np.clip(gray * 255 + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    tinted = scan.copy()
    tinted[mask] = (0, 0, 255)
    overlay = cv2.addWeighted(tinted, 0.35, scan, 0.65, 0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(overlay, contours, -1, (0, 255, 255), max(1, round(min(mask.shape) / 256)))
    return overlay


PREDICT_MARKER = ".written-by-predict"  # marks a folder predict made, whose outputs --overwrite may replace


def check_predict_out(out: Path, inputs: list[str], files: list[Path], masks_dir: str, truth: dict, overwrite: bool):
    """predict never writes into a folder it reads from, never replaces a file it did not write, and
    replaces its own earlier outputs only with --overwrite. Checked before anything is written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    read_folders = {Path(i).resolve(): f"the input folder {i}" for i in inputs if Path(i).is_dir()}
    if masks_dir:
        read_folders[Path(masks_dir).resolve()] = f"the --masks folder {masks_dir}"
    file_folders = {f.resolve().parent: f"the folder of the input {f}" for f in files}
    for sub in ("masks", "overlays"):  # a subfolder linked elsewhere would carry the writes out of --out
        if (out / sub).exists() and (out / sub).resolve() != out.resolve() / sub:
            raise UserError(f"--out {out}: {out / sub} is a link to {(out / sub).resolve()}; predict writes only "
                            f"into real folders inside --out. Choose another --out")
    for written in (out, out / "masks", out / "overlays"):
        w = written.resolve()
        for folder, what in [*read_folders.items(), *file_folders.items()]:
            if w == folder or (folder in w.parents and folder in read_folders):
                raise UserError(f"--out {out} would write into {written}, which is inside {what}: predict "
                                f"reads from there and never writes into it, with or without --overwrite. Choose "
                                f"an --out outside every input and --masks folder")
        for folder, what in read_folders.items():
            if w in folder.parents and written == out:
                raise UserError(f"--out {out} holds {what}: predict never writes beside its inputs, with or "
                                f"without --overwrite. Choose an --out outside it")
    targets = [out / "predictions.csv"] + [out / sub / f"{f.stem}.png" for f in files for sub in ("masks", "overlays")]
    read_files = {f.resolve() for f in files} | {m.resolve() for m in truth.values()}
    for target in targets:
        if target.resolve() in read_files:
            raise UserError(f"--out {out} would replace {target}, an input of this prediction; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / PREDICT_MARKER).exists():
        found = [p for p in sorted(out.rglob("*")) if p.name != ".lock"]
        example = next((p for p in found if p.is_file()), found[0])
        raise UserError(f"--out {out} already holds files that predict did not write (for example {example}); "
                        f"predict writes only into a new or empty folder, or one it wrote before, so that no "
                        f"input or ground truth is ever replaced. Choose another --out")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise UserError(f"{out}: {len(existing)} outputs of an earlier prediction exist already (for example "
                        f"{existing[0]}); pass --overwrite to replace them, or choose another --out")


def score_against_truth(f: Path, pred: np.ndarray, truth: dict, masks_dir: str, size: int) -> dict:
    """The METRICS of one prediction against its --masks file, at the model's resolution; {} if none."""
    if f.stem not in truth:
        if masks_dir:
            warn(f"{f.name}: no mask named {f.stem}.* in {masks_dir}; no scores for it")
        return {}
    try:
        mask = read_mask(truth[f.stem])
    except ValueError as e:
        warn(f"{e}; no scores for {f.name}")
        return {}
    target = preprocess_mask(mask, size)
    vanished = vanished_tumour(truth[f.stem], mask, target)
    if vanished:
        warn(vanished)
    scores = scores_from_counts(confusion_counts(torch.from_numpy(pred)[None], torch.from_numpy(target)[None]))
    return {"true_tumor_pixels": int(target.sum()), **{name: round(float(value[0]), 5) for name, value in scores.items()}}


def segment_batch(model, machine: Machine, files: list[Path], size: int, threshold: float, flip: bool, truth: dict,
                  masks_dir: str, stage: Path, rows: list[dict]) -> None:
    """One batch of files: the readable ones are segmented, written into `stage` and added to `rows`."""
    batch = []
    for f in files:
        try:
            batch.append((f, read_image(f)))
        except ValueError as e:
            warn(f"{e}; skipped")
    if not batch:
        return
    x = torch.from_numpy(np.stack([preprocess_image(g, size) for _, g in batch])).unsqueeze(1)
    probs = predict_probabilities(model, x, len(batch), machine, flip=flip).cpu().numpy()[:, 0]
    for (f, gray), prob in zip(batch, probs):
        full = cv2.resize(prob, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
        mask = full > threshold
        save_png(stage / "masks" / f"{f.stem}.png", mask.astype(np.uint8) * 255)
        save_png(stage / "overlays" / f"{f.stem}.png", make_overlay(gray, mask))
        row = {"image": str(f), "width": gray.shape[1], "height": gray.shape[0],
               "tumor_pixels": int(mask.sum()), "tumor_fraction": round(float(mask.mean()), 6),
               "mean_probability": round(float(full[mask].mean()) if mask.any() else 0.0, 4)}
        row.update(score_against_truth(f, prob > threshold, truth, masks_dir, size))
        rows.append(row)


def segment_files(model, machine: Machine, files: list[Path], size: int, threshold: float, flip: bool,
                  batch_size: int, truth: dict, masks_dir: str, stage: Path) -> tuple[list[dict], int]:
    """Masks, overlays and CSV rows of the readable files, written into `stage`."""
    rows = []
    with tqdm(total=len(files), desc="predicting", unit="img", disable=not is_main_process()) as bar:
        for start in range(0, len(files), batch_size):
            segment_batch(model, machine, files[start:start + batch_size], size, threshold, flip, truth, masks_dir,
                          stage, rows)
            bar.update(len(files[start:start + batch_size]))
    skipped = len(files) - len(rows)
    if rows:
        save_csv(stage / "predictions.csv", rows)
    return rows, skipped


def move_into_place(stage: Path, out: Path) -> None:
    """Each staged file replaces its namesake in `out` (a rename: no copy, no extra space)."""
    (out / PREDICT_MARKER).touch()
    for path in sorted(stage.rglob("*")):
        if path.is_file():
            dest = out / path.relative_to(stage)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
    for folder in (out, out / "masks", out / "overlays"):
        _fsync_dir(folder)


def predict(model_path, inputs: list[str], out_dir, masks_dir: str = "", batch_size: int = 16,
            device: str = "auto", overwrite: bool = False) -> list[dict]:
    """Write a binary mask at the input's size, an overlay and one CSV row per input image.

    The image size, threshold and mirror averaging (--tta) come from the checkpoint. With
    `masks_dir`, each image with a mask of the same name is also scored on every metric, as in the
    test evaluation. Outputs are written into a hidden staging folder inside `out_dir` and moved
    into place only when all of them are written: a failure (a full disk) leaves no partial outputs."""
    state = load_checkpoint(model_path)
    files = collect_inputs(inputs)
    out = Path(out_dir)
    truth = list_images(Path(masks_dir)) if masks_dir and Path(masks_dir).is_dir() else {}
    if masks_dir and not truth:
        raise UserError(f"{masks_dir}: no masks found (PNG, JPEG, TIFF or BMP)")
    check_predict_out(out, inputs, files, masks_dir, truth, overwrite)
    dev = pick_device(device)
    model = model_from_checkpoint(state, model_path, dev)
    size, threshold = state["config"]["image_size"], float(state["threshold"])
    flip = bool(state["config"].get("tta", BEFORE_FIELD_EXISTED["tta"]))
    t0 = time.time()
    with folder_lock(out):
        stage = Path(tempfile.mkdtemp(prefix=".predict-", suffix=".tmp", dir=out))
        try:
            # float32 on a CPU: a prediction is too short to repay amp's start-up measurement
            machine = Machine(dev, amp_dtype(Config(), dev) if dev.type == "cuda" else None)
            rows, skipped = segment_files(model, machine, files, size, threshold,
                                          flip, batch_size, truth, masks_dir, stage)
            if not rows:
                raise UserError("none of the inputs could be read; nothing was written")
            move_into_place(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    seconds = time.time() - t0
    log(f"{len(rows)} images segmented in {seconds:.2f} s ({seconds / len(rows):.3f} s each) on {dev}"
        + (f", {skipped} unreadable skipped" if skipped else "") + f"; masks, overlays and predictions.csv in {out}/")
    scored = [r for r in rows if "dice" in r]
    if scored and not any(r["true_tumor_pixels"] for r in scored):
        warn(f"THE {len(scored)} --masks FILES HOLD NO TUMOUR PIXEL at {size}x{size}: the scores below only say "
             f"whether anything was predicted, not how well tumours are outlined")
    if scored:
        log(f"against {len(scored)} masks (mean over images, at {size}x{size}): "
            + ", ".join(f"{name} {np.mean([r[name] for r in scored]):.4f}" for name in METRICS))
    return rows


def predict_main(argv: list[str]) -> None:
    parser = subcommand_parser("predict", "Segment MRI slices with a trained model: a mask at each input's size, an "
                                          "overlay, and predictions.csv (tumour area and mean probability per image).")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders of images")
    parser.add_argument("--model", default="outputs/model.pth", help="checkpoint written by training")
    parser.add_argument("--out", default="predictions", help="output folder")
    parser.add_argument("--masks", default="", help="folder of true masks (same file names): score each prediction on every metric")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier prediction")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    predict(args.model, args.inputs, args.out, args.masks, args.batch_size, args.device, args.overwrite)


# -----------------------------------------------------------------------------
# Command line


def build_parser(defaults: Config) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a U-Net to segment brain tumours in MRI slices (run `predict --help` for "
                    "segmenting new scans with a trained model).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "resume":
            parser.add_argument(flag, nargs="?", const="auto", default=argparse.SUPPRESS, help=f.metadata["help"])
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f.metadata["help"] + f" (default: {default})")
        else:
            parser.add_argument(flag, type=type(default), default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f.metadata["help"] + f" (default: {default!r})")
    return parser


def explicit_fields(argv: list[str]) -> frozenset:
    """The Config fields typed on the command line."""
    return frozenset(vars(build_parser(Config()).parse_args(argv)))


def config_from_args(argv: list[str]) -> Config:
    """Dataclass defaults, then the --demo and --recipe seed presets, then what the user typed."""
    given = vars(build_parser(Config()).parse_args(argv))
    values = {}
    if given.get("demo"):
        values.update(DEMO_DEFAULTS)
    if given.get("recipe", Config.recipe) == "seed":
        values.update(SEED_RECIPE)
    values.update(given)
    return Config(**values)


def write_failure(e: OSError) -> str:
    """One sentence for an output that could not be written."""
    where = e.filename or "an output file"
    if e.errno == errno.ENOSPC:
        return (f"the disk is full (writing {where}). Files are written whole or not at all, so the earlier "
                f"versions are intact; free some space and run again (--resume continues a training run)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write {where}; choose another output folder (--out-dir, or --out for predict)"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return (f"cannot create the folder {where}: a file stands where a folder of that path should be; choose "
                f"another output folder")
    return f"cannot write {where}: {e.strerror or e}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    batch_size = 0
    try:
        if argv and argv[0] == "predict":
            predict_main(argv[1:])
        elif argv and argv[0] == "compare":
            compare_main(argv[1:])
        else:
            cfg = config_from_args(argv)
            batch_size = cfg.batch_size
            check_config(cfg)
            if cfg.folds and cfg.fold < 0:
                cross_validate(cfg, explicit_fields(argv))
            else:
                train(cfg, explicit_fields(argv))
        return 0
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        hint = f"--batch-size {max(1, batch_size // 2)}" if batch_size > 1 else "a smaller --batch-size"
        print(f"error: the GPU ran out of memory. Try {hint}, or close other programs that use the GPU",
              file=sys.stderr)
        return 1
    except MemoryError:
        print(f"error: out of memory. Try a smaller --batch-size, --image-size or --eval-batch-size, or --limit",
              file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "can't allocate memory" not in str(e) and "not enough memory" not in str(e):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:120]}). Try a smaller --batch-size, --image-size or "
              f"--eval-batch-size, or --limit", file=sys.stderr)
        return 1
    except OSError as e:  # reads are turned into warnings or UserError: this is a write that failed
        print(f"error: {write_failure(e)}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
