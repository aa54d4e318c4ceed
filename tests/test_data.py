"""Data path of brain_tumor_segmentation.py: decoding, preprocessing, pairing, loading,
synthetic data and patient-level splits, tested through the public functions."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import brain_tumor_segmentation as bts
from conftest import REAL_DIR, snapshot, square_pair, write_pair


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum() / max((a | b).sum(), 1)


# -----------------------------------------------------------------------------
# read_image


def _check_gray(out, shape):
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.ndim == 2 and out.shape == shape
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_read_image_8bit_gray_divides_by_255(tmp_path):
    image = np.zeros((20, 30), np.uint8)  # non-square: the original size must be kept as (h, w)
    image[3, 4], image[5, 6], image[0, 0] = 51, 255, 0
    path = tmp_path / "g.png"
    cv2.imwrite(str(path), image)
    out = bts.read_image(path)
    _check_gray(out, (20, 30))
    assert out[3, 4] == pytest.approx(51 / 255, abs=1e-7)  # 0.2, not 51/its own max
    assert out[5, 6] == pytest.approx(1.0)
    assert out[0, 0] == 0.0
    np.testing.assert_allclose(out, image.astype(np.float32) / 255, atol=1e-7)


def test_read_image_8bit_not_rescaled_to_own_max(tmp_path):
    image = np.full((16, 16), 100, np.uint8)
    image[0, 0] = 128
    path = tmp_path / "dim.png"
    cv2.imwrite(str(path), image)
    out = bts.read_image(path)
    assert out.max() == pytest.approx(128 / 255, abs=1e-7)
    assert out[1, 1] == pytest.approx(100 / 255, abs=1e-7)


def test_read_image_rgb_to_gray(tmp_path):
    image = np.zeros((16, 24, 3), np.uint8)
    image[:, :] = (102, 102, 102)  # equal channels: gray value exactly 102
    image[0, 0] = (0, 0, 255)      # pure red in BGR order: luma 0.299
    path = tmp_path / "rgb.png"
    cv2.imwrite(str(path), image)
    out = bts.read_image(path)
    _check_gray(out, (16, 24))
    assert out[5, 5] == pytest.approx(102 / 255, abs=1e-6)
    assert out[0, 0] == pytest.approx(0.299, abs=2 / 255)


def test_read_image_rgba_ignores_alpha(tmp_path):
    image = np.zeros((16, 16, 4), np.uint8)
    image[..., :3] = 153
    image[..., 3] = 0  # fully transparent: alpha must not darken or drop the gray value
    image[2, 2, 3] = 255
    path = tmp_path / "rgba.png"
    cv2.imwrite(str(path), image)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape == (16, 16, 4)
    out = bts.read_image(path)
    _check_gray(out, (16, 16))
    np.testing.assert_allclose(out, 153 / 255, atol=1e-6)


def test_read_image_16bit_divides_by_own_max(tmp_path):
    image = np.zeros((16, 20), np.uint16)
    image[1, 1], image[2, 2] = 1000, 4000
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), image)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    out = bts.read_image(path)
    _check_gray(out, (16, 20))
    assert out[2, 2] == pytest.approx(1.0)
    assert out[1, 1] == pytest.approx(0.25, abs=1e-6)
    assert out[0, 0] == 0.0


def test_read_image_16bit_all_zero_is_not_nan(tmp_path):
    path = tmp_path / "black16.png"
    cv2.imwrite(str(path), np.zeros((16, 16), np.uint16))
    out = bts.read_image(path)
    _check_gray(out, (16, 16))
    assert np.all(out == 0)


def test_read_image_jpeg(tmp_path):
    image, _ = square_pair(size=40)
    path = tmp_path / "scan.jpg"
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = bts.read_image(path)
    _check_gray(out, (40, 40))
    assert abs(float(out[18, 20]) - 220 / 255) < 0.05  # inside the bright square
    assert out[18, 20] > out[2, 2] + 0.5


@pytest.mark.parametrize("dtype, scale", [(np.uint8, 255), (np.uint16, None)])
def test_read_image_tiff(tmp_path, dtype, scale):
    image = np.zeros((16, 24), dtype)
    image[4, 5] = 60 if dtype == np.uint8 else 3000
    image[6, 7] = 120 if dtype == np.uint8 else 6000
    path = tmp_path / "scan.tif"
    assert cv2.imwrite(str(path), image)
    out = bts.read_image(path)
    _check_gray(out, (16, 24))
    if scale:
        assert out[4, 5] == pytest.approx(60 / 255, abs=1e-6)
    else:
        assert out[6, 7] == pytest.approx(1.0) and out[4, 5] == pytest.approx(0.5, abs=1e-6)


def test_read_image_unreadable_raises_value_error_naming_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        bts.read_image(path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        bts.read_image(empty)


# -----------------------------------------------------------------------------
# read_mask


@pytest.mark.parametrize("on_value", [255, 1])
def test_read_mask_binarizes_0_255_and_0_1(tmp_path, on_value):
    truth = np.zeros((24, 32), bool)
    truth[5:15, 8:20] = True
    path = tmp_path / f"mask{on_value}.png"
    cv2.imwrite(str(path), truth.astype(np.uint8) * on_value)
    out = bts.read_mask(path)
    assert out.dtype == bool and out.shape == (24, 32)
    np.testing.assert_array_equal(out, truth)


def test_read_mask_all_empty(tmp_path):
    path = tmp_path / "none.png"
    cv2.imwrite(str(path), np.zeros((16, 16), np.uint8))
    out = bts.read_mask(path)
    assert out.dtype == bool and not out.any()


def test_read_mask_jpeg_noise_still_binarizes(tmp_path):
    truth = np.zeros((64, 64), bool)
    truth[16:44, 20:48] = True
    path = tmp_path / "mask.jpg"
    cv2.imwrite(str(path), truth.astype(np.uint8) * 255, [cv2.IMWRITE_JPEG_QUALITY, 50])
    raw = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert len(np.unique(raw)) > 2  # the file really does carry compression noise
    out = bts.read_mask(path)
    assert out.dtype == bool and out.shape == (64, 64)
    assert iou(out, truth) > 0.95
    assert not out[:8, :8].any()  # no noise speckles far from the square


# -----------------------------------------------------------------------------
# preprocess_image / preprocess_mask


@pytest.mark.parametrize("src, size", [(48, 32), (20, 32), (32, 32), (64, 16)])
def test_preprocess_image_shape_dtype_range(src, size):
    gray = np.random.default_rng(src).random((src, src), dtype=np.float32)
    gray[0, 0], gray[-1, -1] = 0.0, 1.0
    out = bts.preprocess_image(gray, size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    if src == size:  # no resize: exact rounding of value * 255
        np.testing.assert_array_equal(out, np.clip(np.round(gray * 255), 0, 255).astype(np.uint8))


def test_preprocess_image_keeps_brightness():
    gray = np.full((64, 64), 0.5, np.float32)
    out = bts.preprocess_image(gray, 32)
    assert np.all(np.abs(out.astype(int) - 128) <= 1)


@pytest.mark.parametrize("src, size", [(48, 32), (20, 32), (64, 16)])
def test_preprocess_mask_shape_dtype_binary(src, size):
    mask = np.zeros((src, src), bool)
    mask[src // 4: src // 2, src // 4: 3 * src // 4] = True
    out = bts.preprocess_mask(mask, size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    assert set(np.unique(out).tolist()) == {0, 1}


def test_preprocess_mask_512_to_256_keeps_area():
    yy, xx = np.mgrid[0:512, 0:512]
    mask = (yy - 260) ** 2 + (xx - 230) ** 2 < 70 ** 2
    mask |= (np.abs(yy - 100) < 9) & (np.abs(xx - 400) < 31)  # a thin second region
    out = bts.preprocess_mask(mask, 256)
    assert out.shape == (256, 256) and set(np.unique(out).tolist()) == {0, 1}
    area_before, area_after = mask.sum(), out.sum() * 4
    assert abs(area_after - area_before) / area_before < 0.02


# -----------------------------------------------------------------------------
# find_pairs


def write_apart(folder, image_file, mask_file):
    """images/IMAGE_FILE and masks/MASK_FILE of a square pair, named independently of each other."""
    image, mask = square_pair(size=32)
    for sub, name, array in (("images", image_file, image), ("masks", mask_file, mask)):
        (folder / sub).mkdir(exist_ok=True)
        assert cv2.imwrite(str(folder / sub / name), array)


def test_find_pairs_pairs_by_stem_across_extensions(tmp_path):
    image, mask = square_pair(size=32)
    write_apart(tmp_path, "3.jpg", "3.png")
    write_pair(tmp_path, "10", image, mask, ext=".tif")
    write_pair(tmp_path, "2", image, mask)
    pairs = bts.find_pairs(tmp_path)
    assert [p[0] for p in pairs] == ["2", "3", "10"]  # numeric order, not "10" < "2"
    name, image_path, mask_path = pairs[1]
    assert image_path.name == "3.jpg" and mask_path.name == "3.png"
    assert image_path.parent.name == "images" and mask_path.parent.name == "masks"


def test_find_pairs_ignores_non_images(tmp_path):
    image, mask = square_pair(size=32)
    write_pair(tmp_path, "1", image, mask)
    (tmp_path / "images" / "notes.txt").write_text("hello")
    (tmp_path / "masks" / ".hidden.png").write_bytes(b"junk")
    pairs = bts.find_pairs(tmp_path)
    assert [p[0] for p in pairs] == ["1"]


def test_find_pairs_skips_unmatched_with_warning(tmp_path, capsys):
    image, mask = square_pair(size=32)
    write_pair(tmp_path, "1", image, mask)
    write_pair(tmp_path, "2", image, mask)
    write_apart(tmp_path, "lonely_image.png", "orphan_mask.png")
    pairs = bts.find_pairs(tmp_path)
    assert [p[0] for p in pairs] == ["1", "2"]
    err = capsys.readouterr().err
    assert "lonely_image.png" in err
    assert "orphan_mask.png" in err
    assert err.count("warning") >= 2


@pytest.mark.parametrize("remove_folder", [True, False], ids=["missing", "empty"])
@pytest.mark.parametrize("folder", ["images", "masks"])
def test_find_pairs_missing_or_empty_folder_is_user_error(tmp_path, folder, remove_folder):
    image, mask = square_pair(size=32)
    write_pair(tmp_path, "1", image, mask)
    for f in (tmp_path / folder).iterdir():
        f.unlink()
    if remove_folder:
        (tmp_path / folder).rmdir()
    with pytest.raises(bts.UserError) as info:
        bts.find_pairs(tmp_path)
    assert str(tmp_path / folder) in str(info.value)


def test_find_pairs_missing_data_dir_is_user_error(tmp_path):
    with pytest.raises(bts.UserError, match="nowhere"):
        bts.find_pairs(tmp_path / "nowhere")


def test_find_pairs_no_common_names_is_user_error(tmp_path):
    write_apart(tmp_path, "a.png", "b.png")
    with pytest.raises(bts.UserError, match=str(tmp_path)):
        bts.find_pairs(tmp_path)


# -----------------------------------------------------------------------------
# load_dataset


def test_load_dataset_tensors(tiny_dataset):
    data = bts.load_dataset(tiny_dataset, 32, workers=2)
    n = 12
    assert data["names"] == [str(i) for i in range(1, n + 1)]
    images, masks = data["images"], data["masks"]
    assert images.dtype == torch.uint8 and images.shape == (n, 1, 32, 32)
    assert masks.dtype == torch.uint8 and masks.shape == (n, 1, 32, 32)
    assert set(masks.unique().tolist()) == {0, 1}
    assert masks[-1].sum() == 0 and all(masks[i].sum() > 0 for i in range(n - 1))
    # the tumour is the bright square: image is brighter where the mask is set
    for i in range(n - 1):
        inside = images[i][masks[i].bool()].float().mean()
        outside = images[i][~masks[i].bool()].float().mean()
        assert inside > outside + 100


def test_load_dataset_limit(tiny_dataset):
    data = bts.load_dataset(tiny_dataset, 16, limit=3, workers=1)
    assert data["names"] == ["1", "2", "3"] and data["images"].shape == (3, 1, 16, 16)


def test_load_dataset_skips_bad_files_and_writes_nothing(tiny_dataset, capsys):
    rng = np.random.default_rng(0)
    (tiny_dataset / "images" / "x.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    cv2.imwrite(str(tiny_dataset / "masks" / "x.png"), np.zeros((48, 48), np.uint8))
    image, mask = square_pair(size=48)
    cv2.imwrite(str(tiny_dataset / "images" / "zero.png"), image)
    (tiny_dataset / "masks" / "zero.png").write_bytes(b"")
    cv2.imwrite(str(tiny_dataset / "images" / "wrongsize.png"), image)
    cv2.imwrite(str(tiny_dataset / "masks" / "wrongsize.png"), cv2.resize(mask, (40, 36)))
    before = snapshot(tiny_dataset)

    data = bts.load_dataset(tiny_dataset, 32, workers=2)

    assert snapshot(tiny_dataset) == before
    assert data["names"] == [str(i) for i in range(1, 13)]
    assert data["images"].shape[0] == data["masks"].shape[0] == 12
    err = capsys.readouterr().err
    # tqdm's progress bar shares stderr: a warning may follow the bar on the same line
    lines = re.findall(r"warning: [^\r\n]*", err)
    assert any(str(tiny_dataset / "images" / "x.png") in line for line in lines)
    assert any(str(tiny_dataset / "masks" / "zero.png") in line for line in lines)
    assert any(str(tiny_dataset / "masks" / "wrongsize.png") in line and "40x36" in line for line in lines)
    assert "3 of 15 pairs skipped" in err


def test_load_dataset_all_unreadable_is_user_error(tmp_path):
    for name in ("a", "b"):
        for sub in ("images", "masks"):
            (tmp_path / sub).mkdir(exist_ok=True)
            (tmp_path / sub / f"{name}.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(bts.UserError, match=str(tmp_path)):
        bts.load_dataset(tmp_path, 16, workers=1)


def test_load_dataset_real_512_sample(real_dir):
    sample = real_dir / "brain-tumor-segmentation-512-sample"
    if not sample.is_dir():
        pytest.skip(f"{sample} not present")
    data = bts.load_dataset(sample, 64, limit=3, workers=1)
    assert data["images"].shape == (3, 1, 64, 64) and data["images"].dtype == torch.uint8
    assert set(data["masks"].unique().tolist()) <= {0, 1}
    assert data["masks"].sum() > 0
    assert data["images"].float().std() > 10  # a real scan, not a blank


# -----------------------------------------------------------------------------
# make_synthetic_dataset


def test_make_synthetic_dataset_writes_pairs(tmp_path):
    folder = bts.make_synthetic_dataset(tmp_path / "syn", 12, size=32, seed=3)
    names = sorted(p.name for p in (folder / "images").iterdir())
    assert names == sorted(f"{i}.png" for i in range(1, 13))
    assert sorted(p.name for p in (folder / "masks").iterdir()) == names
    areas = []
    for name in names:
        image = cv2.imread(str(folder / "images" / name), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(folder / "masks" / name), cv2.IMREAD_UNCHANGED)
        assert image.shape == mask.shape == (32, 32)
        assert image.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
        areas.append(int((mask > 0).sum()))
    assert any(a == 0 for a in areas), areas
    assert any(a > 0 for a in areas), areas
    # the pairs are usable as a dataset
    data = bts.load_dataset(folder, 32, workers=1)
    assert len(data["names"]) == 12


def test_make_synthetic_dataset_deterministic(tmp_path):
    a = bts.make_synthetic_dataset(tmp_path / "a", 4, size=32, seed=7)
    b = bts.make_synthetic_dataset(tmp_path / "b", 4, size=32, seed=7)
    c = bts.make_synthetic_dataset(tmp_path / "c", 4, size=32, seed=8)
    assert snapshot(a) == snapshot(b)
    assert snapshot(a) != snapshot(c)


# -----------------------------------------------------------------------------
# splits


def random_groups(seed, n_groups=40, max_size=15, strata=("glioma", "meningioma", "pituitary")):
    """Images of n_groups patients with 1..max_size slices each, one stratum per patient."""
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


@pytest.mark.parametrize("seed", range(6))
def test_split_by_group_no_group_in_two_parts(seed):
    groups, strata = random_groups(seed)
    parts = bts.split_by_group(groups, strata, (0.2, 0.1), seed)
    all_idx = parts["train"] + parts["val"] + parts["test"]
    assert sorted(all_idx) == list(range(len(groups)))  # a partition of the images
    where = parts_of_group(groups, parts)
    assert all(len(p) == 1 for p in where.values()), {g: p for g, p in where.items() if len(p) > 1}


@pytest.mark.parametrize("seed", range(6))
def test_split_by_group_fractions(seed):
    groups, strata = random_groups(seed, n_groups=60)
    parts = bts.split_by_group(groups, strata, (0.2, 0.1), seed)
    n = len(groups)
    assert len(parts["train"]) / n == pytest.approx(0.7, abs=0.06)
    assert len(parts["val"]) / n == pytest.approx(0.2, abs=0.05)
    assert len(parts["test"]) / n == pytest.approx(0.1, abs=0.04)


def test_split_by_group_seeded():
    groups, strata = random_groups(0)
    a = bts.split_by_group(groups, strata, (0.2, 0.1), 11)
    b = bts.split_by_group(groups, strata, (0.2, 0.1), 11)
    c = bts.split_by_group(groups, strata, (0.2, 0.1), 12)
    assert a == b
    assert a != c


def test_split_by_group_strata_proportional():
    groups, strata = random_groups(5, n_groups=120, max_size=8)
    parts = bts.split_by_group(groups, strata, (0.2, 0.1), 5)
    for stratum in sorted(set(strata)):
        total = sum(s == stratum for s in strata)
        share = {p: sum(strata[i] == stratum for i in idx) / total for p, idx in parts.items()}
        assert share["test"] == pytest.approx(0.1, abs=0.05), (stratum, share)
        assert share["val"] == pytest.approx(0.2, abs=0.06), (stratum, share)
        assert share["train"] == pytest.approx(0.7, abs=0.08), (stratum, share)


def test_split_by_group_too_few_groups_is_user_error():
    with pytest.raises(bts.UserError, match="too few"):
        bts.split_by_group(["a"] * 5 + ["b"] * 5, [""] * 10, (0.2, 0.1), 0)


def test_split_by_group_mixed_strata_patient_stays_in_one_part():
    # e.g. a --groups CSV where tumor_type is filled in for some slices of a patient and blank for others
    groups = [g for g in "ABCDEFGHIJ" for _ in range(10)]
    strata = ["glioma" if i % 2 else "" for i in range(len(groups))]
    parts = bts.split_by_group(groups, strata, (0.2, 0.1), 0)
    where = parts_of_group(groups, parts)
    assert all(len(p) == 1 for p in where.values()), {g: p for g, p in where.items() if len(p) > 1}


def test_read_groups_csv(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text("image,patient_id,tumor_type\n1.png,P1,glioma\n2,P1,glioma\nscan_3.jpg,P2,\n")
    table = bts.read_groups_csv(path)
    assert table == {"1": ("P1", "glioma"), "2": ("P1", "glioma"), "scan_3": ("P2", "")}


def test_read_groups_csv_without_tumor_type(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text("image,patient_id\n1,P1\n")
    assert bts.read_groups_csv(path) == {"1": ("P1", "")}


@pytest.mark.parametrize("text", ["image,patient\n1,P1\n", "name,patient_id\n1,P1\n", "", "image,patient_id\n"])
def test_read_groups_csv_missing_columns_is_user_error(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(bts.UserError) as info:
        bts.read_groups_csv(path)
    assert str(path) in str(info.value) and "patient_id" in str(info.value)


def test_read_groups_csv_missing_file_is_user_error(tmp_path):
    with pytest.raises(bts.UserError, match="nofile.csv"):
        bts.read_groups_csv(tmp_path / "nofile.csv")


def test_find_groups_random_is_one_group_per_image():
    names = ["1", "2", "3", "4"]
    images = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    groups, strata, how, unit = bts.find_groups(bts.Config(split="random"), names, images)
    assert groups == names
    assert strata == [""] * 4
    assert "random" in how and unit == "images"


def test_find_groups_uses_groups_csv(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("image,patient_id,tumor_type\na,P1,x\nb,P2,y\n")
    groups, strata, how, unit = bts.find_groups(bts.Config(groups=str(path)), ["b", "a"],
                                                torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    assert groups == ["P2", "P1"] and strata == ["y", "x"] and "by patient" in how and unit == "patients"


def test_find_groups_csv_missing_image_is_user_error(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("image,patient_id\na,P1\n")
    with pytest.raises(bts.UserError, match="'b'"):
        bts.find_groups(bts.Config(groups=str(path)), ["a", "b"], torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


def test_group_by_similarity():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (1, 1, 32, 32), generator=gen, dtype=torch.uint8)
    b = torch.randint(0, 256, (1, 1, 32, 32), generator=gen, dtype=torch.uint8)
    c = torch.randint(0, 256, (1, 1, 32, 32), generator=gen, dtype=torch.uint8)
    # slices 1,2,3 are one "patient" (identical), 4,5 another, 6 a third; names out of order on purpose
    images = torch.cat([b, a, a, c, a, b])
    names = ["4", "1", "2", "6", "3", "5"]
    groups = bts.group_by_similarity(images, names)
    by_name = dict(zip(names, groups))
    assert by_name["1"] == by_name["2"] == by_name["3"]
    assert by_name["4"] == by_name["5"]
    assert len({by_name["1"], by_name["4"], by_name["6"]}) == 3


def test_group_by_similarity_same_image_apart_when_not_neighbours():
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randint(0, 256, (1, 1, 32, 32), generator=gen, dtype=torch.uint8) for _ in range(2))
    groups = bts.group_by_similarity(torch.cat([a, b, a]), ["1", "2", "3"])
    assert len(set(groups)) == 3  # only consecutive slices are joined


def test_make_split_by_patient_from_shipped_csv(real_dir):
    assert bts.PATIENTS_CSV.is_file()
    data = bts.load_dataset(real_dir / "brain-tumor-segmentation", 64, limit=150, workers=1)
    names = data["names"]
    cfg = bts.Config(split_seed=3)
    split = bts.make_split(cfg, data)
    assert "split by patient" in split["how"] and split["unit"] == "patients"
    assert sorted(split["train"] + split["val"] + split["test"], key=int) == names
    table = bts.read_groups_csv(bts.PATIENTS_CSV)
    patients = {part: {table[n][0] for n in split[part]} for part in ("train", "val", "test")}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert all(patients[p] for p in patients)
    assert split["train_patients"] == sorted(patients["train"])
    assert split["groups"][names[0]] == table[names[0]][0]
    assert split["tumor_types"][names[0]] == table[names[0]][1]
    # the split indices point back at the same names
    idx = bts.split_indices(split, data)
    assert [names[i] for i in idx["test"].tolist()] == split["test"]


def test_shipped_patients_csv_is_not_used_for_other_numbered_data(tmp_path):
    # The demo's files are named 1..N like the Figshare dataset's, but they are not its patients.
    folder = bts.make_synthetic_dataset(tmp_path / "synthetic", n=60, size=32, seed=0)
    data = bts.load_dataset(folder, 32, workers=1)
    split = bts.make_split(bts.Config(split_seed=3), data)
    assert "split by patient" not in split["how"] and "APPROXIMATE" in split["how"]
    assert not split["tumor_types"]


def test_split_indices_unknown_name_is_user_error():
    data = {"names": ["1", "2", "3"], "hashes": {"1": "a", "2": "b", "3": "c"}}
    split = {"train": ["1"], "val": ["2"], "test": ["zz"], "files": {"1": "a", "2": "b", "zz": "z"}}
    with pytest.raises(bts.UserError, match="zz"):
        bts.split_indices(split, data)


def test_split_indices_refuses_a_file_whose_contents_changed():
    """The data identify a run by content: the same names with other pixels are other data."""
    data = {"names": ["1", "2", "3"], "hashes": {"1": "a", "2": "b", "3": "c"}}
    split = {"train": ["1"], "val": ["2"], "test": ["3"], "files": {"1": "a", "2": "b", "3": "c"}}
    assert [len(v) for v in bts.split_indices(split, data).values()] == [1, 1, 1]
    with pytest.raises(bts.UserError, match="other contents .*'2'"):
        bts.split_indices({**split, "files": {"1": "a", "2": "B", "3": "c"}}, data)


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    if not (REAL_DIR / "brain-tumor-segmentation").is_dir():
        pytest.skip(f"{REAL_DIR} not present")
    return bts.load_dataset(REAL_DIR / "brain-tumor-segmentation", 32)


def stem(patient_id: str) -> str:
    return patient_id[:-1] if patient_id[-1].isalpha() and patient_id[-2].isdigit() else patient_id


def test_re_scanned_patients_never_cross_the_split_or_the_folds(real_data):
    """On the real patients.csv, ids that differ only by a trailing letter (MR040240, MR040240B, ...)
    are one patient: no id stem has slices in two parts, for several split seeds and for every fold."""
    table = bts.read_groups_csv(bts.PATIENTS_CSV)
    stems = {stem(pid) for pid, _ in table.values()}
    assert len({pid for pid, _ in table.values()}) == 233 and len(stems) == 209  # the README's figures
    splits = [bts.make_split(bts.Config(split_seed=s), real_data) for s in (1, 2, 42)]
    splits += [bts.make_split(bts.Config(folds=5, fold=k), real_data) for k in range(5)]
    for split in splits:
        assert "re-scans kept together" in split["how"]
        where = {}
        for part in ("train", "val", "test"):
            for name in split[part]:
                where.setdefault(stem(table[name][0]), set()).add(part)
        assert all(len(parts) == 1 for parts in where.values()), {s: p for s, p in where.items() if len(p) > 1}
    shared = {stem(table[n][0]) for n in real_data["names"]}
    assert len(shared) == 186  # of the 208 patients in ../shared/data, as the README says
    tests = [set(s["test"]) for s in splits[3:]]
    assert sorted(set().union(*tests), key=int) == real_data["names"] and sum(map(len, tests)) == len(real_data["names"])


def test_real_names_are_all_in_patients_csv(real_dir):
    images = real_dir / "brain-tumor-segmentation" / "images"
    if not images.is_dir():
        pytest.skip(f"{images} not present")
    names = {p.stem for p in images.iterdir() if p.suffix.lower() in bts.IMAGE_EXTENSIONS}
    with open(bts.PATIENTS_CSV, newline="") as f:
        known = {row["image"] for row in csv.DictReader(f)}
    assert names and names <= known
