"""Cross-validated refit: the best configurations of a finished search, retrained on K folds of train+val.

    mura-tune ensemble --experiment results/E --cv 5 --top 5     # refit (resumable), then select

    from mura_tune.search.refit import RefitPlan, run_refit
    result = run_refit(RefitPlan("results/E", k=5, top=5))       # result.fold_models: M x K ids

What a refit does, in the experiment's own folder (``<exp>/cv/``, see :mod:`mura_tune.layout`):

1. takes the ``top`` best finished (COMPLETED or PRUNED) generalist trials, by val kappa;
2. deals the train+val studies into ``k`` folds, patients whole across body parts and strata
   balanced (:func:`mura_tune.data.split.assign_folds`); test is in no fold;
3. runs one Ray Tune trial per (configuration, fold), on the search's cluster with its
   resources, through the search's own trainable (:func:`~mura_tune.search.trainable.trial_main`):
   the configuration's exact ``config.yaml`` trains on the other folds for the source trial's best
   epoch count, replaying the learning rate the source trained each epoch with. The checkpoint
   kept is the last epoch's and ReduceLROnPlateau is off, so nothing is chosen on the held-out
   fold, and the fold model's predictions there (its ``val`` rows) are out-of-fold. (Without the
   replay, a fold model trains at the initial rate throughout and ends under-converged: on the
   value searches it called fewer studies abnormal than its source.)

Every train+val study thus gets one out-of-fold prediction per configuration
(:mod:`mura_tune.ensemble.oof` assembles them). Fold models are ordinary trial folders,
``trials/cv-<source>-f<k>/``, with scope :data:`~mura_tune.layout.REFIT_SCOPE`; the leaderboard
lists them after the search's trials with their ``fold`` and ``refit_of``.

A refit is idempotent: running it again keeps every fold model whose ``summary.json`` is final
and continues every other one from its ``resume.pt``, so after a crash (or Ctrl-C) the same command
ends with exactly ``top x k`` fold models.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mura_tune.constants import LAST_EPOCH, METRIC
from mura_tune.data.split import assign_folds, fold_split
from mura_tune.errors import ConfigError, ExperimentError, check_int
from mura_tune.io import write_json, write_parquet
from mura_tune.layout import (
    CV_DIR,
    GENERALIST_SCOPE,
    REFIT_SCOPE,
    RUN_ENDED,
    ExperimentDir,
    TrialDir,
    TrialStatus,
    fold_trial_id,
    read_json,
)
from mura_tune.search.leaderboard import build_leaderboard
from mura_tune.search.plan import SearchPlan
from mura_tune.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class RefitPlan:
    """A cross-validated refit of a finished search.

    Args:
        experiment: the experiment folder (``RESULTS/EXP``) of a finished search.
        k: number of folds (>= 2).
        top: number of configurations to refit (the best finished generalist trials by val kappa).
        address: join this Ray cluster (default: the search's own ``--address``, else a local Ray).
        max_concurrent: fold models trained at once (default: the search's ``--max-concurrent``,
            else what the resources allow).
        verbose: Ray Tune's verbosity (1: its progress table every 30 s; 0: silent).
    """

    experiment: str | Path
    k: int = 5
    top: int = 5
    address: str | None = None
    max_concurrent: int | None = None
    verbose: int = 1
    exp: ExperimentDir = field(init=False)

    def __post_init__(self) -> None:
        check_int("--cv", self.k, 2)
        check_int("--top", self.top, 1)
        if self.max_concurrent is not None:
            check_int("--max-concurrent", self.max_concurrent, 1)
        self.exp = ExperimentDir(Path(self.experiment).expanduser().resolve())
        if not self.exp.plan.is_file():
            raise ExperimentError(
                f"--cv needs a search's experiment folder (with {self.exp.plan.name}), got {self.exp.path}"
            )


@dataclass
class RefitResult:
    """How a refit ended: the fold models of every configuration, and which of them finished."""

    plan: RefitPlan
    sources: list[str]
    fold_models: list[str]
    finished: list[str]
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        return len(self.finished) == len(self.fold_models)

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 0


def refit_sources(board: pd.DataFrame, top: int) -> pd.DataFrame:
    """The ``top`` finished generalist trials of a search by val kappa (the leaderboard's order).

    Finished: COMPLETED, or PRUNED by ASHA (it ended with a score; its best epoch is what is
    refit); never ERROR or unfinished.
    """
    search = board[board["scope"] != REFIT_SCOPE] if "scope" in board else board
    done = search[
        search["status"].isin([TrialStatus.COMPLETED, TrialStatus.PRUNED])
        & (search["scope"] == GENERALIST_SCOPE)
        & search[METRIC].notna()
        & (search["best_epoch"].fillna(0) >= 1)
    ]
    return done.sort_values(METRIC, ascending=False, kind="stable").head(top)


def prepare_refit(plan: RefitPlan) -> list[dict]:
    """Write ``cv/`` (folds, fold splits, ``refit.json``) and return the fold-model jobs.

    Raises:
        ExperimentError: no finished generalist trial to refit.
        ConfigError: the experiment already holds a refit with another ``k``.
        WeightsError: a configuration starts from weights that saw a held-out fold's images.
    """
    from mura_tune.data.split import load_split
    from mura_tune.train.weights import check_weights_split

    exp, cv = plan.exp, plan.exp.cv
    previous = read_json(cv.refit)
    if previous is not None and previous.get("k") != plan.k:
        raise ConfigError(
            f"{exp.path.name} already holds a --cv {previous.get('k')} refit ({cv.refit}); "
            f"pass --cv {previous.get('k')} to use or extend it, or move {cv.path} aside"
        )
    board = build_leaderboard(exp.path)
    sources = refit_sources(board, plan.top)
    if sources.empty:
        raise ExperimentError(
            f"no finished (COMPLETED or PRUNED) generalist trial to refit in {exp.path} "
            f"({len(board)} trial(s): {', '.join(f'{k} {v}' for k, v in board['status'].value_counts().items())})"
        )
    if len(sources) < plan.top:
        log.info(
            f"--top {plan.top}: only {len(sources)} finished generalist trial(s); refitting those"
        )
    search_plan = SearchPlan.load(exp.path)
    matching = math.ceil(1 / search_plan.val_fraction - 1e-9)  # folds whose train = search's train
    if plan.k < matching:
        log.info(
            f"--cv {plan.k}: each fold model trains on {(plan.k - 1) / plan.k:.0%} of train+val, "
            f"less than the search's trials ({1 - search_plan.val_fraction:.0%}); "
            f"--cv {matching} matches them"
        )
    if previous is None:
        folds = assign_folds(load_split(exp.split), plan.k, seed=search_plan.seed)
        cv.path.mkdir(parents=True, exist_ok=True)
        for fold in range(plan.k):
            write_parquet(cv.fold_split(fold), fold_split(folds, fold))
        write_parquet(cv.folds, folds)  # last: its presence says the fold splits are written
    folds = pd.read_parquet(cv.folds)
    jobs = []
    for row in sources.itertuples(index=False):
        source = exp.trial(str(row.trial_id))
        config = TrainConfig.load(source.config)
        for fold in range(plan.k):  # the weights may have seen no image of any held-out fold
            check_weights_split(config.pretrained, fold_split(folds, fold), notify=False)
        epochs = int(row.best_epoch)
        fixed = config.updated(
            {
                "max_epochs": epochs,
                "select_metric": LAST_EPOCH,
                "lr_patience": epochs,
                "lr_schedule": source_lr_schedule(source, epochs),
            },
            source=f"refit of {row.trial_id}",
        ).to_dict()
        params = (read_json(source.trial_json) or {}).get("params", {})
        for fold in range(plan.k):
            jobs.append(
                {
                    "trial_id": fold_trial_id(str(row.trial_id), fold),
                    "source": str(row.trial_id),
                    "fold": fold,
                    "epochs": epochs,
                    "fixed": fixed,
                    "params": params,
                    "weights_source": row.weights_source
                    if isinstance(row.weights_source, str)
                    else None,
                }
            )
    studies = folds[folds["fold"] >= 0].drop_duplicates("study_id")
    write_json(
        cv.refit,
        {
            "k": plan.k,
            "seed": search_plan.seed,
            "top": plan.top,
            "sources": [
                {
                    "trial_id": str(r.trial_id),
                    METRIC: float(r[METRIC]),
                    "best_epoch": int(r.best_epoch),
                }
                for _, r in sources.iterrows()
            ],
            "fold_models": [
                {k: j[k] for k in ("trial_id", "source", "fold", "epochs")} for j in jobs
            ],
            "studies_per_fold": studies["fold"].value_counts().sort_index().tolist(),
            "patients_per_fold": studies.groupby("fold")["patient_id"].nunique().tolist(),
            "updated": time.time(),
        },
    )
    return jobs


def source_lr_schedule(source: TrialDir, epochs: int) -> list[float]:
    """The learning rate of each of the source trial's first ``epochs`` epochs, to replay.

    A fold model cannot lower its rate on a plateau of its own held-out fold (that fold is what it
    is scored on), so it replays the rates its source trained with. ``[]`` (a constant rate) when
    the source's history does not cover those epochs.
    """
    try:
        history = pd.read_parquet(source.metrics, columns=["epoch", "lr"])
    except (OSError, ValueError, KeyError):
        return []
    rates = history.dropna().drop_duplicates("epoch", keep="last").set_index("epoch")["lr"]
    wanted = range(1, epochs + 1)
    if not set(wanted) <= set(rates.index):
        return []
    return [float(rates[e]) for e in wanted]


def fold_model_done(exp: ExperimentDir, trial_id: str) -> bool:
    """Whether a fold model's run ended with a score (its ``summary.json`` is final)."""
    return (read_json(exp.trial(trial_id).summary) or {}).get("status") in RUN_ENDED


def refit_trial(params: dict, ctx: dict) -> None:
    """Ray trainable of a refit: run one fold model through the search's :func:`trial_main`."""
    from ray import tune

    from mura_tune.search.trainable import trial_main

    job = ctx["jobs"][params["job"]]
    meta = {
        "refit_of": job["source"],
        "fold": job["fold"],
        "params": job["params"],
        "ray_trial_id": tune.get_context().get_trial_id(),
    }
    trial_ctx = {
        **ctx["base"],
        "trial_id": job["trial_id"],
        "split_path": str(ExperimentDir(Path(ctx["base"]["exp_dir"])).cv.fold_split(job["fold"])),
        "fixed": job["fixed"],
        "weights_source": job["weights_source"],
        "meta": meta,
    }
    trial_main({}, trial_ctx)


def run_refit(plan: RefitPlan) -> RefitResult:
    """Refit the top configurations on ``k`` folds (Ray Tune trials), continuing any earlier refit.

    Returns:
        The :class:`RefitResult`; the leaderboard is rebuilt with the fold models.

    Raises:
        ExperimentError, ConfigError, WeightsError: see :func:`prepare_refit`.
    """
    from mura_tune.search.driver import _forward_sigterm, init_ray
    from mura_tune.search.preflight import check_address, claim_experiment

    exp = plan.exp
    if not exp.path.is_dir():
        raise ExperimentError(f"experiment folder not found: {exp.path}")
    with claim_experiment(exp, exp.path.name):  # no search or other refit writes it meanwhile
        jobs = prepare_refit(plan)
        sources = list(dict.fromkeys(j["source"] for j in jobs))
        pending = [j for j in jobs if not fold_model_done(exp, j["trial_id"])]
        log.info(
            f"refit: {len(sources)} configuration(s) x {plan.k} folds = {len(jobs)} fold models "
            f"({len(jobs) - len(pending)} done, {len(pending)} to train) in {exp.cv.path}"
        )
        interrupted = False
        if pending:
            address = plan.address or SearchPlan.load(exp.path).address
            check_address(address)  # an address that does not answer is refused, never waited on
            init_ray(address)
            previous_term = _forward_sigterm()
            try:
                _tuner(plan, SearchPlan.load(exp.path), pending).fit()
            except KeyboardInterrupt:
                interrupted = True
            finally:
                if previous_term is not None:
                    signal.signal(signal.SIGTERM, previous_term)
        build_leaderboard(exp.path)
    finished = [j["trial_id"] for j in jobs if fold_model_done(exp, j["trial_id"])]
    interrupted = interrupted or (len(finished) < len(jobs) and not _all_ended(exp, jobs))
    log.info(f"refit: {len(finished)} of {len(jobs)} fold models finished")
    return RefitResult(plan, sources, [j["trial_id"] for j in jobs], finished, interrupted)


def _all_ended(exp: ExperimentDir, jobs: list[dict]) -> bool:
    """Every fold model finished or failed for good (none is left to continue)."""
    return all(
        fold_model_done(exp, j["trial_id"]) or exp.trial(j["trial_id"]).error.exists() for j in jobs
    )


def _tuner(plan: RefitPlan, search_plan: SearchPlan, pending: list[dict]):
    from ray import tune

    from mura_tune.search.trainable import trial_dirname

    base = {
        "exp_dir": str(plan.exp.path),
        "name": search_plan.name,
        "space": search_plan.space,
        "scope": REFIT_SCOPE,
        "strict": search_plan.strict,
        "cpus_per_trial": search_plan.cpus_per_trial,
    }
    ctx = {"base": base, "jobs": {j["trial_id"]: j for j in pending}}
    trainable = tune.with_resources(
        tune.with_parameters(refit_trial, ctx=ctx),
        {"cpu": search_plan.cpus_per_trial, "gpu": search_plan.gpus_per_trial},
    )
    reporter = tune.CLIReporter(
        metric_columns=["epoch", METRIC, "train_loss"],
        parameter_columns=["job"],
        max_report_frequency=30,
    )
    return tune.Tuner(
        trainable,
        param_space={"job": tune.grid_search([j["trial_id"] for j in pending])},
        tune_config=tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=plan.max_concurrent or search_plan.max_concurrent,
            trial_name_creator=lambda trial: str(trial.config["job"]),
            trial_dirname_creator=trial_dirname,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=CV_DIR,
            storage_path=str(plan.exp.path),
            failure_config=tune.FailureConfig(max_failures=search_plan.max_failures),
            progress_reporter=reporter,
            verbose=plan.verbose,
        ),
    )
