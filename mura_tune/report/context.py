"""What every section of the HTML report reads, loaded once, and the HTML pieces they are made of."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mura_tune.constants import ERROR, METRIC
from mura_tune.errors import ExperimentError
from mura_tune.io import atomic_path
from mura_tune.metrics import study_table
from mura_tune.search.leaderboard import build_leaderboard


@dataclass
class Context:
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


def load_context(experiment: str | Path, ensemble: str | Path | None, out: str | Path | None) -> Context:
    exp = Path(experiment).expanduser().resolve()
    if not exp.is_dir():
        raise ExperimentError(f"--experiment {exp}: folder not found")
    if (exp / "leaderboard.parquet").is_file():
        board = pd.read_parquet(exp / "leaderboard.parquet")
    else:
        board = build_leaderboard(exp)
    out_dir = Path(out).expanduser().resolve() if out else exp / "report"
    ctx = Context(exp=exp, out=out_dir, board=board, plan=read_json(exp / "experiment.json"))
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


def _best_single(ctx: Context) -> pd.Series | None:
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


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def test_studies(predictions: str | Path) -> pd.DataFrame:
    images = pd.read_parquet(predictions, filters=[("split", "==", "test")])
    return study_table(images)


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def figure(ctx: Context, fig, name: str, alt: str) -> str:
    import matplotlib.pyplot as plt

    path = ctx.out / name
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    ctx.written.append(path)
    return f'<img class="plot" src="{html.escape(name)}" alt="{html.escape(alt)}">'


def table(frame: pd.DataFrame) -> str:
    table = frame.to_html(
        index=False, escape=True, na_rep="", float_format=lambda v: f"{v:.3f}", border=0
    )
    return f'<div class="scroll">{table}</div>'
