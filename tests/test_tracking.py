"""``--mlflow``: every trial an MLflow run that agrees with the leaderboard, every ensemble a run too.

One module-scoped search: 3 trials x 2 epochs of custom_cnn at 32 px with ``--mlflow``, the third
trial made to fail (``MURA_TUNE_FAULT=3:raise@1``), so the runs hold an ERROR beside finished (or
ASHA-pruned) trials; then ``mura-tune ensemble`` on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from conftest import run_cli
from helpers import REPO
from mlflow.tracking import MlflowClient

from mura_tune.errors import ConfigError
from mura_tune.layout import ExperimentDir
from mura_tune.search import tracking
from mura_tune.search.plan import SearchPlan

SEARCH_TIMEOUT = 600


@pytest.fixture(scope="module")
def tracked(ray_session, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    args = ["--space", "custom_cnn", "--data", tiny_data, "--num-samples", 3, "--max-epochs", 2,
            "--results", root / "results", "--name", "m", "--cpus-per-trial", 1,
            "--max-failures", 0, "--set", "image_size=32", "--mlflow"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MURA_TUNE_FAULT", "3:raise@1")
        assert run_cli(*args) == 0
    exp = root / "results" / "m"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert run_cli("ensemble", "--experiment", exp, "--out-root", root / "ens") == 0
    uri = f"sqlite:///{exp / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return SimpleNamespace(
        root=root, exp=exp, uri=uri, ens=root / "ens" / "m", stdout=stdout.getvalue(),
        board=pd.read_parquet(exp / "leaderboard.parquet").set_index("trial_id"),
    )  # fmt: skip


def runs(kind: str) -> pd.DataFrame:
    found = mlflow.search_runs(experiment_names=["m"], filter_string=f"tags.kind = '{kind}'")
    return found.set_index("tags.trial_id") if kind == "trial" else found


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_one_run_per_trial_with_the_leaderboards_status_and_kappa(tracked):
    board = tracked.board
    assert set(board["status"]) >= {"ERROR"} and len(board) == 3
    trials = runs("trial")
    assert sorted(trials.index) == sorted(board.index)  # one run per trial, no duplicate
    for trial_id, row in board.iterrows():
        run = trials.loc[trial_id]
        assert run["tags.status"] == row["status"]
        assert (
            run["status"]
            == {"COMPLETED": "FINISHED", "PRUNED": "KILLED", "ERROR": "FAILED"}[row["status"]]
        )
        assert run["tags.scope"] == "all" and run["tags.experiment"] == "m"
        for hp in (c for c in board.columns if c.startswith("hp_") and pd.notna(row[c])):
            assert run[f"params.{hp[3:]}"] == str(row[hp])
        assert run["params.image_size"] == "32"  # the config every trial shares
        if row["status"] == "ERROR":
            assert pd.isna(run.get("tags.checkpoint_path")) and run["tags.reason"] == row["reason"]
            continue
        assert run["metrics.best_val_kappa_study"] == row["val_kappa_study"]
        history = MlflowClient(tracked.uri).get_metric_history(run["run_id"], "val_kappa_study")
        assert sorted(m.step for m in history) == list(range(1, int(row["epochs"]) + 1))
        assert max(m.value for m in history) == pytest.approx(
            row["val_kappa_study"]
        )  # epoch by epoch
        assert run["tags.checkpoint_path"] == row["checkpoint_path"]
        assert run["tags.predictions_path"] == row["predictions_path"]
        assert run["metrics.test_kappa_study"] == pytest.approx(row["test_kappa_study"])


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_ensemble_is_logged_as_a_run(tracked):
    assert "logged the ensemble as MLflow run" in tracked.stdout
    (run,) = runs("ensemble").to_dict("records")
    manifest = json.loads((tracked.ens / "manifest.json").read_text())
    report = json.loads((tracked.ens / "report.json").read_text())
    members = manifest["ensembles"]["generalist"]["members"]
    assert run["params.members.generalist"] == ", ".join(
        f"{m['trial_id']}:{m['weight']:.4g}" for m in members
    )
    test = report["models"]["ensemble"]["test"]["overall"]
    assert run["metrics.test_kappa"] == pytest.approx(test["kappa"])
    assert run["metrics.test_kappa_ci_low"] == pytest.approx(test["kappa_ci"][0])
    single = report["models"]["best_single"]["test"]["overall"]
    assert run["metrics.best_single.test_kappa"] == pytest.approx(single["kappa"])
    artifacts = {a.path for a in MlflowClient(tracked.uri).list_artifacts(run["run_id"])}
    assert artifacts == {"manifest.json", "report.json"}
    assert Path(run["artifact_uri"]).is_relative_to(tracked.exp / "mlruns")  # nothing in the cwd


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_resume_keeps_logging_to_the_same_runs(tracked, tmp_path):
    """experiment.json keeps the store, Ray's saved tuner keeps the callback, a resumed trial reopens its run."""
    from mura_tune.search.driver import _trackers
    from mura_tune.search.tracking_callback import TrialRuns

    plan = SearchPlan.for_resume(str(tracked.exp.parent), "m", "custom_cnn", mlflow=True)
    assert plan.mlflow == tracked.uri
    (saved,) = [c for c in pickle.loads((tracked.exp / "tuner.pkl").read_bytes())["_run_config"].callbacks
                if isinstance(c, TrialRuns)]  # fmt: skip
    assert saved.tracking_uri == tracked.uri and isinstance(_trackers(plan, "all")[0], TrialRuns)
    shutil.copy(
        tracked.exp / "mlruns" / "mlflow.db", tmp_path / "mlflow.db"
    )  # leave the module's store as it is
    plan.mlflow = f"sqlite:///{tmp_path / 'mlflow.db'}"
    callback = TrialRuns(plan, "all")
    callback.setup()
    before = callback.mlflow_util._get_client().search_runs([callback.mlflow_util.experiment_id])
    finished = tracked.board[tracked.board["status"] != "ERROR"].index[0]

    class Trial:  # what Ray hands a callback when it restores a trial
        trial_id, config = finished, {}
        last_result = {"trial_finished": True}

    trial = Trial()
    callback.log_trial_start(trial)
    callback.log_trial_result(1, trial, {"epoch": 3, "val_loss": 0.25, "training_iteration": 1})
    callback.log_trial_end(trial)
    client = callback.mlflow_util._get_client()
    after = client.search_runs([callback.mlflow_util.experiment_id])
    assert len(after) == len(before)  # the trial's own run, not a new one
    run_id = callback._trial_runs[trial]
    assert client.get_run(run_id).data.tags["trial_id"] == finished
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")][-1] == (
        3,
        0.25,
    )
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_a_search_without_mlflow_does_not_import_it(tiny_data, tmp_path):
    code = (
        "import sys\n"
        "from mura_tune.cli import main\n"
        f"code = main(['--space', 'custom_cnn', '--data', {str(tiny_data)!r}, '--num-samples', '1',\n"
        f"             '--max-epochs', '1', '--results', {str(tmp_path)!r}, '--name', 'plain',\n"
        "             '--cpus-per-trial', '1', '--set', 'image_size=16'])\n"
        "print('RESULT', code, 'mlflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            timeout=SEARCH_TIMEOUT)  # fmt: skip
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT")]
    assert line == ["RESULT 0 False"], result.stdout[-2000:] + result.stderr[-2000:]
    assert not ExperimentDir(tmp_path / "plain").mlruns.exists()
    assert json.loads((tmp_path / "plain" / "experiment.json").read_text())["mlflow"] is None


# --------------------------------------------------------------------------- no search needed
def test_store_uri_defaults_to_the_experiment_folder(tmp_path):
    exp = ExperimentDir(tmp_path / "results" / "x")
    assert tracking.store_uri(True, exp) == f"sqlite:///{tmp_path}/results/x/mlruns/mlflow.db"
    assert tracking.store_uri("http://localhost:5000", exp) == "http://localhost:5000"
    assert tracking.store_uri("sqlite:///a.db", exp) == "sqlite:///a.db"
    assert tracking.store_uri(str(tmp_path / "runs"), exp) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert tracking.store_uri(str(tmp_path / "t.db"), exp) == f"sqlite:///{tmp_path}/t.db"
    plan = SearchPlan(space="custom_cnn", results=str(tmp_path / "results"), name="x", mlflow=True)
    assert plan.mlflow == tracking.store_uri(True, exp)
    assert SearchPlan(space="custom_cnn", results=str(tmp_path), name="y").mlflow is None


def test_mlflow_errors_are_one_line(tmp_path, monkeypatch, capsys):
    plan = SearchPlan(space="custom_cnn", results=str(tmp_path), name="plain")
    plan.save()
    code = run_cli(
        "--space", "custom_cnn", "--results", tmp_path, "--name", "plain", "--resume", "--mlflow"
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "was started without --mlflow" in err[0], err
    with pytest.raises(ConfigError, match="cannot open the MLflow store"):
        tracking.open_experiment(
            f"file://{tmp_path}/filestore", "x"
        )  # MLflow refuses its file store
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda n: None if n == "mlflow" else real(n)
    )
    with pytest.raises(
        ConfigError, match=r"--mlflow needs MLflow: pip install 'mura-tune\[mlflow\]'"
    ):
        SearchPlan(space="custom_cnn", results=str(tmp_path), name="z", mlflow=True)


def test_ensemble_store_follows_the_search(tmp_path, monkeypatch, caplog):
    """``ensemble`` logs where the search logged, or where --mlflow says; without MLflow it says so."""
    tracked = SearchPlan(space="custom_cnn", results=str(tmp_path), name="t", mlflow=True)
    tracked.save()
    SearchPlan(space="custom_cnn", results=str(tmp_path), name="u").save()
    assert tracking.ensemble_store(tmp_path / "t", None) == (tracked.mlflow, "t")
    assert tracking.ensemble_store(tmp_path / "u", None) is None
    assert tracking.ensemble_store(tmp_path / "u", True) == (
        f"sqlite:///{tmp_path}/u/mlruns/mlflow.db",
        "u",
    )
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda n: None if n == "mlflow" else real(n)
    )
    with caplog.at_level("WARNING"):
        assert tracking.ensemble_store(tmp_path / "t", None) is None
    assert "MLflow is not installed" in caplog.text
    with pytest.raises(ConfigError, match=r"pip install 'mura-tune\[mlflow\]'"):
        tracking.ensemble_store(tmp_path / "u", True)
