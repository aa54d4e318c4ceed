"""The split: whole patients (groups) in each part, from split_seed alone. The shipped patients.csv
(re-scans of one patient kept together) where it fits the pixels, a --groups CSV, approximate groups
of similar neighbouring slices otherwise, or --split random; K folds for cross-validation; the data
fingerprint; and a resumed run's split refused on other data."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import brain_tumor_segmentation as bts
from conftest import REAL_DIR, TINY_ARGS, make_dataset, one_error, run_cli, snapshot, square_pair, write_pair

PARTS = ("train", "val", "test")


def random_groups(seed, n_groups=40, max_size=15, strata=("glioma", "meningioma", "pituitary")):
    """Images of n_groups patients with 1..max_size slices each, one stratum per patient, shuffled."""
    rng = np.random.default_rng(seed)
    groups, labels = [], []
    for g in range(n_groups):
        size = int(rng.integers(1, max_size + 1))
        stratum = strata[int(rng.integers(len(strata)))]
        groups += [f"p{g}"] * size
        labels += [stratum] * size
    order = rng.permutation(len(groups))  # the images of a patient need not be consecutive
    return [groups[i] for i in order], [labels[i] for i in order]


def parts_of_group(groups, parts):
    where = {}
    for part, idx in parts.items():
        for i in idx:
            where.setdefault(groups[i], set()).add(part)
    return where


def crossing(where: dict) -> dict:
    return {g: p for g, p in where.items() if len(p) > 1}


def write_groups(path: Path, rows: dict[str, str], header: str = "image,patient_id") -> Path:
    path.write_text(header + "\n" + "".join(f"{image},{patient}\n" for image, patient in rows.items()))
    return path


# -----------------------------------------------------------------------------
# split_by_group: train/val/test of whole groups


@pytest.mark.parametrize("seed", range(4))
def test_split_by_group_is_a_partition_with_no_group_in_two_parts(seed):
    groups, strata = random_groups(seed)
    parts = bts.split_by_group(groups, strata, (0.2, 0.1), seed)
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == list(range(len(groups)))
    assert not crossing(parts_of_group(groups, parts))


@pytest.mark.parametrize("seed", range(4))
def test_split_by_group_fractions(seed):
    groups, strata = random_groups(seed, n_groups=60)
    parts = bts.split_by_group(groups, strata, (0.2, 0.1), seed)
    n = len(groups)
    assert len(parts["train"]) / n == pytest.approx(0.7, abs=0.06)
    assert len(parts["val"]) / n == pytest.approx(0.2, abs=0.05)
    assert len(parts["test"]) / n == pytest.approx(0.1, abs=0.04)


def test_split_by_group_is_seeded():
    groups, strata = random_groups(0)
    a = bts.split_by_group(groups, strata, (0.2, 0.1), 11)
    assert a == bts.split_by_group(groups, strata, (0.2, 0.1), 11)
    assert a != bts.split_by_group(groups, strata, (0.2, 0.1), 12)


def test_split_by_group_spreads_each_stratum_in_proportion():
    groups, strata = random_groups(5, n_groups=120, max_size=8)
    parts = bts.split_by_group(groups, strata, (0.2, 0.1), 5)
    for stratum in sorted(set(strata)):
        total = sum(s == stratum for s in strata)
        share = {p: sum(strata[i] == stratum for i in idx) / total for p, idx in parts.items()}
        assert share["test"] == pytest.approx(0.1, abs=0.05), (stratum, share)
        assert share["val"] == pytest.approx(0.2, abs=0.06), (stratum, share)
        assert share["train"] == pytest.approx(0.7, abs=0.08), (stratum, share)


def test_split_by_group_keeps_a_patient_whose_slices_have_mixed_types_in_one_part():
    groups = [g for g in "ABCDEFGHIJ" for _ in range(10)]  # tumor_type filled in for some slices only
    strata = ["glioma" if i % 2 else "" for i in range(len(groups))]
    assert not crossing(parts_of_group(groups, bts.split_by_group(groups, strata, (0.2, 0.1), 0)))


@pytest.mark.parametrize("groups, advice", [
    (["a"] * 5 + ["b"] * 5, True),   # whole patients: fewer groups than images, --split random would help
    (["a", "b"], False),             # every group one image already: --split random changes nothing
])
def test_too_few_groups_for_a_split_advises_split_random_only_where_it_helps(groups, advice):
    with pytest.raises(bts.UserError) as info:
        bts.split_by_group(groups, [""] * len(groups), (0.2, 0.1), 0)
    assert str(info.value).startswith("2 patients/groups are too few for a train/val/test split; add data")
    assert ("--split random" in str(info.value)) == advice


# -----------------------------------------------------------------------------
# group_folds: K folds of whole groups, each image in exactly one fold's test part


@pytest.mark.parametrize("k, seed", [(3, 0), (5, 1), (10, 2)])
def test_group_folds_put_each_group_in_one_fold(k, seed):
    groups, strata = random_groups(seed)
    fold = bts.group_folds(groups, strata, k, seed)
    assert fold.shape == (len(groups),) and set(fold.tolist()) == set(range(k))
    where = {}
    for g, f in zip(groups, fold.tolist()):
        where.setdefault(g, set()).add(f)
    assert all(len(f) == 1 for f in where.values())
    sizes = np.bincount(fold)
    assert sizes.min() >= 0.5 * len(groups) / k  # folds of similar size
    assert (bts.group_folds(groups, strata, k, seed) == fold).all()


def test_group_folds_survive_a_tumour_type_rarer_than_the_folds():
    groups = [f"p{i}" for i in range(12)]
    strata = ["glioma"] * 10 + ["pituitary"] * 2  # scikit-learn alone warns or refuses here
    fold = bts.group_folds(groups, strata, 5, 0)
    assert sorted(set(fold.tolist())) == list(range(5))
    only = bts.group_folds(groups, ["rare"] + [""] * 11, 5, 0)  # no type as common as the folds: none spread
    assert sorted(set(only.tolist())) == list(range(5))


@pytest.mark.parametrize("groups, advice", [(["a", "a", "b", "b"], True), (["a", "b"], False)])
def test_too_few_groups_for_the_folds_advise_split_random_only_where_it_helps(groups, advice):
    with pytest.raises(bts.UserError) as info:
        bts.group_folds(groups, [""] * len(groups), 3, 0)
    assert str(info.value).startswith("2 patients/groups are too few for 3 folds; add data")
    assert ("--split random" in str(info.value)) == advice


# -----------------------------------------------------------------------------
# make_split on data: the record, folds, split_seed, random


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """20 synthetic pairs named 1..20, loaded, and a groups CSV of 10 patients of 2 slices each."""
    root = tmp_path_factory.mktemp("numbered")
    folder = make_dataset(root / "data", n=20)
    groups = root / "groups.csv"
    groups.write_text("image,patient_id,tumor_type\n" + "".join(
        f"{i}.png,P{(i - 1) // 2},{'glioma' if i <= 10 else 'meningioma'}\n" for i in range(1, 21)))
    return {"folder": folder, "groups": groups, "data": bts.load_dataset(folder, 32, workers=1)}


def test_make_split_records_how_and_from_what(numbered):
    cfg = bts.Config(groups=str(numbered["groups"]), split_seed=7)
    split = bts.make_split(cfg, numbered["data"])
    names = numbered["data"]["names"]
    assert split["how"] == f"split by patient ({numbered['groups']})" and split["unit"] == "patients"
    assert sorted(split["train"] + split["val"] + split["test"], key=int) == names
    assert split["groups"] == {str(i): f"P{(i - 1) // 2}" for i in range(1, 21)}
    assert split["tumor_types"]["3"] == "glioma" and split["tumor_types"]["13"] == "meningioma"
    assert split["files"] == numbered["data"]["hashes"]
    patients = {p: {split["groups"][n] for n in split[p]} for p in PARTS}
    assert all(split[f"{p}_patients"] == sorted(patients[p]) for p in PARTS)
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    assert split["fractions"] == {p: round(len(split[p]) / 20, 4) for p in PARTS}
    assert split["made_from"] == {"split": "patient", "groups": str(numbered["groups"]), "split_seed": 7,
                                  "val_fraction": 0.2, "test_fraction": 0.1, "folds": 0, "fold": 0, "limit": 0}
    idx = bts.split_indices(split, numbered["data"])
    assert all([names[i] for i in idx[p].tolist()] == split[p] for p in PARTS)


def test_the_split_depends_on_split_seed_and_not_on_seed(numbered):
    def split(**kwargs):
        made = bts.make_split(bts.Config(groups=str(numbered["groups"]), **kwargs), numbered["data"])
        return {p: made[p] for p in PARTS}
    base = split(seed=1, split_seed=5)
    assert split(seed=2, split_seed=5) == base == split(seed=3, split_seed=5, lr=0.1, image_size=64)
    assert split(seed=1, split_seed=6) != base


def test_random_split_is_by_image(numbered):
    split = bts.make_split(bts.Config(split="random", val_fraction=0.25, test_fraction=0.25), numbered["data"])
    assert split["unit"] == "images" and "random split by image" in split["how"]
    assert split["groups"] == {n: n for n in numbered["data"]["names"]} and split["tumor_types"] == {}
    assert [len(split[p]) for p in PARTS] == [10, 5, 5] and not split["warnings"]


@pytest.mark.parametrize("k", [3, 5])
def test_folds_k_test_parts_are_one_partition_and_fold_n_is_1_based(k, numbered):
    cfg = dict(groups=str(numbered["groups"]), folds=k, split_seed=3)
    splits = {n: bts.make_split(bts.Config(**cfg, fold=n), numbered["data"]) for n in range(1, k + 1)}
    tests = [splits[n]["test"] for n in range(1, k + 1)]
    assert sorted(sum(tests, []), key=int) == numbered["data"]["names"]  # every image tested exactly once
    table = bts.read_groups_csv(numbered["groups"])
    fold = bts.group_folds([table[n][0] for n in numbered["data"]["names"]],
                           [table[n][1] for n in numbered["data"]["names"]], k, 3)
    for n, split in splits.items():
        assert f"fold {n} of {k} is the test part" in split["how"]
        assert set(split["test"]) == {name for name, f in zip(numbered["data"]["names"], fold) if f == n - 1}
        assert split["val"] == splits[n % k + 1]["test"]  # validation is the next fold
        patients = [set(split[f"{p}_patients"]) for p in PARTS]
        assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
        assert not split["warnings"]  # folds are K-ths of the patients: no fractions to honour


def test_fractions_whole_patients_cannot_honour_are_warned_and_recorded(numbered, tmp_path, capsys):
    groups = write_groups(tmp_path / "g.csv", {str(i): f"p{(i - 1) // 5}" for i in range(1, 21)})
    split = bts.make_split(bts.Config(groups=str(groups)), numbered["data"])
    assert split["fractions"] == {"train": 0.5, "val": 0.25, "test": 0.25}
    assert len(split["warnings"]) == 1 and "whole patients could not honour --val-fraction 0.2" in split["warnings"][0]
    assert split["warnings"][0] in capsys.readouterr().err


# -----------------------------------------------------------------------------
# find_groups: where the groups come from


def test_find_groups_random_is_one_group_per_image():
    names = ["1", "2", "3", "4"]
    groups, strata, how, unit = bts.find_groups(bts.Config(split="random"), names, torch.zeros(4, 1, 16, 16,
                                                                                            dtype=torch.uint8))
    assert groups == names and strata == [""] * 4 and "random" in how and unit == "images"


def test_find_groups_uses_the_groups_csv_by_image_name(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("image,patient_id,tumor_type\na.png,P1,x\nb,P2,y\n")
    groups, strata, how, unit = bts.find_groups(bts.Config(groups=str(path)), ["b", "a"],
                                                torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    assert groups == ["P2", "P1"] and strata == ["y", "x"] and how == f"split by patient ({path})"
    assert unit == "patients"


def test_a_groups_csv_without_an_image_of_the_data_is_one_sentence(tmp_path):
    path = write_groups(tmp_path / "g.csv", {"a": "P1"})
    with pytest.raises(bts.UserError, match=re.escape(f"{path}: no patient for 2 images, for example 'b'")):
        bts.find_groups(bts.Config(groups=str(path)), ["a", "b", "c"], torch.zeros(3, 1, 16, 16, dtype=torch.uint8))


def test_group_by_similarity_joins_similar_neighbours_in_name_order():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 256, (1, 1, 32, 32), generator=gen, dtype=torch.uint8) for _ in range(3))
    images = torch.cat([b, a, a, c, a, b])  # 1,2,3 one "patient", 4,5 another, 6 a third; stored out of order
    names = ["4", "1", "2", "6", "3", "5"]
    by_name = dict(zip(names, bts.group_by_similarity(images, names)))
    assert by_name["1"] == by_name["2"] == by_name["3"] and by_name["4"] == by_name["5"]
    assert len({by_name["1"], by_name["4"], by_name["6"]}) == 3


def test_group_by_similarity_keeps_the_same_image_apart_when_not_neighbours():
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randint(0, 256, (1, 1, 32, 32), generator=gen, dtype=torch.uint8) for _ in range(2))
    assert len(set(bts.group_by_similarity(torch.cat([a, b, a]), ["1", "2", "3"]))) == 3


def test_numbered_data_that_is_not_the_figshare_data_gets_approximate_groups(tmp_path):
    """The demo's files are named 1..N like the Kaggle dataset's: patients.csv names them, but does not
    describe their pixels."""
    folder = bts.make_synthetic_dataset(tmp_path / "synthetic", n=40, size=32, seed=0)
    split = bts.make_split(bts.Config(split_seed=3), bts.load_dataset(folder, 32, workers=1))
    assert split["how"].startswith("split by groups of similar neighbouring slices: APPROXIMATE")
    assert "--groups FILE.csv" in split["how"] and split["unit"] == "groups"
    assert not split["tumor_types"] and all(g.startswith("similar-") for g in split["groups"].values())


# -----------------------------------------------------------------------------
# read_groups_csv: a user's file, every way it can be wrong is one sentence naming it


def test_read_groups_csv(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text("image,patient_id,tumor_type\n1.png,P1,glioma\n2,P1,glioma\nscan_3.jpg,P2,\n\n")
    assert bts.read_groups_csv(path) == {"1": ("P1", "glioma"), "2": ("P1", "glioma"), "scan_3": ("P2", "")}


def test_read_groups_csv_without_tumor_type_with_a_bom_spaces_and_other_columns(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_bytes("\ufeffnotes, image ,patient_id\nx, 1 , P1 \n".encode())  # a spreadsheet's export
    assert bts.read_groups_csv(path) == {"1": ("P1", "")}


def test_a_groups_file_keeps_dots_that_are_part_of_a_name(tmp_path):
    path = write_groups(tmp_path / "groups.csv", {"scan.v2": "P1", "scan.v3.png": "P2"})
    assert bts.read_groups_csv(path) == {"scan.v2": ("P1", ""), "scan.v3": ("P2", "")}


BAD_GROUPS = {  # name -> (file bytes, the sentence's words after "PATH: ")
    "not-utf8": ("image,patient_id\n1,Patient M\xfcller\n".encode("latin-1"), "not a readable CSV groups file ('utf-8' codec"),
    "nul-bytes": (b"image,patient_id\n1,\0\n", "not a readable CSV groups file (it holds NUL bytes)"),
    "duplicated-column": (b"image,patient_id,image\n1,P1,2\n", "a groups file needs the columns image,patient_id"),
    "listed-twice": (b"image,patient_id\n1,P1\n2,P2\n1,P9\n", "image '1' is listed twice (rows 2 and 4)"),
    "listed-twice-same-patient": (b"image,patient_id\n1,P1\n1.png,P1\n",
                                  "image '1.png' is listed twice (rows 2 and 3)"),
    "row-without-patient": (b"image,patient_id\n1,P1\n2,\n", "row 3 lacks an image or a patient_id"),
    "row-without-image": (b"image,patient_id\n,P1\n", "row 2 lacks an image or a patient_id"),
    "short-row": (b"image,patient_id\n1,P1\n2\n", "row 3 lacks an image or a patient_id"),
    "missing-patient-column": (b"image,patient\n1,P1\n", "a groups file needs the columns image,patient_id"),
    "missing-image-column": (b"name,patient_id\n1,P1\n", "a groups file needs the columns image,patient_id"),
    "empty": (b"", "a groups file needs the columns image,patient_id"),
    "header-only": (b"image,patient_id\n", None),  # valid, but names no image: refused where it is used
    "huge-field": (b"image,patient_id\n1," + b"x" * 200_000 + b"\n", "not a readable CSV groups file"),
}


@pytest.mark.parametrize("case", sorted(BAD_GROUPS))
def test_read_groups_csv_refuses_a_bad_file_in_one_sentence_naming_it(case, tmp_path):
    content, message = BAD_GROUPS[case]
    path = tmp_path / "groups.csv"
    path.write_bytes(content)
    if message is None:
        assert bts.read_groups_csv(path) == {}
        return
    with pytest.raises(bts.UserError) as info:
        bts.read_groups_csv(path)
    assert str(info.value).startswith(f"{path}: {message}") and "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["missing", "a-folder"])
def test_a_groups_file_that_cannot_be_read_is_one_sentence(case, tmp_path):
    path = tmp_path / "groups.csv"
    if case == "a-folder":
        path.mkdir()
    with pytest.raises(bts.UserError, match=re.escape(f"{path}: cannot read the groups file (")):
        bts.read_groups_csv(path)


@pytest.mark.parametrize("case", sorted(set(BAD_GROUPS) | {"missing", "an-image-without-patient"}))
def test_a_bad_groups_file_stops_the_run_in_one_sentence_and_leaves_nothing(case, numbered, tmp_path, capsys):
    path = tmp_path / "groups.csv"
    if case == "an-image-without-patient":
        write_groups(path, {str(i): f"p{i}" for i in range(1, 20)})  # 20 is not listed
    elif case != "missing":
        path.write_bytes(BAD_GROUPS[case][0])
    before, data_before = snapshot(tmp_path), snapshot(numbered["folder"])
    rc, _, err = run_cli(capsys, "--data-dir", numbered["folder"], "--out-dir", tmp_path / "run", *TINY_ARGS,
                         "--groups", path)
    one_error(rc, err, f"{path}: ")
    assert snapshot(tmp_path) == before and snapshot(numbered["folder"]) == data_before


# -----------------------------------------------------------------------------
# Too little data: the advice fits the case


@pytest.mark.parametrize("extra, advice", [
    (["--groups", "{tmp}/single.csv"], False),  # every patient one image: --split random changes nothing
    (["--split", "random"], False),             # the split is by image already
    (["--groups", "{tmp}/pairs.csv"], True),    # 2 patients of 3 images: --split random would make a split
])
def test_a_dataset_too_small_to_split_is_one_sentence_with_the_advice_that_fits(extra, advice, tmp_path, capsys):
    folder = make_dataset(tmp_path / "data", n=6 if advice else 2)
    write_groups(tmp_path / "single.csv", {"1": "p1", "2": "p2"})
    write_groups(tmp_path / "pairs.csv", {str(i): f"p{i % 2}" for i in range(1, 7)})
    before = snapshot(tmp_path)
    rc, _, err = run_cli(capsys, "--data-dir", folder, "--out-dir", tmp_path / "run", *TINY_ARGS,
                         *[e.format(tmp=tmp_path) for e in extra])
    message = one_error(rc, err, "2 patients/groups are too few for a train/val/test split; add data")
    assert ("--split random" in message) == advice
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("extra", [[], ["--folds", "5", "--fold", "1"]])
def test_too_few_images_even_one_per_group_get_no_split_random_advice(extra, tmp_path, capsys):
    folder = make_dataset(tmp_path / "data", n=2 if not extra else 3)
    write_groups(tmp_path / "one.csv", {str(i): "p1" for i in range(1, 4)})  # one patient
    rc, _, err = run_cli(capsys, "--data-dir", folder, "--out-dir", tmp_path / "run", *TINY_ARGS,
                         "--groups", tmp_path / "one.csv", *extra)
    one_error(rc, err, "1 patients/groups are too few")
    rc, _, random_err = run_cli(capsys, "--data-dir", folder, "--out-dir", tmp_path / "run", *TINY_ARGS,
                                "--split", "random", *extra)
    one_error(rc, random_err, "patients/groups are too few")  # the advice would not have helped
    assert "--split random" not in err


def test_a_cross_validation_with_more_folds_than_images_leaves_no_folder(tmp_path, capsys):
    folder = make_dataset(tmp_path / "data", n=20)
    before = snapshot(tmp_path)
    rc, _, err = run_cli(capsys, "--data-dir", folder, "--out-dir", tmp_path / "cv", *TINY_ARGS, "--folds", "40",
                         "--fold", "1", "--split", "random")
    message = one_error(rc, err, "20 patients/groups are too few for 40 folds; add data")
    assert "--split random" not in message and snapshot(tmp_path) == before


# -----------------------------------------------------------------------------
# Fingerprints and split_indices: the data identify a run, by content and groups


def test_data_fingerprint_changes_with_a_group_or_a_file_and_nothing_else(numbered, tmp_path):
    split = bts.make_split(bts.Config(groups=str(numbered["groups"])), numbered["data"])
    fingerprint = bts.data_fingerprint(split)
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint)
    regrouped = {**split, "groups": {**split["groups"], "7": "P-other"}}  # one image, another patient
    assert bts.data_fingerprint(regrouped) != fingerprint
    changed = {**split, "files": {**split["files"], "7": "0" * 16}}
    assert bts.data_fingerprint(changed) != fingerprint
    other_parts = {**split, "test": split["train"][:2], "train": split["train"][2:] + split["test"]}
    assert bts.data_fingerprint(other_parts) == fingerprint  # the data, not how they were divided
    assert bts.split_fingerprint(other_parts) != bts.split_fingerprint(split)
    # two groups files that differ in one patient: other data, though the images are the same
    other = numbered["groups"].read_text().replace("7.png,P3", "7.png,P99")
    assert other != numbered["groups"].read_text()
    (tmp_path / "other.csv").write_text(other)
    again = bts.make_split(bts.Config(groups=str(tmp_path / "other.csv")), numbered["data"])
    assert bts.data_fingerprint(again) != fingerprint and again["files"] == split["files"]


def test_split_fingerprint_is_the_test_images_by_content():
    split = {"test": ["2", "1"], "val": ["3"], "files": {"1": "a", "2": "b", "3": "c"}}
    assert bts.split_fingerprint(split) == bts.split_fingerprint({**split, "test": ["1", "2"]})
    assert bts.split_fingerprint(split) != bts.split_fingerprint({**split, "files": {**split["files"], "2": "B"}})
    assert bts.split_fingerprint(split, "val") != bts.split_fingerprint(split)


def test_split_indices_refuses_a_missing_image():
    data = {"names": ["1", "2", "3"], "hashes": {"1": "a", "2": "b", "3": "c"}}
    split = {"train": ["1"], "val": ["2"], "test": ["zz"], "files": {"1": "a", "2": "b", "zz": "z"}}
    with pytest.raises(bts.UserError, match=r"1 of its images are missing or have other contents \(for example 'zz'\)"):
        bts.split_indices(split, data)


def test_split_indices_refuses_a_file_whose_contents_changed():
    data = {"names": ["1", "2", "3"], "hashes": {"1": "a", "2": "b", "3": "c"}}
    split = {"train": ["1"], "val": ["2"], "test": ["3"], "files": {"1": "a", "2": "b", "3": "c"}}
    idx = bts.split_indices(split, data)
    assert [idx[p].tolist() for p in PARTS] == [[0], [1], [2]]
    with pytest.raises(bts.UserError, match=r"the data changed since this run's split was made: .*'2'"):
        bts.split_indices({**split, "files": {"1": "a", "2": "B", "3": "c"}}, data)


def test_split_indices_refuses_data_that_shifted_under_limit(tmp_path):
    folder = make_dataset(tmp_path / "data", n=6)
    first = bts.load_dataset(folder, 32, limit=4, workers=1)
    split = bts.make_split(bts.Config(split="random", limit=4, val_fraction=0.25, test_fraction=0.25), first)
    write_pair(folder, "0", *square_pair(seed=99))  # sorts first: --limit 4 now takes other files
    shifted = bts.load_dataset(folder, 32, limit=4, workers=1)
    with pytest.raises(bts.UserError, match="the data changed since this run's split was made"):
        bts.split_indices(split, shifted)
    assert bts.split_indices(split, bts.load_dataset(folder, 32, workers=1))  # the same files, all there: fine


# -----------------------------------------------------------------------------
# Through the command line: a run with a groups file, resumed on changed data


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):
    """A finished tiny run on 20 pairs with a groups file of 4 patients of 5 slices (no split of whole
    patients can honour 0.2/0.1): (data, groups, run folder, stderr)."""
    root = tmp_path_factory.mktemp("grouped")
    data = make_dataset(root / "data", n=20)
    groups = write_groups(root / "groups.csv", {str(i): f"p{(i - 1) // 5}" for i in range(1, 21)})
    with pytest.MonkeyPatch.context() as mp:
        errors = []
        mp.setattr(bts, "warn", lambda message, real=bts.warn: (errors.append(message), real(message)))
        assert bts.main([str(a) for a in ("--data-dir", data, "--out-dir", root / "run", *TINY_ARGS,
                                          "--groups", groups)]) == 0
    return {"data": data, "groups": groups, "run": root / "run", "warnings": errors}


@pytest.mark.slow
def test_a_run_with_a_groups_file_records_its_split_and_warns_of_unhonoured_fractions(grouped_run):
    split = json.loads((grouped_run["run"] / "split.json").read_text())
    assert split["how"] == f"split by patient ({grouped_run['groups']})" and split["unit"] == "patients"
    assert split["groups"] == {str(i): f"p{(i - 1) // 5}" for i in range(1, 21)}
    assert split["fractions"] == {"train": 0.5, "val": 0.25, "test": 0.25}
    assert [len(split[f"{p}_patients"]) for p in PARTS] == [2, 1, 1]
    assert any("could not honour" in w for w in grouped_run["warnings"])
    metrics = json.loads((grouped_run["run"] / "metrics.json").read_text())
    assert "could not honour" in metrics["warning"]
    assert metrics["data"] == bts.data_fingerprint(split) and metrics["test_split"] == bts.split_fingerprint(split)
    config = json.loads((grouped_run["run"] / "config.json").read_text())
    assert config["groups"] == str(grouped_run["groups"].resolve())


def changed_copy(grouped_run, tmp_path) -> tuple[Path, Path, str]:
    """Copies of the run and its data, with the pixels of one test image changed (the same name)."""
    run = Path(shutil.copytree(grouped_run["run"], tmp_path / "run"))
    data = Path(shutil.copytree(grouped_run["data"], tmp_path / "data"))
    changed = json.loads((run / "split.json").read_text())["test"][0]
    image = cv2.imread(str(data / "images" / f"{changed}.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(data / "images" / f"{changed}.png"), 255 - image)
    return run, data, changed


@pytest.mark.slow
def test_a_resume_on_changed_data_is_one_sentence_naming_an_image(grouped_run, tmp_path, capsys):
    run, data, changed = changed_copy(grouped_run, tmp_path)
    checkpoints = {name: (run / name).read_bytes() for name in ("model.pth", "last.pth", "split.json")}
    rc, _, err = run_cli(capsys, "--resume", run, "--data-dir", data, "--epochs", "2")
    one_error(rc, err, "the data changed since this run's split was made: 1 of its images are missing or have "
                       f"other contents (for example {changed!r}); use the same data, or start a new run")
    assert {name: (run / name).read_bytes() for name in checkpoints} == checkpoints


@pytest.mark.slow
def test_a_resume_refused_on_changed_data_leaves_the_finished_run_as_it_was(grouped_run, tmp_path, capsys):
    run, data, _ = changed_copy(grouped_run, tmp_path)
    before = snapshot(run, ignore="train.log")
    rc, _, err = run_cli(capsys, "--resume", run, "--data-dir", data, "--epochs", "2")
    one_error(rc, err, "the data changed")
    assert snapshot(run, ignore="train.log") == before


@pytest.mark.slow
def test_a_new_split_of_changed_data_tests_the_same_names_but_is_other_data(grouped_run, tmp_path):
    _, data, changed = changed_copy(grouped_run, tmp_path)
    split = json.loads((grouped_run["run"] / "split.json").read_text())
    cfg = bts.Config(groups=str(grouped_run["groups"]), image_size=32)
    again = bts.make_split(cfg, bts.load_dataset(data, 32, workers=1))
    assert {p: again[p] for p in PARTS} == {p: split[p] for p in PARTS}  # the names decide the split
    assert again["files"][changed] != split["files"][changed]
    assert bts.data_fingerprint(again) != bts.data_fingerprint(split)
    assert bts.split_fingerprint(again) != bts.split_fingerprint(split)


@pytest.mark.slow
def test_a_resumed_run_warns_again_of_its_splits_unhonoured_fractions(grouped_run, tmp_path, capsys):
    run = Path(shutil.copytree(grouped_run["run"], tmp_path / "run"))
    rc, _, err = run_cli(capsys, "--resume", run, "--data-dir", grouped_run["data"], "--epochs", "2")
    assert rc == 0, err
    assert "whole patients could not honour --val-fraction 0.2" in err
    assert "could not honour" in json.loads((run / "metrics.json").read_text())["warning"]
    assert json.loads((run / "split.json").read_text()) == json.loads((grouped_run["run"] / "split.json").read_text())


# -----------------------------------------------------------------------------
# The real data (../shared/data) and the shipped patients.csv


def stem(patient_id: str) -> str:
    return re.sub(r"(?<=\d)[A-Z]$", "", patient_id)


def test_shipped_patients_csv_holds_every_real_image_and_the_readmes_figures(real_dir):
    table = bts.read_groups_csv(bts.PATIENTS_CSV)
    assert len(table) == bts.KAGGLE_PAIRS and set(table) == {str(i) for i in range(1, bts.KAGGLE_PAIRS + 1)}
    ids = {pid for pid, _ in table.values()}
    assert len(ids) == 233 and len({stem(pid) for pid in ids}) == 209
    images = real_dir / "brain-tumor-segmentation" / "images"
    if not images.is_dir():
        pytest.skip(f"{images} not present")
    names = {bts.image_name(p.name) for p in images.iterdir() if p.suffix.lower() in bts.IMAGE_EXTENSIONS}
    assert names and names <= set(table)
    assert len({stem(table[n][0]) for n in names}) == 186  # of the 209 stems, those in ../shared/data


@pytest.fixture(scope="module")
def rescans(tmp_path_factory):
    """The real slices of every re-scanned patient (ids of one stem: MR040240, MR040240B, ...), 4 per id,
    and of 9 other patients, linked under their own names, loaded."""
    real = REAL_DIR / "brain-tumor-segmentation"
    if not real.is_dir():
        pytest.skip(f"{real} not present")
    table = bts.read_groups_csv(bts.PATIENTS_CSV)
    names = sorted((bts.image_name(p.name) for p in (real / "images").iterdir()), key=int)
    by_id, variants = {}, {}
    for n in names:
        by_id.setdefault(table[n][0], []).append(n)
    for pid in by_id:
        variants.setdefault(stem(pid), []).append(pid)
    several = [s for s, ids in variants.items() if len(ids) > 1]
    chosen = [n for s in several + [s for s, ids in variants.items() if len(ids) == 1][::20]
              for pid in variants[s] for n in by_id[pid][:4]]
    root = tmp_path_factory.mktemp("rescans")
    for sub in ("images", "masks"):
        (root / sub).mkdir()
        for n in chosen:
            (root / sub / f"{n}.png").symlink_to(real / sub / f"{n}.png")
    return {"table": table, "several": several, "data": bts.load_dataset(root, 32, workers=2)}


def test_re_scanned_patients_never_cross_the_split_or_the_folds(real_dir, rescans):
    """Ids that differ only by a trailing letter are one patient: no stem has slices in two parts, for
    two split seeds and every fold of 5; a split by the raw ids would put re-scans apart."""
    table, data = rescans["table"], rescans["data"]
    assert len(rescans["several"]) == 17
    splits = [bts.make_split(bts.Config(split_seed=s), data) for s in (1, 42)]
    splits += [bts.make_split(bts.Config(folds=5, fold=k), data) for k in range(1, 6)]
    for split in splits:
        assert split["how"].startswith("split by patient (patients.csv; re-scans kept together)")
        where = {}
        for part in PARTS:
            for name in split[part]:
                where.setdefault(stem(table[name][0]), set()).add(part)
        assert not crossing(where)
        assert split["groups"] == {n: stem(table[n][0]) for n in data["names"]}
        assert split["tumor_types"] == {n: table[n][1] for n in data["names"]}
    tests = [s["test"] for s in splits[2:]]
    assert sorted(sum(tests, []), key=int) == data["names"]  # the folds' test parts: one partition
    raw = bts.split_by_group([table[n][0] for n in data["names"]], [table[n][1] for n in data["names"]], (0.2, 0.1), 42)
    assert crossing(parts_of_group([stem(table[n][0]) for n in data["names"]], raw))  # what the stems prevent


def test_patients_csv_is_not_used_for_pixels_it_does_not_describe(real_dir, rescans):
    """The same real slices under shuffled names (under their own, the test above splits them by patients.csv):
    patients.csv names every file, but its patients' slices are no longer neighbours that look alike, so
    the split falls back to approximate groups."""
    data = rescans["data"]
    names = [data["names"][i] for i in np.random.default_rng(0).permutation(len(data["names"]))]
    shuffled = {**data, "names": names, "hashes": dict(zip(names, data["hashes"].values()))}
    split = bts.make_split(bts.Config(), shuffled)
    assert "APPROXIMATE" in split["how"] and "patients.csv" not in split["how"] and not split["tumor_types"]


def test_the_real_512_sample_with_types_rarer_than_the_folds_is_split(real_dir):
    sample = real_dir / "brain-tumor-segmentation-512-sample"
    if not sample.is_dir():
        pytest.skip(f"{sample} not present")
    data = bts.load_dataset(sample, 32, workers=2)
    split = bts.make_split(bts.Config(), data)
    assert sorted(split["train"] + split["val"] + split["test"], key=name_key) == sorted(data["names"], key=name_key)
    assert all(split[p] for p in PARTS)
    where = {}
    for part in PARTS:
        for name in split[part]:
            where.setdefault(split["groups"][name], set()).add(part)
    assert not crossing(where)


def name_key(name):
    return bts.name_order(name)
