"""End-to-end training runs on tiny synthetic data, the command line, and reliability:
resume after SIGINT, crash-safe checkpoints, NaN detection, identical same-seed runs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import brain_tumor_segmentation as bts

from conftest import REPO_ROOT as ROOT, SCRIPT, TINY_ARGS

TINY = [*TINY_ARGS, "--epochs", "3", "--test-samples", "3", "--panel-images", "2"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return bts.make_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", n=40, size=64, seed=1)


def run(args):
    return bts.main([str(a) for a in args])


def metrics_without_timing(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    for key in ("total_seconds", "images_per_second", "compile_seconds", "warning"):  # warning: names the fallback
        m.pop(key, None)
    for key in ("epoch_seconds", "images_per_second"):
        m["history"].pop(key)
    return m


def history_without_timing(path: Path) -> dict:
    h = bts.load_checkpoint(path)["history"]
    return {k: v for k, v in h.items() if k not in ("epoch_seconds", "images_per_second")}


def test_end_to_end_writes_every_output(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["--data-dir", synthetic, "--out-dir", out, *TINY]) == 0
    printed = capsys.readouterr().out
    for expected in ("configuration:", "device: cpu", "Total params", "split: train", "test (", "Dice"):
        assert expected in printed
    for name in ("model.pth", "last.pth", "metrics.json", "split.json", "config.json", "test_per_image.csv",
                 "visualizations/loss_curves.png", "visualizations/test_samples.png",
                 "visualizations/worst_predictions.png", "visualizations/test_dice_histogram.png",
                 *(f"visualizations/epochs/epoch_{e:03d}.png" for e in (1, 2, 3))):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert 0 <= test["dice"] <= 1 and 0 <= test["iou"] <= test["dice"] + 1e-9
    if test["patients"] >= 5:
        assert test["dice_ci95"][0] <= test["dice"] <= test["dice_ci95"][1]
    else:  # fewer than 5 groups: no interval, and the record says why
        assert test["dice_ci95"] is None and "too few for a 95% interval" in metrics["warning"]
    assert "empty" in metrics["empty_masks"] and metrics["tta"] is True and 0.2 <= metrics["threshold"] <= 0.8
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"], key=int) == [str(i) for i in range(1, 41)]
    assert len(split["test"]) == test["images"]
    state = bts.load_checkpoint(out / "model.pth")
    assert state["epoch"] == metrics["best_epoch"] and state["config"]["image_size"] == 32
    assert set(state["split"]["test"]) == set(split["test"])
    assert json.loads((out / "config.json").read_text())["base_width"] == 4


def test_resuming_a_checkpoint_from_before_tta_existed_keeps_it_off(tmp_path):
    config = bts.dataclasses.asdict(bts.config_from_args(["--recipe", "seed"])[0])
    del config["tta"]
    cfg = bts.saved_config(config)
    assert cfg.tta is False and cfg.recipe == "seed" and bts.Config().tta is True


def test_help_lists_every_config_field_with_its_default():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for field in bts.dataclasses.fields(bts.Config):
        assert "--" + field.name.replace("_", "-") in text, field.name
    assert "default: 256" in text and "default: 16" in text and "default: 0.002" in text
    assert "default: 'improved'" in text


def test_command_line_overrides_and_presets():
    cfg, typed = bts.config_from_args(["--epochs", "5", "--batch-size", "8"])
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.image_size, cfg.device) == (5, 8, 2e-3, 256, "auto")
    assert typed == {"epochs", "batch_size"}
    demo, _ = bts.config_from_args(["--demo", "--image-size", "96"])
    assert demo.image_size == 96 and demo.base_width == bts.DEMO_DEFAULTS["base_width"]
    improved, _ = bts.config_from_args(["--recipe", "improved", "--lr", "5e-4"])
    assert improved.loss == "dice+bce" and improved.augment and improved.lr == 5e-4
    seed, _ = bts.config_from_args(["--recipe", "seed", "--epochs", "3"])
    assert (seed.optimizer, seed.lr, seed.weight_decay, seed.schedule, seed.loss) == ("adam", 1e-3, 0.0, "constant", "dice")
    assert not (seed.augment or seed.tune_threshold or seed.tta) and seed.threshold == 0.5 and seed.epochs == 3


def test_the_default_recipe_is_the_dataclass_itself():
    defaults = bts.Config()
    assert defaults.recipe == "improved" and bts.config_from_args([])[0] == defaults
    assert bts.config_from_args(["--recipe", "improved"])[0] == defaults
    assert any(getattr(defaults, k) != v for k, v in bts.SEED_RECIPE.items())


EDITED_DEFAULTS = {"lr": ("2e-3", "7e-4"), "epochs": ("20", "2"), "augment": ("True", "False"),
                   "image_size": ("256", "32"), "base_width": ("32", "4"), "aug_rotation": ("15.0", "5.0"),
                   "warmup_fraction": ("0.3", "0.5"), "threshold_step": ("0.05", "0.1")}


@pytest.mark.slow
def test_defaults_edited_at_the_top_of_a_copy_of_the_script_drive_the_run(synthetic, tmp_path):
    """The user's real path: edit the constants in the file, run it, read config.json back."""
    source = SCRIPT.read_text()
    for name, (old, new) in EDITED_DEFAULTS.items():
        line = next(l for l in source.splitlines() if l.lstrip().startswith(f"{name}: "))
        assert f"setting({old}," in line, line
        source = source.replace(line, line.replace(f"setting({old},", f"setting({new},"))
    copy = tmp_path / "edited.py"
    copy.write_text(source)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(copy), "--data-dir", str(synthetic), "--out-dir", str(out),
                             "--batch-size", "8", "--test-samples", "2", "--panel-images", "1", "--workers", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    for name, (_, new) in EDITED_DEFAULTS.items():
        assert config[name] == type(config[name])(eval(new)), name
    state = bts.load_checkpoint(out / "last.pth")
    assert state["history"]["epoch"] == [1, 2] and state["model"]["head.weight"].shape[1] == 4
    assert max(state["history"]["lr"]) <= 7e-4


HOW_TO_CHANGE_IT = [  # the README's "How to change it" rows for the loss and a metric, as a user would write them
    ('LOSSES = {\n', 'LOSSES = {\n    "bce": lambda logits, target, cfg: F.binary_cross_entropy_with_logits(logits.float(), '
                     'target.float()),\n'),
    ('METRICS = {\n', 'METRICS = {\n    "f2": lambda tp, fp, fn: (5 * tp, 5 * tp + 4 * fn + fp),\n'),
    ('EPOCH_METRICS = ("dice", "iou")', 'EPOCH_METRICS = ("dice", "iou", "f2")'),
    ('    aug_gamma: float', '    aug_noise: float = setting(0.0, "sd of added Gaussian noise", low=0, high=1)\n    aug_gamma: float'),
    ('    return x.clamp(0, 1).pow(gamma), y\n', '    noise = torch.randn(x.shape, device=x.device, generator=generator) * cfg.aug_noise\n'
                                             '    return (x + noise).clamp(0, 1).pow(gamma), y\n'),
]


@pytest.mark.slow
def test_the_readmes_how_to_change_it_works_in_a_copy_of_the_script(synthetic, tmp_path):
    """A loss, a metric and an augmentation added in one place each, as the README says: the loss is a valid
    --loss, the augmentation's field a checked flag, and the metric is in the test summary, the per-image CSV,
    and, tracked after every epoch, in the history and the curves."""
    source = SCRIPT.read_text()
    for old, new in HOW_TO_CHANGE_IT:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    copy = tmp_path / "edited.py"
    copy.write_text(source)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(copy), "--data-dir", str(synthetic), "--out-dir", str(out), *TINY,
                             "--epochs", "2", "--loss", "bce", "--aug-noise", "0.05"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert " f2 " in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "bce" and config["aug_noise"] == 0.05 and 0 <= metrics["test"]["f2"] <= 1
    assert len(metrics["history"]["val_f2"]) == 2
    assert "f2" in (out / "test_per_image.csv").read_text().splitlines()[0].split(",")
    assert (out / "visualizations" / "loss_curves.png").stat().st_size > 0
    refused = subprocess.run([sys.executable, str(copy), "--data-dir", str(synthetic), "--out-dir", str(tmp_path / "x"),
                              "--aug-noise", "2"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "--aug-noise" in refused.stderr and "Traceback" not in refused.stderr


def test_recipe_seed_overlays_only_the_fields_not_typed():
    seed, _ = bts.config_from_args(["--recipe", "seed", "--lr", "3e-4", "--augment"])
    assert seed.lr == 3e-4 and seed.augment and seed.loss == "dice" and seed.optimizer == "adam"


@pytest.mark.parametrize("args, message", [
    (["--image-size", "100"], "multiple of 16"),
    (["--val-fraction", "0.6", "--test-fraction", "0.5"], "sum to less than 1"),
    (["--loss", "focal"], "choose one of"),
    (["--threshold-step", "1e-300"], "--threshold-step"),
    (["--split", "random", "--groups", "patients.csv"], "would ignore it"),
    (["--folds", "3", "--test-fraction", "0.6"], "drop them"),  # a grid of 1e300 thresholds, after the whole training
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--epochs", "0"], "CUDA is not available"
     if not torch.cuda.is_available() else "at least 1"),
])
def test_bad_settings_give_one_clear_error(args, message, synthetic, tmp_path, capsys):
    assert run(["--data-dir", synthetic, "--out-dir", tmp_path / "o", *TINY, *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_second_run_refuses_to_replace_an_earlier_model(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["--data-dir", synthetic, "--out-dir", out, *TINY, "--epochs", "1"]) == 0
    before = (out / "model.pth").read_bytes()
    assert run(["--data-dir", synthetic, "--out-dir", out, *TINY, "--epochs", "1"]) == 1
    assert "--resume" in capsys.readouterr().err
    assert (out / "model.pth").read_bytes() == before
    assert run(["--data-dir", synthetic, "--out-dir", out, *TINY, "--epochs", "1", "--overwrite"]) == 0


def test_same_seed_runs_are_identical_on_cpu(synthetic, tmp_path):
    for name in ("a", "b"):
        assert run(["--data-dir", synthetic, "--out-dir", tmp_path / name, *TINY, "--recipe", "improved"]) == 0
    assert metrics_without_timing(tmp_path / "a") == metrics_without_timing(tmp_path / "b")
    assert metrics_without_timing(tmp_path / "a")["tta"] is True  # part of the improved recipe
    assert bts.load_checkpoint(tmp_path / "a" / "model.pth")["config"]["tta"] is True  # so predict mirrors too
    assert history_without_timing(tmp_path / "a" / "last.pth") == history_without_timing(tmp_path / "b" / "last.pth")
    wa, wb = (bts.load_checkpoint(tmp_path / n / "model.pth")["model"] for n in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigint_then_resume_gives_the_same_result_as_an_uninterrupted_run(synthetic, tmp_path, monkeypatch, capsys):
    args = ["--data-dir", synthetic, *TINY, "--recipe", "improved"]
    assert run([*args, "--out-dir", tmp_path / "straight"]) == 0

    calls = {"n": 0}
    real_loss = bts.compute_loss

    def loss_then_ctrl_c(logits, target, cfg):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, step 1: 3 training steps and 1 validation batch per epoch
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(logits, target, cfg)

    monkeypatch.setattr(bts, "compute_loss", loss_then_ctrl_c)
    out = tmp_path / "interrupted"
    assert run([*args, "--out-dir", out]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err
    state = bts.load_checkpoint(out / "last.pth")
    assert (state["epoch"], state["step"]) == (1, 1)  # one step into epoch 2
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(bts, "compute_loss", real_loss)

    assert run(["--resume", "--out-dir", out]) == 0
    assert metrics_without_timing(out) == metrics_without_timing(tmp_path / "straight")
    assert history_without_timing(out / "last.pth") == history_without_timing(tmp_path / "straight" / "last.pth")
    # the resumed run extends the loss curve instead of starting a new one
    assert bts.load_checkpoint(out / "last.pth")["history"]["epoch"] == [1, 2, 3]


def test_resume_keeps_the_best_model_unless_a_later_epoch_beats_it(synthetic, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run(["--data-dir", synthetic, "--out-dir", out, *TINY, "--epochs", "2"]) == 0
    best = bts.load_checkpoint(out / "model.pth")
    # Pretend the best epoch was unbeatable: resuming must not replace model.pth.
    last = bts.load_checkpoint(out / "last.pth")
    last["best"] = {**last["best"], "val_dice": 2.0}
    last["config"]["epochs"] = 3
    bts.save_checkpoint(out / "last.pth", last)
    assert run(["--resume", str(out / "last.pth"), "--out-dir", out]) == 0
    after = bts.load_checkpoint(out / "model.pth")
    assert after["epoch"] == best["epoch"]
    assert all(torch.equal(after["model"][k], best["model"][k]) for k in best["model"])
    assert bts.load_checkpoint(out / "last.pth")["epoch"] == 3


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(synthetic, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_loss = bts.compute_loss

    def nan_in_epoch_2(logits, target, cfg):
        loss = real_loss(logits, target, cfg)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(bts, "compute_loss", nan_in_epoch_2)
    out = tmp_path / "run"
    assert run(["--data-dir", synthetic, "--out-dir", out, *TINY]) == 1
    err = capsys.readouterr().err
    assert "epoch 2, step 1" in err and "Traceback" not in err
    last = bts.load_checkpoint(out / "last.pth")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert bts.load_checkpoint(out / "model.pth")["epoch"] == 1


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_gradient_is_caught_too(synthetic, tmp_path, monkeypatch, capsys):
    real_loss = bts.compute_loss

    def infinite_gradient(logits, target, cfg):
        return real_loss(InfiniteGradient.apply(logits), target, cfg)

    monkeypatch.setattr(bts, "compute_loss", infinite_gradient)
    assert run(["--data-dir", synthetic, "--out-dir", tmp_path / "run", *TINY]) == 1
    assert "epoch 1, step 1" in capsys.readouterr().err


class FakeCompiled(torch.nn.Module):
    """Stands in for torch.compile's wrapper: the same parameters, a hook on every call."""

    def __init__(self, model, on_call, fail_in_backward=None):
        super().__init__()
        self.inner, self.on_call, self.fail_in_backward = model, on_call, fail_in_backward

    def forward(self, *args):
        self.on_call()
        out = self.inner(*args)
        if self.fail_in_backward:
            out.register_hook(lambda grad: self.fail_in_backward())
        return out


@pytest.mark.slow
def test_a_failing_torch_compile_falls_back_to_eager_with_the_same_result(synthetic, tmp_path, monkeypatch, capsys):
    assert run(["--data-dir", synthetic, "--out-dir", tmp_path / "eager", *TINY, "--compile", "off"]) == 0
    modes = []

    def no_triton():
        raise RuntimeError("Cannot find a working triton installation")

    def broken_compile(model, mode=None):  # the forward runs, then the backward fails to compile
        modes.append(mode)
        return FakeCompiled(model, lambda: None, fail_in_backward=no_triton)

    monkeypatch.setattr(bts.torch, "compile", broken_compile)
    assert run(["--data-dir", synthetic, "--out-dir", tmp_path / "compiled", *TINY, "--compile", "on",
                "--compile-mode", "max-autotune"]) == 0
    assert modes == ["max-autotune"]
    err = capsys.readouterr().err
    assert "first compiled step failed (RuntimeError: Cannot find a working triton" in err and "--compile off" in err
    assert metrics_without_timing(tmp_path / "eager") == metrics_without_timing(tmp_path / "compiled")
    # Equal batch-norm statistics too: the failed step's forward pass was undone before the retry.
    wa, wb = (bts.load_checkpoint(tmp_path / n / "last.pth")["model"] for n in ("eager", "compiled"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_error_after_compile_worked_is_not_hidden(synthetic, tmp_path, monkeypatch):
    calls = []

    def fail_at_step_3():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a real bug in step 3")

    monkeypatch.setattr(bts.torch, "compile", lambda model, mode=None: FakeCompiled(model, fail_at_step_3))
    with pytest.raises(RuntimeError, match="a real bug in step 3"):
        run(["--data-dir", synthetic, "--out-dir", tmp_path / "run", *TINY, "--compile", "on"])


# A writer whose checkpoint writes block halfway: atomic_write's temporary file gets half of the
# checkpoint's bytes, flushed, then the writer says "mid-write" and waits to be killed.
KILLER = """
import io, os, sys, time, torch
sys.path.insert(0, {root!r})
import brain_tumor_segmentation as bts
real_write = bts.atomic_write
def half_then_wait(path, write):
    if i == {block_at}:
        def half(f):
            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            print("mid-write", flush=True)
            time.sleep(600)
        return real_write(path, half)
    return real_write(path, write)
bts.atomic_write = half_then_wait
for i in range(1, {block_at} + 1):
    bts.save_checkpoint(bts.Path({path!r}), {{"format": bts.CHECKPOINT_FORMAT, "version": bts.CHECKPOINT_VERSION,
                        "i": i, "weights": torch.full((1_000_000,), float(i))}})
    print(i, flush=True)
"""


@pytest.mark.parametrize("block_at", [1, 3])
def test_sigkill_inside_a_checkpoint_write_leaves_the_previous_one_and_the_next_run_cleans_up(block_at, tmp_path):
    path = tmp_path / "model.pth"
    code = KILLER.format(root=str(ROOT), path=str(path), block_at=block_at)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline().strip() for _ in range(block_at)]
    assert lines == [str(i) for i in range(1, block_at)] + ["mid-write"]  # the writer is inside a write now
    partial = list(tmp_path.glob(".model.pth.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # half a checkpoint, on disk
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if block_at == 1:
        assert not path.exists()  # no checkpoint yet, and no half one under its name
    else:
        state = torch.load(path, weights_only=True)
        assert state["i"] == block_at - 1 and torch.all(state["weights"] == block_at - 1)
    bts.remove_stale_temporaries(tmp_path, ["model.pth"])  # what the next run in this folder does first
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoint_of_another_version_gets_a_clear_message(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"format": bts.CHECKPOINT_FORMAT, "version": 0, "model": {}}, path)
    with pytest.raises(bts.UserError, match="version 0"):
        bts.load_checkpoint(path)


@pytest.mark.slow
def test_demo_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["--demo", "--demo-images", "240", "--epochs", "8", "--workers", "1", "--test-samples", "3"]) == 0
    metrics = json.loads((tmp_path / "outputs" / "demo" / "metrics.json").read_text())
    assert metrics["test"]["dice"] >= 0.7


def test_demo_never_overwrites_a_folder_it_did_not_make(tmp_path, capsys):
    precious = tmp_path / "mine"
    (precious / "images").mkdir(parents=True)
    (precious / "images" / "keep.png").write_bytes(b"not mine to delete")
    assert run(["--demo", "--data-dir", precious, "--out-dir", tmp_path / "o", "--demo-images", "10"]) == 1
    assert "never deleted" in capsys.readouterr().err
    assert (precious / "images" / "keep.png").read_bytes() == b"not mine to delete"


@pytest.mark.slow
def test_cross_validation_trains_one_model_per_fold_on_disjoint_patients(synthetic, tmp_path):
    out = tmp_path / "cv"
    assert run(["--data-dir", synthetic, "--out-dir", out, *TINY, "--epochs", "1", "--folds", "3"]) == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    assert len(summary["test_dice_per_fold"]) == 3 and summary["test_images"] == 40
    tests = [set(json.loads((out / f"fold_{k}" / "split.json").read_text())["test_patients"]) for k in (1, 2, 3)]
    assert not (tests[0] & tests[1]) and not (tests[0] & tests[2]) and not (tests[1] & tests[2])
    for k in (1, 2, 3):
        split = json.loads((out / f"fold_{k}" / "split.json").read_text())
        parts = [set(split[f"{p}_patients"]) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert (out / f"fold_{k}" / "model.pth").is_file()
    # --resume keeps finished folds
    before = (out / "fold_1" / "model.pth").stat().st_mtime_ns
    assert run(["--data-dir", synthetic, "--out-dir", out, *TINY, "--epochs", "1", "--folds", "3", "--resume"]) == 0
    assert (out / "fold_1" / "model.pth").stat().st_mtime_ns == before


@pytest.mark.parametrize("amp", ["bf16", "auto"])
def test_cpu_runs_in_bf16_and_auto_follow_the_fixed_rule(amp, synthetic, tmp_path, capsys):
    out = tmp_path / amp
    args = [a for a in TINY if a not in ("--amp", "off")]
    assert run(["--data-dir", synthetic, "--out-dir", out, *args, "--epochs", "1", "--amp", amp]) == 0
    printed = capsys.readouterr().out
    precision = json.loads((out / "metrics.json").read_text())["precision"]
    if amp == "bf16":
        assert precision == "bfloat16" and "precision: bfloat16 (--amp bf16)" in printed
    elif bts.cpu_has_native_bf16():
        assert precision == "bfloat16" and "precision: bfloat16 (a CPU with native bf16" in printed
    else:
        assert precision == "float32" and "precision: float32 (a CPU without native bf16)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test"]["dice"] <= 1


@pytest.mark.parametrize("capability, native, expected", [
    ("AVX512", True, "precision: bfloat16 (a CPU with native bf16; --amp off for float32), channels-last: True"),
    ("AVX512", False, "precision: float32 (a CPU without native bf16), channels-last: True"),
    ("AVX2", False, "precision: float32 (a CPU without native bf16), channels-last: False"),
])
def test_the_defaults_the_benchmark_chose_are_in_effect_on_each_kind_of_cpu(capability, native, expected,
                                                                            monkeypatch, capsys):
    monkeypatch.setattr(bts.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(bts, "cpu_has_native_bf16", lambda: native)
    machine = bts.set_up_machine(bts.Config(device="cpu"))
    bts.choose_precision(machine, bts.Config(device="cpu"))
    assert expected in capsys.readouterr().out
    long_run, demo = bts.Config(), bts.config_from_args(["--demo"])[0]
    # compile auto on a CPU: only in bf16, and only for a run long enough to repay the first compile
    assert bts.use_compile(long_run, machine, 1900) == native
    assert not bts.use_compile(demo, machine, 420)
    assert not bts.use_compile(bts.Config(compile="off"), machine, 1900)


def test_a_stop_outside_the_training_loop_says_the_way_on(capsys):
    def stopped_while_decoding():
        raise KeyboardInterrupt
    assert bts.run_cli(stopped_while_decoding) == 130
    err = capsys.readouterr().err
    assert "aborted" in err and "--resume" in err and "Traceback" not in err
