"""Data: decoding any image file (gray, colour, 16-bit, float) to the model's uint8 tensors, masks in
every encoding a user has, pairing images/ with masks/, the content hash of each pair, and every
way a file or a folder can fail (skipped with one warning naming the file, or one sentence when no
data is left). Nothing in a data folder is ever written."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import brain_tumor_segmentation as bts
import predict
from conftest import (TINY_ARGS, make_dataset, one_error, run_cli, snapshot, square_pair, write_pair)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum() / max((a | b).sum(), 1)


def warnings_of(err: str) -> list[str]:
    """The warning lines of stderr (tqdm's bar shares stderr: a warning may follow it on one line)."""
    return re.findall(r"warning: [^\r\n]*", err)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a few bytes of pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


# -----------------------------------------------------------------------------
# read_image: any depth and channels to float32 gray in [0, 1], at the file's own size


def check_gray(out, shape):
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == shape
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_read_image_8bit_gray_divides_by_255(tmp_path):
    image = np.zeros((20, 30), np.uint8)  # not square: the size is kept as (h, w)
    image[3, 4], image[5, 6] = 51, 255
    cv2.imwrite(str(tmp_path / "g.png"), image)
    out = predict.read_image(tmp_path / "g.png")
    check_gray(out, (20, 30))
    assert out[3, 4] == pytest.approx(51 / 255, abs=1e-7) and out[5, 6] == 1.0 and out[0, 0] == 0.0
    np.testing.assert_allclose(out, image.astype(np.float32) / 255, atol=1e-7)


def test_read_image_8bit_is_not_rescaled_to_its_own_max(tmp_path):
    image = np.full((16, 16), 100, np.uint8)
    image[0, 0] = 128
    cv2.imwrite(str(tmp_path / "dim.png"), image)
    out = predict.read_image(tmp_path / "dim.png")
    assert out.max() == pytest.approx(128 / 255, abs=1e-7) and out[1, 1] == pytest.approx(100 / 255, abs=1e-7)


def test_read_image_rgb_to_gray(tmp_path):
    image = np.full((16, 24, 3), 102, np.uint8)  # equal channels: gray 102
    image[0, 0] = (0, 0, 255)  # pure red in BGR order: luma 0.299
    cv2.imwrite(str(tmp_path / "rgb.png"), image)
    out = predict.read_image(tmp_path / "rgb.png")
    check_gray(out, (16, 24))
    assert out[5, 5] == pytest.approx(102 / 255, abs=1e-6) and out[0, 0] == pytest.approx(0.299, abs=2 / 255)


def test_read_image_rgba_ignores_alpha(tmp_path):
    image = np.zeros((16, 16, 4), np.uint8)
    image[..., :3] = 153
    image[2, 2, 3] = 255  # the rest fully transparent: alpha must not darken or drop the gray value
    cv2.imwrite(str(tmp_path / "rgba.png"), image)
    assert cv2.imread(str(tmp_path / "rgba.png"), cv2.IMREAD_UNCHANGED).shape == (16, 16, 4)
    out = predict.read_image(tmp_path / "rgba.png")
    check_gray(out, (16, 16))
    np.testing.assert_allclose(out, 153 / 255, atol=1e-6)


def test_read_image_16bit_divides_by_its_own_max(tmp_path):
    image = np.zeros((16, 20), np.uint16)
    image[1, 1], image[2, 2] = 1000, 4000
    cv2.imwrite(str(tmp_path / "deep.png"), image)
    assert cv2.imread(str(tmp_path / "deep.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    out = predict.read_image(tmp_path / "deep.png")
    check_gray(out, (16, 20))
    assert out[2, 2] == 1.0 and out[1, 1] == pytest.approx(0.25, abs=1e-6) and out[0, 0] == 0.0


def test_read_image_16bit_colour(tmp_path):
    image = np.zeros((8, 8, 3), np.uint16)
    image[..., :] = 3000
    image[0, 0] = 6000
    cv2.imwrite(str(tmp_path / "rgb16.png"), image)
    out = predict.read_image(tmp_path / "rgb16.png")
    check_gray(out, (8, 8))
    assert out[0, 0] == pytest.approx(1.0) and out[4, 4] == pytest.approx(0.5, abs=1e-4)


def test_read_image_16bit_all_zero_is_not_nan(tmp_path):
    cv2.imwrite(str(tmp_path / "black16.png"), np.zeros((16, 16), np.uint16))
    out = predict.read_image(tmp_path / "black16.png")
    check_gray(out, (16, 16))
    assert np.all(out == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_read_image_float_is_shifted_from_negative_and_divided_by_its_max(dtype, tmp_path):
    image = np.array([[-1.0, 0.0], [0.5, 2.0]], dtype)  # a scanner's float values, below 0 too
    assert cv2.imwrite(str(tmp_path / "f.tiff"), image)
    assert cv2.imread(str(tmp_path / "f.tiff"), cv2.IMREAD_UNCHANGED).dtype == dtype
    out = predict.read_image(tmp_path / "f.tiff")
    check_gray(out, (2, 2))
    np.testing.assert_allclose(out, [[0.0, 1 / 3], [0.5, 1.0]], atol=1e-6)
    small = np.array([[0.0, 0.25], [0.5, 0.125]], np.float32)  # all in [0, 0.5]: divided by 0.5, its own max
    cv2.imwrite(str(tmp_path / "s.tiff"), small)
    np.testing.assert_allclose(predict.read_image(tmp_path / "s.tiff"), small * 2, atol=1e-6)


def test_read_image_jpeg(tmp_path):
    image, _ = square_pair(size=40)
    cv2.imwrite(str(tmp_path / "scan.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = predict.read_image(tmp_path / "scan.jpg")
    check_gray(out, (40, 40))
    assert abs(float(out[18, 20]) - 220 / 255) < 0.05 and out[18, 20] > out[2, 2] + 0.5


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_read_image_tiff(dtype, tmp_path):
    image = np.zeros((16, 24), dtype)
    image[4, 5], image[6, 7] = (60, 120) if dtype == np.uint8 else (3000, 6000)
    assert cv2.imwrite(str(tmp_path / "scan.tif"), image)
    out = predict.read_image(tmp_path / "scan.tif")
    check_gray(out, (16, 24))
    if dtype == np.uint8:
        assert out[4, 5] == pytest.approx(60 / 255, abs=1e-6)
    else:
        assert out[6, 7] == 1.0 and out[4, 5] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("kind, content, message", [
    ("text", b"not an image at all", "not a readable image (corrupt, empty or unsupported format)"),
    ("empty", b"", "not a readable image"),
    ("truncated-png", None, "not a readable image"),
    ("huge-header", png_claiming(100_000, 100_000), "the decoder refused it (too large, or a damaged header"),
])
def test_an_unreadable_file_is_a_value_error_naming_it(kind, content, message, tmp_path):
    path = tmp_path / f"{kind}.png"
    if content is None:
        image, _ = square_pair()
        content = cv2.imencode(".png", image)[1].tobytes()[:60]
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        predict.read_image(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        predict.read_mask(path)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_a_value_error_naming_the_file(value, tmp_path):
    image = np.ones((8, 8), np.float32)
    image[3, 3] = value
    cv2.imwrite(str(tmp_path / "bad.tiff"), image)
    with pytest.raises(ValueError, match=r"bad.tiff: holds NaN or infinite pixels"):
        predict.read_image(tmp_path / "bad.tiff")
    with pytest.raises(ValueError, match=r"bad.tiff: holds NaN or infinite pixels"):
        predict.read_mask(tmp_path / "bad.tiff")


def test_a_file_that_cannot_be_opened_is_a_value_error_naming_the_cause(tmp_path, monkeypatch):
    cv2.imwrite(str(tmp_path / "locked.png"), np.zeros((8, 8), np.uint8))
    real = np.fromfile

    def refusing(path, *args, **kwargs):  # what a file without read permission gives (root reads anything)
        if Path(path).name == "locked.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(bts.np, "fromfile", refusing)
    with pytest.raises(ValueError, match=r"locked.png: cannot be read \(Permission denied\)"):
        predict.read_image(tmp_path / "locked.png")
    monkeypatch.undo()
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ValueError, match=r"folder.png: cannot be read"):
        predict.read_image(tmp_path / "folder.png")


# -----------------------------------------------------------------------------
# read_mask / tumour_pixels: which pixels are tumour, for every encoding


@pytest.mark.parametrize("on_value", [255, 1])
def test_read_mask_binarizes_0_255_and_0_1(on_value, tmp_path):
    truth = np.zeros((24, 32), bool)
    truth[5:15, 8:20] = True
    cv2.imwrite(str(tmp_path / "m.png"), truth.astype(np.uint8) * on_value)
    out = predict.read_mask(tmp_path / "m.png")
    assert out.dtype == bool and out.shape == (24, 32)
    np.testing.assert_array_equal(out, truth)


def test_read_mask_all_empty(tmp_path):
    cv2.imwrite(str(tmp_path / "none.png"), np.zeros((16, 16), np.uint8))
    out = predict.read_mask(tmp_path / "none.png")
    assert out.dtype == bool and out.shape == (16, 16) and not out.any()


@pytest.mark.parametrize("high, quality", [(1, 90), (1, 80), (255, 90), (255, 60), (255, 50)])
def test_jpeg_masks_keep_their_tumour_under_compression_noise(high, quality, tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 16:44] = high
    cv2.imwrite(str(tmp_path / "m.jpg"), mask, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert not np.array_equal(cv2.imread(str(tmp_path / "m.jpg"), cv2.IMREAD_UNCHANGED), mask)  # noise is there
    read = predict.read_mask(tmp_path / "m.jpg")
    assert read.dtype == bool and iou(read, mask > 0) > 0.9
    assert not read[:8, :8].any()  # no speckles far from the square


def test_colour_masks_count_any_strong_channel(tmp_path):
    for channel in range(3):
        mask = np.zeros((20, 20, 3), np.uint8)
        mask[5:10, 5:10, channel] = 255
        cv2.imwrite(str(tmp_path / f"c{channel}.png"), mask)
        assert predict.read_mask(tmp_path / f"c{channel}.png").sum() == 25
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: alpha is not tumour
    rgba[2:4, 2:6, 2] = 200
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    assert predict.read_mask(tmp_path / "rgba.png").sum() == 8


@pytest.mark.parametrize("kind", ["stray-3-in-0-1", "stray-255-in-0-1", "16-bit-0-1000-stray", "two-labels",
                                  "three-labels-1-2-4", "rgba-transparent-white", "float-0-1"])
def test_more_mask_encodings_keep_their_tumour(kind, tmp_path):
    truth = np.zeros((40, 40), bool)
    truth[10:20, 10:20] = True
    name = "m.png"
    if kind.startswith("stray"):  # one stray value, as a slip of the brush or compression noise adds
        mask = truth.astype(np.uint8)
        mask[0, 0] = 3 if "3" in kind else 255
    elif kind == "16-bit-0-1000-stray":
        mask = truth.astype(np.uint16) * 1000
        mask[0, 0] = 65535
    elif kind == "two-labels":  # oedema 100 around a core 255: both are tumour
        truth[8:22, 8:22] = True
        mask = truth.astype(np.uint8) * 100
        mask[12:18, 12:18] = 255
    elif kind == "three-labels-1-2-4":  # label values as some datasets number them
        mask = np.zeros((40, 40), np.uint8)
        mask[10:20, 10:14], mask[10:20, 14:17], mask[10:20, 17:20] = 1, 2, 4
    elif kind == "float-0-1":
        mask, name = truth.astype(np.float32), "m.tiff"
    else:  # a red tumour painted on a transparent white layer
        mask = np.zeros((40, 40, 4), np.uint8)
        mask[..., :3] = 255
        mask[truth] = (0, 0, 255, 255)
    cv2.imwrite(str(tmp_path / name), mask)
    read = predict.read_mask(tmp_path / name)
    assert read[truth].all() and read.sum() <= truth.sum() + 1


def test_tumour_pixels_levels_cover_a_tenth_of_the_most_common_one():
    mask = np.zeros((20, 20), np.uint8)
    mask[0:10, :] = 200           # 200 pixels: the main level
    mask[10:12, :] = 60           # 40 pixels, a fifth of it: a level too (a second label), so tumour
    assert bts.tumour_pixels(mask).sum() == 240
    mask[10:12, :] = 0
    mask[10, 0:10] = 60           # 10 pixels, a twentieth: a stray value, below half the lowest level (100)
    mask[11, 0:5] = 150           # also stray, but above 100: tumour
    out = bts.tumour_pixels(mask)
    assert out.dtype == bool and out.sum() == 205 and not out[10, 0:10].any()


def test_tumour_pixels_of_colour_take_the_strongest_channel_and_drop_transparent_pixels():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, :, :3] = (0, 180, 0)
    rgba[0, :, 3] = 255
    rgba[1, :, :3] = (255, 255, 255)  # white but fully transparent: not tumour
    np.testing.assert_array_equal(bts.tumour_pixels(rgba), np.arange(16).reshape(4, 4) < 4)
    assert not bts.tumour_pixels(np.zeros((3, 3), np.uint16)).any()


# -----------------------------------------------------------------------------
# preprocess_image / preprocess_mask: the model's size


@pytest.mark.parametrize("src, size", [(48, 32), (20, 32), (32, 32), (64, 16)])
def test_preprocess_image_shape_dtype_range(src, size):
    gray = np.random.default_rng(src).random((src, src), dtype=np.float32)
    gray[0, 0], gray[-1, -1] = 0.0, 1.0
    out = bts.preprocess_image(gray, size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    if src == size:  # no resize: exact rounding of value * 255
        np.testing.assert_array_equal(out, np.clip(np.round(gray * 255), 0, 255).astype(np.uint8))


def test_preprocess_image_keeps_brightness():
    out = bts.preprocess_image(np.full((64, 64), 0.5, np.float32), 32)
    assert np.all(np.abs(out.astype(int) - 128) <= 1)


@pytest.mark.parametrize("src, size", [(48, 32), (20, 32), (64, 16)])
def test_preprocess_mask_shape_dtype_binary(src, size):
    mask = np.zeros((src, src), bool)
    mask[src // 4: src // 2, src // 4: 3 * src // 4] = True
    out = bts.preprocess_mask(mask, size)
    assert out.shape == (size, size) and out.dtype == np.uint8 and set(np.unique(out).tolist()) == {0, 1}


def test_preprocess_mask_512_to_256_keeps_area():
    yy, xx = np.mgrid[0:512, 0:512]
    mask = (yy - 260) ** 2 + (xx - 230) ** 2 < 70 ** 2
    mask |= (np.abs(yy - 100) < 9) & (np.abs(xx - 400) < 31)  # a thin second region
    out = bts.preprocess_mask(mask, 256)
    assert abs(out.sum() * 4 - mask.sum()) / mask.sum() < 0.02


# -----------------------------------------------------------------------------
# find_pairs: images/NAME.* with masks/NAME.*


def write_apart(folder, image_file, mask_file):
    """images/IMAGE_FILE and masks/MASK_FILE of a square pair, named independently of each other."""
    image, mask = square_pair(size=32)
    for sub, name, array in (("images", image_file, image), ("masks", mask_file, mask)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(folder / sub / name), array)


def test_find_pairs_pairs_by_name_across_extensions_in_numeric_order(tmp_path):
    image, mask = square_pair(size=32)
    write_apart(tmp_path, "3.jpg", "3.png")
    write_pair(tmp_path, "10", image, mask, ext=".tif")
    write_pair(tmp_path, "2", image, mask, ext=".PNG")
    write_apart(tmp_path, "scan.v2.bmp", "scan.v2.jpeg")  # other dots belong to the name
    pairs = bts.find_pairs(tmp_path)
    assert [p[0] for p in pairs] == ["2", "3", "10", "scan.v2"]  # numbers numerically, then other names
    _, image_path, mask_path = pairs[1]
    assert (image_path.name, mask_path.name) == ("3.jpg", "3.png")
    assert image_path.parent == tmp_path / "images" and mask_path.parent == tmp_path / "masks"


def test_find_pairs_ignores_other_and_hidden_files(tmp_path, capsys):
    write_pair(tmp_path, "1", *square_pair(size=32))
    (tmp_path / "images" / "notes.txt").write_text("hello")
    (tmp_path / "masks" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "masks" / "Thumbs.db").write_bytes(b"junk")
    assert [p[0] for p in bts.find_pairs(tmp_path)] == ["1"]
    assert "warning" not in capsys.readouterr().err


def test_find_pairs_skips_unpaired_files_with_a_warning_naming_each(tmp_path, capsys):
    write_pair(tmp_path, "1", *square_pair(size=32))
    write_pair(tmp_path, "2", *square_pair(size=32))
    write_apart(tmp_path, "lonely_image.png", "orphan_mask.png")
    assert [p[0] for p in bts.find_pairs(tmp_path)] == ["1", "2"]
    lines = warnings_of(capsys.readouterr().err)
    assert any(str(tmp_path / "images" / "lonely_image.png") in l and "no mask named lonely_image" in l for l in lines)
    assert any(str(tmp_path / "masks" / "orphan_mask.png") in l and "no image named orphan_mask" in l for l in lines)


def test_find_pairs_skips_a_second_file_of_the_same_name_and_a_folder(tmp_path, capsys):
    write_pair(tmp_path, "1", *square_pair(size=32))
    write_pair(tmp_path, "1", *square_pair(size=32), ext=".jpg")  # 1.jpg and 1.png: which one is meant?
    (tmp_path / "images" / "2.png").mkdir()
    write_apart(tmp_path, "3.png", "2.png")
    pairs = bts.find_pairs(tmp_path)
    assert [p[0] for p in pairs] == ["1"] and pairs[0][1].name == "1.jpg"  # the first in sorted order
    err = capsys.readouterr().err
    assert "1.png: another file has the same name '1' (1.jpg); skipped" in err
    assert f"{tmp_path / 'images' / '2.png'}: not an image file; skipped" in err


def test_unicode_digit_file_names_do_not_break_the_order(tmp_path):
    for name in ("²5", "٣", "12", "3"):
        write_pair(tmp_path / "data", name, *square_pair(seed=len(name)))
    assert [n for n, _, _ in bts.find_pairs(tmp_path / "data")] == ["3", "٣", "12", "²5"]


@pytest.mark.parametrize("remove_folder", [True, False], ids=["missing", "empty"])
@pytest.mark.parametrize("folder", ["images", "masks"])
def test_a_missing_or_empty_folder_is_one_sentence_naming_it(folder, remove_folder, tmp_path):
    write_pair(tmp_path, "1", *square_pair(size=32))
    for f in (tmp_path / folder).iterdir():
        f.unlink()
    if remove_folder:
        (tmp_path / folder).rmdir()
    with pytest.raises(bts.UserError) as info:
        bts.find_pairs(tmp_path)
    assert str(info.value).startswith(str(tmp_path / folder)) and "\n" not in str(info.value)
    assert ("folder not found" if remove_folder else f"no {folder} found") in str(info.value)


def test_a_missing_data_folder_or_no_common_names_is_one_sentence(tmp_path):
    with pytest.raises(bts.UserError, match="nowhere: folder not found"):
        bts.find_pairs(tmp_path / "nowhere")
    write_apart(tmp_path, "a.png", "b.png")
    with pytest.raises(bts.UserError, match=re.escape(f"{tmp_path}: no image in images/ has a mask")):
        bts.find_pairs(tmp_path)


def test_an_unreadable_folder_is_one_sentence(tmp_path, monkeypatch, capsys):
    write_pair(tmp_path, "1", *square_pair(size=32))
    real = Path.iterdir

    def refusing(self):
        if self == tmp_path / "masks":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", refusing)
    with pytest.raises(bts.UserError, match=r"masks: cannot read this folder \(Permission denied\)"):
        bts.find_pairs(tmp_path)
    rc, _, err = run_cli(capsys, "--data-dir", tmp_path, "--out-dir", tmp_path / "run", *TINY_ARGS)
    message = one_error(rc, err, "cannot read this folder (Permission denied)")
    assert "write" not in message and not (tmp_path / "run").exists()  # a read error, not a write error


ODD = b"scan\xff"  # a name that is not UTF-8: Python holds its byte as a surrogate


def rename_not_utf8(folder: Path, name: str) -> str:
    """images/NAME.png and masks/NAME.png renamed to ODD + NAME.png; returns the name as Python sees it."""
    for sub in ("images", "masks"):
        os.rename(os.fsencode(folder / sub / f"{name}.png"), os.fsencode(folder / sub) + b"/" + ODD + name.encode()
                  + b".png")
    return os.fsdecode(ODD + name.encode())


def test_file_names_that_are_not_utf8_are_paired_and_loaded(tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    odd = rename_not_utf8(data, "2")
    assert [n for n, _, _ in bts.find_pairs(data)] == ["1", "3", "4", odd]
    loaded = bts.load_dataset(data, 32, workers=1)
    assert loaded["names"] == ["1", "3", "4", odd] and odd in loaded["hashes"]
    assert bts.utf8(odd) == ODD + b"2"  # written as the bytes it has on disk


# -----------------------------------------------------------------------------
# load_dataset: every readable pair decoded once, with its content hash


def test_load_dataset_tensors(tiny_dataset):
    data = bts.load_dataset(tiny_dataset, 32, workers=2)
    n = 12
    assert data["names"] == [str(i) for i in range(1, n + 1)]
    images, masks = data["images"], data["masks"]
    assert images.dtype == torch.uint8 and images.shape == (n, 1, 32, 32)
    assert masks.dtype == torch.uint8 and masks.shape == (n, 1, 32, 32)
    assert set(masks.unique().tolist()) == {0, 1}
    assert masks[-1].sum() == 0 and all(masks[i].sum() > 0 for i in range(n - 1))
    for i in range(n - 1):  # the tumour is the bright square
        inside, outside = images[i][masks[i].bool()].float().mean(), images[i][~masks[i].bool()].float().mean()
        assert inside > outside + 100


def test_load_dataset_limit(tiny_dataset):
    data = bts.load_dataset(tiny_dataset, 16, limit=3, workers=1)
    assert data["names"] == ["1", "2", "3"] and data["images"].shape == (3, 1, 16, 16) and len(data["hashes"]) == 3


def test_content_hashes_follow_the_files_bytes_not_their_names_or_the_size(tiny_dataset, tmp_path):
    first = bts.load_dataset(tiny_dataset, 32, workers=1)["hashes"]
    assert list(first) == [str(i) for i in range(1, 13)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in first.values())
    assert len(set(first.values())) == 12
    assert bts.load_dataset(tiny_dataset, 16, workers=1)["hashes"] == first  # runs at other sizes share them
    copy = Path(shutil.copytree(tiny_dataset, tmp_path / "copy"))
    assert bts.load_dataset(copy, 32, workers=1)["hashes"] == first  # another folder: the same data
    image = cv2.imread(str(copy / "images" / "4.png"), cv2.IMREAD_UNCHANGED)
    image[0, 0] ^= 1  # one pixel, one level
    cv2.imwrite(str(copy / "images" / "4.png"), image)
    mask = cv2.imread(str(copy / "masks" / "7.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(copy / "masks" / "7.png"), (mask > 0).astype(np.uint8))  # same tumour, 0/1 instead of 0/255
    os.rename(copy / "images" / "9.png", copy / "images" / "9.tif")  # same bytes, another extension
    changed = bts.load_dataset(copy, 32, workers=1)["hashes"]
    assert {n for n in first if changed[n] != first[n]} == {"4", "7"}


def test_bad_files_are_skipped_with_a_warning_naming_each_and_nothing_is_written(tiny_dataset, capsys):
    rng = np.random.default_rng(0)
    (tiny_dataset / "images" / "x.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    cv2.imwrite(str(tiny_dataset / "masks" / "x.png"), np.zeros((48, 48), np.uint8))
    image, mask = square_pair(size=48)
    cv2.imwrite(str(tiny_dataset / "images" / "zero.png"), image)
    (tiny_dataset / "masks" / "zero.png").write_bytes(b"")
    cv2.imwrite(str(tiny_dataset / "images" / "wrongsize.png"), image)
    cv2.imwrite(str(tiny_dataset / "masks" / "wrongsize.png"), cv2.resize(mask, (40, 36)))
    (tiny_dataset / "images" / "huge.png").write_bytes(png_claiming(100_000, 100_000))
    cv2.imwrite(str(tiny_dataset / "masks" / "huge.png"), mask)
    before = snapshot(tiny_dataset)
    capsys.readouterr()

    data = bts.load_dataset(tiny_dataset, 32, workers=2)

    assert snapshot(tiny_dataset) == before
    assert data["names"] == [str(i) for i in range(1, 13)] and data["images"].shape[0] == 12
    lines = warnings_of(capsys.readouterr().err)
    for path, why in ((tiny_dataset / "images" / "x.png", "not a readable image"),
                      (tiny_dataset / "masks" / "zero.png", "not a readable image"),
                      (tiny_dataset / "masks" / "wrongsize.png", "mask 40x36, image 48x48"),
                      (tiny_dataset / "images" / "huge.png", "the decoder refused it")):
        assert any(l.startswith(f"warning: {path}: {why}") and "skipped" in l for l in lines), (path, lines)
    assert lines[-1] == "warning: 4 of 16 pairs skipped (see the warnings above)"


@pytest.mark.parametrize("problem", ["permission", "memory"])
def test_a_file_that_cannot_be_read_or_held_in_memory_is_skipped(problem, tiny_dataset, monkeypatch, capsys):
    if problem == "permission":
        real = np.fromfile

        def refusing(path, *args, **kwargs):  # as a file without read permission (the tests may run as root)
            if Path(path).name == "5.png" and Path(path).parent.name == "masks":
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(bts.np, "fromfile", refusing)
        expected = f"{tiny_dataset / 'masks' / '5.png'}: cannot be read (Permission denied); pair 5 skipped"
    else:
        real_convert = bts.gray_in_unit_range

        def out_of_memory(image):
            if image[0, 0] == 255:
                raise MemoryError
            return real_convert(image)

        image, mask = square_pair(seed=3)
        image[0, 0] = 255
        write_pair(tiny_dataset, "huge", image, mask)
        monkeypatch.setattr(bts, "gray_in_unit_range", out_of_memory)
        expected = f"{tiny_dataset / 'images' / 'huge.png'}: the decoder refused it (too large"
    capsys.readouterr()
    data = bts.load_dataset(tiny_dataset, 32, workers=1)
    skipped = "5" if problem == "permission" else "huge"
    assert skipped not in data["names"] and len(data["names"]) == (11 if problem == "permission" else 12)
    assert any(l.startswith(f"warning: {expected}") for l in warnings_of(capsys.readouterr().err))


def test_a_tumour_that_vanishes_at_the_training_size_is_named(tiny_dataset, capsys):
    image, mask = square_pair(size=96, top=40, left=40, side=1)
    write_pair(tiny_dataset, "tiny", image, mask)
    capsys.readouterr()
    data = bts.load_dataset(tiny_dataset, 32, workers=1)
    i = data["names"].index("tiny")  # kept, as a tumour-free slice
    assert data["masks"][i].sum() == 0
    assert (f"warning: {tiny_dataset / 'masks' / 'tiny.png'}: its 1 tumour pixels vanish at 32x32 (re-binarized at "
            f"50% after resizing); it counts as tumour-free") in warnings_of(capsys.readouterr().err)
    bts.load_dataset(tiny_dataset, 96, workers=1)
    assert "vanish" not in capsys.readouterr().err  # at its own size it stays


def test_tumour_free_and_inverted_masks_are_flagged(tmp_path, capsys):
    for i in range(1, 6):
        image, mask = square_pair(seed=i)
        write_pair(tmp_path / "empty", str(i), image, np.zeros_like(mask))
        write_pair(tmp_path / "inverted", str(i), image, 255 - mask)
    capsys.readouterr()
    bts.load_dataset(tmp_path / "empty", 32, workers=1)
    err = capsys.readouterr().err
    assert f"NO TUMOUR PIXEL in any of the 5 masks of {tmp_path / 'empty'}" in err and "more than half" not in err
    bts.load_dataset(tmp_path / "inverted", 32, workers=1)
    err = capsys.readouterr().err
    assert "5 of 5 masks are more than half tumour (for example 1): inverted masks" in err
    assert "NO TUMOUR PIXEL" not in err


def test_no_readable_pair_is_one_sentence(tmp_path):
    for name in ("a", "b"):
        for sub in ("images", "masks"):
            (tmp_path / sub).mkdir(exist_ok=True)
            (tmp_path / sub / f"{name}.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(bts.UserError, match=re.escape(f"{tmp_path}: none of the 2 image/mask pairs could be read")):
        bts.load_dataset(tmp_path, 16, workers=1)


def test_load_dataset_reads_the_real_512_sample(real_dir):
    sample = real_dir / "brain-tumor-segmentation-512-sample"
    if not sample.is_dir():
        pytest.skip(f"{sample} not present")
    data = bts.load_dataset(sample, 64, limit=3, workers=1)
    assert data["images"].shape == (3, 1, 64, 64) and data["images"].dtype == torch.uint8
    assert set(data["masks"].unique().tolist()) <= {0, 1} and data["masks"].sum() > 0
    assert data["images"].float().std() > 10  # a real scan, not a blank
    full = predict.read_image(sample / "images" / f"{data['names'][0]}.png")
    assert full.shape == (512, 512)


# -----------------------------------------------------------------------------
# Through the command line: one run over a hostile folder, and folders that give no data


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A tiny run over a data folder that holds every kind of bad file: (data, run folder, stdout, stderr,
    checksums of the data before the run)."""
    root = tmp_path_factory.mktemp("hostile")
    data = make_dataset(root / "data", n=16)
    (data / "images" / "5.png").write_bytes(png_claiming(100_000, 100_000))
    (data / "masks" / "6.png").write_bytes(b"hello")
    (data / "images" / "7.png").write_bytes(b"")
    image, mask = square_pair(seed=40)
    cv2.imwrite(str(data / "images" / "nan.tiff"), np.where(mask > 0, np.nan, image.astype(np.float32)))
    cv2.imwrite(str(data / "masks" / "nan.tiff"), mask)
    write_pair(data, "tiny", *square_pair(size=96, top=40, left=40, side=1, seed=41))
    cv2.imwrite(str(data / "images" / "lonely.png"), image)
    cv2.imwrite(str(data / "masks" / "orphan.png"), mask)
    write_pair(data, "odd", *square_pair(seed=42))
    odd = rename_not_utf8(data, "odd")
    image16 = (square_pair(seed=43)[0].astype(np.uint16) * 200)
    write_pair(data, "deep", cv2.merge([image16] * 3), square_pair(seed=43)[1] // 255)  # 16-bit RGB, 0/1 mask
    before = snapshot(data)
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):  # capsys is per test
        rc = bts.main([str(a) for a in ("--data-dir", data, "--out-dir", root / "run", *TINY_ARGS,
                                        "--split", "random")])
    printed, errors = printed.getvalue(), errors.getvalue()
    assert rc == 0, errors
    return {"data": data, "run": root / "run", "out": printed, "err": errors, "before": before, "odd": odd}


@pytest.mark.slow
def test_a_hostile_data_folder_trains_on_what_is_readable_and_is_never_written(hostile):
    assert "Traceback" not in hostile["err"]
    assert snapshot(hostile["data"]) == hostile["before"]
    split = json.loads((hostile["run"] / "split.json").read_text())
    used = split["train"] + split["val"] + split["test"]
    expected = {*(str(i) for i in range(1, 17) if i not in (5, 6, 7)), "tiny", "deep", hostile["odd"]}
    assert sorted(used) == sorted(expected) and set(split["files"]) == expected


@pytest.mark.slow
@pytest.mark.parametrize("file, why", [("images/5.png", "the decoder refused it"),
                                       ("masks/6.png", "not a readable image"),
                                       ("images/7.png", "not a readable image"),
                                       ("images/nan.tiff", "holds NaN or infinite pixels"),
                                       ("masks/tiny.png", "its 1 tumour pixels vanish at 32x32"),
                                       ("images/lonely.png", "no mask named lonely.*"),
                                       ("masks/orphan.png", "no image named orphan.*")])
def test_a_hostile_data_folder_names_each_bad_file_once_on_the_console_and_in_the_log(file, why, hostile):
    line = f"warning: {hostile['data'] / file}: {why}"
    assert sum(l.startswith(line) for l in warnings_of(hostile["err"])) == 1, hostile["err"]
    assert line in (hostile["run"] / "train.log").read_text(errors="replace")


@pytest.mark.slow
def test_a_hostile_data_folder_counts_what_it_skipped(hostile):
    assert "warning: 4 of 20 pairs skipped (see the warnings above)" in hostile["err"]
    assert "data: 16 pairs at 32x32" in hostile["out"]


@pytest.mark.slow
def test_a_name_that_is_not_utf8_is_kept_as_its_bytes_in_the_runs_files(hostile):
    split = json.loads((hostile["run"] / "split.json").read_text())
    assert hostile["odd"] in split["files"]  # JSON escapes the surrogate: read back, the same name
    tested = bts.utf8(hostile["odd"]) in (hostile["run"] / "test_per_image.csv").read_bytes()
    assert tested == (hostile["odd"] in split["test"])


def folder_with_nothing_readable(folder: Path) -> Path:
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "1.png").write_bytes(b"not a png")
    return folder


@pytest.mark.parametrize("case, message", [
    ("typo", "typo: folder not found. The data folder must hold images/ and masks/"),
    ("a-file", "a-file: folder not found"),
    ("no-masks", "no-masks/masks: folder not found"),
    ("unreadable", "none of the 1 image/mask pairs could be read"),
    ("no-pairs", "no image in images/ has a mask of the same name"),
])
def test_a_data_folder_without_usable_pairs_is_one_sentence_and_leaves_nothing(case, message, tmp_path, capsys):
    if case == "a-file":
        (tmp_path / "a-file").write_text("x")
    elif case == "no-masks":
        (tmp_path / "no-masks" / "images").mkdir(parents=True)
    elif case == "unreadable":
        folder_with_nothing_readable(tmp_path / "unreadable")
    elif case == "no-pairs":
        write_apart(tmp_path / "no-pairs", "a.png", "b.png")
    before = snapshot(tmp_path)
    rc, _, err = run_cli(capsys, "--data-dir", tmp_path / case, "--out-dir", tmp_path / "run", *TINY_ARGS)
    one_error(rc, err, message)
    assert snapshot(tmp_path) == before  # the run folder it made is removed again


# -----------------------------------------------------------------------------
# --demo's data folder: generated once, never anyone else's


def test_make_synthetic_dataset_writes_usable_pairs(tmp_path):
    folder = bts.make_synthetic_dataset(tmp_path / "syn", 12, size=32, seed=3)
    names = sorted(p.name for p in (folder / "images").iterdir())
    assert names == sorted(f"{i}.png" for i in range(1, 13))
    assert sorted(p.name for p in (folder / "masks").iterdir()) == names
    areas = []
    for name in names:
        image = cv2.imread(str(folder / "images" / name), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(folder / "masks" / name), cv2.IMREAD_UNCHANGED)
        assert image.shape == mask.shape == (32, 32) and image.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
        areas.append(int((mask > 0).sum()))
    assert any(a == 0 for a in areas) and any(a > 0 for a in areas), areas
    assert len(bts.load_dataset(folder, 32, workers=1)["names"]) == 12


def test_make_synthetic_dataset_is_deterministic(tmp_path):
    a = bts.make_synthetic_dataset(tmp_path / "a", 4, size=32, seed=7)
    b = bts.make_synthetic_dataset(tmp_path / "b", 4, size=32, seed=7)
    c = bts.make_synthetic_dataset(tmp_path / "c", 4, size=32, seed=8)
    assert snapshot(a) == snapshot(b) and snapshot(a) != snapshot(c)
