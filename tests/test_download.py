"""Getting the data: the Kaggle dataset through the real kagglehub as installed from requirements.txt,
with only the network replaced (tests/kaggle_fake.py answers at requests' HTTP adapter; no test here
needs or uses the network), and --demo's synthetic slices, generated into the run's own folder."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# kagglehub binds its console log to sys.stdout when first imported: imported here, at collection, that
# is the session's stdout, not the captured stream of one test, which is closed after that test.
import kagglehub  # noqa: F401
import pytest

import brain_tumor_segmentation as bts
import kaggle_fake
from conftest import TINY_ARGS, one_error, run_cli, run_folders, snapshot

TINY = [*TINY_ARGS, "--image-size", "16"]
DATA = Path(bts.DEFAULT_DATA_DIR)


# The dataset's 3,064 pairs, in a test: 40. Writing 6,128 files takes this machine from one to ten seconds,
# depending on the other test runs, and the check is the same: exactly the pairs 1..KAGGLE_PAIRS.
PAIRS = 40


@pytest.fixture(autouse=True)
def private_temp(tmp_path, monkeypatch):
    """The download's and the demo's lock go to the temporary folder: a folder of the test's own here."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(bts.tempfile, "tempdir", str(tmp_path / "tmp"))


@pytest.fixture(scope="module")
def kaggle_zip(tmp_path_factory):
    """The dataset as Kaggle serves it: pairs 1..PAIRS (tiny 16x16 slices here)."""
    path = tmp_path_factory.mktemp("kaggle") / "brain-tumor-segmentation.zip"
    kaggle_fake.write_dataset_zip(path, range(1, PAIRS + 1))
    return path


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user in a fresh working folder: no Kaggle settings, HOME of their own, temporary files in a
    folder of their own (the download lock goes there)."""
    work, home, temp = tmp_path / "work", tmp_path / "home", tmp_path / "tmp"
    for folder in (work, home):
        folder.mkdir()
    for key in [k for k in os.environ if k.startswith("KAGGLE")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(home / "kagglehub-cache"))
    monkeypatch.chdir(work)
    monkeypatch.setattr(bts, "KAGGLE_PAIRS", PAIRS)
    return {"work": work, "home": home, "temp": temp, "log": tmp_path / "requests.log"}


def fake(monkeypatch, user, zip_path=None, hub="ok") -> None:
    kaggle_fake.install({"zip": str(zip_path), "hub": hub, "log": str(user["log"])}, monkeypatch.setattr)


def requests_made(user) -> list[str]:
    return user["log"].read_text().splitlines() if user["log"].exists() else []


def ours(temp: Path) -> list[str]:
    """The temporary folder's entries, but the cache folder torch makes there when it first imports
    torch._dynamo (torch's, not this script's)."""
    return [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")]


def the_error(rc: int, err: str, *fragments: str) -> str:
    """A refusal whose sentence goes on with a list of ways forward: exit code 1, no traceback, one
    'error: ' line that starts it, holding every fragment."""
    assert rc == 1 and "Traceback" not in err, err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    message = err[err.index("error: "):]
    for fragment in fragments:
        assert fragment in message, (fragment, err)
    return message


# -----------------------------------------------------------------------------
# The Kaggle dataset, with kagglehub


@pytest.mark.slow
def test_the_first_run_downloads_without_an_account_and_a_later_run_reuses_it(user, kaggle_zip, monkeypatch, capsys):
    fake(monkeypatch, user, kaggle_zip)
    seen = []
    real_fetch = bts.fetch_with_kagglehub

    def watched(folder):  # the data folder appears only once the download is whole and checked
        real_fetch(folder)
        seen.append((DATA.exists(), sorted(p.name.split("-")[0] for p in DATA.parent.iterdir())))

    monkeypatch.setattr(bts, "fetch_with_kagglehub", watched)
    rc, out, err = run_cli(capsys, *TINY, "--out-dir", "run1")
    assert rc == 0, err
    assert seen == [(False, [".download"])]
    for part in ("images", "masks"):
        assert sorted(p.stem for p in (DATA / part).iterdir()) == sorted(str(i) for i in range(1, PAIRS + 1))
    assert sorted(p.name for p in user["work"].iterdir()) == ["data", "run1"]
    assert [p.name for p in DATA.parent.iterdir()] == [DATA.name]  # no temporary folder left
    assert not (user["home"] / "kagglehub-cache").exists()  # no second copy in kagglehub's cache
    assert {line.split()[0] for line in requests_made(user)} == {"hub"}
    assert "dataset ready in" in out and (user["work"] / "run1" / "metrics.json").is_file()
    assert len(ours(user["temp"])) == 1 and ours(user["temp"])[0].startswith("brain-tumor-segmentation-")  # the lock

    user["log"].unlink()
    data = snapshot(DATA, inodes=True)
    rc, out, err = run_cli(capsys, *TINY, "--out-dir", "run2")
    assert rc == 0, err
    assert requests_made(user) == [] and "downloading" not in out  # not one request
    assert snapshot(DATA, inodes=True) == data  # nor one file written again


@pytest.mark.parametrize("hub, expected", [
    ("offline", ["no network: Kaggle could not be reached"]),
    ("403", ["refused by Kaggle (HTTP 403)", "kaggle.json", "KAGGLE_USERNAME"]),
    ("500", ["Kaggle answered HTTP 500"]),
])
def test_each_failure_names_its_cause_and_the_ways_forward_and_leaves_no_trace(hub, expected, user, kaggle_zip,
                                                                              monkeypatch, capsys):
    fake(monkeypatch, user, kaggle_zip, hub)
    rc, out, err = run_cli(capsys, *TINY)
    the_error(rc, err, f"the dataset is not at {DATA} and could not be downloaded", *expected, "Ways forward",
              "kagglehub downloads nikhilroxtomar/brain-tumor-segmentation without an account", "--data-dir DIR",
              "--demo")
    assert not (user["work"] / "data").exists()  # nothing half-downloaded left behind, not even the folder
    assert run_folders(user["work"] / "outputs") == []  # and no run folder
    assert {line.split()[0] for line in requests_made(user)} == {"hub"} and len(requests_made(user)) == 1


def test_a_missing_kagglehub_package_is_one_sentence(user, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # what a missing package looks like to `import`
    rc, _, err = run_cli(capsys, *TINY)
    the_error(rc, err, "the Python package kagglehub is missing: install the project's requirements "
                       "(pip install -r requirements.txt)")
    assert not (user["work"] / "data").exists() and requests_made(user) == []


@pytest.mark.parametrize("names", [range(1, PAIRS), [*range(1, PAIRS), "extra"]], ids=["partial", "changed"])
def test_a_partial_or_changed_download_is_refused_and_not_moved_into_place(names, user, monkeypatch, capsys):
    archive = user["home"] / "other.zip"
    kaggle_fake.write_dataset_zip(archive, names)
    fake(monkeypatch, user, archive)
    rc, _, err = run_cli(capsys, *TINY)
    one_error(rc, err, "a partial or changed download, not trained on", "images and", "masks, but")
    assert not (user["work"] / "data").exists() and run_folders(user["work"] / "outputs") == []


def test_a_changed_copy_in_the_default_folder_is_reported_not_trained_on(user, monkeypatch, capsys):
    fake(monkeypatch, user, hub="offline")  # nothing may be fetched either
    for part in ("images", "masks"):
        (DATA / part).mkdir(parents=True, exist_ok=True)
        for i in range(1, 4):
            (DATA / part / f"{i}.png").write_bytes(b"")
    before = snapshot(user["work"])
    rc, _, err = run_cli(capsys, *TINY, "--out-dir", "run")
    one_error(rc, err, "3 images and 3 masks", "partial or changed download", f"Delete {DATA}")
    assert snapshot(user["work"]) == before and requests_made(user) == []


# -----------------------------------------------------------------------------
# --demo's synthetic slices, generated into the run's own folder


@pytest.mark.slow
def test_the_demo_writes_its_slices_into_its_own_run_folder_and_a_resume_reuses_them(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc, out, err = run_cli(capsys, "--demo", "--demo-images", "12", *TINY_ARGS)
    assert rc == 0, err
    assert sorted(p.name for p in work.iterdir()) == ["outputs"] and ours(tmp_path / "tmp") == []  # nothing else
    [run] = run_folders(work / "outputs")
    demo = run / "demo-data"
    for part in ("images", "masks"):
        assert sorted(p.name for p in (demo / part).iterdir()) == sorted(f"{i}.png" for i in range(1, 13))
    assert f"generating 12 synthetic slices in {Path('outputs') / run.name / 'demo-data'}" in out
    assert bts.load_dataset(demo, 32, workers=1)["hashes"] == bts.load_dataset(
        bts.make_synthetic_dataset(tmp_path / "again", 12, seed=42), 32, workers=1)["hashes"]  # the same every run
    before = snapshot(demo, inodes=True)
    monkeypatch.chdir(tmp_path)  # from another folder: the saved data folder is absolute
    rc, out, err = run_cli(capsys, "--resume", run, "--epochs", "2")
    assert rc == 0, err
    assert "generating" not in out and snapshot(demo, inodes=True) == before  # not one file written again


def test_demo_with_a_data_dir_is_refused_before_anything_is_made(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--demo", "--data-dir", tmp_path / "mine", "--out-dir", tmp_path / "run", *TINY_ARGS)
    one_error(rc, err, "--demo generates its slices into the run's folder: drop --data-dir")
    assert sorted(os.listdir(tmp_path)) == ["tmp"]


@pytest.mark.parametrize("users_file", [False, True], ids=["alone", "with-a-users-file"])
def test_a_demo_stopped_while_it_generates_leaves_no_folder_but_a_users_file(users_file, tmp_path, capsys,
                                                                                monkeypatch):
    real = bts.make_synthetic_dataset

    def interrupted(folder, n, **kwargs):
        real(folder, 5, **kwargs)  # the first five pairs, then Ctrl-C
        if users_file:
            (folder / "images" / "mine.txt").write_text("put here meanwhile")
        raise KeyboardInterrupt

    monkeypatch.setattr(bts, "make_synthetic_dataset", interrupted)
    rc, _, err = run_cli(capsys, "--demo", "--demo-images", "12", "--out-dir", tmp_path / "a", *TINY_ARGS)
    assert rc == 130 and "aborted" in err, err
    if users_file:
        left = [str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*") if p.is_file()]
        assert left == ["demo-data/images/mine.txt"]  # the run's own files went, the user's stayed
    else:
        assert sorted(os.listdir(tmp_path)) == ["tmp"]
