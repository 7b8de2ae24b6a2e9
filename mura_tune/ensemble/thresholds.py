"""Decision thresholds per body part, fitted on the selection set (``--threshold fit``).

The MURA rule calls a study abnormal when its probability is above 0.5, and that stays the
default. With ``--threshold fit``, each body part gets the threshold that maximises its study
kappa on the selection predictions (the ensemble's, after routing), kept only when the paired
bootstrap interval of its kappa gain over 0.5 lies above 0 on that part's studies (the gate of
:mod:`mura_tune.ensemble.gates`); otherwise, and on parts too small to choose on, 0.5 stays.

    thresholds, details = fit_thresholds(labels, probs, body_parts, n_boot=1000, seed=0)
"""

from __future__ import annotations

import numpy as np

from mura_tune.ensemble.gates import clearly_wins, paired_gain, rule_text, too_small
from mura_tune.metrics import THRESHOLD, kappa_batch

THRESHOLD_MODES = ("0.5", "fit")


def best_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold with the highest study kappa (``prob > t`` is abnormal).

    Candidates are 0.5 and the midpoints between consecutive distinct probabilities; ties go to
    the candidate closest to 0.5, so a threshold moves only as far as the data asks.
    """
    p = np.asarray(probs, dtype=np.float64)
    distinct = np.unique(p)
    candidates = np.concatenate([[THRESHOLD], (distinct[1:] + distinct[:-1]) / 2])
    kappas = kappa_batch(labels, p[None, :] > candidates[:, None])
    best = np.flatnonzero(kappas >= kappas.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - THRESHOLD))]])


def fit_thresholds(
    labels: np.ndarray,
    probs: np.ndarray,
    body_parts: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, dict]]:
    """A kappa-optimal threshold per body part, where it clearly beats 0.5.

    Args:
        labels: ``(S,)`` selection-set study labels.
        probs: ``(S,)`` the ensemble's study probabilities on them.
        body_parts: ``(S,)`` body part of each study.
        n_boot: bootstrap resamples of the gate.
        seed: seeds the bootstrap.

    Returns:
        ``({part: threshold}, {part: {"threshold", "fitted", "gain", "gain_ci", "reason"}})``.
    """
    y, p, parts = np.asarray(labels), np.asarray(probs, dtype=np.float64), np.asarray(body_parts)
    thresholds, details = {}, {}
    for part in sorted(set(parts.tolist())):
        m = parts == part
        small = too_small(y[m])
        if small:
            thresholds[part] = THRESHOLD
            details[part] = {
                "threshold": THRESHOLD,
                "fitted": None,
                "gain": None,
                "gain_ci": None,
                "reason": f"too few studies to fit a threshold ({small}; need {rule_text()}): 0.5 kept",
            }
            continue
        t = best_threshold(y[m], p[m])
        if t == THRESHOLD:
            thresholds[part] = THRESHOLD
            details[part] = {
                "threshold": THRESHOLD,
                "fitted": THRESHOLD,
                "gain": 0.0,
                "gain_ci": [0.0, 0.0],
                "reason": "0.5 is already the kappa-optimal threshold",
            }
            continue
        gain, ci = paired_gain(y[m], (p[m] > t).astype(float), p[m], "kappa", n_boot, seed)
        keep = clearly_wins(gain, ci)
        thresholds[part] = t if keep else THRESHOLD
        details[part] = {
            "threshold": thresholds[part],
            "fitted": t,
            "gain": gain,
            "gain_ci": ci,
            "reason": (
                f"threshold {t:.3f} gains {gain:.3f} kappa [95% CI {ci[0]:.3f}, {ci[1]:.3f}]"
                + (": used" if keep else ": interval reaches 0, 0.5 kept")
            ),
        }
    return thresholds, details


def per_study(thresholds: dict[str, float], body_parts: np.ndarray) -> np.ndarray:
    """Each study's threshold (0.5 for a part without one)."""
    return np.array([thresholds.get(str(p), THRESHOLD) for p in body_parts], dtype=np.float64)
