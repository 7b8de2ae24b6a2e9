"""From an experiment folder to ``ensembles/<name>/``: select, route per body part, report on test.

Order of work (the test split is never read before every selection decision is made):

1. read the leaderboard; skip ERROR trials, trials without a predictions file and fold models;
2. load the selection sets: study-level **val** probabilities of every candidate (Parquet
   filter ``split == "val"``) and, with ``cv=K``, the **out-of-fold** predictions of the
   refit's configurations (:mod:`mura_tune.ensemble.oof`);
3. make every selection (:mod:`mura_tune.ensemble.select`): the ensemble asked for (val split or
   out-of-fold, greedy or bagged, threshold 0.5 or fitted) with its per-part routing, gates and
   baselines, and, for the report, the other methods on the same sets;
4. only now load **test** rows, for the chosen models only, and report the selection set and
   test side by side, with every method's optimism (:mod:`mura_tune.ensemble.methods`).

Example::

    python -c "from mura_tune.ensemble.build import build_ensemble; build_ensemble('results/demo')"
    build_ensemble("results/demo", cv=5, bags=20, threshold="fit")   # after a refit (search/refit.py)
"""

from __future__ import annotations

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
from mura_tune.ensemble.greedy import BaggedEnsemble, check_metric
from mura_tune.ensemble.methods import compare, method_key
from mura_tune.ensemble.oof import load_fold_test, load_oof, read_refit, refit_compute
from mura_tune.ensemble.record import MODELS, format_report, manifest  # noqa: F401 (CLI API)
from mura_tune.ensemble.select import Selection, needed, predict, select
from mura_tune.ensemble.thresholds import THRESHOLD_MODES, per_study
from mura_tune.errors import ConfigError, ExperimentError, check_int
from mura_tune.io import write_json, write_parquet
from mura_tune.layout import (
    GENERALIST_SCOPE,
    NO_SCORE,
    EnsembleDir,
    ExperimentDir,
)
from mura_tune.metrics import score_studies
from mura_tune.search.leaderboard import build_leaderboard

#: Bags of the bagged method the report compares when the ensemble itself is not bagged.
COMPARE_BAGS = 20


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


def _check_settings(metric, margin, n_boot, bags, bag_fraction, threshold, cv, **greedy) -> None:
    BaggedEnsemble(n_bags=bags, bag_fraction=bag_fraction, metric=check_metric(metric), **greedy)
    if not margin >= 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    check_int("n_boot", n_boot, 1)
    if threshold not in THRESHOLD_MODES:
        raise ConfigError(
            f"--threshold must be one of {', '.join(THRESHOLD_MODES)}, got {threshold!r}"
        )
    if cv is not None:
        check_int("--cv", cv, 2)


def _search_candidates(exp: Path, specialists: bool) -> tuple[list[Candidate], StudyProbs, list]:
    """The search's usable trials and their val probabilities (the single-split selection set)."""
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
    return candidates, val, skipped + incomplete


def _load_test(source: str, candidates: list[Candidate], rows: set[int]) -> StudyProbs:
    """Test probabilities of the chosen rows only (of trials, or of refit configurations)."""
    if source == "oof":
        return load_fold_test(candidates, only=rows)
    test = load_study_probs(candidates, "test", only=rows)
    for i in sorted(rows):
        have, need = coverage(candidates[i], test, i)
        if have != need:
            raise ExperimentError(
                f"trial {candidates[i].trial_id} predicts {have} of {need} test studies of its scope"
            )
    return test


def build_ensemble(
    experiment: str | Path,
    name: str | None = None,
    out_root: str | Path = "ensembles",
    max_size: int = 25,
    specialists: bool = True,
    metric: str = "kappa",
    margin: float = 0.0,
    seed: int = 0,
    n_boot: int = 1000,
    prune_top: int | None = None,
    max_members: int | None = 25,
    bags: int = 1,
    bag_fraction: float = 0.5,
    threshold: str = "0.5",
    cv: int | None = None,
    compare_methods: bool = True,
) -> Path:
    """Select an ensemble, route body parts to their own ensembles where they clearly win, report on test.

    Args:
        experiment: experiment folder (``leaderboard.parquet``, ``trials/<id>/predictions.parquet``).
        name: ensemble name; default the experiment folder's name.
        out_root: parent folder of ``<name>/``.
        max_size: greedy selection steps per ensemble.
        specialists: fit one ensemble per body part over the generalists + that part's
            specialists (``False``: the generalist ensemble serves every part).
        metric: selection metric: ``"kappa"`` (default), ``"logloss"`` or ``"auc"``. On 3 TPE
            searches log-loss gained +0.007 [-0.002, +0.017] test kappa with less optimism, but
            on a weak search it picked a near-constant model (every study normal at 0.5, test
            kappa 0): kappa scores the decisions that are reported (README "Ensembles").
        margin: a part's own ensemble must also beat the generalist there by more than this
            (the gate is the interval of its gain: :mod:`mura_tune.ensemble.gates`).
        seed: seeds tie-breaking, the bags and the bootstrap.
        n_boot: bootstrap resamples for the gates and the 95% intervals.
        prune_top: keep only the best M single models as candidates of each selection.
        max_members: most distinct models in an ensemble (``None``: no cap beyond ``max_size``).
        bags: ``> 1`` selects by bagged selection over this many bags (Caruana et al. 2004).
        bag_fraction: share of the candidates in each bag.
        threshold: ``"0.5"`` (the MURA rule) or ``"fit"`` (kappa-optimal per body part, gated).
        cv: select on the out-of-fold predictions of the experiment's ``cv``-fold refit (run
            it first: :func:`mura_tune.search.refit.run_refit`); ``None``: on the val split.
        compare_methods: also select with the other methods and report them side by side.

    Returns:
        The folder written: ``<out_root>/<name>`` with ``manifest.json``, ``predictions.parquet``
        and ``report.json``.

    Raises:
        ExperimentError: missing/inconsistent experiment folder, no usable generalist, or no
            finished refit for ``cv``.
        ConfigError: invalid settings.
    """
    exp = Path(experiment).expanduser().resolve()
    if not exp.is_dir():
        raise ExperimentError(f"experiment folder not found: {exp}")
    greedy = {
        "max_size": max_size,
        "prune_top": prune_top,
        "max_members": max_members,
        "seed": seed,
    }
    _check_settings(metric, margin, n_boot, bags, bag_fraction, threshold, cv, **greedy)
    name = name or exp.name
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"--name must be a plain folder name, got {name!r}")
    out = Path(out_root).expanduser().resolve() / name

    # 1-2. The selection sets: val always (the reference method), out-of-fold with cv.
    candidates, val, skipped = _search_candidates(exp, specialists)
    pools = {"val": (candidates, val)}
    refit = None
    if cv is not None:
        configs, refit_skipped, refit = read_refit(exp, cv)
        pools["oof"] = (configs, load_oof(configs, exp))
    source = "oof" if cv is not None else "val"

    # 3. Every selection, on the selection sets only.
    chosen_bags = bags
    settings = {"metric": metric, "margin": margin, "n_boot": n_boot, "bag_fraction": bag_fraction}
    settings.update(greedy)
    kinds = sorted({bags, COMPARE_BAGS if bags == 1 else bags, 1}) if compare_methods else [bags]
    selections: dict[tuple[str, int], Selection] = {}
    for src, (cands, data) in pools.items():
        for b in kinds:
            if not compare_methods and (src, b) != (source, chosen_bags):
                continue
            selections[(src, b)] = select(
                data, cands, specialists=specialists, bags=b, threshold="fit",
                warn=(src, b) == (source, chosen_bags), **settings,
            )  # fmt: skip
    sel = selections[(source, chosen_bags)]
    thresholds = sel.thresholds if threshold == "fit" else {}
    cands, data = pools[source]

    # 4. Every decision is made: only now are test rows read, for the chosen models only.
    tests = {}
    for src, (src_cands, _) in pools.items():
        rows = set().union(*(needed(s) for (k, _), s in selections.items() if k == src))
        tests[src] = _load_test(src, src_cands, rows)
    if "oof" in tests and not np.array_equal(tests["oof"].study_ids, tests["val"].study_ids):
        raise ExperimentError(
            "the refit's fold models and the search's trials predict different test studies"
        )
    test = tests[source]

    chosen_key = method_key(source, chosen_bags, threshold == "fit")
    record_settings = {
        **greedy, "metric": metric, "specialists": specialists, "margin": margin,
        "n_boot": n_boot, "bags": bags, "bag_fraction": bag_fraction, "threshold": threshold, "cv": cv,
    }  # fmt: skip
    selection_info = {"method": chosen_key, "split": source}
    if refit is not None:
        selection_info["refit"] = {
            "k": refit["k"],
            "configurations": [c.trial_id for c in pools["oof"][0]],
            "skipped": refit_skipped,
        }
    written = {
        "name": name,
        **manifest(sel, cands, skipped, record_settings, exp, thresholds, selection_info),
    }
    preds = {s: predict(sel, d) for s, d in ((source, data), ("test", test))}
    thr = {s: per_study(thresholds, d.body_parts) for s, d in ((source, data), ("test", test))}
    descriptions = {
        "ensemble": "greedy ensemble with per-part routing (see manifest.json)"
        + (", fitted thresholds" if thresholds else ""),
        "best_single": f"best single generalist by {source} kappa: {cands[sel.best_single].trial_id}",
        "mura_recipe": f"mean of the {len(sel.recipe)} lowest {source}-loss generalists (Rajpurkar et al. 2017)",
    }
    models = {
        m: {
            "description": descriptions[m],
            **{
                split: score_studies(
                    d.labels,
                    preds[split][m],
                    d.body_parts,
                    n_boot=n_boot,
                    seed=seed,
                    threshold=thr[split] if m == "ensemble" else 0.5,
                )  # fmt: skip
                for split, d in ((source, data), ("test", test))
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
        "selection": chosen_key,
        "selection_split": source,
        "note": f"{source} figures are optimistic (models were selected on them); "
        "test was never used for selection",
        "n_skipped_trials": len(skipped),
        "routing": {p: r["served_by"] for p, r in sel.routing.items()},
        "thresholds": written["thresholds"],
        "models": models,
    }
    methods_table = None
    if compare_methods:
        report["methods"], methods_table = compare(
            selections, {s: p[1] for s, p in pools.items()}, tests, chosen_key, n_boot, seed, cv
        )
    if refit is not None:
        report["cv"] = {
            "k": refit["k"],
            "configurations": len(pools["oof"][0]),
            "fold_models": len(pools["oof"][0]) * refit["k"],
            "compute": refit_compute(exp, refit),
        }
    rows = [
        pd.DataFrame(
            {
                "study_id": d.study_ids,
                "body_part": d.body_parts,
                "split": split,
                "label": d.labels,
                "prob": preds[split]["ensemble"],
                "threshold": thr[split],
            }
        )
        for split, d in ((source, data), ("test", test))
    ]
    folder = EnsembleDir(out)
    write_json(folder.manifest, written)
    write_parquet(folder.predictions, pd.concat(rows, ignore_index=True))
    write_json(folder.report, report)
    if methods_table is not None:
        write_parquet(folder.methods, methods_table)
    return out  # the CLI prints the report (format_report) and the paths written
