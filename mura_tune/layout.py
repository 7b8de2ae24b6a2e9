"""The folders that carry a search from stage to stage, defined once, and the words they use.

Every stage writes and reads these paths through this module; no file name is spelled anywhere
else::

    <results>/<name>/                    ExperimentDir: one search (all its scopes)
        experiment.json                  the SearchPlan
        .driver.lock                     held by the one driver running the experiment
        ray.log                          Ray's own log of the driver (trial tracebacks)
        split.parquet                    the one split every trial, ensemble and report uses
        skipped_images.parquet           unreadable images, when there are any
        optuna.db                        Optuna's study of each scope (``<name>:<scope>``)
        leaderboard.parquet              one row per trial
        experiment_state-*.json, ray-<id>/   Ray Tune's own state and trial folders of the main scope
        specialists/<PART>/              Ray Tune's folder of each specialist scope
        orphaned/<id>/                   trials a killed driver started but Ray never recorded
        report/                          report.html and its PNGs
        cv/                              RefitDir: the cross-validated refit (`mura-tune ensemble --cv K`)
            refit.json                   K, the fold seed, the configurations refit and their fold models
            folds.parquet                the split with each train+val image's fold (test: -1)
            fold<k>.parquet              the split fold model k trains on (its held-out fold is "val")
            experiment_state-*.json      Ray Tune's state of the refit trials
        mlruns/                          MLflow's store of a search run with --mlflow: mlflow.db, artifacts/
        trials/<id>/                     TrialDir: one trial (also what `mura-tune train` writes)
            trial.json                   who ran it: params, scope, node, attempts
            config.yaml                  the TrainConfig
            metrics.parquet              one row per epoch
            best.pt                      the best epoch's checkpoint
            predictions.parquet          that checkpoint's image probabilities on val and test
            summary.json                 how the run ended (status, best epoch, val/test metrics)
            error.json                   the last attempt's error, if it failed
            resume.pt                    the unfinished trial's resumable state
            recovered.json               a result only Optuna saw (written by --resume)
            skipped_images.parquet       unreadable images the run skipped
        trials/cv-<id>-f<k>/             the fold-k model of trial <id>'s configuration (a TrialDir;
                                         its scope is REFIT_SCOPE, its "val" the held-out fold)
    <ensembles>/<name>/                  EnsembleDir: one ensemble of an experiment
        manifest.json                    what was chosen, how, and from where (MANIFEST_KEYS)
        predictions.parquet              the ensemble's study probabilities on val and test
        report.json                      scores with intervals; every selection method's optimism
        methods.parquet                  every selection method's study decisions (selection set, test)
        model.onnx, model.onnx.json      `mura-tune export`: the ensemble as one model, and its sidecar

:class:`TrialStatus` is the one vocabulary of trial states, and :data:`GENERALIST_SCOPE` /
:data:`GENERALIST_ENSEMBLE` name the generalist in a search and in a manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from mura_tune.errors import ExperimentError

# --- experiment ----------------------------------------------------------------------------------
EXPERIMENT_FILE = "experiment.json"
SPLIT_FILE = "split.parquet"
SKIPPED_FILE = "skipped_images.parquet"
OPTUNA_DB = "optuna.db"
LEADERBOARD_FILE = "leaderboard.parquet"
TRIALS_DIR = "trials"
SPECIALISTS_DIR = "specialists"
ORPHANED_DIR = "orphaned"
REPORT_DIR = "report"
REPORT_HTML = "report.html"
CV_DIR = "cv"
REFIT_FILE = "refit.json"
FOLDS_FILE = "folds.parquet"
DRIVER_LOCK = ".driver.lock"
RAY_LOG_FILE = "ray.log"
MLFLOW_DIR = "mlruns"
MLFLOW_DB = "mlflow.db"
#: Ray Tune's folder of a trial inside its scope's Ray folder: ``ray-<trial id>``.
RAY_TRIAL_PREFIX = "ray-"
# --- trial ---------------------------------------------------------------------------------------
TRIAL_FILE = "trial.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.parquet"
CHECKPOINT_FILE = "best.pt"
PREDICTIONS_FILE = "predictions.parquet"
SUMMARY_FILE = "summary.json"
ERROR_FILE = "error.json"
RESUME_FILE = "resume.pt"
RECOVERED_FILE = "recovered.json"
# --- ensemble ------------------------------------------------------------------------------------
MANIFEST_FILE = "manifest.json"
ENSEMBLE_REPORT_FILE = "report.json"
METHODS_FILE = "methods.parquet"
#: ``mura-tune export`` writes ``model.<format suffix>`` and its sidecar ``model.<suffix>.json``.
EXPORTED_MODEL = "model"
#: Keys of every manifest.json: ``name``, ``experiment`` (its folder), ``split_manifest``,
#: ``settings`` (max_size, metric, seed, prune_top, specialists, margin, n_boot), ``candidates``,
#: ``n_skipped``/``skipped``, ``routing`` (part -> served_by, scores, reason), ``ensembles``
#: (GENERALIST_ENSEMBLE and each part -> used, val_score, best_size, n_init, members [{trial_id,
#: scope, checkpoint_path, weight, and for a cross-validated member ``folds``: [{trial_id,
#: checkpoint_path}], its K fold models, averaged}], selection_order, trajectory), ``thresholds``
#: (part -> the decision threshold on the study probability; 0.5 unless fitted) and
#: ``baselines`` (best_single, mura_recipe).
MANIFEST_KEYS = ("name", "experiment", "settings", "routing", "ensembles", "baselines")

#: The scope of a trial that sees every body part (a specialist's scope is its part).
GENERALIST_SCOPE = "all"
#: The manifest key (and prediction route) of the ensemble over generalists; a part's routing
#: says it is ``served_by`` that ensemble or by its own (:data:`SERVED_BY_PART`).
GENERALIST_ENSEMBLE = "generalist"
SERVED_BY_PART = "part"
#: The scope of a fold model of a cross-validated refit: it is no candidate of any single-split
#: selection (its "val" is its held-out fold) and no trial of a search scope.
REFIT_SCOPE = "cv"


def fold_trial_id(source: str, fold: int) -> str:
    """The trial id (and folder name) of the fold-``fold`` model of trial ``source``'s configuration."""
    return f"{REFIT_SCOPE}-{source}-f{fold}"


class TrialStatus(str, Enum):
    """Every state a trial (or a training run) is in; the only place these words are spelled.

    A run writes its own state in ``summary.json`` and in each ``metrics.parquet`` row (lowercase);
    the leaderboard says what the trial was in its search (uppercase; the unfinished states are
    Ray Tune's own names). Members compare and hash as their string values.
    """

    # what a training run writes about itself
    TRAINING = "running"  # an epoch before the last
    FINISHED = "completed"  # every epoch ran
    EARLY_STOPPED = "early_stopped"  # stopped after early_stop_patience epochs without progress
    DIVERGED = "diverged"  # the loss became NaN/inf: an error, never a score
    STOPPED = "stopped"  # its caller's compute budget ran out (run_training(should_stop=...))
    # the leaderboard's verdict on a trial in its search
    COMPLETED = "COMPLETED"
    PRUNED = "PRUNED"  # stopped by ASHA (or another stop criterion)
    ERROR = "ERROR"
    RUNNING = "RUNNING"
    PENDING = "PENDING"
    PAUSED = "PAUSED"
    DAMAGED = "DAMAGED"  # a file of the trial cannot be read: named in its reason, never a score

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


#: A run that ended with a score (its summary.json is final).
RUN_ENDED = (TrialStatus.FINISHED, TrialStatus.EARLY_STOPPED, TrialStatus.STOPPED)
#: Trials that have no score, whatever their files say: they rank last and are never ensembled.
NO_SCORE = (TrialStatus.ERROR, TrialStatus.DAMAGED)
#: Trials Ray Tune has not finished.
UNFINISHED = (TrialStatus.PENDING, TrialStatus.RUNNING, TrialStatus.PAUSED)


@dataclass(frozen=True)
class TrialDir:
    """One trial's folder (or one ``mura-tune train`` run's)."""

    path: Path

    @property
    def trial_id(self) -> str:
        return self.path.name

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    trial_json = property(lambda self: self.path / TRIAL_FILE)
    config = property(lambda self: self.path / CONFIG_FILE)
    metrics = property(lambda self: self.path / METRICS_FILE)
    checkpoint = property(lambda self: self.path / CHECKPOINT_FILE)
    predictions = property(lambda self: self.path / PREDICTIONS_FILE)
    summary = property(lambda self: self.path / SUMMARY_FILE)
    error = property(lambda self: self.path / ERROR_FILE)
    resume = property(lambda self: self.path / RESUME_FILE)
    recovered = property(lambda self: self.path / RECOVERED_FILE)
    skipped = property(lambda self: self.path / SKIPPED_FILE)


@dataclass(frozen=True)
class ExperimentDir:
    """One search's folder: ``<results>/<name>``."""

    path: Path

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    plan = property(lambda self: self.path / EXPERIMENT_FILE)
    split = property(lambda self: self.path / SPLIT_FILE)
    skipped = property(lambda self: self.path / SKIPPED_FILE)
    optuna_db = property(lambda self: self.path / OPTUNA_DB)
    leaderboard = property(lambda self: self.path / LEADERBOARD_FILE)
    trials = property(lambda self: self.path / TRIALS_DIR)
    specialists = property(lambda self: self.path / SPECIALISTS_DIR)
    orphaned = property(lambda self: self.path / ORPHANED_DIR)
    report = property(lambda self: self.path / REPORT_DIR)
    cv = property(lambda self: RefitDir(self.path / CV_DIR))
    lock = property(lambda self: self.path / DRIVER_LOCK)
    ray_log = property(lambda self: self.path / RAY_LOG_FILE)
    mlruns = property(lambda self: self.path / MLFLOW_DIR)

    def trial(self, trial_id: str) -> TrialDir:
        return TrialDir(self.path / TRIALS_DIR / trial_id)

    def trial_dirs(self) -> list[TrialDir]:
        """Every trial folder that has its ``trial.json``, sorted by id."""
        return [TrialDir(p) for p in sorted(self.trials.glob("*")) if (p / TRIAL_FILE).exists()]

    def ray_dirs(self) -> list[Path]:
        """Ray Tune's folder of every scope: the experiment itself, each specialist's, the refit's."""
        refit = [self.cv.path] if self.cv.path.is_dir() else []
        return [self.path, *sorted(p for p in self.specialists.glob("*") if p.is_dir()), *refit]


@dataclass(frozen=True)
class RefitDir:
    """The cross-validated refit of an experiment: ``<results>/<name>/cv``."""

    path: Path

    refit = property(lambda self: self.path / REFIT_FILE)
    folds = property(lambda self: self.path / FOLDS_FILE)

    def fold_split(self, fold: int) -> Path:
        return self.path / f"fold{fold}.parquet"


@dataclass(frozen=True)
class EnsembleDir:
    """One ensemble's folder: ``<ensembles>/<name>``."""

    path: Path

    manifest = property(lambda self: self.path / MANIFEST_FILE)
    predictions = property(lambda self: self.path / PREDICTIONS_FILE)
    report = property(lambda self: self.path / ENSEMBLE_REPORT_FILE)
    methods = property(lambda self: self.path / METHODS_FILE)

    def exported(self, suffix: str) -> Path:
        """The model ``mura-tune export`` writes by default (``model.onnx``, ``model.pt``)."""
        return self.path / f"{EXPORTED_MODEL}{suffix}"


def study_name(experiment: str, scope: str) -> str:
    """The Optuna study of one scope in ``optuna.db``: ``<experiment name>:<scope>``."""
    return f"{experiment}:{scope}"


def ray_trial_dirname(trial_id: str) -> str:
    return f"{RAY_TRIAL_PREFIX}{trial_id}"


def read_json(path: Path) -> dict | None:
    """A JSON file written by mura-tune, or None if it is missing or unreadable (cut short)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_manifest(folder: str | Path) -> dict:
    """An ensemble's ``manifest.json``, checked against :data:`MANIFEST_KEYS`: the one reader
    every consumer (prediction, the HTML report) uses.

    Raises:
        ExperimentError: no folder or manifest, an unreadable one, one without the manifest's keys
            or without generalist members.
    """
    folder = Path(folder).expanduser()
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ExperimentError(
            f"no {MANIFEST_FILE} in ensemble folder {folder} (build one with `mura-tune ensemble`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExperimentError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ExperimentError(
            f"{path} lacks {missing}: not a manifest written by `mura-tune ensemble`"
        )
    if not manifest["ensembles"].get(GENERALIST_ENSEMBLE, {}).get("members"):
        raise ExperimentError(f"{path} lists no generalist ensemble members")
    return manifest
