"""The ``mura-tune`` argument parser: flags, their help, and the ``--space`` shorthand.

Only parsing lives here (argparse types check a number's range where the flag alone decides it);
the rules that involve the data, the space or several flags live with the library (e.g.
:class:`mura_tune.search.plan.SearchPlan`). Importing this module imports nothing heavy, so
``--help`` and typos answer at once.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from mura_tune.constants import VERSION as __version__
from mura_tune.errors import Range
from mura_tune.search.plan import RULES


class Parser(argparse.ArgumentParser):
    """argparse with our error format: one line naming the flag, no usage block, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mura-tune: error: {message} (see `{self.prog} --help`)\n")


def flag(rule: Range):
    """An argparse ``type`` that parses a number by ``rule``; its error states the rule and the value."""

    def parse(text: str):
        try:
            return rule.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = rule.text
    return parse


def number(
    kind: type,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
):
    """:func:`flag` of a rule written in place (flags the library does not check itself)."""
    return flag(Range(kind, low, high, low_open, high_open))


POSITIVE_INT = number(int, 1)
SEED = flag(RULES["seed"])  # numpy and torch take seeds in [0, 2**32)
FRACTION = number(float, 0, 1, low_open=True, high_open=True)

COMMANDS = (
    "data",
    "train",
    "pretrain",
    "search",
    "spaces",
    "leaderboard",
    "ensemble",
    "evaluate",
    "predict",
    "export",
    "report",
    "cam",
    "compare",
)


def _data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        help="MURA-v1.1 folder (or its parent) or a .csv/.parquet manifest; default: the embedded synthetic set",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mura-tune", description="Search, fine-tune and ensemble MURA radiograph classifiers."
    )
    parser.add_argument("--version", action="version", version=f"mura-tune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="generate, check, split and cache datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("synth", help="write a synthetic dataset in the exact MURA-v1.1 layout")
    p.add_argument("--out", required=True, help="folder to create OUT/MURA-v1.1 in")
    p.add_argument(
        "--scale",
        type=number(float, 0, 1, low_open=True),
        default=0.02,
        help="fraction of MURA's patients (default 0.02)",
    )
    p.add_argument(
        "--valid-scale",
        type=number(float, 0, 1, low_open=True),
        default=None,
        help="fraction of MURA's valid (test) studies (default: --scale; 1.0 = all 1,199)",
    )
    p.add_argument(
        "--size", type=int, default=256, help="long side of the images in px (default 256)"
    )
    p.add_argument(
        "--difficulty",
        type=float,
        default=0.5,
        help="0 = obvious findings, 1 = subtle (default 0.5)",
    )
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument(
        "--index", help="follow a real MURA index folder exactly (e.g. ../shared/mura-v1.1-index)"
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p = dsub.add_parser("summary", help="counts per split and body part, and every problem found")
    _data_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-image-check", action="store_true", help="do not decode every image")
    p = dsub.add_parser(
        "split", help="patient-disjoint train/val split (+ the official valid set as test)"
    )
    _data_arg(p)
    p.add_argument("--val-fraction", type=FRACTION, default=0.2)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", required=True, help="FILE.parquet")
    p = dsub.add_parser("cache", help="decode every image once into the shared memory-mapped cache")
    _data_arg(p)
    p.add_argument("--size", type=int, required=True, help="side of the square images in px")

    p = sub.add_parser("train", help="one training run (no Ray)")
    _data_arg(p)
    p.add_argument("--config", help="YAML/JSON config file")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)"
    )
    p.add_argument("--out", help="run folder (default results/train-<time>)")
    p.add_argument(
        "--split", help="split manifest to use (default: a seeded split written into --out)"
    )
    p.add_argument(
        "--from-trial", help="re-run a trial of an earlier search exactly (RESULTS/EXP/trials/ID)"
    )
    p.add_argument(
        "--strict", action="store_true", help="fail on unreadable images instead of skipping them"
    )

    p = sub.add_parser(
        "pretrain", help="pretrain a backbone on body-part labels (train split only)"
    )
    _data_arg(p)
    p.add_argument(
        "--backbone", default="densenet121", help="timm model name (default densenet121)"
    )
    p.add_argument(
        "--task",
        default="body_part",
        choices=["body_part"],
        help="label to learn: the 7 body parts",
    )
    p.add_argument(
        "--epochs",
        type=POSITIVE_INT,
        default=6,
        help="passes over the train split (default 6, as pretrained: bodypart)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="input side in px; fine-tune at the same size (default 64)",
    )
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    p.add_argument(
        "--lr",
        type=number(float, 0, low_open=True),
        default=1e-3,
        help="Adam learning rate (default 1e-3)",
    )
    p.add_argument(
        "--seed",
        type=SEED,
        default=0,
        help="seed of the train/val split (match the search's --seed), the holdout and training (default 0)",
    )
    p.add_argument(
        "--val-fraction",
        type=FRACTION,
        default=0.2,
        help="val share of that split (match the search's; default 0.2)",
    )
    p.add_argument(
        "--split",
        help="take the train rows of this split manifest instead (e.g. RESULTS/EXP/split.parquet)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N] (default auto)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="weights.safetensors (the image list and a .json beside it record how they were made)",
    )

    p = sub.add_parser("search", help="hyperparameter search (Ray Tune + Optuna TPE + ASHA)")
    add_search_args(p)

    sub.add_parser("spaces", help="list the registered search spaces")

    p = sub.add_parser("leaderboard", help="(re)build and show an experiment's leaderboard")
    p.add_argument("--experiment", required=True, help="RESULTS/EXP")
    p.add_argument("--out", help="also write it to FILE.parquet")
    p.add_argument("--top", type=POSITIVE_INT, default=10)

    p = sub.add_parser(
        "ensemble",
        help="greedy ensemble selection on val (or out-of-fold with --cv), honest report on test",
    )
    p.add_argument("--experiment", required=True, help="RESULTS/EXP")
    p.add_argument("--name", help="ensembles/NAME (default: the experiment's name)")
    p.add_argument("--out-root", default="ensembles")
    p.add_argument("--max-size", type=POSITIVE_INT, default=25, help="selection steps")
    p.add_argument(
        "--max-members",
        type=POSITIVE_INT,
        default=25,
        help="most distinct models in an ensemble (AutoGluon sees no gain past ~25-40)",
    )
    p.add_argument("--specialists", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--metric",
        choices=["kappa", "auc", "logloss"],
        default="kappa",
        help="what greedy selection optimises on the selection set (study kappa at 0.5: the "
        "decisions reported; log-loss and AUC ignore the threshold)",
    )
    p.add_argument(
        "--margin",
        type=number(float, 0),
        default=0.0,
        help="a part's own ensemble must also beat the generalist by this (besides its gain's "
        "bootstrap interval lying above 0)",
    )
    p.add_argument(
        "--cv",
        metavar="K",
        type=number(int, 2),
        help="refit the --top configurations on K patient-grouped folds of train+val (Ray Tune "
        "trials; running the command again resumes) and select on their out-of-fold predictions",
    )
    p.add_argument(
        "--top",
        type=POSITIVE_INT,
        default=5,
        help="configurations to refit with --cv (by val kappa)",
    )
    p.add_argument(
        "--bags",
        type=POSITIVE_INT,
        default=1,
        help="bagged selection over this many random halves of the candidates (1: plain greedy)",
    )
    p.add_argument("--bag-fraction", type=number(float, 0, 1, low_open=True), default=0.5)
    p.add_argument(
        "--threshold",
        choices=["0.5", "fit"],
        default="0.5",
        help="decision threshold: 0.5 (the MURA rule) or fit one per body part on the selection set",
    )
    p.add_argument(
        "--address", help="with --cv: the Ray cluster to refit on (default: the search's)"
    )
    p.add_argument(
        "--max-concurrent",
        type=POSITIVE_INT,
        help="with --cv: fold models trained at once (default: the search's --max-concurrent)",
    )
    p.add_argument("--seed", type=SEED, default=0)
    _mlflow_arg(
        p, "log the ensemble as an MLflow run (default: if the search used --mlflow, its store)"
    )

    p = sub.add_parser("evaluate", help="score a predictions file with bootstrap intervals")
    _data_arg(p)
    p.add_argument(
        "--predictions",
        required=True,
        help="MURA submission CSV, image-level or study-level Parquet/CSV",
    )
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument(
        "--ensemble",
        help="apply this ensemble's per-part decision thresholds (ensembles/NAME/manifest.json)",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("predict", help="predict studies with an ensemble")
    p.add_argument("--ensemble", required=True, help="ensembles/NAME")
    p.add_argument(
        "--data",
        required=True,
        help="MURA-layout folder, manifest, or a folder of study subfolders",
    )
    p.add_argument(
        "--out",
        required=True,
        help="predictions.csv (MURA submission format; a .parquet is written beside it)",
    )

    p = sub.add_parser(
        "export",
        help="export an ensemble as one ONNX (or TorchScript) model, checked against predict",
    )
    p.add_argument("--ensemble", required=True, help="ensembles/NAME")
    p.add_argument("--format", default="onnx", help="onnx (default) or torchscript")
    p.add_argument("--out", help="the model file (default ensembles/NAME/model.onnx or model.pt)")
    p.add_argument(
        "--data",
        help="studies to check the model on (as predict --data; default: the experiment's val studies)",
    )
    p.add_argument(
        "--check-studies",
        type=POSITIVE_INT,
        default=32,
        help="studies the check runs (default 32; body parts in turn)",
    )

    p = sub.add_parser("report", help="HTML report of an experiment (and ensemble)")
    p.add_argument("--experiment", required=True)
    p.add_argument("--ensemble")
    p.add_argument("--out")

    p = sub.add_parser("cam", help="Grad-CAM overlay of a checkpoint on a radiograph")
    p.add_argument("--checkpoint", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--image")
    g.add_argument("--study")
    p.add_argument("--out")

    p = sub.add_parser(
        "compare", help="models side by side on the same test studies, with paired intervals"
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="FOLDER",
        help="a training run (train --out), an experiment (its best trial) or an ensemble; the first is the reference",
    )
    p.add_argument("--names", nargs="+", help="a label per FOLDER (default: the folder names)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def add_search_args(p: argparse.ArgumentParser) -> None:
    """The flags of a search: one per :class:`~mura_tune.search.plan.SearchPlan` field (same name),
    numbers parsed by the plan's own rules (:data:`~mura_tune.search.plan.RULES`)."""
    p.add_argument(
        "--space",
        required=True,
        help="a registered space (see `mura-tune spaces`) or path/to/space.py",
    )
    _data_arg(p)
    p.add_argument(
        "--num-samples",
        type=flag(RULES["num_samples"]),
        default=None,
        help="trials (default: the space's preset)",
    )
    p.add_argument(
        "--max-epochs",
        type=flag(RULES["max_epochs"]),
        default=None,
        help="ASHA max_t (default: the space's preset)",
    )
    p.add_argument(
        "--grace-period",
        type=flag(RULES["grace_period"]),
        default=None,
        help="ASHA's first rung in epochs (default: the preset's)",
    )
    p.add_argument(
        "--reduction-factor",
        type=flag(RULES["reduction_factor"]),
        default=None,
        help="ASHA's reduction factor (default: the preset's, else 3)",
    )
    p.add_argument(
        "--max-concurrent",
        type=flag(RULES["max_concurrent"]),
        default=None,
        help="default: what the resources allow",
    )
    p.add_argument(
        "--gpus-per-trial",
        type=flag(RULES["gpus_per_trial"]),
        default=None,
        help="fractions allowed; default 1 if CUDA, else 0",
    )
    p.add_argument(
        "--cpus-per-trial",
        type=flag(RULES["cpus_per_trial"]),
        default=None,
        help="default 1 on CPU (as many trials as cores), 4 with a GPU",
    )
    p.add_argument(
        "--time-budget",
        dest="time_budget_s",
        type=flag(RULES["time_budget_s"]),
        default=None,
        metavar="SECONDS",
        help="stop each scope's search after this many seconds (Ray Tune's time_budget_s); finished trials are kept",
    )
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT")
    p.add_argument(
        "--results", default="results", help="experiment storage (a folder shared by all nodes)"
    )
    p.add_argument("--name", help="experiment name (default: <space>-<time>)")
    p.add_argument(
        "--resume", action="store_true", help="continue the interrupted experiment --name"
    )
    p.add_argument("--seed", type=SEED, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--body-part", help="specialist search on one part (e.g. XR_WRIST)")
    g.add_argument(
        "--specialists", action="store_true", help="generalist search plus one search per body part"
    )
    p.add_argument(
        "--specialist-samples",
        type=flag(RULES["specialist_samples"]),
        default=None,
        help="trials per body part with --specialists",
    )
    p.add_argument(
        "--preset",
        choices=["cpu", "gpu"],
        default=None,
        help="default: gpu if CUDA is visible, else cpu",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="fix a config field for every trial"
    )
    p.add_argument(
        "--max-failures",
        type=flag(RULES["max_failures"]),
        default=2,
        help="retries of a failed trial from its last checkpoint",
    )
    p.add_argument("--val-fraction", type=flag(RULES["val_fraction"]), default=0.2)
    p.add_argument(
        "--strict", action="store_true", help="fail on unreadable images instead of skipping them"
    )
    p.add_argument(
        "--random-search",
        action="store_true",
        help="baseline: random sampling and no early stopping",
    )
    _mlflow_arg(p, "log every trial as an MLflow run")


def _mlflow_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--mlflow",
        nargs="?",
        const=True,
        default=None,
        metavar="URI",
        help=f"{what} (default store: RESULTS/EXP/mlruns/mlflow.db; or a tracking URI or folder)",
    )


def implicit_search(argv: list[str]) -> list[str]:
    """``mura-tune [--debug] --space X ...`` is ``mura-tune [--debug] search --space X ...``."""
    i = 0
    while i < len(argv) and argv[i] == "--debug":
        i += 1
    rest = argv[i:]
    if (
        rest
        and rest[0].startswith("--")
        and rest[0] not in ("--help", "--version")
        and any(a == "--space" or a.startswith("--space=") for a in rest)
    ):
        return [*argv[:i], "search", *rest]
    return argv
