"""Bad input, command by command: one clear line, a non-zero exit, no traceback.

Every case runs the real CLI as a subprocess (``helpers.cli``), so the exit code and stderr are
what a user sees. The rule for a bad input (issue 7, item 6):

* exactly one stderr line, ``mura-tune: error: ...``, naming the problem and the file or flag;
* a non-zero exit (2 for our errors and for flags argparse rejects);
* no traceback, unless ``--debug`` is given.

Image problems are different, because one bad radiograph in 40,000 must not stop the work:

* ``data summary`` *reports* them (exit 0): zero-byte, truncated, non-PNG, missing and
  decompression-bomb images are problems, listed by path with the reason and counted;
  16-bit, RGBA and palette PNGs are valid and are read as 8-bit grayscale
  (:func:`mura_tune.data.images.load_gray`), so they are *notes*: listed by path with the
  conversion and counted, never silent, and never counted as problems.
* ``train`` *skips* unreadable images, prints the count and writes the list to
  ``<out>/skipped_images.parquet``; with ``--strict`` it stops with one line instead.

Trees are built with hard-linked placeholder PNGs (``helpers.make_tree``); nothing is synthesised.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import REPO, cli, make_tree
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------- builders
def _study(split: str, part: str, patient: int, positive: bool) -> str:
    return f"MURA-v1.1/{split}/{part}/patient{patient:05d}/study1_{'positive' if positive else 'negative'}"


def index_files(studies: list[tuple[str, str, int, bool]], views: int = 2) -> dict[str, str]:
    """The four index CSVs (official format, no header) for ``(split, part, patient, positive)`` studies."""
    files = {}
    for split in ("train", "valid"):
        mine = [s for s in studies if s[0] == split]
        files[f"{split}_image_paths.csv"] = "".join(
            f"{_study(*s)}/image{v}.png\n" for s in mine for v in range(1, views + 1)
        )
        files[f"{split}_labeled_studies.csv"] = "".join(
            f"{_study(*s)}/,{int(s[3])}\n" for s in mine
        )
    return files


# 12 train patients (3 per part x label stratum) and 4 valid: train, val and test all non-empty.
STUDIES = [
    ("train", part, 10 * k + i, i % 2 == 0)
    for k, part in enumerate(("XR_HAND", "XR_WRIST"), 1)
    for i in range(6)
] + [("valid", part, 90 + i, i % 2 == 0) for part in ("XR_HAND", "XR_WRIST") for i in range(2)]
FIRST = f"{_study(*STUDIES[0])}/image1.png"  # a train image (patient 10)
SECOND = f"{_study(*STUDIES[1])}/image1.png"  # another train study (patient 11)


def replace(path: Path, data: bytes) -> None:
    """Overwrite one image of a ``make_tree`` tree (its files are hard links: unlink first)."""
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def fabricate_failed_experiment(exp: Path) -> Path:
    """An experiment folder whose only trial errored: trial.json + error.json, nothing else."""
    trial = exp / "trials" / "t0001"
    trial.mkdir(parents=True)
    (trial / "trial.json").write_text(
        json.dumps(
            {
                "trial_id": "t0001",
                "experiment": exp.name,
                "space": "custom_cnn",
                "scope": "all",
                "params": {"lr": 0.001},
                "node_id": "node",
                "weights_source": "none",
            }
        )
    )
    (trial / "error.json").write_text(json.dumps({"reason": "RuntimeError: injected", "time": 0.0}))
    return exp


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    """Every folder and file the cases need, built once (well under a second)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    paths: dict[str, Path] = {"tmp": root}
    paths["good"] = make_tree(root / "good", files=index_files(STUDIES))
    # A folder of radiographs that is not a MURA release.
    plain = root / "plain" / "XR_HAND" / "study1"
    plain.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(plain / "image1.png")
    paths["plain"] = root / "plain"
    (root / "no_csvs" / "MURA-v1.1").mkdir(parents=True)
    paths["no_csvs"] = root / "no_csvs"
    files = index_files(STUDIES[:2])
    paths["half_index"] = make_tree(
        root / "half_index", files={"train_image_paths.csv": files["train_image_paths.csv"]}
    )
    lines = files["train_image_paths.csv"].splitlines()
    paths["malformed"] = make_tree(
        root / "malformed",
        files={
            **files,
            "train_image_paths.csv": f"{lines[0]}\nMURA-v1.1/train/XR_KNEE/patient00001/study1_positive/image1.png\n",
        },
    )
    contradicting = files["train_labeled_studies.csv"].replace("_positive/,1", "_positive/,0")
    paths["contradicting"] = make_tree(
        root / "contradicting", files={**files, "train_labeled_studies.csv": contradicting}
    )
    paths["dup_image"] = make_tree(
        root / "dup_image", files={**files, "train_image_paths.csv": f"{lines[0]}\n{lines[0]}\n"}
    )
    studies_lines = files["train_labeled_studies.csv"].splitlines()
    paths["dup_study"] = make_tree(
        root / "dup_study",
        files={
            **files,
            "train_labeled_studies.csv": "\n".join([studies_lines[0], *studies_lines]) + "\n",
        },
    )
    manifest = root / "manifest.csv"
    pd.DataFrame({"image_path": ["a.png"], "study_id": ["s1"], "label": [1]}).to_csv(
        manifest, index=False
    )
    paths["manifest_no_columns"] = manifest
    # Configs, split files, predictions, experiments, ensembles.
    (root / "not_parquet.parquet").write_text("this is not parquet\n")
    paths["not_parquet"] = root / "not_parquet.parquet"
    valid_study = next(s for s in STUDIES if s[0] == "valid")
    paths["foreign_predictions"] = root / "foreign.csv"
    paths["foreign_predictions"].write_text(
        f"{_study(*valid_study)}/,0.7\nMURA-v1.1/valid/XR_HAND/patient99999/study1_positive/,0.4\n"
    )
    paths["failed_exp"] = fabricate_failed_experiment(root / "results" / "failed")
    (root / "ensemble_without_manifest").mkdir()
    paths["ensemble_without_manifest"] = root / "ensemble_without_manifest"
    (root / "best.pt").write_bytes(b"")  # never loaded: the missing image is found first
    paths["some_checkpoint"] = root / "best.pt"
    (root / "folder.parquet").mkdir()
    paths["folder_parquet"] = root / "folder.parquet"
    paths["one_empty_png"] = make_tree(root / "one_empty_png", files=index_files(STUDIES))
    replace(paths["one_empty_png"] / FIRST, b"")
    return paths


# ----------------------------------------------------------------------------------- the catalogue
# (id, argv with {name} placeholders for paths in ``w``, phrases the one line must contain[, pytest marks])
CASES = [
    # --- data: folders, layout, index CSVs, manifests
    (
        "missing data",
        ["data", "summary", "--data", "{tmp}/nope"],
        ["data folder not found", "{tmp}/nope"],
    ),
    (
        "missing data (train)",
        ["train", "--data", "{tmp}/nope", "--out", "{tmp}/run"],
        ["data folder not found", "{tmp}/nope"],
    ),
    (
        "wrong layout",
        ["data", "summary", "--data", "{plain}"],
        ["no MURA-v1.1 release in", "{plain}"],
    ),
    (
        "no index CSVs",
        ["data", "split", "--data", "{no_csvs}", "--out", "{tmp}/s.parquet"],
        ["no index CSVs", "{no_csvs}/MURA-v1.1"],
    ),
    (
        "half an index",
        ["data", "split", "--data", "{half_index}", "--out", "{tmp}/s.parquet"],
        ["missing index file", "{half_index}/MURA-v1.1/train_labeled_studies.csv"],
    ),
    (
        "malformed CSV line",
        ["data", "split", "--data", "{malformed}", "--out", "{tmp}/s.parquet"],
        ["{malformed}/MURA-v1.1/train_image_paths.csv:2:", "path does not match", "XR_KNEE"],
    ),
    (
        "malformed CSV line (train)",
        ["train", "--data", "{malformed}", "--out", "{tmp}/run"],
        ["{malformed}/MURA-v1.1/train_image_paths.csv:2:", "path does not match"],
    ),
    (
        "label contradicts path",
        ["data", "split", "--data", "{contradicting}", "--out", "{tmp}/s.parquet"],
        [
            "{contradicting}/MURA-v1.1/train_labeled_studies.csv:1:",
            "label 0 contradicts 'positive'",
        ],
    ),
    (
        "duplicate image",
        ["data", "split", "--data", "{dup_image}", "--out", "{tmp}/s.parquet"],
        ["{dup_image}/MURA-v1.1/train_image_paths.csv:2:", "image listed twice"],
    ),
    (
        "duplicate study",
        ["data", "split", "--data", "{dup_study}", "--out", "{tmp}/s.parquet"],
        ["{dup_study}/MURA-v1.1/train_labeled_studies.csv:2:", "study listed twice"],
    ),
    (
        "manifest without columns",
        ["data", "summary", "--data", "{manifest_no_columns}"],
        ["{manifest_no_columns}", "lacks columns"],
    ),
    # --- flags and config
    (
        "unknown space",
        ["search", "--space", "nope", "--data", "{good}"],
        ["unknown --space 'nope'", "custom_cnn"],
    ),
    (
        "unknown space (shorthand)",
        ["--space", "custom_cn", "--data", "{good}"],
        ["unknown --space", "did you mean 'custom_cnn'"],
    ),
    (
        "unknown backbone",
        ["train", "--data", "{good}", "--out", "{tmp}/run", "--set", "model=densenet12"],
        ["--set", "model must be one of", "'densenet12'", "did you mean 'densenet121'"],
    ),
    (
        "--num-samples 0",
        ["--space", "custom_cnn", "--num-samples", "0"],
        ["--num-samples", "must be an integer >= 1, got 0"],
    ),
    (
        "--max-epochs x",
        ["search", "--space", "custom_cnn", "--max-epochs", "x"],
        ["--max-epochs", "must be an integer >= 1, got 'x'"],
    ),
    (
        "--set dropout=2",
        ["train", "--data", "{good}", "--out", "{tmp}/run", "--set", "dropout=2"],
        ["--set", "dropout must be in [0, 1), got 2"],
    ),
    (
        "--set lr=abc",
        ["train", "--data", "{good}", "--out", "{tmp}/run", "--set", "lr=abc"],
        ["--set", "lr must be a number, got 'abc'"],
    ),
    (
        "--set head_widths=5",
        ["train", "--data", "{good}", "--out", "{tmp}/run", "--set", "head_widths=5"],
        ["--set", "head_widths must be a list of integers, got 5"],
    ),
    (
        "--set unknown key",
        ["train", "--data", "{good}", "--out", "{tmp}/run", "--set", "learning_rate=0.1"],
        ["--set", "unknown key 'learning_rate'"],
    ),
    (
        "malformed --set",
        ["train", "--data", "{good}", "--out", "{tmp}/run", "--set", "foo"],
        ["--set expects key=value, got 'foo'"],
    ),
    (
        "--config missing",
        ["train", "--data", "{good}", "--config", "{tmp}/missing.yaml"],
        ["--config", "{tmp}/missing.yaml", "file not found"],
    ),
    (
        "--split missing",
        ["train", "--split", "{tmp}/missing.parquet", "--out", "{tmp}/run"],
        ["split manifest not found", "{tmp}/missing.parquet"],
    ),
    (
        "--split not Parquet",
        ["train", "--split", "{not_parquet}", "--out", "{tmp}/run"],
        ["cannot read split manifest", "{not_parquet}"],
    ),
    (
        "--from-trial missing",
        ["train", "--from-trial", "{tmp}/nope"],
        ["--from-trial", "{tmp}/nope", "no config.yaml"],
    ),
    (
        "data synth --scale 0",
        ["data", "synth", "--out", "{tmp}/synth", "--scale", "0"],
        ["--scale", "must be a number in (0, 1], got 0"],
    ),
    (
        "data split --val-fraction 1.5",
        ["data", "split", "--data", "{good}", "--val-fraction", "1.5", "--out", "{tmp}/s.parquet"],
        ["--val-fraction", "must be a number in (0, 1), got 1.5"],
    ),
    (
        "data split --out not parquet",
        ["data", "split", "--data", "{good}", "--out", "{tmp}/s.csv"],
        ["--out must be a .parquet file", "{tmp}/s.csv"],
    ),
    (
        "data cache --size 4",
        ["data", "cache", "--data", "{good}", "--size", "4"],
        ["--size must be in [8, 2048], got 4"],
    ),
    ("unknown command", ["trian"], ["invalid choice: 'trian'"]),
    (
        "--out is a folder",
        ["data", "split", "--data", "{good}", "--out", "{folder_parquet}"],
        ["Is a directory", "{folder_parquet}"],
    ),
    # --- experiments, ensembles, predictions
    (
        "--resume unknown experiment",
        ["--space", "custom_cnn", "--results", "{tmp}/results", "--name", "nope", "--resume"],
        ["--resume", "no experiment 'nope'", "{tmp}/results"],
    ),
    (
        "--resume without --name",
        ["--space", "custom_cnn", "--results", "{tmp}/results", "--resume"],
        ["--resume needs --name"],
    ),
    (
        "leaderboard of a missing experiment",
        ["leaderboard", "--experiment", "{tmp}/results/nope"],
        ["experiment folder not found", "{tmp}/results/nope"],
    ),
    (
        "report of a missing experiment",
        ["report", "--experiment", "{tmp}/results/nope"],
        ["--experiment", "{tmp}/results/nope", "not found"],
    ),
    (
        "ensemble of a missing experiment",
        ["ensemble", "--experiment", "{tmp}/results/nope", "--out-root", "{tmp}/ens"],
        ["experiment folder not found", "{tmp}/results/nope"],
    ),
    (
        "ensemble without finished trials",
        ["ensemble", "--experiment", "{failed_exp}", "--out-root", "{tmp}/ens"],
        ["no finished generalist trial", "{failed_exp}", "t0001 status ERROR", "injected"],
    ),
    (
        "evaluate: studies not in the dataset",
        ["evaluate", "--data", "{good}", "--predictions", "{foreign_predictions}"],
        ["not in the test split", "patient99999", "{foreign_predictions}"],
    ),
    (
        "evaluate: missing predictions",
        ["evaluate", "--data", "{good}", "--predictions", "{tmp}/nope.csv"],
        ["predictions file not found", "{tmp}/nope.csv"],
    ),
    (
        "predict: ensemble without manifest",
        [
            "predict",
            "--ensemble",
            "{ensemble_without_manifest}",
            "--data",
            "{good}",
            "--out",
            "{tmp}/p.csv",
        ],
        ["no manifest.json", "{ensemble_without_manifest}"],
    ),
    (
        "cam: missing image",
        ["cam", "--checkpoint", "{some_checkpoint}", "--image", "{tmp}/nope.png"],
        ["--image", "{tmp}/nope.png", "file not found"],
    ),
    (
        "cam: missing checkpoint",
        ["cam", "--checkpoint", "{tmp}/nope.pt", "--image", "{good}/" + FIRST],
        ["--checkpoint", "{tmp}/nope.pt", "file not found"],
    ),
    # --- image problems under --strict (without it they are skipped and listed; see below)
    (
        "search --strict with an unreadable image",
        [
            "--space",
            "custom_cnn",
            "--data",
            "{one_empty_png}",
            "--results",
            "{tmp}/results",
            "--name",
            "strict",
            "--strict",
            "--num-samples",
            "1",
            "--set",
            "image_size=32",
        ],
        ["1 unreadable image(s)", "{one_empty_png}/" + FIRST, "empty file (0 bytes)", "--strict"],
    ),
]


def fill(text: str, w: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in w.items()})


def assert_one_line_error(result: subprocess.CompletedProcess, phrases: list[str]) -> str:
    """Non-zero exit; exactly one stderr line, ``mura-tune: error: ...`` with every phrase; no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"exit 0 for a bad input\nstdout: {result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("mura-tune: error: "), line
    for phrase in phrases:
        assert phrase in line, f"{phrase!r} not in {line!r}"
    return line


@pytest.fixture(scope="module")
def outcomes(w, request) -> dict[str, subprocess.CompletedProcess]:
    """Run the selected cases' subprocesses a few at a time (each is mostly interpreter start-up)."""
    selected = {
        item.callspec.id
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_bad_input_gives_one_line"
    }
    todo = [(case[0], case[1]) for case in CASES if case[0] in selected]
    with ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 1) + 1)) as pool:
        results = pool.map(lambda case: cli(*[fill(a, w) for a in case[1]], timeout=120), todo)
        return {case_id: result for (case_id, _), result in zip(todo, results)}


# The first case's setup runs every selected case (seconds when idle; minutes on a busy machine).
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "case_id, phrases", [pytest.param(c[0], c[2], id=c[0], marks=c[3:]) for c in CASES]
)
def test_bad_input_gives_one_line(w, outcomes, case_id, phrases):
    result = outcomes[case_id]
    assert_one_line_error(result, [fill(p, w) for p in phrases])
    assert result.returncode == 2


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["data", "summary", "--data", "{tmp}/nope"], id="missing data"),
        pytest.param(
            ["train", "--data", "{good}", "--set", "model=densenet12"], id="unknown backbone"
        ),
    ],
)
def test_debug_shows_the_traceback(w, argv):
    result = cli("--debug", *[fill(a, w) for a in argv])
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "mura_tune.errors" in result.stderr  # the same error, with its stack


def test_error_paths_do_not_import_torch(w):
    """A typo must fail in about a second: no torch (or Ray) on the help and early error paths."""
    argvs = [
        ["data", "summary", "--data", f"{w['tmp']}/nope"],
        ["train", "--data", str(w["good"]), "--set", "model=densenet12"],
        ["train", "--data", str(w["good"]), "--config", f"{w['tmp']}/missing.yaml"],
        [
            "predict",
            "--ensemble",
            str(w["ensemble_without_manifest"]),
            "--data",
            str(w["good"]),
            "--out",
            f"{w['tmp']}/p.csv",
        ],
        ["--space", "nope"],
        ["cam", "--checkpoint", f"{w['tmp']}/nope.pt", "--image", f"{w['tmp']}/nope.png"],
        ["--space", "custom_cnn", "--results", f"{w['tmp']}/results", "--name", "nope", "--resume"],
    ]
    code = (
        "import contextlib, io, json, sys\n"
        "from mura_tune.cli import main\n"
        "codes = []\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    for argv in json.loads(sys.argv[1]):\n"
        "        codes.append(main(argv))\n"
        "print(json.dumps({'codes': codes, 'heavy': sorted(m for m in ('torch', 'ray', 'timm') if m in sys.modules)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(argvs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["codes"] == [2] * len(argvs)
    assert out["heavy"] == [], f"error paths imported {out['heavy']}"
    help_ = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from mura_tune.cli import build_parser; build_parser();"
            "print(sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert help_.stdout.strip() == "[]", help_.stdout + help_.stderr


# ----------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tree with one image of each kind; returns (root, {kind: image path relative to root})."""
    root = make_tree(tmp_path_factory.mktemp("images"), files=index_files(STUDIES))
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    kinds = {
        "zero-byte": b"",
        "truncated": png_bytes(Image.fromarray(gray))[:40],
        "not a PNG": b"\xff\xd8\xff\xe0" + b"\0" * 64,  # a JPEG's first bytes, named .png
        "bomb": bomb_png(),
        "16-bit": png_bytes(Image.fromarray(gray.astype(np.uint16) * 256)),
        "rgba": png_bytes(Image.fromarray(gray).convert("RGBA")),
        "palette": png_bytes(Image.fromarray(gray).convert("P")),
    }
    train_images = [line for line in index_files(STUDIES)["train_image_paths.csv"].splitlines()]
    where = {}
    for (kind, data), rel in zip(kinds.items(), train_images):
        replace(root / rel, data)
        where[kind] = rel
    where["missing"] = train_images[len(kinds)]
    (root / where["missing"]).unlink()
    return root, where


def test_summary_reports_bad_images_and_notes_conversions(image_tree):
    root, where = image_tree
    result = cli("data", "summary", "--data", root, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""  # no progress bar when stderr is not a terminal
    summary = json.loads(result.stdout)
    problems = {p["path"]: (p["kind"], p["detail"]) for p in summary["problems"]["shown"]}
    expected = {
        "zero-byte": ("unreadable", "empty file (0 bytes)"),
        "truncated": ("unreadable", "cannot decode"),
        "not a PNG": ("unreadable", "not a PNG file"),
        "bomb": ("unreadable", "50000x50000 exceeds the 40,000,000-pixel limit"),
        "missing": ("missing", "file not found"),
    }
    for kind, (problem, detail) in expected.items():
        got = problems[str(root / where[kind])]
        assert got[0] == problem and got[1].startswith(detail), (kind, got)
    assert summary["problems"]["count"] == len(expected) == len(problems)
    assert summary["problems"]["by_kind"] == {"unreadable": 4, "missing": 1}
    # Valid PNGs in unusual modes are read as 8-bit grayscale: notes, not problems.
    notes = {n["path"]: n["detail"] for n in summary["notes"]["shown"]}
    assert notes[str(root / where["16-bit"])].startswith("16-bit: rescaled to 8 bits")
    assert notes[str(root / where["rgba"])].startswith("alpha channel: RGBA, alpha dropped")
    assert notes[str(root / where["palette"])].startswith("palette: converted to 8-bit grayscale")
    assert summary["notes"]["count"] == 3 and summary["notes"]["by_kind"] == {
        "16-bit": 1,
        "alpha channel": 1,
        "palette": 1,
    }
    # The same, for people: counts first, then each file by path with its reason.
    text = cli("data", "summary", "--data", root)
    assert text.returncode == 0, text.stderr
    assert "problems: 5 (missing 1, unreadable 4)" in text.stdout
    assert "notes: 3 usable image(s) converted to 8-bit grayscale" in text.stdout
    for rel in where.values():
        assert str(root / rel) in text.stdout, rel


@pytest.fixture(scope="module")
def broken_tree(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The good tree with a zero-byte and a truncated PNG among the train images."""
    root = make_tree(tmp_path_factory.mktemp("broken"), files=index_files(STUDIES))
    good = png_bytes(Image.fromarray(np.full((8, 6), 128, dtype=np.uint8)))
    bad = [root / FIRST, root / SECOND]
    replace(bad[0], b"")
    replace(bad[1], good[: len(good) // 2])
    return root, bad


TINY_TRAIN = [
    "--set",
    "image_size=32",
    "--set",
    "max_epochs=1",
    "--set",
    "depth=2",
    "--set",
    "batch_size=8",
]


@pytest.mark.slow  # two real training runs (torch start-up dominates: ~15 s on 2 idle cores)
def test_train_skips_unreadable_images_and_lists_them(broken_tree, tmp_path):
    root, bad = broken_tree
    out = tmp_path / "run"
    result = cli("train", "--data", root, "--out", out, *TINY_TRAIN)
    assert result.returncode == 0, result.stderr
    assert (
        f"skipped 2 unreadable image(s); list in {out / 'skipped_images.parquet'}" in result.stdout
    )
    skipped = pd.read_parquet(out / "skipped_images.parquet")
    reasons = dict(zip(skipped["image_path"], skipped["reason"]))
    assert set(reasons) == {str(p) for p in bad}
    assert reasons[str(bad[0])] == "empty file (0 bytes)" and reasons[str(bad[1])].startswith(
        "cannot decode"
    )
    assert json.loads((out / "summary.json").read_text())["skipped_images"] == 2
    assert "Traceback" not in result.stderr

    strict = cli("train", "--data", root, "--out", tmp_path / "strict", "--strict", *TINY_TRAIN)
    line = assert_one_line_error(strict, ["2 unreadable image(s)", "--strict"])
    assert strict.returncode == 2
    assert str(bad[0]) in line or str(bad[1]) in line
    assert not (tmp_path / "strict" / "best.pt").exists()
