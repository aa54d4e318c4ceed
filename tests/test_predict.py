"""The `predict` subcommand of brain_tumor_segmentation.py: outputs, checkpoint handling,
safety against malicious or broken checkpoints, bad inputs and the command line.

Two tiny models are trained once per module on the CPU (a few seconds each): one on the
synthetic MRI-like slices (barely trained: only its file format matters), and one on
bright squares, where the right answer is obvious, for a known-answer Dice check."""
from __future__ import annotations

import csv
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import brain_tumor_segmentation as bts
import predict
from conftest import REAL_DIR, REPO_ROOT, snapshot, squares_dataset

torch.set_num_threads(1)

REAL_SAMPLE = REAL_DIR / "brain-tumor-segmentation-512-sample"
CSV_COLUMNS = ["image", "width", "height", "tumor_pixels", "tumor_fraction", "mean_probability"]


# -----------------------------------------------------------------------------
# Helpers


def run_predict(capsys, *args) -> tuple[int, str, str]:
    """bts.main(["predict", ...]) on the CPU in float32 (as the independent reference computes); returns
    (return code, stdout, stderr)."""
    capsys.readouterr()  # drop anything printed before
    rc = bts.main(["predict", *map(str, args), "--device", "cpu", "--amp", "off"])
    out, err = capsys.readouterr()
    return rc, out, err


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def read_unchanged(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} not written or unreadable"
    return image


def model_probabilities(model_path: Path, image_path: Path) -> tuple[np.ndarray, float]:
    """Independent reference: the checkpoint's model on one file (averaged with its mirror image's
    when the checkpoint says tta), probabilities at the file's size (bilinear), and the threshold."""
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    model = bts.UNet(width=state["config"]["base_width"])
    model.load_state_dict(state["model"])
    model.eval()
    gray = bts.read_image(image_path)
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


def assert_one_clear_error(rc: int, err: str, *fragments: str) -> str:
    """Return code 1 and exactly one stderr line, `error: ...`, holding every fragment."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)
    return lines[0]


# -----------------------------------------------------------------------------
# Models trained once per module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model (32x32, width 4, 2 epochs, the seed recipe: it learns something in 2 epochs,
    where the default's one-cycle warm-up does not) on 24 synthetic 64x64 slices: its model.pth."""
    root = tmp_path_factory.mktemp("trained")
    data = bts.make_synthetic_dataset(root / "data", n=24, size=64, seed=0)
    out = root / "run"
    rc = bts.main(["--data-dir", str(data), "--out-dir", str(out), "--image-size", "32", "--base-width", "4",
                   "--epochs", "2", "--batch-size", "8", "--test-samples", "2", "--panel-images", "2",
                   "--device", "cpu", "--recipe", "seed"])
    assert rc == 0
    assert (out / "model.pth").is_file()
    return {"model": out / "model.pth", "data": data}


@pytest.fixture(scope="module")
def squares_model(tmp_path_factory):
    """A width-8 U-Net at 32x32 trained on 40 bright-square slices (about 10 s on one core)."""
    root = tmp_path_factory.mktemp("squares")
    data = squares_dataset(root / "data", 40, seed=1)
    out = root / "run"
    rc = bts.main(["--data-dir", str(data), "--out-dir", str(out), "--image-size", "32", "--base-width", "8",
                   "--epochs", "8", "--batch-size", "4", "--lr", "3e-3", "--split", "random",
                   "--test-samples", "1", "--panel-images", "1", "--device", "cpu"])
    assert rc == 0
    return out / "model.pth"


@pytest.fixture
def scans(tmp_path, trained):
    """A folder of 3 synthetic 64x64 slices (copies: the training data folder is left alone)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("1", "2", "3"):
        shutil.copy(trained["data"] / "images" / f"{name}.png", folder / f"{name}.png")
    return folder


# -----------------------------------------------------------------------------
# 1. Outputs: masks at the original size, overlays, predictions.csv


def check_outputs(out: Path, expected: dict[str, tuple[int, int]]) -> list[dict]:
    """expected: name -> (width, height). Checks masks, overlays and the CSV; returns its rows."""
    columns, rows = read_csv(out / "predictions.csv")
    assert columns == CSV_COLUMNS
    assert len(rows) == len(expected)
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


def test_predict_folder_and_single_files_write_masks_overlays_csv(trained, scans, tmp_path, capsys):
    # Single files from elsewhere: a non-square RGB image and a 16-bit one of other sizes.
    loose = tmp_path / "loose"
    loose.mkdir()
    gray = cv2.imread(str(trained["data"] / "images" / "4.png"), cv2.IMREAD_GRAYSCALE)
    rgb = cv2.resize(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), (70, 50))  # 70 wide, 50 high
    rgb[..., 0] //= 2  # really colour: the channels differ
    assert cv2.imwrite(str(loose / "wide_rgb.png"), rgb)
    deep = cv2.resize(cv2.imread(str(trained["data"] / "images" / "5.png"), cv2.IMREAD_GRAYSCALE), (40, 56))
    assert cv2.imwrite(str(loose / "deep16.png"), deep.astype(np.uint16) * 200)
    assert read_unchanged(loose / "deep16.png").dtype == np.uint16

    out = tmp_path / "preds"
    rc, stdout, err = run_predict(capsys, scans, loose / "wide_rgb.png", loose / "deep16.png", "--model",
                                  trained["model"], "--out", out)
    assert rc == 0, err
    assert "Traceback" not in err
    rows = check_outputs(out, {"1": (64, 64), "2": (64, 64), "3": (64, 64), "wide_rgb": (70, 50),
                               "deep16": (40, 56)})
    # The masks are the model's probabilities at the file's size, thresholded.
    for row in rows:
        prob, threshold = model_probabilities(trained["model"], Path(row["image"]))
        mask = read_unchanged(out / "masks" / f"{Path(row['image']).stem}.png") > 0
        assert (mask != (prob > threshold)).mean() < 0.01


def test_predict_single_file_only(trained, scans, tmp_path, capsys):
    out = tmp_path / "one"
    rc, _, err = run_predict(capsys, scans / "2.png", "--model", trained["model"], "--out", out)
    assert rc == 0, err
    rows = check_outputs(out, {"2": (64, 64)})
    assert Path(rows[0]["image"]) == scans / "2.png"


# -----------------------------------------------------------------------------
# 2. Real data


def test_predict_real_512_images(trained, tmp_path, capsys):
    if not (REAL_SAMPLE / "images").is_dir():
        pytest.skip(f"{REAL_SAMPLE} not present")
    files = sorted((REAL_SAMPLE / "images").iterdir())[:3]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    out = tmp_path / "real"
    rc, _, err = run_predict(capsys, *files, "--model", trained["model"], "--out", out)
    assert rc == 0, err
    check_outputs(out, {p.stem: (512, 512) for p in files})
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before


# -----------------------------------------------------------------------------
# 3. Known answer: bright squares


def test_predict_known_answer_squares_dice_above_0_9(squares_model, tmp_path):
    held_out = squares_dataset(tmp_path / "held_out", 10, seed=2)
    out = tmp_path / "pred"
    rows = predict.predict(predict.PredictConfig([str(held_out / "images")], str(squares_model), str(out),
                                                 str(held_out / "masks"), device="cpu"))
    assert len(rows) == 10
    dice = np.array([r["dice"] for r in rows])
    iou = np.array([r["iou"] for r in rows])
    assert dice.mean() > 0.9, dice
    np.testing.assert_allclose(iou, dice / (2 - dice), atol=1e-4)  # IoU = D / (2 - D) per image
    columns, csv_rows = read_csv(out / "predictions.csv")
    assert columns == CSV_COLUMNS + ["true_tumor_pixels", *bts.METRICS]
    assert [float(r["dice"]) for r in csv_rows] == pytest.approx(dice.tolist())
    assert [float(r["iou"]) for r in csv_rows] == pytest.approx(iou.tolist())


def test_predict_masks_dice_is_low_for_wrong_masks(squares_model, tmp_path):
    """The Dice column compares with the given masks: masks of other images score badly."""
    held_out = squares_dataset(tmp_path / "held_out", 6, seed=2)
    others = squares_dataset(tmp_path / "others", 6, seed=3)
    rows = predict.predict(predict.PredictConfig([str(held_out / "images")], str(squares_model),
                                                 str(tmp_path / "pred"), str(others / "masks"), device="cpu"))
    assert np.mean([r["dice"] for r in rows]) < 0.5


# -----------------------------------------------------------------------------
# 4. Threshold and image size come from the checkpoint


def test_threshold_comes_from_checkpoint(trained, scans, tmp_path, capsys):
    rc, _, err = run_predict(capsys, scans, "--model", trained["model"], "--out", tmp_path / "base")
    assert rc == 0, err
    _, base = read_csv(tmp_path / "base" / "predictions.csv")
    base_pixels = sum(int(r["tumor_pixels"]) for r in base)
    assert base_pixels > 0  # otherwise the test below proves nothing

    strict = edited_checkpoint(trained["model"], tmp_path / "strict.pth", threshold=0.999999)
    rc, _, err = run_predict(capsys, scans, "--model", strict, "--out", tmp_path / "strict")
    assert rc == 0, err
    _, high = read_csv(tmp_path / "strict" / "predictions.csv")
    assert sum(int(r["tumor_pixels"]) for r in high) <= 0.001 * base_pixels
    for name in ("1", "2", "3"):
        assert (read_unchanged(tmp_path / "strict" / "masks" / f"{name}.png") > 0).sum() <= 0.001 * base_pixels

    # Threshold 0: every pixel has a probability above it.
    lax = edited_checkpoint(trained["model"], tmp_path / "lax.pth", threshold=0.0)
    rc, _, err = run_predict(capsys, scans, "--model", lax, "--out", tmp_path / "lax")
    assert rc == 0, err
    _, low = read_csv(tmp_path / "lax" / "predictions.csv")
    assert [float(r["tumor_fraction"]) for r in low] == [1.0, 1.0, 1.0]


def test_image_size_comes_from_checkpoint(trained, scans, tmp_path, capsys, monkeypatch):
    sizes = []
    original = bts.preprocess_image

    def recording(gray, size):
        sizes.append(size)
        return original(gray, size)

    monkeypatch.setattr(bts, "preprocess_image", recording)
    rc, _, err = run_predict(capsys, scans, "--model", trained["model"], "--out", tmp_path / "at32")
    assert rc == 0, err
    assert sizes == [32, 32, 32]

    # The same weights with image_size 64 in the checkpoint run at 64 (the U-Net is fully
    # convolutional); masks stay at the input's size.
    sizes.clear()
    at64 = edited_checkpoint(trained["model"], tmp_path / "at64.pth", image_size=64)
    rc, _, err = run_predict(capsys, scans, "--model", at64, "--out", tmp_path / "at64")
    assert rc == 0, err
    assert sizes == [64, 64, 64]
    check_outputs(tmp_path / "at64", {"1": (64, 64), "2": (64, 64), "3": (64, 64)})


def test_predict_has_no_image_size_option(trained, scans, tmp_path, capsys):
    out = tmp_path / "p"
    with pytest.raises(SystemExit) as exit_info:
        bts.main(["predict", str(scans), "--model", str(trained["model"]), "--out", str(out),
                  "--image-size", "64"])
    assert exit_info.value.code == 2
    assert "--image-size" in capsys.readouterr().err
    assert not out.exists()


# -----------------------------------------------------------------------------
# 5. Safety: checkpoints that could run code, and broken ones


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
    evil = write_evil(tmp_path / "model.pth", marker, how)
    out = tmp_path / "out"
    before = snapshot(scans)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own protocol warning: see the next test
        rc, _, err = run_predict(capsys, scans, "--model", evil, "--out", out)
    line = assert_one_clear_error(rc, err, str(evil), "refused")
    assert "could run code" in line
    assert not marker.exists()
    assert not out.exists()
    assert snapshot(scans) == before


def test_malicious_plain_pickle_prints_only_the_refusal(scans, tmp_path, capsys):
    evil = write_evil(tmp_path / "model.pth", tmp_path / "marker", "pickle")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = run_predict(capsys, scans, "--model", evil, "--out", tmp_path / "out")
    assert_one_clear_error(rc, err, str(evil), "refused")
    assert [str(w.message) for w in caught] == []  # a warning would be printed on stderr too


def _truncated(real: Path, path: Path) -> Path:
    data = real.read_bytes()
    path.write_bytes(data[:len(data) // 2])
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
    return edited_checkpoint(real, path, model=bts.UNet(width=8).state_dict())  # base_width stays 4


def _missing_weight(real: Path, path: Path) -> Path:
    state = torch.load(real, map_location="cpu", weights_only=True)
    return edited_checkpoint(real, path, model={k: v for k, v in list(state["model"].items())[:-1]})


@pytest.mark.parametrize("make, fragment", [
    (_truncated, "not a readable PyTorch checkpoint"),
    (_foreign_dict, "not a checkpoint of this script"),
    (_plain_tensor, "not a checkpoint of this script"),
    (_version_999, "version 999"),
    (_other_widths, "do not fit"),
    (_missing_weight, "do not fit"),
], ids=["truncated", "foreign-dict", "plain-tensor", "version-999", "other-widths", "missing-weight"])
def test_bad_checkpoint_is_one_clear_error(make, fragment, trained, scans, tmp_path, capsys):
    path = make(trained["model"], tmp_path / "bad.pth")
    out = tmp_path / "out"
    rc, _, err = run_predict(capsys, scans, "--model", path, "--out", out)
    assert_one_clear_error(rc, err, str(path), fragment)
    assert not out.exists()


def test_missing_checkpoint_is_one_clear_error(scans, tmp_path, capsys):
    path = tmp_path / "nope.pth"
    rc, _, err = run_predict(capsys, scans, "--model", path, "--out", tmp_path / "out")
    assert_one_clear_error(rc, err, str(path), "not found")


@pytest.mark.parametrize("text", [
    "hello world, this is not a checkpoint\n",
    "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1250000\n",
    "<html><body><h1>404 Not Found</h1></body></html>\n",
], ids=["plain-text", "git-lfs-pointer", "html-page"])
def test_text_file_checkpoint_is_one_clear_error(text, scans, tmp_path, capsys):
    path = tmp_path / "model.pth"
    path.write_text(text)
    rc, _, err = run_predict(capsys, scans, "--model", path, "--out", tmp_path / "out")
    line = assert_one_clear_error(rc, err, str(path))
    assert "could run code" not in line  # it is simply not a checkpoint
    assert not (tmp_path / "out").exists()


def test_empty_checkpoint_file_is_one_clear_error(scans, tmp_path, capsys):
    path = tmp_path / "model.pth"
    path.write_bytes(b"")
    rc, _, err = run_predict(capsys, scans, "--model", path, "--out", tmp_path / "out")
    assert_one_clear_error(rc, err, str(path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["config", "model", "threshold"])
def test_checkpoint_missing_key_is_one_clear_error(key, trained, scans, tmp_path, capsys):
    state = torch.load(trained["model"], map_location="cpu", weights_only=True)
    del state[key]
    path = tmp_path / "model.pth"
    torch.save(state, path)
    rc, _, err = run_predict(capsys, scans, "--model", path, "--out", tmp_path / "out")
    assert_one_clear_error(rc, err, str(path))
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# 6. Bad inputs, existing outputs, the input folder is never written


def test_unreadable_file_is_reported_and_skipped(trained, scans, tmp_path, capsys):
    bad = scans / "bad.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    (scans / "notes.txt").write_text("not an image\n")
    before = snapshot(scans)
    out = tmp_path / "out"
    rc, _, err = run_predict(capsys, scans, "--model", trained["model"], "--out", out)
    assert rc == 0, err
    assert "Traceback" not in err
    assert any(str(bad) in line and "skipped" in line for line in err.splitlines()), err
    assert "notes.txt" not in err  # not an image file: ignored silently
    check_outputs(out, {"1": (64, 64), "2": (64, 64), "3": (64, 64)})
    assert snapshot(scans) == before


def test_all_inputs_unreadable_writes_nothing(trained, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "out"
    rc, _, err = run_predict(capsys, folder, "--model", trained["model"], "--out", out)
    assert rc == 1
    assert "bad.png" in err and "Traceback" not in err
    assert snapshot(out, ignore=".lock", inodes=True) == {}


def test_existing_outputs_need_overwrite(trained, scans, tmp_path, capsys):
    out = tmp_path / "out"
    before_inputs = snapshot(scans)
    rc, _, err = run_predict(capsys, scans, "--model", trained["model"], "--out", out)
    assert rc == 0, err
    first = snapshot(out, ignore=".lock", inodes=True)
    assert len(first) == 8  # 3 masks, 3 overlays, predictions.csv and the hidden .written-by-predict

    rc, _, err = run_predict(capsys, scans, "--model", trained["model"], "--out", out)
    assert_one_clear_error(rc, err, "--overwrite", str(out))
    assert snapshot(out, ignore=".lock", inodes=True) == first  # same files, same inodes and mtimes: nothing rewritten

    rc, _, err = run_predict(capsys, scans, "--model", trained["model"], "--out", out, "--overwrite")
    assert rc == 0, err
    second = snapshot(out, ignore=".lock", inodes=True)
    assert sorted(second) == sorted(first)
    assert {k: v[0] for k, v in second.items()} == {k: v[0] for k, v in first.items()}  # same bytes
    assert all(second[k][1:] != first[k][1:] for k in first)  # but written again
    assert snapshot(scans) == before_inputs


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_file_predict_did_not_write_is_never_replaced(overwrite, trained, scans, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "2.png").write_bytes(b"keep me")
    rc, _, err = run_predict(capsys, scans, "--model", trained["model"], "--out", out, *overwrite)
    assert_one_clear_error(rc, err, "did not write", str(out / "masks" / "2.png"))
    assert snapshot(out) == {"masks": "<dir>", "masks/2.png": hashlib.sha256(b"keep me").hexdigest()}


@pytest.mark.parametrize("where", [".", "preds", "preds/deeper"])
def test_out_inside_input_folder_is_refused(where, trained, scans, capsys):
    before = snapshot(scans)
    out = scans / where
    rc, _, err = run_predict(capsys, scans, "--model", trained["model"], "--out", out)
    assert_one_clear_error(rc, err, "inside the input folder", str(scans))
    assert snapshot(scans) == before


def test_nonexistent_input_is_one_clear_error(trained, scans, tmp_path, capsys):
    missing = tmp_path / "no_such_scan.png"
    out = tmp_path / "out"
    rc, _, err = run_predict(capsys, scans, missing, "--model", trained["model"], "--out", out)
    assert_one_clear_error(rc, err, str(missing))
    assert not out.exists()


def test_folder_without_images_is_one_clear_error(trained, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here\n")
    rc, _, err = run_predict(capsys, empty, "--model", trained["model"], "--out", tmp_path / "out")
    assert_one_clear_error(rc, err, str(empty))
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# 7. Command line


def test_predict_help_lists_options():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "brain_tumor_segmentation.py", "predict", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    for option in ("--model", "--out", "--masks", "--overwrite", "INPUT"):
        assert option in result.stdout, option
    assert "--image-size" not in result.stdout  # the size comes from the checkpoint


def test_training_needs_no_subcommand():
    cfg, typed = bts.config_from_args([])
    assert isinstance(cfg, bts.Config)
    assert cfg == bts.Config() and not typed
    assert bts.config_from_args(["--epochs", "3"])[0].epochs == 3


# -----------------------------------------------------------------------------
# 8. mean_probability


def test_mean_probability_between_threshold_and_one(squares_model, tmp_path, capsys):
    held_out = squares_dataset(tmp_path / "held_out", 6, seed=4, empty=2)  # sq4, sq5: no square
    out = tmp_path / "pred"
    rc, _, err = run_predict(capsys, held_out / "images", "--model", squares_model, "--out", out)
    assert rc == 0, err
    _, rows = read_csv(out / "predictions.csv")
    state = torch.load(squares_model, weights_only=True)
    threshold = float(state["threshold"])
    assert state["config"]["tta"] is True  # the default recipe: predict averages each image with its mirror's
    with_tumor = [r for r in rows if int(r["tumor_pixels"]) > 0]
    without = [r for r in rows if int(r["tumor_pixels"]) == 0]
    assert with_tumor and without  # both cases are exercised
    for row in with_tumor:
        value = float(row["mean_probability"])
        assert threshold <= value <= 1.0
        prob, _ = model_probabilities(squares_model, Path(row["image"]))
        assert value == pytest.approx(prob[prob > threshold].mean(), abs=2e-4)
    for row in without:
        assert float(row["mean_probability"]) == 0.0


def test_checkpoint_from_before_tta_existed_predicts_without_mirroring(squares_model, tmp_path, capsys):
    state = torch.load(squares_model, map_location="cpu", weights_only=True)
    del state["config"]["tta"]
    old = tmp_path / "old.pth"
    torch.save(state, old)
    held_out = squares_dataset(tmp_path / "held_out", 3, seed=5)
    rc, _, err = run_predict(capsys, held_out / "images", "--model", old, "--out", tmp_path / "pred")
    assert rc == 0, err
    _, rows = read_csv(tmp_path / "pred" / "predictions.csv")
    with_tumor = [r for r in rows if int(r["tumor_pixels"])]
    assert with_tumor
    differs = 0
    for row in with_tumor:
        prob, threshold = model_probabilities(old, Path(row["image"]))  # no "tta" key: no mirroring
        mirrored, _ = model_probabilities(squares_model, Path(row["image"]))
        assert float(row["mean_probability"]) == pytest.approx(prob[prob > threshold].mean(), abs=2e-4)
        differs += abs(prob[prob > threshold].mean() - mirrored[mirrored > threshold].mean()) > 1e-3
    assert differs  # the two readings give different answers, so the check above can tell them apart


@pytest.mark.parametrize("where", ["preds", "visualizations/x", ".."])
def test_out_in_or_around_the_models_run_folder_is_refused(where, trained, scans, capsys):
    run = Path(trained["model"]).parent
    before = snapshot(run)
    rc, _, err = run_predict(capsys, scans, "--model", trained["model"], "--out", run / where)
    assert_one_clear_error(rc, err, "the run folder of")
    assert snapshot(run) == before
