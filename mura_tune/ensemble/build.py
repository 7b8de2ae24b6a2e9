"""From an experiment folder to ``ensembles/<name>/``: select on val, route per body part, report on test.

Order of work (the test split is never read before every selection decision is made):

1. read the leaderboard; skip ERROR trials and trials without a predictions file;
2. load study-level **val** probabilities of every candidate (Parquet filter ``split == "val"``);
3. fit the generalist ensemble on all val studies, then, for every body part, an ensemble over
   the generalists + that part's specialists (if any) on the part's val studies; a part uses
   its own ensemble only if it beats the generalist ensemble there by more than ``margin``;
4. pick the baselines on val: the best single generalist and the MURA-paper recipe (mean of the
   5 lowest ``val_loss`` generalists);
5. only now load **test** rows, for the chosen models only, and report val and test side by side.

Example::

    python -c "from mura_tune.ensemble.build import build_ensemble; build_ensemble('results/demo')"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mura_tune.ensemble.candidates import (
    Candidate,
    StudyProbs,
    coverage,
    drop_incomplete,
    load_study_probs,
    read_candidates,
)
from mura_tune.ensemble.greedy import GreedyEnsemble, check_metric, maximise, score
from mura_tune.errors import ConfigError, ExperimentError
from mura_tune.io import write_json, write_parquet
from mura_tune.layout import (
    GENERALIST_ENSEMBLE,
    GENERALIST_SCOPE,
    NO_SCORE,
    SERVED_BY_PART,
    EnsembleDir,
    ExperimentDir,
)
from mura_tune.metrics import METRIC_NAMES, format_ci, log_loss, score_studies
from mura_tune.search.leaderboard import build_leaderboard

RECIPE_SIZE = 5
MODELS = {"ensemble": "ensemble", "best_single": "best single", "mura_recipe": "MURA recipe"}


@dataclass
class Selection:
    """Every decision made on val: the ensembles, the routing and the baselines."""

    generalist: GreedyEnsemble
    generalist_rows: list[int]
    parts: dict[str, tuple[GreedyEnsemble, list[int]]] = field(default_factory=dict)
    routing: dict[str, dict] = field(default_factory=dict)
    best_single: int = 0
    recipe: list[int] = field(default_factory=list)


def select(
    val: StudyProbs,
    candidates: list[Candidate],
    *,
    max_size: int,
    specialists: bool,
    metric: str,
    margin: float,
    seed: int,
    prune_top: int | None,
) -> Selection:
    """Make every selection decision from val data only (see the module docstring).

    Args:
        val: study-level val probabilities of ``candidates`` (split must be ``"val"``).
        candidates: usable trials, in the row order of ``val.probs``.
        max_size, metric, seed, prune_top: passed to each :class:`GreedyEnsemble`.
        specialists: fit one ensemble per body part (generalists + the part's specialists);
            ``False`` serves every part with the generalist ensemble.
        margin: a part ensemble must beat the generalist ensemble on the part by more than this.

    Returns:
        The fitted ensembles, per-part routing (scores and reason) and the two baselines.
    """
    if val.split != "val":
        raise ExperimentError(f"selection must only see val data, got split {val.split!r}")
    names = [c.trial_id for c in candidates]
    gen = [i for i, c in enumerate(candidates) if c.scope == GENERALIST_SCOPE]
    settings = {"max_size": max_size, "metric": metric, "seed": seed, "prune_top": prune_top}
    ens = GreedyEnsemble(**settings).fit(val.probs[gen], val.labels, [names[i] for i in gen])
    sel = Selection(generalist=ens, generalist_rows=gen)
    gen_probs = ens.predict_proba(val.probs[gen])
    sign = 1.0 if maximise(metric) else -1.0
    for part in sorted(set(val.body_parts.tolist())):
        cols = val.body_parts == part
        spec = [i for i, c in enumerate(candidates) if c.scope == part]
        base = {
            "served_by": GENERALIST_ENSEMBLE,
            "n_val_studies": int(cols.sum()),
            "n_specialists": len(spec),
            "generalist_val_score": _finite(score(val.labels[cols], gen_probs[cols], metric)),
            "part_val_score": None,
            "margin": margin,
        }
        if not specialists:
            sel.routing[part] = {**base, "reason": "specialists disabled"}
            continue
        if metric == "auc" and np.unique(val.labels[cols]).size < 2:
            sel.routing[part] = {
                **base,
                "reason": "val studies of this part have one class: auc undefined",
            }
            continue
        rows = gen + spec
        part_ens = GreedyEnsemble(**settings).fit(
            val.probs[rows][:, cols], val.labels[cols], [names[i] for i in rows]
        )
        gain = sign * (part_ens.score_ - score(val.labels[cols], gen_probs[cols], metric))
        routed = gain > margin
        what = "part ensemble" if spec else "part ensemble (no specialist trials for this part)"
        reason = (
            f"{what} beats the generalist by {gain:.4f} > margin {margin}"
            if routed
            else f"{what} gains {gain:.4f} <= margin {margin}: generalist kept"
        )
        sel.routing[part] = {
            **base,
            "served_by": SERVED_BY_PART if routed else GENERALIST_ENSEMBLE,
            "part_val_score": float(part_ens.score_),
            "gain": float(gain),
            "reason": reason,
        }
        sel.parts[part] = (part_ens, rows)
    singles = [
        (-sign * score(val.labels, val.probs[i], metric), log_loss(val.labels, val.probs[i]), i)
        for i in gen
    ]
    sel.best_single = min(singles)[2]
    by_loss = sorted(
        (candidates[i].val_loss, i) for i in gen if np.isfinite(candidates[i].val_loss)
    )
    sel.recipe = [i for _, i in by_loss[:RECIPE_SIZE]]
    return sel


def _check_finished(exp: Path) -> None:
    """Fail clearly when every trial of the experiment errored or is damaged (the board then has no
    metric columns).

    The message has the form of the one below in :func:`build_ensemble`, plus the first error's reason.
    """
    path = ExperimentDir(exp).leaderboard
    if not path.is_file():
        return  # read_candidates names the missing file
    board = pd.read_parquet(path)
    if "status" not in board.columns or len(board) == 0 or (~board["status"].isin(NO_SCORE)).any():
        return
    first = board.iloc[0]
    reason = first.get("reason")
    why = f", {reason}" if isinstance(reason, str) and reason else ""
    raise ExperimentError(
        f"no finished generalist trial with predictions in {exp} "
        f"({len(board)} trial(s) skipped: {first['trial_id']} status {first['status']}{why})"
    )


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def predict(sel: Selection, data: StudyProbs) -> dict[str, np.ndarray]:
    """Study probabilities of the ensemble (with routing) and the baselines on one split.

    Args:
        sel: the decisions made on val.
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


def _needed(sel: Selection) -> set[int]:
    rows = {sel.best_single, *sel.recipe}
    rows |= {sel.generalist_rows[j] for j in np.flatnonzero(sel.generalist.weights_)}
    for part, (part_ens, part_rows) in sel.parts.items():
        if sel.routing[part]["served_by"] == SERVED_BY_PART:
            rows |= {part_rows[j] for j in np.flatnonzero(part_ens.weights_)}
    return rows


def _members(
    ens: GreedyEnsemble, rows: list[int], candidates: list[Candidate], used: bool = True
) -> dict:
    order = np.argsort(-ens.weights_, kind="stable")
    members = [
        {
            "trial_id": candidates[rows[j]].trial_id,
            "scope": candidates[rows[j]].scope,
            "checkpoint_path": candidates[rows[j]].checkpoint_path,
            "weight": float(ens.weights_[j]),
        }
        for j in order
        if ens.weights_[j] > 0
    ]
    return {
        "used": used,
        "val_score": float(ens.score_),
        "best_size": ens.best_size_,
        "n_init": ens.n_init_,
        "members": members,
        "selection_order": [candidates[rows[j]].trial_id for j in ens.members_],
        "trajectory": ens.trajectory_,
    }


def _manifest(
    sel: Selection, candidates: list[Candidate], skipped: list[dict], settings: dict, exp: Path
) -> dict:
    ensembles = {GENERALIST_ENSEMBLE: _members(sel.generalist, sel.generalist_rows, candidates)}
    for part, (part_ens, rows) in sel.parts.items():
        used = sel.routing[part]["served_by"] == SERVED_BY_PART
        ensembles[part] = _members(part_ens, rows, candidates, used)
    split_manifest = ExperimentDir(exp).split
    best = candidates[sel.best_single]
    return {
        "experiment": str(exp),
        "split_manifest": str(split_manifest) if split_manifest.is_file() else None,
        "settings": settings,
        "candidates": {
            "generalists": len(sel.generalist_rows),
            "specialists": sum(c.scope != GENERALIST_SCOPE for c in candidates),
        },
        "n_skipped": len(skipped),
        "skipped": skipped,
        "routing": sel.routing,
        "ensembles": ensembles,
        "baselines": {
            "best_single": {"trial_id": best.trial_id, "checkpoint_path": best.checkpoint_path},
            "mura_recipe": [
                {
                    "trial_id": candidates[i].trial_id,
                    "checkpoint_path": candidates[i].checkpoint_path,
                    "val_loss": candidates[i].val_loss,
                    "weight": 1 / len(sel.recipe),
                }
                for i in sel.recipe
            ],
        },
    }


def format_report(report: dict) -> str:
    """Side-by-side tables: study kappa per scope (val | test [95% CI]), then overall metrics."""
    models = [m for m in MODELS if m in report["models"]]
    res = {m: report["models"][m] for m in models}
    scopes = ["overall", *res["ensemble"]["test"]["parts"]]

    def block(m: str, split: str, scope: str) -> dict | None:
        r = res[m][split]
        return r["overall"] if scope == "overall" else r["parts"].get(scope)

    rows = {}
    for scope in scopes:
        row = {
            "n test": block("ensemble", "test", scope)["n"],
            "served by": report["routing"].get(scope, ""),
        }
        for m in models:
            v, t = block(m, "val", scope), block(m, "test", scope)
            row[f"{MODELS[m]} val"] = format_ci(v["kappa"]) if v else "n/a"
            row[f"{MODELS[m]} test [95% CI]"] = format_ci(t["kappa"], t["kappa_ci"]) if t else "n/a"
        rows[scope] = row
    overall = {
        name: {
            f"{MODELS[m]} {s}": format_ci(
                block(m, s, "overall")[name],
                None if s == "val" else block(m, s, "overall")[f"{name}_ci"],
            )
            for m in models
            for s in ("val", "test")
        }
        for name in METRIC_NAMES
    }
    return (
        f"Study kappa, selected on val ({report['metric']}), reported on held-out test:\n"
        + pd.DataFrame(rows).T.to_string()
        + "\n\nOverall:\n"
        + pd.DataFrame(overall).T.to_string()
    )


def build_ensemble(
    experiment: str | Path,
    name: str | None = None,
    out_root: str | Path = "ensembles",
    max_size: int = 25,
    specialists: bool = True,
    metric: str = "kappa",
    margin: float = 0.02,
    seed: int = 0,
    n_boot: int = 1000,
    prune_top: int | None = None,
) -> Path:
    """Select an ensemble on val, route body parts to specialists, and report it on test.

    Args:
        experiment: experiment folder (``leaderboard.parquet``, ``trials/<id>/predictions.parquet``).
        name: ensemble name; default the experiment folder's name.
        out_root: parent folder of ``<name>/``.
        max_size: greedy selection steps per ensemble.
        specialists: fit one ensemble per body part over the generalists + that part's
            specialists (``False``: the generalist ensemble serves every part).
        metric: selection metric: ``"kappa"``, ``"auc"`` or ``"logloss"``.
        margin: a part uses its own ensemble only if it beats the generalist there by more than this.
        seed: seeds tie-breaking and the bootstrap.
        n_boot: bootstrap resamples for the 95% intervals.
        prune_top: keep only the best M single models as candidates of each selection.

    Returns:
        The folder written: ``<out_root>/<name>`` with ``manifest.json``, ``predictions.parquet``
        and ``report.json``.

    Raises:
        ExperimentError: missing/inconsistent experiment folder or no usable generalist.
        ConfigError: invalid settings.
    """
    exp = Path(experiment).expanduser().resolve()
    if not exp.is_dir():
        raise ExperimentError(f"experiment folder not found: {exp}")
    GreedyEnsemble(
        max_size=max_size, metric=check_metric(metric), prune_top=prune_top, seed=seed
    )  # validates
    if not margin >= 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    name = name or exp.name
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"--name must be a plain folder name, got {name!r}")
    out = Path(out_root).expanduser().resolve() / name

    if not ExperimentDir(exp).leaderboard.is_file() and ExperimentDir(exp).trials.is_dir():
        # A search killed before writing its leaderboard: build it from the trials' own files.
        build_leaderboard(exp)
    _check_finished(exp)
    candidates, skipped = read_candidates(exp)
    if not specialists:
        candidates = [c for c in candidates if c.scope == GENERALIST_SCOPE]
    if not any(c.scope == GENERALIST_SCOPE for c in candidates):
        why = f": {skipped[0]['trial_id']} {skipped[0]['reason']}" if skipped else ""
        raise ExperimentError(
            f"no finished generalist trial with predictions in {exp} "
            f"({len(skipped)} trial(s) skipped{why})"
        )
    val = load_study_probs(candidates, "val")
    try:
        candidates, val, incomplete = drop_incomplete(candidates, val)
    except ExperimentError as exc:
        raise ExperimentError(f"{exc} in {exp}") from None
    skipped += incomplete
    settings = {"max_size": max_size, "metric": metric, "seed": seed, "prune_top": prune_top}
    sel = select(val, candidates, specialists=specialists, margin=margin, **settings)

    # Every decision is made: only now are test rows read, for the chosen models only.
    needed = _needed(sel)
    test = load_study_probs(candidates, "test", only=needed)
    for i in sorted(needed):
        have, need = coverage(candidates[i], test, i)
        if have != need:
            raise ExperimentError(
                f"trial {candidates[i].trial_id} predicts {have} of {need} test studies of its scope"
            )

    settings.update(specialists=specialists, margin=margin, n_boot=n_boot)
    manifest = {"name": name, **_manifest(sel, candidates, skipped, settings, exp)}
    preds = {split: predict(sel, data) for split, data in (("val", val), ("test", test))}
    descriptions = {
        "ensemble": "greedy ensemble with per-part routing (see manifest.json)",
        "best_single": f"best single generalist by val {metric}: {candidates[sel.best_single].trial_id}",
        "mura_recipe": f"mean of the {len(sel.recipe)} lowest val_loss generalists (Rajpurkar et al. 2017)",
    }
    models = {
        m: {
            "description": descriptions[m],
            **{
                split: score_studies(
                    d.labels, preds[split][m], d.body_parts, n_boot=n_boot, seed=seed
                )
                for split, d in (("val", val), ("test", test))
            },
        }
        for m in MODELS
        if m in preds["test"]
    }
    report = {
        "ensemble": name,
        "experiment": str(exp),
        "metric": metric,
        "n_boot": n_boot,
        "seed": seed,
        "note": "val figures are optimistic (models were selected on val); test was never used for selection",
        "n_skipped_trials": len(skipped),
        "routing": {p: r["served_by"] for p, r in sel.routing.items()},
        "models": models,
    }
    rows = [
        pd.DataFrame(
            {
                "study_id": d.study_ids,
                "body_part": d.body_parts,
                "split": d.split,
                "label": d.labels,
                "prob": preds[d.split]["ensemble"],
            }
        )
        for d in (val, test)
    ]
    folder = EnsembleDir(out)
    write_json(folder.manifest, manifest)
    write_parquet(folder.predictions, pd.concat(rows, ignore_index=True))
    write_json(folder.report, report)
    return out  # the CLI prints the report (format_report) and the paths written
