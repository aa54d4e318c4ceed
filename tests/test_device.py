"""Device, precision and layout, by fixed rules: pick_device, the GPU check, the precision and
channels-last rules, when torch.compile is used and its fallback, out-of-memory advice, and that the
variables torchrun sets change nothing (its support is gone on purpose)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import brain_tumor_segmentation as bts
from conftest import SCRIPT, TINY_ARGS, make_dataset, one_error, run_cli

TINY = [*TINY_ARGS, "--batch-size", "4"]  # 12 training images of make_dataset's 20: 3 steps an epoch
RANK_TEST = "test_torchrun_variables_in_the_environment_change_nothing"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("device") / "data")


@pytest.fixture(scope="module", autouse=True)
def torchrun_environment_run(request, data, tmp_path_factory):
    """The fresh process of RANK_TEST, started with the module so that it runs beside the tests in
    this process (most of it is imports, on one core); None when that test is not selected."""
    if not any(item.name == RANK_TEST for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("rank") / "run"
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "1"}  # see one_thread
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--data-dir", str(data), "--out-dir", str(out),
                             *TINY_ARGS, "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# -----------------------------------------------------------------------------
# pick_device and the GPU check


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def fake_cuda(monkeypatch, count: int = 1, capability=(9, 0), arch_list=("sm_80", "sm_90")):
    """A machine with `count` GPUs of this compute capability, and a PyTorch built for arch_list."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_pick_device_cpu_and_auto_without_cuda(monkeypatch):
    no_cuda(monkeypatch)
    assert bts.pick_device("cpu") == torch.device("cpu")
    assert bts.pick_device("auto") == torch.device("cpu")


def test_pick_device_auto_and_cuda_take_the_first_gpu_and_make_it_current(monkeypatch):
    chosen = fake_cuda(monkeypatch, count=2)
    assert bts.pick_device("auto") == torch.device("cuda", 0)
    assert bts.pick_device("cuda") == torch.device("cuda", 0)
    assert bts.pick_device("cuda:1") == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 0)] * 2 + [torch.device("cuda", 1)]


@pytest.mark.parametrize("name, cuda, message", [
    ("mps", False, "--device mps: only cpu and cuda are supported"),
    ("gpu", False, "--device 'gpu': use auto, cpu, cuda or cuda:N"),
    ("cuda", False, "--device cuda: CUDA is not available here; use --device cpu or auto"),
    ("cuda:3", True, "--device cuda:3: this machine has 1 GPU(s), numbered from 0"),
])
def test_pick_device_refuses_in_one_sentence(name, cuda, message, monkeypatch):
    fake_cuda(monkeypatch) if cuda else no_cuda(monkeypatch)
    with pytest.raises(bts.UserError) as e:
        bts.pick_device(name)
    assert str(e.value) == message


def test_a_device_that_is_not_there_is_refused_before_any_folder_is_made(data, tmp_path, monkeypatch, capsys):
    no_cuda(monkeypatch)
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", tmp_path / "run", *TINY_ARGS, "--device", "cuda:7")
    one_error(rc, err, "--device cuda:7: CUDA is not available here")
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# Precision: a fixed rule of the machine and --amp, never a measurement


@pytest.mark.parametrize("native, amp, expected, why", [
    (True, "auto", torch.bfloat16, "a CPU with native bf16; --amp off for float32"),
    (False, "auto", None, "a CPU without native bf16"),
    (True, "off", None, "--amp off"),
    (False, "bf16", torch.bfloat16, "--amp bf16"),
    (True, "fp16", torch.float16, "--amp fp16"),
])
def test_cpu_precision_is_a_fixed_rule_of_the_machine_and_amp(native, amp, expected, why, monkeypatch):
    monkeypatch.setattr(bts, "cpu_has_native_bf16", lambda: native)
    for _ in range(3):  # the same answer every time: nothing is timed
        assert bts.precision(amp, torch.device("cpu")) == (expected, why)


@pytest.mark.parametrize("capability, amp, expected, why", [
    ((8, 0), "auto", torch.bfloat16, "a GPU with bf16"),
    ((9, 0), "auto", torch.bfloat16, "a GPU with bf16"),
    ((7, 5), "auto", torch.float16, "a GPU without bf16"),
    ((7, 5), "bf16", torch.bfloat16, "--amp bf16"),
    ((9, 0), "off", None, "--amp off"),
])
def test_gpu_precision_is_bf16_only_where_it_is_native(capability, amp, expected, why, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(bts, "cpu_has_native_bf16", lambda: pytest.fail("a GPU's precision asked the CPU"))
    assert bts.precision(amp, torch.device("cuda", 0)) == (expected, why)


def test_native_bf16_means_avx512_bf16_or_amx_not_onednn_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not bts.cpu_has_native_bf16()  # oneDNN's own check says yes on any AVX-512 CPU
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert bts.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert bts.cpu_has_native_bf16()


def test_the_machine_autocasts_to_its_precision_and_names_it():
    for dtype, name in ((torch.bfloat16, "bfloat16"), (None, "float32")):
        machine = bts.Machine(torch.device("cpu"), dtype)
        with machine.autocast():
            y = torch.nn.Linear(4, 4)(torch.rand(2, 4))
        assert y.dtype == (dtype or torch.float32) and bts.precision_name(machine) == name
    assert bts.precision_name(bts.Machine(torch.device("cpu"), torch.float16)) == "float16"


# -----------------------------------------------------------------------------
# Channels-last: on CUDA and AVX-512 CPUs, where it was measured faster


@pytest.mark.parametrize("capability, native, expected", [
    ("AVX512", True, "precision: bfloat16 (a CPU with native bf16; --amp off for float32); channels-last: True"),
    ("AVX512", False, "precision: float32 (a CPU without native bf16); channels-last: True"),
    ("AVX2", False, "precision: float32 (a CPU without native bf16); channels-last: False"),
    ("AVX2", True, "precision: bfloat16 (a CPU with native bf16; --amp off for float32); channels-last: False"),
])
def test_the_rules_the_benchmark_chose_are_in_effect_on_each_kind_of_cpu(capability, native, expected,
                                                                        monkeypatch, capsys):
    monkeypatch.setattr(bts.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(bts, "cpu_has_native_bf16", lambda: native)
    machine = bts.set_up_machine(bts.Config(device="cpu"))
    assert expected in capsys.readouterr().out
    assert machine.channels_last is (capability == "AVX512")
    assert machine.dtype is (torch.bfloat16 if native else None)
    assert bts.set_up_machine(bts.Config(device="cpu", channels_last=False)).channels_last is False


def test_channels_last_on_cuda_whatever_the_cpu(monkeypatch, capsys):
    fake_cuda(monkeypatch, capability=(8, 0))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # put back after
    monkeypatch.setattr(bts.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    machine = bts.Machine(torch.device("cuda", 0))
    bts.set_up_machine(bts.Config(), machine)
    assert machine.channels_last is True and machine.dtype is torch.bfloat16
    assert torch.backends.cudnn.benchmark is True  # autotuned kernels, unless --deterministic
    assert "device: cuda:0 (Fake GPU); precision: bfloat16 (a GPU with bf16); channels-last: True" in \
        capsys.readouterr().out
    machine = bts.Machine(torch.device("cuda", 0))
    bts.set_up_machine(bts.Config(channels_last=False), machine)
    assert machine.channels_last is False


def test_the_input_follows_the_machines_layout():
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    for channels_last in (True, False):
        x = bts.to_input(images, bts.Machine(torch.device("cpu"), channels_last=channels_last))
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert torch.equal(x, images.float() / 255)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# -----------------------------------------------------------------------------
# torch.compile: when, and the fallback


@pytest.mark.parametrize("compile, device, dtype, capability, expected", [
    ("on", "cpu", None, None, True),
    ("off", "cuda", torch.bfloat16, (9, 0), False),
    ("auto", "cuda", torch.bfloat16, (7, 0), True),
    ("auto", "cuda", torch.float16, (6, 1), False),  # Triton needs compute capability 7.0
    ("auto", "cpu", torch.bfloat16, None, False),  # a CPU compiles only with --compile on
    ("auto", "cpu", None, None, False),
])
def test_use_compile_rule(compile, device, dtype, capability, expected, monkeypatch):
    if capability:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    machine = bts.Machine(torch.device(device, 0) if device == "cuda" else torch.device("cpu"), dtype)
    assert bts.use_compile(bts.Config(compile=compile), machine) is expected


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


def no_triton():
    raise RuntimeError("Cannot find a working triton installation")


def a_model_and_batch():
    torch.manual_seed(0)
    model = bts.UNet(width=4)
    x = torch.rand(4, 1, 32, 32)
    return model, x, (x > 0.5).float(), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("works", [True, False])
def test_compiled_if_it_works_compiles_now_and_puts_back_what_the_first_step_touched(works, monkeypatch, capsys):
    modes = []

    def fake_compile(model, mode=None):
        modes.append(mode)
        return FakeCompiled(model, lambda: None, fail_in_backward=None if works else no_triton)

    monkeypatch.setattr(bts.torch, "compile", fake_compile)
    monkeypatch.setattr(bts, "RUN_WARNINGS", [])
    model, x, y, before = a_model_and_batch()
    got = bts.compiled_if_it_works(model, bts.Config(compile_mode="max-autotune"), bts.Machine(torch.device("cpu")),
                                   x, y)
    out, err = capsys.readouterr()
    assert modes == ["max-autotune"]
    assert isinstance(got, FakeCompiled) is works and (got is model) is not works
    after = model.state_dict()  # batch-norm statistics as before the first step
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    if works:
        assert "torch.compile (max-autotune): compiled and warmed up" in out and not err
    else:
        assert "torch.compile (max-autotune): not used" in out
        assert "warning: the first compiled step failed (RuntimeError: Cannot find a working triton" in err
        assert "--compile off" in err and "--compile off" in bts.RUN_WARNINGS[0]


def test_out_of_memory_while_compiling_is_not_taken_for_a_compiler_failure(monkeypatch):
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bts.torch, "compile", lambda model, mode=None: FakeCompiled(model, oom))
    model, x, y, _ = a_model_and_batch()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        bts.compiled_if_it_works(model, bts.Config(), bts.Machine(torch.device("cpu")), x, y)


@pytest.mark.slow
def test_a_run_whose_compile_fails_trains_without_it_and_records_why(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bts.torch, "compile",
                        lambda model, mode=None: FakeCompiled(model, lambda: None, fail_in_backward=no_triton))
    out = tmp_path / "run"
    rc, printed, err = run_cli(capsys, "--data-dir", data, "--out-dir", out, *TINY_ARGS, "--compile", "on")
    assert rc == 0 and "first compiled step failed" in err and "torch.compile (default): not used" in printed, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert "first compiled step failed" in metrics["warning"] and metrics["compile_seconds"] == 0.0


@pytest.mark.slow
def test_an_error_after_compile_worked_is_not_hidden(data, tmp_path, monkeypatch):
    calls = []

    def fail_at_step_2():
        calls.append(1)
        if len(calls) == 3:  # the warm-up, step 1, step 2
            raise RuntimeError("a real bug in step 2")

    monkeypatch.setattr(bts.torch, "compile", lambda model, mode=None: FakeCompiled(model, fail_at_step_2))
    with pytest.raises(RuntimeError, match="a real bug in step 2"):
        bts.main(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *TINY, "--compile", "on"])
    assert not (tmp_path / "run").exists()  # stopped before its first checkpoint


# -----------------------------------------------------------------------------
# Out of memory


@pytest.mark.parametrize("error, expected", [
    (MemoryError(), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 1073741824 bytes"), True),
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("can't allocate memory"), False),
])
def test_is_out_of_memory(error, expected):
    assert bts.is_out_of_memory(error) is expected


def cuda_oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def cpu_oom():
    return RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes")


def out_of_memory_at(monkeypatch, training_call: int = 0, evaluating: bool = False, error=cuda_oom):
    """UNet.forward runs out of memory (a new `error()`, as torch raises a new one each time) at its
    training_call-th training call, or when evaluating."""
    real, calls = bts.UNet.forward, [0]

    def forward(self, x):
        if self.training:
            calls[0] += 1
            if calls[0] == training_call:
                raise error()
        elif evaluating:
            raise error()
        return real(self, x)

    monkeypatch.setattr(bts.UNet, "forward", forward)


@pytest.mark.slow
@pytest.mark.parametrize("error", [cuda_oom, cpu_oom], ids=["cuda", "cpu"])
def test_out_of_memory_in_training_names_half_the_batch_size(error, data, tmp_path, monkeypatch, capsys):
    out_of_memory_at(monkeypatch, training_call=1, error=error)
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", tmp_path / "run", *TINY_ARGS)
    message = one_error(rc, err, "out of memory (", "Try --batch-size 4, or close other programs")
    assert "resumed" not in message and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def stopped_by_memory(data, tmp_path_factory):
    """A run of batches of 8 that ran out of memory in epoch 2, step 1 (epoch 1 saved)."""
    out = tmp_path_factory.mktemp("memory") / "run"
    with pytest.MonkeyPatch.context() as mp:
        out_of_memory_at(mp, training_call=2)
        assert bts.main(["--data-dir", str(data), "--out-dir", str(out), *TINY_ARGS, "--epochs", "2"]) == 1
    assert bts.load_checkpoint(out / "last.pth", resumable=True)["epoch"] == 1
    return out


@pytest.mark.slow
def test_out_of_memory_in_a_resumed_run_says_its_batch_size_cannot_change(stopped_by_memory, monkeypatch, capsys):
    out_of_memory_at(monkeypatch, training_call=1)
    rc, _, err = run_cli(capsys, "--resume", stopped_by_memory)
    one_error(rc, err, "out of memory (", "Try a new run with a smaller --batch-size (a resumed run keeps its batch "
                                          "size)")


@pytest.mark.slow
def test_out_of_memory_in_evaluation_names_the_eval_batch_size(data, tmp_path, monkeypatch, capsys):
    out_of_memory_at(monkeypatch, evaluating=True)
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", tmp_path / "run", *TINY_ARGS)
    one_error(rc, err, "out of memory at --eval-batch-size 64: try 32")
    assert "--batch-size 4" not in err


# -----------------------------------------------------------------------------
# torchrun's variables: no distributed training any more, and no process that stays silent


@pytest.mark.slow
@pytest.mark.subprocess
def test_torchrun_variables_in_the_environment_change_nothing(torchrun_environment_run):
    proc, out = torchrun_environment_run  # started with the module
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("a run with RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 set did not end (waiting for other processes?)")
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "test (1 images, 1 patients): Dice" in stdout  # rank 1 prints: there are no ranks
    assert stdout.strip().splitlines()[-1] == f"run folder: {out}"
    assert "model: U-Net" in stdout and "device: cpu" in stdout
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "split.json", "train.log", "history.csv", "model.pth", "last.pth", "metrics.json",
            "test_per_image.csv", "visualizations/loss_curves.png"} <= written
    assert json.loads((out / "metrics.json").read_text())["history"]["epoch"] == [1]


@pytest.mark.parametrize("capability, arch_list, refused", [((7, 0), ["sm_75", "sm_80", "sm_90"], True),
                                                            ((6, 1), ["sm_75"], True),
                                                            ((7, 5), ["sm_75", "sm_80"], False),
                                                            ((12, 0), ["sm_75", "sm_90"], False),
                                                            ((7, 0), ["sm_90a", "sm_100a", "compute_90"], True)])
def test_a_gpu_older_than_the_pytorch_build_is_refused_when_picked(capability, arch_list, refused, monkeypatch):
    """A V100 under a build from sm_75 on fails at its first kernel: say so, in one sentence, first."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    if refused:
        with pytest.raises(bts.UserError, match=r"Tesla V100 \(compute capability .*older than every GPU"):
            bts.pick_device("cuda")
    else:
        assert bts.pick_device("cuda") == torch.device("cuda", 0)
