"""One Parquet leaderboard per experiment: a row per trial, sorted by the shared metric.

Built from each trial's own files (``trials/<id>/trial.json``, ``summary.json``, ``metrics.parquet``,
``error.json``) and from Ray's saved experiment state (read as JSON, without Ray and without
unpickling anything), which says whether a trial finished, was stopped by ASHA, errored or is
still pending. Works for finished, running, interrupted and killed experiments alike. Errored
trials keep their reason but never a score: their val/test metrics are NaN and they rank last.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from mura_tune.constants import METRIC, MODE
from mura_tune.errors import ExperimentError
from mura_tune.io import write_parquet
from mura_tune.layout import (
    NO_SCORE,
    RUN_ENDED,
    TRIAL_FILE,
    UNFINISHED,
    ExperimentDir,
    TrialDir,
    TrialStatus,
    read_json,
)
from mura_tune.metrics import bootstrap_intervals, split_metrics, study_table

FIRST_COLUMNS = [
    "experiment",
    "trial_id",
    "space",
    "scope",
    "refit_of",
    "fold",
    "status",
    "reason",
    "epochs",
    "best_epoch",
    METRIC,
]


def read_ray_state(folder: str | Path) -> dict[str, dict] | None:
    """Ray's newest saved experiment state of one Ray experiment folder, read as plain JSON.

    Returns ``trial_id -> {status, last_result, failures, error_file}`` (``None`` if Ray has not
    saved a state there yet). The file also embeds cloudpickled objects; they are never
    unpickled here, so reading a leaderboard cannot run code from the experiment folder.
    """
    files = sorted(Path(folder).glob("experiment_state-*.json"))  # Ray's own rule: the newest name
    for path in reversed(files):
        try:
            trial_data = json.loads(path.read_text())["trial_data"]
            states = {}
            for trial_json, meta_json in trial_data:
                trial, meta = json.loads(trial_json), json.loads(meta_json)
                error_file = meta.get("error_filename")
                states[trial["trial_id"]] = {
                    "status": trial["status"],
                    "last_result": meta.get("last_result") or {},
                    "failures": int(meta.get("num_failures") or 0),
                    "error_file": str(Path(folder) / trial.get("relative_logdir", "") / error_file)
                    if error_file
                    else None,
                }
            return states
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a state file cut short: fall back to the previous one
    return None


def _ray_trial_states(exp: ExperimentDir) -> dict[str, dict]:
    """trial_id -> Ray's record, from every Ray experiment folder (main scope and specialists)."""
    states: dict[str, dict] = {}
    for folder in exp.ray_dirs():
        states.update(read_ray_state(folder) or {})
    return states


def _ray_error_line(state: dict) -> str | None:
    """The last line of Ray's error.txt (e.g. ``ActorDiedError: ...`` when a node was lost)."""
    try:
        lines = [
            ln.strip() for ln in Path(state["error_file"]).read_text().splitlines() if ln.strip()
        ]
    except (OSError, TypeError):
        return None
    return lines[-1][:300] if lines else None


def _status(
    ray_state: dict | None, summary: dict | None, error: dict | None, recovered: dict | None = None
) -> tuple[TrialStatus, str | None]:
    """(status, reason) of one trial from Ray's record and the trial's own files.

    Ray's record decides whether a trial errored, is unfinished or was stopped by ASHA; the
    trial's ``summary.json`` is written before Ray hears of the last epoch, so a final summary
    means COMPLETED even if the driver stopped before Ray saved that. ``error.json`` of an
    attempt that Ray retried successfully is not an error. (Ray's own status names are
    TrialStatus's uppercase words; ``recovered.json`` holds Optuna's state name.)
    """
    final = (summary or {}).get("status")
    reason = (error or {}).get("reason") or (summary or {}).get("reason")
    if final == TrialStatus.DIVERGED:
        return TrialStatus.ERROR, reason
    if ray_state is not None and ray_state["status"] == TrialStatus.ERROR:
        return TrialStatus.ERROR, reason or _ray_error_line(
            ray_state
        ) or "trial failed (see Ray's error.txt)"
    if final in RUN_ENDED:
        return TrialStatus.COMPLETED, None
    if ray_state is None:
        told = (recovered or {}).get("optuna_state")  # only Optuna saw it end (written by --resume)
        if error is not None or told == "FAIL":
            return TrialStatus.ERROR, reason or "trial failed"
        if told == "PRUNED":
            return TrialStatus.PRUNED, "stopped by ASHA"
        return (
            TrialStatus.RUNNING,
            "not in Ray's saved state (just started, or the driver stopped first; --resume re-runs it)",
        )
    if ray_state["status"] in UNFINISHED:
        return TrialStatus(ray_state["status"]), None
    if ray_state["last_result"].get("trial_finished"):
        return TrialStatus.COMPLETED, None
    return TrialStatus.PRUNED, "stopped by ASHA"


def build_leaderboard(exp_dir: str | Path, write: bool = True) -> pd.DataFrame:
    """Collect every trial of an experiment into one sorted DataFrame (and ``leaderboard.parquet``).

    Raises:
        ExperimentError: the folder does not exist or holds no trials.
    """
    exp = ExperimentDir(Path(exp_dir).expanduser().resolve())
    if not exp.path.is_dir():
        raise ExperimentError(f"experiment folder not found: {exp.path}")
    trials = exp.trial_dirs()
    if not trials:
        raise ExperimentError(f"no trials in {exp.path} (expected {exp.trials}/<id>/{TRIAL_FILE})")
    ray_states = _ray_trial_states(exp)
    # Dimensions the user fixed with --set: not searched, shown with their value in every row.
    pinned = (read_json(exp.plan) or {}).get("fixed_dimensions") or {}
    rows = []
    for trial in trials:
        try:
            meta, summary, error, recovered, metrics, predictions = read_trial_files(trial)
        except DamagedFile as exc:  # reported in its row; the other trials still rank
            rows.append(_damaged_row(exp, trial, exc))
            continue
        ray_state = ray_states.get(meta.get("ray_trial_id") or meta["trial_id"])
        status, reason = _status(ray_state, summary, error, recovered)
        row = {
            "experiment": exp.path.name,
            "trial_id": meta["trial_id"],
            "space": meta["space"],
            "scope": meta["scope"],
            "status": status.value,
            "reason": reason,
        }
        row["epochs"] = int(len(metrics)) if metrics is not None else 0
        best_val, best_test, best_epoch = {}, {}, None
        if (
            metrics is not None
            and "best_epoch" in metrics
            and len(metrics.dropna(subset=["best_epoch"]))
        ):
            best_epoch = int(metrics["best_epoch"].dropna().iloc[-1])
            if best_epoch > 0:
                best_row = metrics[metrics["epoch"] == best_epoch].iloc[0]
                best_val = {k: best_row[k] for k in metrics.columns if k.startswith("val_")}
        best_pt, preds_path = trial.checkpoint, trial.predictions
        if summary is not None and summary.get("test"):
            best_test = summary["test"]
        elif predictions is not None:
            test = predictions[predictions["split"] == "test"]
            best_test = split_metrics(test, "test") if len(test) else {}
        row["best_epoch"] = best_epoch
        failed = status == TrialStatus.ERROR
        if failed:
            best_val = {}  # errors are never reported as scores
        row.update({k: _float(v) for k, v in best_val.items()})
        row.update({k: _float(v) for k, v in best_test.items()} if not failed else {})
        if predictions is not None and not failed:
            row.update(kappa_intervals(predictions))
        for key, value in {**pinned, **meta["params"]}.items():
            row[f"hp_{key}"] = value
        row["checkpoint_path"] = str(best_pt) if best_pt.exists() and not failed else None
        row["predictions_path"] = (
            str(preds_path) if predictions is not None and not failed else None
        )
        row["wall_seconds"] = _float(
            (summary or {}).get(
                "wall_seconds",
                metrics["epoch_seconds"].sum()
                if metrics is not None and "epoch_seconds" in metrics
                else math.nan,
            )
        )
        row["device"] = (summary or {}).get("device")
        # N of Ray's trial name t<N>_<id>: the order the searcher created it in, in its scope.
        row["trial_index"] = meta.get("index")
        row["node_id"] = meta.get("node_id")  # the Ray node of the last attempt
        attempts = meta.get("attempts") or [{"node_id": meta.get("node_id")}]
        row["attempts"] = len(attempts)
        row["node_ids"] = ",".join(dict.fromkeys(str(a.get("node_id")) for a in attempts))
        row["failures"] = int((ray_state or {}).get("failures", 0))
        if "refit_of" in meta:  # a fold model of a cross-validated refit (search/refit.py)
            row["refit_of"], row["fold"] = meta["refit_of"], int(meta["fold"])
        row["weights_source"] = (summary or {}).get("weights_source") or meta.get("weights_source")
        row["trial_dir"] = str(trial.path)
        rows.append(row)
    board = _typed(pd.DataFrame(rows))
    if METRIC not in board:
        board[METRIC] = np.nan
    # Errors (and damaged trials) rank last whatever they reported; then the metric, NaN last.
    board["_error"] = board["status"].isin(NO_SCORE)
    board = board.sort_values(
        ["_error", METRIC], ascending=[True, MODE == "min"], na_position="last", kind="stable"
    )
    board = board.drop(columns="_error").reset_index(drop=True)
    if "refit_of" in board:
        # Fold models come after the search's trials (their val is a held-out fold, not the search's
        # val), in the order of the configuration they refit, then by fold.
        search = board[board["refit_of"].isna()]
        order = {t: i for i, t in enumerate(search["trial_id"])}
        refits = board[board["refit_of"].notna()]
        refits = refits.assign(_by=refits["refit_of"].map(order)).sort_values(
            ["_by", "refit_of", "fold"], kind="stable"
        )
        board = pd.concat([search, refits.drop(columns="_by")], ignore_index=True)
        board["fold"] = board["fold"].astype("Int64")
    board.insert(0, "rank", np.arange(1, len(board) + 1))
    ordered = (
        ["rank"]
        + [c for c in FIRST_COLUMNS if c in board]
        + [c for c in board if c not in FIRST_COLUMNS and c != "rank"]
    )
    board = board[ordered]
    if write:
        write_parquet(exp.leaderboard, board)
    return board


class DamagedFile(Exception):
    """A trial file that exists but cannot be read (cut short, not JSON/Parquet, missing fields)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"damaged file {path}: {why}")
        self.path = path


#: What a trial's files must hold to be read (``trial.json`` keys, Parquet columns).
TRIAL_KEYS = ("trial_id", "space", "scope", "params")
METRICS_COLUMNS = ("epoch",)
PREDICTIONS_COLUMNS = ("study_id", "label", "split", "prob")


def read_trial_files(trial: TrialDir):
    """``(trial.json, summary, error, recovered, metrics, predictions)`` of one trial; the optional
    ones are None when absent.

    Raises:
        DamagedFile: one of them exists but cannot be read, or lacks what the leaderboard needs.
    """
    meta = _json_file(trial.trial_json)
    if (
        meta is None
        or any(k not in meta for k in TRIAL_KEYS)
        or not isinstance(meta["params"], dict)
    ):
        raise DamagedFile(trial.trial_json, f"needs the keys {', '.join(TRIAL_KEYS)}")
    json_files = (_json_file(trial.summary), _json_file(trial.error), _json_file(trial.recovered))
    tables = (
        _parquet_file(trial.metrics, METRICS_COLUMNS),
        _parquet_file(trial.predictions, PREDICTIONS_COLUMNS),
    )
    return (meta, *json_files, *tables)


def _json_file(path: Path) -> dict | None:
    if not path.exists():
        return None
    value = read_json(path)
    if value is None:
        raise DamagedFile(path, "not a JSON object (cut short?)")
    return value


def _parquet_file(path: Path, columns: tuple[str, ...]) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow's errors for a cut-short or foreign file
        raise DamagedFile(
            path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        ) from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DamagedFile(path, f"lacks columns {missing}")
    return frame


def _damaged_row(exp: ExperimentDir, trial: TrialDir, exc: DamagedFile) -> dict:
    """A damaged trial's row: named, with the file and why, never a score."""
    meta = read_json(trial.trial_json) or {}
    return {
        "experiment": exp.path.name,
        "trial_id": str(meta.get("trial_id") or trial.trial_id),
        "space": meta.get("space"),
        "scope": meta.get("scope"),
        "status": TrialStatus.DAMAGED.value,
        "reason": str(exc),
        "epochs": 0,
        "checkpoint_path": None,
        "predictions_path": None,
        "trial_dir": str(trial.path),
    }


def kappa_intervals(predictions: pd.DataFrame) -> dict[str, float]:
    """95% bootstrap interval (1,000 resamples of studies) of the val and test study kappa of a checkpoint's predictions.

    Returns ``{"val_kappa_study_ci_low", "val_kappa_study_ci_high", "test_..."}`` (NaN for an absent split).
    """
    out = {}
    for split in ("val", "test"):
        rows = predictions[predictions["split"] == split]
        low = high = math.nan
        if len(rows):
            studies = study_table(rows)
            ci = bootstrap_intervals(
                studies["label"], studies["prob"], n_boot=1000, seed=0, auc=False
            )
            low, high = ci["kappa"]
        out[f"{split}_kappa_study_ci_low"], out[f"{split}_kappa_study_ci_high"] = low, high
    return out


def _typed(board: pd.DataFrame) -> pd.DataFrame:
    """One Arrow type per column (mixed hyperparameter values, e.g. unfreeze_blocks 0..3 | "all", become strings)."""
    for col in board.columns:
        values = board[col].dropna()
        kinds = {type(v) for v in values}
        if len(kinds) > 1 and not kinds <= {int, float}:
            board[col] = board[col].map(
                lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            )
        elif kinds == {list}:
            board[col] = board[col].map(
                lambda v: [int(x) for x in v] if isinstance(v, list) else None
            )
    return board


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_leaderboard(exp_dir: str | Path) -> pd.DataFrame:
    """The experiment's ``leaderboard.parquet``, built first if a search stopped before writing it."""
    path = ExperimentDir(Path(exp_dir)).leaderboard
    return pd.read_parquet(path) if path.exists() else build_leaderboard(exp_dir)


def format_leaderboard(board: pd.DataFrame, top: int = 10) -> str:
    cols = [
        "rank",
        "trial_id",
        "scope",
        "status",
        "epochs",
        METRIC,
        "val_auc",
        "val_loss",
        "test_kappa_study",
    ]
    hp = [c for c in board.columns if c.startswith("hp_")][:6]
    view = board[[c for c in cols + hp if c in board]].head(top).copy()
    view.columns = [c.removeprefix("hp_") for c in view.columns]
    counts = board["status"].value_counts().to_dict()
    head = f"leaderboard: {len(board)} trials ({', '.join(f'{k} {v}' for k, v in counts.items())}); test is shown, never used for ranking"
    return (
        head
        + "\n"
        + view.to_string(index=False, float_format=lambda v: f"{v:.3f}")
        + _best_line(board)
    )


def _best_line(board: pd.DataFrame) -> str:
    """The top trial's val and test study kappa with their bootstrap intervals (empty if not available)."""
    if (
        board.empty
        or "val_kappa_study_ci_low" not in board
        or not np.isfinite(board[METRIC].iloc[0])
    ):
        return ""
    best = board.iloc[0]

    def ci(split: str) -> str:
        value, low, high = (
            best.get(f"{split}_kappa_study{s}", math.nan) for s in ("", "_ci_low", "_ci_high")
        )
        return f"{split} study kappa {value:.3f} [{low:.3f}, {high:.3f}]"

    return (
        f"\nbest trial {best['trial_id']}: {ci('val')}, {ci('test')} "
        "(95% bootstrap intervals over studies; the best of many val scores is optimistic, its test score is not)"
    )
