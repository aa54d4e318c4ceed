#!/usr/bin/env python3
"""Brain tumour segmentation from MRI: a U-Net trained end to end in one file.

    python brain_tumor_segmentation.py --demo            # offline, synthetic data, seconds on a CPU
    python brain_tumor_segmentation.py                   # the Kaggle dataset (downloaded if needed)
    python brain_tumor_segmentation.py --data-dir DIR    # any folder with images/ and masks/
    python predict.py --model outputs/RUN SCAN.png       # segment new scans with a finished run
    python compare.py "outputs/*"                        # did my change help?
    python cross_validate.py --folds 5 --data-dir DIR    # K runs, one per fold of patients

Every run writes into a new folder of its own (outputs/DATE-TIME-NAME, or --out-dir, which must not
exist yet), and its last line names it; nothing outside it is ever replaced or deleted. Every
constant is a field of `Config` below: edit a default there, or set it for one run on the command
line (`--epochs 5 --batch-size 8`); `--help` lists them all. The file reads in the order it runs:
`Config`, `train()` (the whole run as named steps), the steps that decide the numbers (data, split,
model, loss, loop, evaluation, plots), then the machinery in a marked tail. predict.py, compare.py
and export.py use a finished run, cross_validate.py runs train() once per fold; they import from here.

Measured (bench/RESULTS.md): the default run (256x256, 20 epochs, compiled, bf16) takes 59 s start to
finish on one H200, test Dice 0.712 (95% CI 0.637-0.858, 16 patients; the seed recipe 0.576), and about
3 hours on 2 cores of an AMD EPYC with AVX-512 BF16; there `make demo` (synthetic, 48x48, 12 epochs)
took 24.4 s start to finish (best of two, 2026-12-05), test Dice 0.973.
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
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock, Timeout
from tqdm import tqdm


# -----------------------------------------------------------------------------
# Config: every constant of a run, with its help text and its bounds beside it


def setting(default, help, **rules):
    """A field with the rules check_fields and build_parser read: low, high, above, share (0 to 1), choices (a
    function), resumable (may change on --resume), learns=False, now (this command's), positional, metavar, aliases."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


SEED_RANGE = dict(low=0, high=2 ** 31 - 1)
HOW_IT_RUNS = dict(resumable=True, learns=False)  # machine and output settings: free to change on --resume
THIS_COMMAND = dict(HOW_IT_RUNS, now=True)  # always this command's, never a resumed run's saved value


@dataclass
class Config:
    # data
    data_dir: str = setting("", "folder with images/ and masks/ (default: the Kaggle dataset)", **HOW_IT_RUNS)
    out_dir: str = setting("", "the run's new folder (default: outputs/DATE-TIME-NAME)", **THIS_COMMAND)
    demo: bool = setting(False, "train on synthetic slices made in the run's folder (offline, seconds on a CPU)")
    demo_images: int = setting(600, "synthetic slices generated for --demo", low=10)
    limit: int = setting(0, "use only the first N image pairs (0: all)", low=0)
    image_size: int = setting(256, "square size images are resized to (a multiple of 16)", low=16, high=4096)
    split: Literal["patient", "random"] = setting("patient", "patient: no patient in two parts; random: by image")
    groups: str = setting("", "CSV with columns image,patient_id[,tumor_type] for your own data")
    val_fraction: float = setting(0.2, "fraction of the data for validation", above=0)
    test_fraction: float = setting(0.1, "fraction of the data for the final test", above=0)
    split_seed: int = setting(42, "seed of the split alone: runs of other --seed test on the same images", **SEED_RANGE)
    folds: int = setting(0, "K >= 3: this run is one fold of a K-fold cross-validation (cross_validate.py)")
    fold: int = setting(0, "with --folds: the fold (1 to K) this run tests on", low=0, **THIS_COMMAND)
    # model
    base_width: int = setting(32, "channels of the first encoder block; the U-Net doubles it 4 times", low=1)
    # training recipe
    recipe: Literal["improved", "seed"] = setting("improved", "seed: the original script's (SEED_RECIPE)")
    epochs: int = setting(20, "training epochs", low=1, resumable=True)
    batch_size: int = setting(16, "images per training step", low=1)
    lr: float = setting(2e-3, "learning rate (the peak one with --schedule onecycle)", above=0)
    optimizer: Literal["adam", "adamw"] = setting("adamw", "adamw decouples the weight decay")
    weight_decay: float = setting(1e-4, "weight decay", low=0)
    schedule: Literal["constant", "onecycle"] = setting("onecycle", "learning-rate schedule")
    loss: str = setting("dice+bce", "a name in LOSSES", choices=lambda: tuple(LOSSES))
    smooth: float = setting(1.0, "smoothing term of the Dice loss", low=0)
    warmup_fraction: float = setting(0.3, "onecycle: share of the steps spent warming up to lr", share=True)
    seed: int = setting(42, "seed of the initial weights, the batch order and the augmentation", **SEED_RANGE)
    augment: bool = setting(True, "random flips, rotations, scaling and gamma, on the device")
    aug_flip: float = setting(0.5, "probability of a left-right flip", share=True)
    aug_rotation: float = setting(15.0, "largest rotation, in degrees either way", low=0, high=180)
    aug_scale: float = setting(0.1, "zoom drawn log-uniformly in exp(+-aug_scale)", low=0, high=1)
    aug_gamma: float = setting(0.3, "gamma drawn log-uniformly in exp(+-aug_gamma)", low=0, high=2)
    threshold: float = setting(0.5, "probability above which a pixel is tumour (if not tuned)", share=True)
    tune_threshold: bool = setting(True, "after training, take the threshold with the best validation Dice")
    threshold_min: float = setting(0.2, "the lowest threshold tried", share=True)
    threshold_max: float = setting(0.8, "the highest threshold tried", share=True)
    threshold_step: float = setting(0.05, "the step between thresholds tried (rounded to 4 decimals)", low=0.001)
    tta: bool = setting(True, "average each prediction with its mirror image's (threshold choice, test, predict)")
    postprocess: bool = setting(True, "keep each step of POSTPROCESSING that raises the validation Dice")
    # machine: how fast, not what is learned
    device: str = setting("auto", "auto (CUDA if available, else CPU), cpu, cuda or cuda:N", **THIS_COMMAND)
    amp: Literal["auto", "bf16", "fp16", "off"] = setting(
        "auto", "mixed precision; auto: bf16 where native, fp16 on older GPUs, else float32", **HOW_IT_RUNS)
    channels_last: bool = setting(True, "channels-last memory format on CUDA and on AVX-512 CPUs", **HOW_IT_RUNS)
    compile: Literal["auto", "on", "off"] = setting("auto", "torch.compile; auto: on CUDA GPUs", **HOW_IT_RUNS)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = setting(
        "default", "reduce-overhead: CUDA graphs; max-autotune: also autotuned kernels", **HOW_IT_RUNS)
    deterministic: bool = setting(False, "repeatable CUDA runs: deterministic kernels, no autotuning", learns=False)
    nan_check_every: int = setting(20, "on GPUs, check the loss every N steps (a wait)", low=1, learns=False)
    eval_batch_size: int = setting(64, "images per step in validation, test and prediction", low=1, **HOW_IT_RUNS)
    workers: int = setting(0, "threads that decode the images (0: one per core, at most 8)", low=0, **HOW_IT_RUNS)
    # outputs and run control
    panel_images: int = setting(4, "validation images in each epoch's prediction panel", low=0, **HOW_IT_RUNS)
    test_samples: int = setting(10, "random test images in the final panel", low=0, **HOW_IT_RUNS)
    resume: str = setting("", "continue the run in this folder, from its last.pth", **THIS_COMMAND)

    def __post_init__(self):
        check_fields(self)
        if self.image_size % 16:
            raise UserError(f"--image-size {self.image_size}: must be a multiple of 16 (the U-Net halves it 4 times)")
        if self.val_fraction + self.test_fraction >= 1:
            raise UserError("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
        if self.folds != 0 and self.folds < 3:
            raise UserError(f"--folds {self.folds}: must be 0 (one split) or at least 3 (test, validation, training)")
        if self.fold > self.folds and not (self.resume and not self.folds):  # --resume ROOT --fold N: ROOT's K
            raise UserError(f"--fold {self.fold}: must be 0 (all folds) or from 1 to --folds, with --folds")
        if self.groups and self.split == "random":
            raise UserError("--groups names patients, which --split random would ignore: drop one of them")
        if self.threshold_min > self.threshold_max:
            raise UserError("--threshold-min must not be above --threshold-max")
        check_batch_fits(self, self.batch_size)


# The default recipe, `improved`, is the dataclass above. Leaving out its loss, its optimizer and schedule,
# or its augmentation lowered validation Dice on two patient splits; the mirror average raised it on both
# (bench/RESULTS.md). `--recipe seed` reproduces the original script: it sets these fields, but typed ones.
SEED_RECIPE = dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", loss="dice",
                   augment=False, tune_threshold=False, tta=False)
# --demo: a synthetic dataset small enough to train well in seconds on a CPU.
DEMO_DEFAULTS = dict(image_size=48, base_width=16, epochs=12, batch_size=16)
KAGGLE_DATASET = "nikhilroxtomar/brain-tumor-segmentation"
KAGGLE_PAIRS = 3064  # image/mask pairs in that dataset, as patients.csv lists them
DEFAULT_DATA_DIR = "data/brain-tumor-segmentation"
PATIENTS_CSV = Path(__file__).resolve().parent / "patients.csv"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
CHECKPOINT_FORMAT = "brain-tumor-segmentation-unet"
CHECKPOINT_VERSION = 1
# For checkpoints written before a field existed: the value that keeps their behaviour (not the current
# default). A checkpoint lacking any other field that decides what a run learned or predicts is refused.
BEFORE_FIELD_EXISTED = {"tta": False, "split_seed": 42, "postprocess": False}


class UserError(Exception):
    """A problem the user can fix; printed as one sentence, without a traceback."""


# -----------------------------------------------------------------------------
# The run, step by step


def train(cfg: Config, typed: frozenset = frozenset(), made: bool = False) -> dict:
    """One run, step by step; returns the test metrics. `typed`: the fields typed; `made`: OUT_DIR is new (a fold)."""
    t_start = time.time()
    RUN_WARNINGS.clear()
    cfg, resume = resumed_state(cfg, typed)                      # --resume: the checkpoint and its settings
    with run_folder(cfg, resume, made) as folder:                # new (or the resumed run's own), locked
        machine = set_up_machine(cfg)                            # device, precision and layout, by fixed rules
        data_dir = resolve_data_dir(cfg, folder)                 # downloaded once, or the demo's generated
        cfg = dataclasses.replace(cfg, out_dir=str(folder.resolve()), data_dir=str(data_dir))  # absolute: saved
        data = load_dataset(data_dir, cfg.image_size, cfg.limit, cfg.workers)  # decoded once, uint8 tensors
        split, idx = split_for(cfg, data, resume)                # by patient, from split_seed alone
        run = build_run(cfg, machine, data, split, idx, resume)  # model, optimizer, compiled if that works
        start_records(folder, cfg, split, resume)               # config.json, split.json; an old test goes
        try:
            with run.writer:                                     # checkpoints and plots in the background
                while run.epoch < cfg.epochs:
                    t_epoch = time.time()
                    train_epoch(run)                             # the training loop itself
                    end_epoch(run, time.time() - t_epoch)        # validation, model.pth, last.pth, plots
                return finish_run(run, t_start)                  # threshold, post-processing, test, metrics.json
        except KeyboardInterrupt as e:                           # Ctrl-C or SIGTERM: the writer has finished
            raise interrupted(run, e) from None


# -----------------------------------------------------------------------------
# Data: decode every pair once, keep the dataset as uint8 tensors


def load_dataset(data_dir: Path | str, size: int, limit: int = 0, workers: int = 0) -> dict:
    """Every readable pair decoded once: names, uint8 (N,1,S,S) images and masks, each pair's bytes' hash."""
    pairs = find_pairs(data_dir)[:limit or None]

    def load(pair):  # -> (name, (image, mask, hash) or None, a warning or '')
        try:
            *kept, note = read_pair(pair[1], pair[2], size)
            return pair[0], kept, note
        except ValueError as e:
            return pair[0], None, f"{e}; pair {pair[0]} skipped"

    kept = []
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:  # OpenCV decodes without the GIL
        for name, pair, problem in tqdm(pool.map(load, pairs), total=len(pairs), desc="decoding", unit="img",
                                        leave=False):
            if problem:
                warn(problem)
            if pair:
                kept.append((name, *pair))
    if not kept:
        raise UserError(f"{data_dir}: none of the {len(pairs)} image/mask pairs could be read")
    if len(kept) < len(pairs):
        warn(f"{len(pairs) - len(kept)} of {len(pairs)} pairs skipped (see the warnings above)")
    names, images, masks, hashes = map(list, zip(*kept))
    mostly = [n for n, m in zip(names, masks) if m.mean() > 0.5]
    if mostly:
        warn(f"{len(mostly)} of {len(names)} masks are more than half tumour (for example {mostly[0]}): inverted "
             f"masks (tumour dark on a bright background)? Tumour must be the bright or coloured part")
    if not any(m.any() for m in masks):
        warn(f"NO TUMOUR PIXEL in any of the {len(names)} masks of {data_dir}: the model can only learn to predict "
             f"nothing, and its Dice will say nothing. Check the masks (tumour non-zero on black, gray or colour)")
    return {"names": names, "hashes": dict(zip(names, hashes)),
            "images": torch.from_numpy(np.stack(images)).unsqueeze(1),
            "masks": torch.from_numpy(np.stack(masks)).unsqueeze(1)}


def find_pairs(data_dir: Path | str) -> list[tuple[str, Path, Path]]:
    """(name, image path, mask path) of every image in images/ with a mask of the same name in masks/."""
    data_dir = Path(data_dir)
    images_dir, masks_dir = data_dir / "images", data_dir / "masks"
    for folder in (data_dir, images_dir, masks_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: folder not found. The data folder must hold images/ and masks/ with one "
                            f"mask per image, of the same name.")
    images, masks = list_images(images_dir), list_images(masks_dir)
    for folder, found in ((images_dir, images), (masks_dir, masks)):
        if not found:
            raise UserError(f"{folder}: no {folder.name} found (PNG, JPEG, TIFF or BMP)")
    for name in sorted(set(images) - set(masks), key=name_order):
        warn(f"{images[name]}: no mask named {name}.* in {masks_dir}; image skipped")
    for name in sorted(set(masks) - set(images), key=name_order):
        warn(f"{masks[name]}: no image named {name}.* in {images_dir}; mask skipped")
    names = sorted(set(images) & set(masks), key=name_order)
    if not names:
        raise UserError(f"{data_dir}: no image in images/ has a mask of the same name in masks/")
    return [(name, images[name], masks[name]) for name in names]


def list_images(folder: Path) -> dict[str, Path]:
    """Image files of a folder by name (without the extension); other files are ignored."""
    try:
        entries = sorted(Path(folder).iterdir())
    except FileNotFoundError:
        raise UserError(f"{folder}: folder not found") from None
    except OSError as e:
        raise UserError(f"{folder}: cannot read this folder ({e.strerror or type(e).__name__})") from None
    files = {}
    for path in entries:
        if path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
            continue
        if not path.is_file():
            warn(f"{path}: not an image file; skipped")
        elif image_name(path.name) in files:
            warn(f"{path}: another file has the same name {image_name(path.name)!r} "
                 f"({files[image_name(path.name)].name}); skipped, keep one of them")
        else:
            files[image_name(path.name)] = path
    return files


def image_name(file_name: str) -> str:
    """A file's name without its image extension ('scan.v2' stays): it pairs an image, its mask and a groups row."""
    path = Path(file_name)
    return path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else path.name


def name_order(name: str):
    """Numbers in numeric order, then other names; int() reads exactly what isdecimal() accepts."""
    return (0, int(name), name) if name.isdecimal() else (1, 0, name)


def read_pair(image_path: Path, mask_path: Path, size: int) -> tuple[np.ndarray, np.ndarray, str, str]:
    """uint8 image, uint8 0/1 mask, the pair's content hash and a warning or ''; ValueError naming the file."""
    gray, image_hash = decode_file(image_path, gray_in_unit_range)
    mask, mask_hash = decode_file(mask_path, tumour_pixels)
    if mask.shape != gray.shape[:2]:
        raise ValueError(f"{mask_path}: mask {mask.shape[1]}x{mask.shape[0]}, image {gray.shape[1]}x{gray.shape[0]}")
    try:
        image, resized = preprocess_image(gray, size), preprocess_mask(mask, size)
    except MemoryError:
        raise ValueError(f"{image_path}: too large to resize in the memory there is") from None
    note = (f"{mask_path}: its {int(mask.sum())} tumour pixels vanish at {size}x{size} (re-binarized at 50% after "
            f"resizing); it counts as tumour-free") if mask.any() and not resized.any() else ""
    return image, resized, hashlib.sha256((image_hash + mask_hash).encode()).hexdigest()[:16], note


def decode_file(path: Path | str, convert) -> tuple[np.ndarray, str]:
    """`convert` of the decoded pixels, and the file's sha256; every failed read is a ValueError naming it."""
    try:
        data = np.fromfile(path, dtype=np.uint8)  # imdecode also copes with non-ASCII paths
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if image is None or image.size == 0:
            raise ValueError(f"{path}: not a readable image (corrupt, empty or unsupported format)")
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise ValueError(f"{path}: holds NaN or infinite pixels, which no scaling can show")
        return convert(image), hashlib.sha256(data).hexdigest()
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    except (cv2.error, MemoryError) as e:
        raise ValueError(f"{path}: the decoder refused it (too large, or a damaged header: {first_line(e)})") from None


def gray_in_unit_range(image: np.ndarray) -> np.ndarray:
    """8-bit by 255 as the seed did; 16-bit and float by their own maximum, whose range the scanner decides."""
    if image.ndim == 3:
        code = {4: cv2.COLOR_BGRA2GRAY, 3: cv2.COLOR_BGR2GRAY}.get(image.shape[2])
        image = cv2.cvtColor(image, code) if code is not None else image[:, :, 0]
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    image -= min(float(image.min()), 0.0)
    peak = float(image.max())
    return image / peak if peak > 0 else image


def tumour_pixels(mask: np.ndarray) -> np.ndarray:
    """Tumour: the strongest colour channel (0 where transparent) above half the lowest level, a level being a value
    that covers a tenth of the commonest one's area (not JPEG noise): 0/255, 0/1, 16-bit and multi-label masks."""
    if mask.ndim == 3:
        value = mask[:, :, :3].max(axis=2)
        mask = np.where(mask[:, :, 3] > 0, value, 0) if mask.shape[2] == 4 else value
    values, counts = np.unique(mask[mask > 0], return_counts=True)
    if not len(values):
        return np.zeros(mask.shape, bool)
    return mask > values[counts >= 0.1 * counts.max()].min() / 2


def preprocess_image(gray: np.ndarray, size: int) -> np.ndarray:
    """Float gray [0,1] at any size -> uint8 (size, size). Shared by training and prediction."""
    interpolation = cv2.INTER_AREA if gray.shape[0] > size else cv2.INTER_LINEAR
    resized = cv2.resize(gray, (size, size), interpolation=interpolation)
    return np.clip(resized * 255.0 + 0.5, 0, 255).astype(np.uint8)


def preprocess_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Bool mask at any size -> uint8 0/1 (size, size): area resize, re-binarized at 50%."""
    resized = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (resized >= 0.5).astype(np.uint8)


# -----------------------------------------------------------------------------
# The split: whole patients in each part, from split_seed alone


def make_split(cfg: Config, data: dict) -> dict:
    """Train/val/test by patient, tumour types spread evenly, from data, groups and split_seed alone."""
    names = data["names"]
    groups, strata, source, unit = find_groups(cfg, names, data["images"])
    if cfg.folds:
        fold = group_folds(groups, strata, cfg.folds, cfg.split_seed)
        test, val = (cfg.fold - 1) % cfg.folds, cfg.fold % cfg.folds  # --fold N is 1..K
        parts = {part: np.flatnonzero(members).tolist() for part, members in (
            ("train", (fold != test) & (fold != val)), ("val", fold == val), ("test", fold == test))}
        how = f"{source}; fold {test + 1} of {cfg.folds} is the test part"
    else:
        parts = split_by_group(groups, strata, (cfg.val_fraction, cfg.test_fraction), cfg.split_seed)
        how = source
    split = {"how": how, "unit": unit, "made_from": {k: getattr(cfg, k) for k in (
             "split", "groups", "split_seed", "val_fraction", "test_fraction", "folds", "fold", "limit")}}
    for part, members in parts.items():
        split[part] = [names[i] for i in members]
        split[f"{part}_patients"] = sorted({groups[i] for i in members})
    split["fractions"] = fractions = {part: round(len(split[part]) / len(names), 4) for part in parts}
    off = not cfg.folds and any(abs(fractions[p] - getattr(cfg, f"{p}_fraction")) > 0.02 for p in ("val", "test"))
    split["warnings"] = [f"whole {unit} could not honour --val-fraction {cfg.val_fraction} and --test-fraction "
                         f"{cfg.test_fraction} within 0.02: the parts hold {fractions} of the images"] if off else []
    for warning in split["warnings"]:
        warn(warning)
    split["groups"] = dict(zip(names, groups))
    split["tumor_types"] = {n: s for n, s in zip(names, strata) if s}
    split["files"] = {n: data["hashes"][n] for n in names}
    return split


def find_groups(cfg: Config, names: list[str], images: torch.Tensor) -> tuple[list[str], list[str], str, str]:
    """The group (patient) and tumour type of each image, where they came from, and what a group is."""
    if cfg.split == "random":
        return list(names), [""] * len(names), "random split by image (--split random)", "images"
    table = read_groups_csv(cfg.groups or PATIENTS_CSV) if cfg.groups or PATIENTS_CSV.is_file() else {}
    missing = [n for n in names if n not in table]
    if cfg.groups and missing:
        raise UserError(f"{cfg.groups}: no patient for {len(missing)} images, for example {missing[0]!r}")
    types = [table[n][1] for n in names] if not missing else []
    if cfg.groups:
        return [table[n][0] for n in names], types, f"split by patient ({cfg.groups})", "patients"
    # Ids that differ only by a trailing letter (MR040240, MR040240B, ...) look like one patient scanned
    # again (README, "Honest metrics"): one group, so that no re-scan crosses the split.
    patients = [re.sub(r"(?<=\d)[A-Z]$", "", table[n][0]) for n in names] if not missing else []
    if patients and table_fits_images(images, names, patients):
        return patients, types, "split by patient (patients.csv; re-scans kept together)", "patients"
    return group_by_similarity(images, names), [""] * len(names), "split by groups of similar neighbouring slices: " \
        "APPROXIMATE, pass --groups FILE.csv with the patient of each image for an exact one", "groups"


def read_groups_csv(path: Path | str) -> dict[str, tuple[str, str]]:
    """image name -> (patient id, tumour type or '') from a CSV with image,patient_id[,tumor_type]."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets add a byte-order mark
        if "\0" in text:
            raise csv.Error("it holds NUL bytes")
        rows = [[c.strip() for c in row] for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    except OSError as e:
        raise UserError(f"{path}: cannot read the groups file ({e.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as e:  # also a field over the csv module's size limit
        raise UserError(f"{path}: not a readable CSV groups file ({first_line(e)}); save it as CSV (UTF-8)") from None
    header = rows[0] if rows else []
    if len(set(header)) < len(header) or not {"image", "patient_id"} <= set(header):
        raise UserError(f"{path}: a groups file needs the columns image,patient_id[,tumor_type], each once")
    table, line_of = {}, {}
    for line, row in enumerate(rows[1:], 2):
        r = dict(zip(header, row))
        if not r.get("image") or not r.get("patient_id"):
            raise UserError(f"{path}: row {line} lacks an image or a patient_id; every row needs both")
        name = image_name(r["image"])
        if name in table:
            raise UserError(f"{path}: image {r['image']!r} is listed twice (rows {line_of[name]} and {line}); keep one")
        table[name], line_of[name] = (r["patient_id"], r.get("tumor_type") or ""), line
    return table


def neighbour_correlations(images: torch.Tensor, names: list[str]) -> tuple[list[int], np.ndarray]:
    """Images in name order, and the correlation of each one's 64x64 thumbnail with the previous one's."""
    order = sorted(range(len(names)), key=lambda i: name_order(names[i]))
    thumbs = torch.cat([F.interpolate(images[order[i:i + 256]].float(), size=(64, 64), mode="area").flatten(1)
                        for i in range(0, len(order), 256)])  # in chunks: the whole set in float32 can be GBs
    thumbs = thumbs - thumbs.mean(1, keepdim=True)
    thumbs = thumbs / thumbs.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return order, (thumbs[1:] * thumbs[:-1]).sum(1).numpy()


def table_fits_images(images: torch.Tensor, names: list[str], patients: list[str]) -> bool:
    """Whether a patient table describes these pixels: in the Figshare data neighbouring slices of one patient
    correlate above 0.8 in 86% of cases, of two patients in 1%; numbered files of other data do not."""
    order, corr = neighbour_correlations(images, names)
    same = np.array([patients[a] == patients[b] for a, b in zip(order[:-1], order[1:])])
    if same.sum() < 2 or (~same).sum() < 1:
        return bool(same.sum()) or len(names) < 3  # too few slices to tell: trust the names
    return float((corr[same] > 0.8).mean() - (corr[~same] > 0.8).mean()) > 0.3


def group_by_similarity(images: torch.Tensor, names: list[str], min_corr: float = 0.8) -> list[str]:
    """Approximate patients: consecutive slices whose thumbnails correlate above `min_corr`, one group."""
    order, corr = neighbour_correlations(images, names)
    groups = [""] * len(names)
    for position, i in enumerate(order):
        groups[i] = f"similar-{int((corr[:position] < min_corr).sum())}"
    return groups


def group_folds(groups: list[str], strata: list[str], n_folds: int, seed: int) -> np.ndarray:
    """The fold (0..n_folds-1) of each image: whole groups, each tumour type spread evenly (StratifiedGroupKFold)."""
    from sklearn.model_selection import StratifiedGroupKFold
    if len(set(groups)) < n_folds:
        raise UserError(f"{len(set(groups))} patients/groups are too few for {n_folds} folds; add data"
                        + (" or use --split random" if len(groups) >= n_folds > len(set(groups)) else ""))
    if max(strata.count(s) for s in set(strata)) < n_folds:  # scikit-learn refuses: no type can be spread
        strata = [""] * len(strata)
    fold = np.zeros(len(groups), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a type rarer than the folds: spread as evenly as it goes
        for k, (_, members) in enumerate(splitter.split(np.zeros(len(groups)), strata, groups)):
            fold[members] = k
    return fold


def split_by_group(groups: list[str], strata: list[str], fractions: tuple[float, float], seed: int) -> dict:
    """Train/val/test from stratified group folds: 20, 50 or 100 (the first that expresses both fractions)."""
    val, test = fractions
    folds = next((k for k in (20, 50, 100) if all(abs(round(f * k) - f * k) < 0.01 for f in (val, test))), 100)

    def parts(units):  # test and validation folds, of `units` folds at most
        k = min(folds, units)
        return k, max(1, round(test * k)), max(1, round(val * k))

    k, n_test, n_val = parts(len(set(groups)))
    if n_test + n_val >= k:
        by_image = sum(parts(len(groups))[1:]) < parts(len(groups))[0] and len(set(groups)) < len(groups)
        raise UserError(f"{len(set(groups))} patients/groups are too few for a train/val/test split; add data"
                        + (" or use --split random" if by_image else ""))
    fold = group_folds(groups, strata, k, seed)
    parts = {"train": fold >= n_test + n_val, "val": (fold >= n_test) & (fold < n_test + n_val), "test": fold < n_test}
    return {part: np.flatnonzero(members).tolist() for part, members in parts.items()}


def split_for(cfg: Config, data: dict, resume: dict | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The run's split (the checkpoint's on --resume) and each part's positions in the data."""
    split = resume["split"] if resume else make_split(cfg, data)
    for warning in split.get("warnings", []) if resume else []:  # what the split's numbers mean, again
        warn(warning)
    idx = split_indices(split, data)
    log(f"data: {len(data['names'])} pairs at {cfg.image_size}x{cfg.image_size}; {split['how']}")
    log("split: " + ", ".join(f"{part} {len(idx[part])} images ({len(split[f'{part}_patients'])} {split['unit']})"
                              for part in ("train", "val", "test")))
    return split, idx


def split_indices(split: dict, data: dict) -> dict[str, torch.Tensor]:
    """Each part's positions in the data, once every image of the split is there with its bytes unchanged."""
    position = {n: i for i, n in enumerate(data["names"])}
    recorded = split.get("files", {})
    changed = [n for part in ("train", "val", "test") for n in split[part]
               if n not in position or recorded.get(n) != data["hashes"][n]]
    if changed:
        raise UserError(f"the data changed since this run's split was made: {len(changed)} of its images are missing "
                        f"or have other contents (for example {changed[0]!r}); use the same data, or start a new run")
    return {part: torch.tensor([position[n] for n in split[part]], dtype=torch.long)
            for part in ("train", "val", "test")}


def split_fingerprint(split: dict, part: str = "test") -> str:
    """Runs whose test images are the same files share this, whatever their folder or image size."""
    files = split.get("files", {})
    return hashlib.sha256(utf8("\n".join(sorted(f"{n}:{files.get(n, '')}" for n in split[part])))).hexdigest()[:12]


def data_fingerprint(split: dict) -> str:
    """All the images a run's split was made from, by content, and the patient (group) of each."""
    files, groups = split.get("files", {}), split.get("groups", {})
    text = "\n".join(f"{n}:{files[n]}:{groups.get(n, '')}" for n in sorted(files))
    return hashlib.sha256(utf8(text)).hexdigest()[:12]


# -----------------------------------------------------------------------------
# The model, its optimizer, and torch.compile where it works


class UNet(nn.Module):
    """Encoder 1->w->2w->4w->8w with max pooling, a 16w bottleneck (512 at 16x16 for w=32 at 256x256), decoder
    of 2x2 transposed convolutions concatenated with the encoder's features, a 1x1 convolution to one logit."""

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()
        widths = [width * 2 ** i for i in range(4)]
        self.encoders = nn.ModuleList(conv_block(c, w) for c, w in zip([in_channels, *widths[:-1]], widths))
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


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(True))


@dataclass
class Run:
    """What training carries from step to step; `epoch` says where it resumes."""
    cfg: Config
    machine: Machine
    out: Path  # the run's folder
    names: list[str]
    images: torch.Tensor  # uint8 (N,1,S,S) on the training device
    masks: torch.Tensor
    split: dict
    idx: dict[str, torch.Tensor]  # positions of each part's images, on the training device
    model: nn.Module  # the raw model: checkpoints and evaluation
    train_model: nn.Module  # what the steps call: compiled where that works
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    writer: Writer
    history: dict = field(default_factory=dict)  # a list per key of end_epoch's record
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_dice": -1.0})  # any validation Dice is better
    epoch: int = 0  # epochs finished: where a resumed run continues
    losses: torch.Tensor | None = None  # this epoch's per-step training losses (summed whole, in one order)
    compile_seconds: float = 0.0
    curves_drawn: float = 0.0  # when the loss curves were last handed to the writer
    script: str = field(default_factory=lambda: hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12])


def build_run(cfg: Config, machine: Machine, data: dict, split: dict, idx: dict, resume: dict | None) -> Run:
    """The model (the checkpoint's weights on --resume), its optimizer, and the handle the steps call."""
    check_batch_fits(cfg, len(idx["train"]))
    torch.manual_seed(cfg.seed)
    model = UNet(width=cfg.base_width).to(machine.device)
    log(f"model: U-Net, width {cfg.base_width}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    log(str(model), console=False)  # the layers, in train.log only
    if machine.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # One fused kernel for all parameters: on a 2-core CPU 9 ms a step instead of 34 ms for the foreach version.
    optimizer = (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam)(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(machine.device.type, enabled=machine.dtype == torch.float16)
    if resume:
        try:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            if resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{cfg.resume}: its saved weights or optimizer state do not fit this model "
                            f"({type(e).__name__}); it cannot be continued: start a new run") from None
    images, masks = data["images"].to(machine.device), data["masks"].to(machine.device)
    idx = {part: i.to(machine.device) for part, i in idx.items()}
    first, t0, train_model = idx["train"][:cfg.batch_size], time.time(), model
    if use_compile(cfg, machine):
        train_model = compiled_if_it_works(model, cfg, machine, to_input(images[first], machine), masks[first].float())
    compile_seconds = time.time() - t0 if train_model is not model else 0.0
    run = Run(cfg, machine, Path(cfg.out_dir), data["names"], images, masks, split, idx, model, train_model, optimizer,
              scaler, Writer(), compile_seconds=compile_seconds)
    if resume:
        run.history, run.best, run.epoch = resume["history"], resume["best"], resume["epoch"]
    return run


def use_compile(cfg: Config, machine: Machine) -> bool:
    """--compile auto: CUDA with Triton's compute capability 7.0; a CPU gained 4% (bench/RESULTS.md)."""
    if cfg.compile != "auto":
        return cfg.compile == "on"
    return machine.device.type == "cuda" and torch.cuda.get_device_capability(machine.device) >= (7, 0)


def compiled_if_it_works(model: nn.Module, cfg: Config, machine: Machine, x: torch.Tensor, y: torch.Tensor):
    """torch.compile(model), compiled now by a step whose effects are put back; where that fails, the model."""
    compiled = torch.compile(model, mode=cfg.compile_mode)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with machine.autocast():
            logits = compiled(x)
        compute_loss(logits, y, cfg).backward()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        warn(f"the first compiled step failed ({type(e).__name__}: {first_line(e)}); training without "
             f"torch.compile. Pass --compile off to skip the attempt.")
        compiled = model
    model.load_state_dict(saved)
    model.zero_grad(set_to_none=True)
    log(f"torch.compile ({cfg.compile_mode}): " + ("compiled and warmed up" if compiled is not model else "not used"))
    return compiled


# -----------------------------------------------------------------------------
# The loss


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, per_image: bool = False):
    """The seed's 1 - (2*sum(p*t) + smooth) / (sum(p^2) + sum(t^2) + smooth), over the batch or per image."""
    p, t = torch.sigmoid(logits.float()), target.float()
    dims = (1, 2, 3) if per_image else (0, 1, 2, 3)
    intersection = (p * t).sum(dims)
    denominator = (p * p).sum(dims) + (t * t).sum(dims)
    return (1 - (2 * intersection + smooth) / (denominator + smooth)).mean()


# The training losses `--loss` chooses from: name -> function(logits, target, cfg), computed in float32.
# Adding a loss is one entry here (its name becomes a valid --loss).
LOSSES = {
    "dice": lambda logits, target, cfg: dice_loss(logits, target, cfg.smooth),
    "dice+bce": lambda logits, target, cfg: (dice_loss(logits, target, cfg.smooth, per_image=True)
                                             + F.binary_cross_entropy_with_logits(logits.float(), target.float())),
}


def compute_loss(logits, target, cfg: Config) -> torch.Tensor:
    return LOSSES[cfg.loss](logits, target, cfg)


# -----------------------------------------------------------------------------
# The training loop


def train_epoch(run: Run) -> None:
    """The steps of epoch `run.epoch`; only the loss check waits for the device."""
    cfg, m = run.cfg, run.machine
    order = batch_order(len(run.idx["train"]), cfg.batch_size, cfg.seed, run.epoch)
    pinned = order.pin_memory() if m.device.type == "cuda" else order  # from pageable memory the host would wait
    order = run.idx["train"][pinned.to(m.device, non_blocking=True)]  # one copy per epoch: no step waits for one
    run.losses = losses = torch.zeros(len(order), device=m.device)
    bar = tqdm(total=order.numel(), desc=f"epoch {run.epoch + 1}/{cfg.epochs}", unit="img", dynamic_ncols=True,
               leave=False, mininterval=1)
    run.model.train()
    checked = 0
    for step in range(len(order)):
        global_step = run.epoch * len(order) + step
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, global_step, cfg.epochs * len(order))
        batch = order[step]
        x, y = to_input(run.images[batch], m), run.masks[batch].float()
        if cfg.augment:  # seeded by the step, so that a resumed run draws the same augmentations
            generator = torch.Generator(device=m.device).manual_seed(cfg.seed * 7919 + global_step)
            x, y = augment_batch(x, y, generator, cfg)
        with m.autocast():
            logits = run.train_model(x)
        loss = compute_loss(logits, y, cfg)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        # A non-finite gradient turns the recorded loss NaN too (a grad scaler skips such steps itself).
        grads = [] if run.scaler.is_enabled() else [p.grad for p in run.model.parameters() if p.grad is not None]
        losses[step] = loss.detach() + (0 * nn.utils.get_total_norm(grads) if grads else 0)
        # Reading the loss waits for the device: on a GPU only every nan_check_every steps and at the end of
        # the epoch; on a CPU every step, so that bad numbers never reach the weights.
        if m.device.type == "cpu" or step % cfg.nan_check_every == 0 or step == len(order) - 1:
            bar.set_postfix(loss=f"{check_steps(losses, checked, step, run):.4f}", refresh=False)
            checked = step + 1
        run.scaler.step(run.optimizer)
        run.scaler.update()
        bar.update(len(batch))
    bar.close()


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    """One epoch's shuffle as (steps, batch), fixed by (seed, epoch) for resumes; the remainder is dropped."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    if n < batch_size:  # tiny datasets: one smaller batch
        return perm.view(1, -1)
    steps = n // batch_size
    return perm[:steps * batch_size].view(steps, batch_size)


def learning_rate(cfg: Config, step: int, total_steps: int) -> float:
    """Constant, or one-cycle: linear warm-up over `warmup_fraction` of the steps to lr, cosine down to lr/1e4."""
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = max(1, int(cfg.warmup_fraction * total_steps))
    if step < warmup:
        return cfg.lr / 25 + (cfg.lr - cfg.lr / 25) * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.lr / 1e4 + (cfg.lr - cfg.lr / 1e4) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def to_input(images_u8: torch.Tensor, machine: Machine) -> torch.Tensor:
    """uint8 images already on the device -> the model's float input in [0, 1] and layout."""
    x = images_u8.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if machine.channels_last else x


def augment_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, cfg: Config):
    """Flip (left-right: anatomy stays plausible), rotation, scale and gamma per image, on the device; by
    hand because torchvision's transforms draw one set of parameters per call, not per image."""
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


def check_steps(losses: torch.Tensor, since: int, last: int, run: Run) -> float:
    """The last loss of steps since..last, or a stop naming the first whose loss or gradient is not finite."""
    window = losses[since:last + 1].cpu()  # one copy to the host
    bad = (~torch.isfinite(window)).nonzero()
    if len(bad):
        run.writer.drain()  # what is saved is what the message says
        kept = (f"the checkpoints in {run.out} are from before it" if (run.out / "last.pth").is_file()
                else "no checkpoint had been written, so the run's folder is removed")
        raise UserError(f"the loss or its gradient became {float(window[int(bad[0])])} at epoch {run.epoch + 1}, "
                        f"step {since + int(bad[0]) + 1}; nothing was saved after that ({kept}). Start a new run "
                        f"with a lower --lr, or --amp off")
    return float(window[-1])


# -----------------------------------------------------------------------------
# The end of an epoch: validation, checkpoints and plots (written in the background)


def end_epoch(run: Run, seconds: float) -> None:
    """Validate and record the epoch; model.pth (if best), last.pth, history and plots go to the writer."""
    cfg, m = run.cfg, run.machine
    val, panel = evaluate(run.model, m, run.images, run.masks, run.idx["val"], cfg, cfg.threshold, cfg.panel_images)
    images = len(run.losses) * min(cfg.batch_size, len(run.idx["train"]))
    record = {"epoch": run.epoch + 1, "train_loss": float(run.losses.mean()), "val_loss": val["loss"],
              **{f"val_{k}": val[k] for k in EPOCH_METRICS}, "lr": run.optimizer.param_groups[0]["lr"],
              "epoch_seconds": seconds, "images_per_second": images / seconds, "precision": precision_name(m)}
    for key, value in record.items():
        run.history.setdefault(key, []).append(value)
    improved = val["dice"] > run.best["val_dice"]
    if improved:
        run.best = {"epoch": run.epoch + 1, "val_loss": val["loss"], **{f"val_{k}": val[k] for k in EPOCH_METRICS}}
    log(f"epoch {run.epoch + 1:3d}/{cfg.epochs}  train loss {record['train_loss']:.4f} | val loss {val['loss']:.4f} "
        + " ".join(f"{k} {val[k]:.4f}" for k in EPOCH_METRICS) + f" | {seconds:.1f} s, {images / seconds:.1f} img/s"
        + ("  * best, saved" if improved else ""))
    run.epoch += 1
    if improved:
        run.writer.submit(save_checkpoint, run.out / "model.pth", checkpoint_state(run, "best"))
    run.writer.submit(save_checkpoint, run.out / "last.pth", checkpoint_state(run, "last"))  # what --resume continues
    history = copied(run.history)
    run.writer.submit(save_csv, run.out / "history.csv", history_rows(history))
    if len(panel["images"]):
        run.writer.submit(save_panel, run.out / f"visualizations/epochs/epoch_{run.epoch:03d}.png",
                          (panel["images"], panel["masks"], panel["probs"] > cfg.threshold),
                          f"epoch {run.epoch}: val Dice {val['dice']:.3f}")
    # The curves take a CPU a few tenths of a second: redrawn at most every 20 s, and after the last epoch.
    if time.time() - run.curves_drawn > 20 or run.epoch == cfg.epochs:
        run.curves_drawn = time.time()
        run.writer.submit(plot_curves, run.out / "visualizations/loss_curves.png", history, run.best["epoch"])


def history_rows(history: dict) -> list[dict]:
    """One row per epoch; a key that joined later (a metric added on --resume) is blank before it."""
    n = len(history["epoch"])
    return [{k: v[i - n + len(v)] if i >= n - len(v) else "" for k, v in history.items()} for i in range(n)]


class Interrupted(UserError):
    def __init__(self, message: str, code: int, where: str = ""):
        super().__init__(message)
        self.code, self.where = code, where


class Terminated(KeyboardInterrupt):
    """SIGTERM, which stops a command as Ctrl-C does, with its own exit code."""


def interrupted(run: Run, e: KeyboardInterrupt) -> Interrupted:
    """Where the run stopped, and the command that continues it from its last finished epoch."""
    code, where = 143 if isinstance(e, Terminated) else 130, f"stopped in epoch {run.epoch + 1}"
    if run.epoch == run.cfg.epochs:
        where = "stopped after training, before the test was written"
    if not (run.out / "last.pth").is_file():
        return Interrupted(f"{where}, before the first checkpoint: nothing was kept; start the run again", code, where)
    again = command(Path(__file__).name, "--resume", run.out.resolve(),
                    *(["--epochs", run.cfg.epochs] if run.cfg.resume else []))  # last.pth may have fewer
    return Interrupted(f"{where}; {run.out / 'last.pth'} holds its last finished epoch. Continue the run with:\n  "
                       f"{again}", code, where)


def checkpoint_state(run: Run, kind: str) -> dict:
    """All a "best" (use) or "last" (resume) checkpoint holds, copied now, in types weights_only loads."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": kind,
             "model": copied(run.model.state_dict()), "config": dataclasses.asdict(run.cfg), "split": run.split,
             "history": copied(run.history), "epoch": run.epoch, "best": dict(run.best),
             # the threshold in use: config's, until --tune-threshold replaces it after training
             "threshold": run.cfg.threshold, "precision": precision_name(run.machine)}
    if kind == "last":
        state.update(optimizer=copied(run.optimizer.state_dict()),
                     scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None)
    return state


def copied(obj):
    """A copy of nested dicts and lists whose tensors are copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: copied(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copied(v) for v in obj)
    return obj


class Writer(ThreadPoolExecutor):
    """Writes in one background thread, in order; `with` waits for all; a failure raises at the next call."""

    def __init__(self):
        super().__init__(1, thread_name_prefix="writer")
        self.jobs = []

    def submit(self, fn, *args):
        self.drain(wait=False)
        self.jobs.append(super().submit(fn, *args))

    def drain(self, wait: bool = True) -> None:
        done = [job for job in self.jobs if wait or job.done()]
        self.jobs = [job for job in self.jobs if job not in done]
        for job in done:
            job.result()  # raises the job's error here

    def __exit__(self, kind, error, traceback):
        self.shutdown(wait=True)
        if kind is None:
            self.drain()


# -----------------------------------------------------------------------------
# Evaluation: the metrics, the threshold, the test


# The overlap metrics, as (numerator, denominator) of an image's true positive, false positive and false
# negative pixel counts, scored per image in the test and in predict --masks, and those in EPOCH_METRICS
# after every epoch on validation. Adding a metric is one entry here.
METRICS = {
    "dice": lambda tp, fp, fn: (2 * tp, 2 * tp + fp + fn),
    "iou": lambda tp, fp, fn: (tp, tp + fp + fn),
    "precision": lambda tp, fp, fn: (tp, tp + fp),
    "recall": lambda tp, fp, fn: (tp, tp + fn),
}


EPOCH_METRICS = ("dice", "iou")  # "dice" must stay: the best epoch is the one with the best validation Dice


@torch.no_grad()
def evaluate(model, machine: Machine, images, masks, indices, cfg: Config, threshold: float, keep: int = 0):
    """Mean loss and EPOCH_METRICS over the images of `indices`; the first `keep` with their probabilities."""
    targets = masks[indices]
    sums = dict.fromkeys(("loss", *EPOCH_METRICS), 0.0)
    kept = []
    for start, logits in logits_in_batches(model, images[indices], cfg.eval_batch_size, machine):
        y = targets[start:start + len(logits)]
        sums["loss"] += float(compute_loss(logits, y, cfg)) * len(y)
        probs = torch.sigmoid(logits.float())
        scores = scores_from_counts(confusion_counts(probs > threshold, y).cpu())
        for name in EPOCH_METRICS:
            sums[name] += scores[name].sum()
        kept.append(probs[:max(0, keep - start)])
    n = max(len(indices), 1)
    panel = {"images": images[indices[:keep]].cpu().numpy()[:, 0], "masks": targets[:keep].cpu().numpy()[:, 0],
             "probs": torch.cat(kept).cpu().numpy()[:, 0] if kept else np.zeros((0, 1, 1))}
    return {name: float(total) / n for name, total in sums.items()}, panel


@torch.no_grad()
def logits_in_batches(model, images_u8: torch.Tensor, batch_size: int, machine: Machine):
    """Eval-mode logits of uint8 images, one batch at a time, as (first index, logits); the mode is put back."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images_u8), batch_size):
            x = to_input(images_u8[start:start + batch_size].to(machine.device, non_blocking=True), machine)
            with machine.autocast():
                yield start, model(x)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"GPU out of memory at --eval-batch-size {batch_size}: try {batch_size // 2 or 1}") from None
    finally:
        model.train(was_training)


def predict_probabilities(model, images_u8: torch.Tensor, batch_size: int, machine: Machine, flip: bool = False):
    """Float32 probabilities of uint8 images; with `flip`, averaged with their mirror images' (TTA)."""
    probs = torch.cat([torch.sigmoid(logits.float()) for _, logits in
                       logits_in_batches(model, images_u8, batch_size, machine)])
    if flip:
        mirrored = predict_probabilities(model, images_u8.flip(-1), batch_size, machine)
        probs = (probs + mirrored.flip(-1)) / 2
    return probs


def confusion_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image (N, 3): true positives, false positives, false negatives of binary masks."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    return torch.stack([(pred & target).sum(1), (pred & ~target).sum(1), (~pred & target).sum(1)], 1).double()


def scores_from_counts(counts) -> dict[str, np.ndarray]:
    """Per-image METRICS of (N, 3) counts: both masks empty score 1, another zero denominator 0 (a full miss)."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1, 3)
    tp, fp, fn = c[:, 0], c[:, 1], c[:, 2]
    both_empty = (tp + fp + fn) == 0

    def ratio(num, den):
        return np.where(both_empty, 1.0, np.divide(num, den, out=np.zeros_like(num), where=den > 0))

    return {name: ratio(*fraction(tp, fp, fn)) for name, fraction in METRICS.items()}


def finish_run(run: Run, t_start: float) -> dict:
    """The best epoch's threshold chosen on validation, then one test; metrics.json, last, marks it finished."""
    cfg, out = run.cfg, run.out
    run.writer.drain()
    state = load_checkpoint(out / "model.pth")
    model = model_from_checkpoint(state, out / "model.pth", run.machine.device)
    threshold, steps = choose_on_validation(model, run.machine, run.images, run.masks, run.idx["val"], cfg)
    save_checkpoint(out / "model.pth", {**state, "threshold": threshold, "postprocess": steps,
                                        "precision": precision_name(run.machine)})
    metrics = evaluate_test(model, run, threshold, steps)
    speeds = run.history.get("images_per_second", [])  # once warm: the median after the first epoch (autotuning)
    steady_speed = float(np.median(speeds[1:] or speeds)) if speeds else None
    metrics.update(best_epoch=state["best"]["epoch"], best_val_dice=state["best"]["val_dice"],
                   total_seconds=time.time() - t_start, history=run.history, precision=precision_name(run.machine),
                   images_per_second=steady_speed, compile_seconds=run.compile_seconds,
                   script_sha256=run.script)  # the file as it was when the run began
    if RUN_WARNINGS:
        metrics["warning"] = "; ".join(dict.fromkeys(RUN_WARNINGS))
    run.writer.drain()
    save_json(out / "metrics.json", metrics)
    t, unit = metrics["test"], run.split["unit"]
    interval = f"95% CI {t['dice_ci95'][0]:.4f}-{t['dice_ci95'][1]:.4f}" if t["dice_ci95"] else "no interval"
    log(f"test ({t['images']} images, {t['patients']} {unit}): Dice {t['dice']:.4f} [{interval}], "
        + ", ".join(f"{name} {t[name]:.4f}" for name in METRICS if name != "dice")
        + (f", HD95 {t['hd95']:.1f} px" if t["hd95"] is not None else ", HD95 undefined (no tumour in both masks)"))
    predict = command("predict.py", "--model", out.resolve())
    log(f"done in {time.time() - t_start:.1f} s; segment new scans with:\n  {predict} SCAN.png ...\nrun folder: {out}")
    return metrics


def model_from_checkpoint(state: dict, path, device) -> nn.Module:
    model = UNet(width=state["config"]["base_width"])
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError):
        raise UserError(f"{path}: its weights do not fit this U-Net (other widths, or another model)") from None
    return model.to(device).eval()


def choose_on_validation(model, machine: Machine, images, masks, val_idx, cfg: Config) -> tuple[float, list[str]]:
    """The threshold of the grid with the best validation Dice, then the POSTPROCESSING steps that raise it."""
    probs = predict_probabilities(model, images[val_idx], cfg.eval_batch_size, machine, flip=cfg.tta)
    targets, threshold = masks[val_idx].bool(), cfg.threshold
    if cfg.tune_threshold:
        candidates = np.round(np.arange(cfg.threshold_min, cfg.threshold_max + cfg.threshold_step / 2,
                                        cfg.threshold_step), 4)
        dice = [scores_from_counts(confusion_counts(probs > t, targets).cpu())["dice"].mean() for t in candidates]
        threshold = float(candidates[int(np.argmax(dice))])
        log(f"threshold chosen on validation: {threshold:.2f}")
    if not cfg.postprocess:
        return threshold, []
    probs, targets = probs.cpu().numpy()[:, 0], targets.cpu().numpy()[:, 0]
    chosen, best = [], mean_dice(postprocess(probs, threshold, []), targets)
    for step in POSTPROCESSING:
        dice = mean_dice(postprocess(probs, threshold, [*chosen, step]), targets)
        log(f"post-processing on validation: {step} {'kept' if dice > best else 'left out'} (Dice {best:.4f} with "
            f"the steps before it, {dice:.4f} with it)")
        if dice > best:
            chosen, best = [*chosen, step], dice
    return threshold, chosen


def largest_component(mask: np.ndarray, prob: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if count > 2 else mask


def fill_holes(mask: np.ndarray, prob: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_fill_holes
    return binary_fill_holes(mask)


def never_empty(mask: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """An empty mask becomes the region around the most probable pixel, down to half its probability."""
    if mask.any():
        return mask
    _, labels = cv2.connectedComponents((prob >= prob.max() / 2).astype(np.uint8), connectivity=8)
    return labels == labels.flat[int(np.argmax(prob))]


# Post-processing, nnU-Net's way: each step is tried on validation in this order and kept if it raises the
# mean Dice; model.pth keeps the choice for the test and predict.py. A step: name -> f(mask, probabilities).
POSTPROCESSING = {"largest_component": largest_component, "fill_holes": fill_holes, "never_empty": never_empty}


def mean_dice(pred: np.ndarray, target: np.ndarray) -> float:
    counts = confusion_counts(torch.from_numpy(pred), torch.from_numpy(target))
    return float(scores_from_counts(counts)["dice"].mean())


def postprocess(probs: np.ndarray, threshold: float, steps: list[str]) -> np.ndarray:
    """Boolean masks (N,H,W) of probabilities (N,H,W): the threshold, then each step in turn."""
    masks = probs > threshold
    for step in steps:
        masks = np.stack([POSTPROCESSING[step](m, p) for m, p in zip(masks, probs)])
    return masks


def evaluate_test(model, run: Run, threshold: float, steps: list[str]) -> dict:
    """Every metric and HD95 on the test part, an interval over patients, by tumour type, per image, plots."""
    cfg, idx = run.cfg, run.idx["test"]
    probs = predict_probabilities(model, run.images[idx], cfg.eval_batch_size, run.machine, flip=cfg.tta)
    pred_np = postprocess(probs.cpu().numpy()[:, 0], threshold, steps)
    target_np = run.masks[idx].bool().cpu().numpy()[:, 0]
    counts = confusion_counts(torch.from_numpy(pred_np), torch.from_numpy(target_np)).numpy()
    scores = {**scores_from_counts(counts), "hd95": np.array([hd95(p, t) for p, t in zip(pred_np, target_np)])}
    names = [run.names[i] for i in idx.tolist()]
    groups = [run.split["groups"].get(n, n) for n in names]
    types = np.array([run.split.get("tumor_types", {}).get(n, "") for n in names])
    summary = {**summarize(scores, counts), "patients": len(set(groups)),
               "dice_ci95": bootstrap_interval(scores["dice"], groups, seed=cfg.split_seed)}
    if summary["dice_ci95"] is None:
        warn(f"the test part holds {len(set(groups))} {run.split['unit']}: too few (< {MIN_GROUPS}) for a 95% interval")
    by_type = {t: summarize({k: v[types == t] for k, v in scores.items()}, counts[types == t])
               for t in sorted(set(types)) if t}
    save_csv(run.out / "test_per_image.csv", [
        {"image": n, "patient": g, "tumor_type": t, "gt_pixels": int(c[0] + c[2]), "pred_pixels": int(c[0] + c[1]),
         **{k: round(float(scores[k][i]), 5) for k in (*METRICS, "hd95")}}
        for i, (n, g, t, c) in enumerate(zip(names, groups, types, counts))])
    run.writer.submit(plot_test_results, run.out / "visualizations", (run.images[idx].cpu().numpy()[:, 0], target_np,
                      pred_np), scores["dice"], names, cfg)
    if not target_np.any():
        warn(f"THE TEST SET HOLDS NO TUMOUR PIXEL: its {len(names)} images hold no tumour pixel at all, so the Dice "
             f"only says whether anything was predicted, not how well tumours are outlined")
    return {"test": summary, "by_tumor_type": by_type, "threshold": threshold, "postprocess": steps, "tta": cfg.tta,
            "split": run.split["how"], "test_split": split_fingerprint(run.split), "data": data_fingerprint(run.split),
            "empty_masks": "an empty ground truth with an empty prediction scores 1 on every metric; otherwise a "
                           "zero denominator scores 0; HD95 is averaged over images where both masks are non-empty, "
                           "and is null when there is no such image",
            "hd95_unit": f"pixels at {cfg.image_size}x{cfg.image_size}"}


def summarize(scores: dict[str, np.ndarray], counts: np.ndarray) -> dict:
    """Means over images of every metric; HD95 over the images where it is defined (None if none)."""
    hd = scores["hd95"][np.isfinite(scores["hd95"])]
    c = counts.sum(0)
    return {"images": int(len(counts)), **{k: float(scores[k].mean()) for k in METRICS},
            "hd95": float(hd.mean()) if len(hd) else None, "hd95_images": int(len(hd)),
            "pooled_dice": float(2 * c[0] / max(2 * c[0] + c[1] + c[2], 1))}


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """HD95 in pixels as MONAI: the larger directed 95th percentile; NaN if both are empty, inf if one is."""
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

    return float(max(np.percentile(distances_to(target)[border(pred)], 95),
                     np.percentile(distances_to(pred)[border(target)], 95)))


MIN_GROUPS = 5  # fewer patients (groups) than this give no 95% interval: it would claim more than they hold


def bootstrap_interval(values: np.ndarray, groups: list[str], n: int = 2000, seed: int = 0) -> list[float] | None:
    """95% interval of the mean over images, resampling whole patients; None below MIN_GROUPS of them."""
    keys, g = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    if len(keys) < MIN_GROUPS:
        return None
    sums = np.bincount(g, weights=values, minlength=len(keys))
    counts = np.bincount(g, minlength=len(keys)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(keys), size=(n, len(keys)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


# -----------------------------------------------------------------------------
# Plots


def save_panel(path: Path, pictures: tuple, title: str) -> None:
    """Original | Ground truth | Prediction rows, drawn with OpenCV in milliseconds (an epoch's plot)."""
    scale = max(1, 256 // pictures[0].shape[-1])
    rows = []
    for img, gt, pred in zip(*pictures):
        tiles = [cv2.resize(t.astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
                 for t in (img, gt * 255, pred * 255)]
        gap = np.full((tiles[0].shape[0], 4), 96, np.uint8)  # gray lines keep the black tiles apart
        rows.append(cv2.copyMakeBorder(np.hstack([tiles[0], gap, tiles[1], gap, tiles[2]]), 0, 4, 0, 0,
                                       cv2.BORDER_CONSTANT, value=96))
    picture = np.vstack(rows)[:-4]
    header = np.zeros((28, picture.shape[1]), np.uint8)
    cv2.putText(header, ascii_text(title) + "   (original | ground truth | prediction)", (6, 19),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, 255, 1, cv2.LINE_AA)
    save_png(path, np.vstack([header, picture]))


def save_contours(path: Path, pictures: tuple, title: str, names: list[str], dice: np.ndarray, columns: int = 5):
    """Scans with the truth outlined in green and the prediction in red, under Dice and name, at >= 256 px."""
    tiles = []
    for img, truth, pred, name, d in zip(*pictures, names, dice):
        scale = max(1, -(-256 // img.shape[-1]))
        tile = cv2.cvtColor(cv2.resize(img.astype(np.uint8), None, fx=scale, fy=scale), cv2.COLOR_GRAY2BGR)
        for mask, colour, width in ((truth, (0, 200, 0), 4), (pred, (0, 0, 255), 2)):  # where they agree, both show
            big = cv2.resize(mask.astype(np.uint8), tile.shape[1::-1], interpolation=cv2.INTER_NEAREST)
            cv2.drawContours(tile, cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0], -1, colour, width)
        label = np.zeros((44, tile.shape[1], 3), np.uint8)
        cv2.putText(label, f"Dice {d:.3f}", (4, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
        cv2.putText(label, ascii_text(name)[:tile.shape[1] // 10], (4, 38), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (200, 200, 200), 1, cv2.LINE_AA)
        tiles.append(cv2.copyMakeBorder(np.vstack([label, tile]), 3, 3, 3, 3, cv2.BORDER_CONSTANT, value=(96, 96, 96)))
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    grid = np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])
    header = np.zeros((32, grid.shape[1], 3), np.uint8)
    cv2.putText(header, ascii_text(title) + "   (green: ground truth, red: prediction)", (6, 22),
                cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    save_png(path, np.vstack([header, grid]))


def ascii_text(text: str) -> str:
    """What OpenCV's Hershey fonts can draw: ASCII (a file name that is not UTF-8 crashed putText)."""
    return text.encode("ascii", "replace").decode()


def plot_curves(path: Path, history: dict, best_epoch: int = 0) -> None:
    """Loss, the validation metrics and the learning rate per epoch, the best epoch marked."""
    fig = figure(15, 4)
    axes = fig.subplots(1, 3)
    epochs = history["epoch"]
    axes[0].plot(epochs, history["train_loss"], "o-", label="training loss")
    axes[0].plot(epochs, history["val_loss"], "o-", label="validation loss")
    axes[0].set(xlabel="epoch", ylabel="loss", title="Loss")
    for name in EPOCH_METRICS:
        values = history.get(f"val_{name}", [])  # a metric added to EPOCH_METRICS after a resumed run began
        axes[1].plot(epochs[len(epochs) - len(values):], values, "o-", label=f"validation {name}")
    axes[1].set(xlabel="epoch", ylabel="score", title="Validation " + ", ".join(EPOCH_METRICS), ylim=(0, 1))
    axes[2].plot(epochs, history["lr"], "o-", color="tab:green", label="learning rate")
    axes[2].set(xlabel="epoch", ylabel="learning rate", title="Learning rate (at each epoch's end)")
    for ax in axes:
        if best_epoch:
            ax.axvline(best_epoch, color="gray", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(path, fig)


def figure(width: float, height: float):
    """A matplotlib figure that needs no screen and no pyplot state, so the writer thread can draw it."""
    try:
        from matplotlib.figure import Figure
    except ValueError as e:  # an unknown MPLBACKEND fails matplotlib's import
        raise UserError(f"MPLBACKEND={os.environ.get('MPLBACKEND')}: {first_line(e)}; unset it") from None
    return Figure(figsize=(width, height), layout="constrained")


def plot_test_results(vis: Path, pictures: tuple, dice: np.ndarray, names: list[str], cfg: Config) -> None:
    """Random test images, the worst ones, and the Dice histogram."""
    count = min(cfg.test_samples, len(names))
    sample = np.random.default_rng(cfg.seed).choice(len(names), size=count, replace=False)
    for path, which, title in ((vis / "test_samples.png", sample, f"{count} random test images"),
                               (vis / "worst_predictions.png", np.argsort(dice, kind="stable")[:count],
                                f"the {count} test images with the lowest Dice")):
        if count:
            save_contours(path, tuple(p[which] for p in pictures), title, [names[i] for i in which], dice[which])
    fig = figure(6, 4)
    ax = fig.subplots()
    ax.hist(dice, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    ax.axvline(float(dice.mean()), color="tab:red", label=f"mean {dice.mean():.3f}")
    ax.set(xlabel="Dice per test image", ylabel="images", title="Test Dice per image")
    ax.legend()
    save_figure(vis / "test_dice_histogram.png", fig)


# =============================================================================
# The machinery: what runs the pipeline above, but decides none of its numbers
# =============================================================================


# -----------------------------------------------------------------------------
# Device, precision and layout, by fixed rules


@dataclass
class Machine:
    """Where and how the model runs; shared by training, evaluation and prediction."""
    device: torch.device
    dtype: torch.dtype | None = None  # autocast precision; None: float32
    channels_last: bool = False

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)


LOG_FILES: list = []  # the run's open train.log: log() and warn() write there too


def log(text: str, console: bool = True) -> None:
    if console:
        tqdm.write(text, file=sys.stdout)  # above a progress bar, never on its line
        sys.stdout.flush()
    for f in LOG_FILES:
        f.write(text + "\n")
        f.flush()


RUN_WARNINGS: list[str] = []  # this run's warnings, kept in metrics.json beside the numbers they qualify


def warn(message: str) -> None:
    RUN_WARNINGS.append(message)
    tqdm.write(f"warning: {message}", file=sys.stderr)
    for f in LOG_FILES:
        f.write(f"warning: {message}\n")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
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
        device = torch.device("cuda", device.index or 0)
        # A GPU older than every compute capability this build has code for fails at its first kernel: say it now.
        built = [int(m.group(1)) for m in (re.match(r"sm_(\d+)", a) for a in torch.cuda.get_arch_list()) if m]
        major, minor = torch.cuda.get_device_capability(device)
        if built and major * 10 + minor < min(built):
            raise UserError(f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) is older than "
                            f"every GPU this PyTorch {torch.__version__} build supports (from {min(built) / 10:.1f}): "
                            f"install a PyTorch build for it (README, 'Which GPUs'), or use --device cpu")
        torch.cuda.set_device(device)  # libraries that say just "cuda" mean this one
    return device


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX, where bf16 trained 2.2x faster (oneDNN's check also passes emulated bf16)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast precision (None: float32) by a fixed rule of the machine and --amp, and why."""
    if amp == "off":
        return None, "--amp off"
    if amp in ("bf16", "fp16"):
        return (torch.bfloat16 if amp == "bf16" else torch.float16), f"--amp {amp}"
    if device.type == "cuda":  # bf16 only where it is native (compute capability 8+), else fp16 with a scaler
        native = torch.cuda.get_device_capability(device)[0] >= 8
        return (torch.bfloat16, "a GPU with bf16") if native else (torch.float16, "a GPU without bf16")
    if cpu_has_native_bf16():
        return torch.bfloat16, "a CPU with native bf16; --amp off for float32"
    return None, "a CPU without native bf16"


def set_up_machine(cfg: Config, machine: Machine | None = None) -> Machine:
    """This command's device (or `machine`'s), precision and layout by fixed rules, logged."""
    machine = machine or Machine(pick_device(cfg.device))
    if machine.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic  # autotuned kernels differ run to run
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
    machine.dtype, why = precision(cfg.amp, machine.device)
    # Channels-last trained 40% faster on an AVX-512 CPU (bf16 and float32) and 22% slower on an AVX2 one.
    layout = machine.device.type == "cuda" or torch.backends.cpu.get_cpu_capability() == "AVX512"
    machine.channels_last = cfg.channels_last and layout
    changed = [f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items() if v != getattr(Config(), k)
               and k not in ("out_dir", "data_dir", "resume")]
    log(f"settings: {', '.join(changed) or 'the defaults'} (all of them in config.json)")
    log(f"device: {machine.device}" + (f" ({torch.cuda.get_device_name(machine.device)})" if machine.device.type ==
                                       "cuda" else f" ({torch.get_num_threads()} threads)")
        + f"; precision: {precision_name(machine)} ({why}); channels-last: {machine.channels_last}")
    return machine


def precision_name(machine: Machine) -> str:
    return str(machine.dtype or torch.float32).removeprefix("torch.")


# -----------------------------------------------------------------------------
# Resuming a run: the checkpoint, checked once


def resumed_state(cfg: Config, typed: frozenset) -> tuple[Config, dict | None]:
    """With --resume: the checkpoint and its settings, the typed resumable ones replaced; else (cfg, None)."""
    if not cfg.resume:
        return cfg, None
    path = Path(cfg.resume) if Path(cfg.resume).suffix == ".pth" else Path(cfg.resume) / "last.pth"
    if "out_dir" in typed and Path(cfg.out_dir).resolve() != path.parent.resolve():
        raise UserError(f"--out-dir {cfg.out_dir} and --resume {cfg.resume} name two folders: a resumed run continues "
                        f"in its own folder, {path.parent}. Leave out --out-dir, or start a new run there")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: no such run folder to resume")
    if not path.exists():
        hint = (f"it is a cross-validation: continue it with {command('cross_validate.py', '--resume', path.parent)}"
                if (path.parent / CV_RECORD).is_file() else "start a new run without --resume")
        raise UserError(f"{path}: no resumable state (last.pth) to continue; {hint}")
    try:
        state = load_checkpoint(path, resumable=True)
    except UserError as e:
        raise UserError(f"{e}. It cannot be continued: start a new run") from None
    saved = saved_config(state["config"], path)
    resumed = resumed_settings(saved, cfg, typed)
    if is_finished(path.parent) and resumed.epochs <= state["epoch"]:
        raise UserError(f"{path.parent} holds a finished run (metrics.json): nothing is left to do. Train it further "
                        f"with --resume {path.parent} --epochs N (N above its epochs), or start a new run")
    if resumed.epochs < state["epoch"]:
        raise UserError(f"--epochs {resumed.epochs}: {path} has trained {state['epoch']} epochs already; pass more")
    if saved.folds and resumed.epochs != saved.epochs and not cfg.folds:  # its cross-validation decides, for all
        again = command("cross_validate.py", "--resume", path.parent.parent, "--epochs", resumed.epochs)
        raise UserError(f"{path.parent} is fold {saved.fold} of a cross-validation, whose folds share their "
                        f"epochs: train them all further with {again}")
    if resumed.epochs != saved.epochs and saved.schedule == "onecycle":
        warn(f"--epochs {resumed.epochs} (was {saved.epochs}): the one-cycle schedule is stretched to the new length, "
             f"so the learning rate jumps to where that schedule is at this epoch")
    cfg = dataclasses.replace(resumed, resume=str(path), out_dir=str(path.parent), fold=saved.fold)  # a run's own
    log(f"resuming {path} at epoch {state['epoch'] + 1}")
    return cfg, state


def resumed_settings(saved: Config, cfg: Config, typed: frozenset) -> Config:
    """A resumed run's settings: its saved ones, the typed resumable ones, this command's; others refused."""
    free = [f.name for f in dataclasses.fields(Config) if f.metadata.get("resumable")]
    fixed = [k for k in sorted(typed) if k not in free and getattr(cfg, k) != getattr(saved, k)]
    if fixed:
        raise UserError(f"{', '.join(option(k) for k in fixed)}: a resumed run keeps the settings it was trained with "
                        f"(only {', '.join(map(option, free))} can change); start a new run to change them")
    now = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config) if f.metadata.get("now")}
    return dataclasses.replace(saved, **{**{k: getattr(cfg, k) for k in typed if k in free}, **now})


def is_finished(folder: Path) -> bool:
    """A run is finished once its test is written: metrics.json comes last."""
    return (folder / "metrics.json").is_file()


def load_checkpoint(path: Path | str, resumable: bool = False) -> dict:
    """A checkpoint, loaded without running code stored in it and checked whole: the one place that decides."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about old pickle protocols before refusing
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    except Exception:  # torch raises many kinds for damaged or foreign files
        raise UserError(f"{path}: not a checkpoint this script can load (damaged, truncated, another kind of file, "
                        f"or one holding Python objects, which could run code when loaded)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this script's U-Net")
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint format version {state.get('version')}, but this script reads version "
                        f"{CHECKPOINT_VERSION}; use the script version that wrote it")
    if resumable and state.get("optimizer") is None:
        raise UserError(f"{path}: a best-model file, not a resumable state (that is last.pth, beside it)")
    try:
        saved_config(state["config"], path)
        values = {"threshold not between 0 and 1": not 0 <= state["threshold"] <= 1,
                  "epoch below 0": state["epoch"] < 0,
                  "saved within an epoch by an earlier version of this script": resumable and state.get("step", 0),
                  "best epoch unknown": not 0 <= state["best"]["epoch"] <= state["epoch"] + 1,
                  "split parts missing": not all(isinstance(state["split"][p], list) for p in ("train", "val", "test"))
                  or resumable and not {"how", "unit", "groups", "files"} <= set(state["split"]),
                  "history not a table of lists": not all(isinstance(v, list) for v in state["history"].values()),
                  "weights that are not finite": not all(torch.isfinite(v).all() for v in state["model"].values())}
    except KeyError as e:
        raise UserError(f"{path}: damaged checkpoint, {e.args[0]} missing; use another checkpoint") from None
    except (TypeError, AttributeError):
        raise UserError(f"{path}: damaged checkpoint, a part of it of the wrong type; use another checkpoint") from None
    for what, bad in values.items():
        if bad:
            raise UserError(f"{path}: damaged checkpoint, {what}")
    return state


def learned_fields() -> list[str]:
    """The settings that change what a run learns (the others: the machine, the outputs, run control)."""
    return [f.name for f in dataclasses.fields(Config) if f.metadata.get("learns", True)]


CV_RECORD = "cross_validation.json"  # in the folder cross_validate.py creates: K and the settings its folds share


def saved_config(config: dict, path: Path | str) -> Config:
    """A run's saved settings as a checked Config; a learned field not in BEFORE_FIELD_EXISTED must be there."""
    if not isinstance(config, dict):
        raise UserError(f"{path}: its settings are not a table of fields")
    missing = [k for k in learned_fields() if k not in config and k not in BEFORE_FIELD_EXISTED]
    if missing:
        raise UserError(f"{path}: its settings lack {', '.join(missing)}, which decide what it learned or predicts "
                        f"(written by another version of this script?); use that version, or train anew")
    if "overwrite" in config and isinstance(config.get("fold"), int):  # saved before --fold became 1-based
        config = {**config, "fold": config["fold"] + 1}
    try:
        return Config(**BEFORE_FIELD_EXISTED | {k: v for k, v in config.items() if k in Config.__dataclass_fields__})
    except UserError as e:
        raise UserError(f"{path}: its settings are invalid: {e}") from None


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()  # torch.save into a file turns its OSError (a full disk) into a RuntimeError
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


# -----------------------------------------------------------------------------
# Files: each program writes only into a folder it creates, each file whole


@contextlib.contextmanager
def run_folder(cfg: Config, resume: dict | None, made: bool = False):
    """The run's folder, locked, the console copied to its train.log; removed if new and stopped early."""
    folder = Path(cfg.out_dir) if resume or made else new_folder(cfg.out_dir, "outputs", run_name(cfg), "training")
    lock = FileLock(folder / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{folder} is in use by another run; wait for it to end") from None
    log_file = open(folder / "train.log", "a", encoding="utf-8", errors="backslashreplace")
    LOG_FILES.append(log_file)
    log(f"run folder: {folder}" + (" (resumed)" if resume else ""))
    keep = True
    try:
        yield folder
    except BaseException as e:
        log(f"error: {e}" if isinstance(e, UserError) else f"stopped by {type(e).__name__}: {first_line(e)}",
            console=False)
        keep = bool(resume) or (folder / "last.pth").exists()
        raise
    finally:
        LOG_FILES.remove(log_file)
        log_file.close()
        lock.release()
        if not keep:  # its own files only: an epoch's plots may be written before a checkpoint fails
            plots = [p.relative_to(folder) for p in folder.glob("visualizations/epochs/epoch_[0-9][0-9][0-9].png")]
            demo = [f"demo-data/{part}/{i}.png" for part in ("images", "masks") for i in range(1, cfg.demo_images + 1)]
            discard(folder, ["train.log", "config.json", "split.json", "history.csv", ".lock", "model.pth",
                             "visualizations/loss_curves.png", *plots, *(demo if cfg.demo else [])])


def start_records(folder: Path, cfg: Config, split: dict, resume: dict | None) -> None:
    """The run's settings and split; a resumed run's earlier test, which no longer describes it, goes."""
    for sub in (folder / "visualizations", folder / "visualizations" / "epochs"):
        if sub.exists() and not sub.is_dir():  # before anything changes: the plots could not be written
            raise UserError(f"{sub} is a file where the run's plots go; move it out of {folder} and run again")
    save_json(folder / "config.json", dataclasses.asdict(cfg))
    save_json(folder / "split.json", split)
    for name in TEST_FILES if resume else ():
        (folder / name).unlink(missing_ok=True)


TEST_FILES = ("metrics.json", "test_per_image.csv", "visualizations/test_samples.png",
              "visualizations/worst_predictions.png", "visualizations/test_dice_histogram.png")


def run_name(cfg: Config) -> str:
    """The default folder name after the date and time: what was trained, so that a listing reads."""
    return "-".join(["demo" if cfg.demo else cfg.recipe, f"seed{cfg.seed}", *([f"cv{cfg.folds}"] if cfg.folds else [])])


def new_folder(given: str, parent: str, name: str, program: str) -> Path:
    """`given`, or a new PARENT/DATE-TIME-NAME[-N], created: os.mkdir is atomic, so it is also the claim."""
    if given:
        return create_folder(Path(given), program)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = Path(parent) / f"{stamp}-{name}{f'-{n}' if n > 1 else ''}"
        with contextlib.suppress(FileExistsError):  # taken: the next name
            return create_folder(path, program, quiet=True)
    raise UserError(f"{parent}: no free folder name for {stamp}-{name}; choose one with --out-dir or --out")


def create_folder(path: Path, program: str, quiet: bool = False) -> Path:
    """Create `path` and missing parents; an existing path is refused (other OSErrors run_cli words)."""
    made = [p for p in path.parents if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file in the way: not the FileExistsError a taken default name raises
        raise NotADirectoryError(errno.ENOTDIR, e.strerror, e.filename) from None
    try:
        path.mkdir()
    except FileExistsError:
        if quiet:
            raise
        way = f"; to continue that run, pass --resume {path}" if resumes(program) else ""
        raise UserError(f"{path} exists already: {program} writes only into a folder it creates; name a new one, or "
                        f"leave the option out for a new time-stamped one{way}") from None
    MADE_PARENTS[path] = made
    return path


MADE_PARENTS: dict = {}  # the parents each new folder of this command needed, for discard()


def discard(folder: Path, names: list[str]) -> None:
    """Remove the files this command wrote, then the folders it made if empty: nothing else is touched."""
    for name in names:
        with contextlib.suppress(OSError):
            (folder / name).unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    for made in [folder, *MADE_PARENTS.pop(folder, [])]:
        with contextlib.suppress(OSError):
            made.rmdir()


def atomic_write(path: Path | str, write) -> None:
    """Write a temporary file beside `path`, fsync, rename: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name[:64]}.{os.urandom(6).hex()}.tmp"  # a long name fits too
    try:
        with open(tmp, "xb") as f:  # unlike mkstemp's private file, the user's umask decides who reads it
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:  # a write's error names no file: name the one meant
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def save_json(path, obj) -> None:
    """Strict JSON: NaN and infinity, which strict readers reject, become null."""
    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        return [strict(v) for v in value] if isinstance(value, (list, tuple)) else value

    text = json.dumps(strict(obj), indent=2, allow_nan=False)
    atomic_write(path, lambda f: f.write((text + "\n").encode()))


def save_csv(path, rows: list[dict]) -> None:
    """Rows as CSV; the columns are every key that appears, in order of first appearance."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(utf8(buf.getvalue())))


def utf8(text: str) -> bytes:
    """Text whose non-UTF-8 file names (held as surrogates) become their bytes, not an error."""
    return text.encode("utf-8", "surrogateescape")


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
# Data: the Kaggle download, or the demo's synthetic slices


def resolve_data_dir(cfg: Config, folder: Path) -> Path:
    """The data folder, absolute: --demo's slices made in the run's folder, --data-dir, or Kaggle's, downloaded."""
    if cfg.demo:
        demo = folder / "demo-data"
        if not demo.is_dir():  # a resumed demo run has them already
            log(f"generating {cfg.demo_images} synthetic slices in {demo}")
            make_synthetic_dataset(demo, cfg.demo_images, seed=42)  # the same for every seed: runs compare
        return demo.resolve()
    if cfg.data_dir:
        return Path(cfg.data_dir).resolve()
    folder = Path(DEFAULT_DATA_DIR)
    # The lock lives in the temporary folder, so that the data folder's parent holds nothing else.
    key = hashlib.sha256(os.fsencode(folder.resolve())).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"brain-tumor-segmentation-{key}.lock"):
        if not folder.is_dir():  # else downloaded by an earlier run: checked, never fetched again
            download_dataset(folder)
        check_kaggle_download(folder)
        return folder.resolve()


def make_synthetic_dataset(folder: Path | str, n: int, size: int = 128, seed: int = 0) -> Path:
    """n MRI-like slices and masks: skull, brain, ventricles, noise, varied tumours (15% have none)."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for part in ("images", "masks"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def ellipse(cx, cy, ax, ay, angle):
        c, s = math.cos(angle), math.sin(angle)
        u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
        return (u / ax) ** 2 + (v / ay) ** 2

    def smooth_noise(scale, amplitude):
        noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), scale)
        return noise / (noise.std() + 1e-6) * amplitude

    for i in range(n):
        head = ellipse(0.5 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02), rng.uniform(0.36, 0.44),
                       rng.uniform(0.41, 0.47), rng.uniform(-0.3, 0.3))
        brain = head < 0.78
        image = np.where(head < 1.0, 0.8, 0.0).astype(np.float32) * ~brain  # skull and scalp
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
            image[mask] = 0.38 + contrast
            if rng.random() < 0.3:  # ring-enhancing tumours have a darker core
                image[mask & (blob < 0.45)] = 0.38 + contrast * 0.3
            image += mask * smooth_noise(size / 40, 0.04)
        image = cv2.GaussianBlur(image, (0, 0), 0.8) + rng.normal(0, 0.03, (size, size)).astype(np.float32)
        image *= rng.uniform(0.8, 1.15)  # scanners differ in overall brightness
        cv2.imwrite(str(folder / "images" / f"{i + 1}.png"), np.clip(image * 255, 0, 255).astype(np.uint8))
        cv2.imwrite(str(folder / "masks" / f"{i + 1}.png"), mask.astype(np.uint8) * 255)
    return folder


def check_kaggle_download(root: Path) -> None:
    """Refuse a partial or changed download: it must hold exactly the pairs 1..3064 (as patients.csv)."""
    expected = {str(i) for i in range(1, KAGGLE_PAIRS + 1)}
    images, masks = set(list_images(root / "images")), set(list_images(root / "masks"))
    if images != expected or masks != expected:
        missing, extra = len(expected - (images & masks)), len((images | masks) - expected)
        raise UserError(f"{root}: {len(images)} images and {len(masks)} masks, but {KAGGLE_DATASET} has "
                        f"{KAGGLE_PAIRS} pairs 1..{KAGGLE_PAIRS} ({missing} missing, {extra} unexpected): a partial "
                        f"or changed download, not trained on. Delete {root} to download it anew, or pass --data-dir")


def download_dataset(dest: Path) -> None:
    """The Kaggle dataset, downloaded into a temporary folder beside `dest`, checked, then moved into place."""
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    try:
        log(f"downloading {KAGGLE_DATASET} with kagglehub into {tmp} ...")
        try:
            fetch_with_kagglehub(tmp / "kagglehub")
        except Exception as e:
            raise UserError(f"the dataset is not at {dest} and could not be downloaded: {download_failure(e)}.\n"
                            f"Ways forward:\n"
                            f"  1. with network, run again: kagglehub downloads {KAGGLE_DATASET} without an account\n"
                            f"  2. download it by hand from https://www.kaggle.com/datasets/{KAGGLE_DATASET} and pass "
                            f"--data-dir DIR (a folder with images/ and masks/)\n"
                            f"  3. --demo: train on generated synthetic data, offline") from None
        roots = [p.parent for p in sorted((tmp / "kagglehub").rglob("images"))
                 if p.is_dir() and (p.parent / "masks").is_dir()]
        if not roots:
            raise UserError(f"the download has no images/ and masks/ folders; download it by hand, pass --data-dir")
        check_kaggle_download(roots[0])
        if not dest.exists():  # another machine that shares this folder may have been first
            os.replace(roots[0], dest)
        log(f"dataset ready in {dest}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # a failed download leaves no trace, not even the folder
            with contextlib.suppress(OSError):
                folder.rmdir()


def fetch_with_kagglehub(folder: Path) -> None:
    """kagglehub needs no account for this public dataset."""
    import kagglehub
    kagglehub.dataset_download(KAGGLE_DATASET, output_dir=str(folder))


def download_failure(e: BaseException) -> str:
    """Why the download failed, in words a user can act on."""
    if isinstance(e, ImportError):
        return (f"the Python package {e.name or 'it needs'} is missing: install the project's requirements "
                f"(pip install -r requirements.txt)")
    import requests  # what kagglehub speaks HTTP through
    if isinstance(e, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout)):
        return "no network: Kaggle could not be reached (name lookup or connection failed)"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return (f"refused by Kaggle (HTTP {status}): the dataset asks for an account or for consent; kagglehub "
                f"reads Kaggle credentials (~/.kaggle/kaggle.json, or KAGGLE_USERNAME and KAGGLE_KEY)")
    return f"Kaggle answered HTTP {status}" if status is not None else f"{type(e).__name__}: {first_line(e)}"


# -----------------------------------------------------------------------------
# Settings from the command line, checked against the fields' own rules


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_fields(obj) -> None:
    """Each field against its annotation (so a default edited to "20" or 16.0 is refused) and its rules."""
    hints, where = get_type_hints(type(obj)), Path(sys.modules[type(obj).__module__].__file__).name
    for f in dataclasses.fields(obj):
        value, kind, rules, flag = getattr(obj, f.name), hints[f.name], f.metadata, option(f.name)
        choices = choices_of(kind, rules)
        if kind is float and type(value) is int:
            value = float(value)
            setattr(obj, f.name, value)
        expected = str if choices else list if get_origin(kind) is list else kind
        if type(value) is not expected or (expected is list and not all(type(v) is str for v in value)):
            raise UserError(f"{flag} {value!r}: must be {'a list of text' if expected is list else expected.__name__},"
                            f" not {type(value).__name__} (edited at the top of {where}?)")
        if choices is not None and value not in choices:
            raise UserError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        if kind is float and not math.isfinite(value):
            raise UserError(f"{flag} {value}: must be a finite number")
        if any(type(rules[r]) not in (int, float) for r in ("above", "low", "high") if r in rules):
            raise UserError(f"the bounds of {f.name} must be numbers, not {rules} (edited at the top of {where}?)")
        bound = [(rules.get("share") and not 0 <= value <= 1, "between 0 and 1"),
                 ("above" in rules and value <= rules["above"], f"above {rules.get('above')}"),
                 ("low" in rules and value < rules["low"], f"at least {rules.get('low')}"),
                 ("high" in rules and value > rules["high"], f"at most {rules.get('high')}")]
        for broken, what in bound:
            if broken:
                raise UserError(f"{flag} {value}: must be {what}")


def choices_of(hint, rules) -> tuple | None:
    """The allowed values of a field: its Literal annotation's, or its `choices` rule's (None: any)."""
    return get_args(hint) if get_origin(hint) is Literal else rules["choices"]() if "choices" in rules else None


def check_batch_fits(cfg: Config, n_train: int) -> None:
    """Batch norm needs two values per channel: at 16x16 the bottleneck is 1x1, so a batch of one fails."""
    if n_train < 1:
        raise UserError("no training image: add data")
    if min(cfg.batch_size, n_train) * (cfg.image_size // 16) ** 2 < 2:
        raise UserError(f"--image-size {cfg.image_size} with batches of {min(cfg.batch_size, n_train)} image: batch "
                        f"norm needs 2 values; use 2 training images and --batch-size 2 or more, or --image-size 32")


def build_parser(kind, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """One option per field, nothing filled in: what was parsed is what was typed."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    hints = get_type_hints(kind)
    for f in dataclasses.fields(kind):
        rules, hint = f.metadata, hints[f.name]
        if rules.get("positional"):
            parser.add_argument(f.name, nargs="+", metavar=rules.get("metavar", f.name.upper()), help=rules["help"])
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{rules['help']} (default: {default!r})")
        names, choices = [option(f.name), *rules.get("aliases", ())], choices_of(hint, rules)
        if hint is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        else:  # choices are shown, and checked by check_fields: one sentence, as for every other field
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            parser.add_argument(*names, type=str if choices else hint, metavar=metavar, **common)
    return parser


def config_from_args(argv: list[str], description: str = "Train a U-Net on brain MRI.") -> tuple[Config, frozenset]:
    """The defaults, then the --demo and --recipe seed presets, then what was typed; and the typed fields."""
    typed = vars(build_parser(Config, description).parse_args(argv))
    for name, preset in (("DEMO_DEFAULTS", DEMO_DEFAULTS), ("SEED_RECIPE", SEED_RECIPE)):
        unknown = sorted(set(preset) - {f.name for f in dataclasses.fields(Config)})
        if unknown:
            raise UserError(f"{name} sets {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not a "
                            f"field of Config (edited at the top of {Path(__file__).name}?)")
    values = {**(DEMO_DEFAULTS if typed.get("demo", Config.demo) else {}),
              **(SEED_RECIPE if typed.get("recipe", Config.recipe) == "seed" else {}), **typed}
    if values.get("demo") and "data_dir" in typed:
        raise UserError("--demo generates its slices into the run's folder: drop --data-dir, or --demo")
    if values.get("groups"):  # saved absolute, so that a run resumes from any working folder
        values["groups"] = str(Path(values["groups"]).resolve())
    if values.get("folds") and {"val_fraction", "test_fraction"} & set(typed):
        raise UserError("--val-fraction and --test-fraction size the single split; with --folds K, test and "
                        "validation are a K-th of the patients each: drop them")
    return Config(**values), frozenset(typed)


def command(script: str, *args) -> str:
    """A command line for `script` that works pasted from any folder: this Python, absolute, quoted."""
    return shlex.join([sys.executable, str(Path(__file__).resolve().parent / script), *map(str, args)])


def resumes(program: str) -> bool:
    """Whether --resume continues what `program` was doing (predict, compare and export have none)."""
    return program in ("training", "cross-validation")


def first_line(e: BaseException) -> str:
    """The first line of an error's text, cut at 120 characters: enough to name a cause."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 120 else text[:120].rsplit(" ", 1)[0] + " ..."


def is_out_of_memory(e: BaseException) -> bool:
    """torch reports a failed CPU allocation as a plain RuntimeError: its text is the only sign."""
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "not enough memory" in str(e)))


def write_failure(e: OSError, program: str) -> str:
    """One sentence for an output that could not be written (reads became warnings or UserError)."""
    where = e.filename or "an output file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        way = " (a run that saved last.pth continues with --resume)" if resumes(program) else ""
        return (f"{'the file is larger than this system allows' if e.errno == errno.EFBIG else 'the disk is full'} "
                f"(writing {where}); files are written whole, so none is half-written: free space, run again{way}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write {where}; choose another output folder"
    if e.errno == errno.ENOTDIR:
        return f"cannot write {where}: a file stands where one of its folders should be"
    return f"cannot write {where}: {e.strerror or e}"


def run_cli(entry, program: str, oom_hint=lambda: "a smaller --batch-size or --eval-batch-size") -> int:
    """One entry point as a command: every failure the user can act on is one sentence on stderr, exit code 1."""
    for stream in (sys.stdout, sys.stderr):  # a file name the terminal cannot show must not fail the run
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    with contextlib.suppress(ValueError):  # SIGTERM stops as Ctrl-C does (which a parent may have ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, stop_by_sigterm)
    code = 1
    try:
        entry()
        return 0
    except Interrupted as e:
        code, message = e.code, str(e)
    except KeyboardInterrupt as e:
        way = "; a run that saved last.pth continues with --resume" if resumes(program) else ""
        code = 143 if isinstance(e, Terminated) else 130
        message = f"aborted (Ctrl-C or SIGTERM); files are written whole, so nothing is half-written{way}"
    except UserError as e:
        message = f"error: {e}"
    except OSError as e:
        message = f"error: {write_failure(e, program)}"
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        message = f"error: out of memory ({first_line(e)}). Try {oom_hint()}, or close other programs"
    print(message, file=sys.stderr, flush=True)
    return code


def stop_by_sigterm(signum, frame):
    raise Terminated


def run_tool(kind, entry, description: str, prog: str, argv: list[str] | None) -> int:
    """Another tool's command line (predict, compare, export): its dataclass, parsed and checked as training's."""
    parser = build_parser(kind, description, prog=prog)
    return run_cli(lambda: entry(kind(**vars(parser.parse_args(sys.argv[1:] if argv is None else argv)))), prog)


def main(argv: list[str] | None = None) -> int:
    state = {}

    def entry():
        cfg, typed = config_from_args(sys.argv[1:] if argv is None else argv)
        state["cfg"] = cfg
        if cfg.resume and {"folds", "fold"} & typed:
            raise UserError("--folds and --fold choose a new run's split: a resumed run keeps its own (a cross-"
                            "validation's folds continue with python cross_validate.py --resume ROOT)")
        if cfg.folds and not cfg.fold:
            raise UserError(f"--folds {cfg.folds} without --fold N trains {cfg.folds} models: python cross_validate.py "
                            f"--folds {cfg.folds} ... runs them all in one folder; --fold N trains fold N's run alone")
        train(cfg, typed)

    def oom_hint():
        cfg = state.get("cfg", Config())
        if cfg.resume:
            return "a new run with a smaller --batch-size (a resumed run keeps its batch size)"
        return f"--batch-size {max(1, cfg.batch_size // 2)}"

    return run_cli(entry, "training", oom_hint)


if __name__ == "__main__":
    # predict.py and compare.py import this file by name: let that be this module, not a second copy
    # (a second copy would have its own UserError, which this one's handler would not catch).
    sys.modules.setdefault("brain_tumor_segmentation", sys.modules[__name__])
    sys.exit(main())
