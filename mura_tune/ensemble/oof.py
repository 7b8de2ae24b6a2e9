"""The out-of-fold predictions of a cross-validated refit: the selection set of ``--cv K``.

    configs, skipped, refit = read_refit(exp, k=5)    # one Candidate per configuration (.folds: K fold models)
    oof = load_oof(configs, exp)                      # StudyProbs "oof": one prediction per train+val study
    test = load_fold_test(configs, only={0, 2})       # StudyProbs "test": each the mean of its K fold models

Each fold model (:mod:`mura_tune.search.refit`) predicted its held-out fold as its ``val`` split,
with no checkpoint chosen there; pasting a configuration's K held-out folds together gives every
train+val study exactly one out-of-fold prediction, which is checked. Only ``val`` rows are read
here (a Parquet row filter); test rows are read by :func:`load_fold_test`, after every decision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mura_tune.ensemble.candidates import Candidate, StudyProbs, load_study_probs
from mura_tune.errors import ConfigError, ExperimentError
from mura_tune.layout import (
    GENERALIST_SCOPE,
    REFIT_SCOPE,
    RUN_ENDED,
    ExperimentDir,
    fold_trial_id,
    read_json,
)
from mura_tune.metrics import log_loss
from mura_tune.search.leaderboard import load_leaderboard

OOF_SPLIT = "oof"


def read_refit(exp: Path, k: int | None = None) -> tuple[list[Candidate], list[dict], dict]:
    """The refit configurations whose K fold models all finished, as candidates.

    Args:
        exp: the experiment folder.
        k: the number of folds asked for (``None``: whatever the refit has).

    Returns:
        ``(configurations, skipped configurations with the reason, refit.json)``.

    Raises:
        ExperimentError: no refit, or no configuration with all its fold models.
        ConfigError: the refit has another number of folds than ``k``.
    """
    folder = ExperimentDir(Path(exp))
    refit = read_json(folder.cv.refit)
    if refit is None:
        raise ExperimentError(
            f"no cross-validated refit in {folder.path} (run `mura-tune ensemble --experiment "
            f"{folder.path} --cv K --top M`)"
        )
    if k is not None and refit["k"] != k:
        raise ConfigError(f"--cv {k}: the refit in {folder.cv.path} has {refit['k']} folds")
    configs, skipped = [], []
    for source in (s["trial_id"] for s in refit["sources"]):
        folds, missing = [], None
        for fold in range(refit["k"]):
            trial = folder.trial(fold_trial_id(source, fold))
            status = (read_json(trial.summary) or {}).get("status")
            if status not in RUN_ENDED or not trial.predictions.is_file():
                missing = f"fold model {trial.trial_id} has not finished (status {status})"
                break
            folds.append(
                Candidate(
                    trial.trial_id,
                    GENERALIST_SCOPE,
                    trial.predictions,
                    str(trial.checkpoint),
                    np.nan,
                )
            )
        if missing:
            skipped.append({"trial_id": source, "reason": missing})
        else:
            configs.append(Candidate(source, GENERALIST_SCOPE, None, None, np.nan, folds=folds))
    if not configs:
        why = f": {skipped[0]['reason']}" if skipped else ""
        raise ExperimentError(
            f"no refit configuration has all {refit['k']} fold models in {folder.path}{why} "
            "(run the same `mura-tune ensemble --cv` command again to finish the refit)"
        )
    return configs, skipped, refit


def _by_fold(configs: list[Candidate], data: StudyProbs) -> np.ndarray:
    k = len(configs[0].folds)
    return data.probs.reshape(len(configs), k, data.probs.shape[1])


def load_oof(configs: list[Candidate], exp: Path) -> StudyProbs:
    """Every train+val study's out-of-fold prediction by each configuration (split ``"oof"``).

    Also sets each configuration's ``val_loss`` to its out-of-fold log-loss (the MURA recipe's key).

    Raises:
        ExperimentError: a study with no or several out-of-fold predictions by a configuration,
            or a train+val study of the folds without any.
    """
    fold_models = [f for c in configs for f in c.folds]
    data = load_study_probs(fold_models, "val")  # each fold model's held-out fold
    probs = _by_fold(configs, data)
    count = np.isfinite(probs).sum(axis=1)
    if (count != 1).any():
        c, s = np.argwhere(count != 1)[0]
        raise ExperimentError(
            f"configuration {configs[c].trial_id} has {count[c, s]} out-of-fold predictions of "
            f"study {data.study_ids[s]}; a refit gives each study exactly one"
        )
    folds = pd.read_parquet(ExperimentDir(Path(exp)).cv.folds, columns=["study_id", "fold"])
    expected = set(folds.loc[folds["fold"] >= 0, "study_id"])
    lost = sorted(expected - set(data.study_ids))
    if lost:
        raise ExperimentError(
            f"{len(lost)} train+val studies have no out-of-fold prediction (first: {lost[0]})"
        )
    oof = np.nansum(probs, axis=1)
    for config, row in zip(configs, oof):
        config.val_loss = log_loss(data.labels, row)
    return StudyProbs(OOF_SPLIT, data.study_ids, data.body_parts, data.labels, oof)


def load_fold_test(configs: list[Candidate], only: set[int] | None = None) -> StudyProbs:
    """Test study probabilities of the configurations: each the mean of its K fold models.

    Args:
        configs: the configurations (from :func:`read_refit`).
        only: load just these configurations (the others stay nan).

    Raises:
        ExperimentError: a fold model that does not predict every test study.
    """
    fold_models = [f for c in configs for f in c.folds]
    k = len(configs[0].folds)
    rows = None if only is None else {i * k + f for i in only for f in range(k)}
    data = load_study_probs(fold_models, "test", only=rows)
    probs = _by_fold(configs, data)
    for i in range(len(configs)) if only is None else sorted(only):
        lost = ~np.isfinite(probs[i])
        if lost.any():
            f = int(np.argwhere(lost)[0][0])
            raise ExperimentError(
                f"fold model {configs[i].folds[f].trial_id} predicts {int((~lost[f]).sum())} of "
                f"{lost.shape[1]} test studies"
            )
    return StudyProbs("test", data.study_ids, data.body_parts, data.labels, probs.mean(axis=1))


def refit_compute(exp: Path, refit: dict) -> dict:
    """The refit's compute against the search's: trial wall time summed over each.

    Returns:
        ``{"fold_models_s", "search_s", "multiple"}`` (``multiple`` is refit / search).
    """
    folder = ExperimentDir(Path(exp))
    board = load_leaderboard(folder.path)
    search = board[board["scope"] != REFIT_SCOPE]
    wall = search["wall_seconds"] if "wall_seconds" in search else pd.Series(dtype=np.float64)
    search_s = float(np.nansum(wall.to_numpy(dtype=np.float64)))
    fold_s = sum(
        float((read_json(folder.trial(m["trial_id"]).summary) or {}).get("wall_seconds") or 0.0)
        for m in refit["fold_models"]
    )
    return {
        "fold_models_s": fold_s,
        "search_s": search_s,
        "multiple": fold_s / search_s if search_s > 0 else None,
    }
