#!/usr/bin/env python3
"""K-fold cross-validation with brain_tumor_segmentation.py: one run per fold of patients, in one folder.

    python cross_validate.py --folds 5 --data-dir DIR [any option of the trainer]
    python cross_validate.py --resume ROOT [--epochs N]    # finished folds kept, the others continue or begin
    python cross_validate.py --resume ROOT --fold N        # one fold alone (folds can train in parallel)

It creates ROOT (--out-dir, which must not exist, or outputs/DATE-TIME-RECIPE-seedN-cvK) with the
settings its folds share (cross_validation.json), trains fold k with the trainer's own train() in
ROOT/fold_k (tested on the k-th fold of patients, validated on the next), and once all K are finished
and their test parts are one partition of the same data, writes cv_summary.json: the mean and spread
of their test Dice. compare.py reads ROOT as one run, over all its folds' test images.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import brain_tumor_segmentation as bts  # noqa: E402
from brain_tumor_segmentation import CV_RECORD, Config, Interrupted, UserError, log  # noqa: E402


def cross_validate(cfg: Config, typed: frozenset = frozenset()) -> dict:
    """K models, fold k testing on the k-th fold of patients, each in ROOT/fold_k of the folder it creates
    (--resume ROOT continues: finished folds are kept, the others continue or begin; --fold N trains one
    fold); then, once all K are finished, their summary."""
    root, cfg, made, record = cross_validation_folder(cfg, typed)
    folds = range(1, cfg.folds + 1) if not cfg.fold else [cfg.fold]
    for k in folds:  # before any fold trains
        if (root / f"fold_{k}").exists() and not (root / f"fold_{k}").is_dir():
            raise UserError(f"{root / f'fold_{k}'} is a file where fold {k}'s folder goes; move it out of {root}")
        fold_results(root / f"fold_{k}", cfg, k)  # a folder there that is not this fold is refused now
    if record["config"]["epochs"] != cfg.epochs:  # checked: the folds train on together, to the record's epochs
        bts.save_json(root / CV_RECORD, {**record, "config": dataclasses.asdict(cfg)})
    try:
        for k in folds:
            fold_dir = root / f"fold_{k}"
            if fold_results(fold_dir, cfg, k):
                log(f"fold {k}: finished already, kept")
                continue
            log(f"=== fold {k} of {cfg.folds} ===")
            (root / "cv_summary.json").unlink(missing_ok=True)  # it would no longer describe the folds
            given = typed - {"out_dir", "resume"}
            if fold_dir.exists():  # to the record's epochs, typed now or not
                bts.train(dataclasses.replace(cfg, fold=k, out_dir="", resume=str(fold_dir)),
                          given | {"resume", "epochs"})
            else:
                bts.create_folder(fold_dir, "cross-validation")
                bts.train(dataclasses.replace(cfg, fold=k, out_dir=str(fold_dir), resume=""), given, made=True)
    except Interrupted as e:  # the way on is the whole cross-validation's (or this fold's), by this tool
        again = continue_command(root, *(["--fold", str(cfg.fold)] if cfg.fold else []))
        raise Interrupted(f"{e.where}; the cross-validation {root} continues with:\n  {again}", e.code) from None
    except BaseException:
        if made and not any(root.glob("fold_*")):  # it stopped before any fold saved a state
            bts.discard(root, [CV_RECORD])
        raise
    return summarize_cross_validation(root, cfg)


def continue_command(root: Path, *args: str) -> str:
    """The command, runnable from any folder, that continues the cross-validation in `root`."""
    return bts.command("cross_validate.py", "--resume", root.resolve(), *args)


def cross_validation_folder(cfg: Config, typed: frozenset) -> tuple[Path, Config, bool, dict]:
    """A new cross-validation's folder, with its record; or with --resume ROOT, that folder and the
    settings its record holds, with the changes a resume allows. Also: whether the folder is new, and
    the record as it stands."""
    if not cfg.resume:
        root = bts.new_folder(cfg.out_dir, "outputs", bts.run_name(cfg), "cross-validation")
        cfg = dataclasses.replace(cfg, out_dir=str(root.resolve()))
        record = {"folds": cfg.folds, "config": dataclasses.asdict(cfg)}
        bts.save_json(root / CV_RECORD, record)
        return root, cfg, True, record
    root = Path(cfg.resume)
    if "out_dir" in typed and Path(cfg.out_dir).resolve() != root.resolve():
        raise UserError(f"--out-dir {cfg.out_dir} and --resume {cfg.resume} name two folders: a cross-validation "
                        f"continues in its own folder. Leave out --out-dir")
    try:
        record = json.loads((root / CV_RECORD).read_text(encoding="utf-8"))
        saved = bts.saved_config(record["config"], root / CV_RECORD)
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{root / CV_RECORD}: missing or not a cross-validation's record; --resume takes the "
                        f"folder of a cross-validation (a single run continues with brain_tumor_segmentation.py "
                        f"--resume)") from None
    resumed = dataclasses.replace(bts.resumed_settings(saved, cfg, typed), out_dir=str(root.resolve()), resume="")
    if resumed.epochs < saved.epochs or cfg.fold and resumed.epochs != saved.epochs:
        raise UserError(f"{root}: its folds train {saved.epochs} epochs; --resume may add epochs to all folds "
                        f"together (without --fold), never fewer")
    if resumed.fold > resumed.folds:
        raise UserError(f"--fold {resumed.fold}: {root} has folds 1 to {resumed.folds}")
    return root, resumed, False, record


def fold_results(fold_dir: Path, cfg: Config, k: int) -> dict | None:
    """Fold k's metrics.json when it finished with these epochs; None when it has yet to (train on).
    A finished run there that is not fold k with these settings is refused, never counted as the fold."""
    if not bts.is_finished(fold_dir):
        return None
    way = f"move it out of {fold_dir.parent} and train that fold again with {continue_command(fold_dir.parent)} " \
          f"--fold {k}"
    try:
        metrics = json.loads((fold_dir / "metrics.json").read_text())
        done = len(metrics["history"]["epoch"]) == cfg.epochs
        saved = bts.saved_config(json.loads((fold_dir / "config.json").read_text()), fold_dir / "config.json")
        split = json.loads((fold_dir / "split.json").read_text())
        if not all(isinstance(metrics["test"][key], float) for key in ("dice", "iou")):
            raise TypeError("a test score that is not a number")
    except (OSError, ValueError, KeyError, TypeError, UserError):
        raise UserError(f"{fold_dir} is not a finished fold of this script (damaged or edited); {way}") from None
    differ = [f for f in bts.learned_fields() if f != "epochs" and getattr(saved, f) != getattr(cfg, f)]
    if differ or saved.fold != k:
        raise UserError(f"{fold_dir} is not fold {k} of this cross-validation (it differs in "
                        f"{', '.join(bts.option(f) for f in differ or ['fold'])}); {way}")
    return {**metrics, "split": split} if done else None


def summarize_cross_validation(root: Path, cfg: Config) -> dict:
    """cv_summary.json, once all K folds are finished and their test parts are one partition of the
    same data: the mean and spread of their test Dice."""
    done = [r for r in (fold_results(root / f"fold_{k}", cfg, k) for k in range(1, cfg.folds + 1)) if r]
    if len(done) < cfg.folds:
        log(f"cross-validation: {len(done)} of {cfg.folds} folds finished; the summary waits for the rest "
            f"({continue_command(root)})")
        return {}
    data = [bts.data_fingerprint(r["split"]) for r in done]
    tested = [name for r in done for name in r["split"]["test"]]
    if len(set(data)) > 1 or len(tested) != len(set(tested)) or set(tested) != set(done[0]["split"]["files"]):
        raise UserError(f"{root}: its folds' test parts are not one partition of the same data (fingerprints "
                        f"{', '.join(f'fold {k + 1}: {d}' for k, d in enumerate(data))}; {len(tested)} tests of "
                        f"{len(set(tested))} images, of {len(done[0]['split']['files'])}): the data or the groups "
                        f"file changed between folds. Train the cross-validation anew on one copy of the data")
    dice = np.array([r["test"]["dice"] for r in done])
    summary = {"folds": cfg.folds, "test_dice_per_fold": dice.tolist(), "test_dice_mean": float(dice.mean()),
               "test_dice_std": float(dice.std(ddof=1)),
               "test_iou_mean": float(np.mean([r["test"]["iou"] for r in done])), "test_images": len(tested),
               "data": data[0]}
    caveats = sorted({r["warning"] for r in done if r.get("warning")})
    if caveats:
        summary["warning"] = "; ".join(caveats)
    bts.save_json(root / "cv_summary.json", summary)
    log(f"cross-validation over {cfg.folds} folds of patients: test Dice {summary['test_dice_mean']:.4f} +- "
        f"{summary['test_dice_std']:.4f} (mean +- sd over folds); {root / 'cv_summary.json'}\nfolder: {root}")
    return summary


def main(argv: list[str] | None = None) -> int:
    def entry():
        cfg, typed = bts.config_from_args(sys.argv[1:] if argv is None else argv, __doc__.split("\n\n")[0])
        if not cfg.folds and not cfg.resume:
            raise UserError("--folds K (at least 3): the number of folds; or --resume ROOT to continue a "
                            "cross-validation")
        cross_validate(cfg, typed)

    return bts.run_cli(entry, "cross-validation")


if __name__ == "__main__":
    sys.exit(main())
