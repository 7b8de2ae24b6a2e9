"""Selection methods side by side: how far each one's selection-set kappa overstates its test kappa.

A method is a selection set (the search's val split, or a refit's out-of-fold predictions), a
selection (greedy, or bagged) and a decision rule (0.5, or the fitted per-part thresholds).
:func:`compare` scores every method that was selected: its kappa on its own selection set, its
test kappa with a 95% bootstrap interval, the optimism (their difference), and the paired test
difference against the reference, the single-split greedy ensemble at 0.5 (the same resampled
test studies for both, :func:`mura_tune.metrics.paired_kappa_difference`). It runs after every
decision is made: test figures are reported, never used to choose.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mura_tune.ensemble.candidates import StudyProbs
from mura_tune.ensemble.select import Selection, predict
from mura_tune.ensemble.thresholds import per_study
from mura_tune.metrics import bootstrap_intervals, cohen_kappa, paired_kappa_difference

REFERENCE = "val-greedy"
SOURCES = {"val": "val split", "oof": "out-of-fold"}


def method_key(source: str, bags: int, thresholds: bool) -> str:
    """``val-greedy``, ``oof-bagged-thresholds``, ...: a method's key in ``report.json``."""
    return f"{source}-{'bagged' if bags > 1 else 'greedy'}" + ("-thresholds" if thresholds else "")


def method_name(source: str, bags: int, thresholds: bool, k: int | None = None) -> str:
    where = SOURCES[source] + (f" (--cv {k})" if source == "oof" and k else "")
    how = f"bagged ({bags} bags)" if bags > 1 else "greedy"
    return f"{where}, {how}, " + ("fitted thresholds" if thresholds else "threshold 0.5")


def decisions(sel: Selection, data: StudyProbs, thresholds: bool) -> pd.DataFrame:
    """The ensemble's study probabilities, thresholds and 0/1 decisions on ``data`` (at 0.5, or
    at the fitted thresholds)."""
    probs = predict(sel, data)["ensemble"]
    fitted = {p: d["threshold"] for p, d in sel.threshold_fit.items()} if thresholds else {}
    threshold = per_study(fitted, data.body_parts)
    return pd.DataFrame(
        {
            "study_id": data.study_ids,
            "body_part": data.body_parts,
            "label": data.labels,
            "prob": probs,
            "threshold": threshold,
            "abnormal": (probs > threshold).astype(np.int8),
        }
    )


def compare(
    selections: dict[tuple[str, int], Selection],
    selection_sets: dict[str, StudyProbs],
    tests: dict[str, StudyProbs],
    chosen: str,
    n_boot: int = 1000,
    seed: int = 0,
    k: int | None = None,
) -> tuple[dict[str, dict], pd.DataFrame]:
    """Score every selected method on its selection set and on test.

    Args:
        selections: ``(source, bags) -> Selection`` (thresholds fitted, used or not).
        selection_sets: ``source -> StudyProbs`` the selections were made on.
        tests: ``source -> StudyProbs`` on test of the same candidates (same studies, same order).
        chosen: the key of the method the ensemble uses.
        n_boot, seed: the bootstraps.
        k: the refit's number of folds (named in the out-of-fold methods).

    Returns:
        ``{key: {"name", "chosen", "n_selection_studies", "selection_kappa", "test_kappa",
        "test_kappa_ci", "optimism", "vs_reference": {"diff", "ci", "p_le_0"}}}``, the
        reference (:data:`REFERENCE`) first, and every method's study decisions (``method``,
        ``split``: its selection split or ``test``, ``study_id``, ``body_part``, ``label``,
        ``prob``, ``threshold``, ``abnormal``): the ensemble's ``methods.parquet``.
    """
    rows, test_preds, frames = {}, {}, []
    ordered = sorted(selections, key=lambda key: (key[0] != "val", key[1] > 1))
    for source, bags in ordered:
        sel = selections[(source, bags)]
        data, test = selection_sets[source], tests[source]
        for thresholds in (False, True):
            key = method_key(source, bags, thresholds)
            selection_frame = decisions(sel, data, thresholds)
            test_frame = decisions(sel, test, thresholds)
            frames += [
                selection_frame.assign(method=key, split=data.split),
                test_frame.assign(method=key, split="test"),
            ]
            on_selection = selection_frame["abnormal"].to_numpy(dtype=np.float64)
            on_test = test_frame["abnormal"].to_numpy(dtype=np.float64)
            test_preds[key] = on_test
            selection_kappa = cohen_kappa(data.labels, on_selection)
            test_kappa = cohen_kappa(test.labels, on_test)
            ci = bootstrap_intervals(test.labels, on_test, n_boot=n_boot, seed=seed, auc=False)
            rows[key] = {
                "name": method_name(source, bags, thresholds, k),
                "chosen": key == chosen,
                "n_selection_studies": int(data.labels.size),
                "selection_kappa": selection_kappa,
                "test_kappa": test_kappa,
                "test_kappa_ci": list(ci["kappa"]),
                "optimism": selection_kappa - test_kappa,
            }
    reference = test_preds[REFERENCE]
    labels = tests["val"].labels
    for key, row in rows.items():
        paired = paired_kappa_difference(labels, test_preds[key], reference, n_boot, seed)
        row["vs_reference"] = paired["mean"]
    table = pd.concat(frames, ignore_index=True)
    return rows, table[["method", "split", *table.columns[:-2]]]


def format_methods(methods: dict[str, dict]) -> str:
    """One line per method: selection kappa, test kappa [CI], optimism, paired difference [CI]."""
    lines = ["Selection methods (selection-set kappa vs held-out test; * = this ensemble):"]
    for row in methods.values():
        diff = row["vs_reference"]
        lines.append(
            f"{'*' if row['chosen'] else ' '} {row['name']:<58} selection {row['selection_kappa']:.3f}  "
            f"test {row['test_kappa']:.3f} [{row['test_kappa_ci'][0]:.3f}, {row['test_kappa_ci'][1]:.3f}]  "
            f"optimism {row['optimism']:+.3f}  vs val greedy {diff['diff']:+.3f} "
            f"[{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}]"
        )
    return "\n".join(lines)
