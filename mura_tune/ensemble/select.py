"""Every selection decision, made on one selection set: the ensembles, the per-part routing, the
thresholds and the baselines.

The selection set is the search's val split (``"val"``) or the out-of-fold predictions of a
cross-validated refit (``"oof"``, :mod:`mura_tune.ensemble.oof`); test is never one of them.

1. the generalist ensemble is selected on every selection study (greedy, or bagged);
2. each body part gets its own selection over the generalists + that part's specialists, on the
   part's studies; it serves the part only when it clearly wins: the paired bootstrap interval
   of its gain over the generalist ensemble lies above 0 (:mod:`mura_tune.ensemble.gates`);
3. a part (or the whole set) too small to choose on keeps the generalist, and the builder says
   so in one line;
4. with ``threshold="fit"``, each part's decision threshold is fitted on the ensemble's
   selection predictions, under the same gate (:mod:`mura_tune.ensemble.thresholds`);
5. the baselines are picked: the best single generalist by study kappa and the MURA-paper recipe (mean of the
   5 lowest-loss generalists).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from mura_tune.ensemble.candidates import Candidate, StudyProbs
from mura_tune.ensemble.gates import clearly_wins, paired_gain, rule_text, too_small
from mura_tune.ensemble.greedy import BaggedEnsemble, GreedyEnsemble, score
from mura_tune.ensemble.thresholds import THRESHOLD_MODES, fit_thresholds
from mura_tune.errors import ConfigError, ExperimentError
from mura_tune.layout import GENERALIST_ENSEMBLE, GENERALIST_SCOPE, SERVED_BY_PART
from mura_tune.metrics import THRESHOLD, cohen_kappa, format_ci, log_loss

log = logging.getLogger(__name__)

RECIPE_SIZE = 5
#: The splits selection may see: the search's val split, or a refit's out-of-fold predictions.
SELECTION_SPLITS = ("val", "oof")


@dataclass
class Selection:
    """Every decision made on the selection set: the ensembles, the routing, thresholds, baselines."""

    generalist: GreedyEnsemble
    generalist_rows: list[int]
    parts: dict[str, tuple[GreedyEnsemble, list[int]]] = field(default_factory=dict)
    routing: dict[str, dict] = field(default_factory=dict)
    best_single: int = 0
    recipe: list[int] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)  # part -> threshold (else 0.5)
    threshold_fit: dict[str, dict] = field(default_factory=dict)  # part -> how it was chosen
    too_small: list[str] = field(default_factory=list)  # "XR_HAND (12 studies, 3 abnormal)"


def make_ensemble(bags: int = 1, bag_fraction: float = 0.5, **settings) -> GreedyEnsemble:
    """A greedy ensemble (``bags == 1``) or a bagged one with these selection settings."""
    if bags == 1:
        return GreedyEnsemble(**settings)
    return BaggedEnsemble(n_bags=bags, bag_fraction=bag_fraction, **settings)


def select(
    data: StudyProbs,
    candidates: list[Candidate],
    *,
    max_size: int,
    specialists: bool,
    metric: str,
    seed: int,
    prune_top: int | None,
    margin: float = 0.0,
    max_members: int | None = None,
    bags: int = 1,
    bag_fraction: float = 0.5,
    threshold: str = "0.5",
    n_boot: int = 1000,
    warn: bool = True,
) -> Selection:
    """Make every selection decision from the selection set only (see the module docstring).

    Args:
        data: study-level probabilities of ``candidates`` on the selection set (split ``"val"``
            or ``"oof"``).
        candidates: usable models, in the row order of ``data.probs``.
        max_size, metric, seed, prune_top, max_members: passed to each ensemble.
        specialists: fit one ensemble per body part (generalists + the part's specialists);
            ``False`` serves every part with the generalist ensemble.
        margin: a part ensemble must also beat the generalist on the part by more than this.
        bags, bag_fraction: ``bags > 1`` selects each ensemble by bagged selection.
        threshold: ``"0.5"`` (the MURA rule) or ``"fit"`` (per part, gated).
        n_boot, seed: the gates' paired bootstrap.
        warn: say in one line which parts are too small to choose on.

    Returns:
        The fitted ensembles, per-part routing (scores, gain interval, reason), thresholds and
        the two baselines.

    Raises:
        ExperimentError: ``data`` is not a selection split (test never reaches selection).
        ConfigError: an unknown ``threshold`` mode.
    """
    if data.split not in SELECTION_SPLITS:
        raise ExperimentError(
            f"selection must only see val or out-of-fold data, got {data.split!r}"
        )
    if threshold not in THRESHOLD_MODES:
        raise ConfigError(
            f"--threshold must be one of {', '.join(THRESHOLD_MODES)}, got {threshold!r}"
        )
    names = [c.trial_id for c in candidates]
    gen = [i for i, c in enumerate(candidates) if c.scope == GENERALIST_SCOPE]
    settings = {
        "max_size": max_size,
        "metric": metric,
        "seed": seed,
        "prune_top": prune_top,
        "max_members": max_members,
        "bags": bags,
        "bag_fraction": bag_fraction,
    }
    ens = make_ensemble(**settings).fit(data.probs[gen], data.labels, [names[i] for i in gen])
    sel = Selection(generalist=ens, generalist_rows=gen)
    gen_probs = ens.predict_proba(data.probs[gen])
    if warn:
        _warn_one_class(gen_probs > THRESHOLD, data.split, metric)
    whole = too_small(data.labels)
    if whole:
        sel.too_small.append(f"the whole selection set ({whole})")
    for part in sorted(set(data.body_parts.tolist())):
        cols = data.body_parts == part
        spec = [i for i, c in enumerate(candidates) if c.scope == part]
        base = {
            "served_by": GENERALIST_ENSEMBLE,
            "n_val_studies": int(cols.sum()),
            "n_specialists": len(spec),
            "generalist_val_score": _finite(score(data.labels[cols], gen_probs[cols], metric)),
            "part_val_score": None,
            "margin": margin,
        }
        small = too_small(data.labels[cols])
        if not specialists:
            sel.routing[part] = {**base, "reason": "specialists disabled"}
            continue
        if whole or small:
            if small:
                sel.too_small.append(f"{part} ({small})")
            sel.routing[part] = {
                **base,
                "reason": f"too few selection studies to choose on ({whole or small}; "
                f"need {rule_text()}): generalist kept",
            }
            continue
        rows = gen + spec
        part_ens = make_ensemble(**settings).fit(
            data.probs[rows][:, cols], data.labels[cols], [names[i] for i in rows]
        )
        part_probs = part_ens.predict_proba(data.probs[rows][:, cols])
        gain, ci = paired_gain(data.labels[cols], part_probs, gen_probs[cols], metric, n_boot, seed)
        routed = clearly_wins(gain, ci, margin)
        what = "part ensemble" if spec else "part ensemble (no specialist trials for this part)"
        said = f"{what} gains {gain:.4f} [95% CI {format_ci(ci[0])}, {format_ci(ci[1])}]"
        if routed:
            reason = f"{said}: beats the generalist (interval above 0"
            reason += f", gain > margin {margin})" if margin else ")"
        elif ci[0] is not None and ci[0] > 0:
            reason = f"{said} <= margin {margin}: generalist kept"
        else:
            reason = f"{said}: interval reaches 0, generalist kept"
        sel.routing[part] = {
            **base,
            "served_by": SERVED_BY_PART if routed else GENERALIST_ENSEMBLE,
            "part_val_score": float(part_ens.score_),
            "gain": float(gain),
            "gain_ci": ci,
            "reason": reason,
        }
        sel.parts[part] = (part_ens, rows)
    if sel.too_small and warn:
        log.warning(
            f"too few {data.split} studies to choose on for {', '.join(sel.too_small)}: "
            f"the generalist ensemble and threshold 0.5 serve them (need {rule_text()})"
        )
    # The best single model is the search's own pick (study kappa, the leaderboard's rank), whatever
    # metric drives the ensemble's selection; ties go to the lower log-loss.
    singles = [
        (-cohen_kappa(data.labels, data.probs[i]), log_loss(data.labels, data.probs[i]), i)
        for i in gen
    ]
    sel.best_single = min(singles)[2]
    by_loss = sorted(
        (candidates[i].val_loss, i) for i in gen if np.isfinite(candidates[i].val_loss)
    )
    sel.recipe = [i for _, i in by_loss[:RECIPE_SIZE]]
    if threshold == "fit":
        sel.thresholds, sel.threshold_fit = fit_thresholds(
            data.labels, predict(sel, data)["ensemble"], data.body_parts, n_boot, seed
        )
    return sel


def _warn_one_class(calls: np.ndarray, split: str, metric: str) -> None:
    """Say so when the generalist ensemble calls every selection study the same at 0.5 (kappa 0).

    Log-loss and AUC ignore the threshold: on a weak search they can pick a near-constant model
    that is well calibrated to the base rate but calls no study abnormal.
    """
    if calls.size and (calls.all() or not calls.any()):
        what = "abnormal" if calls.all() else "normal"
        hint = "; --metric kappa selects on the decisions themselves" if metric != "kappa" else ""
        log.warning(
            f"the ensemble selected on {split} {metric} calls every {split} study {what} "
            f"at threshold 0.5 (kappa 0){hint}"
        )


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def predict(sel: Selection, data: StudyProbs) -> dict[str, np.ndarray]:
    """Study probabilities of the ensemble (with routing) and the baselines on one split.

    Args:
        sel: the decisions made on the selection set.
        data: the split to predict (rows of candidates not used by ``sel`` may be nan).

    Returns:
        ``{"ensemble", "best_single"[, "mura_recipe"]: (n_studies,) probabilities}``.
    """
    out = {"ensemble": sel.generalist.predict_proba(data.probs[sel.generalist_rows])}
    for part, (part_ens, rows) in sel.parts.items():
        if sel.routing[part]["served_by"] == SERVED_BY_PART:
            cols = data.body_parts == part
            out["ensemble"][cols] = part_ens.predict_proba(data.probs[rows][:, cols])
    out["best_single"] = data.probs[sel.best_single].copy()
    if sel.recipe:
        out["mura_recipe"] = data.probs[sel.recipe].mean(0)
    return out


def needed(sel: Selection) -> set[int]:
    """The candidate rows the decisions use (the only ones whose test rows are read)."""
    rows = {sel.best_single, *sel.recipe}
    rows |= {sel.generalist_rows[j] for j in np.flatnonzero(sel.generalist.weights_)}
    for part, (part_ens, part_rows) in sel.parts.items():
        if sel.routing[part]["served_by"] == SERVED_BY_PART:
            rows |= {part_rows[j] for j in np.flatnonzero(part_ens.weights_)}
    return rows
