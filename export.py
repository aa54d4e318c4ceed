#!/usr/bin/env python3
"""Export a model trained by brain_tumor_segmentation.py to ONNX, to predict without PyTorch.

    python export.py --model outputs/RUN                       # exports/DATE-TIME-RUN/model.onnx
    python export.py --model outputs/RUN --out unet.onnx       # a new file of that name
    python predict.py --model unet.onnx scans/                 # the same masks, with onnxruntime

The ONNX graph maps a batch of preprocessed slices, float32 (N, 1, S, S) in [0, 1] (the image read
as gray, resized to S x S, divided by 255), to tumour probabilities of the same shape; the batch
size is free, S is the run's image size. The file's metadata holds the rest of what gives the run's
masks: the image size, the preprocessing, the threshold, the mirror averaging and the
post-processing (`onnx.load(f).metadata_props`). Needs onnx and onnxscript (predicting needs
onnxruntime); training never imports them.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import brain_tumor_segmentation as bts  # noqa: E402
import predict  # noqa: E402
from brain_tumor_segmentation import UserError, setting  # noqa: E402

OPSET = 18
PREPROCESSING = ("gray (8-bit divided by 255; 16-bit and float by their own maximum), resized to image_size x "
                 "image_size (area when shrinking, linear when enlarging), as float32 (N, 1, S, S) in [0, 1]")


@dataclass
class ExportConfig:
    model: str = setting("", "a finished run's folder (its model.pth) or a checkpoint file")
    out: str = setting("", "the .onnx file to create (it must not exist); default: a new "
                           "exports/DATE-TIME-RUN/model.onnx")

    def __post_init__(self):
        bts.check_fields(self)
        if not self.model:
            raise UserError("--model: name a finished run's folder (or its model.pth)")


class Probabilities(nn.Module):
    """The U-Net with the sigmoid: what the ONNX file computes."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.unet(images))


def export(cfg: ExportConfig) -> Path:
    """Write the ONNX file of a checkpoint with its metadata; returns its path."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise UserError(f"export.py needs the package {e.name}: pip install onnx onnxscript onnxruntime") from None
    path = Path(cfg.model) / "model.pth" if Path(cfg.model).is_dir() else Path(cfg.model)
    state = bts.load_checkpoint(path)
    model = Probabilities(bts.model_from_checkpoint(state, path, torch.device("cpu"))).eval()  # BatchNorm: running stats
    size = state["config"]["image_size"]
    proto = onnx_model(model, size, path)
    metadata = {"format": "brain-tumor-segmentation-unet-onnx", "image_size": size, "preprocessing": PREPROCESSING,
                "threshold": float(state["threshold"]), "tta": bool(state["config"].get("tta", bts.BEFORE_FIELD_EXISTED[
                    "tta"])), "postprocess": state.get("postprocess", []), "demo": bool(state["config"].get("demo")),
                "epoch": state["epoch"], "tested_precision": state.get("precision", "float32"),
                "source": str(path.resolve()), "caveat": predict.model_caveat(path, state)}
    if metadata["caveat"]:
        bts.warn(metadata["caveat"])
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    out = new_file(cfg.out, path)
    bts.atomic_write(out, lambda f: f.write(proto.SerializeToString()))
    onnx.checker.check_model(str(out))
    bts.log(f"exported {path} (epoch {state['epoch']}, {size}x{size}, threshold {metadata['threshold']:.2f}, "
            f"mirror averaging {metadata['tta']}, post-processing {', '.join(metadata['postprocess']) or 'none'}) "
            f"to {out}\npredict with: {bts.command('predict.py', '--model', out)} SCAN.png ...")
    return out


def onnx_model(model: nn.Module, size: int, path: Path):
    """The ONNX proto of `model` with a free batch size: the dynamo exporter (PyTorch's recommended
    one), or where it fails, the classic one, which the log then names."""
    import onnx
    example = (torch.rand(2, 1, size, size),)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # notes about operators this model does not use
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the exporter's own progress notes
            program = torch.onnx.export(model, example, dynamo=True, opset_version=OPSET, input_names=["images"],
                                        output_names=["probabilities"], verbose=False,
                                        dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
        return program.model_proto
    except Exception as e:  # the exporter raises many kinds
        bts.warn(f"the dynamo exporter failed ({type(e).__name__}: {bts.first_line(e)}); used the classic one")
    buffer = io.BytesIO()
    try:
        torch.onnx.export(model, example, buffer, dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=["probabilities"], dynamic_axes={"images": {0: "batch"},
                                                                        "probabilities": {0: "batch"}})
    except Exception as e:
        raise UserError(f"{path}: could not be exported to ONNX ({type(e).__name__}: {bts.first_line(e)})") from None
    return onnx.load_from_string(buffer.getvalue())


def new_file(given: str, model_path: Path) -> Path:
    """The file to write: --out, which must not exist (nothing is ever replaced), or model.onnx in a
    new exports/DATE-TIME-RUN folder."""
    if not given:
        return bts.new_folder("", "exports", model_path.resolve().parent.name, "export") / "model.onnx"
    out = Path(given)
    if out.exists() or out.is_symlink():
        raise UserError(f"{out} exists already: export.py never replaces a file. Name a new one, or leave --out out "
                        f"for a new time-stamped folder")
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: name a file ending in .onnx")
    return out


def main(argv: list[str] | None = None) -> int:
    return bts.run_tool(ExportConfig, export, __doc__.split("\n\n")[0], "export.py", argv)


if __name__ == "__main__":
    sys.exit(main())
