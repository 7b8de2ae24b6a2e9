"""The headline: at equal compute, does mura-tune beat the default config, the source reports' hand
recipes and random search, on test studies that can tell them apart?

    python -m benchmarks.value                   # 3 seeds x 6 arms x 600 CPU-s: ~85 min on 2 cores
    python -m benchmarks.value --seeds 0 --budget 120 --arms default,mura_tune   # a quick look
    python -m benchmarks.value --report-only     # value.json and the README table from finished arms
    python -m benchmarks.value --rebuild-ensembles   # the same, mura-tune's ensemble rebuilt first

Arms (benchmarks/arms.py), each with the same data, image size and compute (``--budget``
CPU-seconds counted by the operating system over every process of the arm, Ray's included):

* ``default``: one ``mura-tune train`` of the default config;
* ``reports_cnn``, ``reports_densenet``, ``mura_paper``: the source reports' hand recipes and the
  MURA paper's, written as configs (the DenseNet recipes repeat runs until the budget is spent
  and average the 4, resp. 5, lowest-val-loss runs);
* ``random``: random search over the same space (``custom_cnn``, cpu preset) with no early
  stopping by a scheduler, its best single model by val kappa;
* ``mura_tune``: TPE + ASHA (warm-started at the space's default), its best single model by val
  kappa (``mura_tune_single``) and its final output, the greedy ensemble with per-part routing
  (``mura_tune``).

Per arm and seed: test study kappa and AUC with 95% bootstrap intervals over the 1,199 test
studies, val kappa (selection optimism = val - test) and compute used; then the test-kappa
difference of mura-tune's output against every other model, per seed and as the mean over seeds,
with paired bootstrap intervals (the same resampled test studies for both models and every
seed). Writes ``benchmarks/value.json`` and, with ``--update-readme``, the table at the top of the
README (between ``<!-- value-table -->`` markers).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.arms import ARMS, MODELS, launch, result_of
from benchmarks.common import BENCH_DIR, REPO, WORK, log, machine, setup_env

OUT = BENCH_DIR / "value.json"
ROOT = WORK / "value"
FINAL = "mura_tune"  # mura-tune's output, compared against every other model
BUDGET = 600.0
SEEDS = (0, 1, 2)
N_BOOT = 2000
LABELS = {
    "default": "default config, one `mura-tune train`",
    "reports_cnn": "reports' 6-cell CNN (32 filters, BN, class weights, flips+rotation, early stop on val loss)",
    "reports_densenet": "reports' DenseNet-169 fine-tune, mean of the 4 lowest-val-loss runs",
    "mura_paper": "MURA paper recipe (DenseNet-169, lr 1e-4, batch 8), mean of the 5 lowest-val-loss runs",
    "random": "random search, best single model by val",
    "mura_tune_single": "mura-tune TPE+ASHA, best single model by val",
    "mura_tune": "**mura-tune TPE+ASHA + greedy ensemble (its output)**",
}
README_MARK = "<!-- value-table -->"


def arm_dir(arm: str, seed: int) -> Path:
    return ROOT / f"seed{seed}" / arm


def run(seeds=SEEDS, budget: float = BUDGET, arms=ARMS) -> dict:
    """Run every missing arm (two at a time on two cores), then score them all."""
    from mura_tune.data.cache import build_cache
    from mura_tune.data.mura import read_dataset

    table = read_dataset(None).table  # the embedded set, generated once
    build_cache(table["image_path"].tolist(), 48, progress=False)  # decoded once, before any arm
    jobs = [(arm, seed, budget, arm_dir(arm, seed)) for seed in seeds for arm in arms]
    # The longest jobs first, so the two cores finish together.
    jobs.sort(key=lambda j: (j[0] == "default", j[1]))
    started = time.perf_counter()
    launch(jobs)
    return evaluate(seeds, arms, time.perf_counter() - started)


def rebuild_ensembles(seeds=SEEDS) -> None:
    """Rebuild the ``mura_tune`` arm's ensemble of every finished seed (its search is kept)."""
    import json

    from benchmarks.arms import final_ensemble

    for seed in seeds:
        out = arm_dir("mura_tune", seed)
        result = result_of(out)
        if result is None:
            raise SystemExit(f"mura_tune seed {seed} has not finished; nothing to rebuild in {out}")
        result["info"]["ensemble_seconds"] = final_ensemble(out)
        (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
        log(f"rebuilt mura-tune's ensemble, seed {seed} ({result['info']['ensemble_seconds']} s)")


def evaluate(seeds=SEEDS, arms=ARMS, seconds: float | None = None) -> dict:
    """Score the finished arms of ``seeds`` on the test studies (value.json's content)."""
    import numpy as np
    import pandas as pd

    from mura_tune.metrics import bootstrap_intervals, cohen_kappa, paired_kappa_difference, roc_auc
    from mura_tune.report.compare import ModelPredictions

    decided = ModelPredictions.decided

    results = {(arm, s): result_of(arm_dir(arm, s)) for arm in arms for s in seeds}
    missing = [f"{a} seed {s}" for (a, s), r in results.items() if r is None]
    if missing:
        raise SystemExit(f"not finished: {', '.join(missing)} (run without --report-only)")
    preds: dict[tuple[str, int], pd.DataFrame] = {}
    for (_, seed), result in results.items():
        for model, path in result["models"].items():
            preds[model, seed] = pd.read_parquet(path)
    models = [m for arm in arms for m in MODELS[arm]]
    test_ids = None
    rows, test = [], {}
    for (model, seed), frame in preds.items():
        t = frame[frame["split"] == "test"].sort_values("study_id", kind="stable")
        v = frame[frame["split"] == "val"]
        ids = t["study_id"].tolist()
        if test_ids is None:
            test_ids, labels = ids, t["label"].to_numpy()
        if ids != test_ids:
            raise SystemExit(f"{model} seed {seed} predicted other test studies")
        raw = t["prob"].to_numpy(dtype=np.float64)
        test[model, seed] = decided(t)  # kappa at the model's own thresholds (0.5 unless fitted)
        ci = bootstrap_intervals(
            labels, raw, n_boot=N_BOOT, seed=seed, threshold=ModelPredictions.thresholds(t)
        )
        arm = next(a for a in arms if model in MODELS[a])
        result = results[arm, seed]
        rows.append({
            "model": model, "arm": arm, "seed": seed,
            "val_kappa": cohen_kappa(v["label"], decided(v)),
            "test_kappa": cohen_kappa(labels, test[model, seed]), "test_kappa_ci": list(ci["kappa"]),
            "test_auc": roc_auc(labels, raw), "test_auc_ci": list(ci["auc"]),
            "cpu_seconds": result["cpu_seconds"], "wall_seconds": result["wall_seconds"],
            "info": {k: v for k, v in result["info"].items() if k != "events"},
        })  # fmt: skip
    differences = {}
    if FINAL in models:
        for model in models:
            if model == FINAL:
                continue
            paired = paired_kappa_difference(
                labels, [test[FINAL, s] for s in seeds], [test[model, s] for s in seeds],
                n_boot=N_BOOT, seed=0,
            )  # fmt: skip
            paired["beats"] = paired["mean"]["ci"][0] > 0
            differences[model] = paired
    calib = calibration(seeds, labels, test) if {"default", "random", FINAL} <= set(arms) else None
    summary = {}
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        summary[model] = {
            "val_kappa": float(np.mean([r["val_kappa"] for r in mine])),
            "test_kappa": float(np.mean([r["test_kappa"] for r in mine])),
            "test_auc": float(np.mean([r["test_auc"] for r in mine])),
            "optimism": float(np.mean([r["val_kappa"] - r["test_kappa"] for r in mine])),
            "cpu_seconds": float(np.mean([r["cpu_seconds"] for r in mine])),
        }
    return {
        "question": "at equal compute, does mura-tune's output beat each other arm on test study kappa?",
        "data": "embedded synthetic set (mura_tune.home.EMBEDDED), 48 px, split by seed",
        "n_test_studies": len(test_ids), "seeds": list(seeds), "budget_cpu_seconds": results[arms[0], seeds[0]]["budget_cpu_seconds"],
        "n_boot": N_BOOT, "run_seconds": None if seconds is None else round(seconds, 1),
        "machine": machine(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": summary, "differences_vs_mura_tune": differences, "calibration": calib,
        "runs": rows,
    }  # fmt: skip


def calibration(seeds, labels, test: dict) -> dict:
    """Can this data tell models apart? Measured on the benchmark's own runs (no extra compute).

    * resolution: the paired 95% interval of the test-kappa difference between two reasonable
      models, half-width per seed: the default config against the reports' CNN and against random
      search's best (mura-tune's best single model is no use here: when its search's best trial is
      the space's default it is the very same run, and the interval has no width);
    * spread: across the space, the test kappa of random search's configurations that ran to
      their own end (random draws from the space; budget-truncated trials left out): the best minus the
      worst, and the 90th minus the 10th percentile, per seed, in units of that half-width.
    """
    import numpy as np
    import pandas as pd

    from mura_tune.layout import TrialStatus
    from mura_tune.metrics import paired_kappa_difference

    half, spread = [], {}
    for seed in seeds:
        for other in ("reports_cnn", "random"):
            if (other, seed) not in test:
                continue
            ci = paired_kappa_difference(
                labels, test["default", seed], test[other, seed], n_boot=N_BOOT, seed=seed
            )["per_seed"][0]["ci"]
            half.append((ci[1] - ci[0]) / 2)
        board = pd.read_parquet(arm_dir("random", seed) / "search" / "leaderboard.parquet")
        done = board.loc[
            board["status"] == TrialStatus.COMPLETED.value, "test_kappa_study"
        ].dropna()
        if len(done) >= 2:
            spread[str(seed)] = {
                "configs": len(done), "worst": float(done.min()), "best": float(done.max()),
                "p10": float(done.quantile(0.1)), "p90": float(done.quantile(0.9)),
            }  # fmt: skip
    width = float(np.mean(half))
    gaps = [v["best"] - v["worst"] for v in spread.values()]
    return {
        "paired_ci_half_width": {"per_seed": [round(h, 4) for h in half], "mean": round(width, 4)},
        "random_configs_test_kappa": spread,
        "best_minus_worst_config": round(float(np.mean(gaps)), 4) if gaps else None,
        "gap_in_half_widths": round(float(np.mean(gaps)) / width, 1)
        if gaps and width > 0
        else None,
    }


def table(value: dict) -> str:
    """The README table: one row per model, means over seeds, the paired difference of mura-tune's output."""
    lines = [
        "| arm | val kappa | test kappa (per seed) | test AUC | optimism | CPU-s | mura-tune minus arm [paired 95% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, s in value["summary"].items():
        per_seed = ", ".join(f"{r['test_kappa']:.3f}" for r in value["runs"] if r["model"] == model)
        diff = value["differences_vs_mura_tune"].get(model)
        shown = (
            "—"
            if diff is None
            else f"{diff['mean']['diff']:+.3f} [{diff['mean']['ci'][0]:+.3f}, {diff['mean']['ci'][1]:+.3f}]"
        )
        lines.append(
            f"| {LABELS.get(model, model)} | {s['val_kappa']:.3f} | {s['test_kappa']:.3f} ({per_seed}) | "
            f"{s['test_auc']:.3f} | {s['optimism']:+.3f} | {s['cpu_seconds']:.0f} | {shown} |"
        )
    return "\n".join(lines)


def update_readme(value: dict) -> None:
    path = REPO / "README.md"
    text = path.read_text()
    first, _, rest = text.partition(README_MARK)
    _, _, last = rest.partition(README_MARK)
    if not rest:
        raise SystemExit(f"README.md has no {README_MARK} markers")
    path.write_text(f"{first}{README_MARK}\n{table(value)}\n{README_MARK}{last}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.value", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument(
        "--budget", type=float, default=BUDGET, help="CPU-seconds per arm (default 600)"
    )
    parser.add_argument(
        "--arms", default=",".join(ARMS), help=f"comma-separated ({', '.join(ARMS)})"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="score finished arms, run nothing"
    )
    parser.add_argument(
        "--update-readme", action="store_true", help="write the table into README.md"
    )
    parser.add_argument(
        "--rebuild-ensembles",
        action="store_true",
        help="rebuild mura-tune's ensemble from the finished searches with the current code, then score (runs no arm)",
    )
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    arms = tuple(a.strip() for a in args.arms.split(","))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    setup_env()
    if args.rebuild_ensembles:
        rebuild_ensembles(args.seeds)
    only = args.report_only or args.rebuild_ensembles
    value = evaluate(args.seeds, arms) if only else run(args.seeds, args.budget, arms)
    from mura_tune.io import write_json

    write_json(args.out, value)
    print(table(value))
    worst = [m for m, d in value["differences_vs_mura_tune"].items() if not d["beats"]]
    log(
        f"wrote {args.out}; mura-tune's output beats {len(value['differences_vs_mura_tune']) - len(worst)} "
        f"of {len(value['differences_vs_mura_tune'])} models"
        + (f" (not: {', '.join(worst)})" if worst else "")
    )
    if args.update_readme:
        update_readme(value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
