"""Config: every field's type and bounds (typed on the command line or edited at the top of the file),
the --demo and --recipe seed presets, flags that another flag would ignore, the 1-based --fold, and
--help. Refusals are one sentence naming the field, and nothing is created anywhere."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import brain_tumor_segmentation as bts
from conftest import SCRIPT, TINY_ARGS, make_dataset, one_error, run_cli, run_folders, snapshot


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("config") / "data", n=12)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder: a refused command must leave it empty (no outputs/, no run folder)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def edited_copy(tmp_path, monkeypatch, *edits: tuple[str, str], name: str = "edited_bts"):
    """A copy of the script with `edits` (old, new) made at the top, imported in this process under
    its own module name (the import is what running it does first; a fresh Python would take
    seconds)."""
    source = SCRIPT.read_text()
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # check_fields and get_type_hints look the module up
    spec.loader.exec_module(module)
    return module


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(bts.Config)]


# -----------------------------------------------------------------------------
# Defaults, the command line and the typed fields


def test_the_default_recipe_is_the_dataclass_itself():
    defaults = bts.Config()
    assert defaults.recipe == "improved" and bts.config_from_args([]) == (defaults, frozenset())
    assert bts.config_from_args(["--recipe", "improved"])[0] == defaults
    assert any(getattr(defaults, k) != v for k, v in bts.SEED_RECIPE.items())
    assert (defaults.image_size, defaults.epochs, defaults.lr, defaults.fold, defaults.folds) == (256, 20, 2e-3, 0, 0)


def test_command_line_values_are_typed_and_named():
    cfg, typed = bts.config_from_args(["--epochs", "5", "--batch-size", "8", "--lr", "1", "--no-augment",
                                       "--split", "random"])
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.augment, cfg.split) == (5, 8, 1.0, False, "random")
    assert type(cfg.lr) is float and (cfg.image_size, cfg.device) == (256, "auto")
    assert typed == {"epochs", "batch_size", "lr", "augment", "split"}
    # a value typed equal to the default is still typed (a resumed run is told it was given)
    assert bts.config_from_args(["--epochs", "20"])[1] == {"epochs"}


def test_an_int_where_a_float_is_annotated_is_a_valid_float():
    cfg = bts.Config(lr=1, threshold=0)
    assert cfg.lr == 1.0 and type(cfg.lr) is float and type(cfg.threshold) is float


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": "5"}, "--epochs '5': must be int, not str"),
    ({"epochs": 5.0}, "--epochs 5.0: must be int, not float"),
    ({"augment": 1}, "--augment 1: must be bool, not int"),
    ({"epochs": True}, "--epochs True: must be int, not bool"),
    ({"lr": "0.1"}, "--lr '0.1': must be float, not str"),
    ({"split": "by-patient"}, "--split 'by-patient': choose one of patient, random"),
])
def test_a_value_of_the_wrong_type_in_code_is_one_sentence_naming_the_field(kwargs, message):
    with pytest.raises(bts.UserError) as info:
        bts.Config(**kwargs)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_the_settings_line_names_only_what_differs_from_the_defaults(capsys):
    machine = bts.Machine(torch.device("cpu"))
    bts.set_up_machine(bts.Config(device="cpu", amp="off", epochs=3, lr=0.001), machine)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("settings:"))
    assert line == "settings: epochs=3, lr=0.001, device='cpu', amp='off' (all of them in config.json)"
    bts.set_up_machine(bts.Config(), machine)
    assert "settings: the defaults (all of them in config.json)" in capsys.readouterr().out


def test_help_lists_every_config_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        bts.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in field_names():
        assert bts.option(name) in text, name
    assert "default: 256" in text and "default: 16" in text and "default: 0.002" in text
    assert "default: 'improved'" in text and "{patient,random}" in text and "--no-augment" in text
    assert "1 to K" in text  # --fold is 1-based


@pytest.mark.parametrize("args, fragment", [
    (["--overwrite"], "unrecognized arguments: --overwrite"),  # gone: every run has a folder of its own
    (["--resume"], "expected one argument"),                  # no bare --resume: it takes the run folder
    (["--epochs", "abc"], "--epochs"),
])
def test_flags_the_parser_cannot_read_exit_with_its_usage(args, fragment, capsys, workdir):
    with pytest.raises(SystemExit) as info:
        bts.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert snapshot(workdir) == {}


# -----------------------------------------------------------------------------
# Bounds: refused before anything runs, nothing created


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "--lr nan: must be a finite number"), (["--lr", "inf"], "finite"),
    (["--lr", "-1"], "--lr -1.0: must be above 0"), (["--lr", "0"], "above 0"),
    (["--image-size", "16", "--batch-size", "1"], "batch norm"), (["--image-size", "100"], "multiple of 16"),
    (["--image-size", "99999984"], "--image-size 99999984: must be at most 4096"),
    (["--folds", "-3"], "--folds -3"), (["--folds", "2"], "--folds 2"), (["--folds", "1"], "--folds 1"),
    (["--threshold", "2"], "--threshold 2.0: must be between 0 and 1"), (["--aug-flip", "-1"], "between 0 and 1"),
    (["--nan-check-every", "0"], "--nan-check-every 0: must be at least 1"),
    (["--weight-decay", "-1"], "at least 0"), (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--val-fraction", "1.5"], "sum to less than 1"), (["--val-fraction", "0"], "--val-fraction 0.0: must be above 0"),
    (["--val-fraction", "0.6", "--test-fraction", "0.5"], "sum to less than 1"),
    (["--seed", "-1"], "--seed -1: must be at least 0"),
    (["--seed", str(2 ** 31)], "--seed 2147483648: must be at most 2147483647"),
    (["--seed", "99999999999999999999"], "--seed"), (["--split-seed", "-2"], "--split-seed -2"),
    (["--aug-scale", "1000"], "--aug-scale 1000.0: must be at most 1"), (["--aug-rotation", "181"], "at most 180"),
    (["--threshold-min", "0.9", "--threshold-max", "0.1"], "--threshold-min must not be above --threshold-max"),
    (["--threshold-step", "1e-300"], "--threshold-step"),
    (["--demo-images", "5"], "--demo-images 5: must be at least 10"),
    (["--base-width", "0"], "--base-width 0"), (["--limit", "-1"], "--limit -1"), (["--workers", "-1"], "--workers -1"),
    (["--loss", "focal"], "--loss 'focal': choose one of dice"), (["--optimizer", "sgd"], "choose one of adam, adamw"),
    (["--amp", "fp8"], "--amp 'fp8': choose one of"), (["--compile-mode", "fast"], "--compile-mode"),
])
def test_a_setting_out_of_range_is_one_sentence_and_creates_nothing(args, message, data, workdir, capsys):
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", workdir / "o", *TINY_ARGS, *args)
    one_error(rc, err, message)
    assert snapshot(workdir) == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has a device to name")
def test_a_device_that_is_not_there_is_refused_and_its_run_folder_removed(data, workdir, capsys):
    before = snapshot(data)
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", workdir / "o", *TINY_ARGS, "--device", "cuda:7")
    one_error(rc, err, "--device cuda:7: CUDA is not available")
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", workdir / "p", *TINY_ARGS, "--device", "tpu")
    one_error(rc, err, "--device 'tpu'")
    assert snapshot(workdir) == {} and snapshot(data) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has a device to name")
def test_a_refused_run_without_out_dir_leaves_no_outputs_folder(data, workdir, capsys):
    rc, _, err = run_cli(capsys, "--data-dir", data, *TINY_ARGS, "--device", "cuda:7")
    one_error(rc, err, "--device cuda:7")
    assert snapshot(workdir) == {}


# -----------------------------------------------------------------------------
# Presets: --demo and --recipe seed fill in what was not typed


def test_recipe_seed_sets_its_fields_and_typed_ones_win():
    seed, typed = bts.config_from_args(["--recipe", "seed", "--epochs", "3"])
    assert {k: getattr(seed, k) for k in bts.SEED_RECIPE} == bts.SEED_RECIPE
    assert seed.threshold == 0.5 and seed.epochs == 3 and typed == {"recipe", "epochs"}
    mixed, _ = bts.config_from_args(["--recipe", "seed", "--lr", "3e-4", "--augment"])
    assert mixed.lr == 3e-4 and mixed.augment and mixed.loss == "dice" and mixed.optimizer == "adam"
    improved, _ = bts.config_from_args(["--recipe", "improved", "--lr", "5e-4"])
    assert improved.loss == "dice+bce" and improved.augment and improved.lr == 5e-4 and improved.tta


def test_demo_sets_its_fields_and_typed_ones_win():
    demo, typed = bts.config_from_args(["--demo"])
    assert {k: getattr(demo, k) for k in bts.DEMO_DEFAULTS} == bts.DEMO_DEFAULTS and typed == {"demo"}
    sized, _ = bts.config_from_args(["--demo", "--image-size", "96"])
    assert sized.image_size == 96 and sized.base_width == bts.DEMO_DEFAULTS["base_width"]
    both, _ = bts.config_from_args(["--demo", "--recipe", "seed", "--epochs", "2"])
    assert both.optimizer == "adam" and both.image_size == bts.DEMO_DEFAULTS["image_size"] and both.epochs == 2
    assert bts.config_from_args(["--no-demo"])[0].image_size == 256  # --no-demo: no preset
    assert bts.Config().image_size == 256 and bts.Config().optimizer == "adamw"  # the presets changed no default


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    """A finished --demo --recipe seed run with a few typed fields, from a working folder, into the default
    outputs/ folder, with a groups file named by a relative path."""
    work = tmp_path_factory.mktemp("preset")
    (work / "groups.csv").write_text("image,patient_id\n" + "".join(f"{i},p{i}\n" for i in range(1, 13)))
    args = ["--demo", "--demo-images", "12", "--recipe", "seed", "--lr", "3e-4",
            "--groups", "groups.csv", *[a for a in TINY_ARGS if a not in ("--batch-size", "8")]]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        rc = bts.main(args)
    assert rc == 0
    folders = run_folders(work / "outputs")
    assert len(folders) == 1
    return folders[0]


@pytest.mark.slow
def test_a_preset_run_records_the_presets_and_the_typed_fields(preset_run):
    config = json.loads((preset_run / "config.json").read_text())
    assert set(config) == set(field_names())
    assert config["demo"] is True and config["batch_size"] == bts.DEMO_DEFAULTS["batch_size"]  # from --demo
    assert (config["image_size"], config["base_width"], config["epochs"]) == (32, 4, 1)  # typed: they win
    assert config["optimizer"] == "adam" and config["augment"] is False and config["tta"] is False  # recipe seed
    assert config["lr"] == 3e-4  # typed: it wins over the recipe's
    assert preset_run.name.endswith("-demo-seed42")  # the default folder names what was trained
    log = (preset_run / "train.log").read_text()
    groups = preset_run.parents[1] / "groups.csv"  # typed relative, saved absolute
    assert f"settings: demo=True, demo_images=12, image_size=32, groups='{groups}', base_width=4, recipe='seed'" in log
    assert bts.Config(**config).lr == 3e-4  # the record is a valid Config


@pytest.mark.slow
def test_config_json_holds_absolute_paths(preset_run):
    config = json.loads((preset_run / "config.json").read_text())
    assert Path(config["data_dir"]).is_absolute() and Path(config["data_dir"]) == preset_run / "demo-data"
    assert Path(config["groups"]).is_absolute() and Path(config["groups"]) == preset_run.parents[1] / "groups.csv"
    assert Path(config["out_dir"]).is_absolute() and Path(config["out_dir"]) == preset_run


# -----------------------------------------------------------------------------
# Flags another flag would ignore are refused, not ignored


@pytest.mark.parametrize("args, message", [
    (["--split", "random", "--groups", "groups.csv"], "which --split random would ignore"),
    (["--groups", "groups.csv", "--split", "random"], "drop one of them"),
    (["--folds", "3", "--test-fraction", "0.2"], "--val-fraction and --test-fraction size the single split"),
    (["--folds", "3", "--val-fraction", "0.3"], "with --folds K, test and validation are a K-th"),
    (["--val-fraction", "0.1", "--folds", "5", "--fold", "2"], "drop them"),
    (["--fold", "1"], "--fold 1: must be 0 (all folds) or from 1 to --folds, with --folds"),
])
def test_a_flag_that_would_be_ignored_is_refused(args, message, data, workdir, capsys):
    (workdir.parent / "groups.csv").write_text("image,patient_id\n1,p1\n")
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", workdir / "o", *TINY_ARGS,
                         *[workdir.parent / a if a == "groups.csv" else a for a in args])
    one_error(rc, err, message)
    assert snapshot(workdir) == {}


def test_the_flags_refused_together_are_accepted_alone():
    assert bts.config_from_args(["--split", "random"])[0].groups == ""
    assert bts.config_from_args(["--groups", "g.csv"])[0].split == "patient"
    assert bts.config_from_args(["--folds", "0", "--test-fraction", "0.2"])[0].test_fraction == 0.2
    cv = bts.config_from_args(["--folds", "5"])[0]  # the fractions' defaults are not typed: no refusal
    assert (cv.folds, cv.val_fraction, cv.test_fraction) == (5, 0.2, 0.1)


# -----------------------------------------------------------------------------
# --fold: 1-based, 0 = all folds


@pytest.mark.parametrize("folds, fold", [(3, 0), (3, 1), (3, 3), (5, 5), (10, 7)])
def test_fold_takes_1_to_k_and_0_for_all(folds, fold):
    cfg, _ = bts.config_from_args(["--folds", str(folds), "--fold", str(fold)])
    assert (cfg.folds, cfg.fold) == (folds, fold)


@pytest.mark.parametrize("args, message", [
    (["--folds", "3", "--fold", "4"], "--fold 4: must be 0 (all folds) or from 1 to --folds"),
    (["--folds", "3", "--fold", "5"], "--fold 5"),
    (["--folds", "3", "--fold", "-1"], "--fold -1: must be at least 0"),
])
def test_a_fold_outside_1_to_k_is_refused_and_creates_nothing(args, message, data, workdir, capsys):
    rc, _, err = run_cli(capsys, "--data-dir", data, "--out-dir", workdir / "cv", *TINY_ARGS, "--split", "random",
                         *args)
    one_error(rc, err, message)
    assert snapshot(workdir) == {}


@pytest.mark.slow
def test_fold_k_trains_only_the_folder_fold_k_whose_test_part_is_the_kth(data, tmp_path, capsys):
    import cross_validate
    root = tmp_path / "cv"
    capsys.readouterr()
    rc = cross_validate.main([str(a) for a in ("--data-dir", data, "--out-dir", root, *TINY_ARGS, "--split", "random",
                                               "--folds", "3", "--fold", "3")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["fold_3"]
    assert not (root / "cv_summary.json").exists() and "1 of 3 folds finished" in out
    config = json.loads((root / "fold_3" / "config.json").read_text())
    split = json.loads((root / "fold_3" / "split.json").read_text())
    assert (config["folds"], config["fold"]) == (3, 3) and "fold 3 of 3 is the test part" in split["how"]
    record = json.loads((root / bts.CV_RECORD).read_text())
    assert record["folds"] == 3
    names = [str(i) for i in range(1, 13)]
    fold = bts.group_folds(names, [""] * 12, 3, bts.Config().split_seed)  # fold index 2 is the third fold
    assert set(split["test"]) == {n for n, f in zip(names, fold) if f == 2}
    assert set(split["val"]) == {n for n, f in zip(names, fold) if f == 0}  # the next fold, wrapping round


# -----------------------------------------------------------------------------
# Defaults edited at the top of the file


HINT = "(edited at the top of edited_bts.py?)"
WRONG_EDITS = [
    ('epochs: int = setting(20,', 'epochs: int = setting("20",', f"--epochs '20': must be int, not str {HINT}"),
    ('batch_size: int = setting(16,', 'batch_size: int = setting(16.0,',
     f"--batch-size 16.0: must be int, not float {HINT}"),
    ('augment: bool = setting(True,', 'augment: bool = setting("False",',
     f"--augment 'False': must be bool, not str {HINT}"),
    ('lr: float = setting(2e-3,', 'lr: float = setting("2e-3",', f"--lr '2e-3': must be float, not str {HINT}"),
    ('epochs: int = setting(20,', 'epochs: int = setting(0,', "--epochs 0: must be at least 1"),
    ('optimizer: Literal["adam", "adamw"] = setting("adamw",', 'optimizer: Literal["adam", "adamw"] = setting("sgd",',
     "--optimizer 'sgd': choose one of adam, adamw"),
    ('low=16, high=4096)', 'low=16, high="4096")',
     "the bounds of image_size must be numbers, not {"),
    ('SEED_RECIPE = dict(optimizer="adam", lr=1e-3,', 'SEED_RECIPE = dict(optimizer="adam", learning_rate=1e-3,',
     f"SEED_RECIPE sets learning_rate, which is not a field of Config {HINT}"),
    ('DEMO_DEFAULTS = dict(image_size=48,', 'DEMO_DEFAULTS = dict(img_size=48,',
     f"DEMO_DEFAULTS sets img_size, which is not a field of Config {HINT}"),
]


@pytest.mark.parametrize("old, new, message", WRONG_EDITS, ids=[m.split(":")[0] for *_, m in WRONG_EDITS])
def test_a_default_edited_to_the_wrong_type_or_a_bad_bound_is_one_sentence(old, new, message, data, tmp_path,
                                                                          workdir, monkeypatch, capsys):
    edited = edited_copy(tmp_path, monkeypatch, (old, new))
    capsys.readouterr()
    rc = edited.main(["--data-dir", str(data), "--out-dir", str(workdir / "o")])
    text = one_error(rc, capsys.readouterr().err, message)
    assert snapshot(workdir) == {}
    if "bounds" in message:  # the rules are shown whole, then where they were edited
        assert "'high': '4096'" in text and text.endswith(HINT)


@pytest.mark.subprocess
def test_a_copy_of_the_script_with_a_wrong_default_says_so_when_run(data, tmp_path):
    """The user's own path: edit the file, run it."""
    copy = tmp_path / "edited.py"
    copy.write_text(SCRIPT.read_text().replace('epochs: int = setting(20,', 'epochs: int = setting("20",'))
    result = subprocess.run([sys.executable, str(copy), "--data-dir", str(data), "--out-dir", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip() == ("error: --epochs '20': must be int, not str (edited at the top of edited.py?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.py"]


EDITED_DEFAULTS = {"lr": ("2e-3", "7e-4"), "epochs": ("20", "2"), "augment": ("True", "False"),
                   "image_size": ("256", "32"), "base_width": ("32", "4"), "aug_rotation": ("15.0", "5.0"),
                   "warmup_fraction": ("0.3", "0.5"), "threshold_step": ("0.05", "0.1")}


def edited_defaults():
    source, edits = SCRIPT.read_text(), []
    for name, (old, new) in EDITED_DEFAULTS.items():
        line = next(l for l in source.splitlines() if l.lstrip().startswith(f"{name}: "))
        assert f"setting({old}," in line, line
        edits.append((line, line.replace(f"setting({old},", f"setting({new},")))
    return edits


def test_defaults_edited_at_the_top_are_the_runs_defaults(tmp_path, monkeypatch, capsys):
    """The user's way to change a constant for every run: edit its default in Config. A run's settings come
    from config_from_args, and its log calls them the defaults."""
    edited = edited_copy(tmp_path, monkeypatch, *edited_defaults())
    cfg, typed = edited.config_from_args([])
    assert typed == frozenset() and cfg == edited.Config()
    for name, (_, new) in EDITED_DEFAULTS.items():
        assert getattr(cfg, name) == eval(new) and type(getattr(cfg, name)) is type(eval(new)), name
    seed, _ = edited.config_from_args(["--recipe", "seed"])
    assert seed.lr == bts.SEED_RECIPE["lr"] and seed.epochs == 2  # the preset still sets its own fields only
    edited.set_up_machine(cfg, edited.Machine(torch.device("cpu")))
    assert "settings: the defaults" in capsys.readouterr().out


def test_a_field_added_at_the_top_is_a_checked_flag(tmp_path, monkeypatch):
    """The README's way to add a setting: one line in Config; the command line and the checks follow."""
    edited = edited_copy(tmp_path, monkeypatch, (
        '    aug_gamma: float',
        '    aug_noise: float = setting(0.0, "sd of added Gaussian noise", low=0, high=1)\n    aug_gamma: float'))
    cfg, typed = edited.config_from_args(["--aug-noise", "0.05"])
    assert cfg.aug_noise == 0.05 and typed == {"aug_noise"}
    with pytest.raises(edited.UserError, match=r"^--aug-noise 2.0: must be at most 1$"):
        edited.config_from_args(["--aug-noise", "2"])
