#!/usr/bin/env python3
"""Balance of the patient split and folds on patients.csv: scikit-learn's StratifiedGroupKFold (the
script now) against the hand-written splitter it replaced (commit 056bcae, read with `git show`).

    .venv/bin/python bench/split_balance.py

For seeds 1-20: the largest gap between a part's share of the images and its target (70/20/10, or
1/5 per fold), and the largest gap between a tumour type's share in a part and in the whole data."""
import csv
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import brain_tumor_segmentation as bts  # noqa: E402

rows = list(csv.DictReader(open(ROOT / "patients.csv")))
groups, strata = [r["patient_id"] for r in rows], [r["tumor_type"] for r in rows]
types = sorted(set(strata))
share = {t: strata.count(t) / len(strata) for t in types}


def gaps(parts: dict, targets: dict) -> tuple[float, float]:
    size = max(abs(len(parts[p]) / len(groups) - targets[p]) for p in parts)
    kind = max(abs(np.mean([strata[i] == t for i in parts[p]]) - share[t]) for p in parts for t in types)
    return size, kind


def old_module():
    source = subprocess.run(["git", "show", "056bcae:brain_tumor_segmentation.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_bts.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_bts", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_bts"] = module
    spec.loader.exec_module(module)
    return module


def report(name: str, make_parts, targets: dict) -> None:
    result = np.array([gaps(make_parts(seed), targets) for seed in range(1, 21)])
    print(f"{name:44s} part size gap: mean {result[:, 0].mean():.4f}, max {result[:, 0].max():.4f} | "
          f"tumour-type share gap: mean {result[:, 1].mean():.4f}, max {result[:, 1].max():.4f}")


def as_parts(fold: np.ndarray) -> dict:
    return {k: np.flatnonzero(fold == k).tolist() for k in range(5)}


old = old_module()
split_targets, fold_targets = {"train": 0.7, "val": 0.2, "test": 0.1}, dict.fromkeys(range(5), 0.2)
report("70/20/10 split, hand-written (056bcae)", lambda s: old.split_by_group(groups, strata, (0.2, 0.1), s),
       split_targets)
report("70/20/10 split, StratifiedGroupKFold", lambda s: bts.split_by_group(groups, strata, (0.2, 0.1), s),
       split_targets)
report("5 folds, hand-written (056bcae)", lambda s: as_parts(old.fold_by_group(groups, strata, 5, s)), fold_targets)
report("5 folds, StratifiedGroupKFold", lambda s: as_parts(bts.group_folds(groups, strata, 5, s)), fold_targets)

# Re-scanned patients (issue #22): ids that differ only by a trailing letter, split as separate patients
# (as before) or grouped by their stem (the script now), on the 2,734 images of ../shared/data.
shared = ROOT.parent / "shared" / "data" / "brain-tumor-segmentation" / "images"
names = {p.stem for p in shared.glob("*.png")}
rows = [r for r in rows if r["image"] in names]


def stem(patient: str) -> str:
    return patient[:-1] if patient[-1].isalpha() and patient[-2].isdigit() else patient


ids, kinds = [r["patient_id"] for r in rows], [r["tumor_type"] for r in rows]
print(f"{len(set(ids))} patients and {len({stem(i) for i in ids})} stems in {shared.parent}")
for seed in (1, 2, 42):
    for name, units in (("by patient id", ids), ("by id stem", [stem(i) for i in ids])):
        parts = bts.split_by_group(units, kinds, (0.2, 0.1), seed)
        train = {stem(ids[i]) for i in parts["train"]}
        crossing = {p: sum(stem(ids[i]) in train for i in parts[p]) for p in ("val", "test")}
        print(f"split seed {seed}, {name:14s} test slices whose stem has training slices: {crossing['test']} of "
              f"{len(parts['test'])}; validation: {crossing['val']} of {len(parts['val'])}")
