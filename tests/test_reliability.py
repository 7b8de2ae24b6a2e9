"""Reliability: driver crashes and Ctrl-C, trial faults, atomic writes, untrusted files (issue 7).

The searches here are as small as a real search gets (custom_cnn, 32 px, tiny_data, 2 epochs,
1 CPU per trial); the crash test runs its drivers as real subprocesses in their own process
group, so SIGKILL takes the driver's local Ray down with it, as a crashed machine would.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import run_cli
from helpers import REPO, search_plan, wait_for

from mura_tune.constants import METRIC

SEARCH = ("--space", "custom_cnn", "--cpus-per-trial", 1, "--set", "image_size=32", "--seed", 3)


# --- helpers -------------------------------------------------------------------------------------
def _start(args, log: Path) -> subprocess.Popen:
    """``mura-tune ARGS`` as a subprocess leading its own process group (its local Ray included)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mura_tune", *map(str, args)],
            cwd=REPO,
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _finished(exp: Path) -> set[str]:
    """Trials whose final summary.json is written (completed or early-stopped)."""
    done = set()
    for path in exp.glob("trials/*/summary.json"):
        try:
            if json.loads(path.read_text()).get("status") in ("completed", "early_stopped"):
                done.add(path.parent.name)
        except (OSError, ValueError):
            pass
    return done


def _fingerprint(trial_dir: Path) -> dict:
    return {
        name: ((trial_dir / name).stat().st_mtime_ns, (trial_dir / name).read_bytes())
        for name in ("metrics.parquet", "best.pt", "predictions.parquet")
    }


# --- 2. driver crash (SIGKILL) and Ctrl-C (SIGINT) ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_driver_sigkill_then_sigint_then_resume(tiny_data, ray_session, tmp_path):
    """SIGKILL after a finished trial, resume, Ctrl-C mid-search (exit 130 + the exact resume
    command), resume again: N trials, nothing finished lost or re-run, the searcher continued."""
    n, name, results = 4, "crash", tmp_path / "results"
    exp = results / name
    args = (
        *SEARCH,
        "--data",
        tiny_data,
        "--num-samples",
        n,
        "--max-epochs",
        2,
        "--grace-period",
        2,
        "--max-concurrent",
        1,
        "--results",
        results,
        "--name",
        name,
    )

    # 1) SIGKILL the driver (and its whole process group: its local Ray dies too) after >= 1 finished trial.
    proc = _start(args, tmp_path / "run1.log")
    try:
        wait_for(lambda: _finished(exp), proc, tmp_path / "run1.log")
    finally:
        _stop_group(proc)
    assert proc.returncode == -signal.SIGKILL
    before = {t: _fingerprint(exp / "trials" / t) for t in _finished(exp)}
    study = optuna.load_study(study_name=f"{name}:all", storage=f"sqlite:///{exp / 'optuna.db'}")
    params_before = {t.user_attrs["ray_trial_id"]: t.params for t in study.trials if t.user_attrs}
    # Every finished trial was asked (Optuna may not have heard its end yet: --resume tells it).
    assert set(before) <= set(params_before)

    # 2) --resume, then Ctrl-C (SIGINT to the driver) once a trial of this run has started.
    resume = ("--space", "custom_cnn", "--results", results, "--name", name, "--resume")
    proc = _start(resume, tmp_path / "run2.log")
    started_before = {p.parent.name for p in exp.glob("trials/*/trial.json")}
    try:
        wait_for(
            lambda: {p.parent.name for p in exp.glob("trials/*/trial.json")} - started_before,
            proc,
            tmp_path / "run2.log",
        )
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(180)
    finally:
        _stop_group(proc)
    log = (tmp_path / "run2.log").read_text()
    assert proc.returncode == 130, log[-3000:]
    assert "Traceback" not in log
    line = next(ln for ln in log.splitlines() if "Resume with: " in ln)
    command = shlex.split(line.split("Resume with: ", 1)[1])
    assert command[0] == "mura-tune" and "--resume" in command and name in command

    # 3) Run exactly the printed command (in-process, on the session's Ray) to the end.
    assert run_cli(*command[1:]) == 0
    board = pd.read_parquet(exp / "leaderboard.parquet")
    assert len(board) == n and board["trial_id"].is_unique
    assert set(board["status"]) <= {"COMPLETED", "PRUNED"}, board[["trial_id", "status", "reason"]]
    for trial_id, fingerprint in before.items():  # finished before the kill: untouched
        assert _fingerprint(exp / "trials" / trial_id) == fingerprint, trial_id
        assert board.set_index("trial_id").loc[trial_id, "status"] == "COMPLETED"
    for trial_dir in map(Path, board["trial_dir"]):
        assert pd.read_parquet(trial_dir / "metrics.parquet")["epoch"].tolist() == [1, 2]
    study = optuna.load_study(study_name=f"{name}:all", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.trials) == n and all(t.state.is_finished() for t in study.trials)
    params_after = {t.user_attrs["ray_trial_id"]: t.params for t in study.trials}
    for trial_id in before:
        assert params_after[trial_id] == params_before[trial_id]
    for params in params_before.values():  # nothing asked before the kill was dropped or changed
        assert params in [t.params for t in study.trials]
    assert set(params_after) == set(board["trial_id"])
    # The searcher continued (n distinct proposals), it did not start over.
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == n


def test_resume_recovers_trials_ray_never_recorded(tmp_path):
    """The races a SIGKILL leaves, made deterministic: Ray's saved state knows trial ``known``;
    ``done`` finished and ``half`` was mid-run after that save, and Optuna heard neither end."""
    from mura_tune.search.leaderboard import build_leaderboard
    from mura_tune.search.recovery import recover_scope

    exp = tmp_path / "x"
    plan = search_plan(exp, num_samples=4, scopes={"all": 4})
    exp.mkdir()
    study = optuna.create_study(
        study_name="x:all", storage=f"sqlite:///{exp / 'optuna.db'}", direction="maximize"
    )
    for ray_id in ("known", "done", "half", "asked"):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        trial.set_user_attr("ray_trial_id", ray_id)
    for ray_id, rows in (("known", 1), ("done", 2), ("half", 1)):
        trial_dir = exp / "trials" / ray_id
        trial_dir.mkdir(parents=True)
        (trial_dir / "trial.json").write_text(
            json.dumps(
                {"trial_id": ray_id, "space": "custom_cnn", "scope": "all", "params": {"lr": 1e-3}}
            )
        )
        pd.DataFrame(
            {
                "epoch": range(1, rows + 1),
                METRIC: [0.1 * e for e in range(1, rows + 1)],
                "best_epoch": range(1, rows + 1),
            }
        ).to_parquet(trial_dir / "metrics.parquet")
    (exp / "trials" / "done" / "summary.json").write_text(
        json.dumps({"status": "completed", "epochs": 2})
    )
    ray_trial = {"trial_id": "known", "status": "RUNNING", "relative_logdir": "ray-known"}
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [[json.dumps(ray_trial), json.dumps({"last_result": {}})]]})
    )

    moved, requeued = recover_scope(plan, "all")
    assert moved == ["half"] and requeued == 2  # "half" and "asked" (never started) run again
    assert (exp / "orphaned" / "half" / "trial.json").exists() and not (
        exp / "trials" / "half"
    ).exists()
    states = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    assert states["done"].state.name == "COMPLETE" and states["done"].value == pytest.approx(0.2)
    assert states["done"].intermediate_values == {1: pytest.approx(0.1), 2: pytest.approx(0.2)}
    assert {k: t.state.name for k, t in states.items() if k != "done"} == {
        "known": "RUNNING",
        "half": "WAITING",
        "asked": "WAITING",
    }
    board = build_leaderboard(exp).set_index("trial_id")
    assert sorted(board.index) == ["done", "known"] and board.loc["done", "status"] == "COMPLETED"
    assert board.loc["known", "status"] == "RUNNING"
    asked = study.ask()  # the resumed searcher's next ask: the re-queued parameters, not new ones
    assert asked.number == states["half"].number


# --- 4. trial faults ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trial_faults_are_errors_never_scores(tiny_data, ray_session, tmp_path, monkeypatch):
    """A trial that raises, one whose loss becomes NaN and one out of memory: ERROR with the reason,
    NaN metrics, ranked last, FAIL in Optuna; the search goes on and the healthy trial completes."""
    monkeypatch.setenv("MURA_TUNE_FAULT", "1:raise@1,2:nan,3:oom@2")
    code = run_cli(
        *SEARCH,
        "--data",
        tiny_data,
        "--num-samples",
        4,
        "--max-epochs",
        2,
        "--grace-period",
        2,
        "--max-concurrent",
        2,
        "--max-failures",
        0,
        "--results",
        tmp_path,
        "--name",
        "faults",
    )
    assert code == 0
    exp = tmp_path / "faults"
    board = pd.read_parquet(exp / "leaderboard.parquet").set_index("trial_index")
    assert sorted(board.index) == [1, 2, 3, 4]
    assert (
        board.loc[[1, 2, 3], "status"].tolist() == ["ERROR"] * 3
        and board.loc[4, "status"] == "COMPLETED"
    )
    assert board.loc[1, "reason"].startswith("RuntimeError: trial failure injected")
    assert "loss became nan" in board.loc[2, "reason"]
    assert board.loc[3, "reason"].startswith("OutOfMemoryError")
    errors = board[board["status"] == "ERROR"]
    assert errors[[METRIC, "val_auc", "val_loss", "test_kappa_study"]].isna().all().all()
    assert errors["checkpoint_path"].isna().all() and errors["predictions_path"].isna().all()
    assert (errors["rank"] > board.loc[4, "rank"]).all()
    study = optuna.load_study(study_name="faults:all", storage=f"sqlite:///{exp / 'optuna.db'}")
    by_ray_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    for _, row in board.iterrows():
        trial = by_ray_id[row["trial_id"]]
        if row["status"] == "ERROR":
            assert trial.state.name == "FAIL" and trial.value is None
            assert 2 not in trial.intermediate_values  # the failed epoch never reached TPE or ASHA
        else:
            assert trial.state.name == "COMPLETE" and trial.value == pytest.approx(row[METRIC])


def test_fault_hook_rejects_malformed_specs():
    from mura_tune.errors import ConfigError
    from mura_tune.search.trainable import parse_faults

    assert parse_faults("raise@2") == {None: ("raise", 2)}
    assert parse_faults("1:nan,3:oom@2") == {1: ("nan", 1), 3: ("oom", 2)}
    for bad in ("explode@1", "raise@x", "a:raise"):
        with pytest.raises(ConfigError, match="MURA_TUNE_FAULT"):
            parse_faults(bad)


# --- 5. atomic outputs ------------------------------------------------------------------------------
WRITER = """
import sys
import numpy as np, pandas as pd
from mura_tune.io import write_json, write_parquet
frame = pd.DataFrame({"x": np.random.default_rng(0).random(400_000), "i": np.arange(400_000)})
print("ready", flush=True)
for i in range(10**9):
    write_parquet(sys.argv[1] + "/board.parquet", frame.assign(i=i))
    write_json(sys.argv[1] + "/manifest.json", {"i": i, "rows": list(range(100_000))})
"""


@pytest.mark.slow
def test_killed_writers_leave_complete_files_or_none(tmp_path):
    """SIGKILL a process rewriting a Parquet and a JSON file, at random moments: each target is
    always absent or complete, and leftover temporaries can't be mistaken for it."""
    import random

    rng, mid_write, kills, seen_leftovers = random.Random(0), 0, 0, 0
    # Kill at random moments, at least 6 times and until some kills have landed inside a write
    # (a kill while the frame is being converted, before the temporary exists, proves nothing).
    while kills < 6 or (mid_write < 2 and kills < 40):
        kills += 1
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        errors = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, f"the writer exited by itself: {errors[-2000:]}"
        board, manifest = tmp_path / "board.parquet", tmp_path / "manifest.json"
        if board.exists():
            assert len(pd.read_parquet(board)) == 400_000
        if manifest.exists():
            assert len(json.loads(manifest.read_text())["rows"]) == 100_000
        leftovers = [p for p in tmp_path.iterdir() if p not in (board, manifest)]
        mid_write += len(leftovers) > seen_leftovers  # this kill left a new temporary behind
        seen_leftovers = len(leftovers)
        assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in leftovers), leftovers
        assert sorted(tmp_path.glob("*.parquet")) in ([], [board]) and sorted(
            tmp_path.glob("*.json")
        ) in ([], [manifest])
    assert mid_write >= 1, f"none of {kills} kills landed in the middle of a write"


# --- 7. untrusted files ------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs code: it touches ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def test_malicious_checkpoint_is_refused(tmp_path, capsys):
    import torch

    from mura_tune.errors import DataError
    from mura_tune.train.checkpoint import load_checkpoint

    marker, evil = tmp_path / "pwned", tmp_path / "best.pt"
    torch.save({"state_dict": {}, "config": _Payload(marker), "epoch": 1}, evil)
    with pytest.raises(DataError) as info:
        load_checkpoint(evil)
    assert str(evil) in str(info.value) and "\n" not in str(info.value)
    out = tmp_path / "cam.png"
    assert (
        run_cli("cam", "--checkpoint", evil, "--image", evil, "--out", out) == 2
    )  # as a user meets it
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(evil) in err and "Traceback" not in err
    assert not marker.exists() and not out.exists()


def test_leaderboard_never_unpickles_ray_state(tmp_path):
    """Ray's experiment_state embeds cloudpickled objects; the leaderboard reads it as plain JSON."""
    from mura_tune.search.leaderboard import build_leaderboard

    exp, marker = tmp_path / "exp", tmp_path / "pwned"
    (exp / "trials" / "abc").mkdir(parents=True)
    (exp / "trials" / "abc" / "trial.json").write_text(
        json.dumps(
            {
                "trial_id": "abc",
                "space": "custom_cnn",
                "scope": "all",
                "params": {"lr": 0.01},
                "node_id": "n1",
            }
        )
    )
    trial = {
        "trial_id": "abc",
        "status": "TERMINATED",
        "relative_logdir": "ray-abc",
        "storage": {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(_Payload(marker)).hex()},
    }
    meta = {"last_result": {"trial_finished": True}, "num_failures": 0}
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [[json.dumps(trial), json.dumps(meta)]]})
    )
    board = build_leaderboard(exp)
    assert board.loc[0, "status"] == "COMPLETED" and not marker.exists()


def test_space_file_runs_only_when_named(tmp_path, capsys):
    """``--resume`` never executes a space file recorded in experiment.json unless --space names it."""
    marker, space_file = tmp_path / "pwned", tmp_path / "evil_space.py"
    space_file.write_text(f"open({str(marker)!r}, 'w').close()\n")
    exp = tmp_path / "results" / "x"
    search_plan(exp, space=str(space_file), num_samples=1, max_epochs=1, scopes={"all": 1}).save()
    assert (
        run_cli(
            "--space", "custom_cnn", "--results", tmp_path / "results", "--name", "x", "--resume"
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--space" in err and str(space_file) in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("uri", ["s3://bucket/results", "gs://bucket/results"])
def test_cloud_results_uri_is_refused(uri, capsys):
    assert (
        run_cli("--space", "custom_cnn", "--results", uri, "--name", "x", "--num-samples", 1) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and uri in err and "shared by every node" in err
    assert run_cli("--space", "custom_cnn", "--results", uri, "--name", "x", "--resume") == 2
