"""The plots: the test's failures drawn as contours in a legible grid, the loss curves with the best
epoch and the learning rate, and the epoch panels (Original | Ground truth | Prediction)."""
from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import brain_tumor_segmentation as bts
from conftest import SCRIPT, TINY_ARGS, one_error, squares_dataset

GREEN, RED = (0, 200, 0), (0, 0, 255)


def pictures(n: int, size: int = 32):
    images = np.full((n, size, size), 60, np.uint8)
    truth = np.zeros((n, size, size), np.uint8)
    pred = np.zeros((n, size, size), bool)
    truth[:, 4:14, 4:14] = 1
    pred[:, 6:18, 6:18] = True
    return images, truth, pred


def has(picture: np.ndarray, colour) -> bool:
    return bool((picture == np.array(colour, np.uint8)).all(axis=2).any())


def test_contours_of_the_truth_and_the_prediction_in_a_grid_at_a_legible_size(tmp_path):
    path = tmp_path / "grid.png"
    bts.save_contours(path, pictures(7), "7 test images", [f"scan{i}" for i in range(7)], np.linspace(0.1, 0.7, 7))
    grid = cv2.imread(str(path))
    assert has(grid, GREEN) and has(grid, RED)  # the ground truth and the prediction, two colours
    tile_height = 256 + 44 + 6  # each 32-pixel scan drawn at 256 pixels, under a 44-pixel label, in a border
    assert grid.shape[0] == 32 + 2 * tile_height  # 7 images in rows of 5: two rows
    assert grid.shape[1] == 5 * (256 + 6)


@pytest.mark.slow
def test_a_finished_run_draws_its_test_samples_and_worst_cases_as_contours(tmp_path):
    data = squares_dataset(tmp_path / "data", 20, seed=4)
    assert bts.main(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *TINY_ARGS]) == 0
    for name in ("test_samples.png", "worst_predictions.png"):
        picture = cv2.imread(str(tmp_path / "run" / "visualizations" / name))
        assert picture.ndim == 3 and picture.shape[1] >= 256 and has(picture, GREEN)
    panel = cv2.imread(str(tmp_path / "run" / "visualizations" / "epochs" / "epoch_001.png"), cv2.IMREAD_GRAYSCALE)
    assert panel.shape[1] == 3 * 256 + 8  # Original | Ground truth | Prediction, side by side


def test_the_loss_curves_mark_the_best_epoch_and_show_the_learning_rate(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(bts, "save_figure", lambda path, fig: drawn.update(fig=fig))
    history = {"epoch": [1, 2, 3], "train_loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.95],
               "val_dice": [0.2, 0.5, 0.4], "val_iou": [0.1, 0.4, 0.3], "lr": [1e-3, 2e-3, 1e-4]}
    bts.plot_curves(tmp_path / "curves.png", history, best_epoch=2)
    axes = drawn["fig"].axes
    assert [ax.get_ylabel() for ax in axes] == ["loss", "score", "learning rate"]
    for ax in axes:
        marks = [line for line in ax.get_lines() if list(line.get_xdata()) == [2, 2]]
        assert marks and "best epoch (2)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert list(axes[2].get_lines()[0].get_ydata()) == pytest.approx(history["lr"])


@pytest.mark.subprocess
def test_an_unknown_mplbackend_is_one_sentence_naming_it(tmp_path):
    """matplotlib refuses to import under an unknown MPLBACKEND: the run says so, without a traceback."""
    command = [sys.executable, str(SCRIPT), "--demo", "--demo-images", "20", *TINY_ARGS, "--out-dir", str(tmp_path / "r")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MPLBACKEND": "nonsense", "OMP_NUM_THREADS": "1"})
    one_error(result.returncode, result.stderr, "MPLBACKEND=nonsense:", "unset it")
