"""Shared helpers for the tests of brain_tumor_segmentation.py, predict.py and compare.py.

One test file per section of the trainer (test_config, test_data, test_split, ...), one per tool,
and test_end_to_end.py for whole commands. The tests are deliberately tiny (images of 16-64 pixels,
a handful of pairs, U-Nets of width 4-8) so that most of the suite runs in a minute on a CPU.
Markers: `slow` (whole runs of several seconds), `subprocess` (a fresh Python process),
`root` (needs root: mounts); `pytest -m "not slow"` runs the fast part alone."""
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
REAL_DIR = REPO_ROOT.parent / "shared" / "data"
SCRIPT = REPO_ROOT / "brain_tumor_segmentation.py"

cv2.setNumThreads(1)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on 2 cores shared with another test process
    (make test runs two) threads that wait for each other made tiny runs 2-2.5 times slower."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def squares_dataset(folder, n: int, seed: int, size: int = 32, empty: int = 0) -> Path:
    """images/sqI.png and masks/sqI.png: square_pair slices with squares of random size and
    position (mask = the square); the last `empty` images have no square."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        side = int(rng.integers(6, 15))
        top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
        image, mask = square_pair(size=size, top=top, left=left, side=side, seed=seed * 1000 + i)
        if i >= n - empty:
            image[mask > 0] = 40
            mask[:] = 0
        write_pair(folder, f"sq{i}", image, mask)
    return Path(folder)


def make_dataset(folder, n: int = 20) -> Path:
    """n pairs of 48x48 slices named 1..n with a bright square tumour (the hostile-input tests' data)."""
    for i in range(1, n + 1):
        k = (i - 1) % 20 + 1
        write_pair(folder, str(i), *square_pair(top=4 + k, left=24 - k, side=8 + i % 5, seed=i))
    return Path(folder)


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


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


# Arguments of a tiny training run: seconds on a CPU. float32, so that runs repeat exactly (--amp auto
# measures at start-up which precision is faster, and timings differ run to run).
TINY_ARGS = ["--amp", "off", "--image-size", "32", "--base-width", "4", "--batch-size", "8", "--epochs", "1",
             "--test-samples", "2", "--panel-images", "1", "--workers", "1"]


def snapshot(folder, ignore: str = "", inodes: bool = False) -> dict:
    """Relative path -> sha256 of every file under folder (names and bytes), folders as '<dir>';
    files named `ignore` left out. With `inodes`, files only, each as (sha256, inode, mtime_ns), so
    that a rewrite shows even with the same bytes (outputs are written through a rename)."""
    import hashlib
    folder = Path(folder)
    if not folder.exists():
        return {}
    state = {}
    for p in sorted(folder.rglob("*")):
        if p.name == ignore or (inodes and not p.is_file()):
            continue
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        state[str(p.relative_to(folder))] = (digest, p.stat().st_ino, p.stat().st_mtime_ns) if inodes else digest
    return state


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """bts.main(args) in this process; returns (return code, stdout, stderr)."""
    import brain_tumor_segmentation as bts
    capsys.readouterr()  # drop anything printed before
    rc = bts.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def without_root_override(command: list[str]) -> list[str]:
    """Root reads and writes any file: run `command` without that privilege, so that file
    permissions apply as they do to a user."""
    import os
    import shutil
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: file permissions cannot be tested")
        caps = "-dac_override,-dac_read_search"
        return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    return command


def one_error(rc: int, err: str, *fragments: str) -> str:
    """A refusal as the user sees it: exit code 1, one sentence on stderr (no traceback) that holds
    every fragment. Returns the message."""
    assert rc == 1, err
    assert "Traceback" not in err, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return message


def run_folders(parent) -> list[Path]:
    """The folders a program created under `parent` (its default outputs/, predictions/ or
    comparisons/), oldest first (their names start with the date and time)."""
    parent = Path(parent)
    return sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []


def train_tiny(capsys, data, out, *extra) -> Path:
    """A finished tiny training run of `data` into the new folder `out`; returns `out`."""
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", out, *TINY_ARGS, *extra)
    assert rc == 0, err
    assert (Path(out) / "metrics.json").is_file()
    return Path(out)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: whole runs of several seconds each; `pytest -m 'not slow'` leaves "
                                       "them out")
    config.addinivalue_line("markers", "subprocess: starts a fresh Python process (a few seconds of imports)")
    config.addinivalue_line("markers", "root: needs root (mounts a file system); skipped otherwise")


def no_training_figures(mp: pytest.MonkeyPatch) -> None:
    """Training exactly as it is, less the figures it draws at its end (loss curves, test panels and
    histogram), which tests of predict and compare never read: a third of each tiny run's time."""
    import brain_tumor_segmentation as bts
    mp.setattr(bts, "plot_curves", lambda *args: None)
    mp.setattr(bts, "plot_test_results", lambda *args: None)
