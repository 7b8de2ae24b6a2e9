"""Bad input to ``mura-tune export``: one clear line, exit 2, no traceback, and no torch or Ray loaded.

The same rule as ``tests/test_bad_inputs.py`` (every case runs the real CLI as a subprocess);
the ensembles here are hand-written manifests, so nothing is trained.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cli

from mura_tune.ensemble import export
from mura_tune.errors import ConfigError


def manifest(root: Path, checkpoint: Path, **member) -> dict:
    return {
        "name": "e", "experiment": str(root / "exp"), "split_manifest": str(root / "exp" / "split.parquet"),
        "settings": {}, "routing": {}, "baselines": {},
        "ensembles": {"generalist": {"members": [
            {"trial_id": "t1", "checkpoint_path": str(checkpoint), "weight": 1.0, **member}]}},
    }  # fmt: skip


def ensemble(root: Path, name: str, content: dict | str) -> Path:
    folder = root / name
    folder.mkdir()
    text = content if isinstance(content, str) else json.dumps(content)
    (folder / "manifest.json").write_text(text)
    return folder


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_export")
    (root / "best.pt").write_bytes(b"")  # exists; never loaded (every case fails before)
    good = manifest(root, root / "best.pt")
    half = json.dumps(good)[:60]
    no_weight = manifest(root, root / "best.pt")
    del no_weight["ensembles"]["generalist"]["members"][0]["weight"]
    return {
        "tmp": root,
        "corrupt": ensemble(root, "corrupt", half),
        "not_a_manifest": ensemble(root, "not_a_manifest", {"name": "e"}),
        "gone": ensemble(root, "gone", manifest(root, root / "gone" / "best.pt")),
        "no_weight": ensemble(root, "no_weight", no_weight),
        "no_split": ensemble(root, "no_split", good),
    }


CASES = [
    ("missing ensemble", ["--ensemble", "{tmp}/nope"], ["no manifest.json in ensemble folder {tmp}/nope"]),
    ("corrupt manifest", ["--ensemble", "{corrupt}"], ["cannot read {corrupt}/manifest.json"]),
    ("not a manifest", ["--ensemble", "{not_a_manifest}"],
     ["{not_a_manifest}/manifest.json lacks", "not a manifest written by `mura-tune ensemble`"]),
    ("member checkpoint gone", ["--ensemble", "{gone}"],
     ["checkpoint of ensemble member t1 not found: {tmp}/gone/best.pt"]),
    ("member without a weight", ["--ensemble", "{no_weight}"],
     ["{no_weight}/manifest.json: malformed ensemble entry", "weight"]),
    ("unsupported format", ["--ensemble", "{no_split}", "--format", "tflite"],
     ["--format must be one of onnx, torchscript, got 'tflite'"]),
    ("no studies to check on", ["--ensemble", "{no_split}"],
     ["cannot check the export", "{tmp}/exp/split.parquet is gone", "--data"]),
    ("check data not found", ["--ensemble", "{no_split}", "--data", "{tmp}/nodata"],
     ["--data not found: {tmp}/nodata"]),
    ("--check-studies 0", ["--ensemble", "{no_split}", "--check-studies", "0"],
     ["--check-studies", "must be an integer >= 1, got 0"]),
]  # fmt: skip


def fill(text: str, w: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in w.items()})


#: Runs every case through the CLI's ``main`` in one fresh interpreter (one start-up, not nine):
#: each case's exit code and stderr, and the heavy modules loaded by the end.
RUN_ALL = (
    "import contextlib, io, json, sys\n"
    "from mura_tune.cli import main\n"
    "out = []\n"
    "for argv in json.loads(sys.argv[1]):\n"
    "    err = io.StringIO()\n"
    "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):\n"
    "        try:\n"
    "            code = main(argv)\n"
    "        except SystemExit as exc:  # argparse's own errors\n"
    "            code = exc.code\n"
    "    out.append({'code': code, 'stderr': err.getvalue()})\n"
    "heavy = ('torch', 'ray', 'timm', 'onnx', 'onnxruntime')\n"
    "print(json.dumps({'cases': out, 'heavy': sorted(m for m in heavy if m in sys.modules)}))\n"
)


@pytest.fixture(scope="module")
def ran(w) -> dict:
    argvs = [["export", *[fill(a, w) for a in argv]] for _, argv, _ in CASES]
    result = subprocess.run([sys.executable, "-c", RUN_ALL, json.dumps(argvs)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    return {"heavy": out["heavy"], **{case[0]: r for case, r in zip(CASES, out["cases"])}}


@pytest.mark.parametrize("name,phrases", [pytest.param(i, p, id=i) for i, _, p in CASES])
def test_bad_export_input_is_one_line(w, ran, name, phrases):
    code, stderr = ran[name]["code"], ran[name]["stderr"]
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("mura-tune: error: "), stderr
    for phrase in phrases:
        assert fill(phrase, w) in lines[0], lines[0]
    assert not list(w["tmp"].rglob("model.*"))  # nothing written


def test_export_error_paths_do_not_import_torch(ran):
    assert ran["heavy"] == []


def test_the_command_line_itself_says_the_same(w):
    """One case through the installed entry point, as a user runs it."""
    result = cli("export", "--ensemble", f"{w['tmp']}/nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"mura-tune: error: no manifest.json in ensemble folder {w['tmp']}/nope (build one with `mura-tune ensemble`)"
    )


def test_missing_extra_is_named(monkeypatch):
    real = export.importlib.util.find_spec
    monkeypatch.setattr(
        export.importlib.util, "find_spec", lambda n: None if n == "onnxruntime" else real(n)
    )
    with pytest.raises(
        ConfigError, match=r"--format onnx needs onnxruntime: pip install 'mura-tune\[export\]'"
    ):
        export.check_format("onnx")
    export.check_format("torchscript")  # needs nothing beyond torch
