"""Paired bootstrap of a kappa difference: exact on the full sample, narrower than the unpaired intervals."""

from __future__ import annotations

import numpy as np
import pytest

from mura_tune.metrics import bootstrap_intervals, cohen_kappa, paired_kappa_difference


def _models(n: int = 1200, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    signal = y + rng.normal(0, 0.9, n)  # shared by both models: their errors are correlated
    a = 1 / (1 + np.exp(-(signal - 0.5 + rng.normal(0, 0.3, n)) * 2))
    b = 1 / (1 + np.exp(-(signal - 0.5 + rng.normal(0, 0.6, n)) * 2))
    return y, a, b


def test_observed_difference_and_a_paired_interval_narrower_than_unpaired():
    y, a, b = _models()
    out = paired_kappa_difference(y, a, b, n_boot=1000, seed=0)
    assert out["per_seed"][0]["diff"] == pytest.approx(cohen_kappa(y, a) - cohen_kappa(y, b))
    low, high = out["per_seed"][0]["ci"]
    assert low < out["per_seed"][0]["diff"] < high
    paired_width = high - low
    ka, kb = (bootstrap_intervals(y, p, n_boot=1000, auc=False)["kappa"] for p in (a, b))
    assert paired_width < min(ka[1] - ka[0], kb[1] - kb[0])  # correlated errors cancel


def test_seeds_average_and_identical_models_differ_by_zero():
    y, a, b = _models()
    out = paired_kappa_difference(y, [a, b], [b, a], n_boot=500)
    assert out["mean"]["diff"] == pytest.approx(0.0)
    same = paired_kappa_difference(y, a, a, n_boot=200)
    assert same["mean"]["ci"] == [0.0, 0.0] and same["mean"]["p_le_0"] == 1.0
    better = paired_kappa_difference(y, a, np.full_like(a, 0.2), n_boot=500)
    assert better["mean"]["ci"][0] > 0 and better["mean"]["p_le_0"] == 0.0


def test_mismatched_seeds_are_refused():
    y, a, b = _models(50)
    with pytest.raises(ValueError, match="per seed"):
        paired_kappa_difference(y, [a, a], [b])
