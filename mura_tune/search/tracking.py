"""MLflow tracking: every trial of a search is an MLflow run, and so is every ensemble built from it.

    mura-tune --space custom_cnn --mlflow                  # results/<name>/mlruns/mlflow.db
    mlflow ui --backend-store-uri sqlite:///results/<name>/mlruns/mlflow.db

``--mlflow`` alone keeps the runs inside the experiment folder: ``mlruns/mlflow.db`` (MLflow's
SQLite store; its plain-folder store is in maintenance mode and refused by default since MLflow 3)
with artifacts in ``mlruns/artifacts``. ``--mlflow URI`` logs elsewhere: a tracking server
(``http://host:5000``), a database (``sqlite:///path.db``), or a folder (its ``mlflow.db``). The
MLflow experiment is named after the mura-tune experiment; the choice is saved in
``experiment.json``, so ``--resume`` keeps logging to the same runs.

Per trial (:class:`~mura_tune.search.tracking_callback.TrialRuns`, Ray Tune's
``MLflowLoggerCallback`` with a run per trial id): the hyperparameters (the searched ones and
the config every trial shares) as params, every reported epoch's metrics with ``step = epoch``
(as the trial reports them: ``val_kappa_study`` is the kept checkpoint's, ``epoch_val_kappa_study``
the epoch's own), and once the leaderboard is built (:func:`record_leaderboard`) its word on the
trial: tag ``status`` (COMPLETED, PRUNED or ERROR, with ``reason``), tags ``checkpoint_path``,
``predictions_path`` and ``trial_dir``, ``best_val_kappa_study`` (the leaderboard's val kappa), the
test metrics of the chosen checkpoint, and MLflow's own run status (FINISHED, KILLED for a pruned
trial, FAILED). Per ensemble (:func:`log_ensemble`): its settings, members and weights per route,
routing, val and test figures, with ``manifest.json`` and ``report.json`` as artifacts.

MLflow is imported only by these functions (a search without ``--mlflow`` never imports it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

from mura_tune.errors import ConfigError
from mura_tune.layout import (
    MLFLOW_DB,
    EnsembleDir,
    ExperimentDir,
    TrialStatus,
    read_json,
    read_manifest,
)

log = logging.getLogger(__name__)

#: Run tags that mura-tune sets (the leaderboard's words).
TAG_KIND, TAG_TRIAL, TAG_STATUS = "kind", "trial_id", "status"
#: MLflow's own run status for each leaderboard status (unfinished trials: KILLED until resumed).
RUN_STATUS = {
    TrialStatus.COMPLETED: "FINISHED",
    TrialStatus.PRUNED: "KILLED",
    TrialStatus.ERROR: "FAILED",
}
STOPPED = "KILLED"
ARTIFACTS_DIR = "artifacts"
SCHEME = ("://", "sqlite:", "databricks", "file:")


def store_uri(value: str | bool, experiment: ExperimentDir) -> str:
    """The tracking URI ``--mlflow [VALUE]`` names.

    ``True`` (the flag alone): the experiment's own SQLite store, ``<exp>/mlruns/mlflow.db``;
    a URI (``http://...``, ``sqlite:///...``, ``file:///...``, ``databricks``) as it is; a
    ``.db`` path: that SQLite file; any other path: the ``mlflow.db`` in that folder.

    Raises:
        ConfigError: MLflow is not installed.
    """
    require_mlflow()
    if value is True or value == "":
        return _sqlite(experiment.mlruns / MLFLOW_DB)
    text = str(value)
    if any(mark in text for mark in SCHEME):
        return text
    path = Path(text).expanduser().resolve()
    return _sqlite(path if path.suffix == ".db" else path / MLFLOW_DB)


def require_mlflow() -> None:
    """Refuse ``--mlflow`` in one line when the ``mlflow`` extra is not installed."""
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("--mlflow needs MLflow: pip install 'mura-tune[mlflow]'")


def ensemble_store(experiment: str | Path, mlflow: str | bool | None) -> tuple[str, str] | None:
    """Where ``mura-tune ensemble`` logs its run: ``(tracking URI, MLflow experiment)``, or None.

    ``mlflow`` is the ``--mlflow`` flag (``True``, a URI or a folder, as :func:`store_uri`); without
    it, the store the search saved in ``experiment.json`` if it ran with ``--mlflow`` (skipped with a
    warning when MLflow is no longer installed). The MLflow experiment is the search's name.

    Raises:
        ConfigError: ``--mlflow`` given, and MLflow is not installed.
    """
    exp = ExperimentDir(Path(experiment).expanduser().resolve())
    saved = read_json(exp.plan) or {}
    name = saved.get("name") or exp.path.name
    if mlflow is not None:
        return store_uri(mlflow, exp), name
    if not saved.get("mlflow"):
        return None
    if importlib.util.find_spec("mlflow") is None:
        log.warning(
            f"the search logged to MLflow ({saved['mlflow']}) but MLflow is not installed: the "
            "ensemble is not logged (pip install 'mura-tune[mlflow]')"
        )
        return None
    return saved["mlflow"], name


def _sqlite(path: Path) -> str:
    return f"sqlite:///{path}"


def artifact_root(uri: str) -> str | None:
    """Where a new MLflow experiment keeps its artifacts: beside a local SQLite store (else MLflow's default)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR)
    return None


def open_experiment(uri: str, name: str):
    """``(MlflowClient, experiment id)`` of MLflow experiment ``name`` at ``uri``, created if new.

    Raises:
        ConfigError: MLflow is not installed, or the store cannot be opened or written (one line:
            MLflow's reason).
    """
    require_mlflow()
    for noisy in ("mlflow", "alembic"):  # table creation and migration notes
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(name)
        if found is not None:
            return client, found.experiment_id
        return client, client.create_experiment(name, artifact_location=artifact_root(uri))
    except (MlflowException, OSError) as exc:
        first = str(getattr(exc, "message", exc)).strip().splitlines()[0]
        raise ConfigError(f"--mlflow {uri}: cannot open the MLflow store ({first})") from None


def trial_runs(client, experiment_id: str) -> dict[str, object]:
    """The MLflow run of every trial of an experiment, by trial id (the newest if there are several)."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.{TAG_KIND} = 'trial'", max_results=50_000
    )
    by_trial: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        by_trial[run.data.tags.get(TAG_TRIAL)] = run
    return by_trial


def record_leaderboard(uri: str, name: str, board) -> int:
    """Give every trial's run the leaderboard's verdict: status, reason, paths, test metrics.

    Args:
        uri: the tracking URI.
        name: the MLflow experiment (the mura-tune experiment's name).
        board: the leaderboard (:func:`~mura_tune.search.leaderboard.build_leaderboard`).

    Returns:
        The number of runs updated (trials without a run, e.g. started before ``--mlflow``, are skipped).
    """
    client, experiment_id = open_experiment(uri, name)
    runs = trial_runs(client, experiment_id)
    updated = 0
    for row in board.to_dict("records"):
        run = runs.get(row["trial_id"])
        if run is None:
            continue
        run_id, status = run.info.run_id, TrialStatus(row["status"])
        tags = {TAG_STATUS: status.value}
        for key in ("reason", "checkpoint_path", "predictions_path", "trial_dir"):
            if isinstance(row.get(key), str) and row[key]:
                tags[key] = row[key]
        for key, value in tags.items():
            if run.data.tags.get(key) != value:
                client.set_tag(run_id, key, value)
        step = int(row.get("epochs") or 0)
        best = _number(row.get("val_kappa_study"))
        if best is not None and run.data.metrics.get("best_val_kappa_study") != best:
            client.log_metric(run_id, "best_val_kappa_study", best, step=step)
        for key in ("test_kappa_study", "test_auc"):
            value = _number(row.get(key))
            if value is not None and run.data.metrics.get(key) != value:
                client.log_metric(run_id, key, value, step=step)
        wanted = RUN_STATUS.get(status, STOPPED)
        if run.info.status != wanted:
            client.set_terminated(run_id, status=wanted)
        updated += 1
    return updated


def log_ensemble(uri: str, name: str, ensemble_dir: str | Path) -> str:
    """Log a built ensemble as one MLflow run of experiment ``name``; returns the run id.

    Params: the selection settings, each route's members with weights (``members.<route>``:
    ``trial_id:weight, ...``) and each part's routing; metrics: every overall figure of every
    model in ``report.json`` on val and test (``test_kappa``, ``best_single.test_kappa``, ...);
    artifacts: ``manifest.json`` and ``report.json``.
    """
    folder = EnsembleDir(Path(ensemble_dir).expanduser().resolve())
    manifest = read_manifest(folder.path)
    report = read_json(folder.report) or {}
    client, experiment_id = open_experiment(uri, name)
    run = client.create_run(
        experiment_id,
        run_name=f"ensemble {manifest.get('name')}",
        tags={TAG_KIND: "ensemble", "ensemble_dir": str(folder.path)},
    )
    run_id = run.info.run_id
    params = {f"settings.{k}": v for k, v in (manifest.get("settings") or {}).items()}
    for route, ens in manifest["ensembles"].items():
        if ens.get("used", True):
            params[f"members.{route}"] = ", ".join(
                f"{m['trial_id']}:{float(m['weight']):.4g}" for m in ens.get("members", [])
            )
    for part, routing in (manifest.get("routing") or {}).items():
        params[f"routing.{part}"] = routing.get("served_by")
    for key, value in params.items():
        client.log_param(
            run_id, key, json.dumps(value) if isinstance(value, (dict, list)) else value
        )
    for model, entry in (report.get("models") or {}).items():
        prefix = "" if model == "ensemble" else f"{model}."
        for split in ("val", "test"):
            overall = ((entry or {}).get(split) or {}).get("overall") or {}
            for metric, value in overall.items():
                if isinstance(value, list) and len(value) == 2:  # "kappa_ci": [low, high]
                    pairs = [(f"{metric}_low", value[0]), (f"{metric}_high", value[1])]
                else:
                    pairs = [(metric, value)]
                for key, number in pairs:
                    if (number := _number(number)) is not None:
                        client.log_metric(run_id, f"{prefix}{split}_{key}", number)
    for path in (folder.manifest, folder.report):
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def _number(value) -> float | None:
    """``value`` as a finite float, or None (NaN, missing, not a number)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
