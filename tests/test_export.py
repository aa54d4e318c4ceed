"""export.py and predict.py --model FILE.onnx: the exported model gives PyTorch's probabilities, the
same masks and CSV as the checkpoint, at any batch size, with the run's settings in its metadata."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import brain_tumor_segmentation as bts
import export
import predict
from conftest import REPO_ROOT, one_error, snapshot, squares_dataset

pytestmark = pytest.mark.slow  # an export traces the model: a few seconds


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run whose checkpoint carries a tuned threshold and a post-processing step, and its
    export."""
    root = tmp_path_factory.mktemp("export")
    data = squares_dataset(root / "data", 24, seed=5)
    rc = bts.main(["--data-dir", str(data), "--out-dir", str(root / "run"), "--amp", "off", "--image-size", "32",
                   "--base-width", "4", "--batch-size", "8", "--epochs", "2", "--test-samples", "2",
                   "--panel-images", "1", "--workers", "1"])
    assert rc == 0
    model = root / "run" / "model.pth"
    state = torch.load(model, weights_only=True)
    bts.save_checkpoint(model, {**state, "postprocess": ["largest_component"]})  # a choice to carry over
    assert export.main(["--model", str(root / "run"), "--out", str(root / "unet.onnx")]) == 0
    return {"data": data, "run": root / "run", "onnx": root / "unet.onnx", "root": root}


def torch_probabilities(run: Path, images: np.ndarray) -> np.ndarray:
    state = bts.load_checkpoint(run / "model.pth")
    model = bts.model_from_checkpoint(state, run / "model.pth", torch.device("cpu"))
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(images).float() / 255)).numpy()


def test_the_exported_probabilities_are_pytorchs_float32_ones(exported):
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 32, 32), dtype=np.uint8)
    session = onnxruntime.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.astype(np.float32) / 255})[0]
    assert got.shape == (5, 1, 32, 32)
    assert np.abs(got - torch_probabilities(exported["run"], images)).max() < 1e-4


def test_any_batch_size_runs(exported):
    session = onnxruntime.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    for n in (1, 3, 7):  # the export traced a batch of 2
        assert session.run(None, {"images": np.zeros((n, 1, 32, 32), np.float32)})[0].shape == (n, 1, 32, 32)


def test_the_metadata_holds_what_gives_the_runs_masks(exported):
    state = bts.load_checkpoint(exported["run"] / "model.pth")
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(exported["onnx"])).metadata_props}
    assert meta["image_size"] == 32 and meta["threshold"] == pytest.approx(state["threshold"])
    assert meta["tta"] is True and meta["postprocess"] == ["largest_component"] and meta["demo"] is False
    assert meta["epoch"] == state["epoch"] and "divided by 255" in meta["preprocessing"]
    graph = onnx.load(str(exported["onnx"])).graph
    assert graph.input[0].name == "images" and graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a free batch


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("batch", ["3", "64"])
def test_predict_with_the_onnx_file_writes_the_checkpoints_masks_and_csv(exported, batch, tmp_path):
    scans, truth = exported["data"] / "images", exported["data"] / "masks"
    before = snapshot(exported["data"])
    outs = {}
    for kind, model in (("pth", exported["run"]), ("onnx", exported["onnx"])):
        outs[kind] = tmp_path / kind
        assert predict.main([str(scans), "--model", str(model), "--masks", str(truth), "--out", str(outs[kind]),
                             "--batch-size", batch, "--amp", "off"]) == 0
    assert snapshot(exported["data"]) == before
    state = bts.load_checkpoint(exported["run"] / "model.pth")
    for name in sorted(p.name for p in (outs["pth"] / "masks").iterdir()):
        a, b = (cv2.imread(str(outs[k] / "masks" / name), cv2.IMREAD_GRAYSCALE) for k in ("pth", "onnx"))
        gray = predict.read_image(scans / name)
        probs = torch_probabilities(exported["run"], bts.preprocess_image(gray, 32)[None, None])[0, 0]
        near = np.abs(cv2.resize(probs, gray.shape[::-1]) - state["threshold"]) < 1e-4  # may round either way
        assert np.array_equal(a[~near], b[~near]), name
    rows = {k: read_rows(outs[k]) for k in outs}
    assert len(rows["pth"]) == 24 and [r["image"] for r in rows["pth"]] == [r["image"] for r in rows["onnx"]]
    for a, b in zip(rows["pth"], rows["onnx"]):
        assert {k: v for k, v in a.items() if k != "mean_probability"} == \
               {k: v for k, v in b.items() if k != "mean_probability"}
        assert abs(float(a["mean_probability"]) - float(b["mean_probability"])) < 1e-3


def test_an_existing_out_or_another_suffix_is_refused_unchanged(exported, capsys):
    before = exported["onnx"].read_bytes()
    rc = export.main(["--model", str(exported["run"]), "--out", str(exported["onnx"])])
    one_error(rc, capsys.readouterr().err, "exists already", "never replaces")
    assert exported["onnx"].read_bytes() == before
    rc = export.main(["--model", str(exported["run"]), "--out", str(exported["root"] / "unet.pt")])
    one_error(rc, capsys.readouterr().err, "ending in .onnx")
    assert not (exported["root"] / "unet.pt").exists()


def test_the_default_out_is_a_new_folder(exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert export.main(["--model", str(exported["run"])]) == 0
    (made,) = (tmp_path / "exports").iterdir()
    assert made.name.endswith("-run") and [p.name for p in made.iterdir()] == ["model.onnx"]


def test_without_the_onnx_packages_each_tool_names_what_to_install(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    rc = export.main(["--model", str(exported["run"]), "--out", str(tmp_path / "x.onnx")])
    one_error(rc, capsys.readouterr().err, "needs the package onnx", "pip install onnx onnxscript onnxruntime")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    rc = predict.main([str(exported["data"] / "images"), "--model", str(exported["onnx"]), "--out",
                       str(tmp_path / "p")])
    one_error(rc, capsys.readouterr().err, "needs onnxruntime", "pip install onnxruntime")
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "p").exists()


def test_an_onnx_file_export_did_not_write_is_one_sentence(exported, tmp_path, capsys):
    foreign = tmp_path / "other.onnx"
    model = onnx.load(str(exported["onnx"]))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    rc = predict.main([str(exported["data"] / "images"), "--model", str(foreign), "--out", str(tmp_path / "p")])
    one_error(rc, capsys.readouterr().err, "not an ONNX file written by export.py")
    (tmp_path / "junk.onnx").write_text("not a model")
    rc = predict.main([str(exported["data"] / "images"), "--model", str(tmp_path / "junk.onnx"), "--out",
                       str(tmp_path / "p")])
    one_error(rc, capsys.readouterr().err, "not an ONNX model onnxruntime can load")
    assert not (tmp_path / "p").exists()


def test_a_checkpoint_that_cannot_be_loaded_is_not_exported(tmp_path, capsys):
    (tmp_path / "model.pth").write_text("not a checkpoint")
    rc = export.main(["--model", str(tmp_path), "--out", str(tmp_path / "x.onnx")])
    one_error(rc, capsys.readouterr().err, "model.pth", "not a checkpoint this script can load")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.subprocess
def test_training_and_predict_with_a_checkpoint_never_import_the_onnx_packages():
    code = ("import sys; import brain_tumor_segmentation, predict, compare; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxscript', 'onnxruntime')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_an_unfinished_or_bf16_tested_run_is_exported_with_its_caveats_which_predict_repeats(exported, tmp_path,
                                                                                            capsys):
    """Class K/M of the hostile rounds: an export of a run without metrics.json (its threshold may be
    untuned) or tested in bf16 (onnxruntime computes in float32) predicts other masks than the run's
    test; export and predict say so instead of keeping quiet."""
    import shutil
    run = Path(shutil.copytree(exported["run"], tmp_path / "run"))
    (run / "metrics.json").unlink()
    state = torch.load(run / "model.pth", weights_only=True)
    bts.save_checkpoint(run / "model.pth", {**state, "precision": "bfloat16"})
    capsys.readouterr()
    assert export.main(["--model", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    err = capsys.readouterr().err
    assert "from an unfinished run" in err and "--resume finishes it" in err
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert "unfinished run" in meta["caveat"] and meta["tested_precision"] == "bfloat16"
    images = exported["data"] / "images"
    assert predict.main([str(images), "--model", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "unfinished run" in err and "computes in float32, its run was tested in bfloat16" in err
    assert predict.main([str(images), "--model", str(run), "--out", str(tmp_path / "q")]) == 0
    assert "from an unfinished run" in capsys.readouterr().err
    assert predict.main([str(images), "--model", str(exported["onnx"]), "--out", str(tmp_path / "r")]) == 0
    assert "warning" not in capsys.readouterr().err  # a finished float32 run's export: nothing to say
