"""predict.py: segment new scans with a finished run. Outputs go into a folder it creates (--out, or
predictions/DATE-TIME-RUN): masks at each input's size, overlays, predictions.csv. The threshold,
the image size, the mirror averaging and the precision are the checkpoint's; scoring against
--masks happens at the written mask's size. Every checkpoint problem is one sentence.

One tiny model is trained once for the module (a width-8 U-Net at 32x32 on bright squares, about
two seconds on a CPU): the right answer is obvious, so the known-answer checks mean something, and
its data are at the model's size, so that predict --masks on its test images repeats its test."""
from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import brain_tumor_segmentation as bts
import predict
from conftest import (REAL_DIR, REPO_ROOT, TINY_ARGS, no_training_figures, one_error, run_folders, snapshot,
                      squares_dataset)

torch.set_num_threads(1)

REAL_SAMPLE = REAL_DIR / "brain-tumor-segmentation-512-sample"
CSV_COLUMNS = ["image", "width", "height", "tumor_pixels", "tumor_fraction", "mean_probability"]
SCORE_COLUMNS = ["scored_at", "true_tumor_pixels", *bts.METRICS, "hd95_px"]
GREEN, YELLOW = (0, 200, 0), (0, 255, 255)  # BGR: the true outline, the predicted one


# -----------------------------------------------------------------------------
# Helpers


def run_predict(capsys, *args) -> tuple[int, str, str]:
    """predict.main(args) on the CPU in this process; returns (return code, stdout, stderr)."""
    capsys.readouterr()  # drop anything printed before
    rc = predict.main([*map(str, args), "--device", "cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def only_error(rc: int, err: str, *fragments: str) -> str:
    """A refusal before anything ran: the one line on stderr is the error sentence."""
    message = one_error(rc, err, *fragments)
    assert len(err.strip().splitlines()) == 1, err
    return message


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def read_unchanged(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} not written or unreadable"
    return image


def model_probabilities(model_path: Path, image_path: Path) -> tuple[np.ndarray, float]:
    """Independent reference: the checkpoint's model on one file in float32 (averaged with its mirror
    image's when the checkpoint says tta), probabilities at the file's size (bilinear), and the
    threshold."""
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    model = bts.UNet(width=state["config"]["base_width"])
    model.load_state_dict(state["model"])
    model.eval()
    gray = predict.read_image(image_path)
    x = torch.from_numpy(bts.preprocess_image(gray, state["config"]["image_size"])).float().div(255)[None, None]
    with torch.no_grad():
        prob = torch.sigmoid(model(x))[0, 0]
        if state["config"].get("tta"):
            prob = (prob + torch.sigmoid(model(x.flip(-1)))[0, 0].flip(-1)) / 2
        prob = prob.numpy()
    return cv2.resize(prob, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR), state["threshold"]


def edited_checkpoint(src: Path, dest: Path, **changes) -> Path:
    """A copy of a checkpoint with fields changed: its own, else its configuration's."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    for key, value in changes.items():
        (state if key in state else state["config"])[key] = value
    torch.save(state, dest)
    return dest


def without(src: Path, dest: Path, key: str, config: bool = False) -> Path:
    """A copy of a checkpoint lacking one field (of its configuration, with `config`)."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    del (state["config"] if config else state)[key]
    torch.save(state, dest)
    return dest


def check_outputs(out: Path, expected: dict[str, tuple[int, int]], columns=CSV_COLUMNS) -> list[dict]:
    """expected: name -> (width, height). Checks masks, overlays and the CSV; returns its rows."""
    found, rows = read_csv(out / "predictions.csv")
    assert found == columns
    assert sorted(Path(r["image"]).stem for r in rows) == sorted(expected)
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(f"{n}.png" for n in expected)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(f"{n}.png" for n in expected)
    for row in rows:
        name = Path(row["image"]).stem
        width, height = expected[name]
        assert (int(row["width"]), int(row["height"])) == (width, height)
        mask = read_unchanged(out / "masks" / f"{name}.png")
        assert mask.dtype == np.uint8 and mask.shape == (height, width)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        overlay = read_unchanged(out / "overlays" / f"{name}.png")
        assert overlay.dtype == np.uint8 and overlay.shape == (height, width, 3)
        tumor = int((mask == 255).sum())
        assert int(row["tumor_pixels"]) == tumor
        assert float(row["tumor_fraction"]) == pytest.approx(tumor / (width * height), abs=1e-6)
    return rows


def own_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision and recall of two bool masks, computed here (1 when both are empty)."""
    tp, fp, fn = (int(v) for v in ((predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()))
    if tp + fp + fn == 0:
        return dict.fromkeys(("dice", "iou", "precision", "recall"), 1.0)
    return {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn),
            "precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0}


# -----------------------------------------------------------------------------
# The model, trained once; scans to segment


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """A finished float32 run (model.pth, last.pth, test_per_image.csv) of a width-8 U-Net at 32x32 on
    40 bright-square slices that are 32x32 themselves."""
    root = tmp_path_factory.mktemp("predict-model")
    data = squares_dataset(root / "data", 40, seed=1)
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        no_training_figures(mp)
        rc = bts.main(["--data-dir", str(data), "--out-dir", str(out), *TINY_ARGS, "--base-width", "8", "--epochs",
                       "6", "--batch-size", "4", "--lr", "3e-3", "--split", "random", "--device", "cpu"])
    assert rc == 0
    assert (out / "metrics.json").is_file()
    return {"run": out, "model": out / "model.pth", "data": data}


@pytest.fixture
def scans(tmp_path):
    """3 held-out 48x48 square slices (not the model's size) and their true masks."""
    return squares_dataset(tmp_path / "held", 3, seed=2, size=48)


# -----------------------------------------------------------------------------
# 1. Outputs: a new folder, masks at the input's size, overlays, predictions.csv


def test_predict_folder_and_single_files_write_masks_overlays_csv(model_run, scans, tmp_path, capsys):
    # Single files from elsewhere: a non-square RGB image and a 16-bit one of other sizes.
    loose = tmp_path / "loose"
    loose.mkdir()
    gray = cv2.imread(str(scans / "images" / "sq0.png"), cv2.IMREAD_GRAYSCALE)
    rgb = cv2.resize(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), (70, 50))  # 70 wide, 50 high
    rgb[..., 0] //= 2  # really colour: the channels differ
    assert cv2.imwrite(str(loose / "wide_rgb.png"), rgb)
    deep = cv2.resize(gray, (40, 56))
    assert cv2.imwrite(str(loose / "deep16.png"), deep.astype(np.uint16) * 200)
    assert read_unchanged(loose / "deep16.png").dtype == np.uint16

    out = tmp_path / "preds"
    rc, stdout, err = run_predict(capsys, scans / "images", loose / "wide_rgb.png", loose / "deep16.png",
                                  "--model", model_run["model"], "--out", out)
    assert rc == 0, err
    assert "Traceback" not in err
    rows = check_outputs(out, {"sq0": (48, 48), "sq1": (48, 48), "sq2": (48, 48), "wide_rgb": (70, 50),
                               "deep16": (40, 56)})
    assert f"in {out}/" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["masks", "overlays", "predictions.csv"]  # nothing else
    # The masks are the model's probabilities at the file's size, thresholded.
    predicted = 0
    for row in rows:
        prob, threshold = model_probabilities(model_run["model"], Path(row["image"]))
        mask = read_unchanged(out / "masks" / f"{Path(row['image']).stem}.png") > 0
        assert (mask != (prob > threshold)).mean() < 0.01
        predicted += mask.sum()
    assert predicted > 0  # the comparison above is not of two empty masks


def test_predict_single_file_only(model_run, scans, tmp_path, capsys):
    out = tmp_path / "one"
    rc, _, err = run_predict(capsys, scans / "images" / "sq2.png", "--model", model_run["model"], "--out", out)
    assert rc == 0, err
    rows = check_outputs(out, {"sq2": (48, 48)})
    assert Path(rows[0]["image"]) == scans / "images" / "sq2.png"


def test_default_output_is_a_new_dated_folder_under_predictions_each_time(model_run, scans, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_predict(capsys, scans / "images", "--model", model_run["run"])
    assert rc == 0, err
    (first,) = run_folders(tmp_path / "predictions")
    assert re.fullmatch(r"\d{8}-\d{6}-run", first.name), first.name  # DATE-TIME-RUNFOLDERNAME
    assert f"in {Path('predictions') / first.name}/" in out
    check_outputs(first, {"sq0": (48, 48), "sq1": (48, 48), "sq2": (48, 48)})
    before = snapshot(first, inodes=True)
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"])
    assert rc == 0, err
    folders = run_folders(tmp_path / "predictions")
    assert len(folders) == 2 and first in folders  # a second folder, never the first one again
    (second,) = [f for f in folders if f != first]
    assert re.fullmatch(r"\d{8}-\d{6}-run(-\d+)?", second.name), second.name
    assert snapshot(first, inodes=True) == before
    assert {k: v[0] for k, v in snapshot(second, inodes=True).items()} == {k: v[0] for k, v in before.items()}


def test_model_is_a_run_folder_or_a_checkpoint_and_last_pth_is_warned(model_run, scans, tmp_path, capsys):
    results = {}
    for name, model in (("folder", model_run["run"]), ("file", model_run["model"]),
                        ("last", model_run["run"] / "last.pth")):
        rc, _, err = run_predict(capsys, scans / "images", "--model", model, "--out", tmp_path / name)
        assert rc == 0, err
        results[name], warned = snapshot(tmp_path / name), "latest training state" in err
        assert warned == (name == "last"), err
    assert results["folder"] == results["file"]  # the run folder means its model.pth
    rc, _, err = run_predict(capsys, scans / "images", "--model", tmp_path / "folder", "--out", tmp_path / "x")
    only_error(rc, err, str(tmp_path / "folder" / "model.pth"), "not found")  # a folder without model.pth
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["empty-folder", "folder", "file", "symlink-to-folder", "dangling-symlink"])
def test_an_existing_out_of_any_kind_is_refused_unchanged(kind, model_run, scans, tmp_path, capsys):
    out = tmp_path / "out"
    target = tmp_path / "target"
    if kind == "empty-folder":
        out.mkdir()
    elif kind == "folder":
        (out / "masks").mkdir(parents=True)
        (out / "masks" / "sq1.png").write_bytes(b"keep me")
        (out / "predictions.csv").write_text("an earlier prediction\n")
    elif kind == "file":
        out.write_text("a file\n")
    elif kind == "symlink-to-folder":
        target.mkdir()
        (target / "predictions.csv").write_text("keep\n")
        out.symlink_to(target)
    else:
        out.symlink_to(target)
    before = snapshot(tmp_path)
    link = os.readlink(out) if out.is_symlink() else None
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", out)
    one_error(rc, err, str(out), "exists already", "writes only into a folder it creates")
    assert snapshot(tmp_path) == before
    assert (os.readlink(out) if out.is_symlink() else None) == link
    assert not target.exists() or kind == "symlink-to-folder"


def test_out_below_a_file_is_one_sentence(model_run, scans, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out",
                             tmp_path / "afile" / "preds")
    one_error(rc, err, "a file stands where one of its folders should be")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("where", ["scans", "run"])
def test_a_new_folder_inside_the_inputs_or_the_run_changes_nothing_there(where, model_run, scans, tmp_path,
                                                                         capsys):
    """The new-folder rule makes --out inside the input folder or the model's run folder harmless:
    nothing that was there is written, and the scans found are those that were there before."""
    run = tmp_path / "run"
    shutil.copytree(model_run["run"], run)
    parent = scans / "images" if where == "scans" else run
    before = {"scans": snapshot(scans), "run": snapshot(run)}
    out = parent / "preds"
    rc, _, err = run_predict(capsys, scans / "images", "--model", run, "--out", out)
    assert rc == 0, err
    check_outputs(out, {"sq0": (48, 48), "sq1": (48, 48), "sq2": (48, 48)})
    after = {"scans": snapshot(scans), "run": snapshot(run)}
    prefix = str(out.relative_to(scans if where == "scans" else run))
    after[where] = {k: v for k, v in after[where].items() if k != prefix and not k.startswith(prefix + os.sep)}
    assert after == before


# -----------------------------------------------------------------------------
# 2. Real data


def test_predict_real_512_images(model_run, tmp_path, capsys):
    if not (REAL_SAMPLE / "images").is_dir():
        pytest.skip(f"{REAL_SAMPLE} not present")
    files = sorted((REAL_SAMPLE / "images").iterdir())[:3]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    out = tmp_path / "real"
    rc, _, err = run_predict(capsys, *files, "--model", model_run["model"], "--out", out)
    assert rc == 0, err
    check_outputs(out, {p.stem: (512, 512) for p in files})
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before


# -----------------------------------------------------------------------------
# 3. Scores against --masks, at the written mask's size


def test_predict_known_answer_squares_dice_above_0_9(model_run, tmp_path):
    held_out = squares_dataset(tmp_path / "held_out", 10, seed=2)
    out = tmp_path / "pred"
    rows = predict.predict(predict.PredictConfig([str(held_out / "images")], str(model_run["model"]), str(out),
                                                 str(held_out / "masks"), device="cpu"))
    assert len(rows) == 10
    dice = np.array([r["dice"] for r in rows])
    iou = np.array([r["iou"] for r in rows])
    assert dice.mean() > 0.9, dice
    np.testing.assert_allclose(iou, dice / (2 - dice), atol=1e-4)  # IoU = D / (2 - D) per image
    columns, csv_rows = read_csv(out / "predictions.csv")
    assert columns == CSV_COLUMNS + SCORE_COLUMNS
    assert [float(r["dice"]) for r in csv_rows] == pytest.approx(dice.tolist())
    assert [float(r["iou"]) for r in csv_rows] == pytest.approx(iou.tolist())


def test_predict_masks_dice_is_low_for_wrong_masks(model_run, tmp_path):
    """The Dice column compares with the given masks: masks of other images score badly."""
    held_out = squares_dataset(tmp_path / "held_out", 6, seed=2)
    others = squares_dataset(tmp_path / "others", 6, seed=3)
    rows = predict.predict(predict.PredictConfig([str(held_out / "images")], str(model_run["model"]),
                                                 str(tmp_path / "pred"), str(others / "masks"), device="cpu"))
    assert np.mean([r["dice"] for r in rows]) < 0.5


def test_scores_are_those_of_the_written_mask_file_against_the_truth_file(model_run, scans, tmp_path, capsys):
    out = tmp_path / "p"
    rc, stdout, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", out,
                                  "--masks", scans / "masks")
    assert rc == 0, err
    rows = check_outputs(out, {"sq0": (48, 48), "sq1": (48, 48), "sq2": (48, 48)}, CSV_COLUMNS + SCORE_COLUMNS)
    for row in rows:
        name = Path(row["image"]).stem
        written = read_unchanged(out / "masks" / f"{name}.png") > 0
        truth = read_unchanged(scans / "masks" / f"{name}.png") > 0
        assert row["scored_at"] == "48x48"  # the scan's own size, not the model's 32x32
        assert int(row["true_tumor_pixels"]) == truth.sum()
        for metric, value in own_scores(written, truth).items():
            assert float(row[metric]) == pytest.approx(value, abs=1e-5), (name, metric)
        assert float(row["hd95_px"]) == pytest.approx(bts.hd95(written, truth), abs=1e-3)
    assert np.mean([float(r["dice"]) for r in rows]) > 0.5  # at another size than the model's, still right
    assert "against 3 masks" in stdout and "HD95" in stdout


def test_a_mask_of_another_size_or_missing_is_skipped_with_a_warning(model_run, scans, tmp_path, capsys):
    truth = tmp_path / "truth"
    shutil.copytree(scans / "masks", truth)
    small = cv2.resize(read_unchanged(truth / "sq1.png"), (40, 40), interpolation=cv2.INTER_NEAREST)
    assert cv2.imwrite(str(truth / "sq1.png"), small)
    (truth / "sq2.png").unlink()
    out = tmp_path / "p"
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", out, "--masks", truth)
    assert rc == 0, err
    assert re.search(rf"warning: {re.escape(str(truth / 'sq1.png'))}: mask is 40x40 but its scan is 48x48", err), err
    assert "sq2.png: no mask named sq2.*" in err
    assert "2 of the 3 segmented scans are not scored" in err
    _, rows = read_csv(out / "predictions.csv")
    scored = {Path(r["image"]).stem: r["dice"] != "" for r in rows}
    assert scored == {"sq0": True, "sq1": False, "sq2": False}
    assert all(r["scored_at"] == "" for r in rows if Path(r["image"]).stem != "sq0")


def test_predict_masks_on_the_runs_test_images_repeats_its_test(model_run, tmp_path, capsys):
    """The data are at the model's size, so the test and predict score the same pixels: with the run's
    own precision (the default), each test image's Dice is the test's."""
    run, data = model_run["run"], model_run["data"]
    test = json.loads((run / "split.json").read_text())["test"]
    with open(run / "test_per_image.csv", newline="") as f:
        expected = {r["image"]: float(r["dice"]) for r in csv.DictReader(f)}
    assert sorted(expected) == sorted(test)
    out = tmp_path / "p"
    rc, stdout, err = run_predict(capsys, *(data / "images" / f"{name}.png" for name in test), "--model", run,
                                  "--out", out, "--masks", data / "masks")
    assert rc == 0, err
    assert "float32" in stdout
    _, rows = read_csv(out / "predictions.csv")
    got = {Path(r["image"]).stem: float(r["dice"]) for r in rows}
    assert got == pytest.approx(expected, abs=1e-6)
    assert {r["scored_at"] for r in rows} == {"32x32"}


def test_overlays_draw_the_true_mask_in_green_only_with_masks(model_run, scans, tmp_path, capsys):
    truth = tmp_path / "truth"
    truth.mkdir()
    for name in ("sq0", "sq1", "sq2"):  # a true tumour where the scan is dark: away from the prediction
        image = read_unchanged(scans / "images" / f"{name}.png")
        mask = np.zeros((48, 48), np.uint8)
        corner = min(((r, c) for r in (2, 34) for c in (2, 34)), key=lambda rc: image[rc[0]:rc[0] + 12,
                                                                                     rc[1]:rc[1] + 12].mean())
        mask[corner[0]:corner[0] + 10, corner[1]:corner[1] + 10] = 255
        assert cv2.imwrite(str(truth / f"{name}.png"), mask)
    for masks in ([], ["--masks", truth]):
        out = tmp_path / ("with" if masks else "without")
        rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", out, *masks)
        assert rc == 0, err
    for name in ("sq0", "sq1", "sq2"):
        overlays = {k: read_unchanged(tmp_path / k / "overlays" / f"{name}.png") for k in ("with", "without")}
        green = {k: np.all(v == GREEN, axis=2) for k, v in overlays.items()}
        true_mask = read_unchanged(truth / f"{name}.png") > 0
        border = true_mask & ~cv2.erode(true_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert green["with"][border].mean() > 0.9, name  # the true outline, in green
        assert not green["with"][~border].any()
        assert not green["without"].any()  # no truth, no green
        assert np.all(overlays["with"] == YELLOW, axis=2).any()  # the predicted outline, in yellow


# -----------------------------------------------------------------------------
# 4. Threshold, image size, mirror averaging and precision come from the checkpoint


def test_threshold_comes_from_checkpoint(model_run, scans, tmp_path, capsys):
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", tmp_path / "base")
    assert rc == 0, err
    _, base = read_csv(tmp_path / "base" / "predictions.csv")
    base_pixels = sum(int(r["tumor_pixels"]) for r in base)
    assert base_pixels > 0  # otherwise the test below proves nothing

    strict = edited_checkpoint(model_run["model"], tmp_path / "strict.pth", threshold=0.999999)
    rc, _, err = run_predict(capsys, scans / "images", "--model", strict, "--out", tmp_path / "strict")
    assert rc == 0, err
    _, high = read_csv(tmp_path / "strict" / "predictions.csv")
    assert sum(int(r["tumor_pixels"]) for r in high) <= 0.01 * base_pixels
    for name in ("sq0", "sq1", "sq2"):
        assert (read_unchanged(tmp_path / "strict" / "masks" / f"{name}.png") > 0).sum() <= 0.01 * base_pixels

    # Threshold 0: every pixel has a probability above it.
    lax = edited_checkpoint(model_run["model"], tmp_path / "lax.pth", threshold=0.0)
    rc, _, err = run_predict(capsys, scans / "images", "--model", lax, "--out", tmp_path / "lax")
    assert rc == 0, err
    _, low = read_csv(tmp_path / "lax" / "predictions.csv")
    assert [float(r["tumor_fraction"]) for r in low] == [1.0, 1.0, 1.0]


def test_image_size_comes_from_checkpoint(model_run, scans, tmp_path, capsys, monkeypatch):
    sizes = []
    original = bts.preprocess_image

    def recording(gray, size):
        sizes.append(size)
        return original(gray, size)

    monkeypatch.setattr(bts, "preprocess_image", recording)
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", tmp_path / "at32")
    assert rc == 0, err
    assert sizes == [32, 32, 32]

    # The same weights with image_size 64 in the checkpoint run at 64 (the U-Net is fully
    # convolutional); masks stay at the input's size.
    sizes.clear()
    at64 = edited_checkpoint(model_run["model"], tmp_path / "at64.pth", image_size=64)
    rc, _, err = run_predict(capsys, scans / "images", "--model", at64, "--out", tmp_path / "at64")
    assert rc == 0, err
    assert sizes == [64, 64, 64]
    check_outputs(tmp_path / "at64", {"sq0": (48, 48), "sq1": (48, 48), "sq2": (48, 48)})


def test_predict_has_no_image_size_option(model_run, scans, tmp_path, capsys):
    out = tmp_path / "p"
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(scans / "images"), "--model", str(model_run["model"]), "--out", str(out),
                      "--image-size", "64"])
    assert exit_info.value.code == 2
    assert "--image-size" in capsys.readouterr().err
    assert not out.exists()


def test_predict_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--out", "--masks", "--amp", "--batch-size", "--device", "INPUT"):
        assert option in text, option
    for gone in ("--image-size", "--overwrite", "--threshold"):  # the checkpoint's, or no longer there
        assert gone not in text, gone


def test_predict_is_its_own_program_not_a_training_subcommand(capsys):
    cfg, typed = bts.config_from_args([])
    assert cfg == bts.Config() and not typed  # training needs no subcommand
    with pytest.raises(SystemExit) as exit_info:
        bts.config_from_args(["predict", "--model", "x"])
    assert exit_info.value.code == 2
    assert "predict" in capsys.readouterr().err


def test_mean_probability_between_threshold_and_one(model_run, tmp_path, capsys):
    held_out = squares_dataset(tmp_path / "held_out", 6, seed=4, empty=2)  # sq4, sq5: no square
    out = tmp_path / "pred"
    rc, _, err = run_predict(capsys, held_out / "images", "--model", model_run["model"], "--out", out)
    assert rc == 0, err
    _, rows = read_csv(out / "predictions.csv")
    state = torch.load(model_run["model"], weights_only=True)
    threshold = float(state["threshold"])
    assert state["config"]["tta"] is True  # the default recipe: predict averages each image with its mirror's
    with_tumor = [r for r in rows if int(r["tumor_pixels"]) > 0]
    without = [r for r in rows if int(r["tumor_pixels"]) == 0]
    assert with_tumor and without  # both cases are exercised
    for row in with_tumor:
        value = float(row["mean_probability"])
        assert threshold <= value <= 1.0
        prob, _ = model_probabilities(model_run["model"], Path(row["image"]))
        assert value == pytest.approx(prob[prob > threshold].mean(), abs=2e-4)
    for row in without:
        assert float(row["mean_probability"]) == 0.0


def test_checkpoint_from_before_tta_existed_predicts_without_mirroring(model_run, tmp_path, capsys):
    old = without(model_run["model"], tmp_path / "old.pth", "tta", config=True)
    held_out = squares_dataset(tmp_path / "held_out", 3, seed=5)
    rc, _, err = run_predict(capsys, held_out / "images", "--model", old, "--out", tmp_path / "pred")
    assert rc == 0, err
    _, rows = read_csv(tmp_path / "pred" / "predictions.csv")
    with_tumor = [r for r in rows if int(r["tumor_pixels"])]
    assert with_tumor
    differs = 0
    for row in with_tumor:
        prob, threshold = model_probabilities(old, Path(row["image"]))  # no "tta" key: no mirroring
        mirrored, _ = model_probabilities(model_run["model"], Path(row["image"]))
        assert float(row["mean_probability"]) == pytest.approx(prob[prob > threshold].mean(), abs=2e-4)
        differs += abs(prob[prob > threshold].mean() - mirrored[mirrored > threshold].mean()) > 1e-3
    assert differs  # the two readings give different answers, so the check above can tell them apart


@pytest.fixture
def dtypes_used(monkeypatch):
    """The autocast precision of every batch predict runs (None: float32), on a CPU said to have
    native bf16, where training's --amp auto would choose bf16."""
    monkeypatch.setattr(bts, "cpu_has_native_bf16", lambda: True)
    used = []
    original = bts.predict_probabilities

    def recording(model, images, batch_size, machine, flip=False):
        used.append(machine.dtype)
        return original(model, images, batch_size, machine, flip=flip)

    monkeypatch.setattr(bts, "predict_probabilities", recording)
    return used


def test_a_float32_run_predicts_in_float32_even_where_bf16_is_native(model_run, scans, tmp_path, capsys,
                                                                     dtypes_used):
    assert torch.load(model_run["model"], weights_only=True)["precision"] == "float32"
    assert bts.precision("auto", torch.device("cpu"))[0] is torch.bfloat16  # what training would pick here
    rc, stdout, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", tmp_path / "p")
    assert rc == 0, err
    assert dtypes_used and set(dtypes_used) == {None}
    assert re.search(r"segmented in .* on cpu, float32", stdout), stdout


@pytest.mark.parametrize("saved, amp, expected", [("bfloat16", [], torch.bfloat16),
                                                  ("bfloat16", ["--amp", "off"], None),
                                                  ("float32", ["--amp", "bf16"], torch.bfloat16),
                                                  (None, [], None)],
                         ids=["bf16-run", "bf16-run-amp-off", "float32-run-amp-bf16", "no-precision-saved"])
def test_the_default_precision_is_the_runs_and_amp_overrides_it(saved, amp, expected, model_run, scans, tmp_path,
                                                                capsys, dtypes_used):
    if saved is None:
        model = without(model_run["model"], tmp_path / "model.pth", "precision")
    else:
        model = edited_checkpoint(model_run["model"], tmp_path / "model.pth", precision=saved)
    rc, stdout, err = run_predict(capsys, scans / "images", "--model", model, "--out", tmp_path / "p", *amp)
    assert rc == 0, err
    assert dtypes_used and set(dtypes_used) == {expected}
    assert f"on cpu, {str(expected or torch.float32).removeprefix('torch.')}" in stdout


# -----------------------------------------------------------------------------
# 5. Checkpoints: every problem is one sentence, and none runs code


class Evil:
    """Unpickling this calls Path.touch(marker): code run by merely loading the file."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_evil(path: Path, marker: Path, how: str) -> Path:
    if how == "torch.save":
        torch.save({"format": bts.CHECKPOINT_FORMAT, "x": Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"x": Evil(marker)}))
    return path


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_checkpoint_refused_without_running(how, scans, tmp_path, capsys):
    # The payload is live: an ordinary unpickling runs it.
    live_marker = tmp_path / "live-marker"
    live = write_evil(tmp_path / "live.pth", live_marker, how)
    if how == "torch.save":
        torch.load(live, weights_only=False)
    else:
        pickle.loads(live.read_bytes())
    assert live_marker.exists()

    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    evil = write_evil(run / "model.pth", marker, how)
    before = snapshot(scans)
    for model in (evil, run):  # the file, or the run folder that holds it
        out = tmp_path / "out"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own protocol warning: see the next test
            rc, _, err = run_predict(capsys, scans / "images", "--model", model, "--out", out)
        only_error(rc, err, str(evil), "not a checkpoint this script can load", "could run code")
        assert not marker.exists()
        assert not out.exists()
    assert snapshot(scans) == before


def test_malicious_plain_pickle_prints_only_the_refusal(scans, tmp_path, capsys):
    evil = write_evil(tmp_path / "model.pth", tmp_path / "marker", "pickle")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = run_predict(capsys, scans / "images", "--model", evil, "--out", tmp_path / "out")
    only_error(rc, err, str(evil))
    assert [str(w.message) for w in caught] == []  # a warning would be printed on stderr too
    assert not (tmp_path / "marker").exists()


def _truncated(real: Path, path: Path) -> Path:
    data = real.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _empty(real: Path, path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _foreign_dict(real: Path, path: Path) -> Path:
    torch.save({"state_dict": bts.UNet(width=4).state_dict(), "epoch": 3}, path)
    return path


def _plain_tensor(real: Path, path: Path) -> Path:
    torch.save(torch.zeros(3), path)
    return path


def _version_999(real: Path, path: Path) -> Path:
    return edited_checkpoint(real, path, version=999)


def _other_widths(real: Path, path: Path) -> Path:
    return edited_checkpoint(real, path, model=bts.UNet(width=4).state_dict())  # base_width stays 8


def _missing_weight(real: Path, path: Path) -> Path:
    state = torch.load(real, map_location="cpu", weights_only=True)
    return edited_checkpoint(real, path, model={k: v for k, v in list(state["model"].items())[:-1]})


def _without(key: str, config: bool = False):
    return lambda real, path: without(real, path, key, config)


@pytest.mark.parametrize("make, fragment", [
    (_truncated, "not a checkpoint this script can load"),
    (_empty, "not a checkpoint this script can load"),
    (_foreign_dict, "not a checkpoint of this script's U-Net"),
    (_plain_tensor, "not a checkpoint of this script's U-Net"),
    (_version_999, "version 999"),
    (_other_widths, "do not fit"),
    (_missing_weight, "do not fit"),
    (_without("config"), "config missing"),
    (_without("model"), "model missing"),
    (_without("threshold"), "threshold missing"),
    (_without("base_width", config=True), "its settings lack base_width"),
    (_without("image_size", config=True), "its settings lack image_size"),
], ids=["truncated", "empty", "foreign-dict", "plain-tensor", "version-999", "other-widths", "missing-weight",
        "no-config", "no-weights", "no-threshold", "config-without-base-width", "config-without-image-size"])
def test_bad_checkpoint_is_one_sentence(make, fragment, model_run, scans, tmp_path, capsys):
    path = make(model_run["model"], tmp_path / "bad.pth")
    out = tmp_path / "out"
    rc, _, err = run_predict(capsys, scans / "images", "--model", path, "--out", out)
    only_error(rc, err, str(path), fragment)
    assert not out.exists()


def test_missing_checkpoint_is_one_sentence(scans, tmp_path, capsys):
    path = tmp_path / "nope.pth"
    rc, _, err = run_predict(capsys, scans / "images", "--model", path, "--out", tmp_path / "out")
    only_error(rc, err, str(path), "not found")
    rc, _, err = run_predict(capsys, scans / "images", "--out", tmp_path / "out")  # no --model at all
    only_error(rc, err, "--model")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", [
    "hello world, this is not a checkpoint\n",
    "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1250000\n",
    "<html><body><h1>404 Not Found</h1></body></html>\n",
], ids=["plain-text", "git-lfs-pointer", "html-page"])
def test_text_file_checkpoint_is_one_sentence(text, scans, tmp_path, capsys):
    path = tmp_path / "model.pth"
    path.write_text(text)
    rc, _, err = run_predict(capsys, scans / "images", "--model", path, "--out", tmp_path / "out")
    only_error(rc, err, str(path), "not a checkpoint this script can load")
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# 6. Bad inputs; a failure leaves no folder; the inputs are never written


def test_unreadable_file_is_reported_and_skipped(model_run, scans, tmp_path, capsys):
    folder = scans / "images"
    bad = folder / "bad.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    (folder / "notes.txt").write_text("not an image\n")
    before = snapshot(folder)
    out = tmp_path / "out"
    rc, stdout, err = run_predict(capsys, folder, "--model", model_run["model"], "--out", out)
    assert rc == 0, err
    assert "Traceback" not in err
    assert any(str(bad) in line and "skipped" in line for line in err.splitlines()), err
    assert "notes.txt" not in err  # not an image file: ignored silently
    assert "1 unreadable skipped" in stdout
    check_outputs(out, {"sq0": (48, 48), "sq1": (48, 48), "sq2": (48, 48)})
    assert snapshot(folder) == before


def test_batches_skip_unreadable_files_and_give_the_same_masks(model_run, scans, tmp_path, capsys):
    folder = scans / "images"
    for name in ("bad1", "bad2"):  # in name order the first batch of two is all unreadable
        (folder / f"{name}.png").write_bytes(b"\x89PNG not really")
    masks = {}
    for size in ("64", "2"):
        out = tmp_path / f"batch{size}"
        rc, stdout, err = run_predict(capsys, folder, "--model", model_run["model"], "--out", out, "--batch-size", size)
        assert rc == 0, err
        assert "3 images segmented" in stdout and "2 unreadable skipped" in stdout
        rows = check_outputs(out, {"sq0": (48, 48), "sq1": (48, 48), "sq2": (48, 48)})
        masks[size] = {Path(r["image"]).stem: read_unchanged(out / "masks" / f"{Path(r['image']).stem}.png")
                       for r in rows}
    for name, mask in masks["64"].items():
        assert (mask != masks["2"][name]).mean() < 0.01, name


def test_a_second_input_of_the_same_name_is_skipped_with_a_warning(model_run, scans, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(scans / "images" / "sq1.png", other / "sq0.png")  # outputs are named after the file: masks/sq0.png
    out = tmp_path / "out"
    rc, _, err = run_predict(capsys, scans / "images", other / "sq0.png", "--model", model_run["model"], "--out", out)
    assert rc == 0, err
    assert f"{other / 'sq0.png'}: same name as {scans / 'images' / 'sq0.png'}" in err and "skipped" in err
    rows = check_outputs(out, {"sq0": (48, 48), "sq1": (48, 48), "sq2": (48, 48)})
    assert str(scans / "images" / "sq0.png") in [r["image"] for r in rows]


def test_masks_without_any_tumour_are_warned_about(model_run, scans, tmp_path, capsys):
    truth = tmp_path / "truth"
    truth.mkdir()
    for name in ("sq0", "sq1", "sq2"):
        assert cv2.imwrite(str(truth / f"{name}.png"), np.zeros((48, 48), np.uint8))
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", tmp_path / "out",
                             "--masks", truth)
    assert rc == 0, err
    assert "THE 3 --masks FILES HOLD NO TUMOUR PIXEL" in err
    _, rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert all(r["hd95_px"] == "" and float(r["dice"]) == 0.0 for r in rows)  # a prediction on an empty truth


def test_all_inputs_unreadable_writes_nothing_and_leaves_no_folder(model_run, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "out"
    rc, _, err = run_predict(capsys, folder, "--model", model_run["model"], "--out", out)
    one_error(rc, err, "none of the inputs could be read", "nothing was written")
    assert "bad.png" in err
    assert not out.exists()
    monkeypatch.chdir(tmp_path)  # the default folder too
    rc, _, err = run_predict(capsys, folder, "--model", model_run["model"])
    one_error(rc, err, "none of the inputs could be read")
    assert run_folders(tmp_path / "predictions") == []


@pytest.mark.parametrize("failure", ["disk-full", "ctrl-c"])
def test_a_failure_while_writing_removes_the_new_folder(failure, model_run, scans, tmp_path, capsys, monkeypatch):
    written = []
    original = bts.save_png

    def failing(path, image):
        if len(written) == 3:  # after a mask and an overlay or so: a partial folder
            if failure == "ctrl-c":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        return original(path, image)

    monkeypatch.setattr(bts, "save_png", failing)
    out = tmp_path / "out"
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", out)
    assert len(written) == 3 and all(str(p).startswith(str(out)) for p in written)
    if failure == "ctrl-c":
        assert rc == 130 and "aborted" in err and "Traceback" not in err
    else:
        one_error(rc, err, "the disk is full", str(out))
    assert not out.exists()


@pytest.mark.parametrize("which", ["masks", "input", "model"])
def test_a_typed_wrong_folder_is_not_found_never_a_permission_problem(which, model_run, scans, tmp_path, capsys):
    """Issue class S: --masks naming a folder that is not there said "cannot read this folder (No such file
    or directory); check its permissions"."""
    typo = tmp_path / "msaks"
    args = {"masks": [scans / "images", "--model", model_run["run"], "--masks", typo],
            "input": [typo, "--model", model_run["run"]],
            "model": [scans / "images", "--model", typo]}[which]
    rc, _, err = run_predict(capsys, *args, "--out", tmp_path / "out")
    message = only_error(rc, err, str(typo))
    assert "permission" not in message
    assert "no such file or folder" in message or "not found" in message, message
    assert not (tmp_path / "out").exists()


def test_nonexistent_input_is_one_sentence(model_run, scans, tmp_path, capsys):
    missing = tmp_path / "no_such_scan.png"
    out = tmp_path / "out"
    rc, _, err = run_predict(capsys, scans / "images", missing, "--model", model_run["model"], "--out", out)
    only_error(rc, err, str(missing), "no such file or folder")
    assert not out.exists()


def test_folder_without_images_is_one_sentence(model_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here\n")
    rc, _, err = run_predict(capsys, empty, "--model", model_run["model"], "--out", tmp_path / "out")
    only_error(rc, err, str(empty), "no images")
    assert not (tmp_path / "out").exists()


def test_masks_folder_without_masks_is_one_sentence(model_run, scans, tmp_path, capsys):
    empty = tmp_path / "truth"
    empty.mkdir()
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", tmp_path / "out",
                             "--masks", empty)
    only_error(rc, err, str(empty), "no masks found")
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", tmp_path / "out",
                             "--masks", tmp_path / "no-such-folder")
    only_error(rc, err, str(tmp_path / "no-such-folder"))
    assert not (tmp_path / "out").exists()


def test_a_249_character_file_name_works(model_run, scans, tmp_path, capsys):
    folder = tmp_path / "long"
    folder.mkdir()
    name = "s" * 245  # + ".png": 249 characters
    shutil.copy(scans / "images" / "sq0.png", folder / f"{name}.png")
    shutil.copy(scans / "masks" / "sq0.png", tmp_path / "truth.png")
    (tmp_path / "truth").mkdir()
    shutil.move(tmp_path / "truth.png", tmp_path / "truth" / f"{name}.png")
    assert len(f"{name}.png") == 249
    out = tmp_path / "out"
    rc, _, err = run_predict(capsys, folder, "--model", model_run["model"], "--out", out, "--masks",
                             tmp_path / "truth")
    assert rc == 0, err
    rows = check_outputs(out, {name: (48, 48)}, CSV_COLUMNS + SCORE_COLUMNS)
    assert float(rows[0]["dice"]) > 0.5


# -----------------------------------------------------------------------------
# 7. Many scans; torchrun's variables


@pytest.mark.slow
def test_bookkeeping_stays_a_small_part_of_predicting_many_scans(model_run, tmp_path, capsys, monkeypatch):
    """Issue class U: predict's time outside decoding, the model and writing must stay small however many
    scans it is given (the old staging folder, output records and checks took 55% of predicting 2,000
    scans of 32x32 with a width-8 model; 10% now, most of it the overlays). Tiny scans make that part as
    large as it can be beside a decoding and a model that cost little. The issue asks for 5% on real
    scans; on this shared 2-core machine, with scans whose decoding costs almost nothing, the bound is a
    generous 25%."""
    scans = tmp_path / "many"
    scans.mkdir()
    image = square_scan_png()
    for i in range(2000):
        (scans / f"s{i}.png").write_bytes(image)
    spent = {"decoding": 0.0, "model": 0.0, "writing": 0.0}

    def timed(part, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - t
        return wrapper

    real_torch_model = predict.torch_model

    def timed_model(path, cfg):
        probabilities, how, where = real_torch_model(path, cfg)
        return timed("model", probabilities), how, where

    monkeypatch.setattr(predict, "read_image", timed("decoding", predict.read_image))
    monkeypatch.setattr(bts, "save_png", timed("writing", bts.save_png))
    monkeypatch.setattr(predict, "torch_model", timed_model)
    t0 = time.perf_counter()
    rc, stdout, err = run_predict(capsys, scans, "--model", model_run["run"], "--out", tmp_path / "out")
    total = time.perf_counter() - t0
    assert rc == 0, err
    assert "2000 images segmented" in stdout
    assert len(list((tmp_path / "out" / "masks").iterdir())) == 2000
    outside = total - sum(spent.values())
    assert outside < 0.25 * total, f"{outside:.2f} s of {total:.2f} s outside {spent}"


def square_scan_png() -> bytes:
    """A 32x32 scan with a bright square tumour, PNG-encoded."""
    image = np.random.default_rng(0).integers(20, 60, (32, 32), dtype=np.uint8)
    image[8:20, 10:22] = 220
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


@pytest.mark.subprocess
def test_torchrun_variables_in_the_environment_change_nothing_in_predict(model_run, scans, tmp_path):
    """Issue class N: with RANK and WORLD_SIZE set (no torchrun), predict printed nothing at all. It is one
    process like any other now: it segments, prints where, and says what it refuses."""
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "p"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "predict.py"), str(scans / "images"), "--model",
                             str(model_run["run"]), "--out", str(out), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "3 images segmented" in result.stdout and f"in {out}/" in result.stdout, result.stdout
    check_outputs(out, {"sq0": (48, 48), "sq1": (48, 48), "sq2": (48, 48)})


# -----------------------------------------------------------------------------
# Folders of subfolders, demo models, volumes (issue #30)


def test_recursive_reads_subfolders_and_keeps_their_layout(model_run, tmp_path, capsys):
    patients = tmp_path / "patients"
    for patient, seed in (("p1", 3), ("p2", 4)):  # equal names in two subfolders: sq0.png in both
        squares_dataset(patients / patient, 2, seed=seed)
    flat = tmp_path / "flat"
    rc, _, err = run_predict(capsys, patients, "--model", model_run["run"], "--out", flat)
    one_error(rc, err, "no images found")  # without --recursive, the top folder holds no image
    assert not flat.exists()
    out = tmp_path / "out"
    rc, _, err = run_predict(capsys, patients, "--model", model_run["run"], "--out", out, "--recursive",
                             "--masks", patients)
    assert rc == 0, err
    written = sorted(p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*.png"))
    assert written == [f"{p}/{kind}/sq{i}.png" for p in ("p1", "p2") for kind in ("images", "masks") for i in (0, 1)]
    assert len(read_csv(out / "predictions.csv")[1]) == 8 and "same name as" not in err
    assert all("dice" in row for row in read_csv(out / "predictions.csv")[1])  # each paired with its own mask


def test_a_model_trained_on_the_demo_warns_on_other_scans(model_run, scans, tmp_path, capsys):
    demo = edited_checkpoint(model_run["model"], tmp_path / "demo.pth", config={
        **bts.load_checkpoint(model_run["model"])["config"], "demo": True})
    rc, _, err = run_predict(capsys, scans / "images", "--model", demo, "--out", tmp_path / "out")
    assert rc == 0 and "trained on --demo's synthetic slices" in err
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["model"], "--out", tmp_path / "out2")
    assert rc == 0 and "--demo" not in err


@pytest.mark.parametrize("name, what", [("brain.nii", "a NIfTI volume"), ("brain.nii.gz", "a compressed NIfTI"),
                                        ("slice.dcm", "a DICOM file")])
@pytest.mark.parametrize("given", ["file", "folder"])
def test_volumes_are_refused_in_one_sentence_saying_what_the_tool_reads(name, what, given, model_run, scans,
                                                                       tmp_path, capsys):
    volume = scans / "images" / name
    volume.write_bytes(b"\0" * 352)
    rc, _, err = run_predict(capsys, volume if given == "file" else scans / "images", "--model", model_run["run"],
                             "--out", tmp_path / "out")
    one_error(rc, err, name, what, "reads 2D images (PNG, JPEG, TIFF, BMP)")
    assert not (tmp_path / "out").exists()


def test_other_files_beside_the_scans_are_not_taken_for_volumes(model_run, scans, tmp_path, capsys):
    (scans / "images" / "notes.tar.gz").write_bytes(b"\x1f\x8b")
    (scans / "images" / "README.txt").write_text("scans of the clinic")
    rc, _, err = run_predict(capsys, scans / "images", "--model", model_run["run"], "--out", tmp_path / "out")
    assert rc == 0, err
    assert len(read_csv(tmp_path / "out" / "predictions.csv")[1]) == 3
