"""The arms the value benchmark compares, each one way of spending the same compute on the same data.

    python -m benchmarks.arms mura_tune --seed 0 --budget 600 --out benchmarks/_work/arms/x   # one arm

Every arm runs in a process session of its own (``launch`` starts it with ``setsid``, pinned to
one CPU core) and stops when the session has used ``budget`` CPU-seconds (benchmarks/compute.py):
a single run ends mid-epoch (that epoch is still evaluated), a search stops all its trials. Arms
write ``result.json`` (compute used, wall time, what ran) and one study-level predictions file per
model they deliver (``<model>.parquet``: split, study_id, body_part, label, prob), on val and test.

The data is the embedded synthetic set (``mura_tune.home.EMBEDDED``), split by ``seed`` exactly as a
search with that seed splits it, at ``IMAGE_SIZE`` px for every arm. The reports' recipes are
written as configs below, changed only where the image size forces it (none of them needs
more than 48 px), and run as the reports ran them: no moving average of weights (mura-tune's
default), their own checkpoint choice (lowest val loss) and early stopping.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import REPO, log

IMAGE_SIZE = 48
SPACE = "custom_cnn"

#: The source reports' CNN: 6 cells of conv-BN-ReLU-max-pool, 32 base filters doubling per cell,
#: class weights, flips with ±30° rotation (aug_strength 1.0 is ±30°; it also zooms and shifts),
#: Adam (Keras' 1e-3), ReduceLROnPlateau factor 0.2, early stopping on val loss with patience 10.
REPORTS_CNN = {
    "model": "custom_cnn", "depth": 6, "base_filters": 32, "max_filters": 1024, "convs_per_cell": 1,
    "batch_norm": True, "global_pool": "avg", "dropout": 0.0, "class_weighting": True,
    "aug_strength": 1.0, "lr": 1e-3, "lr_factor": 0.2, "select_metric": "val_loss",
    "early_stop_patience": 10, "max_epochs": 200, "ema_decay": 0.0,
}  # fmt: skip
#: The reports' DenseNet fine-tune (DenseNet-169 on grayscale replicated to 3 channels, flips and
#: ±30° rotation, checkpoints by val loss), repeated, ensembled as the 4 lowest-val-loss runs.
#: ImageNet weights when they can be had (pretrained: auto), random initialisation offline.
REPORTS_DENSENET = {
    "model": "densenet169", "pretrained": "auto", "unfreeze_blocks": "all", "global_pool": "avg",
    "dropout": 0.0, "class_weighting": True, "aug_strength": 1.0, "lr": 1e-3, "lr_factor": 0.2,
    "select_metric": "val_loss", "early_stop_patience": 10, "max_epochs": 200, "ema_decay": 0.0,
}  # fmt: skip
REPORTS_DENSENET_KEEP = 4
#: The MURA paper (Rajpurkar et al. 2017): DenseNet-169 from ImageNet, Adam lr 1e-4 divided by 10
#: when val loss plateaus, batch 8, per-study-type weighted BCE, flips and ±30° rotations; the
#: mean of the 5 models with the lowest val loss.
MURA_PAPER = {
    "model": "densenet169", "pretrained": "auto", "unfreeze_blocks": "all", "global_pool": "avg",
    "dropout": 0.0, "class_weighting": True, "aug_strength": 1.0, "lr": 1e-4, "lr_factor": 0.1,
    "batch_size": 8, "select_metric": "val_loss", "early_stop_patience": 10, "max_epochs": 200,
    "ema_decay": 0.0,
}  # fmt: skip
MURA_PAPER_KEEP = 5

#: What each arm delivers (the models scored): arm -> model names.
MODELS = {
    "default": ["default"],
    "reports_cnn": ["reports_cnn"],
    "reports_densenet": ["reports_densenet"],
    "mura_paper": ["mura_paper"],
    "random": ["random"],
    "mura_tune": ["mura_tune_single", "mura_tune"],
}
ARMS = tuple(MODELS)


# --- the arms (each runs inside its own session) ---------------------------------------------
def _split(seed: int):
    from mura_tune.data.mura import read_dataset
    from mura_tune.data.split import assign_split

    return assign_split(read_dataset(None).table, 0.2, seed)


def _study_rows(run_dir: Path):
    import pandas as pd

    from mura_tune.layout import TrialDir
    from mura_tune.metrics import study_table

    return study_table(pd.read_parquet(TrialDir(run_dir).predictions))


def _train(config: dict, seed: int, out: Path, budget: float) -> dict:
    """One training run of ``config`` that stops when the budget is spent; its summary."""
    from benchmarks.compute import spent
    from mura_tune.train.config import TrainConfig
    from mura_tune.train.pretrain import resolve_pretrained
    from mura_tune.train.run import run_training

    table = _split(seed)
    values = {"image_size": IMAGE_SIZE, "threads": 1, **config, "seed": seed}
    if values.get("pretrained") == "auto":  # ImageNet weights if they can be had, else random init
        values["pretrained"] = resolve_pretrained(
            values["model"], "auto", table, IMAGE_SIZE, verbose=False
        )[0]
    cfg = TrainConfig.from_dict(values, source="benchmark arm")
    return run_training(cfg, table, out, verbose=False, should_stop=lambda: spent(budget))


def _single(config: dict, name: str) -> Callable:
    def arm(seed: int, budget: float, out: Path) -> dict:
        summary = _train(config, seed, out / "run", budget)
        _study_rows(out / "run").to_parquet(out / f"{name}.parquet", index=False)
        return {"runs": 1, "epochs": summary["epochs"], "status": summary["status"]}

    return arm


def _repeated(config: dict, keep: int, name: str) -> Callable:
    """Runs of ``config`` (seeds ``seed*100+k``) until the budget is spent; the mean of the ``keep``
    runs with the lowest val loss at their kept checkpoints."""

    def arm(seed: int, budget: float, out: Path) -> dict:
        import numpy as np

        from benchmarks.compute import spent

        runs = []
        for k in range(1000):
            if spent(budget):
                break
            summary = _train(config, seed * 100 + k, out / f"run{k}", budget)
            loss = summary["val"].get("val_loss")
            runs.append((np.inf if loss is None else loss, k, summary["epochs"]))
        chosen = sorted(runs)[:keep]
        frames = [_study_rows(out / f"run{k}") for _, k, _ in chosen]
        mean = frames[0].copy()
        mean["prob"] = np.mean([f["prob"].to_numpy() for f in frames], axis=0)
        mean.to_parquet(out / f"{name}.parquet", index=False)
        return {
            "runs": len(runs),
            "epochs": [e for _, _, e in runs],
            "members": [k for _, k, _ in chosen],
        }

    return arm


def _search(random_search: bool) -> Callable:
    def arm(seed: int, budget: float, out: Path) -> dict:
        import ray

        from benchmarks.compute import BudgetStopper, EpochRecorder
        from mura_tune.constants import EPOCH_METRIC, METRIC
        from mura_tune.search.driver import run_search
        from mura_tune.search.plan import SearchPlan

        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")  # fmt: skip
        plan = SearchPlan(
            space=SPACE, preset="cpu", results=str(out), name="search", seed=seed,
            random_search=random_search, max_concurrent=1, cpus_per_trial=1, num_samples=10_000,
            overrides={"image_size": IMAGE_SIZE},
        )  # fmt: skip
        recorder = EpochRecorder(EPOCH_METRIC)  # every epoch's own val kappa, in both searches
        result = run_search(plan, stop=BudgetStopper(budget), callbacks=[recorder], verbose=0)
        board = result.leaderboard
        best = board[board[METRIC].notna()].iloc[0]
        _study_rows(Path(best["predictions_path"]).parent).to_parquet(
            out / ("random.parquet" if random_search else "mura_tune_single.parquet"), index=False
        )
        info = {"trials": len(board), "epochs": int(board["epochs"].sum()),
                "best_trial": best["trial_id"], "events": recorder.events}  # fmt: skip
        if not random_search:  # mura-tune's output: the ensemble, built with its defaults
            info["ensemble_seconds"] = final_ensemble(out)
        return info

    return arm


def final_ensemble(out: Path) -> float:
    """mura-tune's output from the ``mura_tune`` arm's search in ``out``: the ensemble built with the
    product's defaults, written as ``mura_tune.parquet``; the seconds it took.

    Building reads the trials' saved predictions only, so ``python -m benchmarks.value
    --rebuild-ensembles`` redoes it with the current ensemble code without rerunning the search.
    """
    import pandas as pd

    from mura_tune.ensemble.build import build_ensemble

    started = time.perf_counter()
    ens = build_ensemble(out / "search", name="ensemble", out_root=out)
    pd.read_parquet(ens / "predictions.parquet").to_parquet(out / "mura_tune.parquet", index=False)
    return round(time.perf_counter() - started, 1)


RUNNERS: dict[str, Callable] = {
    "default": _single({}, "default"),
    "reports_cnn": _single(REPORTS_CNN, "reports_cnn"),
    "reports_densenet": _repeated(REPORTS_DENSENET, REPORTS_DENSENET_KEEP, "reports_densenet"),
    "mura_paper": _repeated(MURA_PAPER, MURA_PAPER_KEEP, "mura_paper"),
    "random": _search(random_search=True),
    "mura_tune": _search(random_search=False),
}


def run_arm(arm: str, seed: int, budget: float, out: Path) -> dict:
    """Run one arm in this process (which must lead its own session) and write ``result.json``."""
    from benchmarks import compute

    meter = compute.start()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = RUNNERS[arm](seed, budget, out)
    result = {
        "arm": arm, "seed": seed, "budget_cpu_seconds": budget, "image_size": IMAGE_SIZE,
        "cpu_seconds": round(meter.measure(), 1), "wall_seconds": round(time.perf_counter() - started, 1),
        "models": {m: str(out / f"{m}.parquet") for m in MODELS[arm]}, "info": info,
    }  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


# --- running arms side by side ----------------------------------------------------------------
def result_of(out: Path) -> dict | None:
    """A finished arm's result (None if it has not finished there)."""
    try:
        return json.loads((out / "result.json").read_text())
    except (OSError, ValueError):
        return None


def launch(jobs: list[tuple[str, int, float, Path]], cores: int | None = None) -> list[dict]:
    """Run ``(arm, seed, budget, out)`` jobs, one per CPU core at a time, each in its own session.

    Jobs whose ``out`` already holds a result with the same budget are not run again.
    """
    cores = cores or os.cpu_count() or 1
    todo = [j for j in jobs if (result_of(j[3]) or {}).get("budget_cpu_seconds") != j[2]]
    running: dict[int, tuple[subprocess.Popen, tuple]] = {}
    free = list(range(cores))
    while todo or running:
        while todo and free:
            core = free.pop(0)
            arm, seed, budget, out = job = todo.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "benchmarks.arms", arm, "--seed", str(seed),
                   "--budget", str(budget), "--out", str(out)]  # fmt: skip
            log(f"arm {arm} seed {seed} ({budget:g} CPU-s) on core {core}")
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO),
            }  # this checkout's code, in Ray's workers too
            with open(out / "arm.log", "w") as fh:
                proc = subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=(lambda c=core: os.sched_setaffinity(0, {c})) if hasattr(os, "sched_setaffinity") else None,
                )  # fmt: skip
            running[core] = (proc, job)
        time.sleep(2)
        for core, (proc, job) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[core]
            free.append(core)
            if proc.returncode != 0:
                raise RuntimeError(f"arm {job[0]} seed {job[1]} failed; see {job[3] / 'arm.log'}")
    return [result_of(j[3]) for j in jobs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.arms", description="Run one arm.")
    parser.add_argument("arm", choices=ARMS)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--budget", type=float, required=True, help="CPU-seconds")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from benchmarks.common import setup_env

    setup_env()
    result = run_arm(args.arm, args.seed, args.budget, Path(args.out))
    log(
        f"arm {args.arm} seed {args.seed}: {result['cpu_seconds']} CPU-s, {result['wall_seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
