"""``search_efficiency``: how soon does mura-tune's search reach what random search finds?

Both arms are the value benchmark's search arms (benchmarks/arms.py: ``random`` and
``mura_tune``): the real search through the Python API on the embedded data at 48 px, the
``custom_cnn`` space's cpu preset, one trial at a time on one CPU core, and the same budget of
CPU-seconds counted by the operating system over the whole search (Ray's own processes
included), so the figure does not move with the machine's load. A Ray Tune callback records,
at every reported epoch, the CPU-seconds spent so far and that epoch's val study kappa; every
epoch counts (each could be a checkpoint a trial keeps), in both arms alike.

Per seed (the seed sets the split and both samplers): the CPU-seconds random search needs to
reach its own final best val kappa, and those TPE+ASHA needs to reach the same value. The
figure is the median over seeds of the ratio (TPE+ASHA / random; a seed where TPE+ASHA never gets
there counts as budget / random's time, a lower bound). Arms the value benchmark already ran
with the same budget are reused.

    python -m benchmarks.bench_search            # 5 seeds x 2 arms x 600 CPU-s: ~50 min on 2 cores
"""

from __future__ import annotations

import math
import statistics

from benchmarks.common import figure, log

TARGET = 0.35
ARMS = ("mura_tune", "random")


def run(seeds: tuple[int, ...] = (0, 1, 2, 3, 4), budget: float = 600.0) -> dict:
    """Run (or reuse) both search arms for every seed and compare their best-so-far curves."""
    from benchmarks.arms import launch
    from benchmarks.value import arm_dir

    jobs = [(arm, seed, budget, arm_dir(arm, seed)) for seed in seeds for arm in ARMS]
    results = {(r["arm"], r["seed"]): r for r in launch(jobs)}
    per_seed, ratios = {}, []
    for seed in seeds:
        events = {arm: results[arm, seed]["info"]["events"] for arm in ARMS}
        target = max(v for _, _, v in events["random"])
        t_random = time_to(events["random"], target)
        t_tpe = time_to(events["mura_tune"], target)
        ratio = t_tpe / t_random if t_tpe is not None else budget / t_random
        ratios.append(ratio)
        per_seed[str(seed)] = {
            "random_final_best": _r(target),
            "tpe_asha_final_best": _r(max(v for _, _, v in events["mura_tune"])),
            "random_cpu_seconds_to_its_best": _r(t_random),
            "tpe_asha_cpu_seconds_to_random_best": _r(t_tpe),
            "ratio": _r(ratio),
            "reached": t_tpe is not None,
            **{f"{arm}_trials": results[arm, seed]["info"]["trials"] for arm in ARMS},
            **{f"{arm}_epochs": len(events[arm]) for arm in ARMS},
        }
        log(f"search_efficiency seed {seed}: ratio {ratio:.2f} (random's best {target:.3f})")
    median = statistics.median(ratios)
    raw = {
        "seeds": list(seeds), "budget_cpu_seconds": budget, "space": "custom_cnn (cpu preset)",
        "data": "embedded synthetic set, 48 px", "per_seed": per_seed,
        "curves": {arm: {str(s): [(t, _r(v)) for t, v in best_so_far(results[arm, s]["info"]["events"])]
                         for s in seeds} for arm in ARMS},
    }  # fmt: skip
    notes = (
        f"Equal budgets of {budget:g} CPU-seconds per search (the OS's count over every process of "
        f"the search), {len(seeds)} seeds, one trial at a time on one core. ratio = median over seeds "
        "of the CPU-seconds TPE+ASHA needs to reach random search's final best val study kappa / "
        "those random search needs. mura-tune's search = TPE (multivariate, constant liar) warm-started "
        "at the space's default configuration + ASHA (grace 2, reduction factor 3, max 30 epochs); "
        "random search = random sampling, every trial run until its own early stopping."
    )
    return figure(ratio=median, op="<=", target=TARGET, raw=raw, notes=notes)


def best_so_far(events) -> list[tuple[float, float]]:
    """``(CPU-seconds, best val kappa so far)`` at every improvement."""
    out, best = [], -math.inf
    for t, _, v in sorted(events):
        if v > best:
            best = v
            out.append((t, v))
    return out


def time_to(events, value: float) -> float | None:
    """First CPU-second at which the best-so-far reaches ``value`` (None if never)."""
    for t, v in best_so_far(events):
        if v >= value - 1e-9:
            return t
    return None


def _r(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


if __name__ == "__main__":
    import json

    from benchmarks.common import setup_env

    setup_env()
    print(json.dumps(run(), indent=2))
