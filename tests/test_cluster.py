"""A real two-node Ray cluster on this machine: a search spreads over both nodes, survives losing
one mid-trial, and leaves every file readable from the shared results folder (issue 7, items 1, 3).

The cluster is ``ray.cluster_utils.Cluster`` (head: 1 CPU, worker: 1 CPU, so two concurrent
trials must use both nodes), started with a private ``RAY_TMPDIR``: Ray records "the latest
cluster" in ``$RAY_TMPDIR/ray/ray_current_cluster``, and a plain ``ray.init()`` anywhere else on
the machine would otherwise join this cluster. The search runs as a real ``mura-tune --address``
subprocess, so it cannot clash with the suite's in-process Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="mtc", dir="/tmp")  # short: Ray's socket paths live below it
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    nodes = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        worker = nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()  # on a busy machine the worker may register seconds later
        yield nodes, worker
    finally:
        nodes.shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(tmp, ignore_errors=True)


def _trials(exp: Path) -> dict[str, dict]:
    out = {}
    for path in exp.glob("trials/*/trial.json"):
        try:
            out[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    return out


def test_search_spreads_over_nodes_and_survives_losing_one(cluster, tiny_data, tmp_path):
    from mura_tune.ensemble.build import build_ensemble
    from mura_tune.train.checkpoint import load_checkpoint

    nodes, worker = cluster
    head_id, worker_id = nodes.head_node.node_id, worker.node_id
    exp, log = tmp_path / "shared" / "multi", tmp_path / "search.log"
    args = [
        "--space",
        "custom_cnn",
        "--data",
        tiny_data,
        "--num-samples",
        2,
        "--max-epochs",
        4,
        "--grace-period",
        4,
        "--cpus-per-trial",
        1,
        "--set",
        "image_size=32",
        "--seed",
        0,
        "--max-failures",
        2,
        "--address",
        nodes.address,
        "--results",
        exp.parent,
        "--name",
        exp.name,
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mura_tune", *map(str, args)],
            cwd=REPO,
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # The trial on the worker node has started: give its retry somewhere to go, then kill the
        # worker node once the trial saved a resumable state (after epoch 1 of 4).
        lost = wait_for(
            lambda: next((t for t, m in _trials(exp).items() if m["node_id"] == worker_id), None),
            proc,
            log,
        )
        replacement = nodes.add_node(num_cpus=1)
        wait_for(lambda: (exp / "trials" / lost / "resume.pt").exists(), proc, log)
        nodes.remove_node(worker)
        assert proc.wait(600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    board = pd.read_parquet(exp / "leaderboard.parquet").set_index("trial_id")
    assert len(board) == 2 and (board["status"] == "COMPLETED").all(), board[["status", "reason"]]
    assert (board["epochs"] == 4).all()
    # Trials ran on both nodes: the node of each trial's first attempt, as Ray's node ids.
    metas = _trials(exp)
    assert {m["attempts"][0]["node_id"] for m in metas.values()} == {head_id, worker_id}
    assert set(board["node_id"]) <= {head_id, worker_id, replacement.node_id}
    assert worker_id in ",".join(board["node_ids"])
    # The lost trial was retried once and continued from its last epoch, not from scratch.
    assert board.loc[lost, "attempts"] == 2 and board.loc[lost, "failures"] >= 1
    assert metas[lost]["attempts"][1]["resumed_from_epoch"] >= 1
    assert metas[lost]["attempts"][1]["node_id"] != worker_id
    assert pd.read_parquet(exp / "trials" / lost / "metrics.parquet")["epoch"].tolist() == [
        1,
        2,
        3,
        4,
    ]
    # Every checkpoint and predictions file is readable from the shared folder; an ensemble builds.
    for row in board.itertuples():
        net, config = load_checkpoint(row.checkpoint_path)
        assert config.image_size == 32
        assert set(pd.read_parquet(row.predictions_path)["split"]) == {"val", "test"}
    out = build_ensemble(exp, name="multi", out_root=tmp_path / "ensembles", n_boot=50)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest and (out / "predictions.parquet").exists()
