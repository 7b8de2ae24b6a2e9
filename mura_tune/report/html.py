"""One HTML page per experiment: what a researcher looks at to judge a search.

    mura-tune report --experiment results/demo --ensemble ensembles/demo
    # -> results/demo/report/report.html (+ the PNGs it shows, side by side; opens offline)

Sections: leaderboard, learning curves (ASHA's cuts marked), best-so-far against wall time,
hyperparameter importance (Optuna) with a plot per important parameter, test ROC curves,
study kappa per body part against the MURA paper, the ensemble's trajectory and weights, the
specialist routing (gains with intervals, thresholds), the selection methods' selection-set
against test kappa, and Grad-CAMs of right and wrong test studies. A missing input (no
ensemble, too few trials, images moved) turns its section into a note, never a crash.
The page has no network dependency: no scripts, fonts or styles are fetched.
"""

from __future__ import annotations

import html
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mura_tune.constants import METRIC
from mura_tune.io import write_text
from mura_tune.layout import REPORT_HTML, SERVED_BY_PART, ExperimentDir
from mura_tune.metrics import format_ci
from mura_tune.report import plots
from mura_tune.report.context import Context, load_context, note, table, test_studies

TOP_N = 20
BOARD_COLUMNS = ("rank", "trial_id", "scope", "status", "epochs", METRIC, "val_auc", "val_loss")
BOARD_COLUMNS += ("test_kappa_study",)
SECTIONS = {
    "leaderboard": "Leaderboard",
    "learning-curves": "Learning curves",
    "wall-time": "Best so far against wall time",
    "importance": "Hyperparameter importance",
    "roc": "ROC curves on test",
    "body-parts": "Study kappa per body part",
    "ensemble": "Ensemble trajectory and member weights",
    "routing": "Specialist routing",
    "methods": "Selection methods: selection set against test",
    "cam": "Class activation maps",
}
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

    ctx = load_context(experiment, ensemble, out)
    body = [_header(ctx)]
    steps = [_leaderboard, plots.learning_curves, plots.wall_time, plots.importance, plots.roc]
    steps += [plots.body_parts, plots.ensemble_trajectory, _routing, _methods, _cams]
    for step, (key, title) in tqdm(
        list(zip(steps, SECTIONS.items())), desc="report", unit="section", file=sys.stderr
    ):
        try:
            content = step(ctx)
        except Exception as exc:  # a broken input costs one section, never the report
            content = note(
                f"could not draw this section: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
        body.append(f'<section id="{key}"><h2>{html.escape(title)}</h2>\n{content}\n</section>')
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>mura-tune report: '
        f"{html.escape(ctx.exp.name)}</title><style>{_CSS}</style></head><body>\n{_SELF_CHECK}\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    return write_text(ctx.out / REPORT_HTML, page)  # the CLI lists what this run wrote


def _header(ctx: Context) -> str:
    counts = ctx.board["status"].value_counts().to_dict()
    status = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    lines = [
        f"<h1>mura-tune report: {html.escape(ctx.exp.name)}</h1>",
        f"<p>Experiment <code>{html.escape(str(ctx.exp))}</code>; space <code>{html.escape(str(ctx.plan.get('space', '?')))}</code>; "
        f"{len(ctx.board)} trials ({html.escape(status)}). Written {time.strftime('%Y-%m-%d %H:%M')}.</p>",
        "<p>Trials are ranked and selected on the validation carve-out of train; <b>test</b> is MURA's official "
        "valid set, reported only, never used to choose.</p>",
        f"<p>Interactive views: <code>tensorboard --logdir {html.escape(str(ctx.exp))}</code> and "
        f"<code>optuna-dashboard sqlite:///{html.escape(str(ExperimentDir(ctx.exp).optuna_db))}</code>.</p>",
    ]
    if ctx.ensemble is not None:
        lines.append(f"<p>Ensemble <code>{html.escape(str(ctx.ensemble))}</code>.</p>")
    return "\n".join(lines)


def _leaderboard(ctx: Context) -> str:
    hp = [c for c in ctx.board.columns if c.startswith("hp_")]
    cols = [c for c in BOARD_COLUMNS if c in ctx.board] + hp
    top = ctx.board[cols].head(TOP_N).rename(columns={c: c[3:] for c in hp})
    return f"<p>Top {len(top)} of {len(ctx.board)} trials by {METRIC} (val).</p>\n" + table(top)


def _routing(ctx: Context) -> str:
    if ctx.manifest is None:
        return note("no ensemble given (--ensemble ensembles/NAME): no routing to show")
    rows = []
    for part, r in ctx.manifest["routing"].items():
        ens = ctx.manifest["ensembles"].get(part, {})
        members = (
            ", ".join(f"{m['trial_id']} ({m['weight']:.2f})" for m in ens.get("members", []))
            if r["served_by"] == SERVED_BY_PART
            else ""
        )
        rows.append(
            {
                "part": part,
                "served by": r["served_by"],
                "val studies": r["n_val_studies"],
                "specialists": r["n_specialists"],
                "generalist": r["generalist_val_score"],
                "part ensemble": r["part_val_score"],
                "gain [95% CI]": format_ci(r.get("gain"), r.get("gain_ci")),
                "threshold": ctx.manifest.get("thresholds", {}).get(part, 0.5),
                "members": members,
                "reason": r["reason"],
            }
        )
    split = ctx.manifest.get("selection", {}).get("split", "val")
    return (
        f"<p>Scores on the selection set ({html.escape(split)}). A part is served by its own "
        "ensemble only when the paired bootstrap interval of its gain lies above 0.</p>\n"
        + table(pd.DataFrame(rows))
    )


def _methods(ctx: Context) -> str:
    if ctx.ens_report is None:
        return note("no ensemble given (--ensemble ensembles/NAME): no selection methods to show")
    methods = ctx.ens_report.get("methods")
    if not methods:
        return note("the ensemble was built without the comparison of selection methods")
    rows = [
        {
            "method": ("* " if m["chosen"] else "") + m["name"],
            "selection studies": m["n_selection_studies"],
            "selection kappa": m["selection_kappa"],
            "test kappa [95% CI]": format_ci(m["test_kappa"], m["test_kappa_ci"]),
            "optimism": m["optimism"],
            "test difference vs val-split greedy [95% CI]": format_ci(
                m["vs_reference"]["diff"], m["vs_reference"]["ci"]
            ),
        }
        for m in methods.values()
    ]
    text = (
        "<p>Each method's kappa on the studies it selected on, against its kappa on held-out test; "
        "the optimism is their difference. The last column is the paired bootstrap difference in "
        "test kappa against the single-split greedy ensemble (the same resampled test studies for "
        "both). * marks this ensemble's method; test chose nothing.</p>\n"
        + table(pd.DataFrame(rows))
    )
    cv = ctx.ens_report.get("cv")
    if cv:
        multiple = cv["compute"]["multiple"]
        text += (
            f"<p>Cross-validated refit: {cv['configurations']} configuration(s) x {cv['k']} folds = "
            f"{cv['fold_models']} fold models, {format_ci(multiple)}x the search's compute "
            "(trial wall time).</p>"
        )
    return text


def _cams(ctx: Context) -> str:
    # torch is imported only here, where a model runs: a report's error paths answer at once.
    from mura_tune.report.cam import cam_image, save_overlay
    from mura_tune.train.checkpoint import load_checkpoint
    from mura_tune.train.engine import Engine

    if (
        ctx.best is None
        or not isinstance(ctx.best.get("checkpoint_path"), str)
        or not Path(ctx.best["checkpoint_path"]).is_file()
    ):
        return note("no checkpoint of the best single model")
    net, config = load_checkpoint(ctx.best["checkpoint_path"])
    engine = Engine("auto")
    net = engine.model(net)
    images = pd.read_parquet(ctx.best["predictions_path"], filters=[("split", "==", "test")])
    studies = test_studies(ctx.best["predictions_path"])
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
        return note("the test images of the best model are not readable here (data moved?)")
    return (
        f"<p>Grad-CAM of the best single model ({html.escape(str(ctx.best['trial_id']))}) on test studies it "
        "gets right and wrong. Red is where the evidence for 'abnormal' is strongest.</p>"
        f'<div class="cams">{"".join(figures)}</div>'
    )
