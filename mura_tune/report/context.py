"""What every section of the HTML report reads, loaded once, and the HTML pieces they are made of."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mura_tune.constants import METRIC
from mura_tune.errors import ExperimentError
from mura_tune.io import atomic_path
from mura_tune.layout import (
    GENERALIST_SCOPE,
    NO_SCORE,
    REFIT_SCOPE,
    EnsembleDir,
    ExperimentDir,
    TrialDir,
    read_json,
    read_manifest,
)
from mura_tune.metrics import study_table
from mura_tune.search.leaderboard import load_leaderboard


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


def load_context(
    experiment: str | Path, ensemble: str | Path | None, out: str | Path | None
) -> Context:
    exp = Path(experiment).expanduser().resolve()
    if not exp.is_dir():
        raise ExperimentError(f"--experiment {exp}: folder not found")
    board = load_leaderboard(exp)
    if "scope" in board:  # a refit's fold models are reported with their ensemble, not as trials
        board = board[board["scope"] != REFIT_SCOPE].reset_index(drop=True)
    folder = ExperimentDir(exp)
    out_dir = Path(out).expanduser().resolve() if out else folder.report
    ctx = Context(exp=exp, out=out_dir, board=board, plan=read_json(folder.plan) or {})
    if ensemble is not None:
        ens = EnsembleDir(Path(ensemble).expanduser().resolve())
        ctx.manifest = read_manifest(ens.path)
        ctx.ens_report = read_json(ens.report)
        if ctx.ens_report is None:
            raise ExperimentError(
                f"--ensemble {ens.path}: no readable {ens.report.name} (expected ensembles/NAME from `mura-tune ensemble`)"
            )
        ctx.ensemble = ens.path
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.best = _best_single(ctx)
    ctx.metrics = _trial_metrics(board)
    return ctx


def _best_single(ctx: Context) -> pd.Series | None:
    """The ensemble's best single model if given, else the top usable generalist of the leaderboard."""
    board = ctx.board
    usable = board[~board["status"].isin(NO_SCORE) & board["predictions_path"].notna()]
    if ctx.manifest is not None:
        chosen = usable[usable["trial_id"] == ctx.manifest["baselines"]["best_single"]["trial_id"]]
        if len(chosen):
            return chosen.iloc[0]
    is_generalist = usable["scope"] == GENERALIST_SCOPE
    generalists = usable[is_generalist] if is_generalist.any() else usable
    return generalists.iloc[0] if len(generalists) else None


def _trial_metrics(board: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out = {}
    for row in board.itertuples():
        path = TrialDir(Path(row.trial_dir)).metrics
        if path.is_file():
            try:
                frame = pd.read_parquet(path)
            except Exception:  # damaged: the leaderboard names it; the curves go without it
                continue
            if METRIC in frame and len(frame):
                out[row.trial_id] = frame
    return out


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
