"""``ensemble``, ``evaluate`` and ``predict`` end to end on one tiny real search, plus per-part routing.

The end-to-end tests share one module-scoped search (3 trials x 2 epochs, custom_cnn at 32 px,
about a minute on 2 cores) and one ensemble built from it by the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from ensemble_fixtures import make_experiment

from mura_tune.data.mura import read_dataset
from mura_tune.ensemble import build as ensemble_build
from mura_tune.ensemble.candidates import drop_incomplete, read_candidates
from mura_tune.ensemble.candidates import load_study_probs as load_split
from mura_tune.ensemble.greedy import score
from mura_tune.layout import GENERALIST_SCOPE as GENERALIST

SEARCH_TIMEOUT = 600  # the first end-to-end test pays for the search


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def one_line_error(capsys, code: int, needle: str) -> str:
    """Assert a user error: exit 2, one ``mura-tune: error:`` line naming ``needle``, no traceback."""
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("mura-tune: error: "), err
    assert needle in lines[0] and "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------- per-part routing (no training)
@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    fx = make_experiment(tmp_path_factory.mktemp("routing"))
    candidates, _ = read_candidates(fx.exp)
    candidates, val, _ = drop_incomplete(candidates, load_split(candidates, "val"))
    return fx, candidates, val


def _select(fake, margin: float, specialists: bool = True):
    _, candidates, val = fake
    kw = {"max_size": 10, "metric": "kappa", "seed": 0, "prune_top": None}
    return ensemble_build.select(val, candidates, specialists=specialists, margin=margin, **kw)


@pytest.mark.parametrize("margin", [0.0, 10.0])
def test_part_without_specialists_runs_its_own_selection(fake, margin):
    _, candidates, val = fake
    sel = _select(fake, margin)
    assert set(sel.parts) == set(val.body_parts)  # every part ran its own selection
    elbow = sel.routing["XR_ELBOW"]  # the fixture has no elbow specialist
    part_ens, rows = sel.parts["XR_ELBOW"]
    assert elbow["n_specialists"] == 0
    assert [candidates[i].scope for i in rows] == [GENERALIST] * len(rows)
    assert elbow["generalist_val_score"] is not None
    assert elbow["part_val_score"] == part_ens.score_
    cols = val.body_parts == "XR_ELBOW"
    assert part_ens.score_ == pytest.approx(
        score(val.labels[cols], part_ens.predict_proba(val.probs[rows][:, cols]))
    )
    assert elbow["gain"] == pytest.approx(elbow["part_val_score"] - elbow["generalist_val_score"])
    assert "no specialist trials for this part" in elbow["reason"]
    # The fixture's elbow gains ~0.1 from weights fitted on its 40 studies alone: a gain that
    # beat the old fixed margin of 0.02, but whose paired interval reaches 0 (noise).
    assert elbow["gain"] > 0.02 and elbow["gain_ci"][0] <= 0 <= elbow["gain_ci"][1]
    assert elbow["served_by"] == "generalist" and "interval reaches 0" in elbow["reason"]
    wrist_rows = sel.parts["XR_WRIST"][1]
    assert {candidates[i].scope for i in wrist_rows} == {GENERALIST, "XR_WRIST"}


def test_no_specialists_flag_serves_every_part_with_the_generalist(fake):
    sel = _select(fake, 0.0, specialists=False)
    assert sel.parts == {}
    assert {r["served_by"] for r in sel.routing.values()} == {"generalist"}
    assert {r["reason"] for r in sel.routing.values()} == {"specialists disabled"}


def test_manifest_records_unused_part_ensembles(fake, tmp_path):
    fx = fake[0]
    out = ensemble_build.build_ensemble(fx.exp, out_root=tmp_path, n_boot=20, margin=10.0)
    manifest = read_json(out / "manifest.json")
    assert set(manifest["ensembles"]) == {"generalist", "XR_ELBOW", "XR_HAND", "XR_WRIST"}
    for part, routing in manifest["routing"].items():
        assert routing["served_by"] == "generalist" and manifest["ensembles"][part]["used"] is False
        assert routing["part_val_score"] is not None and routing["reason"]


# ----------------------------------------------------------- end to end on a real tiny search
@pytest.fixture(scope="module")
def search(ray_session, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble_cli")
    args = ["--space", "custom_cnn", "--data", tiny_data, "--num-samples", 3, "--max-epochs", 2]
    args += ["--results", root / "results", "--name", "x", "--cpus-per-trial", 1]
    assert run_cli(*args, "--set", "image_size=32") == 0
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = run_cli(
            "ensemble", "--experiment", root / "results" / "x", "--out-root", root / "ens"
        )
    assert code == 0, stdout.getvalue()
    return SimpleNamespace(
        root=root,
        exp=root / "results" / "x",
        ens=root / "ens" / "x",
        stdout=stdout.getvalue(),
        stderr=stderr.getvalue(),
    )


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_ensemble_command_writes_outputs_and_prints_table(search):
    for name in ("manifest.json", "predictions.parquet", "report.json", "methods.parquet"):
        assert (search.ens / name).is_file()
        assert f"wrote {search.ens / name}" in search.stdout
    head = search.stdout.split("\n\n")[0]
    assert "selected on val" in head and "held-out test" in head
    for column in ("ensemble test [95% CI]", "best single test [95% CI]", "MURA recipe test"):
        assert column in head
    manifest = read_json(search.ens / "manifest.json")
    assert manifest["split_manifest"] == str(search.exp / "split.parquet")
    members = manifest["ensembles"]["generalist"]["members"]
    assert members and sum(m["weight"] for m in members) == pytest.approx(1.0)
    assert all(Path(m["checkpoint_path"]).is_file() for m in members)
    preds = pd.read_parquet(search.ens / "predictions.parquet")
    assert set(manifest["routing"]) == set(preds.loc[preds["split"] == "val", "body_part"])
    # The tiny val set's parts are too small to choose on.
    for routing in manifest["routing"].values():
        assert routing["part_val_score"] is not None or "too few" in routing["reason"]
    assert "mura-tune: too few val studies to choose on for" in search.stderr


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
@pytest.mark.parametrize("split", ["test", "val"])
def test_evaluate_reproduces_report(search, capsys, split):
    capsys.readouterr()
    code = run_cli(
        "evaluate", "--data", search.exp / "split.parquet",
        "--predictions", search.ens / "predictions.parquet", "--split", split, "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    expected = read_json(search.ens / "report.json")["models"]["ensemble"][split]
    assert result["split"] == split and result["format"] == "study"
    for key in ("n_studies", "overall", "parts"):
        assert result[key] == expected[key]


@pytest.fixture(scope="module")
def predicted(search, tiny_data):
    out = search.root / "pred" / "p.csv"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = run_cli("predict", "--ensemble", search.ens, "--data", tiny_data, "--out", out)
    assert code == 0, stdout.getvalue()
    return out, stdout.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_predict_reproduces_ensemble_predictions(search, predicted, tiny_data):
    out, stdout = predicted
    for path in (out, out.with_suffix(".parquet"), out.with_name("p.images.parquet")):
        assert f"wrote {path}" in stdout
    assert not out.with_name("p.skipped.csv").exists()
    table = read_dataset(tiny_data).table
    lines = out.read_text().splitlines()
    assert len(lines) == table["study_id"].nunique()  # every study of both source splits
    csv = pd.DataFrame([line.rsplit(",", 1) for line in lines], columns=["study", "prob"])
    assert (
        csv["study"]
        .str.match(r"^MURA-v1\.1/(train|valid)/XR_[A-Z]+/patient\d+/study\d+_\w+/$")
        .all()
    )
    csv = pd.DataFrame(
        {"study_id": csv["study"].str.rstrip("/"), "prob": csv["prob"].astype(float)}
    )
    studies = pd.read_parquet(out.with_suffix(".parquet"))
    assert list(studies.columns)[:5] == ["study_id", "body_part", "label", "prob", "n_images"]
    np.testing.assert_array_equal(
        studies["prob"], csv.set_index("study_id").loc[studies["study_id"], "prob"]
    )
    n_images = table.groupby("study_id").size()
    np.testing.assert_array_equal(studies["n_images"], n_images.loc[studies["study_id"]])

    ens = pd.read_parquet(search.ens / "predictions.parquet")  # val and test studies
    merged = ens.merge(studies, on="study_id", suffixes=("", "_new"), validate="1:1")
    assert len(merged) == len(ens) and set(merged["split"]) == {"val", "test"}
    np.testing.assert_allclose(merged["prob_new"], merged["prob"], rtol=0, atol=1e-5)
    assert (merged["label_new"].astype(int) == merged["label"]).all()
    routing = read_json(search.ens / "manifest.json")["routing"]
    served = merged["body_part"].map(
        lambda p: p if routing[p]["served_by"] == "part" else "generalist"
    )
    assert (merged["served_by"] == served).all()


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_predict_on_plain_study_folders(search, tiny_data, tmp_path, capsys):
    ens = pd.read_parquet(search.ens / "predictions.parquet").query("split == 'test'")
    first = ens.iloc[0]
    plain = tmp_path / "plain"
    shutil.copytree(
        tiny_data / first["study_id"], plain / first["body_part"] / "patientA" / "study1"
    )
    other = ens[ens["study_id"] != first["study_id"]].iloc[0]["study_id"]
    shutil.copytree(tiny_data / other, plain / "misc" / "studyB")
    (plain / "misc" / "studyB" / "image99.png").write_bytes(b"")  # unreadable: skipped, listed
    capsys.readouterr()
    out = tmp_path / "plain.csv"
    assert run_cli("predict", "--ensemble", search.ens, "--data", plain, "--out", out) == 0
    assert "skipped 1 unreadable image" in capsys.readouterr().out
    lines = sorted(out.read_text().splitlines())
    assert [line.rsplit(",", 1)[0] for line in lines] == [
        f"{first['body_part']}/patientA/study1/",
        "misc/studyB/",
    ]
    studies = pd.read_parquet(out.with_suffix(".parquet")).set_index("study_id")
    wrist = studies.loc[f"{first['body_part']}/patientA/study1"]
    assert wrist["prob"] == pytest.approx(first["prob"], abs=1e-5)  # same images, same route
    misc = studies.loc["misc/studyB"]
    assert misc["body_part"] == "unknown" and misc["served_by"] == "generalist"
    assert misc["n_images"] == len(list((tiny_data / other).glob("*.png")))
    assert studies["label"].isna().all()
    skipped = pd.read_csv(tmp_path / "plain.skipped.csv")
    assert skipped["image_path"].tolist() == [str(plain / "misc" / "studyB" / "image99.png")]


# ------------------------------------------------------------------------------------ errors
@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_ensemble_without_finished_trials_is_one_line_error(search, tmp_path, capsys):
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(capsys, run_cli("ensemble", "--experiment", empty), str(empty))
    failed = tmp_path / "failed"
    failed.mkdir()
    board = pd.read_parquet(search.exp / "leaderboard.parquet").assign(status="ERROR")
    board.to_parquet(failed / "leaderboard.parquet", index=False)
    code = run_cli("ensemble", "--experiment", failed, "--out-root", tmp_path / "ens")
    line = one_line_error(capsys, code, str(failed))
    assert "no finished generalist trial" in line and "status ERROR" in line


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_evaluate_unknown_studies_is_one_line_error(search, tmp_path, capsys):
    ens = pd.read_parquet(search.ens / "predictions.parquet").query("split == 'test'")
    lines = [f"{s}/,{p}" for s, p in zip(ens["study_id"], ens["prob"])]
    lines.append("MURA-v1.1/valid/XR_HAND/patient99999/study1_negative/,0.3")
    (tmp_path / "sub.csv").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    code = run_cli(
        "evaluate", "--data", search.exp / "split.parquet", "--predictions", tmp_path / "sub.csv"
    )
    one_line_error(capsys, code, "patient99999")


@pytest.mark.slow
@pytest.mark.timeout(SEARCH_TIMEOUT)
def test_predict_errors_are_one_line(search, tiny_data, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "p.csv"
    code = run_cli("predict", "--ensemble", tmp_path, "--data", tiny_data, "--out", out)
    one_line_error(capsys, code, f"no manifest.json in ensemble folder {tmp_path}")

    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = read_json(search.ens / "manifest.json")
    member = manifest["ensembles"]["generalist"]["members"][0]
    member["checkpoint_path"] = str(tmp_path / "gone" / "best.pt")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    code = run_cli("predict", "--ensemble", broken, "--data", tiny_data, "--out", out)
    one_line_error(capsys, code, str(tmp_path / "gone" / "best.pt"))

    empty = tmp_path / "no_images"
    (empty / "study1").mkdir(parents=True)
    code = run_cli("predict", "--ensemble", search.ens, "--data", empty, "--out", out)
    one_line_error(capsys, code, f"no images found in {empty}")
    assert not out.exists()


def test_ensemble_flags_default_to_build_ensembles_defaults():
    # A flag's dest is the library parameter it sets, and its default is the library's default
    # (kappa selection, no bagging, threshold 0.5): the CLI and the API build the same ensemble.
    import inspect

    from mura_tune.cli.commands import ENSEMBLE_FLAGS
    from mura_tune.cli.parser import build_parser

    args = build_parser().parse_args(["ensemble", "--experiment", "x"])
    params = inspect.signature(ensemble_build.build_ensemble).parameters
    for flag in (*ENSEMBLE_FLAGS, "cv"):
        assert getattr(args, flag) == params[flag].default, flag
    assert params["metric"].default == "kappa" and params["bags"].default == 1
