"""The value benchmark's machinery without training: CPU-seconds counted over a session's
processes, and the scoring of finished arms (paired differences, the README table)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest


def test_cpu_meter_counts_child_processes_of_the_session():
    from benchmarks.compute import CpuMeter

    meter = CpuMeter(interval=0.1)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt=time.process_time()\nwhile time.process_time()-t<0.6: pass",
        ]
    )
    while child.poll() is None:
        time.sleep(0.05)
        meter.measure()  # the child's time is seen while it lives
    used = meter.measure()
    meter.close()
    assert 0.5 <= used < 30, used


@pytest.fixture
def finished_arms(tmp_path, monkeypatch):
    """Two seeds of every arm's outputs, written by hand: mura-tune's output is the truth plus
    little noise, every other model more noise."""
    from benchmarks import arms, value

    monkeypatch.setattr(value, "ROOT", tmp_path)
    rng = np.random.default_rng(0)
    n = 400
    ids = [f"MURA-v1.1/valid/XR_HAND/patient{i:05d}/study1" for i in range(n)]
    labels = rng.integers(0, 2, n)
    for seed in (0, 1):
        for arm, models in arms.MODELS.items():
            out = value.arm_dir(arm, seed)
            out.mkdir(parents=True)
            paths = {}
            for model in models:
                noise = 0.15 if model == "mura_tune" else 0.6
                frames = []
                for split in ("val", "test"):
                    prob = 1 / (1 + np.exp(-((2 * labels - 1) * 1.0 + rng.normal(0, noise * 3, n))))
                    frames.append(pd.DataFrame({"split": split, "study_id": ids, "body_part": "XR_HAND",
                                                "label": labels, "prob": prob}))  # fmt: skip
                paths[model] = str(out / f"{model}.parquet")
                pd.concat(frames).to_parquet(paths[model], index=False)
            result = {"arm": arm, "seed": seed, "budget_cpu_seconds": 60.0, "cpu_seconds": 61.0,
                      "wall_seconds": 70.0, "models": paths, "info": {"events": [], "runs": 1}}  # fmt: skip
            (out / "result.json").write_text(json.dumps(result))
        board = pd.DataFrame({"status": ["COMPLETED", "COMPLETED", "PRUNED", "COMPLETED"],
                              "test_kappa_study": [0.2, 0.6 + seed / 10, 0.0, 0.5]})  # fmt: skip
        (value.arm_dir("random", seed) / "search").mkdir()
        board.to_parquet(value.arm_dir("random", seed) / "search" / "leaderboard.parquet")
    return value


def test_every_model_is_scored_and_paired_with_mura_tunes_output(finished_arms):
    value = finished_arms.evaluate(seeds=(0, 1))
    assert value["n_test_studies"] == 400 and value["seeds"] == [0, 1]
    assert set(value["summary"]) == {m for ms in finished_arms.MODELS.values() for m in ms}
    assert len(value["runs"]) == 2 * len(value["summary"])
    diffs = value["differences_vs_mura_tune"]
    assert "mura_tune" not in diffs and set(diffs) == set(value["summary"]) - {"mura_tune"}
    for model, d in diffs.items():
        assert len(d["per_seed"]) == 2
        runs = {r["seed"]: r["test_kappa"] for r in value["runs"] if r["model"] == model}
        mine = {r["seed"]: r["test_kappa"] for r in value["runs"] if r["model"] == "mura_tune"}
        assert d["mean"]["diff"] == pytest.approx(np.mean([mine[s] - runs[s] for s in (0, 1)]))
        assert d["beats"] == (d["mean"]["ci"][0] > 0)
    assert all(d["beats"] for d in diffs.values())  # less noise wins, on 400 studies and 2 seeds
    table = finished_arms.table(value)
    assert table.count("\n") == len(value["summary"]) + 1 and "| —" in table


def test_unfinished_arms_are_named(finished_arms):
    import shutil

    shutil.rmtree(finished_arms.arm_dir("random", 1))
    with pytest.raises(SystemExit, match="random seed 1"):
        finished_arms.evaluate(seeds=(0, 1))


def test_calibration_measures_resolution_and_spread_on_the_runs(finished_arms):
    calib = finished_arms.evaluate(seeds=(0, 1))["calibration"]
    half = calib["paired_ci_half_width"]
    assert len(half["per_seed"]) == 4 and 0 < half["mean"] < 0.5  # 2 pairs x 2 seeds
    # the spread counts configurations that ran to their end (the PRUNED one's 0.0 is left out)
    assert calib["random_configs_test_kappa"]["1"]["worst"] == 0.2
    assert calib["best_minus_worst_config"] == pytest.approx((0.4 + 0.5) / 2)
    assert calib["gap_in_half_widths"] == pytest.approx(0.45 / half["mean"], abs=0.1)
