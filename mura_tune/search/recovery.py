"""Crash recovery: what a killed driver left half-done, put back before a search resumes."""

from __future__ import annotations

import math
import os
import time

import pandas as pd

from mura_tune.constants import METRIC
from mura_tune.io import write_json
from mura_tune.layout import (
    RUN_ENDED,
    UNFINISHED,
    TrialStatus,
    ray_trial_dirname,
    read_json,
    study_name,
)
from mura_tune.search.leaderboard import read_ray_state
from mura_tune.search.plan import SearchPlan
from mura_tune.search.searcher import STEP


def _study(plan: SearchPlan, scope: str):
    """(storage, study id, trials) of the scope's Optuna study; (None, None, []) before it exists."""
    import optuna

    db = plan.experiment.optuna_db
    if not db.exists():
        return None, None, []
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    try:
        study_id = storage.get_study_id_from_name(study_name(plan.name, scope))
    except KeyError:
        return storage, None, []
    return storage, study_id, storage.get_all_trials(study_id, deepcopy=False)


def scope_done(plan: SearchPlan, scope: str) -> bool:
    """Every planned trial of the scope has ended, according to both Ray's saved state and Optuna."""
    state = read_ray_state(plan.ray_dir(scope))
    if state is None or any(t["status"] in UNFINISHED for t in state.values()):
        return False
    _, _, trials = _study(plan, scope)
    return len(trials) >= plan.scopes[scope] and all(t.state.is_finished() for t in trials)


def recover_scope(plan: SearchPlan, scope: str) -> tuple[list[str], int]:
    """Before resuming a scope, put back what a killed driver left half-done.

    Ray saves its experiment state every few seconds, so a driver killed with SIGKILL may have
    started trials Ray never recorded ("orphans"). An orphan that finished (its own files say
    so, or Optuna heard its end) is kept: Optuna is told its result if it was not, and the
    searcher's budget counts it. Any other orphan (seconds of work) moves to ``<exp>/orphaned/``
    for inspection, and its Optuna trial, still RUNNING in ``optuna.db``, goes back to WAITING
    so the resumed searcher proposes exactly those parameters again: the study ends with
    ``num_samples`` trials, as planned.

    Returns:
        (orphaned trial ids moved aside, Optuna trials re-queued)
    """
    from optuna.trial import TrialState

    known = set(read_ray_state(plan.ray_dir(scope)) or {})
    storage, study_id, trials = _study(plan, scope)
    by_ray_id = {t.user_attrs.get("ray_trial_id"): t for t in trials}
    exp = plan.experiment
    moved = []
    for trial in exp.trial_dirs():
        meta = read_json(trial.trial_json)
        if trial.trial_id in known or meta is None or meta.get("scope") != scope:
            continue
        told = by_ray_id.get(trial.trial_id)
        final = (read_json(trial.summary) or {}).get("status")
        failed = final == TrialStatus.DIVERGED or trial.error.exists()
        if told is not None and not told.state.is_finished() and (failed or final in RUN_ENDED):
            optuna_id = storage.get_trial_id_from_study_id_trial_number(study_id, told.number)
            values = (
                [] if failed else pd.read_parquet(trial.metrics)[[STEP, METRIC]].dropna().values
            )
            # As the searcher would have: every epoch, then the last one as the result.
            for epoch, value in values:
                storage.set_trial_intermediate_value(optuna_id, int(epoch), float(value))
            if len(values) and math.isfinite(values[-1][1]):
                storage.set_trial_state_values(
                    optuna_id, TrialState.COMPLETE, [float(values[-1][1])]
                )
            else:
                storage.set_trial_state_values(optuna_id, TrialState.FAIL)
            told = storage.get_trial(optuna_id)
        if told is not None and told.state.is_finished():
            write_json(trial.recovered, {"optuna_state": told.state.name, "time": time.time()})
            continue
        dest = exp.orphaned / trial.trial_id
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(trial.path, dest)
        ray_trial = plan.ray_dir(scope) / ray_trial_dirname(trial.trial_id)
        if ray_trial.exists():
            os.replace(ray_trial, dest / "ray")
        moved.append(trial.trial_id)
    requeued = 0
    for trial in _study(plan, scope)[2]:  # re-read: the loop above may have finished some
        if trial.state == TrialState.RUNNING and trial.user_attrs.get("ray_trial_id") not in known:
            optuna_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            requeued += bool(storage.set_trial_state_values(optuna_id, TrialState.WAITING))
    return moved, requeued


def drop_resume_states(plan: SearchPlan, scope: str) -> None:
    """A scope is done: no trial will resume, so free the disk its resume states hold (pruned trials')."""
    for trial_id in read_ray_state(plan.ray_dir(scope)) or {}:
        plan.experiment.trial(trial_id).resume.unlink(missing_ok=True)
