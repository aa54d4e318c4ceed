#!/usr/bin/env python3
"""CPU time per image of an exported model under onnxruntime against the same checkpoint in PyTorch
(float32, and bf16 where the CPU has it natively, as predict.py runs them), on the real slices, without mirror averaging:

    .venv/bin/python bench/onnx_speed.py --model RUN_OR_CHECKPOINT --onnx FILE.onnx --data-dir DIR

Each timing is the median of --repeats passes over --images slices in batches of --batch-size,
after one untimed pass; the maximum difference of the probabilities is printed beside.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import brain_tumor_segmentation as bts  # noqa: E402


def timed(run, batches, repeats):
    run(batches[0])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [run(b) for b in batches]
        times.append(time.perf_counter() - t0)
    return statistics.median(times), np.concatenate(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--onnx", required=True)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                             "brain-tumor-segmentation"))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    path = Path(args.model) / "model.pth" if Path(args.model).is_dir() else Path(args.model)
    state = bts.load_checkpoint(path)
    size = state["config"]["image_size"]
    data = bts.load_dataset(args.data_dir, size, limit=args.images)
    x = data["images"].numpy()
    batches = [x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    session = onnxruntime.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
    model = bts.model_from_checkpoint(state, path, torch.device("cpu"))
    print(f"{len(x)} slices at {size}x{size}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    results = {"onnxruntime": timed(lambda b: session.run(None, {"images": b.astype(np.float32) / 255})[0][:, 0],
                                    batches, args.repeats)}
    for name in ["float32", "bfloat16"] if bts.cpu_has_native_bf16() else ["float32"]:
        machine = bts.Machine(torch.device("cpu"), torch.bfloat16 if name == "bfloat16" else None)  # as predict.py
        results[f"pytorch {name}"] = timed(lambda b: bts.predict_probabilities(model, torch.from_numpy(b), len(b),
                                                                               machine).numpy()[:, 0],
                                           batches, args.repeats)
    reference = results["pytorch float32"][1]
    for name, (seconds, probs) in results.items():
        print(f"{name:20s} {seconds / len(x) * 1000:7.1f} ms per slice   max |p - pytorch float32| "
              f"{np.abs(probs - reference).max():.2e}")


if __name__ == "__main__":
    main()
