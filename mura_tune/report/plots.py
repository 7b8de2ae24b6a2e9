"""The report's figures: learning curves, best so far, importance, ROC, kappa per body part, the ensemble.

Each function takes the report :class:`~mura_tune.report.context.Context` and returns the HTML of
its section (the PNG it drew, a table, or a note when its input is missing). Matplotlib is
imported by :func:`mura_tune.report.html.write_report` (Agg backend) before any of them runs.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mura_tune.constants import BODY_PARTS, METRIC
from mura_tune.layout import (
    GENERALIST_ENSEMBLE,
    GENERALIST_SCOPE,
    EnsembleDir,
    ExperimentDir,
    TrialStatus,
    read_json,
    study_name,
)
from mura_tune.metrics import roc_auc, score_studies
from mura_tune.report.context import Context, figure, note, table, test_studies

#: Study-level Cohen's kappa on MURA's hidden test set, Rajpurkar et al. 2017, "MURA: Large Dataset
#: for Abnormality Detection in Musculoskeletal Radiographs" (arXiv:1712.06957), Table 2:
#: part -> (DenseNet-169 ensemble, best radiologist).
MURA_PAPER_KAPPA = {
    "XR_ELBOW": (0.710, 0.850),
    "XR_FINGER": (0.389, 0.410),
    "XR_FOREARM": (0.737, 0.802),
    "XR_HAND": (0.851, 0.927),
    "XR_HUMERUS": (0.600, 0.933),
    "XR_SHOULDER": (0.729, 0.864),
    "XR_WRIST": (0.931, 0.931),
    "overall": (0.705, 0.778),
}
MURA_PAPER_AUROC = 0.929
STATUS_STYLE = {
    TrialStatus.COMPLETED: ("tab:blue", "-"),
    TrialStatus.PRUNED: ("tab:orange", "--"),
    TrialStatus.ERROR: ("tab:red", ":"),
}
N_BOOT = 1000


def _rungs(ctx: Context) -> list[int]:
    plan = ctx.plan
    grace, factor, top = (
        plan.get("grace_period"),
        plan.get("reduction_factor"),
        plan.get("max_epochs"),
    )
    if not (grace and factor and top) or ctx.plan.get("random_search"):
        return []
    rungs, r = [], float(grace)
    while r < top:
        rungs.append(int(round(r)))
        r *= factor
    return rungs


def learning_curves(ctx: Context) -> str:
    import matplotlib.pyplot as plt

    metrics = ctx.metrics
    if not metrics:
        return note("no trial has per-epoch metrics yet (trials/*/metrics.parquet)")
    status = dict(zip(ctx.board["trial_id"], ctx.board["status"]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for rung in _rungs(ctx):
        ax.axvline(rung, color="0.85", lw=1, zorder=0)
    seen = set()
    for trial_id, frame in metrics.items():
        st = status.get(trial_id, TrialStatus.COMPLETED)
        colour, style = STATUS_STYLE.get(st, ("tab:gray", "-"))
        label = None if st in seen else st.lower()
        seen.add(st)
        ax.plot(
            frame["epoch"], frame[METRIC], ls=style, color=colour, lw=1.2, alpha=0.8, label=label
        )
        if st in (TrialStatus.PRUNED, TrialStatus.ERROR):
            ax.plot(
                frame["epoch"].iloc[-1],
                frame[METRIC].iloc[-1],
                marker="x",
                ms=8,
                mew=2,
                color=colour,
            )
    ax.set(
        xlabel="epoch",
        ylabel=f"{METRIC} (val)",
        title="Val study kappa per trial (x = cut by ASHA / error)",
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize=8)
    rungs = _rungs(ctx)
    text = f"ASHA rungs (grey lines) at epochs {', '.join(map(str, rungs))}. " if rungs else ""
    return (
        figure(ctx, fig, "learning_curves.png", "learning curves")
        + f"<p>{text}Dashed lines end where a trial was pruned.</p>"
    )


def wall_time(ctx: Context) -> str:
    import matplotlib.pyplot as plt

    events, starts = [], []
    for trial_id, frame in ctx.metrics.items():
        trial = ExperimentDir(ctx.exp).trial(trial_id)
        meta, summary = read_json(trial.trial_json) or {}, read_json(trial.summary) or {}
        if "started" not in meta or "epoch_seconds" not in frame:
            continue
        secs = frame["epoch_seconds"].fillna(0).to_numpy(dtype=float)
        # Data loading and model building before epoch 1: known once the trial has finished.
        setup = max(0.0, float(summary.get("wall_seconds") or 0.0) - secs.sum()) if summary else 0.0
        ends = meta["started"] + setup + np.cumsum(secs)
        starts.append(meta["started"])
        events += [
            (t, v) for t, v in zip(ends, frame[METRIC].to_numpy(dtype=float)) if math.isfinite(v)
        ]
    if not events:
        return note(
            "no trial has timing information (trial.json 'started' and metrics epoch_seconds)"
        )
    events.sort()
    times = (np.array([t for t, _ in events]) - min(starts)) / 60
    values = np.array([v for _, v in events])
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.scatter(times, values, s=10, color="0.6", label="any trial, one epoch")
    ax.step(
        times,
        np.maximum.accumulate(values),
        where="post",
        color="tab:green",
        lw=2,
        label="best so far",
    )
    ax.set(
        xlabel="wall time since the first trial started (min)",
        ylabel=f"{METRIC} (val)",
        title="Best so far",
    )
    ax.legend(loc="lower right", fontsize=8)
    return (
        figure(ctx, fig, "best_so_far.png", "best so far against wall time")
        + "<p>Epoch ends are estimated from each trial's start, its setup time and its epoch durations.</p>"
    )


def _study_name(ctx: Context, names: list[str]) -> str | None:
    scopes = list(ctx.plan.get("scopes") or {GENERALIST_SCOPE: 0})
    wanted = study_name(ctx.plan.get("name", ctx.exp.name), scopes[0])
    if wanted in names:
        return wanted
    generalist = study_name("", GENERALIST_SCOPE)
    return next((n for n in names if n.endswith(generalist)), names[0] if names else None)


def importance(ctx: Context) -> str:
    db = ExperimentDir(ctx.exp).optuna_db
    if not db.is_file():
        return note(f"no Optuna storage at {db}")
    import matplotlib.pyplot as plt
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db}"
    name = _study_name(ctx, optuna.study.get_all_study_names(storage))
    if name is None:
        return note(f"{db} holds no study")
    study = optuna.load_study(study_name=name, storage=storage)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return note(f"study {name}: {len(complete)} complete trial(s); importance needs at least 2")
    try:
        importance = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except (ValueError, RuntimeError) as exc:
        return note(f"study {name}: importance not available ({str(exc).splitlines()[0]})")
    if not importance:
        return note(
            f"study {name}: no parameter varied across complete trials; importance is undefined"
        )
    names = list(importance)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    ax.barh(names, [importance[n] for n in names], color="tab:purple")
    ax.set(
        xlabel="importance (fANOVA, share of variance)",
        title=f"Study {name}: {len(complete)} complete trials",
    )
    parts = [figure(ctx, fig, "importance.png", "hyperparameter importance")]
    for param in list(importance)[:3]:
        parts.append(_param_scatter(ctx, param))
    return (
        "\n".join(parts)
        + "<p>Importance uses complete trials only; the scatter plots show every trial's best val kappa.</p>"
    )


def _param_scatter(ctx: Context, param: str) -> str:
    import matplotlib.pyplot as plt

    col = f"hp_{param}"
    if col not in ctx.board:
        return note(f"{param}: not in the leaderboard")
    data = ctx.board[ctx.board["status"] != TrialStatus.ERROR][[col, METRIC, "status"]].dropna()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    values = data[col]
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if numeric:
        x = values.to_numpy(dtype=float)
        if (x > 0).all() and x.max() / x.min() > 20:
            ax.set_xscale("log")
    else:
        cats = sorted(values.astype(str).unique())
        x = values.astype(str).map({c: i for i, c in enumerate(cats)}).to_numpy(dtype=float)
        x = x + np.random.default_rng(0).uniform(-0.15, 0.15, len(x))
        ax.set_xticks(range(len(cats)), cats)
    for st, (colour, _) in STATUS_STYLE.items():
        sel = (data["status"] == st).to_numpy()
        if sel.any():
            ax.scatter(
                x[sel],
                data[METRIC][sel],
                s=18,
                color=colour,
                label=st.lower(),
                marker="o" if st == TrialStatus.COMPLETED else "x",
            )
    ax.set(xlabel=param, ylabel=f"{METRIC} (val)")
    ax.legend(fontsize=7)
    return figure(ctx, fig, f"param_{param}.png", f"{param} against kappa")


def roc(ctx: Context) -> str:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    curves, notes = [], []
    if ctx.best is not None:
        curves.append(
            (f"best single ({ctx.best['trial_id']})", test_studies(ctx.best["predictions_path"]))
        )
    else:
        notes.append("no usable single model")
    if ctx.ensemble is not None:
        ens = pd.read_parquet(
            EnsembleDir(ctx.ensemble).predictions, filters=[("split", "==", "test")]
        )
        curves.append(("ensemble", ens))
    else:
        notes.append("no ensemble given (--ensemble ensembles/NAME)")
    curves = [(n, s) for n, s in curves if len(s) and s["label"].nunique() == 2]
    if not curves:
        return note("no test predictions with both classes: " + "; ".join(notes))
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, studies in curves:
        fpr, tpr, _ = roc_curve(studies["label"], studies["prob"])
        ax.plot(
            fpr, tpr, lw=2, label=f"{name}: AUC {roc_auc(studies['label'], studies['prob']):.3f}"
        )
    ax.plot([0, 1], [0, 1], color="0.7", ls=":")
    ax.set(
        xlabel="false positive rate", ylabel="true positive rate", title="Study-level ROC on test"
    )
    ax.legend(loc="lower right", fontsize=8)
    return (
        figure(ctx, fig, "roc.png", "ROC curves")
        + f"<p>The MURA paper's model reached AUROC {MURA_PAPER_AUROC} "
        "on its hidden test set.</p>" + "".join(note(n) for n in notes)
    )


def body_parts(ctx: Context) -> str:
    import matplotlib.pyplot as plt

    groups = list(BODY_PARTS) + ["overall"]
    series: list[tuple[str, list[float], list[tuple[float, float]] | None]] = []
    notes = []
    if ctx.best is not None:
        st = test_studies(ctx.best["predictions_path"])
        scored = score_studies(
            st["label"].to_numpy(), st["prob"].to_numpy(), st["body_part"].to_numpy(), n_boot=N_BOOT
        )
        series.append((f"best single ({ctx.best['trial_id']})", *_kappas(scored, groups)))
    if ctx.ens_report is not None:
        series.append(("ensemble", *_kappas(ctx.ens_report["models"]["ensemble"]["test"], groups)))
    else:
        notes.append("no ensemble given (--ensemble ensembles/NAME): its bars are left out")
    series.append(("MURA paper model", [MURA_PAPER_KAPPA[g][0] for g in groups], None))
    series.append(("MURA best radiologist", [MURA_PAPER_KAPPA[g][1] for g in groups], None))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(series)
    xs = np.arange(len(groups))
    rows = {}
    for k, (name, values, cis) in enumerate(series):
        vals = np.array([np.nan if v is None else v for v in values], dtype=float)
        err = None
        if cis is not None:
            lo = np.array([np.nan if c[0] is None else c[0] for c in cis], dtype=float)
            hi = np.array([np.nan if c[1] is None else c[1] for c in cis], dtype=float)
            err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
        ax.bar(
            xs + (k - (len(series) - 1) / 2) * width,
            np.nan_to_num(vals),
            width,
            yerr=err,
            capsize=2,
            label=name,
        )
        rows[name] = [
            ("" if math.isnan(v) else f"{v:.3f}")
            + ("" if cis is None or math.isnan(v) or c[0] is None else f" [{c[0]:.2f}, {c[1]:.2f}]")
            for v, c in zip(vals, cis or [None] * len(vals))
        ]
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(xs, [g.replace("XR_", "").lower() for g in groups])
    ax.set(
        ylabel="study Cohen's kappa",
        ylim=(min(-0.2, ax.get_ylim()[0]), 1.05),
        title="Study kappa per body part (test)",
    )
    ax.legend(fontsize=8, ncol=2)
    frame = pd.DataFrame(rows, index=[g.replace("XR_", "").lower() for g in groups]).T.reset_index(
        names="model"
    )
    return (
        figure(ctx, fig, "body_parts.png", "kappa per body part")
        + table(frame)
        + "<p>Ours: MURA's official valid set (our test split), with 95% bootstrap intervals over studies. "
        "MURA paper and radiologist: Rajpurkar et al. 2017 (arXiv:1712.06957), on the hidden test set.</p>"
        + "".join(note(n) for n in notes)
    )


def _kappas(scored: dict, groups: list[str]) -> tuple[list[float | None], list[tuple]]:
    blocks = [scored["overall"] if g == "overall" else scored["parts"].get(g) for g in groups]
    return [b["kappa"] if b else None for b in blocks], [
        tuple(b["kappa_ci"]) if b else (None, None) for b in blocks
    ]


def ensemble_trajectory(ctx: Context) -> str:
    import matplotlib.pyplot as plt

    if ctx.manifest is None:
        return note("no ensemble given (--ensemble ensembles/NAME)")
    ens = ctx.manifest["ensembles"][GENERALIST_ENSEMBLE]
    traj = pd.DataFrame(ens["trajectory"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    split = ctx.manifest.get("selection", {}).get("split", "val")
    metric = f"{split} {ctx.manifest['settings']['metric']}"
    if traj.empty:  # bagged selection: one greedy selection per bag, their weights averaged
        bags = ens.get("bags", [])
        ax.bar(range(1, len(bags) + 1), [b["score"] for b in bags], color="tab:blue")
        ax.axhline(ens["val_score"], color="0.3", ls=":", label="the averaged ensemble")
        ax.set(xlabel="bag", ylabel=metric, title="Bagged selection: each bag's ensemble")
    else:
        for phase, marker in (("init", "s"), ("greedy", "o")):
            sel = traj[traj["phase"] == phase] if "phase" in traj else traj
            ax.plot(sel["size"], sel["score"], marker=marker, ms=4, lw=0, label=f"{phase} step")
        ax.plot(traj["size"], traj["score"], color="tab:blue", lw=1)
        kept = f"kept: first {ens['best_size']} steps"
        ax.axvline(ens["best_size"], color="0.5", ls=":", label=kept)
        ax.set(
            xlabel="ensemble size (selection steps)",
            ylabel=metric,
            title=f"Generalist selection trajectory ({split})",
        )
    ax.legend(fontsize=8)
    names = [m["trial_id"] for m in ens["members"]][::-1]
    bx.barh(names, [m["weight"] for m in ens["members"]][::-1], color="tab:green")
    bx.set(xlabel="weight", title=f"Generalist ensemble: {len(names)} member(s)")
    return (
        figure(ctx, fig, "ensemble.png", "ensemble trajectory and weights")
        + "<p>Per-part ensembles and their members are listed under the routing below.</p>"
    )
