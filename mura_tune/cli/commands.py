"""Handlers of the ``mura-tune`` subcommands: parse-free glue from arguments to library calls.

Each handler imports the library it calls inside itself: a command imports only what it uses, and
its flags, config and data are checked before torch or Ray is imported, so a typo fails in a second
(``tests/test_bad_inputs.py`` checks that error paths never import them).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mura_tune.errors import ConfigError, DataError, ExperimentError, RunFailed, first_line
from mura_tune.layout import EnsembleDir, ExperimentDir, TrialDir, read_json


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def options(args, *names: str) -> dict:
    """The named flags as keyword arguments: a flag's ``dest`` is the library parameter it sets."""
    return {name: getattr(args, name) for name in names}


def paths_written(*paths: str | Path) -> None:
    """Every command ends by printing the paths it wrote."""
    for path in paths:
        print(f"wrote {path}")


def dispatch(args) -> int:
    name = args.command if args.command != "data" else f"data_{args.data_command}"
    return HANDLERS[name](args)


# --- data ---------------------------------------------------------------------------------------
def data_synth(args) -> int:
    from mura_tune.data.synth import synthesize

    root = synthesize(
        args.out,
        **options(args, "scale", "valid_scale", "size", "difficulty", "seed", "index", "workers"),
    )
    paths_written(root)
    return 0


def data_summary(args) -> int:
    from mura_tune.data.mura import read_dataset
    from mura_tune.data.summary import format_summary, summarize

    dataset = read_dataset(args.data, strict=False)
    summary = summarize(dataset, check=not args.no_image_check, progress=not args.json)
    if args.json:
        print_json(summary)
    else:
        print(format_summary(summary))
    return 0


def data_split(args) -> int:
    from mura_tune.data.mura import read_dataset
    from mura_tune.data.split import assign_split, split_report, write_split

    out = Path(args.out)
    if out.suffix != ".parquet":
        raise ConfigError(f"--out must be a .parquet file, got {out}")
    table = assign_split(read_dataset(args.data).table, args.val_fraction, args.seed)
    write_split(table, out)
    report = split_report(table)
    print(
        f"studies: {report['studies']}; val = {100 * report['val_fraction_of_train_studies']:.1f}% of train studies; "
        f"patients in several splits: {report['patients_in_several_splits']}"
    )
    paths_written(out)
    return 0


def data_cache(args) -> int:
    from mura_tune.data.cache import build_cache
    from mura_tune.data.mura import read_dataset

    if not 8 <= args.size <= 2048:
        raise ConfigError(f"--size must be in [8, 2048], got {args.size}")
    cache = build_cache(read_dataset(args.data).table["image_path"].tolist(), args.size)
    bad = cache.unreadable
    print(f"{len(cache.index)} images at {args.size}px; {len(bad)} unreadable")
    for _, row in bad.head(50).iterrows():
        print(f"  unreadable: {row['image_path']}: {row['reason']}")
    paths_written(cache.path)
    return 0


# --- train / pretrain ---------------------------------------------------------------------------
def train(args) -> int:
    # Flags, config and data are checked before torch is imported: a typo fails in a second.
    from mura_tune.data.mura import read_dataset
    from mura_tune.data.split import assign_split, load_split, write_split
    from mura_tune.train.config import TrainConfig, parse_overrides

    split_path = Path(args.split) if args.split else None
    if args.from_trial:
        trial = TrialDir(Path(args.from_trial))
        if not trial.config.exists():
            raise ExperimentError(
                f"--from-trial {trial.path}: no {trial.config.name} (expected RESULTS/EXP/trials/ID)"
            )
        config = TrainConfig.load(trial.config)
        split_path = split_path or ExperimentDir(trial.path.parent.parent).split
    else:
        config = TrainConfig.load(args.config) if args.config else TrainConfig()
    config = config.updated(parse_overrides(args.set)) if args.set else config.validate()
    out = Path(args.out or f"results/train-{time.strftime('%Y%m%d-%H%M%S')}")
    run = TrialDir(out)
    if split_path is not None:
        table = load_split(split_path)
        split_info = {"path": str(split_path)}
    else:  # a run folder holds its split as an experiment does
        split_file = ExperimentDir(out).split
        table = assign_split(read_dataset(args.data).table)
        write_split(table, split_file)
        split_info = {"seed": 0, "val_fraction": 0.2, "path": str(split_file)}
    from mura_tune.train.pretrain import resolve_pretrained
    from mura_tune.train.weights import check_weights_split

    pretrained, weights_source = resolve_pretrained(
        config.model, config.pretrained, table, config.image_size, split_info=split_info
    )
    config = (
        config.updated({"pretrained": pretrained}) if pretrained != config.pretrained else config
    )
    check_weights_split(config.pretrained, table)  # refused here, before any training
    from mura_tune.train.run import TrialDiverged, run_training

    try:
        summary = run_training(
            config, table, out, strict=args.strict, weights_source=weights_source
        )
    except TrialDiverged as exc:
        raise RunFailed(
            f"training diverged: {exc} (recorded in {run.summary}); try a lower lr"
        ) from None
    val, test = summary["val"], summary["test"]
    print(
        f"best epoch {summary['best_epoch']}: val_kappa_study {val.get('val_kappa_study', float('nan')):.3f}, "
        f"val_auc {val.get('val_auc', float('nan')):.3f} | test_kappa_study {test.get('test_kappa_study', float('nan')):.3f} "
        "(test is reported, never used to choose)"
    )
    paths_written(run.config, run.metrics, run.checkpoint, run.predictions, run.summary)
    return 0


PRETRAIN_FLAGS = (
    "data",
    "out",
    "epochs",
    "image_size",
    "batch_size",
    "lr",
    "seed",
    "val_fraction",
    "device",
)


def pretrain(args) -> int:
    from mura_tune.train.pretrain import pretrain_bodypart

    split_table = split_info = None
    if args.split:
        from mura_tune.data.split import load_split

        split_table, split_info = load_split(args.split), {"path": str(Path(args.split).resolve())}
    out, info = pretrain_bodypart(
        args.backbone,
        split_table=split_table,
        split_info=split_info,
        **options(args, *PRETRAIN_FLAGS),
    )
    print(
        f"body-part accuracy {info['holdout_accuracy']:.3f} on {info['holdout']['images']} held-out train-split images "
        f"(last epoch's augmented train accuracy {info['train_accuracy']:.3f}); trained on {info['images']['count']} "
        f"images, listed in {info['images']['file']}"
    )
    paths_written(out, Path(out).with_name(info["images"]["file"]), Path(out).with_suffix(".json"))
    return 0


# --- search -------------------------------------------------------------------------------------
def search(args) -> int:
    from dataclasses import fields

    from mura_tune.search.plan import SearchPlan
    from mura_tune.train.config import parse_overrides

    if args.resume:
        plan = SearchPlan.for_resume(
            args.results, args.name, args.space, address=args.address, mlflow=args.mlflow
        )
    else:  # the plan checks every flag before torch or Ray is imported
        names = [f.name for f in fields(SearchPlan) if f.init and f.name != "overrides"]
        plan = SearchPlan(**options(args, *names), overrides=parse_overrides(args.set))
    from mura_tune.search.driver import run_search
    from mura_tune.search.leaderboard import format_leaderboard

    result = run_search(plan, resume=args.resume)
    exp = Path(plan.exp_dir)
    if result.leaderboard is not None:
        print(format_leaderboard(result.leaderboard, top=5))
        paths_written(exp / "leaderboard.parquet")
    elif not result.failed:
        print(f"mura-tune: {result.note}", file=sys.stderr)
    print(f"experiment folder: {exp}  (Optuna study: {exp / 'optuna.db'})")
    if result.failed:
        print(f"mura-tune: error: {result.failed}", file=sys.stderr)
    elif result.interrupted:
        print(
            f"mura-tune: interrupted; finished trials are kept. Resume with: {plan.resume_command()}",
            file=sys.stderr,
        )
    elif result.budget_reached:
        print(
            f"mura-tune: the time budget of {plan.time_budget_s:g} s ran out; finished trials are kept. "
            f"Continue with: {plan.resume_command()}",
            file=sys.stderr,
        )
    return result.exit_code


def spaces(args) -> int:
    from mura_tune.search.spaces import describe_spaces

    print(describe_spaces())
    return 0


def leaderboard(args) -> int:
    from mura_tune.search.leaderboard import build_leaderboard, format_leaderboard

    exp = ExperimentDir(Path(args.experiment))
    board = build_leaderboard(exp.path)
    print(format_leaderboard(board, top=args.top))
    written = [exp.leaderboard]
    if args.out:
        from mura_tune.io import write_parquet

        written.append(write_parquet(args.out, board))
    paths_written(*written)
    return 0


# --- ensemble / evaluate / predict ------------------------------------------------------------------
ENSEMBLE_FLAGS = ("name", "out_root", "max_size", "max_members", "specialists", "metric")
ENSEMBLE_FLAGS += ("margin", "seed", "bags", "bag_fraction", "threshold")


def ensemble(args) -> int:
    from mura_tune.ensemble.build import build_ensemble
    from mura_tune.ensemble.record import format_report
    from mura_tune.search.tracking import ensemble_store

    for flag in ("address", "max_concurrent"):
        if args.cv is None and getattr(args, flag) is not None:
            raise ConfigError(
                f"--{flag.replace('_', '-')} applies to the --cv refit only; add --cv K"
            )
    tracked = ensemble_store(args.experiment, args.mlflow)
    if tracked:  # a store that cannot be opened fails here, in one line, before the build
        from mura_tune.search.tracking import open_experiment

        open_experiment(*tracked)
    if args.cv is not None:
        from mura_tune.search.refit import RefitPlan, run_refit

        refit = run_refit(
            RefitPlan(
                args.experiment,
                k=args.cv,
                top=args.top,
                address=args.address,
                max_concurrent=args.max_concurrent,
            )
        )
        if refit.interrupted:
            print(
                "mura-tune: interrupted; finished fold models are kept. Run the same command again "
                "to continue the refit.",
                file=sys.stderr,
            )
            return refit.exit_code
    out = EnsembleDir(build_ensemble(args.experiment, **options(args, "cv", *ENSEMBLE_FLAGS)))
    print(format_report(read_json(out.report)))
    skipped = (read_json(out.manifest) or {}).get("n_skipped", 0)
    if skipped:
        print(f"\nskipped {skipped} trials (see {out.manifest.name})")
    methods = [out.methods] if out.methods.exists() else []
    paths_written(out.manifest, out.predictions, out.report, *methods)
    if tracked:
        from mura_tune.search.tracking import log_ensemble

        try:  # the ensemble is written already: a tracking failure only warns
            run_id = log_ensemble(*tracked, out.path)
        except Exception as exc:  # noqa: BLE001 (MLflow raises many kinds)
            print(f"mura-tune: warning: the ensemble was not logged to MLflow ({tracked[0]}): "
                  f"{first_line(exc)}", file=sys.stderr)  # fmt: skip
        else:
            print(f"logged the ensemble as MLflow run {run_id} ({tracked[0]})")
    return 0


def evaluate(args) -> int:
    from mura_tune.data.mura import read_dataset
    from mura_tune.report.evaluate import evaluate_file, format_table

    thresholds = None
    if args.ensemble:
        from mura_tune.layout import read_manifest

        thresholds = read_manifest(args.ensemble).get("thresholds") or {}
    table = read_dataset(args.data).table
    result = evaluate_file(table, args.predictions, split=args.split, thresholds=thresholds)
    print_json(result) if args.json else print(format_table(result))
    return 0


def predict(args) -> int:
    from mura_tune.ensemble.predict import predict_with_ensemble

    written = predict_with_ensemble(args.ensemble, args.data, args.out)
    paths_written(*written)
    return 0


def export(args) -> int:
    from mura_tune.ensemble.export import export_ensemble

    result = export_ensemble(
        args.ensemble, **options(args, "format", "out", "data", "check_studies")
    )
    print(
        f"exported {args.ensemble} as {args.format}: {result.size_bytes / 1e6:.1f} MB in "
        f"{result.seconds:.1f} s; max |{args.format} - predict| = {result.max_abs_diff:.1e} "
        f"on {result.n_studies} studies"
    )
    paths_written(result.model, result.sidecar)
    return 0


def report(args) -> int:
    from mura_tune.report.html import write_report

    started = time.time()
    path = write_report(args.experiment, ensemble=args.ensemble, out=args.out)
    figures = sorted(p for p in path.parent.glob("*.png") if p.stat().st_mtime >= started - 1)
    paths_written(*figures, path)
    return 0


def cam(args) -> int:
    # Checked before cam (and torch) is imported: a mistyped path fails in a second.
    for flag, value in (("--checkpoint", args.checkpoint), ("--image", args.image)):
        if value is not None and not Path(value).is_file():
            raise DataError(f"{flag} {value}: file not found")
    from mura_tune.report.cam import cam_command

    paths_written(*cam_command(args.checkpoint, image=args.image, study=args.study, out=args.out))
    return 0


def compare(args) -> int:
    if args.names and len(args.names) != len(args.models):
        raise ConfigError(
            f"--names needs one label per FOLDER ({len(args.models)}), got {len(args.names)}"
        )
    from mura_tune.report.compare import compare as compare_models
    from mura_tune.report.compare import format_comparison, load_predictions

    names = args.names or [None] * len(args.models)
    models = [load_predictions(path, name) for path, name in zip(args.models, names)]
    result = compare_models(models)
    print_json(result) if args.json else print(format_comparison(result))
    return 0


HANDLERS = {
    "data_synth": data_synth,
    "data_summary": data_summary,
    "data_split": data_split,
    "data_cache": data_cache,
    "train": train,
    "pretrain": pretrain,
    "search": search,
    "spaces": spaces,
    "leaderboard": leaderboard,
    "ensemble": ensemble,
    "evaluate": evaluate,
    "predict": predict,
    "export": export,
    "report": report,
    "cam": cam,
    "compare": compare,
}
