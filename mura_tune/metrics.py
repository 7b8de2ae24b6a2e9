"""Pure metric functions: image → study aggregation, Cohen's kappa, AUC, bootstrap intervals, and
the one scoring of study predictions with intervals (:func:`score_studies`).

MURA is scored per study: a study's probability is the mean of its images' probabilities,
and the study is abnormal when that mean is above 0.5 (Rajpurkar et al. 2017).

Conventions:
    * the kappa of a constant predictor is 0, never NaN;
    * AUC with only one class present is ``nan`` ("missing"), never an exception.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

THRESHOLD = 0.5
_EPS = 1e-7
#: The study-level metrics reported with bootstrap intervals (ensemble report, evaluate, HTML report).
METRIC_NAMES = ("kappa", "auc", "accuracy", "sensitivity", "specificity")


def study_table(images: pd.DataFrame) -> pd.DataFrame:
    """Aggregate image-level rows to studies by the mean probability.

    Args:
        images: rows with ``study_id``, ``label``, ``prob`` and optionally ``body_part``/``split``.

    Returns:
        One row per study (sorted by ``study_id``) with the same key columns, ``label``, ``prob``
        (mean of the image probabilities) and ``n_images``.
    """
    keys = [c for c in ("split", "study_id", "body_part") if c in images.columns]
    grouped = images.groupby(keys, sort=True, observed=True)
    out = grouped.agg(label=("label", "first"), prob=("prob", "mean"), n_images=("prob", "size"))
    out = out.reset_index()
    out["label"] = out["label"].astype(np.int8)
    return out


def kappa_from_counts(tp, fp, fn, tn):
    """Cohen's kappa from confusion counts (arrays broadcast); 0 where it is undefined."""
    tp, fp, fn, tn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn, tn))
    n = tp + fp + fn + tn
    with np.errstate(invalid="ignore", divide="ignore"):
        p_o = (tp + tn) / n
        p_e = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n)
        kappa = (p_o - p_e) / (1.0 - p_e)
    return np.where(np.isfinite(kappa), kappa, 0.0)


def kappa_batch(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Kappa of many binary predictions against one label vector at once.

    Args:
        labels: ``(S,)`` 0/1 labels.
        preds: ``(..., S)`` 0/1 (or bool) predictions.

    Returns:
        ``(...)`` kappas.
    """
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(preds, dtype=bool)
    tp = (p & y).sum(-1)
    fp = (p & ~y).sum(-1)
    fn = (~p & y).sum(-1)
    tn = (~p & ~y).sum(-1)
    return kappa_from_counts(tp, fp, fn, tn)


def cohen_kappa(labels, probs, threshold: float = THRESHOLD) -> float:
    """Kappa of ``prob > threshold`` against ``labels`` (0 for a constant predictor)."""
    return float(kappa_batch(labels, np.asarray(probs) > threshold))


def at_half(probs, threshold) -> np.ndarray:
    """``probs`` rescaled (piecewise linearly, per study) so that each study's ``threshold`` maps
    to 0.5: every kappa computed at 0.5 on the result is the kappa at those thresholds, so the
    kappa-only tools (paired differences, resamples) serve models with fitted thresholds too.
    """
    p = np.asarray(probs, dtype=np.float64)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), p.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        above = 0.5 + 0.5 * (p - t) / (1 - t)
        below = np.where(t > 0, 0.5 * p / t, 0.5)
    return np.where(p > t, above, below)


def roc_auc(labels, probs) -> float:
    """ROC AUC, or ``nan`` when only one class is present."""
    # scikit-learn takes seconds to import: only once there is an AUC to compute, so that importing
    # this module (every command that scores) stays cheap and a malformed file is reported at once.
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.size == 0 or np.unique(labels).size < 2:
        return math.nan
    return float(roc_auc_score(labels, probs))


def log_loss(labels, probs) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def binary_metrics(labels, probs, threshold: float = THRESHOLD) -> dict[str, float]:
    """Kappa, AUC, accuracy, sensitivity, specificity and log-loss of one set of predictions."""
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(probs, dtype=np.float64) > threshold
    tp, fp = int((p & y).sum()), int((p & ~y).sum())
    fn, tn = int((~p & y).sum()), int((~p & ~y).sum())
    n = max(y.size, 1)
    return {
        "kappa": float(kappa_from_counts(tp, fp, fn, tn)),
        "auc": roc_auc(y.astype(int), probs),
        "accuracy": (tp + tn) / n,
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "logloss": log_loss(y, probs),
        "n": int(y.size),
    }


def split_metrics(images: pd.DataFrame, prefix: str, per_part: bool = True) -> dict[str, float]:
    """The per-epoch metric dict of one split from image-level predictions.

    Args:
        images: image rows with ``study_id``, ``body_part``, ``label``, ``prob``.
        prefix: e.g. ``"val"`` gives ``val_auc``, ``val_kappa_study``, ``val_kappa_study_XR_WRIST``.
        per_part: also report study kappa and AUC per body part.
    """
    out: dict[str, float] = {}
    img = binary_metrics(images["label"].to_numpy(), images["prob"].to_numpy())
    out[f"{prefix}_kappa_image"] = img["kappa"]
    out[f"{prefix}_loss"] = img["logloss"]
    studies = study_table(images)
    st = binary_metrics(studies["label"].to_numpy(), studies["prob"].to_numpy())
    out[f"{prefix}_kappa_study"] = st["kappa"]
    out[f"{prefix}_auc"] = st["auc"]
    out[f"{prefix}_accuracy"] = st["accuracy"]
    out[f"{prefix}_sensitivity"] = st["sensitivity"]
    out[f"{prefix}_specificity"] = st["specificity"]
    if per_part:
        for part, grp in studies.groupby("body_part", sort=True, observed=True):
            out[f"{prefix}_kappa_study_{part}"] = cohen_kappa(grp["label"], grp["prob"])
            out[f"{prefix}_auc_{part}"] = roc_auc(grp["label"], grp["prob"])
    return out


def bootstrap_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    auc: bool = True,
    threshold: float | np.ndarray = THRESHOLD,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over studies for kappa, AUC, accuracy, sensitivity, specificity.

    Args:
        labels: ``(S,)`` study labels.
        probs: ``(S,)`` study probabilities.
        n_boot: number of resamples.
        alpha: 0.05 gives 95% intervals.
        seed: seeds the resampling.
        auc: also the AUC's interval (ranks every resample: most of the cost; the other
            intervals are unchanged without it).
        threshold: a study is abnormal when its probability is above this (a number, or one per study).

    Returns:
        ``{metric: (low, high)}``; ``(nan, nan)`` where a metric is undefined.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(probs, dtype=np.float64)
    if y.size == 0:
        return {
            k: (math.nan, math.nan)
            for k in ("kappa", "auc", "accuracy", "sensitivity", "specificity")
        }
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, y.size, size=(n_boot, y.size))
    yb, pb = y[idx], s[idx] > np.broadcast_to(np.asarray(threshold, dtype=np.float64), s.shape)[idx]
    tp = (pb & yb).sum(1)
    fp = (pb & ~yb).sum(1)
    fn = (~pb & yb).sum(1)
    tn = (~pb & ~yb).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        samples = {
            "kappa": kappa_from_counts(tp, fp, fn, tn),
            "accuracy": (tp + tn) / y.size,
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
        }
        if auc:
            samples["auc"] = _auc_batch(yb, s[idx])
    q = (100 * alpha / 2, 100 * (1 - alpha / 2))
    out = {}
    for name, vals in samples.items():
        vals = vals[np.isfinite(vals)]
        out[name] = (
            tuple(float(v) for v in np.percentile(vals, q)) if vals.size else (math.nan, math.nan)
        )
    return out


def _auc_batch(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUC per row via the Mann-Whitney rank statistic (ties get average ranks); nan if one class."""
    from scipy.stats import rankdata

    ranks = rankdata(s, axis=1)
    n_pos = y.sum(1)
    n_neg = y.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


# --- study-level scores with intervals (evaluate, ensemble report, HTML report) ----------------------
def _num(x: float) -> float | None:
    """A JSON-safe number: ``None`` where the metric is undefined."""
    return float(x) if x is not None and math.isfinite(x) else None


def _block(
    labels: np.ndarray, probs: np.ndarray, n_boot: int, seed: int, threshold: np.ndarray
) -> dict:
    point = binary_metrics(labels, probs, threshold)
    ci = bootstrap_intervals(labels, probs, n_boot=n_boot, seed=seed, threshold=threshold)
    out: dict = {"n": int(len(labels)), "n_abnormal": int(np.sum(labels))}
    for name in METRIC_NAMES:
        out[name] = _num(point[name])
        out[f"{name}_ci"] = [_num(ci[name][0]), _num(ci[name][1])]
    return out


def score_studies(
    labels: np.ndarray,
    probs: np.ndarray,
    body_parts: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float | np.ndarray = THRESHOLD,
) -> dict:
    """Overall and per-body-part study metrics with 95% bootstrap intervals over studies.

    Args:
        labels: ``(S,)`` study labels, studies in a fixed order (callers sort by ``study_id``).
        probs: ``(S,)`` study probabilities (abnormal iff > ``threshold``).
        body_parts: ``(S,)`` body part of each study.
        n_boot: bootstrap resamples.
        seed: seeds every bootstrap (the same seed for the overall and each part's figures).
        threshold: the decision threshold: 0.5 (the MURA rule), or one per study (e.g. fitted per
            body part); AUC does not depend on it.

    Returns:
        ``{"n_studies", "overall": block, "parts": {part: block}}`` where a block holds ``n``,
        ``n_abnormal`` and, for kappa/auc/accuracy/sensitivity/specificity, the value and
        ``<name>_ci`` = ``[low, high]`` (``None`` where undefined).
    """
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    parts = np.asarray(body_parts).astype(str)
    thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), probs.shape)
    out = {
        "n_studies": int(labels.size),
        "overall": _block(labels, probs, n_boot, seed, thr),
        "parts": {},
    }
    for part in sorted(set(parts.tolist())):
        m = parts == part
        out["parts"][part] = _block(labels[m], probs[m], n_boot, seed, thr[m])
    return out


def format_ci(value: float | None, ci: list | tuple | None = None, signed: bool = False) -> str:
    """``0.712 [0.660, 0.760]`` (``+0.041 [+0.012, +0.070]`` when ``signed``), or ``n/a`` where undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if ci is None or ci[0] is None:
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


# --- paired comparisons -------------------------------------------------------------------------
def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` study indices drawn with replacement (one row per bootstrap resample)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def kappa_resamples(labels: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Study kappa (``prob > 0.5``) of one model on each resample of ``idx``: ``(n_boot,)``."""
    y = np.asarray(labels, dtype=bool)[idx]
    p = (np.asarray(probs, dtype=np.float64) > THRESHOLD)[idx]
    tp = np.count_nonzero(p & y, axis=-1)
    fp = np.count_nonzero(p & ~y, axis=-1)
    fn = np.count_nonzero(~p & y, axis=-1)
    return kappa_from_counts(tp, fp, fn, y.shape[-1] - tp - fp - fn)


def paired_kappa_difference(
    labels: np.ndarray,
    probs_a: np.ndarray | list[np.ndarray],
    probs_b: np.ndarray | list[np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Study kappa of A minus that of B on the same studies, with a paired bootstrap interval.

    Both models are scored on the same resampled studies in every resample, so the interval of
    the difference is far narrower than the two models' own intervals suggest (their errors are
    correlated). Several seeds (one A and one B per seed, on the same studies) are combined by
    averaging the per-seed differences within each resample.

    Args:
        labels: ``(S,)`` study labels; the same studies, in the same order, for every model.
        probs_a: ``(S,)`` study probabilities of A, or one such array per seed.
        probs_b: the same for B (as many seeds as A).
        n_boot: bootstrap resamples of the studies.
        seed: seeds the resampling.
        alpha: 0.05 gives 95% intervals.

    Returns:
        ``{"per_seed": [{"diff", "ci"}], "mean": {"diff", "ci", "p_le_0"}}``: ``diff`` is the
        observed difference, ``ci`` the percentile interval, ``p_le_0`` the share of resamples
        in which the mean difference is <= 0 (a one-sided bootstrap p-value).

    Raises:
        ValueError: A and B have different numbers of seeds, or an array is not ``(S,)``.
    """
    a = [np.asarray(probs_a)] if np.ndim(probs_a) == 1 else [np.asarray(x) for x in probs_a]
    b = [np.asarray(probs_b)] if np.ndim(probs_b) == 1 else [np.asarray(x) for x in probs_b]
    n = len(labels)
    if len(a) != len(b) or any(x.shape != (n,) for x in a + b):
        raise ValueError(f"need one ({n},) array of A and of B per seed, got {len(a)} and {len(b)}")
    idx = resample_indices(n, n_boot, seed)
    everything = np.arange(n)[None, :]
    q = (100 * alpha / 2, 100 * (1 - alpha / 2))
    per_seed, resampled = [], []
    for pa, pb in zip(a, b):
        d = kappa_resamples(labels, pa, idx) - kappa_resamples(labels, pb, idx)
        observed = kappa_resamples(labels, pa, everything) - kappa_resamples(labels, pb, everything)
        per_seed.append({"diff": float(observed[0]), "ci": [float(v) for v in np.percentile(d, q)]})
        resampled.append(d)
    mean = np.mean(resampled, axis=0)
    return {
        "per_seed": per_seed,
        "mean": {
            "diff": float(np.mean([s["diff"] for s in per_seed])),
            "ci": [float(v) for v in np.percentile(mean, q)],
            "p_le_0": float(np.mean(mean <= 0)),
        },
    }
