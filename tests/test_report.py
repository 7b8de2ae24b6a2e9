"""The experiment report, the Optuna study and the TensorBoard scalars of one tiny real search.

One module-scoped search (3 trials x 2 epochs, custom_cnn at 32 px) and one ensemble built from
it. The browser tests load ``report.html`` in headless Chromium (Debian's ``chromium``; installed
here with apt-get if missing, else skipped) and read back a self-check the page writes into its
own DOM: images that failed to load and script errors. A broken copy of the page proves the check
can fail.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from PIL import Image

from mura_tune.constants import EPOCH_METRIC, KEPT_METRIC, METRIC
from mura_tune.report.html import SECTIONS, write_report

SEARCH_TIMEOUT = 900  # the first test pays for the search

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TB_TAGS = ("val_kappa_study", "train_loss", "val_loss", "val_auc", "lr")
#: What each reported scalar is in metrics.parquet: trials report their kept checkpoint's val kappa
#: as METRIC (the scheduler's and the searcher's value) and the epoch's own as EPOCH_METRIC.
TB_COLUMN = {METRIC: KEPT_METRIC, EPOCH_METRIC: METRIC}
OPTUNA_TO_BOARD = {"COMPLETE": "COMPLETED", "PRUNED": "PRUNED", "FAIL": "ERROR"}


class _Page(HTMLParser):
    """Section ids with their h2 titles, every img src and every href/src attribute."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, str] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self._section: str | None = None
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs.get("id")
            self.sections[self._section] = ""
        self._in_h2 = tag == "h2"
        if tag == "img":
            self.images.append(attrs["src"])
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v]

    def handle_data(self, data):
        if self._in_h2 and self._section:
            self.sections[self._section] += data

    def handle_endtag(self, tag):
        self._in_h2 = self._in_h2 and tag != "h2"


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def section_html(text: str, key: str) -> str:
    start = text.index(f'<section id="{key}">')
    return text[start : text.index("</section>", start)]


@pytest.fixture(scope="module")
def search(ray_session, tiny_data, tmp_path_factory):
    from mura_tune.ensemble.build import build_ensemble

    root = tmp_path_factory.mktemp("report")
    args = ["--space", "custom_cnn", "--data", tiny_data, "--num-samples", 3, "--max-epochs", 2]
    args += [
        "--results",
        root / "results",
        "--name",
        "x",
        "--cpus-per-trial",
        1,
        "--set",
        "image_size=32",
    ]
    assert run_cli(*args) == 0
    exp = root / "results" / "x"
    ens = build_ensemble(exp, out_root=root / "ensembles", n_boot=200)
    html_path = write_report(exp, ensemble=ens, out=root / "report")
    board = pd.read_parquet(exp / "leaderboard.parquet")
    return SimpleNamespace(root=root, exp=exp, ens=ens, html=html_path, board=board)


# ------------------------------------------------------------------------------------ the page
@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_report_has_every_section_and_valid_images(search):
    text = search.html.read_text()
    page = parse(search.html)
    assert page.sections == SECTIONS, "every listed section, with its heading, in order"
    assert list(page.sections) == list(SECTIONS)
    assert "could not draw this section" not in text  # a bug in a section is caught, but fails here
    for src in page.images:
        path = search.html.parent / src
        assert "/" not in src and path.is_file(), src
        assert path.read_bytes()[:8] == PNG_SIGNATURE, src
        with Image.open(path) as img:
            img.verify()
    names = set(page.images)
    expected = {
        "learning_curves.png",
        "best_so_far.png",
        "roc.png",
        "body_parts.png",
        "ensemble.png",
    }
    assert expected <= names
    assert any(n.startswith("cam_") for n in names), "Grad-CAMs of test studies"
    importance = section_html(text, "importance")
    assert "importance.png" in importance or 'class="note"' in importance
    if "importance.png" in importance:
        assert any(n.startswith("param_") for n in names)
    assert not [u for u in page.links if "://" in u or u.startswith("//")], "no network references"
    routing = section_html(text, "routing")
    assert all(
        part in routing for part in json.loads((search.ens / "report.json").read_text())["routing"]
    )
    for paper in ("MURA paper model", "MURA best radiologist", "0.705", "0.778"):
        assert paper in section_html(text, "body-parts")


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_report_without_ensemble_notes_the_missing_sections(search, tmp_path, capsys):
    code = run_cli("report", "--experiment", search.exp, "--out", tmp_path / "r")
    out = capsys.readouterr().out
    assert code == 0 and out.strip().splitlines()[-1] == f"wrote {tmp_path / 'r' / 'report.html'}"
    text = (tmp_path / "r" / "report.html").read_text()
    assert parse(tmp_path / "r" / "report.html").sections == SECTIONS
    for key in ("ensemble", "routing"):
        assert "no ensemble given" in section_html(text, key) and "<img" not in section_html(
            text, key
        )
    assert "roc.png" in section_html(text, "roc") and "body_parts.png" in section_html(
        text, "body-parts"
    )
    assert "could not draw this section" not in text


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_report_default_out_and_missing_optuna_storage(search, tmp_path):
    exp = tmp_path / "x"
    shutil.copytree(search.exp, exp, ignore=shutil.ignore_patterns("optuna.db", "ray-*", "report"))
    path = write_report(exp)
    assert path == exp / "report" / "report.html"
    assert "no Optuna storage" in section_html(path.read_text(), "importance")


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_report_bad_paths_are_one_line_errors(search, tmp_path, capsys):
    for args, needle in (
        (("--experiment", tmp_path / "nope"), "nope"),
        (("--experiment", search.exp, "--ensemble", tmp_path / "noens"), "noens"),
    ):
        capsys.readouterr()
        code = run_cli("report", *args)
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            code == 2
            and len(err) == 1
            and err[0].startswith("mura-tune: error: ")
            and needle in err[0]
        ), err


# ------------------------------------------------------- importance on a hand-made study (no Ray)
def fake_experiment(root: Path, values: list[float], pruned: int = 0) -> Path:
    """An experiment folder with only a leaderboard and an Optuna study: other sections become notes."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    exp = root / "fake"
    exp.mkdir()
    study = optuna.create_study(
        study_name="fake:all", storage=f"sqlite:///{exp / 'optuna.db'}", direction="maximize"
    )
    dists = {
        "lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
        "depth": optuna.distributions.IntDistribution(2, 6),
        "batch_norm": optuna.distributions.CategoricalDistribution([True, False]),
    }
    rows = []
    for i, value in enumerate(values + [math.nan] * pruned):
        trial = study.ask(dists)
        if math.isnan(value):
            trial.report(0.1, 1)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            value, status = 0.1, "PRUNED"
        else:
            study.tell(trial, value)
            status = "COMPLETED"
        rows.append(
            {
                "trial_id": f"t{i}",
                "scope": "all",
                "status": status,
                "epochs": 1,
                METRIC: value,
                "predictions_path": None,
                "checkpoint_path": None,
                "trial_dir": str(exp / "trials" / f"t{i}"),
                **{f"hp_{k}": v for k, v in trial.params.items()},
            }
        )
    board = pd.DataFrame(rows).sort_values(METRIC, ascending=False)
    board.insert(0, "rank", range(1, len(board) + 1))
    board.to_parquet(exp / "leaderboard.parquet", index=False)
    (exp / "experiment.json").write_text(json.dumps({"name": "fake", "scopes": {"all": len(rows)}}))
    return exp


@pytest.mark.slow  # ~10 s: Optuna's fANOVA and matplotlib, no Ray
def test_importance_and_parameter_plots_on_a_varied_study(tmp_path):
    values = [0.1 * i for i in range(8)]
    path = write_report(fake_experiment(tmp_path, values, pruned=2), out=tmp_path / "r")
    text = path.read_text()
    importance = section_html(text, "importance")
    assert "importance.png" in importance and importance.count("param_") == 3
    page = parse(path)
    assert page.sections == SECTIONS and "could not draw this section" not in text
    for src in page.images:
        assert (path.parent / src).read_bytes()[:8] == PNG_SIGNATURE
    for key in ("learning-curves", "roc", "cam", "ensemble", "routing"):
        assert 'class="note"' in section_html(text, key), key


@pytest.mark.parametrize(
    ("values", "needle"),
    [([0.3], "importance needs at least 2"), ([0.3, 0.3, 0.3], "importance not available")],
)
def test_importance_with_too_few_or_identical_trials_is_a_note(tmp_path, values, needle):
    path = write_report(fake_experiment(tmp_path, values), out=tmp_path / "r")
    importance = section_html(path.read_text(), "importance")
    assert needle in importance and "<img" not in importance


# ------------------------------------------------------------------ Optuna study and TensorBoard
@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_optuna_study_matches_the_leaderboard(search):
    import optuna

    study = optuna.load_study(study_name="x:all", storage=f"sqlite:///{search.exp / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    board = search.board
    assert len(trials) == len(board)
    assert Counter(OPTUNA_TO_BOARD[t.state.name] for t in trials) == Counter(board["status"])
    params = {
        r.trial_id: json.loads((Path(r.trial_dir) / "trial.json").read_text())["params"]
        for r in board.itertuples()
    }
    for t in trials:
        (trial_id,) = [
            k
            for k, p in params.items()
            if p.keys() == t.params.keys() and all(p[n] == pytest.approx(t.params[n]) for n in p)
        ]
        row = board[board["trial_id"] == trial_id].iloc[0]
        assert OPTUNA_TO_BOARD[t.state.name] == row["status"]
        # Optuna hears, epoch by epoch, the val kappa of the checkpoint the trial keeps so far.
        curve = pd.read_parquet(Path(row["trial_dir"]) / "metrics.parquet")[KEPT_METRIC].tolist()
        if t.state.name in ("PRUNED", "COMPLETE"):
            steps = sorted(t.intermediate_values)
            assert steps == list(range(1, len(curve) + 1)), "one intermediate value per epoch"
            assert [t.intermediate_values[s] for s in steps] == pytest.approx(curve)
        if t.state.name == "COMPLETE":
            assert t.value == pytest.approx(curve[-1])
        if t.state.name == "PRUNED":
            assert len(curve) < 2, "pruned at ASHA's first rung"


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_tensorboard_scalars_of_every_trial(search):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for row in search.board.itertuples():
        files = sorted((search.exp / f"ray-{row.trial_id}").glob("events.out.tfevents*"))
        assert files, f"no TensorBoard events for trial {row.trial_id}"
        curve = pd.read_parquet(Path(row.trial_dir) / "metrics.parquet")
        for file in files:
            acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
            acc.Reload()
            tags = set(acc.Tags()["scalars"])
            if f"ray/tune/{METRIC}" in tags:
                break
        for name in (*TB_TAGS, EPOCH_METRIC):
            assert f"ray/tune/{name}" in tags, f"trial {row.trial_id}: no ray/tune/{name}"
            values = [e.value for e in acc.Scalars(f"ray/tune/{name}")]
            expected = curve[TB_COLUMN.get(name, name)].tolist()
            assert len(values) == len(expected)
            assert values == pytest.approx(expected, rel=1e-5, abs=1e-6, nan_ok=True)


# -------------------------------------------------------------------------- headless Chromium
@pytest.fixture(scope="module")
def chromium():
    """Path of Debian's chromium, installed with apt-get if missing (skips if it cannot be had)."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("headless browser test needs Debian's chromium; no apt-get here to install it")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
            if done.returncode != 0 and cmd[1] == "install":
                pytest.skip(
                    f"cannot install chromium with apt-get: {done.stderr.strip().splitlines()[-1:]}"
                )
    except (subprocess.TimeoutExpired, OSError) as exc:
        pytest.skip(f"cannot install chromium with apt-get within 5 minutes: {exc}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get finished but no chromium on PATH")
    return found


def browse(chromium: str, html: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
           *extra, html.resolve().as_uri()]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp)


def page_check(chromium: str, html: Path, tmp: Path) -> tuple[int, int, list[str]]:
    """(images that failed to load, script errors, console lines) after the page's load event."""
    done = browse(chromium, html, tmp, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    tag = re.search(r'<p id="self-check"[^>]*>', done.stdout)
    assert tag, "the page's self-check is missing from the DOM"
    missing = int(re.search(r'data-missing-images="(-?\d+)"', tag.group()).group(1))
    errors = int(re.search(r'data-errors="(\d+)"', tag.group()).group(1))
    assert missing >= 0, "the load event never ran"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return missing, errors, console


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_report_renders_in_headless_chromium(search, chromium, tmp_path):
    missing, errors, console = page_check(chromium, search.html, tmp_path)
    assert (missing, errors, console) == (0, 0, [])
    shot = tmp_path / "report.png"
    done = browse(
        chromium, search.html, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000"
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        gray = np.asarray(img.convert("L"), dtype=np.float32)
    assert gray.std() > 10 and (gray < 200).mean() > 0.02, "the screenshot is blank"


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_browser_check_catches_a_missing_image_and_console_output(search, chromium, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(search.html.parent, broken)
    (broken / "roc.png").unlink()
    page = broken / "report.html"
    page.write_text(
        page.read_text().replace(
            "</body>", '<script>console.error("oops"); undefined_fn();</script></body>'
        )
    )
    missing, errors, console = page_check(chromium, page, tmp_path)
    assert missing == 1 and errors >= 1
    assert any("oops" in line for line in console)
