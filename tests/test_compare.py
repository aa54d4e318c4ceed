"""compare.py: did my change help? Runs grouped into settings over seeds, the paired difference on
shared test images, and only intervals for runs tested on different images."""
import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import brain_tumor_segmentation as bts
import compare
from conftest import TINY_ARGS, run_cli, snapshot


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs side by side: the defaults, another lr, another training seed (the same test images)
    and another split seed (other test images)."""
    root = tmp_path_factory.mktemp("compare")
    data = bts.make_synthetic_dataset(root / "data", n=60, size=48, seed=2)
    for name, extra in (("base", []), ("lower-lr", ["--lr", "5e-4"]), ("other-seed", ["--seed", "7"]),
                        ("other-split", ["--split-seed", "7"])):
        assert bts.main(["--data-dir", str(data), "--out-dir", str(root / "outputs" / name), *TINY_ARGS, *extra]) == 0
    return root / "outputs"


def test_compare_labels_runs_by_the_field_that_differs_and_writes_its_table_beside_the_figure(runs, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "compare", runs / "base", runs / "lower-lr", "--out", tmp_path / "c")
    assert rc == 0, err
    assert "lr=0.002" in out and "lr=0.0005" in out and "base" not in out
    assert "different splits" not in out  # the same split seed: the same test images
    assert "lr=0.0005 vs lr=0.002:" in out and "Dice [95% CI" in out
    assert (tmp_path / "c" / "comparison.png").stat().st_size > 0
    with open(tmp_path / "c" / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["lr=0.002", "lr=0.0005"]
    for row, name in zip(rows, ("base", "lower-lr")):
        metrics = json.loads((runs / name / "metrics.json").read_text())
        assert float(row["test_dice"]) == pytest.approx(metrics["test"]["dice"], abs=1e-5)
    with open(tmp_path / "c" / "differences.csv", newline="") as f:
        assert next(csv.DictReader(f))["verdict"] in ("better", "worse", "cannot tell")


def test_runs_that_differ_only_in_the_seed_test_the_same_images_and_are_one_setting(runs, tmp_path, capsys):
    split = {n: json.loads((runs / n / "split.json").read_text()) for n in ("base", "other-seed")}
    assert split["base"]["test"] == split["other-seed"]["test"]  # the training seed moves no test image
    rc, out, err = run_cli(capsys, "compare", runs / "base", runs / "other-seed", "--out", tmp_path / "c")
    assert rc == 0, err
    assert "seed=42" in out and "seed=7" in out
    assert "seeds" in out and " vs " not in out  # one setting, two seeds: nothing is called a difference


def test_compare_flags_runs_tested_on_different_splits(runs, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "compare", runs / "base", runs / "other-split", "--out", tmp_path / "c")
    assert rc == 0, err
    assert "split_seed=42" in out and "split_seed=7" in out
    assert "tested on different splits" in out and "no paired difference" in out


def test_compare_takes_globs_and_refuses_what_is_not_a_finished_run(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(runs)
    (runs / "visualizations").mkdir(exist_ok=True)  # what a default run into outputs/ leaves beside the runs
    (runs / "model.pth").write_bytes(b"a default run's model")
    rc, _, err = run_cli(capsys, "compare", runs / "base", runs / "lower-lr", "--out", runs / "comparison")
    assert rc == 0, err  # and compare's own folder, which the glob matches too from now on
    for pattern in ("*", str(runs / "*")):  # relative, and absolute as a quoted glob
        rc, out, err = run_cli(capsys, "compare", pattern, "--out", tmp_path / "all")
        assert rc == 0, err
        assert out.count("\n") >= 5 and "comparison" not in out.split("setting")[0]  # a header and the 4 runs
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, "compare", runs / "base", tmp_path / "empty", "--out", tmp_path / "x")
    assert rc == 1 and "not a finished run" in err and "Traceback" not in err
    broken = Path(shutil.copytree(runs / "base", tmp_path / "broken"))
    (broken / "metrics.json").write_text('{"test": 3}')
    rc, _, err = run_cli(capsys, "compare", runs / "base", broken, "--out", tmp_path / "x")
    assert rc == 1 and "metrics.json" in err and "Traceback" not in err


def test_compare_never_writes_into_a_run_it_reads(runs, tmp_path, capsys):
    before = snapshot(runs)
    for out in (runs / "base", runs / "base" / "figures", runs):
        rc, _, err = run_cli(capsys, "compare", runs / "base", runs / "lower-lr", "--out", out)
        assert rc == 1 and "run folder" in err and "Traceback" not in err, err
    assert snapshot(runs) == before


# -----------------------------------------------------------------------------
# The statistics, on run records made by hand (so that the truth is known)


def fake_run(folder: Path, seed: int, dice: np.ndarray, patients: list[str], **changed) -> Path:
    """A finished run's record as training writes it: config, metrics, per-image scores, manifest."""
    folder.mkdir(parents=True)
    config = dataclasses.asdict(bts.Config(seed=seed, **changed))
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    names = [str(i) for i in range(len(dice))]
    interval = bts.bootstrap_interval(dice, patients)
    metrics = {"test": {"dice": float(dice.mean()), "dice_ci95": interval}, "best_val_dice": float(dice.mean()),
               "test_split": "same-images", "history": {k: rng.random(3).tolist() for k in
                                                        ("val_dice", "val_loss", "train_loss")}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    bts.save_csv(folder / "test_per_image.csv", [{"image": n, "patient": p, "dice": d}
                                                 for n, p, d in zip(names, patients, dice)])
    (folder / bts.MANIFEST).write_text(json.dumps({"program": "train", "files": ["config.json", "metrics.json",
                                                                                 "test_per_image.csv"]}))
    return folder


@pytest.fixture
def patients():
    """40 test patients of 3 slices each, some easy and some hard: each run's own interval is wide."""
    rng = np.random.default_rng(0)
    hardness = rng.uniform(0.3, 0.95, 40)
    return [f"p{i // 3}" for i in range(120)], np.repeat(hardness, 3) + rng.normal(0, 0.02, 120)


def test_a_planted_improvement_is_called_better_with_a_paired_interval_narrower_than_either_run(patients, tmp_path):
    groups, base = patients
    runs = []
    for seed in (1, 2):
        noise = np.random.default_rng(seed).normal(0, 0.01, len(base))
        runs.append(fake_run(tmp_path / f"a{seed}", seed, np.clip(base + noise, 0, 1), groups))
        runs.append(fake_run(tmp_path / f"b{seed}", seed, np.clip(base + 0.03 + noise, 0, 1), groups, lr=1e-3))
    result = compare.compare(compare.CompareConfig([str(r) for r in runs], str(tmp_path / "out")))
    (d,) = result["differences"]
    assert d["setting"] == "lr=0.001" and d["reference"] == "lr=0.002" and d["verdict"] == "better"
    assert d["low"] > 0 and d["difference"] == pytest.approx(0.03, abs=0.005)
    own = [json.loads((r / "metrics.json").read_text())["test"]["dice_ci95"] for r in runs]
    assert all(d["high"] - d["low"] < (high - low) / 3 for low, high in own)
    assert [s["seeds"] for s in result["settings"]] == [2, 2]


def test_seed_noise_is_not_called_a_difference(patients, tmp_path):
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


@pytest.mark.slow
def test_cross_validation_compares_as_mean_and_spread_over_folds_and_is_read_whole(tmp_path, capsys):
    data = bts.make_synthetic_dataset(tmp_path / "data", n=40, size=48, seed=4)
    for name, extra in (("cv-a", []), ("cv-b", ["--lr", "5e-4"])):
        assert bts.main(["--data-dir", str(data), "--out-dir", str(tmp_path / name), *TINY_ARGS, "--folds", "3",
                         "--split", "random", *extra]) == 0
    rc, out, err = run_cli(capsys, "compare", tmp_path / "cv-a", tmp_path / "cv-b", "--out", tmp_path / "cv")
    assert rc == 0, err
    assert "mean +- sd over folds" in out
    summary = json.loads((tmp_path / "cv-a" / "cv_summary.json").read_text())
    assert f"{summary['test_dice_mean']:.4f}" in out
    assert "lr=0.0005 vs lr=0.002:" in out  # the folds together test every image: a paired difference
    # a fold of another K or other settings cannot join the folder, so the summary is of one setting
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", tmp_path / "cv-a", *TINY_ARGS, "--folds", "4",
                         "--split", "random")
    assert rc == 1 and "3-fold cross-validation" in err
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", tmp_path / "cv-a", *TINY_ARGS, "--folds", "3",
                         "--fold", "1", "--split", "random", "--lr", "1e-2")
    assert rc == 1 and "other settings (--lr)" in err
    record = json.loads((tmp_path / "cv-a" / bts.MANIFEST).read_text())  # a record edited to fewer folds
    (tmp_path / "cv-a" / bts.MANIFEST).write_text(json.dumps({**record, "folds": 2}))
    rc, _, err = run_cli(capsys, "compare", tmp_path / "cv-a", tmp_path / "cv-b", "--out", tmp_path / "cv2")
    assert rc == 1 and "not one cross-validation" in err and not (tmp_path / "cv2").exists()


def test_one_setting_or_one_run_twice_is_not_called_a_difference(patients, tmp_path, capsys):
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups)
    b = fake_run(tmp_path / "b", 2, np.clip(base + 0.01, 0, 1), groups)
    compare.compare(compare.CompareConfig([str(a), str(b)], str(tmp_path / "out")))
    assert "one setting" in (tmp_path / "out" / "differences.csv").read_text()
    rc, _, err = run_cli(capsys, "compare", a, tmp_path / "." / "a", "--out", tmp_path / "out2")
    assert rc == 1 and "counted twice" in err
    shutil.copytree(a, tmp_path / "copy_of_a")  # a copy is the same run too, not a second seed
    rc, _, err = run_cli(capsys, "compare", a, tmp_path / "copy_of_a", "--out", tmp_path / "out3")
    assert rc == 1 and "counted twice" in err and not (tmp_path / "out3").exists()


def test_runs_on_other_images_do_not_cancel_the_paired_differences_of_the_others(patients, tmp_path):
    groups, base = patients
    runs = [fake_run(tmp_path / "a", 1, base, groups), fake_run(tmp_path / "b", 1, np.clip(base + 0.05, 0, 1),
                                                                 groups, lr=1e-3)]
    other = fake_run(tmp_path / "c", 1, base, groups, split_seed=7)
    metrics = json.loads((other / "metrics.json").read_text())
    (other / "metrics.json").write_text(json.dumps({**metrics, "test_split": "other-images"}))
    result = compare.compare(compare.CompareConfig([str(r) for r in (*runs, other)], str(tmp_path / "out")))
    assert [(d["setting"], d["verdict"]) for d in result["differences"]] == [("lr=0.001, split_seed=42", "better")]


def test_what_makes_one_setting_is_what_it_learned_and_its_test_images(patients, tmp_path, capsys):
    """The groups file's name is no setting; runs on other test images are never seeds of one setting; a
    pair of settings on the same images is not said to be on different splits; a fold is read only with its
    cross-validation; a Dice outside its own interval is refused in one sentence."""
    groups, base = patients
    a = fake_run(tmp_path / "a", 1, base, groups, groups="g.csv")
    b = fake_run(tmp_path / "b", 2, base, groups, groups="./g.csv")
    rc, out, err = run_cli(capsys, "compare", a, b, "--out", tmp_path / "o1")
    assert rc == 0 and "one setting" in (tmp_path / "o1" / "differences.csv").read_text() and " vs " not in out
    other = fake_run(tmp_path / "other-data", 2, base, groups)
    metrics = json.loads((other / "metrics.json").read_text())
    (other / "metrics.json").write_text(json.dumps({**metrics, "test_split": "other-images"}))
    rc, out, err = run_cli(capsys, "compare", a, other, "--out", tmp_path / "o2")
    assert rc == 0 and "tested on different splits" in out and "2 seeds" not in out
    c = fake_run(tmp_path / "c", 1, np.clip(base + 0.02, 0, 1), groups, lr=1e-3)
    d = fake_run(tmp_path / "d", 1, np.clip(base + 0.03, 0, 1), groups, lr=5e-4)
    rc, out, err = run_cli(capsys, "compare", a, c, d, "--out", tmp_path / "o3")
    assert rc == 0 and "different splits" not in out and out.count("BETTER") == 2
    fold = fake_run(tmp_path / "fold", 1, base, groups, folds=3, fold=0)
    rc, _, err = run_cli(capsys, "compare", a, fold, "--out", tmp_path / "o4")
    assert rc == 1 and "cross-validation whole" in err and not (tmp_path / "o4").exists()
    metrics = json.loads((c / "metrics.json").read_text())
    for dice in (0.99, float("nan")):
        (c / "metrics.json").write_text(json.dumps({**metrics, "test": {**metrics["test"], "dice": dice}}))
        rc, _, err = run_cli(capsys, "compare", a, c, "--out", tmp_path / "o5")
        assert rc == 1 and "metrics.json" in err and "Traceback" not in err and not (tmp_path / "o5").exists()
