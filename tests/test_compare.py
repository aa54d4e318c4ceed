"""compare.py: did my change help? Runs grouped into settings over seeds (a setting includes the data,
the precision and the learning rate at each epoch), the paired difference on shared test images,
only intervals for runs tested on different images, a cross-validation read whole (its Dice pooled
over its folds' test images), a glob that skips what is not a finished run, and refusals in one
sentence. Outputs go into a new folder (--out, or comparisons/DATE-TIME-compare).

Real tiny runs are trained once for the module; the statistics are checked on run folders made by
hand (fake_run, fake_cv), where the truth is known."""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import brain_tumor_segmentation as bts
import compare
from conftest import REPO_ROOT, TINY_ARGS, no_training_figures, one_error, run_folders, snapshot, squares_dataset

torch.set_num_threads(1)


def run_compare(capsys, *args) -> tuple[int, str, str]:
    """compare.main(args) in this process; returns (return code, stdout, stderr)."""
    capsys.readouterr()
    rc = compare.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -----------------------------------------------------------------------------
# Real tiny runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs side by side on 50 squares (random split: 5 test images): the defaults, another lr,
    another training seed (the same test images), another split seed (other test images), and other
    data (one training image changed: the same test images)."""
    root = tmp_path_factory.mktemp("compare")
    data = squares_dataset(root / "data", 50, seed=2)
    other = Path(shutil.copytree(data, root / "other-data"))
    common = ["--split", "random", "--device", "cpu"]
    with pytest.MonkeyPatch.context() as mp:
        no_training_figures(mp)
        for name, extra in (("base", []), ("lower-lr", ["--lr", "5e-4"]), ("other-seed", ["--seed", "7"]),
                            ("other-split", ["--split-seed", "7"])):
            assert bts.main(["--data-dir", str(data), "--out-dir", str(root / "outputs" / name), *TINY_ARGS,
                             *common, *extra]) == 0
        train = json.loads((root / "outputs" / "base" / "split.json").read_text())["train"][0]
        image = cv2.imread(str(other / "images" / f"{train}.png"), cv2.IMREAD_GRAYSCALE)
        assert cv2.imwrite(str(other / "images" / f"{train}.png"), 255 - image)  # a training image, other content
        assert bts.main(["--data-dir", str(other), "--out-dir", str(root / "outputs" / "other-data"), *TINY_ARGS,
                         *common]) == 0
    return root / "outputs"


def test_compare_labels_runs_by_folder_and_differing_fields_and_writes_its_tables(runs, tmp_path, capsys):
    rc, out, err = run_compare(capsys, runs / "base", runs / "lower-lr", "--out", tmp_path / "c")
    assert rc == 0, err
    assert re.search(r"^base \(lr=0\.002\) ", out, re.M), out  # folder name + what differs (the schedule follows
    assert re.search(r"^lower-lr \(lr=0\.0005\) ", out, re.M), out  # from --lr: shown only where it alone differs)
    assert "different splits" not in out  # the same split seed: the same test images
    assert re.search(r"lr=0\.0005 vs lr=0\.002: [+-]\d\.\d{4} Dice \[95% CI", out)
    assert "(95% over patients)" in out  # 6 test images, each its own unit: an interval for each run
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["comparison.csv", "comparison.png",
                                                                   "differences.csv"]
    assert (tmp_path / "c" / "comparison.png").stat().st_size > 0
    rows = read_csv(tmp_path / "c" / "comparison.csv")
    assert [r["label"].split(" (")[0] for r in rows] == ["base", "lower-lr"]
    for row, name in zip(rows, ("base", "lower-lr")):
        metrics = json.loads((runs / name / "metrics.json").read_text())
        assert float(row["test_dice"]) == pytest.approx(metrics["test"]["dice"], abs=1e-5)
        assert row["test_split"] == metrics["test_split"]
    (difference,) = read_csv(tmp_path / "c" / "differences.csv")
    assert difference["verdict"] in ("better", "worse", "cannot tell")
    dice = [json.loads((runs / n / "metrics.json").read_text())["test"]["dice"] for n in ("base", "lower-lr")]
    assert float(difference["difference"]) == pytest.approx(dice[1] - dice[0], abs=1e-4)


def test_runs_that_differ_only_in_the_seed_test_the_same_images_and_are_one_setting(runs, tmp_path, capsys):
    split = {n: json.loads((runs / n / "split.json").read_text()) for n in ("base", "other-seed")}
    assert split["base"]["test"] == split["other-seed"]["test"]  # the training seed moves no test image
    rc, out, err = run_compare(capsys, runs / "base", runs / "other-seed", "--out", tmp_path / "c")
    assert rc == 0, err
    assert re.search(r"^the runs +2 ", out, re.M), out  # one setting over its 2 seeds
    assert " vs " not in out  # nothing is called a difference
    assert "one setting" in (tmp_path / "c" / "differences.csv").read_text()
    assert [r["seed"] for r in read_csv(tmp_path / "c" / "comparison.csv")] == ["42", "7"]


def test_compare_flags_runs_tested_on_different_splits(runs, tmp_path, capsys):
    rc, out, err = run_compare(capsys, runs / "base", runs / "other-split", "--out", tmp_path / "c")
    assert rc == 0, err
    assert "split_seed=42" in out and "split_seed=7" in out
    assert "tested on different splits" in out and "no paired difference" in out
    assert "different images" in (tmp_path / "c" / "differences.csv").read_text()


def test_a_run_on_other_data_is_another_setting_not_the_same_run_twice(runs, tmp_path, capsys):
    """The issue: the same settings and seed on other data (one training image changed) looked like one
    run counted twice. The data fingerprint makes it another setting, on the same test images."""
    metrics = {n: json.loads((runs / n / "metrics.json").read_text()) for n in ("base", "other-data")}
    assert metrics["base"]["data"] != metrics["other-data"]["data"]
    assert metrics["base"]["test_split"] == metrics["other-data"]["test_split"]
    rc, out, err = run_compare(capsys, runs / "base", runs / "other-data", "--out", tmp_path / "c")
    assert rc == 0, err
    assert "counted twice" not in err
    assert f"data={metrics['base']['data']}" in out and f"data={metrics['other-data']['data']}" in out
    assert re.search(rf"data={metrics['other-data']['data']} vs data={metrics['base']['data']}: [+-]", out), out


def test_a_glob_skips_non_runs_and_unfinished_runs_naming_each(runs, tmp_path, capsys, monkeypatch, no_figure):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for name in ("base", "lower-lr", "other-seed"):
        (outputs / name).symlink_to(runs / name)
    (outputs / "visualizations").mkdir()  # a folder of something else
    unfinished = outputs / "20261204-101010-improved-seed1"  # a run still training: no metrics.json yet
    shutil.copytree(runs / "base", unfinished, ignore=shutil.ignore_patterns("metrics.json"))
    monkeypatch.chdir(outputs)
    rc, _, err = run_compare(capsys, runs / "base", runs / "lower-lr")  # compare's own folder: comparisons/...
    assert rc == 0, err
    (made,) = run_folders(outputs / "comparisons")
    for pattern in ("*", str(outputs / "*")):  # relative, and absolute as a quoted glob
        rc, out, err = run_compare(capsys, pattern, "--out", tmp_path / f"all{len(pattern)}")
        assert rc == 0, err
        prefix = "" if pattern == "*" else f"{outputs}/"
        assert f"warning: {prefix}visualizations: skipped, not a run folder" in err, err
        assert f"warning: {prefix}comparisons: skipped, not a run folder" in err, err
        assert f"warning: {prefix}{unfinished.name}: skipped, an unfinished run (no metrics.json yet)" in err, err
        rows = read_csv(tmp_path / f"all{len(pattern)}" / "comparison.csv")
        assert sorted(Path(r["run"]).name for r in rows) == ["base", "lower-lr", "other-seed"]
    assert made.is_dir()


def glob_folder(root: Path, patients) -> Path:
    """outputs/ with two finished fake runs of two settings."""
    groups, base = patients
    fake_run(root / "outputs" / "a", 1, base, groups)
    fake_run(root / "outputs" / "b", 2, np.clip(base + 0.02, 0, 1), groups, lr=1e-3)
    return root / "outputs"


def test_a_glob_skips_an_unfinished_cross_validation_with_a_warning(patients, tmp_path, capsys, no_figure):
    """outputs/ may hold a cross-validation whose folds are still training (--fold N in parallel): a glob
    takes the finished runs and skips it, naming it, as it skips an unfinished run."""
    groups, base = patients
    outputs = glob_folder(tmp_path, patients)
    cv = fake_cv(outputs / "cv", 1, base, groups, [40, 40, 40])
    (cv / "fold_3" / "metrics.json").unlink()
    rc, out, err = run_compare(capsys, str(outputs / "*"), "--out", tmp_path / "c")
    assert rc == 0, err
    assert sorted(Path(r["run"]).name for r in read_csv(tmp_path / "c" / "comparison.csv")) == ["a", "b"]
    assert f"warning: {cv}: skipped" in err, err


def test_a_glob_skips_a_stray_file_naming_it(patients, tmp_path, capsys, no_figure):
    outputs = glob_folder(tmp_path, patients)
    (outputs / "model.pth").write_bytes(b"a stray checkpoint")
    rc, out, err = run_compare(capsys, str(outputs / "*"), "--out", tmp_path / "c")
    assert rc == 0, err
    assert sorted(Path(r["run"]).name for r in read_csv(tmp_path / "c" / "comparison.csv")) == ["a", "b"]
    assert f"warning: {outputs / 'model.pth'}: skipped" in err, err


def test_compare_never_writes_into_a_run_it_reads(runs, tmp_path, capsys):
    before = snapshot(runs)
    for out in (runs / "base", runs):
        rc, _, err = run_compare(capsys, runs / "base", runs / "lower-lr", "--out", out)
        one_error(rc, err, str(out), "exists already")
    assert snapshot(runs) == before


# -----------------------------------------------------------------------------
# Run folders made by hand, where the truth is known


def fake_run(folder: Path, seed: int, dice: np.ndarray, patients: list[str], names: list[str] | None = None,
             test_split: str = "same-images", data: str = "data-1", precision: str = "float32",
             lr_history: list[float] | None = None, **changed) -> Path:
    """A finished run's folder as training writes it: config.json, metrics.json (the test's Dice and
    interval, the history with each epoch's lr and precision, the data and test-image fingerprints),
    test_per_image.csv."""
    folder.mkdir(parents=True)
    config = dataclasses.asdict(bts.Config(seed=seed, **changed))
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    names = names or [str(i) for i in range(len(dice))]
    metrics = {"test": {"dice": float(np.mean(dice)), "dice_ci95": bts.bootstrap_interval(dice, patients)},
               "best_val_dice": float(np.mean(dice)), "test_split": test_split, "data": data,
               "history": {**{k: rng.random(3).tolist() for k in ("val_dice", "val_loss", "train_loss")},
                           "lr": lr_history or [config["lr"]] * 3, "precision": [precision] * 3}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    bts.save_csv(folder / "test_per_image.csv", [{"image": n, "patient": p, "dice": d}
                                                 for n, p, d in zip(names, patients, dice)])
    return folder


def fake_cv(folder: Path, seed: int, dice: np.ndarray, patients: list[str], sizes: list[int], **changed) -> Path:
    """A finished cross-validation's folder: its record and fold_1..fold_K, fold k testing the next
    sizes[k-1] images (disjoint, together all of them)."""
    k = len(sizes)
    folder.mkdir(parents=True)
    config = dataclasses.asdict(bts.Config(seed=seed, folds=k, **changed))
    (folder / bts.CV_RECORD).write_text(json.dumps({"folds": k, "config": config}))
    bounds = np.cumsum([0, *sizes])
    names = [f"img{i}" for i in range(len(dice))]
    for i in range(k):
        part = slice(bounds[i], bounds[i + 1])
        fake_run(folder / f"fold_{i + 1}", seed, dice[part], patients[part], names[part], test_split=f"fold-{i + 1}",
                 folds=k, fold=i + 1, **changed)
    return folder


@pytest.fixture
def no_figure(monkeypatch):
    """comparison.png as a placeholder: the statistics tests read the tables, and drawing the figure
    costs a third of a second each time (the tests of real runs and of cross-validations draw it)."""
    monkeypatch.setattr(compare, "plot_comparison", lambda path, *args: bts.save_png(path, np.zeros((2, 2), np.uint8)))


@pytest.fixture
def patients():
    """40 test patients of 3 slices each, some easy and some hard: each run's own interval is wide."""
    rng = np.random.default_rng(0)
    hardness = rng.uniform(0.3, 0.85, 40)
    return [f"p{i // 3}" for i in range(120)], np.repeat(hardness, 3) + rng.normal(0, 0.02, 120)


def test_a_planted_improvement_is_called_better_with_a_paired_interval_narrower_than_either_run(patients, tmp_path,
                                                                                               no_figure):
    groups, base = patients
    runs = []
    for seed in (1, 2):
        noise = np.random.default_rng(seed).normal(0, 0.01, len(base))
        runs.append(fake_run(tmp_path / f"a{seed}", seed, np.clip(base + noise, 0, 1), groups))
        runs.append(fake_run(tmp_path / f"b{seed}", seed, np.clip(base + 0.03 + noise, 0, 1), groups, lr=1e-3))
    result = compare.compare(compare.CompareConfig([str(r) for r in runs], str(tmp_path / "out")))
    (d,) = result["differences"]
    assert d["setting"].startswith("lr=0.001") and d["reference"].startswith("lr=0.002")
    assert d["verdict"] == "better"
    assert d["low"] > 0 and d["difference"] == pytest.approx(0.03, abs=0.005)
    own = [json.loads((r / "metrics.json").read_text())["test"]["dice_ci95"] for r in runs]
    assert all(d["high"] - d["low"] < (high - low) / 3 for low, high in own)
    assert [s["seeds"] for s in result["settings"]] == [2, 2]


def test_seed_noise_is_not_called_a_difference(patients, tmp_path, no_figure):
    """Two settings that learn alike, but whose seeds differ a lot: the interval that resamples seeds
    too stays across zero, where a patients-only interval of two single runs would not."""
    groups, base = patients
    runs = []
    for seed, shift in ((1, -0.04), (2, 0.04)):
        runs.append(fake_run(tmp_path / f"a{seed}", seed, np.clip(base + shift, 0, 1), groups))
        runs.append(fake_run(tmp_path / f"b{seed}", seed + 10, np.clip(base - shift, 0, 1), groups, lr=1e-3))
    result = compare.compare(compare.CompareConfig([str(r) for r in runs], str(tmp_path / "out")))
    assert result["differences"][0]["verdict"] == "cannot tell"
    single = compare.compare(compare.CompareConfig([str(runs[0]), str(runs[1])], str(tmp_path / "single")))
    assert single["differences"][0]["verdict"] == "better"  # +0.08: real for these two runs, not for the settings


def test_one_setting_or_one_run_twice_is_not_called_a_difference(patients, tmp_path, no_figure, capsys):
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups)
    b = fake_run(tmp_path / "b", 2, np.clip(base + 0.01, 0, 1), groups)
    compare.compare(compare.CompareConfig([str(a), str(b)], str(tmp_path / "out")))
    assert "one setting" in (tmp_path / "out" / "differences.csv").read_text()
    rc, _, err = run_compare(capsys, a, tmp_path / "." / "a", "--out", tmp_path / "out2")
    one_error(rc, err, "counted twice")
    shutil.copytree(a, tmp_path / "copy_of_a")  # a copy is the same run too, not a second seed
    rc, _, err = run_compare(capsys, a, tmp_path / "copy_of_a", "--out", tmp_path / "out3")
    one_error(rc, err, "counted twice")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


@pytest.mark.parametrize("field, value, shown", [
    ("data", "data-2", "data=data-2"),
    ("precision", "bfloat16", "precision=bfloat16"),
    ("lr_history", [0.002, 0.001, 0.0005], "schedule="),  # the same --lr, another schedule (other --epochs)
])
def test_other_data_precision_or_schedule_is_another_setting_never_one_run_twice(field, value, shown, patients,
                                                                                 tmp_path, no_figure, capsys):
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups)
    b = fake_run(tmp_path / "b", 1, np.clip(base + 0.03, 0, 1), groups, **{field: value})  # the same seed
    rc, out, err = run_compare(capsys, a, b, "--out", tmp_path / "out")
    assert rc == 0, err
    assert "counted twice" not in err
    assert re.search(rf"^b \(.*{shown}", out, re.M), out
    (d,) = read_csv(tmp_path / "out" / "differences.csv")
    assert d["setting"] != d["reference"] and d["verdict"] == "better"


@pytest.mark.parametrize("field, value", [("data", "data-2"), ("precision", "bfloat16"),
                                          ("lr_history", [0.002, 0.001, 0.0005])],
                         ids=["other-data", "other-precision", "other-schedule"])
def test_runs_of_two_seeds_on_other_data_precision_or_schedule_are_not_two_seeds_of_one_setting(field, value, patients,
                                                                                               tmp_path, no_figure,
                                                                                               capsys):
    """Issue class I: runs on different data (different data fingerprints), at another precision or with
    another schedule were grouped as two seeds of one setting when their seeds differed. Here they are
    two settings of one seed each, compared by a paired difference."""
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups)
    b = fake_run(tmp_path / "b", 2, np.clip(base + 0.03, 0, 1), groups, **{field: value})
    rc, out, err = run_compare(capsys, a, b, "--out", tmp_path / "out")
    assert rc == 0, err
    assert "seeds  mean test Dice" not in out  # no setting of several seeds
    (d,) = read_csv(tmp_path / "out" / "differences.csv")
    assert d["setting"] != d["reference"] and d["seeds"] == "1 vs 1" and d["verdict"] == "better"


@pytest.fixture(scope="module")
def learned_otherwise(runs):
    """Beside `runs`, on its data and split, all with seed 42: a fresh 2-epoch run in float32, the same in
    bf16 (--amp bf16), and a 1-epoch run resumed to 2 epochs (its learning rate had another schedule)."""
    data, out = runs.parent / "data", runs.parent / "learned"
    common = [*TINY_ARGS, "--split", "random", "--device", "cpu"]
    with pytest.MonkeyPatch.context() as mp:
        no_training_figures(mp)
        for name, extra in (("fresh", ["--epochs", "2"]), ("bf16", ["--epochs", "2", "--amp", "bf16"]),
                            ("resumed", [])):
            assert bts.main(["--data-dir", str(data), "--out-dir", str(out / name), *common, *extra]) == 0
        assert bts.main(["--resume", str(out / "resumed"), "--epochs", "2"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("other", ["bf16", "resumed"])
def test_real_runs_at_another_precision_or_resumed_to_other_epochs_are_other_settings(other, learned_otherwise,
                                                                                      tmp_path, capsys):
    """Issue class I through real runs: compare refused a bf16 run, or a run resumed with other --epochs,
    beside a fresh float32 run of the same settings and seed as "one run counted twice"."""
    fresh, run = learned_otherwise / "fresh", learned_otherwise / other
    configs = [json.loads((r / "config.json").read_text()) for r in (fresh, run)]
    assert configs[0]["seed"] == configs[1]["seed"] and configs[0]["epochs"] == configs[1]["epochs"] == 2
    rc, out, err = run_compare(capsys, fresh, run, "--out", tmp_path / "c")
    assert rc == 0, err
    assert "counted twice" not in err
    (d,) = read_csv(tmp_path / "c" / "differences.csv")  # two settings on the same test images
    assert d["setting"] != d["reference"] and d["seeds"] == "1 vs 1"
    shown = "precision=bfloat16" if other == "bf16" else "schedule="
    assert re.search(rf"^{other} \(.*{shown}", out, re.M), out


def test_runs_on_other_images_do_not_cancel_the_paired_differences_of_the_others(patients, tmp_path, no_figure):
    groups, base = patients
    runs = [fake_run(tmp_path / "a", 1, base, groups), fake_run(tmp_path / "b", 1, np.clip(base + 0.05, 0, 1),
                                                                 groups, lr=1e-3)]
    other = fake_run(tmp_path / "c", 1, base, groups, test_split="other-images", split_seed=7)
    result = compare.compare(compare.CompareConfig([str(r) for r in (*runs, other)], str(tmp_path / "out")))
    assert [d["verdict"] for d in result["differences"]] == ["better"]
    assert "lr=0.001" in result["differences"][0]["setting"] and "split_seed=42" in result["differences"][0]["setting"]


def test_what_makes_one_setting_is_what_it_learned_and_its_test_images(patients, tmp_path, no_figure, capsys):
    """The groups file's name is no setting; runs on other test images are never seeds of one setting; a
    pair of settings on the same images is not said to be on different splits; a fold is read only with its
    cross-validation; a Dice outside its own interval is refused in one sentence."""
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups, groups="g.csv")
    b = fake_run(tmp_path / "b", 2, base, groups, groups="./g.csv")
    rc, out, err = run_compare(capsys, a, b, "--out", tmp_path / "o1")
    assert rc == 0 and "one setting" in (tmp_path / "o1" / "differences.csv").read_text() and " vs " not in out
    other = fake_run(tmp_path / "other-images", 2, base, groups, test_split="other-images")
    rc, out, err = run_compare(capsys, a, other, "--out", tmp_path / "o2")
    assert rc == 0 and "tested on different splits" in out and "2 seeds" not in out
    c = fake_run(tmp_path / "c", 1, np.clip(base + 0.02, 0, 1), groups, lr=1e-3)
    d = fake_run(tmp_path / "d", 1, np.clip(base + 0.03, 0, 1), groups, lr=5e-4)
    rc, out, err = run_compare(capsys, a, c, d, "--out", tmp_path / "o3")
    assert rc == 0 and "different splits" not in out and out.count("BETTER") == 2
    fold = fake_run(tmp_path / "fold", 1, base, groups, folds=3, fold=1)
    rc, _, err = run_compare(capsys, a, fold, "--out", tmp_path / "o4")
    one_error(rc, err, str(fold), "cross-validation whole")
    assert not (tmp_path / "o4").exists()
    metrics = json.loads((c / "metrics.json").read_text())
    for dice in (0.99, float("nan")):
        (c / "metrics.json").write_text(json.dumps({**metrics, "test": {**metrics["test"], "dice": dice}}))
        rc, _, err = run_compare(capsys, a, c, "--out", tmp_path / "o5")
        one_error(rc, err, str(c), "metrics.json")
        assert not (tmp_path / "o5").exists()


# -----------------------------------------------------------------------------
# Cross-validations: read whole, their Dice pooled over all their folds' test images


def test_a_cross_validations_dice_is_pooled_and_the_printed_means_agree_with_the_difference(patients, tmp_path,
                                                                                           capsys):
    """The issue: printed means of fold means 0.0772 apart, but a paired difference of +0.0784. Folds of
    unequal size, with b's gain larger on the small folds: the two ways of averaging disagree here, and
    the printed Dice must be the one the paired difference compares."""
    groups, base = patients
    sizes = [30, 30, 60]
    gain = np.concatenate([np.full(30, 0.12), np.full(30, 0.12), np.full(60, 0.03)])
    dice = {"cv-a": base, "cv-b": np.clip(base + gain, 0, 1)}
    a = fake_cv(tmp_path / "cv-a", 1, dice["cv-a"], groups, sizes)
    b = fake_cv(tmp_path / "cv-b", 1, dice["cv-b"], groups, sizes, lr=1e-3)
    rc, out, err = run_compare(capsys, a, b, "--out", tmp_path / "out")
    assert rc == 0, err
    bounds = np.cumsum([0, *sizes])
    pooled = {k: float(np.mean(v)) for k, v in dice.items()}
    fold_means = {k: float(np.mean([v[bounds[i]:bounds[i + 1]].mean() for i in range(3)])) for k, v in dice.items()}
    gap = pooled["cv-b"] - pooled["cv-a"]
    assert abs((fold_means["cv-b"] - fold_means["cv-a"]) - gap) > 0.005  # the two averages tell apart here
    for name in ("cv-a", "cv-b"):  # each printed Dice is the pooled mean over its 120 test images
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert f" {pooled[name]:.4f} " in line, (line, pooled[name])
    rows = {Path(r["run"]).name: r for r in read_csv(tmp_path / "out" / "comparison.csv")}
    assert {k: float(r["test_dice"]) for k, r in rows.items()} == pytest.approx(pooled, abs=1e-5)
    assert rows["cv-a"]["folds"] == "3"
    (d,) = read_csv(tmp_path / "out" / "differences.csv")
    assert float(d["difference"]) == pytest.approx(gap, abs=1e-4)  # printed means and difference agree
    assert int(d["test_images"]) == 120
    assert f"{gap:+.4f} Dice" in out


def test_a_fold_alone_an_unfinished_or_edited_cross_validation_is_one_sentence(patients, tmp_path, no_figure, capsys):
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups, test_split="all")
    cv = fake_cv(tmp_path / "cv", 1, base, groups, [40, 40, 40])
    rc, out, err = run_compare(capsys, a, cv, "--out", tmp_path / "ok")
    assert rc == 0, err  # the finished cross-validation is read
    rc, _, err = run_compare(capsys, a, cv / "fold_2", "--out", tmp_path / "o1")
    one_error(rc, err, str(cv / "fold_2"), "cross-validation whole", str(cv))
    record = json.loads((cv / bts.CV_RECORD).read_text())
    (cv / bts.CV_RECORD).write_text(json.dumps({**record, "folds": 2}))  # a record edited to fewer folds
    rc, _, err = run_compare(capsys, a, cv, "--out", tmp_path / "o2")
    one_error(rc, err, str(cv), "not one cross-validation")
    (cv / bts.CV_RECORD).write_text(json.dumps(record))
    (cv / "fold_3" / "metrics.json").unlink()  # a fold still training
    rc, _, err = run_compare(capsys, a, cv, "--out", tmp_path / "o3")
    one_error(rc, err, str(cv), "fold_3", "unfinished")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


@pytest.mark.parametrize("fold_3", ["other-data", "overlapping-test"])
def test_a_cross_validation_whose_folds_are_not_one_partition_is_refused(fold_3, patients, tmp_path, no_figure,
                                                                         capsys):
    """Issue class H: folds trained while the groups file changed tested some images twice, and compare
    pooled them as one cross-validation. A fold on other data (the groups file's content is part of the
    data fingerprint) or test parts that overlap are not one partition: one sentence, nothing written."""
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups, test_split="all")
    cv = fake_cv(tmp_path / "cv", 1, base, groups, [40, 40, 40])
    rc, _, err = run_compare(capsys, a, cv, "--out", tmp_path / "ok")
    assert rc == 0, err  # as made: one partition
    fold = cv / "fold_3"
    if fold_3 == "other-data":
        _metrics(fold, data="data-2")
    else:  # fold 3 tests ten of fold 1's images again
        rows = read_csv(fold / "test_per_image.csv")
        for i, row in enumerate(rows[:10]):
            row["image"] = f"img{i}"
        bts.save_csv(fold / "test_per_image.csv", rows)
    rc, _, err = run_compare(capsys, a, cv, "--out", tmp_path / "out")
    one_error(rc, err, str(cv), "not one cross-validation")
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Refusals: one sentence, nothing created


def _metrics(run: Path, **changes):
    metrics = json.loads((run / "metrics.json").read_text())
    for key, value in changes.items():
        if key == "dice":
            metrics["test"]["dice"] = value
        elif key == "lr":
            del metrics["history"]["lr"]
        else:
            metrics[key] = value
    (run / "metrics.json").write_text(json.dumps(metrics))


def _per_image(run: Path, text: str):
    (run / "test_per_image.csv").write_text(text)


def _config(run: Path, **changes):
    config = json.loads((run / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, fragment", [
    (lambda r: _metrics(r, dice=1.5), "metrics.json or test_per_image.csv is not what a finished run writes"),
    (lambda r: _metrics(r, dice=-0.1), "metrics.json or test_per_image.csv is not what a finished run writes"),
    (lambda r: _metrics(r, best_val_dice=2.0), "metrics.json or test_per_image.csv is not what a finished run"),
    (lambda r: _metrics(r, dice="high"), "metrics.json or test_per_image.csv is not what a finished run writes"),
    (lambda r: _metrics(r, lr=None), "metrics.json or test_per_image.csv is not what a finished run writes"),
    (lambda r: _per_image(r, "image,patient,dice\n0,p0,1.2\n"), "test_per_image.csv is not what a finished run"),
    (lambda r: _per_image(r, "image,patient\n0,p0\n"), "test_per_image.csv is not what a finished run writes"),
    (lambda r: (r / "test_per_image.csv").unlink(), "test_per_image.csv is not what a finished run writes"),
    (lambda r: (r / "metrics.json").write_text('{"test": 3}'), "metrics.json: missing or not what a finished run"),
    (lambda r: (r / "metrics.json").write_text("[1, 2]"), "metrics.json: missing or not what a finished run"),
    (lambda r: (r / "metrics.json").write_bytes(b"\xff\xfe{"), "metrics.json: missing or not what a finished run"),
    (lambda r: (r / "config.json").write_text("{"), "config.json: missing or not what a finished run writes"),
    (lambda r: _config(r, seed=None), "config.json: missing or not what a finished run writes"),
    (lambda r: _config(r, base_width=None), "its settings lack base_width"),
    (lambda r: _config(r, image_size=33), "its settings are invalid"),
], ids=["dice-above-1", "dice-below-0", "val-dice-above-1", "dice-not-a-number", "history-without-lr",
        "per-image-dice-above-1", "per-image-without-dice", "per-image-missing", "metrics-not-a-run", "metrics-a-list",
        "metrics-not-utf8", "config-not-json", "config-without-seed", "config-without-base-width",
        "config-invalid"])
def test_an_edited_run_is_refused_in_one_sentence(edit, fragment, patients, tmp_path, no_figure, capsys):
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups)
    b = fake_run(tmp_path / "b", 2, base, groups)
    edit(b)
    rc, _, err = run_compare(capsys, a, b, "--out", tmp_path / "out")
    one_error(rc, err, str(b), fragment)
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_typed_wrong_run_folder_is_not_found(patients, tmp_path, no_figure, capsys):
    """Issue class S: a typo'd folder is "not found", never a permissions problem nor a run that lacks files."""
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups)
    fake_run(tmp_path / "b", 2, base, groups)
    typo = tmp_path / "bb"
    rc, _, err = run_compare(capsys, a, typo, "--out", tmp_path / "out")
    message = one_error(rc, err, str(typo))
    assert "permission" not in message
    assert "not found" in message or "no such" in message, message


def test_compare_refuses_without_assert():
    """Refusals are UserErrors, not assert statements (python -O would skip those)."""
    tree = ast.parse((REPO_ROOT / "compare.py").read_text())
    assert not [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]


def test_what_is_not_a_run_or_too_few_runs_is_one_sentence(patients, tmp_path, no_figure, capsys):
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups)
    (tmp_path / "empty").mkdir()
    rc, _, err = run_compare(capsys, a, tmp_path / "empty", "--out", tmp_path / "x")
    one_error(rc, err, str(tmp_path / "empty"), "not a finished run")
    rc, _, err = run_compare(capsys, a, "--out", tmp_path / "x")
    one_error(rc, err, "at least two finished runs")
    rc, _, err = run_compare(capsys, str(tmp_path / "nothing-*"), "--out", tmp_path / "x")
    one_error(rc, err, "at least two finished runs")
    assert not (tmp_path / "x").exists()


# -----------------------------------------------------------------------------
# The output folder: new, or comparisons/DATE-TIME-compare


@pytest.mark.parametrize("kind", ["empty-folder", "folder", "file", "symlink-to-folder", "dangling-symlink"])
def test_an_existing_out_of_any_kind_is_refused_unchanged(kind, patients, tmp_path, no_figure, capsys):
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups)
    b = fake_run(tmp_path / "b", 2, base, groups)
    out, target = tmp_path / "out", tmp_path / "target"
    if kind == "empty-folder":
        out.mkdir()
    elif kind == "folder":
        out.mkdir()
        (out / "comparison.csv").write_text("an earlier comparison\n")
    elif kind == "file":
        out.write_text("a file\n")
    elif kind == "symlink-to-folder":
        target.mkdir()
        (target / "comparison.png").write_bytes(b"keep")
        out.symlink_to(target)
    else:
        out.symlink_to(target)
    before = snapshot(tmp_path)
    rc, _, err = run_compare(capsys, a, b, "--out", out)
    one_error(rc, err, str(out), "exists already", "writes only into a folder it creates")
    assert snapshot(tmp_path) == before
    assert not target.exists() or kind == "symlink-to-folder"


def test_the_default_output_is_a_new_dated_folder_under_comparisons(patients, tmp_path, capsys, monkeypatch, no_figure):
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups)
    b = fake_run(tmp_path / "b", 2, base, groups)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        rc, out, err = run_compare(capsys, a, b)
        assert rc == 0, err
    first, second = run_folders(tmp_path / "comparisons")
    for folder in (first, second):
        assert re.fullmatch(r"\d{8}-\d{6}-compare(-\d+)?", folder.name), folder.name
        assert sorted(p.name for p in folder.iterdir()) == ["comparison.csv", "comparison.png", "differences.csv"]
    assert f"written: {Path('comparisons') / second.name / 'comparison.png'}" in out


def test_a_failure_while_writing_removes_the_new_folder(patients, tmp_path, capsys, monkeypatch):
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups)
    b = fake_run(tmp_path / "b", 2, base, groups)

    def full_disk(path, fig):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(bts, "save_figure", full_disk)
    rc, _, err = run_compare(capsys, a, b, "--out", tmp_path / "out")
    one_error(rc, err, "the disk is full", str(tmp_path / "out" / "comparison.png"))
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# A real cross-validation


@pytest.mark.slow
def test_a_real_cross_validation_is_read_whole_and_pooled(runs, tmp_path, capsys, monkeypatch):
    no_training_figures(monkeypatch)
    data = squares_dataset(tmp_path / "data", 24, seed=4)
    cv = tmp_path / "cv"
    import cross_validate
    assert cross_validate.main(["--data-dir", str(data), "--out-dir", str(cv), *TINY_ARGS, "--folds", "3", "--split",
                                "random", "--device", "cpu"]) == 0
    per_image = {}
    for k in (1, 2, 3):
        per_image.update({r["image"]: float(r["dice"]) for r in read_csv(cv / f"fold_{k}" / "test_per_image.csv")})
    assert len(per_image) == 24  # the folds test every image once
    rc, out, err = run_compare(capsys, runs / "base", cv, "--out", tmp_path / "c")
    assert rc == 0, err
    rows = {Path(r["run"]).name: r for r in read_csv(tmp_path / "c" / "comparison.csv")}
    assert rows["cv"]["folds"] == "3"
    assert float(rows["cv"]["test_dice"]) == pytest.approx(np.mean(list(per_image.values())), abs=1e-5)
    assert "tested on different splits" in out  # 24 other images: no paired difference with base
    rc, _, err = run_compare(capsys, runs / "base", cv / "fold_1", "--out", tmp_path / "c2")
    one_error(rc, err, "cross-validation whole")
    assert not (tmp_path / "c2").exists()
    rc, _, err = run_compare(capsys, runs / "base", cv, f"{cv}/*", "--out", tmp_path / "c3")  # a glob inside it
    assert rc == 0, err
    assert all(f"{cv / f'fold_{k}'}: skipped, a fold of the cross-validation {cv}" in err for k in (1, 2, 3)), err
    assert len(read_csv(tmp_path / "c3" / "comparison.csv")) == 2


# -----------------------------------------------------------------------------
# torchrun's variables change nothing (its support is gone on purpose)


@pytest.mark.subprocess
def test_torchrun_variables_in_the_environment_change_nothing_in_compare(runs, tmp_path):
    """Issue class N: with RANK or WORLD_SIZE set (no torchrun), compare printed nothing, neither its table
    nor its refusals. It is one process like any other now."""
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO_ROOT / "compare.py")]
    result = subprocess.run([*command, str(runs / "base"), str(runs / "lower-lr"), "--out", str(tmp_path / "c")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(r"^base \(", result.stdout, re.M) and "Dice [95% CI" in result.stdout, result.stdout
    assert f"written: {tmp_path / 'c' / 'comparison.png'}" in result.stdout
    refused = subprocess.run([*command, str(runs / "base"), str(runs / "base"), "--out", str(tmp_path / "d")],
                             capture_output=True, text=True, timeout=300, env=env)
    one_error(refused.returncode, refused.stderr, "counted twice")
    assert not (tmp_path / "d").exists()
