"""Candidate models of an experiment and their study-level probabilities, one split at a time.

A candidate is a usable trial of ``<exp>/leaderboard.parquet``: ERROR and DAMAGED trials, and trials
whose predictions file is missing or damaged, are skipped (with the reason). :func:`load_study_probs` reads a single
split through a Parquet row filter, so loading ``"val"`` never touches test rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mura_tune.errors import ExperimentError
from mura_tune.layout import GENERALIST_SCOPE, NO_SCORE, REFIT_SCOPE, ExperimentDir
from mura_tune.metrics import study_table

LEADERBOARD_COLUMNS = (
    "trial_id",
    "status",
    "scope",
    "val_loss",
    "predictions_path",
    "checkpoint_path",
)


@dataclass
class Candidate:
    """One usable trial: where its predictions and checkpoint are, and what it covers.

    A configuration of a cross-validated refit is one candidate made of its K fold models
    (``folds``; :mod:`mura_tune.ensemble.oof`): it predicts as their mean.
    """

    trial_id: str
    scope: str  # GENERALIST_SCOPE or a body part (specialist)
    predictions_path: Path | None
    checkpoint_path: str | None
    val_loss: float
    folds: list[Candidate] = field(default_factory=list)


@dataclass
class StudyProbs:
    """Study-level probabilities of the candidates on one split, studies sorted by ``study_id``."""

    split: str
    study_ids: np.ndarray
    body_parts: np.ndarray
    labels: np.ndarray
    probs: np.ndarray  # (n_candidates, n_studies); nan where a candidate was not loaded


def read_candidates(experiment: Path) -> tuple[list[Candidate], list[dict]]:
    """Read ``leaderboard.parquet``; return usable candidates and the skipped trials with reasons."""
    path = ExperimentDir(experiment).leaderboard
    if not path.is_file():
        raise ExperimentError(f"no {path.name} in experiment folder {experiment}")
    board = pd.read_parquet(path)
    missing = [c for c in LEADERBOARD_COLUMNS if c not in board.columns]
    if missing:
        raise ExperimentError(f"{path} lacks columns {missing}")
    candidates, skipped = [], []
    for row in board.itertuples(index=False):
        if row.scope == REFIT_SCOPE:
            continue  # a fold model: its val is a held-out fold (see ensemble/oof.py)
        tid = str(row.trial_id)
        pred = Path(str(row.predictions_path)) if isinstance(row.predictions_path, str) else None
        if pred is not None and not pred.is_absolute():
            pred = experiment / pred
        if row.status in NO_SCORE:
            skipped.append({"trial_id": tid, "reason": f"status {row.status}"})
        elif pred is None or not pred.is_file():
            skipped.append({"trial_id": tid, "reason": f"predictions file missing: {pred}"})
        elif damage := _damaged(pred):
            skipped.append(
                {"trial_id": tid, "reason": f"damaged predictions file {pred}: {damage}"}
            )
        else:
            loss = float(row.val_loss) if pd.notna(row.val_loss) else float("nan")
            candidates.append(Candidate(tid, str(row.scope), pred, str(row.checkpoint_path), loss))
    return candidates, skipped


def _damaged(path: Path) -> str | None:
    """Why a predictions file cannot be read (None: its Parquet footer and columns are fine).
    Only the footer is read: no val or test row is loaded here."""
    import pyarrow.parquet as pq

    try:
        names = set(pq.ParquetFile(path).schema_arrow.names)
    except Exception as exc:  # a file cut short or not Parquet
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    missing = sorted({"study_id", "body_part", "label", "split", "prob"} - names)
    return f"lacks columns {missing}" if missing else None


def load_study_probs(
    candidates: list[Candidate], split: str, only: set[int] | None = None
) -> StudyProbs:
    """Load one split's study-level probabilities (Parquet row filter: other splits are never read).

    Args:
        candidates: the candidates, in row order of the returned matrix.
        split: ``"val"`` or ``"test"``.
        only: load just these rows (the others stay nan).

    Raises:
        ExperimentError: unreadable file, bad values, or a study labelled differently by two trials.
    """
    frames = []
    for i, cand in enumerate(candidates):
        if only is not None and i not in only:
            continue
        try:
            images = pd.read_parquet(
                cand.predictions_path,
                columns=["study_id", "body_part", "label", "split", "prob"],
                filters=[("split", "==", split)],
            )
        except Exception as exc:  # pyarrow errors: keep the first line
            raise ExperimentError(
                f"cannot read {cand.predictions_path}: {str(exc).splitlines()[0]}"
            ) from exc
        prob = images["prob"].to_numpy(dtype=np.float64)
        if (
            not (np.isfinite(prob) & (prob >= 0) & (prob <= 1)).all()
            or not images["label"].isin([0, 1]).all()
        ):
            raise ExperimentError(f"{cand.predictions_path}: prob must be in [0, 1] and label 0/1")
        studies = study_table(images).assign(row=i)
        if cand.scope != GENERALIST_SCOPE:
            studies = studies[studies["body_part"] == cand.scope]
        frames.append(studies[["row", "study_id", "body_part", "label", "prob"]])
    long = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["row", "study_id", "body_part", "label", "prob"])
    )
    gen_rows = [i for i, c in enumerate(candidates) if c.scope == GENERALIST_SCOPE]
    truth = long[long["row"].isin(gen_rows)].drop_duplicates(["study_id", "body_part", "label"])
    truth = truth.sort_values("study_id", kind="stable")
    dup = truth["study_id"].duplicated()
    clash = long.merge(truth[["study_id", "label"]], on="study_id", suffixes=("", "_g"))
    clash = clash[clash["label"] != clash["label_g"]]
    if dup.any() or len(clash):
        study = truth["study_id"][dup].iloc[0] if dup.any() else clash["study_id"].iloc[0]
        raise ExperimentError(
            f"study {study} has different labels or body parts in different trials' {split} predictions"
        )
    ids = truth["study_id"].to_numpy()
    probs = long.pivot(index="row", columns="study_id", values="prob")
    probs = probs.reindex(index=range(len(candidates)), columns=ids).to_numpy(dtype=np.float64)
    return StudyProbs(
        split, ids, truth["body_part"].to_numpy(), truth["label"].to_numpy().astype(np.int8), probs
    )


def coverage(cand: Candidate, data: StudyProbs, row: int) -> tuple[int, int]:
    """``(predicted, needed)`` studies of ``cand``'s scope in ``data`` (row ``row``)."""
    cols = slice(None) if cand.scope == GENERALIST_SCOPE else data.body_parts == cand.scope
    have = np.isfinite(data.probs[row, cols])
    return int(have.sum()), int(have.size)


def drop_incomplete(
    candidates: list[Candidate], val: StudyProbs
) -> tuple[list[Candidate], StudyProbs, list[dict]]:
    """Skip candidates that do not predict every val study of their scope."""
    keep, skipped = [], []
    for i, cand in enumerate(candidates):
        have, need = coverage(cand, val, i)
        if need and have == need:
            keep.append(i)
        else:
            skipped.append(
                {
                    "trial_id": cand.trial_id,
                    "reason": f"predicts {have} of {need} val studies of scope {cand.scope}",
                }
            )
    if not any(candidates[i].scope == GENERALIST_SCOPE for i in keep):
        raise ExperimentError(
            f"no usable generalist (scope {GENERALIST_SCOPE!r}) trial with complete val predictions"
        )
    sub = StudyProbs(val.split, val.study_ids, val.body_parts, val.labels, val.probs[keep])
    return [candidates[i] for i in keep], sub, skipped
