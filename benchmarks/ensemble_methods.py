"""Which ensemble selection holds up on test? Selection metric, routing rule, bagging, thresholds, CV.

For each finished experiment given (one per seed, on the same data, so the test studies are the
same), every selection method is run on the val split alone, and then scored on held-out test:

* baselines: the best single model by val kappa, the MURA-paper recipe (mean of the 5
  lowest-val-loss models);
* greedy selection (Caruana et al. 2004) driven by val kappa or by val log-loss, as one ensemble
  for every body part, or with per-part routing under the old rule (a part's own ensemble serves
  it when it beats the generalist there by a fixed margin of 0.02) or under the interval gate (only
  when the paired bootstrap interval of its gain lies above 0, and never on a part too small to
  choose on);
* bagged selection (20 bags of half the candidates) and fitted per-part thresholds on top of the
  gated ensembles;
* with ``--cv K``: the top ``--top`` configurations are refit on K folds of train+val
  (``mura-tune ensemble --cv``: Ray Tune trials, reused when already there) and the out-of-fold
  methods of :mod:`mura_tune.ensemble.methods` join the table, with the refit's extra compute as a
  multiple of the search's.

Per method, over experiments: selection kappa (on the set it selected on), test kappa with a 95%
bootstrap interval of the mean over experiments (the same resampled test studies for all),
optimism (selection minus test kappa), and the paired test difference against the best single
model and against the default ensemble, each the mean over experiments of the per-experiment
differences with a paired bootstrap interval (:func:`mura_tune.metrics.paired_kappa_difference`).
Every decision is made before a test row is read; test only scores.

Run on the value benchmark's searches, or on any finished searches of one data set::

    python -m benchmarks.ensemble_methods \\
        --experiments benchmarks/_work/value/seed*/mura_tune/search
    python -m benchmarks.ensemble_methods --experiments E1 E2 E3 --cv 5 --top 3 --max-concurrent 2
    # + the refit: 48 min on 2 cores for the value benchmark's 3 searches (ensemble_methods_cv5.json)

The experiments are read, never written (the ``--cv`` refit writes its fold models into them).
It writes ``benchmarks/ensemble_methods.json`` (``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd

from benchmarks.common import WORK, log
from mura_tune.metrics import (
    cohen_kappa,
    kappa_resamples,
    paired_kappa_difference,
    resample_indices,
)

OUT = Path(__file__).resolve().parent / "ensemble_methods.json"
#: The methods' paired test differences are taken against these two.
SINGLE = "best-single"
DEFAULT = "kappa-gated"
OLD_MARGIN = 0.02
BAGS = 20

#: key -> (name, select() settings, threshold fitted?, routing rule: "gate" or "margin")
VARIANTS = {
    "kappa-one": ("greedy on val kappa, one ensemble", {"metric": "kappa", "specialists": False}),
    "kappa-margin": (
        f"greedy on val kappa, routing by margin {OLD_MARGIN} (old)",
        {"metric": "kappa", "margin": OLD_MARGIN, "gate": "margin"},
    ),
    "kappa-gated": ("greedy on val kappa, gated routing", {"metric": "kappa"}),
    "logloss-one": (
        "greedy on val log-loss, one ensemble",
        {"metric": "logloss", "specialists": False},
    ),
    "logloss-gated": ("greedy on val log-loss, gated routing", {"metric": "logloss"}),
    "kappa-gated-bagged": (
        f"bagged ({BAGS}) on val kappa, gated routing",
        {"metric": "kappa", "bags": BAGS},
    ),
    "logloss-gated-bagged": (
        f"bagged ({BAGS}) on val log-loss, gated routing",
        {"metric": "logloss", "bags": BAGS},
    ),
    "kappa-gated-thresholds": (
        "greedy on val kappa, gated routing, fitted thresholds",
        {"metric": "kappa", "thresholds": True},
    ),
    "logloss-gated-thresholds": (
        "greedy on val log-loss, gated routing, fitted thresholds",
        {"metric": "logloss", "thresholds": True},
    ),
}


@contextmanager
def margin_rule():
    """The old routing rule, for comparison: a part's ensemble wins on its gain > margin alone.

    Patches the interval gate and the too-small floor out of :func:`mura_tune.ensemble.select.select`
    for the duration (the library itself has no switch back to the rule it replaced).
    """
    with (
        mock.patch("mura_tune.ensemble.select.clearly_wins", lambda gain, ci, margin=0.0: gain > margin),
        mock.patch("mura_tune.ensemble.select.too_small", lambda labels: None),
    ):  # fmt: skip
        yield


def val_methods(exp: Path, n_boot: int) -> dict:
    """Every val-split method on ``exp``: its val kappa, and its 0/1 test decisions by study."""
    from mura_tune.ensemble.build import _search_candidates
    from mura_tune.ensemble.candidates import load_study_probs
    from mura_tune.ensemble.methods import decisions
    from mura_tune.ensemble.select import select

    started = time.perf_counter()
    candidates, val, _ = _search_candidates(exp, specialists=True)
    common = {"max_size": 25, "max_members": 25, "prune_top": None, "seed": 0, "n_boot": n_boot}
    selections = {}
    for key, (_, settings) in VARIANTS.items():
        s = dict(settings)
        fitted, gate = s.pop("thresholds", False), s.pop("gate", "interval")
        s.setdefault("specialists", True)
        with margin_rule() if gate == "margin" else _nothing():
            sel = select(val, candidates, threshold="fit", warn=False, **common, **s)
        selections[key] = (sel, fitted)
    selection_s = time.perf_counter() - started
    # Every decision is made: only now are test rows read.
    test = load_study_probs(candidates, "test")
    out = {}
    for key, (sel, fitted) in selections.items():
        on_val = decisions(sel, val, fitted)["abnormal"].to_numpy(np.float64)
        on_test = decisions(sel, test, fitted)["abnormal"].to_numpy(np.float64)
        out[key] = _facts(val.labels, on_val, test.study_ids, on_test, sel)
    reference, _ = selections["kappa-one"]
    for key, probs in (
        (SINGLE, lambda d: d.probs[reference.best_single]),
        ("mura-recipe", lambda d: d.probs[reference.recipe].mean(0)),
    ):
        out[key] = _facts(
            val.labels, (probs(val) > 0.5) * 1.0, test.study_ids, (probs(test) > 0.5) * 1.0
        )
    return {
        "methods": out,
        "labels": pd.Series(test.labels, index=test.study_ids),
        "n_candidates": len(candidates),
        "n_val_studies": int(val.labels.size),
        "selection_s": selection_s,
    }


@contextmanager
def _nothing():
    yield


def _facts(val_labels, on_val, test_ids, on_test, sel=None) -> dict:
    facts = {
        "selection_kappa": cohen_kappa(val_labels, on_val),
        "n_selection_studies": int(len(val_labels)),
        "test": pd.Series(on_test, index=test_ids),
    }
    if sel is not None:
        facts["routed"] = sorted(p for p, r in sel.routing.items() if r["served_by"] == "part")
        facts["thresholds"] = {p: t for p, t in sel.thresholds.items() if t != 0.5}
        facts["members"] = int(np.count_nonzero(sel.generalist.weights_))
    return facts


def oof_methods(
    exp: Path, k: int, top: int, n_boot: int, max_concurrent: int | None = None
) -> tuple[dict, dict]:
    """Refit ``exp``'s top configurations (or reuse the refit) and score the out-of-fold methods."""
    from mura_tune.ensemble.build import build_ensemble
    from mura_tune.layout import EnsembleDir
    from mura_tune.search.refit import RefitPlan, run_refit

    started = time.time()
    refit = run_refit(RefitPlan(exp, k=k, top=top, max_concurrent=max_concurrent, verbose=0))
    if not refit.complete:
        raise SystemExit(f"the refit of {exp} did not finish ({len(refit.finished)} fold models)")
    refit_s = time.time() - started
    out_root = WORK / "ensemble_methods"
    folder = EnsembleDir(
        build_ensemble(exp, name=exp.name, out_root=out_root, cv=k, bags=BAGS, n_boot=n_boot)
    )
    report = json.loads(folder.report.read_text())
    table = pd.read_parquet(folder.methods)
    out = {}
    for key, row in report["methods"].items():
        if not key.startswith("oof-"):
            continue
        test = table.query("method == @key and split == 'test'").set_index("study_id")
        out[key] = {
            "name": row["name"],
            "selection_kappa": row["selection_kappa"],
            "n_selection_studies": row["n_selection_studies"],
            "test": test["abnormal"].astype(np.float64),
        }
    compute = {**report["cv"]["compute"], "refit_wall_s": refit_s}
    return out, compute


def summarise(runs: list[dict], names: dict[str, str], n_boot: int, seed: int = 0) -> dict:
    """Per method, over experiments: selection and test kappa, optimism, paired differences."""
    studies = runs[0]["labels"].index
    for r in runs[1:]:
        if not r["labels"].index.equals(studies):
            raise SystemExit(
                "the experiments' test studies differ: give experiments on one data set"
            )
    labels = runs[0]["labels"].to_numpy()
    idx = resample_indices(len(studies), n_boot, seed)
    q = (2.5, 97.5)

    def tests(key: str) -> list[np.ndarray]:
        return [r["methods"][key]["test"].loc[studies].to_numpy() for r in runs]

    out = {}
    for key in runs[0]["methods"]:
        decisions = tests(key)
        per_run = [r["methods"][key] for r in runs]
        selection = np.array([m["selection_kappa"] for m in per_run])
        test = np.array([cohen_kappa(labels, d) for d in decisions])
        boot = np.mean([kappa_resamples(labels, d, idx) for d in decisions], axis=0)
        low, high = (float(v) for v in np.percentile(boot, q))
        row = {
            "name": names.get(key) or per_run[0].get("name", key),
            "selection_kappa": float(selection.mean()),
            "test_kappa": float(test.mean()),
            "test_kappa_ci": [low, high],
            "optimism": float((selection - test).mean()),
            "optimism_per_run": [float(x) for x in selection - test],
            "selection_kappa_per_run": [float(x) for x in selection],
            "test_kappa_per_run": [float(x) for x in test],
        }
        for ref in (SINGLE, DEFAULT):
            paired = paired_kappa_difference(labels, decisions, tests(ref), n_boot, seed)
            row[f"vs_{ref}"] = {
                **paired["mean"],
                "per_run": [p["diff"] for p in paired["per_seed"]],
            }
        for extra in ("routed", "thresholds", "members"):
            if extra in per_run[0]:
                row[extra] = [m[extra] for m in per_run]
        out[key] = row
    return out


def format_table(summary: dict) -> str:
    def diff(d: dict) -> str:
        return f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"

    rows = {
        m["name"]: {
            "val/oof kappa": f"{m['selection_kappa']:.3f}",
            "test kappa [95% CI]": f"{m['test_kappa']:.3f} [{m['test_kappa_ci'][0]:.3f}, "
            f"{m['test_kappa_ci'][1]:.3f}]",
            "optimism": f"{m['optimism']:+.3f}",
            "vs best single [95% CI]": diff(m[f"vs_{SINGLE}"]),
            "vs default [95% CI]": diff(m[f"vs_{DEFAULT}"]),
        }
        for m in summary.values()
    }
    with pd.option_context("display.width", 250, "display.max_colwidth", 70):
        return pd.DataFrame(rows).T.to_string()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", required=True, help="one experiment per seed")
    parser.add_argument("--cv", type=int, default=0, help="folds of the refit (0: no refit)")
    parser.add_argument("--top", type=int, default=3, help="configurations refit with --cv")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        help="fold models trained at once (default: each search's own setting)",
    )
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    runs, compute = [], []
    for exp in (Path(e).expanduser().resolve() for e in args.experiments):
        log(f"{exp}: every val-split selection method")
        run = val_methods(exp, args.n_boot)
        if args.cv:
            log(f"{exp}: refit (--cv {args.cv} --top {args.top}) and the out-of-fold methods")
            oof, cost = oof_methods(exp, args.cv, args.top, args.n_boot, args.max_concurrent)
            run["methods"].update(oof)
            compute.append(cost)
        run["experiment"] = str(exp)
        run["plan"] = json.loads((exp / "experiment.json").read_text())
        runs.append(run)
    names = {
        SINGLE: "best single model by val kappa",
        "mura-recipe": "MURA recipe (mean of the 5 lowest-val-loss models)",
        **{k: v[0] for k, v in VARIANTS.items()},
    }
    summary = summarise(runs, names, args.n_boot)
    result = {
        "settings": {
            "cv": args.cv,
            "top": args.top,
            "max_concurrent": args.max_concurrent,
            "bags": BAGS,
            "n_boot": args.n_boot,
        },
        "experiments": [
            {
                "experiment": r["experiment"],
                **{k: r["plan"].get(k) for k in ("data", "seed", "space", "random_search")},
                "n_candidates": r["n_candidates"],
                "n_val_studies": r["n_val_studies"],
                "selection_s": r["selection_s"],
            }
            for r in runs
        ],
        "n_test_studies": int(len(runs[0]["labels"])),
        "references": [SINGLE, DEFAULT],
        "methods": summary,
        "cv_compute": compute,
        "wall_s": time.perf_counter() - started,
        "written": time.strftime("%Y-%m-%d %H:%M"),
    }
    from mura_tune.io import write_json

    write_json(Path(args.out), result)
    print(format_table(summary))
    print(
        f"{len(runs)} experiments, {result['n_test_studies']} test studies, "
        f"{result['wall_s']:.0f} s"
    )
    for c in compute:
        print(f"--cv compute: {c['multiple']:.2f}x the search's")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from benchmarks.common import setup_env

    setup_env()
    sys.exit(main())
