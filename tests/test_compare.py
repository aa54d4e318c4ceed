"""The runs table and `compare`: did my change help?"""
import csv
import json
import threading

import pytest

import brain_tumor_segmentation as bts
from conftest import TINY_ARGS, run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs side by side: the defaults, another lr, and another seed (so another split)."""
    root = tmp_path_factory.mktemp("compare")
    data = bts.make_synthetic_dataset(root / "data", n=40, size=48, seed=2)
    for name, extra in (("base", []), ("lower-lr", ["--lr", "5e-4"]), ("other-seed", ["--seed", "7"])):
        assert bts.main(["--data-dir", str(data), "--out-dir", str(root / "outputs" / name), *TINY_ARGS, *extra]) == 0
    return root / "outputs"


def test_every_finished_run_adds_one_row_naming_what_it_changed(runs):
    with open(runs / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"].split("/")[-1] for r in rows] == ["base", "lower-lr", "other-seed"]
    assert "lr=0.0005" in rows[1]["changed"] and "lr=" not in rows[0]["changed"]
    assert "seed=7" in rows[2]["changed"]
    for row in rows:
        assert float(row["test_dice_ci95_low"]) <= float(row["test_dice"]) <= float(row["test_dice_ci95_high"])
        assert row["device"] == "cpu" and "sha256" in row["script"] and float(row["seconds"]) > 0
    assert rows[0]["test_split"] == rows[1]["test_split"] != rows[2]["test_split"]


def test_compare_labels_runs_by_the_field_that_differs(runs, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "compare", runs / "base", runs / "lower-lr", "--out", tmp_path / "c.png")
    assert rc == 0, err
    assert "lr=0.002" in out and "lr=0.0005" in out and "base" not in out
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "different splits" not in out  # same seed, same test images
    a, b = (json.loads((runs / n / "metrics.json").read_text())["test"]["dice_ci95"] for n in ("base", "lower-lr"))
    overlap = a[0] <= b[1] and b[0] <= a[1]
    assert ("intervals overlap" in out) == overlap


def test_compare_flags_runs_tested_on_different_splits(runs, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "compare", runs / "base", runs / "other-seed", "--out", tmp_path / "c.png")
    assert rc == 0, err
    assert "seed=42" in out and "seed=7" in out
    assert "tested on different splits" in out


def test_compare_takes_a_glob_and_refuses_an_unfinished_folder(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(runs)
    rc, out, err = run_cli(capsys, "compare", "*", "--out", tmp_path / "all.png")
    assert rc == 0, err
    assert out.count("\n") >= 4  # a header and three runs
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, "compare", runs / "base", tmp_path / "empty", "--out", tmp_path / "x.png")
    assert rc == 1 and "not a finished run" in err and "Traceback" not in err


def test_concurrent_rows_are_all_kept(tmp_path):
    table = tmp_path / "runs.csv"
    threads = [threading.Thread(target=bts.append_run_row, args=(table, {"when": "now", "run": str(i), "test_dice": i}))
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(table, newline="") as f:
        assert sorted(int(r["run"]) for r in csv.DictReader(f)) == list(range(20))


@pytest.mark.slow
def test_cross_validation_compares_as_mean_and_spread_over_folds(tmp_path, capsys):
    data = bts.make_synthetic_dataset(tmp_path / "data", n=40, size=48, seed=4)
    for name, extra in (("cv-a", []), ("cv-b", ["--lr", "5e-4"])):
        assert bts.main(["--data-dir", str(data), "--out-dir", str(tmp_path / name), *TINY_ARGS, "--folds", "3",
                         "--split", "random", *extra]) == 0
    rc, out, err = run_cli(capsys, "compare", tmp_path / "cv-a", tmp_path / "cv-b", "--out", tmp_path / "cv.png")
    assert rc == 0, err
    assert "mean +- sd over folds" in out
    summary = json.loads((tmp_path / "cv-a" / "cv_summary.json").read_text())
    assert f"{summary['test_dice_mean']:.4f}" in out
    with open(tmp_path / "runs.csv", newline="") as f:
        assert [r["run"].split("/")[-1] for r in csv.DictReader(f)] == ["cv-a", "cv-b"]
