"""What an ensemble folder records: ``manifest.json`` (every decision) and the printed report.

The manifest's keys are :data:`mura_tune.layout.MANIFEST_KEYS`; a member of a cross-validated
ensemble lists its K fold models under ``folds`` (prediction averages them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mura_tune.ensemble.candidates import Candidate
from mura_tune.ensemble.greedy import BaggedEnsemble, GreedyEnsemble
from mura_tune.ensemble.methods import format_methods
from mura_tune.ensemble.select import Selection
from mura_tune.layout import GENERALIST_ENSEMBLE, GENERALIST_SCOPE, SERVED_BY_PART, ExperimentDir
from mura_tune.metrics import METRIC_NAMES, THRESHOLD, format_ci

MODELS = {"ensemble": "ensemble", "best_single": "best single", "mura_recipe": "MURA recipe"}
SPLIT_NAMES = {"val": "val", "oof": "out-of-fold"}


def model_entry(cand: Candidate, **extra) -> dict:
    """A model of the manifest: its trial, checkpoint, and for a refit configuration its fold models."""
    entry = {
        "trial_id": cand.trial_id,
        "scope": cand.scope,
        "checkpoint_path": cand.checkpoint_path,
        **extra,
    }
    if cand.folds:
        entry["folds"] = [
            {"trial_id": f.trial_id, "checkpoint_path": f.checkpoint_path} for f in cand.folds
        ]
    return entry


def _members(
    ens: GreedyEnsemble, rows: list[int], candidates: list[Candidate], used: bool = True
) -> dict:
    order = np.argsort(-ens.weights_, kind="stable")
    out = {
        "used": used,
        "val_score": float(ens.score_),
        "best_size": ens.best_size_,
        "n_init": ens.n_init_,
        "members": [
            model_entry(candidates[rows[j]], weight=float(ens.weights_[j]))
            for j in order
            if ens.weights_[j] > 0
        ],
        "selection_order": [candidates[rows[j]].trial_id for j in ens.members_],
        "trajectory": ens.trajectory_,
    }
    if isinstance(ens, BaggedEnsemble):
        name = [candidates[r].trial_id for r in rows]
        out["bags"] = [
            {
                "candidates": [name[j] for j in bag["candidates"]],
                "members": [name[j] for j in bag["members"]],
                "score": bag["score"],
            }
            for bag in ens.bags_
        ]
    return out


def manifest(
    sel: Selection,
    candidates: list[Candidate],
    skipped: list[dict],
    settings: dict,
    exp: Path,
    thresholds: dict[str, float],
    selection: dict,
) -> dict:
    """The manifest's content (without ``name``): every decision and where its models are."""
    ensembles = {GENERALIST_ENSEMBLE: _members(sel.generalist, sel.generalist_rows, candidates)}
    for part, (part_ens, rows) in sel.parts.items():
        used = sel.routing[part]["served_by"] == SERVED_BY_PART
        ensembles[part] = _members(part_ens, rows, candidates, used)
    split_manifest = ExperimentDir(exp).split
    return {
        "experiment": str(exp),
        "split_manifest": str(split_manifest) if split_manifest.is_file() else None,
        "settings": settings,
        "selection": selection,
        "candidates": {
            "generalists": len(sel.generalist_rows),
            "specialists": sum(c.scope != GENERALIST_SCOPE for c in candidates),
        },
        "n_skipped": len(skipped),
        "skipped": skipped,
        "routing": sel.routing,
        "thresholds": {part: thresholds.get(part, THRESHOLD) for part in sorted(sel.routing)},
        "threshold_fit": sel.threshold_fit if thresholds else {},
        "too_small": sel.too_small,
        "ensembles": ensembles,
        "baselines": {
            "best_single": model_entry(candidates[sel.best_single]),
            "mura_recipe": [
                model_entry(
                    candidates[i], val_loss=candidates[i].val_loss, weight=1 / len(sel.recipe)
                )
                for i in sel.recipe
            ],
        },
    }


def format_report(report: dict) -> str:
    """Side-by-side tables: study kappa per scope (selection set | test [95% CI]), overall
    metrics, and the selection methods."""
    models = [m for m in MODELS if m in report["models"]]
    res = {m: report["models"][m] for m in models}
    split = report.get("selection_split", "val")
    scopes = ["overall", *res["ensemble"]["test"]["parts"]]

    def block(m: str, s: str, scope: str) -> dict | None:
        r = res[m][s]
        return r["overall"] if scope == "overall" else r["parts"].get(scope)

    rows = {}
    for scope in scopes:
        row = {
            "n test": block("ensemble", "test", scope)["n"],
            "served by": report["routing"].get(scope, ""),
        }
        if report.get("thresholds") and scope != "overall":
            row["threshold"] = f"{report['thresholds'].get(scope, THRESHOLD):.3f}"
        for m in models:
            v, t = block(m, split, scope), block(m, "test", scope)
            row[f"{MODELS[m]} {split}"] = format_ci(v["kappa"]) if v else "n/a"
            row[f"{MODELS[m]} test [95% CI]"] = format_ci(t["kappa"], t["kappa_ci"]) if t else "n/a"
        rows[scope] = row
    overall = {
        name: {
            f"{MODELS[m]} {s}": format_ci(
                block(m, s, "overall")[name],
                None if s == split else block(m, s, "overall")[f"{name}_ci"],
            )
            for m in models
            for s in (split, "test")
        }
        for name in METRIC_NAMES
    }
    text = (
        f"Study kappa, selected on {SPLIT_NAMES.get(split, split)} ({report['metric']}), "
        "reported on held-out test:\n"
        + pd.DataFrame(rows).T.to_string()
        + "\n\nOverall:\n"
        + pd.DataFrame(overall).T.to_string()
    )
    if report.get("methods"):
        text += "\n\n" + format_methods(report["methods"])
    if report.get("cv"):
        cv = report["cv"]
        text += (
            f"\n\nRefit: {cv['configurations']} configuration(s) x {cv['k']} folds = "
            f"{cv['fold_models']} fold models; {format_ci(cv['compute']['multiple'])}x the "
            "search's compute (trial wall time)"
        )
    return text
