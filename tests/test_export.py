"""``mura-tune export``: one ONNX (or TorchScript) model that reproduces ``predict``, and a sidecar
that lets code without mura-tune or torch build its input.

One module-scoped ensemble from two tiny real searches (about a minute on 2 cores): two
generalists at 32 px and a wrist specialist at 48 px trained with ``tta_flip``. Greedy selection
on tiny data is noise, so the test then fixes the manifest's weights and routing to ones that use
every path of the graph: the generalist ensemble weighs both generalists (2/3, 1/3), the wrist is
routed to its own ensemble (specialist 0.6 + one generalist 0.4), and the wrist has a fitted
threshold. Members thus come in two input sizes, with and without the flip.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from helpers import REPO
from PIL import Image

from mura_tune.data.images import letterbox, load_gray
from mura_tune.ensemble import export as export_module
from mura_tune.ensemble.export import export_ensemble, study_inputs
from mura_tune.errors import ExperimentError
from mura_tune.train.augment import to_unit

SEARCH_TIMEOUT = 600
WRIST = "XR_WRIST"
WRIST_THRESHOLD = 0.35


def cli_out(*args) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = run_cli(*args)
    assert code == 0, stdout.getvalue()
    return stdout.getvalue()


def route_wrist_to_specialist(ens: Path, generalists: pd.DataFrame, specialist: pd.Series) -> dict:
    """Fix the manifest's weights and routing (see the module docstring)."""
    manifest = json.loads((ens / "manifest.json").read_text())
    g0, g1 = generalists.iloc[0], generalists.iloc[1]

    def member(row, weight):
        return {"trial_id": row["trial_id"], "scope": row["scope"],
                "checkpoint_path": row["checkpoint_path"], "weight": weight}  # fmt: skip

    ensembles = manifest["ensembles"]
    ensembles["generalist"]["members"] = [member(g0, 2 / 3), member(g1, 1 / 3)]
    ensembles[WRIST] = {**ensembles.get(WRIST, {}), "used": True,
                        "members": [member(specialist, 0.6), member(g1, 0.4)]}  # fmt: skip
    manifest["routing"][WRIST]["served_by"] = "part"
    manifest["thresholds"] = {WRIST: WRIST_THRESHOLD}
    (ens / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


@pytest.fixture(scope="module")
def exported(ray_session, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    common = ["--space", "custom_cnn", "--data", tiny_data, "--max-epochs", 1,
              "--results", root / "results", "--cpus-per-trial", 1]  # fmt: skip
    cli_out(*common, "--num-samples", 2, "--name", "gen", "--set", "image_size=32")
    cli_out(*common, "--num-samples", 1, "--name", "wrist", "--body-part", WRIST,
            "--set", "image_size=48", "--set", "tta_flip=true")  # fmt: skip
    cli_out("ensemble", "--experiment", root / "results" / "gen", "--out-root", root / "ens")
    ens = root / "ens" / "gen"
    generalists = pd.read_parquet(root / "results" / "gen" / "leaderboard.parquet")
    specialist = pd.read_parquet(root / "results" / "wrist" / "leaderboard.parquet").iloc[0]
    manifest = route_wrist_to_specialist(ens, generalists, specialist)
    stdout = cli_out("export", "--ensemble", ens, "--format", "onnx")
    pred = root / "pred" / "p.csv"
    cli_out("predict", "--ensemble", ens, "--data", tiny_data, "--out", pred)
    return SimpleNamespace(
        root=root, ens=ens, manifest=manifest, model=ens / "model.onnx",
        sidecar=json.loads((ens / "model.onnx.json").read_text()), stdout=stdout,
        predicted=pd.read_parquet(pred.with_suffix(".parquet")).set_index("study_id"),
        split=pd.read_parquet(root / "results" / "gen" / "split.parquet"),
    )  # fmt: skip


# --------------------------------------------------------------- NumPy + Pillow, no mura-tune
#: Reads the sidecar, builds every study's inputs with NumPy and Pillow alone, runs the model in
#: ONNX Runtime; then says whether torch or mura_tune were imported.
REPRODUCE = r"""
import json, sys
import numpy as np
from PIL import Image

job = json.loads(open(sys.argv[1]).read())
side = json.loads(open(job["sidecar"]).read())
pre = side["preprocessing"]
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR}


def gray(path):
    with Image.open(path) as img:
        img.load()
        if img.mode == "L":
            return np.asarray(img, dtype=np.uint8)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(img, dtype=np.float64)
            top = a.max()
            return (a * (255.0 / top) if top > 0 else a).round().clip(0, 255).astype(np.uint8)
        if img.mode == "P":
            img = img.convert("RGBA")
        if img.mode in ("RGB", "RGBA"):
            luma = pre["luma"]
            a = np.asarray(img, dtype=np.uint32)
            w = luma["weights"]
            y = (a[..., 0] * w[0] + a[..., 1] * w[1] + a[..., 2] * w[2] + luma["offset"]) >> luma["shift"]
            return y.astype(np.uint8)
        return np.asarray(img.convert("L"), dtype=np.uint8)


def view(g, size):
    h, w = g.shape
    side_ = max(h, w)
    square = np.full((side_, side_), pre["letterbox"]["pad_value"], dtype=np.uint8)
    top, left = (side_ - h) // 2, (side_ - w) // 2
    square[top:top + h, left:left + w] = g
    if side_ != size:
        im = Image.fromarray(square).resize((size, size), RESAMPLE[pre["resize"]["method"]], reducing_gap=None)
        square = np.asarray(im, dtype=np.uint8)
    return square.astype(np.float32) / np.float32(pre["scale"]["divide_by"])


import onnxruntime
session = onnxruntime.InferenceSession(job["model"], providers=["CPUExecutionProvider"])
parts = side["body_parts"]
images_inputs = [i for i in side["inputs"] if i["name"] != "body_part"]
probs, arrays = {}, {}
for k, study in enumerate(job["studies"]):
    grays = [gray(p) for p in study["images"]]
    feed = {"body_part": np.array([parts.index(study["body_part"]) if study["body_part"] in parts
                                   else len(parts) - 1], dtype=np.int64)}
    for spec in images_inputs:
        feed[spec["name"]] = np.stack([view(g, spec["image_size"]) for g in grays])[:, None]
        arrays[f"{k}:{spec['name']}"] = feed[spec["name"]]
    probs[study["id"]] = float(session.run([side["output"]["name"]], feed)[0][0])
np.savez(job["arrays"], **arrays)
heavy = sorted(m for m in ("torch", "mura_tune", "timm") if m in sys.modules)
print(json.dumps({"probs": probs, "heavy": heavy}))
"""


def reproduce(exported, studies: list[dict], tmp_path: Path) -> tuple[dict, dict]:
    """Run :data:`REPRODUCE` in a fresh interpreter; returns (probabilities, input arrays)."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"sidecar": str(exported.ens / "model.onnx.json"), "studies": studies,
                               "model": str(exported.model), "arrays": str(tmp_path / "arrays.npz")}))  # fmt: skip
    result = subprocess.run([sys.executable, "-c", REPRODUCE, str(job)], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], f"the sidecar's preprocessing imported {out['heavy']}"
    return out["probs"], dict(np.load(tmp_path / "arrays.npz"))


def odd_images(root: Path) -> list[dict]:
    """Two studies of radiographs in every mode load_gray converts, in a plain folder (no MURA layout)."""
    rng = np.random.default_rng(0)
    wrist = root / WRIST / "patientA" / "study1"
    other = root / "misc" / "study2"
    for folder in (wrist, other):
        folder.mkdir(parents=True)
    rgba = rng.integers(0, 256, (90, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba[..., :3]).save(wrist / "image1.png")
    Image.fromarray(rgba).save(wrist / "image2.png")
    palette = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).quantize(16)
    palette.info["transparency"] = 0
    palette.save(wrist / "image3.png", transparency=0)
    Image.fromarray(rng.integers(0, 4000, (60, 40)).astype(np.uint16)).save(wrist / "image4.png")
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(other / "image1.png")
    Image.fromarray(rng.integers(0, 256, (33, 70), dtype=np.uint8)).convert("LA").save(
        other / "image2.png"
    )
    return [
        {"id": f"{WRIST}/patientA/study1", "body_part": WRIST,
         "images": sorted(str(p) for p in wrist.glob("*.png"))},
        {"id": "misc/study2", "body_part": "unknown", "images": sorted(str(p) for p in other.glob("*.png"))},
    ]  # fmt: skip


# ------------------------------------------------------------------------------------ tests
@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_onnx_reproduces_predict_on_every_test_study(exported, tmp_path):
    assert (
        "max |onnx - predict|" in exported.stdout and f"wrote {exported.model}" in exported.stdout
    )
    members = exported.sidecar["members"]
    assert len(members) == 3 and {m["image_size"] for m in members} == {32, 48}
    assert any(m["tta_flip"] for m in members) and not all(m["tta_flip"] for m in members)
    assert (
        exported.sidecar["routing"][WRIST] == WRIST
        and exported.sidecar["routing"]["XR_HAND"] == "generalist"
    )
    assert exported.sidecar["check"]["max_abs_diff"] <= 1e-4
    test = exported.split[exported.split["split"] == "test"]
    studies = [
        {"id": s, "body_part": g["body_part"].iloc[0], "images": g["image_path"].tolist()}
        for s, g in test.groupby("study_id")
    ]
    assert any(s["body_part"] == WRIST for s in studies)
    probs, _ = reproduce(exported, studies, tmp_path)
    expected = exported.predicted.loc[list(probs), "prob"].to_numpy()
    got = np.array(list(probs.values()))
    assert len(got) == test["study_id"].nunique()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    served = exported.predicted.loc[list(probs), "served_by"]
    assert (served == WRIST).any() and (served == "generalist").any()


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_sidecar_preprocessing_gives_mura_tunes_input_tensor(exported, tmp_path):
    """Every grayscale rule, both letterbox directions, resize and no resize (48 px at 48)."""
    studies = odd_images(tmp_path / "odd")
    probs, arrays = reproduce(exported, studies, tmp_path)
    sizes = [i["image_size"] for i in exported.sidecar["inputs"][1:]]
    for k, study in enumerate(studies):
        ours = study_inputs(study["images"], sizes)  # what export feeds the model
        for size, tensor in zip(sizes, ours):
            theirs = arrays[f"{k}:images_{size}"]
            assert theirs.dtype == np.float32 and theirs.shape == (
                len(study["images"]),
                1,
                size,
                size,
            )
            np.testing.assert_array_equal(theirs, tensor)
            training = to_unit(
                torch.from_numpy(np.stack([letterbox(load_gray(p), size) for p in study["images"]]))
            )
            np.testing.assert_array_equal(
                theirs, training.numpy()
            )  # what predict and training feed
    out = tmp_path / "odd.csv"
    cli_out("predict", "--ensemble", exported.ens, "--data", tmp_path / "odd", "--out", out)
    predicted = pd.read_parquet(out.with_suffix(".parquet")).set_index("study_id")
    assert predicted.loc[studies[0]["id"], "served_by"] == WRIST
    for study in studies:
        assert probs[study["id"]] == pytest.approx(predicted.loc[study["id"], "prob"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_routing_thresholds_and_metadata_are_in_the_model(exported):
    import onnx
    import onnxruntime

    model = onnx.load(str(exported.model))
    meta = {p.key: p.value for p in model.metadata_props}
    thresholds = json.loads(meta["mura_tune.thresholds"])
    parts = json.loads(meta["mura_tune.body_parts"])
    assert parts == exported.sidecar["body_parts"] and parts[-1] == "unknown"
    assert thresholds[WRIST] == WRIST_THRESHOLD
    assert {v for k, v in thresholds.items() if k != WRIST} == {0.5}
    assert json.loads(meta["mura_tune.preprocessing"]) == exported.sidecar["preprocessing"]
    session = onnxruntime.InferenceSession(str(exported.model), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["body_part", "images_32", "images_48"]
    assert [i.shape[1:] for i in session.get_inputs()[1:]] == [[1, 32, 32], [1, 48, 48]]
    rng = np.random.default_rng(0)
    feed = {"images_32": rng.random((3, 1, 32, 32), dtype=np.float32),
            "images_48": rng.random((3, 1, 48, 48), dtype=np.float32)}  # fmt: skip

    def run(part: int) -> float:
        return float(session.run(None, {**feed, "body_part": np.array([part])})[0][0])

    wrist, unknown = run(parts.index(WRIST)), run(len(parts) - 1)
    assert abs(wrist - unknown) > 1e-4  # the route is chosen inside the graph
    assert run(parts.index("XR_HAND")) == pytest.approx(unknown, abs=1e-7)
    assert run(99) == pytest.approx(unknown, abs=1e-7) and run(-1) == pytest.approx(
        unknown, abs=1e-7
    )
    one_view = float(session.run(None, {"body_part": np.array([0]), "images_32": feed["images_32"][:1],
                                        "images_48": feed["images_48"][:1]})[0][0])  # fmt: skip
    assert 0.0 < one_view < 1.0  # any number of views


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_torchscript_export_reproduces_predict(exported, tmp_path):
    out = tmp_path / "model.pt"
    stdout = cli_out("export", "--ensemble", exported.ens, "--format", "torchscript", "--out", out,
                     "--check-studies", 8)  # fmt: skip
    assert "max |torchscript - predict|" in stdout and out.is_file()
    sidecar = json.loads((tmp_path / "model.pt.json").read_text())
    assert sidecar["format"] == "torchscript" and sidecar["check"]["studies"] == 8
    module = torch.jit.load(str(out))
    study = exported.split[exported.split["body_part"] == WRIST].iloc[0]["study_id"]
    paths = exported.split.loc[exported.split["study_id"] == study, "image_path"].tolist()
    inputs = [torch.from_numpy(x) for x in study_inputs(paths, [32, 48])]
    with torch.inference_mode():
        got = float(module(torch.tensor([sidecar["body_parts"].index(WRIST)]), *inputs)[0])
    assert got == pytest.approx(exported.predicted.loc[study, "prob"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_a_model_that_does_not_reproduce_predict_is_not_written(exported, tmp_path, monkeypatch):
    """The check can fail: inputs prepared wrongly (mirrored views) differ from predict, and nothing is written."""

    def mirrored(paths, sizes):
        return [x[..., ::-1].copy() for x in study_inputs(paths, sizes)]

    monkeypatch.setattr(export_module, "study_inputs", mirrored)
    out = tmp_path / "bad.onnx"
    with pytest.raises(
        ExperimentError, match="export check failed: the onnx model differs from predict"
    ):
        export_ensemble(exported.ens, out=out, check_studies=6)
    assert not out.exists() and not (tmp_path / "bad.onnx.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left either


def test_only_export_imports_onnx_and_only_tracking_imports_mlflow():
    """The optional extras stay optional: nothing else in the package imports them."""
    allowed = {
        "onnx": {"ensemble/export.py"}, "onnxruntime": {"ensemble/export.py"}, "onnxscript": set(),
        "mlflow": {"search/tracking.py"},
    }  # fmt: skip
    found: dict[str, set[str]] = {name: set() for name in allowed}
    for path in (REPO / "mura_tune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root in found:
                    found[root].add(path.relative_to(REPO / "mura_tune").as_posix())
    for name, where in found.items():
        assert where <= allowed[name], f"{name} imported by {sorted(where - allowed[name])}"
