"""A small fake experiment folder for the ensemble and evaluate tests (no images, no training).

Layout written by :func:`make_experiment`::

    <root>/exp/leaderboard.parquet
    <root>/exp/split.parquet                    the canonical image table with a split column
    <root>/exp/trials/<trial_id>/predictions.parquet

Generalists are mediocre on XR_WRIST; two wrist specialists are strong there, so routing sends
the wrist to its own ensemble. One ERROR trial and one trial without predictions are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

PARTS = ("XR_ELBOW", "XR_HAND", "XR_WRIST")

# trial_id -> (scope, skill per part, status, writes predictions)
TRIALS = {
    "g0": ("all", {"XR_ELBOW": 1.4, "XR_HAND": 1.2, "XR_WRIST": 0.4}, "COMPLETED", True),
    "g1": ("all", {"XR_ELBOW": 1.1, "XR_HAND": 1.3, "XR_WRIST": 0.3}, "COMPLETED", True),
    "g2": ("all", {"XR_ELBOW": 1.0, "XR_HAND": 1.0, "XR_WRIST": 0.5}, "COMPLETED", True),
    "g3": ("all", {"XR_ELBOW": 0.8, "XR_HAND": 0.9, "XR_WRIST": 0.2}, "PRUNED", True),
    "g4": ("all", {"XR_ELBOW": 0.7, "XR_HAND": 0.6, "XR_WRIST": 0.3}, "COMPLETED", True),
    "g5": ("all", {"XR_ELBOW": 0.9, "XR_HAND": 0.9, "XR_WRIST": 0.9}, "COMPLETED", True),
    "g_err": ("all", {"XR_ELBOW": 2.0, "XR_HAND": 2.0, "XR_WRIST": 2.0}, "ERROR", True),
    "g_lost": ("all", {"XR_ELBOW": 2.0, "XR_HAND": 2.0, "XR_WRIST": 2.0}, "COMPLETED", False),
    "w0": ("XR_WRIST", {"XR_WRIST": 2.5}, "COMPLETED", True),
    "w1": ("XR_WRIST", {"XR_WRIST": 2.0}, "COMPLETED", True),
    "h0": ("XR_HAND", {"XR_HAND": 0.8}, "COMPLETED", True),
}


@dataclass
class FakeExperiment:
    exp: Path
    table: pd.DataFrame  # canonical image table with a split column (train/val/test)
    val_studies: set[str]
    test_studies: set[str]


def _studies(rng: np.random.Generator, n_per_part: int) -> pd.DataFrame:
    rows, patient = [], 0
    for split, source in (("val", "train"), ("test", "valid")):
        for part in PARTS:
            for _ in range(n_per_part):
                patient += 1
                label = int(rng.random() < 0.45)
                outcome = "positive" if label else "negative"
                study = f"MURA-v1.1/{source}/{part}/patient{patient:05d}/study1_{outcome}"
                rows.append((study, f"patient{patient:05d}", part, label, source, split))
    cols = ["study_id", "patient_id", "body_part", "label", "source_split", "split"]
    return pd.DataFrame(rows, columns=cols)


def make_experiment(root: Path, n_per_part: int = 40, seed: int = 0) -> FakeExperiment:
    """Write a fake experiment under ``root`` and return its paths and image table."""
    rng = np.random.default_rng(seed)
    studies = _studies(rng, n_per_part)
    n_images = rng.integers(1, 4, len(studies))
    images = studies.loc[studies.index.repeat(n_images)].reset_index(drop=True)
    images["image_path"] = [
        f"{root}/data/{s}/image{j + 1}.png"
        for s, j in zip(images["study_id"], images.groupby("study_id").cumcount())
    ]
    exp = root / "exp"
    (exp / "trials").mkdir(parents=True)
    board = []
    for tid, (scope, skill, status, writes) in TRIALS.items():
        rows = images if scope == "all" else images[images["body_part"] == scope]
        sign = 2 * rows["label"].to_numpy() - 1
        study_noise = rng.normal(0.0, 1.5, len(studies))
        noise = pd.Series(study_noise, index=studies["study_id"])[rows["study_id"]].to_numpy()
        logit = rows["body_part"].map(skill).to_numpy() * sign + noise
        logit = logit + rng.normal(0.0, 0.3, len(rows))
        prob = 1.0 / (1.0 + np.exp(-logit))
        preds = rows[["image_path", "study_id", "body_part", "label", "split"]].assign(prob=prob)
        path = exp / "trials" / tid / "predictions.parquet"
        if writes:
            path.parent.mkdir(parents=True)
            preds.to_parquet(path, index=False)
        val = preds[preds["split"] == "val"]
        p = np.clip(val["prob"].to_numpy(), 1e-7, 1 - 1e-7)
        y = val["label"].to_numpy()
        board.append(
            {
                "trial_id": tid,
                "status": status,
                "scope": scope,
                "val_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
                "val_kappa_study": 0.0,
                "predictions_path": str(path),
                "checkpoint_path": str(exp / "trials" / tid / "checkpoint.pt"),
            }
        )
    pd.DataFrame(board).to_parquet(exp / "leaderboard.parquet", index=False)
    table = images[
        ["image_path", "study_id", "patient_id", "body_part", "label", "source_split", "split"]
    ]
    table.to_parquet(exp / "split.parquet", index=False)
    val_ids = set(studies.loc[studies["split"] == "val", "study_id"])
    test_ids = set(studies.loc[studies["split"] == "test", "study_id"])
    return FakeExperiment(exp, table, val_ids, test_ids)


def permute_test_labels(exp: Path, seed: int = 1) -> None:
    """Shuffle the test labels across test studies, the same way in every trial's predictions."""
    files = sorted((exp / "trials").glob("*/predictions.parquet"))
    frames = {f: pd.read_parquet(f) for f in files}
    test = pd.concat(frames.values()).query("split == 'test'").drop_duplicates("study_id")
    test = test.sort_values("study_id")
    shuffled = np.random.default_rng(seed).permutation(test["label"].to_numpy())
    new_label = dict(zip(test["study_id"], shuffled))
    for f, df in frames.items():
        is_test = df["split"] == "test"
        df.loc[is_test, "label"] = (
            df.loc[is_test, "study_id"].map(new_label).astype(df["label"].dtype)
        )
        df.to_parquet(f, index=False)


def write_submission(predictions: Path, out: Path, split: str = "test") -> Path:
    """Write study-level predictions in the MURA submission form ``<study dir>/,<prob>``."""
    df = pd.read_parquet(predictions)
    df = df[df["split"] == split]
    out.write_text(
        "".join(f"{s}/,{p!r}\n" for s, p in zip(df["study_id"], df["prob"].astype(float).tolist()))
    )
    return out


# config (refit of trial) -> skill per part of its fold models
REFIT_SKILL = {
    "g0": {"XR_ELBOW": 1.2, "XR_HAND": 1.0, "XR_WRIST": 0.5},
    "g1": {"XR_ELBOW": 1.0, "XR_HAND": 1.2, "XR_WRIST": 0.4},
    "g2": {"XR_ELBOW": 0.9, "XR_HAND": 0.9, "XR_WRIST": 0.9},
}


def make_refit(fx: FakeExperiment, k: int = 3, seed: int = 0) -> list[str]:
    """Add a finished ``k``-fold refit of ``REFIT_SKILL``'s configurations to a fake experiment.

    Writes ``cv/folds.parquet``, ``cv/fold<f>.parquet`` and ``cv/refit.json`` as a refit does, and
    for every (configuration, fold) ``trials/cv-<id>-f<f>/`` with a final ``summary.json`` and
    ``predictions.parquet``: its held-out fold's images as ``val``, every test image as ``test``.
    Returns the fold-model trial ids.
    """
    from mura_tune.data.split import assign_folds, fold_split
    from mura_tune.layout import ExperimentDir, fold_trial_id

    rng = np.random.default_rng(seed + 100)
    exp = ExperimentDir(fx.exp)
    folds = assign_folds(fx.table, k, seed=seed)
    exp.cv.path.mkdir(parents=True, exist_ok=True)
    for f in range(k):
        fold_split(folds, f).to_parquet(exp.cv.fold_split(f), index=False)
    folds.to_parquet(exp.cv.folds, index=False)
    study_noise = pd.Series(
        rng.normal(0.0, 1.5, folds["study_id"].nunique()), index=folds["study_id"].unique()
    )
    ids, fold_models = [], []
    for source, skill in REFIT_SKILL.items():
        for f in range(k):
            rows = fold_split(folds, f).query("split != 'train'")
            sign = 2 * rows["label"].to_numpy() - 1
            logit = rows["body_part"].map(skill).to_numpy() * sign
            logit = logit + study_noise[rows["study_id"]].to_numpy()
            logit = logit + rng.normal(0.0, 0.3, len(rows))
            trial = exp.trial(fold_trial_id(source, f))
            trial.path.mkdir(parents=True)
            preds = rows[["image_path", "study_id", "body_part", "label", "split"]]
            preds.assign(prob=1.0 / (1.0 + np.exp(-logit))).to_parquet(
                trial.predictions, index=False
            )
            (trial.summary).write_text(json.dumps({"status": "completed", "wall_seconds": 10.0}))
            ids.append(trial.trial_id)
            fold_models.append(
                {"trial_id": trial.trial_id, "source": source, "fold": f, "epochs": 1}
            )
    refit = {
        "k": k,
        "seed": seed,
        "top": len(REFIT_SKILL),
        "sources": [{"trial_id": s, "val_kappa_study": 0.0, "best_epoch": 1} for s in REFIT_SKILL],
        "fold_models": fold_models,
    }
    exp.cv.refit.write_text(json.dumps(refit))
    return ids
