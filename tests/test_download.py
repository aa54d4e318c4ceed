"""Getting the Kaggle dataset: the real download clients as installed from requirements.txt, with
only the network replaced (tests/kaggle_fake.py answers at requests' HTTP adapter). No test here
needs or uses the network."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import brain_tumor_segmentation as bts
import kaggle_fake

from conftest import SCRIPT, TINY_ARGS

TESTS = Path(__file__).resolve().parent
TINY = [*TINY_ARGS, "--limit", "40", "--image-size", "16"]


@pytest.fixture(scope="module")
def kaggle_zip(tmp_path_factory):
    """The dataset as Kaggle serves it: 3,064 pairs (tiny 16x16 slices here)."""
    path = tmp_path_factory.mktemp("kaggle") / "brain-tumor-segmentation.zip"
    kaggle_fake.write_dataset_zip(path, range(1, bts.KAGGLE_PAIRS + 1))
    return path


def user_env(home: Path, **fake) -> dict:
    """A user's environment with no Kaggle settings, HOME in `home`, and the fake network if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE", "RANK", "WORLD_SIZE"))}
    env.update(HOME=str(home), KAGGLE_CONFIG_DIR=str(home / ".kaggle"), KAGGLEHUB_CACHE=str(home / "kagglehub-cache"),
               PYTHONPATH=str(TESTS))
    if fake:
        env["FAKE_KAGGLE"] = json.dumps(fake)
    return env


def add_credentials(home: Path) -> None:
    folder = home / ".kaggle"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kaggle.json").write_text('{"username": "someone", "key": "0123456789abcdef"}')
    (folder / "kaggle.json").chmod(0o600)


def run_script(args, home: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import kaggle_fake; kaggle_fake.main()", str(SCRIPT), *args],
                          cwd=home, env=env, capture_output=True, text=True, timeout=300)


def test_both_download_clients_import_in_the_installed_environment(tmp_path):
    add_credentials(tmp_path)  # `import kaggle` logs in at import time; it needs no network for that
    code = "import kagglehub; from kaggle.api.kaggle_api_extended import KaggleApi; print('imported')"
    result = subprocess.run([sys.executable, "-c", code], env=user_env(tmp_path), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_first_run_downloads_without_an_account_trains_and_a_second_run_downloads_nothing(tmp_path, kaggle_zip):
    log = tmp_path / "requests.log"
    env = user_env(tmp_path, zip=str(kaggle_zip), hub="ok", kaggle="403", log=str(log))
    result = run_script([*TINY, "--out-dir", "run1"], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    data = tmp_path / "data" / "brain-tumor-segmentation"
    for part in ("images", "masks"):
        assert sorted(p.stem for p in (data / part).iterdir()) == sorted(str(i) for i in range(1, 3065))
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["brain-tumor-segmentation"]  # no temporary folder left
    assert not (tmp_path / "kagglehub-cache").exists()  # no second copy in kagglehub's cache
    assert {line.split()[0] for line in log.read_text().splitlines()} == {"hub"}
    assert json.loads((tmp_path / "run1" / "metrics.json").read_text())["test"]["images"] > 0

    log.unlink()
    result = run_script([*TINY, "--out-dir", "run2"], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not log.exists()  # not one request


def test_the_kaggle_client_with_credentials_is_the_second_way(tmp_path, kaggle_zip, monkeypatch):
    add_credentials(tmp_path)
    for key, value in user_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    kaggle_fake.install({"zip": str(kaggle_zip), "hub": "403", "kaggle": "ok"}, monkeypatch.setattr)
    dest = tmp_path / "data" / "brain-tumor-segmentation"
    assert bts.download_dataset(dest) == dest
    assert len(list((dest / "masks").iterdir())) == bts.KAGGLE_PAIRS
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_a_run_without_network_names_the_cause_and_the_ways_forward(tmp_path):
    result = run_script(["--epochs", "1"], tmp_path, user_env(tmp_path, hub="offline", kaggle="offline"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "kagglehub: no network" in result.stderr
    for way in ("without an account", "kaggle.json", "--data-dir", "--demo"):
        assert way in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "outputs").exists()  # no trace left


@pytest.mark.parametrize("fake, credentials, blocked, expected", [
    (dict(hub="offline"), False, None, ["kagglehub: no network"]),
    (dict(hub="403"), False, None, ["kagglehub: refused by Kaggle (HTTP 403)", "kaggle: no Kaggle credentials"]),
    (dict(hub="403", kaggle="401"), True, None, ["kaggle: refused by Kaggle (HTTP 401)"]),
    (dict(hub="500"), False, None, ["kagglehub: Kaggle answered HTTP 500"]),
    (dict(), False, "kagglehub", ["kagglehub: the Python package kagglehub is missing", "requirements.txt"]),
])
def test_each_failure_names_its_cause(fake, credentials, blocked, expected, tmp_path, kaggle_zip, monkeypatch, capsys):
    if credentials:
        add_credentials(tmp_path)
    for key, value in user_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    if blocked:
        monkeypatch.setitem(sys.modules, blocked, None)  # what a missing package looks like to `import`
    log = tmp_path / "requests.log"
    kaggle_fake.install({"zip": str(kaggle_zip), "log": str(log), **fake}, monkeypatch.setattr)
    dest = tmp_path / "data" / "brain-tumor-segmentation"
    with pytest.raises(bts.UserError) as error:
        bts.download_dataset(dest)
    for text in expected:
        assert text in str(error.value)
    assert not dest.parent.exists()  # nothing half-downloaded left behind, not even the folder
    if fake.get("hub") == "offline":  # the other way needs the network too: not tried
        assert {line.split()[0] for line in log.read_text().splitlines()} == {"hub"}


@pytest.mark.parametrize("names", [range(1, 3001), [*range(1, 3064), "extra"]], ids=["partial", "changed"])
def test_a_partial_or_changed_download_is_refused_and_not_moved_into_place(names, tmp_path, monkeypatch):
    for key, value in user_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    archive = tmp_path / "other.zip"
    kaggle_fake.write_dataset_zip(archive, names)
    kaggle_fake.install({"zip": str(archive), "hub": "ok"}, monkeypatch.setattr)
    dest = tmp_path / "data" / "brain-tumor-segmentation"
    with pytest.raises(bts.UserError, match="partial or changed download"):
        bts.download_dataset(dest)
    assert not dest.parent.exists()


def test_a_changed_copy_in_the_default_folder_is_reported_not_trained_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for i in range(1, 4):
        (tmp_path / bts.DEFAULT_DATA_DIR / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / bts.DEFAULT_DATA_DIR / "masks").mkdir(parents=True, exist_ok=True)
        (tmp_path / bts.DEFAULT_DATA_DIR / "images" / f"{i}.png").write_bytes(b"")
        (tmp_path / bts.DEFAULT_DATA_DIR / "masks" / f"{i}.png").write_bytes(b"")
    assert bts.main(["--epochs", "1", "--out-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "3 images and 3 masks" in err and "partial or changed" in err
