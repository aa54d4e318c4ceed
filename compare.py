#!/usr/bin/env python3
"""Did my change help? Compare finished runs of brain_tumor_segmentation.py.

    python compare.py outputs/a-seed1 outputs/a-seed2 outputs/b-seed1 outputs/b-seed2
    python compare.py "outputs/*"        # every finished run and cross-validation there

Runs are grouped into settings: runs that differ only in --seed (and in fields that do not change
what a run learns) are one setting, shown as the mean and spread over its seeds; runs on other data
or at another precision are other settings. A run's test Dice is the mean over its test images (a
cross-validation's: over all its folds' test images, each tested once), and its interval resamples
test patients. When all runs were tested on the same images, each setting is compared with the first
by the difference of those means, with a 95% interval that resamples test patients (the same draw
for both settings: paired) and each setting's seeds, so that training noise and test-set noise both
count; "better", "worse" or "cannot tell" follows from it. Runs tested on different images are
compared only by their own intervals. Writes comparison.png, comparison.csv (one row per run) and
differences.csv into a new folder (--out, or comparisons/DATE-TIME).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import hashlib
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import brain_tumor_segmentation as bts  # noqa: E402
from brain_tumor_segmentation import UserError, setting  # noqa: E402


@dataclass
class CompareConfig:
    runs: list[str] = setting([], "output folders of finished runs or cross-validations (a quoted glob works)",
                              positional=True, metavar="RUN_DIR")
    out: str = setting("", "the folder to create for comparison.png, comparison.csv and differences.csv (it must not "
                           "exist); default: a new comparisons/DATE-TIME")

    def __post_init__(self):
        bts.check_fields(self)


def compare(cfg: CompareConfig) -> dict:
    """Read the runs, group them into settings, print and write the comparison."""
    runs = [read_run(folder) for folder in run_folders(cfg.runs)]
    if len(runs) < 2:
        raise UserError(f"{', '.join(cfg.runs)}: give at least two finished runs to compare")
    labels, names = run_labels(runs)
    seen = {}
    for r, name in zip(runs, names):  # one run given twice, or a copy of it, would look like two seeds
        twin = seen.setdefault((name, r["config"]["seed"]), r["folder"])
        if twin is not r["folder"]:
            raise UserError(f"{twin} and {r['folder']} are the same setting with the same seed: one run counted twice "
                            f"would look like two seeds; give each run once")
    settings = group_settings(runs, names)
    differences = paired_differences(settings)
    note = print_table(runs, labels, settings, differences)
    out = bts.new_folder(cfg.out, "comparisons", "compare", "compare")
    try:
        bts.save_csv(out / "comparison.csv", [run_row(r, label) for r, label in zip(runs, labels)])
        bts.save_csv(out / "differences.csv", differences or [{"note": note}])
        plot_comparison(out / "comparison.png", runs, labels, settings, differences)
    except BaseException:
        bts.discard(out, ["comparison.csv", "differences.csv", "comparison.png"])
        raise
    bts.log(f"written: {out / 'comparison.png'}, comparison.csv, differences.csv")
    return {"runs": runs, "settings": settings, "differences": differences}


def run_folders(patterns: list[str]) -> list[Path]:
    """The folders named; a glob (quoted, so the shell left it) takes the finished runs and
    cross-validations it matches, and skips everything else with a warning naming it."""
    folders = []
    for pattern in patterns:
        if not glob.has_magic(pattern):
            folders.append(Path(pattern))
            continue
        for path in map(Path, sorted(glob.glob(pattern))):
            kind = kind_of(path)
            if kind in ("run", "cross-validation"):
                folders.append(path)
            else:
                bts.warn(f"{path}: skipped, {kind or 'not a run folder'}")
    return folders


def kind_of(folder: Path) -> str | None:
    """What a folder holds: a finished "run", a "cross-validation", an unfinished run, or None."""
    if (folder / bts.CV_RECORD).is_file():
        with contextlib.suppress(UserError):
            k = read_json(folder / bts.CV_RECORD, ("folds",))["folds"]
            if isinstance(k, int) and all(bts.is_finished(folder / f"fold_{i + 1}") for i in range(k)):
                return "cross-validation"
        return "an unfinished cross-validation (a fold without metrics.json)"
    if (folder.parent / bts.CV_RECORD).is_file():
        return f"a fold of the cross-validation {folder.parent}, which compare reads whole"
    if (folder / "config.json").is_file():
        return "run" if bts.is_finished(folder) else "an unfinished run (no metrics.json yet)"
    return None


def read_json(path: Path, keys: tuple) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        value = None
    if not isinstance(value, dict) or not all(k in value for k in keys):
        raise UserError(f"{path}: missing or not what a finished run writes; compare reads only finished runs "
                        f"of this script")
    return value


def read_fold(folder: Path, whole: bool = False) -> dict:
    """One finished run: its settings, curves, test Dice and each test image's Dice and patient. A fold
    of a cross-validation only as part of it (`whole`): alone, its test images are one fold's."""
    if not folder.exists():
        raise UserError(f"{folder}: not found")
    if not bts.is_finished(folder):
        raise UserError(f"{folder}: not a finished run (no metrics.json, nor a cross-validation's record)")
    metrics = read_json(folder / "metrics.json", ("test", "history", "best_val_dice", "test_split"))
    # as the trainer reads a saved configuration: fields it predates get the values that kept their behaviour
    config = dataclasses.asdict(bts.saved_config(read_json(folder / "config.json", ("seed",)), folder / "config.json"))
    try:
        with open(folder / "test_per_image.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
        per_image = {r["image"]: float(r["dice"]) for r in rows}
        groups = {r["image"]: r["patient"] for r in rows}
        history = {k: [float(v) for v in metrics["history"][k]] for k in ("val_dice", "val_loss", "train_loss", "lr")}
        dice, interval = float(metrics["test"]["dice"]), metrics["test"]["dice_ci95"]
        interval = [float(v) for v in interval] if interval is not None else None
        best_val_dice = float(metrics["best_val_dice"])
        scores = [dice, best_val_dice, *(interval or []), *per_image.values()]
        if not all(0 <= v <= 1 for v in scores) or interval and (len(interval) != 2 or not
                                                                  interval[0] <= dice <= interval[1]):
            raise ValueError("a Dice outside [0, 1], or outside its interval")
    except (OSError, KeyError, TypeError, ValueError, csv.Error):
        raise UserError(f"{folder}: its metrics.json or test_per_image.csv is not what a finished run writes") from None
    if config["folds"] and not whole:
        raise UserError(f"{folder}: one fold of a {config['folds']}-fold cross-validation; compare reads a "
                        f"cross-validation whole: give its folder ({folder.parent})")
    return {"folder": folder, "config": config, "dice": dice, "interval": interval, "history": history,
            "best_val_dice": best_val_dice, "test_split": str(metrics["test_split"]), "per_image": per_image,
            "groups": groups, "data": str(metrics.get("data")),
            "precision": "/".join(dict.fromkeys(map(str, metrics["history"].get("precision", [])))) or "unknown"}


def read_run(folder: Path) -> dict:
    """A finished run, or a finished cross-validation as one run: its test images together (the folds
    test disjoint patients, each image once), scored as a single run's are."""
    if not (folder / bts.CV_RECORD).is_file():
        return {**read_fold(folder), "folds": 0}
    record = read_json(folder / bts.CV_RECORD, ("folds",))
    k = record["folds"]
    folds = [folder / f"fold_{i + 1}" for i in range(k if isinstance(k, int) else 0)]
    unfinished = [f.name for f in folds if not bts.is_finished(f)]
    if not folds or unfinished:
        raise UserError(f"{folder}: a {k}-fold cross-validation with {len(unfinished)} folds unfinished "
                        f"({', '.join(unfinished)}); compare reads it once every fold is finished")
    parts = [read_fold(f, whole=True) for f in folds]
    tested = [image for p in parts for image in p["per_image"]]
    if len({(p["data"], p["precision"], str(learned_settings({**p, "test_split": ""}))) for p in parts}) > 1 or \
            parts[0]["config"]["folds"] != k or len(tested) != len(set(tested)):
        raise UserError(f"{folder}: its folds were trained on different data or settings, or test the same images, "
                        f"so they are not one cross-validation; train it anew before comparing it")
    per_image = {image: dice for p in parts for image, dice in p["per_image"].items()}
    groups = {image: group for p in parts for image, group in p["groups"].items()}
    values = np.array(list(per_image.values()))
    epochs = min(len(p["history"]["val_dice"]) for p in parts)
    return {**parts[0], "folder": folder, "dice": float(values.mean()), "folds": k,
            "interval": bts.bootstrap_interval(values, [groups[i] for i in per_image]),
            "history": {key: np.mean([p["history"][key][:epochs] for p in parts], axis=0).tolist()
                        for key in parts[0]["history"]},
            "best_val_dice": float(np.mean([p["best_val_dice"] for p in parts])),
            "test_split": ",".join(p["test_split"] for p in parts), "per_image": per_image, "groups": groups}


def learned_settings(run: dict) -> dict:
    """What makes runs one setting: the fields that change what a run learns, but the training seed
    and the groups file's name; the data (with the groups file's content) and the precision it was
    trained at; the learning rate it actually had at each epoch's end (a run resumed with other
    --epochs had another schedule); and the test images it was tested on."""
    fields = set(bts.learned_fields()) - {"seed", "groups"}
    return {**{k: v for k, v in sorted(run["config"].items()) if k in fields}, "data": run["data"],
            "precision": run["precision"], "schedule": "/".join(f"{lr:.6g}" for lr in run["history"]["lr"]),
            "test_split": run["test_split"]}


def run_labels(runs: list[dict]) -> tuple[list[str], list[str]]:
    """Each setting named by the fields in which the runs' settings differ (long values by a short
    hash), and each run by its folder's name and its setting."""
    settings = [learned_settings(r) for r in runs]
    keys = sorted({k for s in settings for o in settings for k in s if s.get(k) != o.get(k)})

    def named(hidden):
        return [", ".join(f"{k}={short(s.get(k))}" for k in keys if k not in hidden) for s in settings]

    shown = named({"schedule"})  # the learning rate per epoch follows from the fields, but after a resume
    if len(set(shown)) < len({str(s) for s in settings}):
        shown = named(set())
    labels = [f"{r['folder'].name} ({n})" if n else r["folder"].name for r, n in zip(runs, shown)]
    return labels, [n or "the runs" for n in shown]


def short(value) -> str:
    """A value as a label shows it: long ones (a schedule, fingerprints) by a hash of 8 characters."""
    text = str(value)
    return text if len(text) <= 16 else hashlib.sha256(text.encode()).hexdigest()[:8]


def group_settings(runs: list[dict], names: list[str]) -> list[dict]:
    """Runs of the same learned settings (differing at most in the seed), in order of first appearance."""
    settings = {}
    for r, name in zip(runs, names):
        settings.setdefault(name, {"label": name, "runs": []})["runs"].append(r)
    for s in settings.values():
        dice = np.array([r["dice"] for r in s["runs"]])
        s.update(seeds=len(dice), mean=float(dice.mean()), sd=float(dice.std(ddof=1)) if len(dice) > 1 else None)
    return list(settings.values())


def difference(a: dict, b: dict, draws: int = 4000, seed: int = 0) -> dict:
    """Mean test Dice of setting b minus setting a (each the mean over its seeds), with a 95% interval
    that resamples the test patients (one draw for both settings: paired) and, within each setting,
    its seeds: both the test set and the training seed are noise."""
    runs = a["runs"] + b["runs"]
    images = sorted(set.intersection(*(set(r["per_image"]) for r in runs)))
    keys, group = np.unique([runs[0]["groups"][i] for i in images], return_inverse=True)
    counts = np.bincount(group, minlength=len(keys)).astype(float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(keys), size=(draws, len(keys)))
    weights = np.zeros((draws, len(keys)))
    np.add.at(weights, (np.arange(draws)[:, None], picks), 1)  # how often each patient is drawn

    def setting_means(s: dict) -> tuple[float, np.ndarray]:
        sums = np.stack([np.bincount(group, weights=[r["per_image"][i] for i in images], minlength=len(keys))
                         for r in s["runs"]])  # (seeds, patients)
        means = (weights @ sums.T) / (weights @ counts)[:, None]  # each seed's mean Dice in each draw
        chosen = rng.integers(0, len(s["runs"]), size=(draws, len(s["runs"])))
        return float((sums.sum(1) / counts.sum()).mean()), np.take_along_axis(means, chosen, 1).mean(1)

    (point_a, boot_a), (point_b, boot_b) = setting_means(a), setting_means(b)
    low, high = np.percentile(boot_b - boot_a, [2.5, 97.5])
    verdict = "better" if low > 0 else "worse" if high < 0 else "cannot tell"
    if len(keys) < bts.MIN_GROUPS:
        verdict, low, high = f"cannot tell (fewer than {bts.MIN_GROUPS} test patients)", float("nan"), float("nan")
    return {"setting": b["label"], "reference": a["label"], "difference": point_b - point_a, "low": float(low),
            "high": float(high), "verdict": verdict, "seeds": f"{b['seeds']} vs {a['seeds']}",
            "test_images": len(images), "test_patients": len(keys)}


def paired_differences(settings: list[dict]) -> list[dict]:
    """Each setting against the first one tested on the same images (all runs of both on one test set)."""
    tested_on = [s["runs"][0]["test_split"] if len({r["test_split"] for r in s["runs"]}) == 1 else None
                 for s in settings]
    return [difference(settings[tested_on.index(split)], s) for s, split in zip(settings, tested_on)
            if split is not None and tested_on.index(split) != settings.index(s)]


def print_table(runs, labels, settings, differences) -> str:
    """The runs, the settings over their seeds, the differences; returns what differences.csv says when
    there are none."""
    width = max(len(label) for label in labels + [s["label"] for s in settings])
    bts.log(f"{'run':{width}s}  best val Dice  test Dice  interval")
    for r, label in zip(runs, labels):
        interval = f"{r['interval'][0]:.4f}-{r['interval'][1]:.4f} (95% over patients)" if r["interval"] else \
            "none (too few patients)"
        bts.log(f"{label:{width}s}  {r['best_val_dice']:13.4f}  {r['dice']:9.4f}  {interval}")
    if any(s["seeds"] > 1 for s in settings):
        bts.log(f"\n{'setting':{width}s}  seeds  mean test Dice  sd over seeds")
        for s in settings:
            sd = f"{s['sd']:.4f}" if s["sd"] is not None else "-"
            bts.log(f"{s['label']:{width}s}  {s['seeds']:5d}  {s['mean']:14.4f}  {sd}")
    for d in differences:
        bts.log(f"{d['setting']} vs {d['reference']}: {d['difference']:+.4f} Dice [95% CI {d['low']:+.4f} to "
                f"{d['high']:+.4f}] on the same {d['test_images']} test images ({d['test_patients']} patients), "
                f"{d['seeds']} seeds: {d['verdict'].upper()}")
    compared = {(d["reference"], d["setting"]) for d in differences}
    setting_of = {id(r): s["label"] for s in settings for r in s["runs"]}
    for i, j in ((i, j) for i in range(len(runs)) for j in range(i + 1, len(runs))):
        a, b = runs[i], runs[j]
        if a["test_split"] == b["test_split"] or {(setting_of[id(a)], setting_of[id(b)]),
                                                     (setting_of[id(b)], setting_of[id(a)])} & compared:
            continue
        bts.log(f"{labels[i]} vs {labels[j]}: tested on different splits (other test images), so no paired difference")
        if a["interval"] and b["interval"] and \
                a["interval"][0] <= b["interval"][1] and b["interval"][0] <= a["interval"][1]:
            bts.log(f"{labels[i]} vs {labels[j]}: the intervals overlap, so these test sets cannot tell them apart")
    return ("one setting: nothing to compare it with (its seeds' spread is in comparison.csv)" if len(settings) == 1
            else "the settings were tested on different images: no paired difference")


def run_row(r: dict, label: str) -> dict:
    return {"run": str(r["folder"]), "label": label, "seed": r["config"].get("seed"), "folds": r["folds"],
            "best_val_dice": round(r["best_val_dice"], 5), "test_dice": round(r["dice"], 5),
            "low": round(r["interval"][0], 5) if r["interval"] else "", "high": round(r["interval"][1], 5) if
            r["interval"] else "", "test_split": r["test_split"]}


def plot_comparison(path: Path, runs, labels, settings, differences) -> None:
    """Validation curves, each run's test Dice with its interval, and the paired differences. Settings
    are named S1, S2 ... in the legend, so that ten runs stay legible; the figure grows with them."""
    fig = bts.figure(18, max(4.5, 2.0 + 0.3 * max(len(runs), len(differences), len(settings))))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    from matplotlib.lines import Line2D
    number = {s["label"]: f"S{i + 1}" for i, s in enumerate(settings)}
    colour = {s["label"]: f"C{i % 10}" for i, s in enumerate(settings)}
    of = {id(r): s["label"] for s in settings for r in s["runs"]}
    for i, r in enumerate(runs):
        curve, c = r["history"]["val_dice"], colour[of[id(r)]]
        ax1.plot(np.arange(1, len(curve) + 1), curve, "o-", color=c, markersize=3)
        if r["interval"]:
            ax2.errorbar([r["dice"]], [i], xerr=[[r["dice"] - r["interval"][0]], [r["interval"][1] - r["dice"]]],
                         fmt="o", capsize=5, color=c)
        else:
            ax2.plot([r["dice"]], [i], "o", color=c)
    ax1.set(xlabel="epoch", ylabel="Dice", title="Validation Dice")
    ax1.legend([Line2D([], [], color=colour[s["label"]], marker="o") for s in settings],
               [textwrap.fill(f"{number[s['label']]}: {s['label']}", 60) for s in settings], fontsize=7,
               loc="upper left", bbox_to_anchor=(0, -0.15))
    ax2.set_yticks(np.arange(len(runs)), [f"{r['folder'].name} [{number[of[id(r)]]}]" for r in runs], fontsize=8)
    ax2.set(ylim=(len(runs) - 0.5, -0.5), xlabel="test Dice", title="Each run's test Dice: 95% interval over patients")
    for i, d in enumerate(differences):
        ax3.errorbar([d["difference"]], [i], xerr=[[d["difference"] - d["low"]], [d["high"] - d["difference"]]],
                     fmt="o", capsize=5, color=colour[d["setting"]])
        ax3.annotate(d["verdict"], (d["difference"], i), xytext=(0, 8), textcoords="offset points", ha="center",
                     fontsize=8)
    ax3.axvline(0, color="gray", lw=1)
    ax3.set_yticks(np.arange(len(differences)), [f"{number[d['setting']]} vs {number[d['reference']]}"
                                                 for d in differences], fontsize=8)
    ax3.set(ylim=(max(len(differences), 1) - 0.5, -0.5), xlabel="mean test Dice difference",
            title="Difference to the first setting, 95% interval\n(paired over test patients, seeds resampled)"
            if differences else "No paired difference: the runs were tested\non different images")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    bts.save_figure(path, fig)


def main(argv: list[str] | None = None) -> int:
    return bts.run_tool(CompareConfig, compare, __doc__.split("\n\n")[0], "compare.py", argv)


if __name__ == "__main__":
    sys.exit(main())
