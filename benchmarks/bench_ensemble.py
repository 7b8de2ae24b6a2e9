"""Benchmark greedy ensemble selection: 1,000 candidates x 1,200 studies x 50 steps (target < 1 s).

Run::

    python -m benchmarks.bench_ensemble
"""

from __future__ import annotations

import time

import numpy as np

from mura_tune.ensemble.greedy import GreedyEnsemble

CANDIDATES, STUDIES, STEPS = 1000, 1200, 50


def run(metric: str = "kappa", seed: int = 0) -> dict:
    """Fit one ensemble on random data and time it.

    Args:
        metric: selection metric (``"kappa"``, ``"logloss"`` or ``"auc"``).
        seed: seeds the random data and the ensemble.

    Returns:
        ``{"seconds", "candidates", "studies", "steps", "metric"}``.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, STUDIES)
    skill = rng.uniform(0.0, 2.0, (CANDIDATES, 1))
    logits = skill * (2 * labels - 1) + rng.normal(0.0, 1.5, (CANDIDATES, STUDIES))
    probs = 1.0 / (1.0 + np.exp(-logits))
    start = time.perf_counter()
    GreedyEnsemble(max_size=STEPS, metric=metric, seed=seed).fit(probs, labels)
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 3),
        "candidates": CANDIDATES,
        "studies": STUDIES,
        "steps": STEPS,
        "metric": metric,
    }


if __name__ == "__main__":
    print(run())
