"""Post-processing chosen on validation (nnU-Net's way): each step of POSTPROCESSING is kept only if it
raises the validation Dice; the choice is saved in model.pth and metrics.json, applied in the test
and in predict.py, and --no-postprocess switches it off."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

import brain_tumor_segmentation as bts
import predict
from conftest import TINY_ARGS, squares_dataset


def blob(mask: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    mask[top:top + side, left:left + side] = True
    return mask


def test_largest_component_keeps_only_the_biggest_region():
    mask = blob(blob(np.zeros((32, 32), bool), 2, 2, 10), 20, 20, 3)
    kept = bts.largest_component(mask, mask.astype(np.float32))
    assert kept.sum() == 100 and not kept[20:23, 20:23].any()
    assert bts.largest_component(np.zeros((8, 8), bool), np.zeros((8, 8))).sum() == 0  # nothing to keep


def test_fill_holes_fills_an_enclosed_hole_only():
    ring = blob(np.zeros((32, 32), bool), 4, 4, 12)
    ring[8:12, 8:12] = False  # a hole inside
    filled = bts.fill_holes(ring, ring.astype(np.float32))
    assert filled[8:12, 8:12].all() and filled.sum() == 144
    notch = blob(np.zeros((32, 32), bool), 4, 4, 12)
    notch[4:8, 8:12] = False  # open to the outside: not a hole
    assert bts.fill_holes(notch, notch.astype(np.float32)).sum() == notch.sum()


def test_never_empty_falls_back_to_the_most_probable_region():
    prob = np.full((32, 32), 0.05, np.float32)
    prob[10:14, 10:14] = 0.4  # below the threshold, but the most probable region
    prob[25, 25] = 0.1
    empty = prob > 0.5
    assert not empty.any()
    region = bts.never_empty(empty, prob)
    assert region[10:14, 10:14].all() and region.sum() == 16
    full = blob(np.zeros((32, 32), bool), 0, 0, 3)
    assert np.array_equal(bts.never_empty(full, prob), full)  # a mask with tumour is left as it is


def test_postprocess_thresholds_then_applies_the_steps_in_turn():
    probs = np.zeros((2, 32, 32), np.float32)
    probs[0, 2:12, 2:12], probs[0, 20:22, 20:22] = 0.9, 0.9  # two regions
    probs[1, 5:9, 5:9] = 0.3  # nothing above 0.5
    assert bts.postprocess(probs, 0.5, []).sum(axis=(1, 2)).tolist() == [104, 0]
    assert bts.postprocess(probs, 0.5, ["largest_component"]).sum(axis=(1, 2)).tolist() == [100, 0]
    assert bts.postprocess(probs, 0.5, ["largest_component", "never_empty"]).sum(axis=(1, 2)).tolist() == [100, 16]


class Model(torch.nn.Module):
    """Logits fixed per image (the validation images' probabilities a test wants), whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.offset = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        start = int(x[0, 0, 0, 0].item() * 255 + 0.5)  # each image carries its own index in its first pixel
        return self.logits[start:start + len(x)] + self.offset


def choose(probs: np.ndarray, masks: np.ndarray, **settings) -> tuple[float, list[str]]:
    n = len(probs)
    images = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    logits = torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6))[:, None]
    cfg = bts.Config(image_size=32, tta=False, tune_threshold=False, eval_batch_size=n, **settings)
    return bts.choose_on_validation(Model(logits), bts.Machine(torch.device("cpu")), images,
                                    torch.from_numpy(masks)[:, None].to(torch.uint8), torch.arange(n), cfg)


def test_a_step_is_kept_only_where_it_raises_the_validation_dice(capsys):
    probs = np.zeros((4, 32, 32), np.float32)
    masks = np.zeros((4, 32, 32), bool)
    for i in range(4):
        probs[i, 4:14, 4:14] = 0.9
        masks[i, 4:14, 4:14] = True
        probs[i, 24:27, 24:27] = 0.9  # a stray false positive: largest_component helps
    threshold, steps = choose(probs, masks)
    assert threshold == 0.5 and steps == ["largest_component"]
    out = capsys.readouterr().out
    assert "largest_component kept" in out and "fill_holes left out" in out and "never_empty left out" in out
    assert choose(probs, masks, postprocess=False)[1] == []  # switched off: nothing tried
    assert "post-processing" not in capsys.readouterr().out


def test_a_step_that_lowers_the_validation_dice_is_left_out():
    probs = np.zeros((4, 32, 32), np.float32)
    masks = np.zeros((4, 32, 32), bool)
    for i in range(4):  # two true tumours each: keeping the largest only would miss one
        probs[i, 2:10, 2:10], probs[i, 20:26, 20:26] = 0.9, 0.9
        masks[i, 2:10, 2:10], masks[i, 20:26, 20:26] = True, True
    assert choose(probs, masks)[1] == []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("postprocess")
    data = squares_dataset(root / "data", 24, seed=3)
    made = {}
    for name, extra in (("on", []), ("off", ["--no-postprocess"])):
        assert bts.main(["--data-dir", str(data), "--out-dir", str(root / name), *TINY_ARGS, "--epochs", "2",
                         *extra]) == 0
        made[name] = root / name
    return {"data": data, **made}


@pytest.mark.slow
def test_the_choice_is_saved_printed_and_in_the_metrics(runs):
    for name in ("on", "off"):
        state = bts.load_checkpoint(runs[name] / "model.pth")
        metrics = json.loads((runs[name] / "metrics.json").read_text())
        assert state["postprocess"] == metrics["postprocess"]
        assert set(state["postprocess"]) <= set(bts.POSTPROCESSING)
        log = (runs[name] / "train.log").read_text()
        assert ("post-processing on validation: largest_component" in log) == (name == "on")
    assert bts.load_checkpoint(runs["off"] / "model.pth")["postprocess"] == []
    assert json.loads((runs["off"] / "config.json").read_text())["postprocess"] is False


@pytest.mark.slow
def test_predict_applies_the_runs_steps(runs, tmp_path, monkeypatch):
    def two_regions(model, images, batch_size, machine, flip=False):  # what a model might say: a big and a small one
        probs = torch.zeros(len(images), 1, *images.shape[-2:])
        probs[:, :, 2:14, 2:14], probs[:, :, 24:27, 24:27] = 0.9, 0.9
        return probs

    monkeypatch.setattr(bts, "predict_probabilities", two_regions)
    state = torch.load(runs["on"] / "model.pth", weights_only=True)
    for name, steps in (("forced", ["largest_component"]), ("plain", [])):
        bts.save_checkpoint(tmp_path / f"{name}.pth", {**state, "postprocess": steps})
        assert predict.main([str(runs["data"] / "images"), "--model", str(tmp_path / f"{name}.pth"), "--out",
                             str(tmp_path / name)]) == 0
    counts = {name: {cv2.connectedComponents(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE))[0] - 1
                     for p in (tmp_path / name / "masks").iterdir()} for name in ("forced", "plain")}
    assert counts == {"forced": {1}, "plain": {2}}  # the same probabilities: the run's step keeps the big one
