"""Gates on the choices selection makes: is a set large enough to choose on, and does a choice clearly win?

A per-part ensemble, or a fitted threshold, replaces the default on a body part only when the
paired bootstrap interval of its gain over that part's selection studies lies above 0: the two
are scored on the same resampled studies, so the interval is the one of the difference itself.
A set with fewer than :data:`MIN_STUDIES` studies, or fewer than :data:`MIN_PER_CLASS` of either
class, cannot resolve any choice (kappa's interval on it spans most of [-1, 1]): the default is
kept and the builder says so.

The gain is measured on the studies the choice was made on, so it is optimistic; the gate only
refuses what even that optimistic measure cannot tell from noise.
"""

from __future__ import annotations

import numpy as np

from mura_tune.ensemble.greedy import maximise, score
from mura_tune.metrics import kappa_resamples, resample_indices

MIN_STUDIES = 20
MIN_PER_CLASS = 5
ALPHA = 0.05


def too_small(labels: np.ndarray) -> str | None:
    """Why a set of studies is too small to choose on (``"12 studies, 3 abnormal"``), or None."""
    y = np.asarray(labels).astype(bool)
    n, pos = int(y.size), int(y.sum())
    if n < MIN_STUDIES or min(pos, n - pos) < MIN_PER_CLASS:
        return f"{n} studies, {pos} abnormal"
    return None


def rule_text() -> str:
    return f"at least {MIN_STUDIES} studies with {MIN_PER_CLASS} of each class"


def paired_gain(
    labels: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    metric: str = "kappa",
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, list[float | None]]:
    """A's score minus B's on the same studies (in the metric's better direction), with its interval.

    Args:
        labels: ``(S,)`` 0/1 study labels.
        probs_a, probs_b: ``(S,)`` study probabilities of A and B (for kappa, 0/1 decisions work
            too: a decision of 1 is above 0.5).
        metric: ``"kappa"``, ``"auc"`` or ``"logloss"`` (a lower log-loss is a positive gain).
        n_boot: bootstrap resamples of the studies.
        seed: seeds the resampling.

    Returns:
        ``(gain, [low, high])``: the observed gain and its 95% percentile paired-bootstrap
        interval (``[None, None]`` where the metric is undefined on every resample).
    """
    y = np.asarray(labels)
    a, b = np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)
    sign = 1.0 if maximise(metric) else -1.0
    gain = sign * (score(y, a, metric) - score(y, b, metric))
    idx = resample_indices(y.size, n_boot, seed)
    if metric == "kappa":
        boot = kappa_resamples(y, a, idx) - kappa_resamples(y, b, idx)
    else:
        boot = np.array(
            [sign * (score(y[i], a[i], metric) - score(y[i], b[i], metric)) for i in idx]
        )
    boot = boot[np.isfinite(boot)]
    if not boot.size:
        return float(gain), [None, None]
    low, high = np.percentile(boot, (100 * ALPHA / 2, 100 * (1 - ALPHA / 2)))
    return float(gain), [float(low), float(high)]


def clearly_wins(gain: float, interval: list[float | None], margin: float = 0.0) -> bool:
    """The interval of the gain lies above 0 and the gain itself exceeds ``margin``."""
    return bool(interval[0] is not None and interval[0] > 0 and gain > margin)
