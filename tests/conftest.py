"""Shared helpers for the tests of brain_tumor_segmentation.py.

The tests are deliberately tiny (images of 16-64 pixels, a handful of pairs, U-Nets of
width 4-8) so that the whole suite runs in seconds on a CPU."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# /work/shared/data for /work/main; computed from the checkout so that a clone elsewhere
# finds the shared/ folder beside it.
REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

cv2.setNumThreads(1)


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    """Warnings are printed only by rank 0: make sure a stray RANK does not hide them."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def write_pair(folder, name, image_array, mask_array, ext=".png"):
    """Write images/NAME.ext and masks/NAME.ext under `folder` with cv2.imwrite; returns both paths."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    image_path = folder / "images" / f"{name}{ext}"
    mask_path = folder / "masks" / f"{name}{ext}"
    assert cv2.imwrite(str(image_path), image_array), image_path
    assert cv2.imwrite(str(mask_path), mask_array), mask_path
    return image_path, mask_path


def square_pair(size=48, top=10, left=12, side=16, seed=0):
    """A noisy dark uint8 slice with a bright square tumour, and its 0/255 mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 60, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    image[top:top + side, left:left + side] = 220
    mask[top:top + side, left:left + side] = 255
    return image, mask


@pytest.fixture
def tiny_dataset(tmp_path):
    """A data folder with 12 synthetic 48x48 pairs named 1..12 (pair 12 has no tumour)."""
    folder = tmp_path / "data"
    for i in range(1, 13):
        image, mask = square_pair(top=4 + i, left=20 - i, side=8 + i % 5, seed=i)
        if i == 12:
            image[mask > 0] = 40
            mask[:] = 0
        write_pair(folder, str(i), image, mask)
    return folder


@pytest.fixture
def real_dir():
    if not REAL_DIR.is_dir():
        pytest.skip(f"{REAL_DIR} not present")
    return REAL_DIR
