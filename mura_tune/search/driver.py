"""Running a search: Ray started or joined, one Ray Tune run per scope, signals, the result.

    from mura_tune import SearchPlan, run_search
    result = run_search(SearchPlan(space="custom_cnn", num_samples=8))   # = mura-tune --space custom_cnn --num-samples 8

Trials run :func:`mura_tune.train.run.run_training` through ``tune.Tuner``, reporting once per epoch.
Optuna's TPE (seeded, ``constant_liar`` so parallel trials do not duplicate) proposes
configurations; ASHA stops weak trials at its rungs, and those reach Optuna as PRUNED. Every path
is resolved in the driver; trials write only below ``<results>/<name>/``, which must be a folder
every node mounts (cloud URIs are refused).

Before anything is written or any trial starts (:mod:`mura_tune.search.preflight`): ``--address``
must answer within seconds, one trial's resources must fit on a node (this machine, before a
private Ray starts), and the experiment folder is claimed for this driver alone.

Failures: a trial that raises, diverges or runs out of memory is ERROR (FAIL in Optuna, never a
score); a trial whose node dies is retried (``max_failures``) from its own ``resume.pt``;
Ctrl-C or SIGTERM stops cleanly (the result says so; the CLI exits 130 with the resume command);
after a SIGKILL, ``--resume`` restarts unfinished trials from their ``resume.pt``, keeps finished
ones untouched and re-queues in Optuna what the dead driver had started but Ray had not recorded.
A search in which no trial finished has failed (:attr:`SearchResult.failed`, exit 1). Ray's own
log, with the tracebacks of failed trials, goes to ``<experiment>/ray.log``, not the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mura_tune.constants import METRIC, MODE
from mura_tune.errors import ConfigError, ExperimentError, first_line
from mura_tune.layout import TrialStatus
from mura_tune.search.leaderboard import build_leaderboard, read_ray_state
from mura_tune.search.plan import SearchPlan
from mura_tune.search.preflight import (
    check_address,
    check_resources,
    claim_experiment,
    cluster_nodes,
)
from mura_tune.search.prepare import prepare_experiment
from mura_tune.search.recovery import drop_resume_states, recover_scope, scope_done
from mura_tune.search.searcher import make_scheduler, make_searcher
from mura_tune.search.spaces import get_space
from mura_tune.search.trainable import trainable_for, trial_dirname, trial_name

log = logging.getLogger(__name__)

REPORT_COLUMNS = [METRIC, "val_auc", "val_loss", "train_loss", "epoch"]


def init_ray(address: str | None):
    """Start a private local Ray (no ``--address``) or join the cluster at ``address`` (``auto`` or HOST:PORT).

    Without ``--address`` (and without ``$RAY_ADDRESS``) Ray is started locally: plain
    ``ray.init()`` would silently join whatever cluster ``/tmp/ray/ray_current_cluster`` names.
    """
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address is None:  # a local Ray binds 127.0.0.1
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS") or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            configure_logging=True,
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"--address {address}: cannot connect to a Ray cluster ({str(exc).splitlines()[0]})"
        ) from None


def _run_scope(plan: SearchPlan, scope: str, resume: bool, stop, callbacks, verbose: int):
    from ray import tune

    ray_dir = plan.ray_dir(scope)
    trainable = trainable_for(plan, scope)
    if resume and tune.Tuner.can_restore(str(ray_dir)) and read_ray_state(ray_dir) is not None:
        # A restored run keeps the stop criteria and callbacks it was started with.
        tuner = tune.Tuner.restore(
            str(ray_dir), trainable=trainable, resume_unfinished=True, resume_errored=False
        )
        return tuner.fit()
    return build_tuner(
        plan, scope, trainable, stop=stop, callbacks=callbacks, verbose=verbose
    ).fit()


def build_tuner(
    plan: SearchPlan, scope: str, trainable=None, stop=None, callbacks=(), verbose: int = 1
):
    """The ``tune.Tuner`` of one scope (``plan.time_budget_s`` is Ray's ``TuneConfig(time_budget_s=...)``).

    Args:
        plan: the search.
        scope: ``"all"`` or a body part.
        trainable: the trainable (default: this scope's).
        stop: extra Ray Tune stop criteria (a dict, a ``Stopper`` or a function), as ``RunConfig(stop=...)``.
        callbacks: extra Ray Tune callbacks (e.g. recording every reported result).
        verbose: Ray Tune's verbosity (0: silent, 1: the progress table).
    """
    from ray import tune

    ray_dir = plan.ray_dir(scope)
    space = get_space(plan.space)
    # Dimensions the user fixed (--set) are not searched: the space sees their fixed values.
    searcher = make_searcher(
        plan,
        scope,
        space.sampler_fn(plan.preset, fixed=plan.overrides),
        space.start_points(plan.preset, plan.overrides),
    )
    reporter = tune.CLIReporter(
        metric_columns=REPORT_COLUMNS,
        parameter_columns=_report_params(space, plan),
        max_report_frequency=30,
        sort_by_metric=True,
        metric=METRIC,
        mode=MODE,
    )
    return tune.Tuner(
        trainable or trainable_for(plan, scope),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_scheduler(plan),
            num_samples=plan.scopes[scope],
            max_concurrent_trials=plan.max_concurrent or concurrency(plan),
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
            # One actor process runs trial after trial: its imports, torch threads and memory-mapped
            # cache are set up once, not per trial (benchmarks/bench_ray.py: ~9 s -> ~0.3 s per trial
            # here). A trial that errors or loses its node gets a fresh actor.
            reuse_actors=True,
            time_budget_s=plan.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=ray_dir.name,
            storage_path=str(ray_dir.parent),
            # A retried trial (error, lost node) continues from its resume.pt.
            failure_config=tune.FailureConfig(max_failures=plan.max_failures),
            progress_reporter=reporter,
            stop=stop,
            callbacks=[*callbacks, *_trackers(plan, scope)],
            verbose=verbose,
        ),
    )


def concurrency(plan: SearchPlan) -> int:
    """Trials at once when ``--max-concurrent`` is not given: what the cluster's CPUs (and GPUs) hold.

    (Ray Tune asks a searcher for one trial at a time unless told how many may run.)
    """
    import ray

    total = ray.cluster_resources()
    slots = total.get("CPU", 1.0) / plan.cpus_per_trial
    if plan.gpus_per_trial:
        slots = min(slots, total.get("GPU", 0.0) / plan.gpus_per_trial)
    return max(1, int(slots + 1e-9))


def _trackers(plan: SearchPlan, scope: str) -> list:
    """The MLflow callback of a search run with ``--mlflow`` (MLflow is imported only then)."""
    if not plan.mlflow:
        return []
    from mura_tune.search.tracking_callback import TrialRuns

    return [TrialRuns(plan, scope)]


def _report_params(space, plan) -> list[str]:
    return sorted(space.dimensions(preset=plan.preset, fixed=plan.overrides))[:4]


@dataclass
class SearchResult:
    """How a search ended: its leaderboard (None if no trial started) and whether it finished."""

    plan: SearchPlan
    leaderboard: pd.DataFrame | None
    interrupted: bool = (
        False  # Ctrl-C, SIGTERM or a driver stopped early: resume with plan.resume_command()
    )
    budget_reached: bool = False  # plan.time_budget_s ran out before every planned trial ended
    note: str | None = None  # why there is no leaderboard
    failed: str | None = None  # no trial finished: one line saying why and where the errors are

    @property
    def exit_code(self) -> int:
        """130 when interrupted (as a shell reports Ctrl-C), 1 when no trial finished, else 0."""
        return 130 if self.interrupted else 1 if self.failed else 0


def run_search(
    plan: SearchPlan, *, resume: bool = False, stop=None, callbacks: Sequence = (), verbose: int = 1
) -> SearchResult:
    """Prepare ``plan`` (or resume it), run every scope, and build the leaderboard.

    Args:
        plan: the search (:class:`~mura_tune.search.plan.SearchPlan`; for ``resume``,
            :meth:`~mura_tune.search.plan.SearchPlan.for_resume`).
        resume: continue the interrupted experiment ``plan`` describes.
        stop: extra Ray Tune stop criteria for every scope (``RunConfig(stop=...)``).
        callbacks: extra Ray Tune callbacks for every scope (a resumed run keeps its own).
        verbose: Ray Tune's verbosity (0: no progress table).

    Returns:
        The :class:`SearchResult`; ``leaderboard.parquet`` is written in the experiment folder.

    Raises:
        ConfigError: ``--address`` does not answer, or no node can hold one trial (nothing written).
        ExperimentError: a new search's folder already holds an experiment, or another driver
            runs this experiment.

    Ctrl-C (SIGINT) or SIGTERM stops the search cleanly: Ray saves its state and the result is
    ``interrupted``; the leaderboard of what finished is written.
    """
    preflight(plan)  # can it ever run? (nothing is written, no trial starts)
    with claim_experiment(plan.experiment, plan.name):
        if not resume:
            _refuse_existing(plan)
        if (
            plan.mlflow
        ):  # a store that cannot be opened fails here, in one line, before anything is prepared
            from mura_tune.search.tracking import open_experiment

            open_experiment(plan.mlflow, plan.name)
        if not resume:
            prepare_experiment(plan)
            plan.save()
        log.info(
            f"experiment {plan.exp_dir} ({', '.join(f'{s}: {n} trials' for s, n in plan.scopes.items())})"
        )
        if plan.fixed_dimensions:
            fixed = ", ".join(f"{k}={v}" for k, v in plan.fixed_dimensions.items())
            log.info(f"fixed by --set, not searched: {fixed}")
        init_ray(plan.address)
        with ray_log_to_file(plan.experiment.ray_log):
            interrupted, budget_reached = _run_scopes(plan, resume, stop, callbacks, verbose)
        try:
            board = build_leaderboard(plan.exp_dir)
        except ExperimentError as exc:  # stopped before any trial started
            result = SearchResult(plan, None, interrupted, budget_reached, note=str(exc))
        else:
            result = SearchResult(plan, board, interrupted, budget_reached)
            if plan.mlflow:
                from mura_tune.search.tracking import record_leaderboard

                try:  # the search's own results are written already: a tracking failure only warns
                    record_leaderboard(plan.mlflow, plan.name, board)
                except Exception as exc:  # noqa: BLE001 (MLflow raises many kinds)
                    log.warning(
                        f"MLflow: the final statuses were not recorded in {plan.mlflow}: {first_line(exc)}"
                    )
    if not (interrupted or budget_reached):
        result.failed = failure_line(plan, result.leaderboard, result.note)
    return result


def preflight(plan: SearchPlan) -> None:
    """Refuse, before anything is written, a search that could never run a trial.

    ``--address`` (or ``$RAY_ADDRESS``) must answer within seconds; then one trial's CPUs and
    GPUs must fit on a node of the cluster. For a private local Ray the check is against this
    machine, and Ray is not started yet.

    Raises:
        ConfigError: the address does not answer, or no node can hold one trial.
    """
    import ray

    if not ray.is_initialized():
        check_address(plan.address)
        if not (plan.address or os.environ.get("RAY_ADDRESS")):
            check_resources(plan.cpus_per_trial, plan.gpus_per_trial)
            return
        init_ray(plan.address)
    check_resources(plan.cpus_per_trial, plan.gpus_per_trial, cluster_nodes())


def _refuse_existing(plan: SearchPlan) -> None:
    """A new search's folder may hold only what an interrupted preparation wrote (no experiment.json yet)."""
    exp = plan.experiment
    leftovers = {p.name for p in exp.path.glob("[!.]*")} - {
        exp.split.name,
        exp.skipped.name,
        exp.mlruns.name,
    }
    if leftovers:
        raise ExperimentError(
            f"experiment {plan.exp_dir} already exists; pass --resume to continue it or choose another --name"
        )


def _run_scopes(plan: SearchPlan, resume: bool, stop, callbacks, verbose: int) -> tuple[bool, bool]:
    """Run every scope; return (interrupted, budget_reached)."""
    interrupted = budget_reached = False
    previous_term = _forward_sigterm()
    try:
        for scope in plan.scopes:
            if resume:
                if scope_done(plan, scope):
                    continue
                moved, requeued = recover_scope(plan, scope)
                if moved or requeued:
                    log.info(
                        f"{scope}: {requeued} trial(s) the stopped driver had started but Ray had not recorded "
                        f"will run again with the same parameters (old folders: {plan.experiment.orphaned})"
                    )
            started = time.monotonic()
            _run_scope(plan, scope, resume, stop, callbacks, verbose)
            if scope_done(plan, scope):
                drop_resume_states(plan, scope)
            elif (plan.time_budget_s and time.monotonic() - started >= plan.time_budget_s) or (
                callable(getattr(stop, "stop_all", None)) and stop.stop_all()
            ):
                # The time budget, or the caller's own stop criterion, ended it: the search is
                # over, not interrupted (unfinished trials keep their resume.pt: --resume continues).
                budget_reached = True
            else:
                interrupted = True
                break
    except KeyboardInterrupt:  # a second Ctrl-C: Ray may not have saved its very latest state
        interrupted = True
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return interrupted, budget_reached


def failure_line(plan: SearchPlan, board: pd.DataFrame | None, note: str | None) -> str | None:
    """One line when no trial finished (None when one did): how many failed, the first reason, where to look."""
    exp = plan.experiment
    where = f"each trial's error is in {exp.trials}/<id>/error.json, Ray's log in {exp.ray_log}"
    if board is None:
        return f"no trial of experiment {plan.name!r} started ({note}); {where}"
    ended = board["status"].isin([TrialStatus.COMPLETED.value, TrialStatus.PRUNED.value])
    if ended.any():
        return None
    first = board.iloc[0]
    counts = ", ".join(f"{n} {s}" for s, n in board["status"].value_counts().items())
    return (
        f"no trial of experiment {plan.name!r} finished ({counts}; first: {first['trial_id']}: "
        f"{first['reason']}); {where}"
    )


@contextlib.contextmanager
def ray_log_to_file(path: Path) -> Iterator[None]:
    """Send Ray's own log (the tracebacks of failed trials among it) to ``path`` instead of the terminal."""
    ray_logger = logging.getLogger("ray")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = ray_logger.handlers[:], ray_logger.level
    ray_logger.handlers = [handler]
    ray_logger.setLevel(min(ray_logger.level or logging.WARNING, logging.WARNING))
    try:
        yield
    finally:
        ray_logger.handlers, level = saved
        ray_logger.setLevel(level)
        handler.close()


def _forward_sigterm():
    """Treat SIGTERM (cluster schedulers, ``kill``) like Ctrl-C, so Ray saves its state and stops cleanly."""
    try:
        return signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    except ValueError:  # not the main thread
        return None
