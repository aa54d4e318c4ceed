"""Hostile but realistic inputs, through the command line on tiny synthetic data: nothing in an
input folder ever changes (checksums), nothing is lost, and every failure is one sentence with a
way forward instead of a traceback. One section per class of issue #14."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import brain_tumor_segmentation as bts
from conftest import (SCRIPT, TINY_ARGS, make_dataset, run_cli, snapshot, square_pair, without_root_override,
                      write_pair)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert bts.main(["--data-dir", str(make_dataset(out.parent / "data")), "--out-dir", str(out), *TINY_ARGS]) == 0
    return out


@pytest.fixture
def finished_run(trained_once, tmp_path):
    """A copy of a finished tiny run, for this test to change."""
    return Path(shutil.copytree(trained_once, tmp_path / "run"))


def one_error(rc: int, err: str, *fragments: str) -> str:
    assert rc == 1, err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if "error: " in line)
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return line


# -----------------------------------------------------------------------------
# 1. predict never writes into a folder it reads from


@pytest.mark.parametrize("out, extra", [
    ("{d}", ["--masks", "{d}/masks"]),  # the example: the dataset folder itself
    ("{d}/masks", ["--masks", "{d}/masks"]),
    ("{d}/masks/sub", ["--masks", "{d}/masks"]),
    ("{d}/images", []),
    ("{d}", []),  # no --masks: D/masks would still be overwritten
    ("{d}/images/../images/x", []),
])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_predict_never_writes_where_it_reads(out, extra, overwrite, dataset, finished_run, capsys):
    before = snapshot(dataset)
    d = str(dataset)
    rc, _, err = run_cli(capsys, "predict", f"{d}/images", "--model", finished_run / "model.pth", "--device", "cpu",
                         "--out", out.format(d=d), *[e.format(d=d) for e in extra], *overwrite)
    one_error(rc, err)
    assert "input" in err or "--masks" in err or "did not write" in err
    assert "output files exist" not in err  # ground truth is never called an output
    assert snapshot(dataset) == before


def test_predict_into_the_folder_of_an_input_file_keeps_the_file(dataset, finished_run, tmp_path, capsys):
    scan = dataset / "images" / "3.png"
    (tmp_path / "single").mkdir()
    copy = tmp_path / "single" / "3.png"
    copy.write_bytes(scan.read_bytes())
    before = snapshot(tmp_path / "single")
    rc, _, err = run_cli(capsys, "predict", copy, "--model", finished_run / "model.pth", "--device", "cpu",
                         "--out", tmp_path / "single", "--overwrite")
    one_error(rc, err, "the folder of the input")
    assert snapshot(tmp_path / "single") == before


def test_predict_never_follows_a_linked_output_subfolder_into_the_data(dataset, finished_run, tmp_path, capsys):
    out = tmp_path / "pred"
    args = ["predict", dataset / "images", "--model", finished_run / "model.pth", "--device", "cpu", "--out", out]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    shutil.rmtree(out / "masks")
    (out / "masks").symlink_to(dataset / "masks")  # an earlier output whose masks/ now leads to the ground truth
    before = snapshot(dataset)
    rc, _, err = run_cli(capsys, *args, "--overwrite")
    one_error(rc, err, "is a link to")
    assert snapshot(dataset) == before


def test_predict_names_an_input_folder_inside_out_as_an_input(dataset, finished_run, capsys):
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--model", finished_run / "model.pth",
                         "--device", "cpu", "--out", dataset, "--overwrite")
    one_error(rc, err, "holds the input folder")


def test_training_never_writes_into_its_data_folder(dataset, capsys):
    before = snapshot(dataset)
    for out in (dataset / "images", dataset / "run", dataset):
        rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS)
        one_error(rc, err, "data folder")
    assert snapshot(dataset) == before


# -----------------------------------------------------------------------------
# 2. Masks: colour, noisy JPEG, vanished tumours, no tumour at all


def test_colour_masks_count_any_strong_channel(tmp_path):
    for channel in range(3):
        mask = np.zeros((20, 20, 3), np.uint8)
        mask[5:10, 5:10, channel] = 255
        cv2.imwrite(str(tmp_path / f"c{channel}.png"), mask)
        assert bts.read_mask(tmp_path / f"c{channel}.png").sum() == 25
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: alpha is not tumour
    rgba[2:4, 2:6, 2] = 200
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    assert bts.read_mask(tmp_path / "rgba.png").sum() == 8


@pytest.mark.parametrize("high, quality", [(1, 90), (1, 80), (255, 90), (255, 60)])
def test_jpeg_masks_keep_their_tumour_under_compression_noise(high, quality, tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 16:44] = high
    path = tmp_path / "m.jpg"
    cv2.imwrite(str(path), mask, [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert not np.array_equal(decoded, mask)  # the compression noise is really there
    read, truth = bts.read_mask(path), mask > 0
    assert (read & truth).sum() / (read | truth).sum() > 0.9


def test_a_stray_value_in_a_0_1_mask_keeps_the_tumour(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 1
    mask[0, 0] = 3  # one stray value, as compression noise adds
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    assert bts.read_mask(tmp_path / "m.png")[8:16, 8:16].all()


def test_a_tumour_that_vanishes_at_the_training_size_is_named(dataset, tmp_path, capsys):
    image, mask = square_pair(size=96, top=40, left=40, side=1)
    write_pair(dataset, "tiny", image, mask)
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "o", *TINY_ARGS)
    assert rc == 0, err
    assert "tiny.png: its 1 tumour pixels vanish at 32x32" in err


def test_tumour_free_data_and_test_set_are_flagged_loudly(tmp_path, capsys):
    for i in range(1, 21):
        image, _ = square_pair(seed=i)
        write_pair(tmp_path / "empty", str(i), image, np.zeros_like(image))
    before = snapshot(tmp_path / "empty")
    rc, _, err = run_cli(capsys, "--data-dir", tmp_path / "empty", "--out-dir", tmp_path / "o", *TINY_ARGS,
                         "--split", "random")
    assert rc == 0, err
    assert "NO TUMOUR PIXEL in any of the 20 masks" in err and "TEST SET HOLDS NO TUMOUR PIXEL" in err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert "no tumour pixel" in metrics["warning"]
    assert snapshot(tmp_path / "empty") == before


# -----------------------------------------------------------------------------
# 3. A run owns its folder


def test_a_second_run_into_a_busy_folder_is_refused(dataset, tmp_path, capsys):
    out = tmp_path / "busy"
    with bts.claim_folder(out, "train", [], {}):
        rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS)
        one_error(rc, err, "in use by another run", f"pid {os.getpid()}")
        rc, _, err = run_cli(capsys, "predict", dataset / "images", "--model", "x.pth", "--out", out)
        assert rc == 1
    assert not (out / "model.pth").exists()


def test_a_run_killed_while_holding_the_lock_leaves_the_folder_free(dataset, tmp_path, capsys):
    out = tmp_path / "crashed"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, brain_tumor_segmentation as bts\n"
                               f"with bts.claim_folder(bts.Path({str(out)!r}), 'train', [], {{}}):\n"
                               "    print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=SCRIPT.parent)
    assert holder.stdout.readline().strip() == "locked"
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS)
    one_error(rc, err, "in use")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", out, *TINY_ARGS)
    assert rc == 0, err


# -----------------------------------------------------------------------------
# 4. --overwrite deletes nothing before everything was checked


@pytest.mark.parametrize("bad", [["--data-dir", "{tmp}/typo"], ["--groups", "{tmp}/missing.csv"],
                                 ["--data-dir", "{tmp}/unreadable"], ["--lr", "nan"], ["--folds", "2"]])
def test_overwrite_keeps_the_earlier_run_when_the_new_one_cannot_start(bad, finished_run, tmp_path, capsys):
    (tmp_path / "unreadable" / "images").mkdir(parents=True)
    (tmp_path / "unreadable" / "masks").mkdir()
    (tmp_path / "unreadable" / "images" / "1.png").write_bytes(b"not a png")
    (tmp_path / "unreadable" / "masks" / "1.png").write_bytes(b"not a png")
    before = snapshot(finished_run, ignore=".lock")
    args = ["--out-dir", finished_run, *TINY_ARGS, "--overwrite"]
    if "--data-dir" not in bad:
        args += ["--data-dir", tmp_path / "data"]
    rc, _, err = run_cli(capsys, *args, *[b.format(tmp=tmp_path) for b in bad])
    one_error(rc, err)
    assert snapshot(finished_run, ignore=".lock") == before


# -----------------------------------------------------------------------------
# 5. Every crash state has a way forward; stale temporaries are removed


def test_model_without_last_names_a_way_that_works(dataset, finished_run, capsys):
    (finished_run / "last.pth").unlink()
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", finished_run, *TINY_ARGS)
    one_error(rc, err, "no last.pth", "--overwrite")
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", finished_run, *TINY_ARGS, "--resume")
    one_error(rc, err, "--overwrite")
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", finished_run, *TINY_ARGS, "--overwrite")
    assert rc == 0, err


def test_stale_temporary_files_of_killed_writes_are_removed(dataset, finished_run, capsys):
    stale = [finished_run / ".model.pth.abc12_xy.tmp", finished_run / "visualizations" / ".loss_curves.png.k0z9q2ab.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", finished_run, *TINY_ARGS, "--overwrite")
    assert rc == 0, err
    assert not any(path.exists() for path in stale)


# -----------------------------------------------------------------------------
# 6. Every way a read can fail: skipped with a warning naming the file


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind", ["huge-header", "text", "empty"])
def test_unreadable_files_are_skipped_in_training_predict_and_masks(kind, dataset, finished_run, tmp_path, capsys):
    bad = {"huge-header": png_claiming(100_000, 100_000), "text": b"hello", "empty": b""}[kind]
    (dataset / "images" / "5.png").write_bytes(bad)
    (dataset / "masks" / "6.png").write_bytes(bad)
    before = snapshot(dataset)
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "t", *TINY_ARGS)
    assert rc == 0 and "Traceback" not in err, err
    assert "5.png" in err and "6.png" in err and "skipped" in err
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--masks", dataset / "masks", "--device", "cpu",
                         "--model", finished_run / "model.pth", "--out", tmp_path / "p")
    assert rc == 0 and "Traceback" not in err, err
    assert "5.png" in err and "6.png" in err
    assert "1 of the 19 segmented scans are not scored" in err  # 6.png: its mask unreadable, said in the summary
    assert snapshot(dataset) == before


@pytest.mark.slow
def test_files_without_read_permission_are_skipped(dataset, finished_run, tmp_path):
    (dataset / "images" / "7.png").chmod(0)
    (dataset / "masks" / "8.png").chmod(0)
    out = tmp_path / "unprivileged"
    out.mkdir(mode=0o777)
    os.chmod(tmp_path, 0o777)
    command = [sys.executable, str(SCRIPT), "--data-dir", str(dataset), "--out-dir", str(out), *TINY_ARGS]
    result = subprocess.run(without_root_override(command), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "7.png: cannot be read (Permission denied)" in result.stderr
    assert "8.png: cannot be read (Permission denied)" in result.stderr
    command = [sys.executable, str(SCRIPT), "predict", str(dataset / "images"), "--masks", str(dataset / "masks"),
               "--model", str(finished_run / "model.pth"), "--out", str(out / "pred"), "--device", "cpu"]
    result = subprocess.run(without_root_override(command), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "7.png: cannot be read" in result.stderr and "8.png: cannot be read" in result.stderr


# -----------------------------------------------------------------------------
# 7. Outputs that cannot be written, flags out of range, bad CSV and checkpoints


def test_an_output_folder_that_cannot_be_written_is_one_sentence(dataset, tmp_path, capsys):
    (tmp_path / "a-file").write_text("in the way")
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "a-file", *TINY_ARGS)
    one_error(rc, err, "is a file")
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "a-file" / "below", *TINY_ARGS)
    one_error(rc, err, "a-file")
    locked = tmp_path / "read-only"
    locked.mkdir(mode=0o555)
    os.chmod(tmp_path, 0o777)
    command = [sys.executable, str(SCRIPT), "--data-dir", str(dataset), "--out-dir", str(locked / "run"), *TINY_ARGS]
    result = subprocess.run(without_root_override(command), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "no permission to write" in result.stderr


def test_a_full_disk_in_predict_loses_nothing_and_leaves_no_partial_outputs(dataset, finished_run, tmp_path,
                                                                            capsys, monkeypatch):
    out = tmp_path / "pred"
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--model", finished_run / "model.pth",
                         "--device", "cpu", "--out", out)
    assert rc == 0, err
    before = snapshot(out, ignore=".lock")
    original, calls = bts.atomic_write, []

    def filling_up(path, write):  # the disk fills after a few files, as a real one would
        calls.append(path)
        if len(calls) > 5:
            raise OSError(28, "No space left on device", str(path))
        original(path, write)

    monkeypatch.setattr(bts, "atomic_write", filling_up)
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--model", finished_run / "model.pth",
                         "--device", "cpu", "--out", out, "--overwrite")
    one_error(rc, err, "disk is full")
    assert snapshot(out, ignore=".lock") == before  # the earlier outputs whole, nothing half-new


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "finite"), (["--lr", "inf"], "finite"), (["--lr", "-1"], "above 0"), (["--lr", "0"], "above 0"),
    (["--image-size", "16", "--batch-size", "1"], "batch norm"), (["--folds", "-3"], "--folds -3"),
    (["--folds", "2"], "--folds 2"), (["--folds", "3", "--fold", "5"], "--fold 5"), (["--fold", "1"], "--fold 1"),
    (["--threshold", "2"], "between 0 and 1"), (["--aug-flip", "-1"], "between 0 and 1"),
    (["--nan-check-every", "0"], "at least 1"), (["--weight-decay", "-1"], "at least 0"),
    (["--val-fraction", "1.5"], "sum to less than 1"), (["--epochs", "0"], "at least 1"),
])
def test_numeric_flags_out_of_range_are_refused_before_anything_runs(args, message, dataset, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "o", *TINY_ARGS, *args)
    one_error(rc, err, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", ["image,patient_id\n1," + "x" * 200_000 + "\n", "image,patient_id\n1,\0\n"])
def test_a_broken_groups_file_is_one_sentence(content, dataset, tmp_path, capsys):
    (tmp_path / "groups.csv").write_text(content)
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "o", *TINY_ARGS,
                         "--groups", tmp_path / "groups.csv")
    one_error(rc, err, "groups.csv")


@pytest.mark.parametrize("field, value", [("threshold", "x"), ("history", None), ("split", []), ("epoch", "1"),
                                          ("model", {"a": 1}), ("config.image_size", "abc"),
                                          ("config.base_width", 2.5), ("config", None)])
def test_a_checkpoint_with_fields_of_the_wrong_type_is_one_sentence(field, value, dataset, finished_run,
                                                                    tmp_path, capsys):
    for name in ("model.pth", "last.pth"):
        state = torch.load(finished_run / name, map_location="cpu", weights_only=True)
        top, _, sub = field.partition(".")
        if sub:
            state[top][sub] = value
        else:
            state[top] = value
        torch.save(state, finished_run / name)
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--model", finished_run / "model.pth",
                         "--device", "cpu", "--out", tmp_path / "p")
    one_error(rc, err, "model.pth")
    rc, _, err = run_cli(capsys, "--resume", "--out-dir", finished_run, "--data-dir", dataset, "--epochs", "2")
    one_error(rc, err, "last.pth")


# -----------------------------------------------------------------------------
# 8. metrics.json is strict JSON


def strict_load(path: Path):
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_metrics_json_is_strict_with_null_for_undefined_hd95(tmp_path, capsys):
    for i in range(1, 21):
        image, _ = square_pair(seed=i)
        write_pair(tmp_path / "empty", str(i), image, np.zeros_like(image))
    rc, _, err = run_cli(capsys, "--data-dir", tmp_path / "empty", "--out-dir", tmp_path / "o", *TINY_ARGS,
                         "--recipe", "seed", "--split", "random")
    assert rc == 0, err
    metrics = strict_load(tmp_path / "o" / "metrics.json")
    assert metrics["test"]["hd95"] is None and "null" in metrics["empty_masks"]


# -----------------------------------------------------------------------------
# More members of the classes above (a hostile review of the first fixes)


@pytest.mark.parametrize("kind", ["stray-255-in-0-1", "16-bit-0-1000-stray", "two-labels", "rgba-transparent-white"])
def test_more_mask_encodings_keep_their_tumour(kind, tmp_path):
    truth = np.zeros((40, 40), bool)
    truth[10:20, 10:20] = True
    if kind == "stray-255-in-0-1":
        mask = truth.astype(np.uint8)
        mask[0, 0] = 255
    elif kind == "16-bit-0-1000-stray":
        mask = truth.astype(np.uint16) * 1000
        mask[0, 0] = 65535
    elif kind == "two-labels":  # oedema 100 around a core 255: both are tumour
        truth[8:22, 8:22] = True
        mask = truth.astype(np.uint8) * 100
        mask[12:18, 12:18] = 255
    else:  # a red tumour painted on a transparent white layer
        mask = np.zeros((40, 40, 4), np.uint8)
        mask[..., :3] = 255
        mask[truth] = (0, 0, 255, 255)
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    read = bts.read_mask(tmp_path / "m.png")
    assert read[truth].all() and read.sum() <= truth.sum() + 1


def test_inverted_masks_are_flagged(tmp_path, capsys):
    for i in range(1, 21):
        image, mask = square_pair(seed=i)
        write_pair(tmp_path / "inv", str(i), image, 255 - mask)
    rc, _, err = run_cli(capsys, "--data-dir", tmp_path / "inv", "--out-dir", tmp_path / "o", *TINY_ARGS,
                         "--split", "random")
    assert rc == 0, err
    assert "20 of 20 masks are more than half tumour" in err and "inverted" in err


def test_an_unreadable_folder_is_a_read_error_not_a_write_error(dataset, finished_run, tmp_path, capsys,
                                                                monkeypatch):
    real_iterdir = Path.iterdir

    def refusing(self):
        if self == dataset / "images":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refusing)
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "o", *TINY_ARGS)
    one_error(rc, err, "cannot read this folder", "Permission denied")
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--model", finished_run / "model.pth",
                         "--device", "cpu", "--out", tmp_path / "p")
    one_error(rc, err, "cannot read this folder")
    assert "write" not in err


def test_an_image_too_large_for_memory_is_skipped(dataset, tmp_path, capsys, monkeypatch):
    real = bts.gray_in_unit_range

    def out_of_memory(image):
        if image.shape == (48, 48) and image[0, 0] == 255:
            raise MemoryError
        return real(image)

    image, mask = square_pair(seed=3)
    image[0, 0] = 255
    write_pair(dataset, "huge", image, mask)
    monkeypatch.setattr(bts, "gray_in_unit_range", out_of_memory)
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "o", *TINY_ARGS)
    assert rc == 0 and "huge.png: too large" in err


def test_a_refused_run_never_frees_the_winners_folder(tmp_path):
    folder = tmp_path / "new"
    with bts.claim_folder(folder, "train", [], {}):
        with pytest.raises(bts.UserError, match="in use"):
            with bts.claim_folder(folder, "train", [], {}):
                pass
        assert (folder / ".lock").exists()
        with pytest.raises(bts.UserError, match="in use"):  # still owned by the first
            with bts.claim_folder(folder, "train", [], {}):
                pass


def test_resume_without_model_pth_chooses_the_best_model_anew(dataset, finished_run, capsys):
    (finished_run / "model.pth").unlink()
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", finished_run, "--resume")
    one_error(rc, err, "--overwrite")  # finished: nothing left to choose from
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", finished_run, "--resume", "--epochs", "2")
    assert rc == 0 and "chosen anew" in err, err
    assert (finished_run / "model.pth").is_file()


@pytest.mark.parametrize("damage", ["truncated", "empty", "model-as-resume"])
def test_every_damaged_resume_names_the_way_forward(damage, dataset, finished_run, capsys):
    last = finished_run / "last.pth"
    args = ["--data-dir", dataset, "--out-dir", finished_run, "--epochs", "2", "--resume"]
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:100_000])
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        last.unlink()
        args.append(str(finished_run / "model.pth"))
    rc, _, err = run_cli(capsys, *args)
    one_error(rc, err, "--overwrite")
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", finished_run, *TINY_ARGS, "--overwrite")
    assert rc == 0, err


@pytest.mark.parametrize("field, value", [("best", None), ("best", "missing"), ("optimizer", {"param_groups": "x"}),
                                          ("split", {}), ("epoch_losses", "x"), ("config.lr", "fast"),
                                          ("step", 10 ** 6), ("epoch", -5), ("config.image_size", 17),
                                          ("config.base_width", 8), ("history", {"epoch": "x"})])
def test_a_damaged_resumable_state_is_one_sentence(field, value, dataset, finished_run, capsys):
    state = torch.load(finished_run / "last.pth", map_location="cpu", weights_only=True)
    top, _, sub = field.partition(".")
    if value == "missing":
        del state[top]
    elif sub:
        state[top][sub] = value
    else:
        state[top] = value
    torch.save(state, finished_run / "last.pth")
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", finished_run, "--resume", "--epochs", "2")
    one_error(rc, err, "last.pth")


@pytest.mark.parametrize("field, value", [("config.image_size", 17), ("threshold", float("nan")), ("threshold", 5.0),
                                          ("config.tta", "no"), ("weights", float("nan"))])
def test_predict_refuses_a_checkpoint_with_impossible_values(field, value, dataset, finished_run, tmp_path, capsys):
    state = torch.load(finished_run / "model.pth", map_location="cpu", weights_only=True)
    if field == "weights":
        state["model"]["head.weight"][:] = value
    elif field.startswith("config."):
        state["config"][field[7:]] = value
    else:
        state[field] = value
    torch.save(state, finished_run / "model.pth")
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--model", finished_run / "model.pth",
                         "--device", "cpu", "--out", tmp_path / "p")
    one_error(rc, err, "damaged checkpoint")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("args, message", [(["--seed", "-1"], "--seed -1"), (["--seed", "99999999999999999999"], "--seed"),
                                           (["--image-size", "99999984"], "at most 4096"),
                                           (["--aug-scale", "1000"], "at most 1")])
def test_more_flags_out_of_range(args, message, dataset, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "o", *TINY_ARGS, *args)
    one_error(rc, err, message)


def test_a_groups_file_with_two_patients_for_one_image_is_refused(dataset, tmp_path, capsys):
    rows = "".join(f"{i},p{i}\n" for i in range(1, 21))
    (tmp_path / "groups.csv").write_text("image,patient_id\n" + rows + "3,p99\n")
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "o", *TINY_ARGS,
                         "--groups", tmp_path / "groups.csv")
    one_error(rc, err, "listed twice")


def test_training_writes_nothing_outside_its_folder_and_records_everything_it_writes(dataset, tmp_path, capsys):
    (tmp_path / "parent").mkdir()
    (tmp_path / "parent" / "runs.csv").write_bytes(b"name,score\nmine,1\n")  # a user's file beside the run
    before = snapshot(tmp_path / "parent")
    rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", tmp_path / "parent" / "run", *TINY_ARGS)
    assert rc == 0, err
    after = snapshot(tmp_path / "parent")
    assert {k: v for k, v in after.items() if k != "run" and not k.startswith("run/")} == before
    run = tmp_path / "parent" / "run"
    written = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    listed = set(json.loads((run / bts.MANIFEST).read_text())["files"])
    assert written - {bts.MANIFEST, bts.LOCK} <= listed and "model.pth" in written


def test_predict_against_tumour_free_masks_says_the_scores_say_nothing(dataset, finished_run, tmp_path, capsys):
    empty = tmp_path / "empty-masks"
    empty.mkdir()
    for path in (dataset / "masks").iterdir():
        cv2.imwrite(str(empty / path.name), np.zeros((48, 48), np.uint8))
    rc, _, err = run_cli(capsys, "predict", dataset / "images", "--masks", empty, "--model", finished_run / "model.pth",
                         "--device", "cpu", "--out", tmp_path / "p")
    assert rc == 0 and "HOLD NO TUMOUR PIXEL" in err, err


def test_file_names_that_are_not_utf8_train_predict_and_compare(dataset, tmp_path):
    """Names as bytes on disk (Python holds them as surrogates): kept as they are in the CSVs, in every tool."""
    odd = tmp_path / "odd"
    shutil.copytree(dataset, odd)
    for sub in ("images", "masks"):
        for f in sorted((odd / sub).iterdir()):
            os.rename(os.fsencode(f), os.fsencode(f.parent) + b"/scan\xff" + os.fsencode(f.name))
    runs = []
    for seed in ("1", "2"):
        runs.append(tmp_path / f"run{seed}")
        result = subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(odd), "--out-dir", str(runs[-1]),
                                 *TINY_ARGS, "--seed", seed, "--test-fraction", "0.5", "--test-samples", "20"],
                                capture_output=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert b"scan\xff" in (runs[0] / "test_per_image.csv").read_bytes()  # the name's bytes, as on disk
    for tool in (["predict", str(odd / "images"), "--model", str(runs[0] / "model.pth"), "--out", str(tmp_path / "p"),
                  "--device", "cpu"], ["compare", *map(str, runs), "--out", str(tmp_path / "c")]):
        result = subprocess.run([sys.executable, str(SCRIPT), *tool], capture_output=True, timeout=300)
        assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr[-2000:]
    assert b"scan\xff" in (tmp_path / "p" / "predictions.csv").read_bytes()
    assert any(b"scan\xff" in os.fsencode(p.name) for p in (tmp_path / "p" / "masks").iterdir())


def test_a_disk_that_fills_during_a_checkpoint_write_is_one_sentence(dataset, tmp_path, capsys):
    """A real full disk (a small tmpfs): torch.save would wrap the OSError in a RuntimeError."""
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        rc, _, err = run_cli(capsys, "--data-dir", dataset, "--out-dir", disk / "run", *TINY_ARGS, "--base-width", "8")
        one_error(rc, err, "the disk is full")
    finally:
        subprocess.run(["umount", str(disk)], check=True)
