"""``search_efficiency``: TPE+ASHA vs random search without early stopping, equal wall-clock budgets.

Both arms are the real search through the Python API (:class:`~mura_tune.search.plan.SearchPlan`
and :func:`~mura_tune.search.driver.run_search`: the same preparation, trainable, searcher and
scheduler as ``mura-tune --space``), with a wall-clock budget (``time_budget_s``, the CLI's
``--time-budget``). A Ray Tune callback passed to ``run_search`` records, in the driver, the wall
time of every epoch's ``val_kappa_study``. Every reported epoch counts (each one could be the checkpoint a
trial keeps), in both arms alike.

Per seed (the seed sets the split and both samplers) and arm: the best val study kappa within
the budget, and the time to first reach the random arm's final best. The figure is the median
over seeds of time(TPE+ASHA) / time(random).

    python -m benchmarks.bench_search
"""

from __future__ import annotations

import math
import shutil
import statistics
import time

from benchmarks.common import WORK, embedded_cache, figure, log

TARGET = 0.5
ARMS = ("tpe_asha", "random")


def run(
    seeds: tuple[int, ...] = (0, 1, 2),
    budget_s: float = 90.0,
    num_samples: int = 15,
    max_epochs: int = 6,
    image_size: int = 32,
    cpus_per_trial: int = 1,
    reduction_factor: int = 3,
    max_concurrent: int | None = None,
) -> dict:
    """Run both arms for every seed (arms alternate which goes first) and compare.

    Args:
        seeds: search seeds (split, sampler); at least 3 for a median.
        budget_s: wall-clock budget of every search.
        num_samples: trial cap of both arms (TPE's random start-up is ``max(2, min(10, n // 3))``,
            so 15 gives 5 start-up trials: the budget is too short to get past 10).
        max_epochs: epochs of a full trial (ASHA's max_t).
        image_size: input side.
        cpus_per_trial: CPUs per trial (2 cores -> 2 concurrent trials).
        reduction_factor: ASHA's reduction factor (grace period 1).
        max_concurrent: trials at once (default: as many as the CPUs allow).
    """
    import ray

    from mura_tune.search.driver import init_ray

    embedded_cache(image_size)
    root = WORK / "search"
    shutil.rmtree(root, ignore_errors=True)
    init_ray(None)
    runs: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    try:
        for i, seed in enumerate(seeds):
            for arm in ARMS if i % 2 == 0 else ARMS[::-1]:
                runs[arm][seed] = _search(
                    root,
                    arm,
                    seed,
                    budget_s,
                    num_samples,
                    max_epochs,
                    image_size,
                    cpus_per_trial,
                    reduction_factor,
                    max_concurrent,
                )
                r = runs[arm][seed]
                log(
                    f"search_efficiency seed {seed} {arm}: best {r['best']:.3f} after {r['trials']} trials, "
                    f"{r['epochs']} epochs in {r['seconds']:.0f} s"
                )
    finally:
        ray.shutdown()

    per_seed = {}
    ratios = []
    for seed in seeds:
        target_value = runs["random"][seed]["best"]
        t_rand = _time_to(runs["random"][seed]["events"], target_value)
        t_tpe = _time_to(runs["tpe_asha"][seed]["events"], target_value)
        ratio = (t_tpe / t_rand if t_rand else math.inf) if t_tpe is not None else math.inf
        ratios.append(ratio if ratio != math.inf else budget_s / max(t_rand or budget_s, 1e-9))
        per_seed[str(seed)] = {
            "random_final_best": _r(target_value), "tpe_asha_final_best": _r(runs["tpe_asha"][seed]["best"]),
            "random_seconds_to_its_best": _r(t_rand), "tpe_asha_seconds_to_random_best": _r(t_tpe),
            "ratio": _r(ratio) if ratio != math.inf else None, "reached": t_tpe is not None,
            **{f"{arm}_{k}": runs[arm][seed][k] for arm in ARMS for k in ("trials", "epochs", "seconds")},
        }  # fmt: skip
    median_ratio = statistics.median(ratios)
    unreached = sum(1 for s in per_seed.values() if not s["reached"])
    raw = {
        "seeds": list(seeds), "budget_seconds": budget_s, "num_samples_cap": num_samples, "max_epochs": max_epochs,
        "image_size": image_size, "cpus_per_trial": cpus_per_trial, "reduction_factor": reduction_factor, "space": "custom_cnn", "data": "embedded",
        "median_best_kappa": {arm: _r(statistics.median(runs[arm][s]["best"] for s in seeds)) for arm in ARMS},
        "per_seed": per_seed,
        "curves": {arm: {str(s): [[round(t, 1), _r(v)] for t, v in _best_so_far(runs[arm][s]["events"])]
                         for s in seeds} for arm in ARMS},
    }  # fmt: skip
    notes = (
        f"Equal wall-clock budgets of {budget_s:g} s per search (Ray's time_budget_s: SearchPlan.time_budget_s, --time-budget), "
        f"{len(seeds)} seeds, custom_cnn space at {image_size} px on the embedded data, {cpus_per_trial} CPU per "
        f"trial, max {max_epochs} epochs (ASHA grace 1, reduction {reduction_factor}). ratio = median over seeds of the time "
        f"TPE+ASHA needs to reach random search's final best / the time random search needs. Val kappa on a "
        f"small val set is noisy, and more configurations tried means more chances of a lucky score: "
        f"read it with median_best_kappa and the curves."
    )
    if median_ratio > TARGET:
        notes += (
            f" Why the target is missed here: with {budget_s:g}-s budgets a search gets about "
            f"{statistics.median(r['epochs'] for arm in ARMS for r in runs[arm].values()):.0f} epochs and "
            f"{statistics.median(runs['random'][s]['trials'] for s in seeds):.0f} random trials. Both arms draw "
            f"the same first configurations (TPE's start-up is the seeded random sampler), so whenever random "
            f"search's best comes from those, TPE+ASHA reaches it at about the same time (ratio ~1); ASHA only "
            f"saves epochs once several trials share a rung, and TPE only differs after its start-up trials."
        )
    if unreached:
        notes += (
            f" In {unreached} seed(s) TPE+ASHA never reached random's best within the budget; "
            f"those count as budget / time(random), a lower bound."
        )
    return figure(ratio=median_ratio, op="<=", target=TARGET, raw=raw, notes=notes)


def _search(
    root,
    arm: str,
    seed: int,
    budget_s: float,
    num_samples: int,
    max_epochs: int,
    image_size: int,
    cpus_per_trial: int,
    reduction_factor: int,
    max_concurrent: int | None,
) -> dict:
    from mura_tune.search.driver import run_search
    from mura_tune.search.plan import SearchPlan

    plan = SearchPlan(
        space="custom_cnn",
        preset="cpu",
        num_samples=num_samples,
        max_epochs=max_epochs,
        results=str(root),
        name=f"{arm}-seed{seed}",
        cpus_per_trial=cpus_per_trial,
        grace_period=1,
        reduction_factor=reduction_factor,
        seed=seed,
        overrides={"image_size": image_size},
        max_concurrent=max_concurrent,
        random_search=arm == "random",
        time_budget_s=budget_s,
    )
    recorder = _recorder()
    run_search(plan, callbacks=[recorder], verbose=0)
    events = recorder.events
    return {
        "events": events,
        "best": max((v for _, _, v in events), default=float("nan")),
        "trials": len({tid for _, tid, _ in events}),
        "epochs": len(events),
        "seconds": round(recorder.seconds, 1),
    }


def _recorder():
    from ray.tune import Callback

    from mura_tune.constants import METRIC

    class Recorder(Callback):
        """Driver-side wall time of every reported epoch's metric."""

        def __init__(self):
            self.t0 = time.time()
            self.seconds = 0.0
            self.events: list[tuple[float, str, float]] = []

        def setup(self, **info):  # the clock starts when Ray Tune does (after the split and cache)
            self.t0 = time.time()

        def on_experiment_end(self, trials, **info):
            self.seconds = time.time() - self.t0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(METRIC)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.events.append((time.time() - self.t0, trial.trial_id, float(value)))

    return Recorder()


def _best_so_far(events) -> list[tuple[float, float]]:
    out, best = [], -math.inf
    for t, _, v in sorted(events):
        if v > best:
            best = v
            out.append((t, v))
    return out


def _time_to(events, value: float) -> float | None:
    """First time the best-so-far reaches ``value`` (None if never)."""
    for t, v in _best_so_far(events):
        if v >= value - 1e-12:
            return t
    return None


def _r(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


if __name__ == "__main__":
    import json

    from benchmarks.common import setup_env

    setup_env()
    print(json.dumps(run(), indent=2))
