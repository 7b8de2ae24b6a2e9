"""Several models side by side on the same test studies, with paired intervals of their differences.

    mura-tune compare results/default results/demo ensembles/demo
    # default config | the search's best single model | the ensemble, on the same test studies

A model is given as the folder that holds its predictions:

* a training run (``mura-tune train --out DIR``): its kept checkpoint's predictions;
* an experiment (``results/EXP``): its best single trial by val study kappa (rank 1);
* an ensemble (``ensembles/NAME``): the ensemble's study probabilities.

For each: val study kappa (where the model was chosen: optimistic), test study kappa and AUC with
95% bootstrap intervals over studies, and test kappa minus the reference model's (the first) with
a paired bootstrap interval, every model scored on the same resampled studies. Models must have
predicted the same test studies (the same data), or the comparison is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mura_tune.constants import METRIC
from mura_tune.errors import ExperimentError
from mura_tune.layout import NO_SCORE, REFIT_SCOPE, EnsembleDir, ExperimentDir, TrialDir
from mura_tune.metrics import (
    at_half,
    bootstrap_intervals,
    cohen_kappa,
    format_ci,
    paired_kappa_difference,
    roc_auc,
    study_table,
)

STUDY_COLUMNS = ["split", "study_id", "body_part", "label", "prob"]
#: An ensemble's file may carry per-study thresholds (``--threshold fit``); 0.5 otherwise.
THRESHOLD = "threshold"


@dataclass
class ModelPredictions:
    """One model's study probabilities on val and test (``STUDY_COLUMNS``), and what it is."""

    name: str
    kind: str  # "run" | "experiment" (its best trial) | "ensemble"
    source: str  # the folder (a trial's for an experiment)
    studies: pd.DataFrame

    def split(self, split: str) -> pd.DataFrame:
        rows = self.studies[self.studies["split"] == split]
        return rows.sort_values("study_id", kind="stable").reset_index(drop=True)

    @staticmethod
    def thresholds(rows: pd.DataFrame) -> np.ndarray | float:
        """Each study's decision threshold (0.5 unless the model's file fits its own)."""
        return rows[THRESHOLD].to_numpy(np.float64) if THRESHOLD in rows else 0.5

    @staticmethod
    def decided(rows: pd.DataFrame) -> np.ndarray:
        """``rows``' probabilities with each study's threshold at 0.5 (see metrics.at_half)."""
        return at_half(rows["prob"].to_numpy(dtype=np.float64), ModelPredictions.thresholds(rows))


def load_predictions(path: str | Path, name: str | None = None) -> ModelPredictions:
    """The study probabilities of the model kept in ``path`` (a run, an experiment or an ensemble).

    Raises:
        ExperimentError: the folder is missing, holds none of the three, or has no predictions.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ExperimentError(
            f"compare: {folder} is not a folder (a run, an experiment or an ensemble)"
        )
    name = name or folder.name
    ensemble = EnsembleDir(folder)
    if ensemble.manifest.is_file():
        studies = _read(ensemble.predictions)
        keep = STUDY_COLUMNS + ([THRESHOLD] if THRESHOLD in studies else [])
        return ModelPredictions(name, "ensemble", str(folder), studies[keep])
    experiment = ExperimentDir(folder)
    if experiment.leaderboard.is_file() or experiment.trials.is_dir():
        trial = _best_trial(experiment)
        return ModelPredictions(name, "experiment", str(trial.path), _study_rows(trial))
    run = TrialDir(folder)
    if run.predictions.is_file():
        return ModelPredictions(name, "run", str(folder), _study_rows(run))
    raise ExperimentError(
        f"compare: {folder} holds no predictions (expected a training run, an experiment or an ensemble)"
    )


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow's errors are long: keep the first line
        raise ExperimentError(f"compare: cannot read {path}: {str(exc).splitlines()[0]}") from None


def _study_rows(run: TrialDir) -> pd.DataFrame:
    images = _read(run.predictions)
    return study_table(images)[STUDY_COLUMNS]


def _best_trial(experiment: ExperimentDir) -> TrialDir:
    from mura_tune.search.leaderboard import load_leaderboard

    board = load_leaderboard(experiment.path)
    # a search's own trials (a refit's fold models are scored on a held-out fold, not on val)
    scored = ~board["status"].isin([str(s) for s in NO_SCORE]) & (board["scope"] != REFIT_SCOPE)
    usable = board[scored & board[METRIC].notna()]
    usable = usable[usable["predictions_path"].notna()].sort_values(
        METRIC, ascending=False, kind="stable"
    )
    if usable.empty:
        raise ExperimentError(f"compare: no finished trial with predictions in {experiment.path}")
    return TrialDir(Path(usable.iloc[0]["predictions_path"]).parent)


def compare(models: list[ModelPredictions], n_boot: int = 2000, seed: int = 0) -> dict:
    """Score every model on the test studies, each against the first with a paired interval.

    Returns:
        ``{"reference", "n_test_studies", "models": [{name, kind, source, val_kappa, test_kappa,
        test_kappa_ci, test_auc, test_auc_ci, diff, diff_ci}]}`` (``diff``: test kappa minus the
        reference's; None for the reference itself).

    Raises:
        ExperimentError: fewer than one model, or models that predicted different test studies.
    """
    if not models:
        raise ExperimentError("compare: give at least one model")
    tests = [m.split("test") for m in models]
    ids = tests[0]["study_id"].tolist()
    for model, test in zip(models, tests):
        if test.empty:
            raise ExperimentError(f"compare: {model.source} has no test predictions")
        if test["study_id"].tolist() != ids:
            raise ExperimentError(
                f"compare: {model.source} predicted other test studies than {models[0].source} "
                f"({len(test)} vs {len(ids)}): compare models of the same data"
            )
    labels = tests[0]["label"].to_numpy()
    rows = []
    for model, test in zip(models, tests):
        probs, decided = test["prob"].to_numpy(dtype=np.float64), model.decided(test)
        ci = bootstrap_intervals(
            labels, probs, n_boot=n_boot, seed=seed, threshold=model.thresholds(test)
        )
        val = model.split("val")
        row = {
            "name": model.name,
            "kind": model.kind,
            "source": model.source,
            "val_kappa": cohen_kappa(val["label"], model.decided(val)) if len(val) else math.nan,
            "test_kappa": cohen_kappa(labels, decided),
            "test_kappa_ci": list(ci["kappa"]),
            "test_auc": roc_auc(labels, probs),
            "test_auc_ci": list(ci["auc"]),
            "diff": None,
            "diff_ci": None,
        }
        if rows:
            reference = models[0].decided(tests[0])
            paired = paired_kappa_difference(labels, decided, reference, n_boot=n_boot, seed=seed)[
                "mean"
            ]
            row["diff"], row["diff_ci"] = paired["diff"], paired["ci"]
        rows.append(row)
    return {
        "reference": models[0].name,
        "n_test_studies": len(ids),
        "n_boot": n_boot,
        "models": rows,
    }


def format_comparison(result: dict) -> str:
    """The comparison as a table: one row per model, the reference first."""
    table = pd.DataFrame(
        {
            "model": [m["name"] for m in result["models"]],
            "what": [m["kind"] for m in result["models"]],
            "val kappa": [f"{m['val_kappa']:.3f}" for m in result["models"]],
            "test kappa [95% CI]": [
                format_ci(m["test_kappa"], m["test_kappa_ci"]) for m in result["models"]
            ],
            "test AUC [95% CI]": [
                format_ci(m["test_auc"], m["test_auc_ci"]) for m in result["models"]
            ],
            f"vs {result['reference']} [paired 95% CI]": [
                "reference"
                if m["diff"] is None
                else format_ci(m["diff"], m["diff_ci"], signed=True)
                for m in result["models"]
            ],
        }
    )
    return (
        f"Test study kappa on the same {result['n_test_studies']} test studies (val picked the models: "
        "val is optimistic, test is not):\n" + table.to_string(index=False)
    )
