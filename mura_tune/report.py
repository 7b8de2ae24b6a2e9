"""One HTML page per experiment: what a researcher looks at to judge a search.

    mura-tune report --experiment results/demo --ensemble ensembles/demo
    # -> results/demo/report/report.html (+ the PNGs it shows, side by side; opens offline)

Sections: leaderboard, learning curves (ASHA's cuts marked), best-so-far against wall time,
hyperparameter importance (Optuna) with a plot per important parameter, test ROC curves,
study kappa per body part against the MURA paper, the ensemble's trajectory and weights, the
specialist routing, and Grad-CAMs of right and wrong test studies. A missing input (no
ensemble, too few trials, images moved) turns its section into a note, never a crash.
The page has no network dependency: no scripts, fonts or styles are fetched.
"""

from __future__ import annotations

import html
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mura_tune.constants import BODY_PARTS, COMPLETED, ERROR, METRIC, PRUNED
from mura_tune.errors import ExperimentError
from mura_tune.io import atomic_path, write_text

TOP_N = 20
BOARD_COLUMNS = ("rank", "trial_id", "scope", "status", "epochs", METRIC, "val_auc", "val_loss")
BOARD_COLUMNS += ("test_kappa_study",)
N_BOOT = 1000
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
SECTIONS = {
    "leaderboard": "Leaderboard",
    "learning-curves": "Learning curves",
    "wall-time": "Best so far against wall time",
    "importance": "Hyperparameter importance",
    "roc": "ROC curves on test",
    "body-parts": "Study kappa per body part",
    "ensemble": "Ensemble trajectory and member weights",
    "routing": "Specialist routing",
    "cam": "Class activation maps",
}
STATUS_STYLE = {COMPLETED: ("tab:blue", "-"), PRUNED: ("tab:orange", "--"), ERROR: ("tab:red", ":")}
_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:13px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#eee}img.plot{max-width:100%;border:1px solid #ddd}.note{color:#875;font-style:italic}
.cams{display:flex;flex-wrap:wrap;gap:12px}.cams figure{margin:0;width:200px;font-size:12px}
.cams img{width:200px;image-rendering:pixelated}#self-check{color:#b00;font-weight:bold}
code{background:#f4f4f4;padding:0 3px}"""
# Marks the page when an image fails to load or a script errors (also read by the headless-browser test).
_SELF_CHECK = """<p id="self-check" data-missing-images="-1" data-errors="0"></p>
<script>
(function(){var errors=0,box=document.getElementById('self-check');
window.addEventListener('error',function(){errors+=1;box.setAttribute('data-errors',errors);},true);
window.addEventListener('load',function(){var bad=[].filter.call(document.images,function(i){return !i.complete||i.naturalWidth===0;});
box.setAttribute('data-missing-images',bad.length);box.setAttribute('data-errors',errors);
if(bad.length){box.textContent=bad.length+' image(s) missing: keep report.html next to its PNG files.';}});})();
</script>"""


@dataclass
class _Ctx:
    """Everything the sections read, loaded once."""

    exp: Path
    out: Path
    board: pd.DataFrame
    plan: dict
    ensemble: Path | None = None
    manifest: dict | None = None
    ens_report: dict | None = None
    best: pd.Series | None = None
    metrics: dict[str, pd.DataFrame] = field(default_factory=dict)  # trial_id -> metrics.parquet
    written: list[Path] = field(default_factory=list)


def write_report(
    experiment: str | Path, ensemble: str | Path | None = None, out: str | Path | None = None
) -> Path:
    """Write ``report.html`` and its PNGs for an experiment (and optionally its ensemble).

    Args:
        experiment: the experiment folder (``RESULTS/EXP``).
        ensemble: an ensemble folder (``ensembles/NAME``) built from this experiment.
        out: output folder; default ``<experiment>/report``.

    Returns:
        The path of ``report.html``.

    Raises:
        ExperimentError: the experiment or ensemble folder is missing or has no trials.
    """
    import matplotlib

    matplotlib.use("Agg")
    from tqdm import tqdm

    ctx = _load(experiment, ensemble, out)
    body = [_header(ctx)]
    steps = [_leaderboard, _learning_curves, _wall_time, _importance, _roc, _body_parts]
    steps += [_ensemble, _routing, _cams]
    for step, (key, title) in tqdm(
        list(zip(steps, SECTIONS.items())), desc="report", unit="section", file=sys.stderr
    ):
        try:
            content = step(ctx)
        except Exception as exc:  # a broken input costs one section, never the report
            content = _note(
                f"could not draw this section: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
        body.append(f'<section id="{key}"><h2>{html.escape(title)}</h2>\n{content}\n</section>')
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>mura-tune report: '
        f"{html.escape(ctx.exp.name)}</title><style>{_CSS}</style></head><body>\n{_SELF_CHECK}\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path = write_text(ctx.out / "report.html", page)
    for png in ctx.written:
        print(f"wrote {png}")
    return path


# --- loading ---------------------------------------------------------------------------------------
def _load(experiment: str | Path, ensemble: str | Path | None, out: str | Path | None) -> _Ctx:
    exp = Path(experiment).expanduser().resolve()
    if not exp.is_dir():
        raise ExperimentError(f"--experiment {exp}: folder not found")
    if (exp / "leaderboard.parquet").is_file():
        board = pd.read_parquet(exp / "leaderboard.parquet")
    else:
        from mura_tune.leaderboard import build_leaderboard

        board = build_leaderboard(exp)
    out_dir = Path(out).expanduser().resolve() if out else exp / "report"
    ctx = _Ctx(exp=exp, out=out_dir, board=board, plan=_json(exp / "experiment.json"))
    ctx.out.mkdir(parents=True, exist_ok=True)
    if ensemble is not None:
        ens = Path(ensemble).expanduser().resolve()
        for name in ("manifest.json", "report.json"):
            if not (ens / name).is_file():
                raise ExperimentError(
                    f"--ensemble {ens}: no {name} (expected ensembles/NAME from `mura-tune ensemble`)"
                )
        ctx.ensemble, ctx.manifest = ens, json.loads((ens / "manifest.json").read_text())
        ctx.ens_report = json.loads((ens / "report.json").read_text())
    ctx.best = _best_single(ctx)
    ctx.metrics = _trial_metrics(board)
    return ctx


def _best_single(ctx: _Ctx) -> pd.Series | None:
    """The ensemble's best single model if given, else the top usable generalist of the leaderboard."""
    board = ctx.board
    usable = board[(board["status"] != ERROR) & board["predictions_path"].notna()]
    if ctx.manifest is not None:
        chosen = usable[usable["trial_id"] == ctx.manifest["baselines"]["best_single"]["trial_id"]]
        if len(chosen):
            return chosen.iloc[0]
    generalists = usable[usable["scope"] == "all"] if (usable["scope"] == "all").any() else usable
    return generalists.iloc[0] if len(generalists) else None


def _trial_metrics(board: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out = {}
    for row in board.itertuples():
        path = Path(row.trial_dir) / "metrics.parquet"
        if path.is_file():
            frame = pd.read_parquet(path)
            if METRIC in frame and len(frame):
                out[row.trial_id] = frame
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _test_studies(predictions: str | Path) -> pd.DataFrame:
    from mura_tune.metrics import study_table

    images = pd.read_parquet(predictions, filters=[("split", "==", "test")])
    return study_table(images)


# --- html helpers ----------------------------------------------------------------------------------
def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _img(ctx: _Ctx, fig, name: str, alt: str) -> str:
    import matplotlib.pyplot as plt

    path = ctx.out / name
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    ctx.written.append(path)
    return f'<img class="plot" src="{html.escape(name)}" alt="{html.escape(alt)}">'


def _table(frame: pd.DataFrame) -> str:
    table = frame.to_html(
        index=False, escape=True, na_rep="", float_format=lambda v: f"{v:.3f}", border=0
    )
    return f'<div class="scroll">{table}</div>'


def _header(ctx: _Ctx) -> str:
    counts = ctx.board["status"].value_counts().to_dict()
    status = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    lines = [
        f"<h1>mura-tune report: {html.escape(ctx.exp.name)}</h1>",
        f"<p>Experiment <code>{html.escape(str(ctx.exp))}</code>; space <code>{html.escape(str(ctx.plan.get('space', '?')))}</code>; "
        f"{len(ctx.board)} trials ({html.escape(status)}). Written {time.strftime('%Y-%m-%d %H:%M')}.</p>",
        "<p>Trials are ranked and selected on the validation carve-out of train; <b>test</b> is MURA's official "
        "valid set, reported only, never used to choose.</p>",
        f"<p>Interactive views: <code>tensorboard --logdir {html.escape(str(ctx.exp))}</code> and "
        f"<code>optuna-dashboard sqlite:///{html.escape(str(ctx.exp / 'optuna.db'))}</code>.</p>",
    ]
    if ctx.ensemble is not None:
        lines.append(f"<p>Ensemble <code>{html.escape(str(ctx.ensemble))}</code>.</p>")
    return "\n".join(lines)


# --- sections --------------------------------------------------------------------------------------
def _leaderboard(ctx: _Ctx) -> str:
    hp = [c for c in ctx.board.columns if c.startswith("hp_")]
    cols = [c for c in BOARD_COLUMNS if c in ctx.board] + hp
    top = ctx.board[cols].head(TOP_N).rename(columns={c: c[3:] for c in hp})
    return f"<p>Top {len(top)} of {len(ctx.board)} trials by {METRIC} (val).</p>\n" + _table(top)


def _rungs(ctx: _Ctx) -> list[int]:
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


def _learning_curves(ctx: _Ctx) -> str:
    import matplotlib.pyplot as plt

    metrics = ctx.metrics
    if not metrics:
        return _note("no trial has per-epoch metrics yet (trials/*/metrics.parquet)")
    status = dict(zip(ctx.board["trial_id"], ctx.board["status"]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for rung in _rungs(ctx):
        ax.axvline(rung, color="0.85", lw=1, zorder=0)
    seen = set()
    for trial_id, frame in metrics.items():
        st = status.get(trial_id, COMPLETED)
        colour, style = STATUS_STYLE.get(st, ("tab:gray", "-"))
        label = None if st in seen else st.lower()
        seen.add(st)
        ax.plot(
            frame["epoch"], frame[METRIC], ls=style, color=colour, lw=1.2, alpha=0.8, label=label
        )
        if st in (PRUNED, ERROR):
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
        _img(ctx, fig, "learning_curves.png", "learning curves")
        + f"<p>{text}Dashed lines end where a trial was pruned.</p>"
    )


def _wall_time(ctx: _Ctx) -> str:
    import matplotlib.pyplot as plt

    events, starts = [], []
    for trial_id, frame in ctx.metrics.items():
        trial_dir = ctx.exp / "trials" / trial_id
        meta, summary = _json(trial_dir / "trial.json"), _json(trial_dir / "summary.json")
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
        return _note(
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
        _img(ctx, fig, "best_so_far.png", "best so far against wall time")
        + "<p>Epoch ends are estimated from each trial's start, its setup time and its epoch durations.</p>"
    )


def _study_name(ctx: _Ctx, names: list[str]) -> str | None:
    scopes = list(ctx.plan.get("scopes") or {"all": 0})
    wanted = f"{ctx.plan.get('name', ctx.exp.name)}:{scopes[0]}"
    if wanted in names:
        return wanted
    return next((n for n in names if n.endswith(":all")), names[0] if names else None)


def _importance(ctx: _Ctx) -> str:
    db = ctx.exp / "optuna.db"
    if not db.is_file():
        return _note(f"no Optuna storage at {db}")
    import matplotlib.pyplot as plt
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db}"
    name = _study_name(ctx, optuna.study.get_all_study_names(storage))
    if name is None:
        return _note(f"{db} holds no study")
    study = optuna.load_study(study_name=name, storage=storage)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return _note(
            f"study {name}: {len(complete)} complete trial(s); importance needs at least 2"
        )
    try:
        importance = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except (ValueError, RuntimeError) as exc:
        return _note(f"study {name}: importance not available ({str(exc).splitlines()[0]})")
    if not importance:
        return _note(
            f"study {name}: no parameter varied across complete trials; importance is undefined"
        )
    names = list(importance)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    ax.barh(names, [importance[n] for n in names], color="tab:purple")
    ax.set(
        xlabel="importance (fANOVA, share of variance)",
        title=f"Study {name}: {len(complete)} complete trials",
    )
    parts = [_img(ctx, fig, "importance.png", "hyperparameter importance")]
    for param in list(importance)[:3]:
        parts.append(_param_scatter(ctx, param))
    return (
        "\n".join(parts)
        + "<p>Importance uses complete trials only; the scatter plots show every trial's best val kappa.</p>"
    )


def _param_scatter(ctx: _Ctx, param: str) -> str:
    import matplotlib.pyplot as plt

    col = f"hp_{param}"
    if col not in ctx.board:
        return _note(f"{param}: not in the leaderboard")
    data = ctx.board[ctx.board["status"] != ERROR][[col, METRIC, "status"]].dropna()
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
                marker="o" if st == COMPLETED else "x",
            )
    ax.set(xlabel=param, ylabel=f"{METRIC} (val)")
    ax.legend(fontsize=7)
    return _img(ctx, fig, f"param_{param}.png", f"{param} against kappa")


def _roc(ctx: _Ctx) -> str:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from mura_tune.metrics import roc_auc

    curves, notes = [], []
    if ctx.best is not None:
        curves.append(
            (f"best single ({ctx.best['trial_id']})", _test_studies(ctx.best["predictions_path"]))
        )
    else:
        notes.append("no usable single model")
    if ctx.ensemble is not None:
        ens = pd.read_parquet(
            ctx.ensemble / "predictions.parquet", filters=[("split", "==", "test")]
        )
        curves.append(("ensemble", ens))
    else:
        notes.append("no ensemble given (--ensemble ensembles/NAME)")
    curves = [(n, s) for n, s in curves if len(s) and s["label"].nunique() == 2]
    if not curves:
        return _note("no test predictions with both classes: " + "; ".join(notes))
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
        _img(ctx, fig, "roc.png", "ROC curves")
        + f"<p>The MURA paper's model reached AUROC {MURA_PAPER_AUROC} "
        "on its hidden test set.</p>" + "".join(_note(n) for n in notes)
    )


def _body_parts(ctx: _Ctx) -> str:
    import matplotlib.pyplot as plt

    from mura_tune.evaluate import score_studies

    groups = list(BODY_PARTS) + ["overall"]
    series: list[tuple[str, list[float], list[tuple[float, float]] | None]] = []
    notes = []
    if ctx.best is not None:
        st = _test_studies(ctx.best["predictions_path"])
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
    table = pd.DataFrame(rows, index=[g.replace("XR_", "").lower() for g in groups]).T.reset_index(
        names="model"
    )
    return (
        _img(ctx, fig, "body_parts.png", "kappa per body part")
        + _table(table)
        + "<p>Ours: MURA's official valid set (our test split), with 95% bootstrap intervals over studies. "
        "MURA paper and radiologist: Rajpurkar et al. 2017 (arXiv:1712.06957), on the hidden test set.</p>"
        + "".join(_note(n) for n in notes)
    )


def _kappas(scored: dict, groups: list[str]) -> tuple[list[float | None], list[tuple]]:
    blocks = [scored["overall"] if g == "overall" else scored["parts"].get(g) for g in groups]
    return [b["kappa"] if b else None for b in blocks], [
        tuple(b["kappa_ci"]) if b else (None, None) for b in blocks
    ]


def _ensemble(ctx: _Ctx) -> str:
    import matplotlib.pyplot as plt

    if ctx.manifest is None:
        return _note("no ensemble given (--ensemble ensembles/NAME)")
    ens = ctx.manifest["ensembles"]["generalist"]
    traj = pd.DataFrame(ens["trajectory"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for phase, marker in (("init", "s"), ("greedy", "o")):
        sel = traj[traj["phase"] == phase] if "phase" in traj else traj
        ax.plot(sel["size"], sel["score"], marker=marker, ms=4, lw=0, label=f"{phase} step")
    ax.plot(traj["size"], traj["score"], color="tab:blue", lw=1)
    ax.axvline(ens["best_size"], color="0.5", ls=":", label=f"kept: first {ens['best_size']} steps")
    ax.set(
        xlabel="ensemble size (selection steps)",
        ylabel=f"val {ctx.manifest['settings']['metric']}",
        title="Generalist selection trajectory (val)",
    )
    ax.legend(fontsize=8)
    names = [m["trial_id"] for m in ens["members"]][::-1]
    bx.barh(names, [m["weight"] for m in ens["members"]][::-1], color="tab:green")
    bx.set(xlabel="weight", title=f"Generalist ensemble: {len(names)} member(s)")
    return (
        _img(ctx, fig, "ensemble.png", "ensemble trajectory and weights")
        + "<p>Per-part ensembles and their members are listed under the routing below.</p>"
    )


def _routing(ctx: _Ctx) -> str:
    if ctx.manifest is None:
        return _note("no ensemble given (--ensemble ensembles/NAME): no routing to show")
    rows = []
    for part, r in ctx.manifest["routing"].items():
        ens = ctx.manifest["ensembles"].get(part, {})
        members = (
            ", ".join(f"{m['trial_id']} ({m['weight']:.2f})" for m in ens.get("members", []))
            if r["served_by"] == "part"
            else ""
        )
        rows.append(
            {
                "part": part,
                "served by": r["served_by"],
                "val studies": r["n_val_studies"],
                "specialists": r["n_specialists"],
                "generalist val": r["generalist_val_score"],
                "part ensemble val": r["part_val_score"],
                "members": members,
                "reason": r["reason"],
            }
        )
    return _table(pd.DataFrame(rows))


def _cams(ctx: _Ctx) -> str:
    from mura_tune.cam import cam_image, save_overlay
    from mura_tune.engine import Engine
    from mura_tune.train import load_checkpoint

    if (
        ctx.best is None
        or not isinstance(ctx.best.get("checkpoint_path"), str)
        or not Path(ctx.best["checkpoint_path"]).is_file()
    ):
        return _note("no checkpoint of the best single model")
    net, config = load_checkpoint(ctx.best["checkpoint_path"])
    engine = Engine("auto")
    net = engine.model(net)
    images = pd.read_parquet(ctx.best["predictions_path"], filters=[("split", "==", "test")])
    studies = _test_studies(ctx.best["predictions_path"])
    studies["correct"] = (studies["prob"] > 0.5).astype(int) == studies["label"]
    picks = []
    for correct in (True, False):
        for label in (1, 0):
            sel = studies[(studies["correct"] == correct) & (studies["label"] == label)]
            if len(sel):  # the most confident right answer, the most confident mistake
                picks.append(sel.iloc[int(np.argmax(np.abs(sel["prob"].to_numpy() - 0.5)))])
    figures = []
    for k, study in enumerate(picks, 1):
        views = sorted(images.loc[images["study_id"] == study["study_id"], "image_path"])[:2]
        for j, view in enumerate(views, 1):
            if not Path(view).is_file():
                continue
            picture, prob = cam_image(net, config, view, engine)
            path = save_overlay(picture, prob, ctx.out / f"cam_{k}_{j}.png")
            ctx.written.append(path)
            verdict = "right" if study["correct"] else "wrong"
            caption = (
                f"{verdict}: label {'abnormal' if study['label'] else 'normal'}, study p={study['prob']:.2f}, "
                f"view p={prob:.2f}<br><small>{html.escape(study['study_id'])}/{html.escape(Path(view).name)}</small>"
            )
            figures.append(
                f'<figure><img src="{path.name}" alt="Grad-CAM {k}.{j}"><figcaption>{caption}</figcaption></figure>'
            )
    if not figures:
        return _note("the test images of the best model are not readable here (data moved?)")
    return (
        f"<p>Grad-CAM of the best single model ({html.escape(str(ctx.best['trial_id']))}) on test studies it "
        "gets right and wrong. Red is where the evidence for 'abnormal' is strongest.</p>"
        f'<div class="cams">{"".join(figures)}</div>'
    )
