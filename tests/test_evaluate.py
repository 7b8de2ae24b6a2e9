"""``evaluate``: every accepted file shape, exact agreement with the ensemble report, clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from ensemble_fixtures import make_experiment, write_submission

from mura_tune.ensemble.build import build_ensemble
from mura_tune.errors import ConfigError, DataError
from mura_tune.report.evaluate import evaluate_file, format_table, load_predictions

N_BOOT, SEED = 60, 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    fx = make_experiment(root, n_per_part=25)
    out = build_ensemble(fx.exp, out_root=root / "ensembles", n_boot=N_BOOT, seed=SEED, max_size=8)
    report = json.loads((out / "report.json").read_text())
    return fx, out, report


def _same_figures(result, block):
    assert result["overall"] == block["overall"]
    assert result["parts"] == block["parts"]
    assert result["n_studies"] == block["n_studies"]


def test_ensemble_predictions_reproduce_report(built):
    fx, out, report = built
    result = evaluate_file(fx.table, out / "predictions.parquet", "test", n_boot=N_BOOT, seed=SEED)
    assert result["format"] == "study"
    _same_figures(result, report["models"]["ensemble"]["test"])
    val = evaluate_file(fx.table, out / "predictions.parquet", "val", n_boot=N_BOOT, seed=SEED)
    _same_figures(val, report["models"]["ensemble"]["val"])


def test_submission_csv_reproduces_report(built, tmp_path):
    fx, out, report = built
    csv = write_submission(out / "predictions.parquet", tmp_path / "submission.csv")
    assert csv.read_text().splitlines()[0].startswith("MURA-v1.1/valid/")
    assert csv.read_text().splitlines()[0].split(",")[0].endswith("/")
    result = evaluate_file(fx.table, csv, n_boot=N_BOOT, seed=SEED)
    assert result["format"] == "submission"
    _same_figures(result, report["models"]["ensemble"]["test"])
    assert "overall" in format_table(result) and "XR_WRIST" in format_table(result)


def test_image_level_file_matches_by_mura_suffix(built, tmp_path):
    fx, out, report = built
    best = json.loads((out / "manifest.json").read_text())["baselines"]["best_single"]["trial_id"]
    images = pd.read_parquet(fx.exp / "trials" / best / "predictions.parquet")
    result = evaluate_file(
        fx.table, fx.exp / "trials" / best / "predictions.parquet", n_boot=N_BOOT, seed=SEED
    )
    assert result["format"] == "image"
    _same_figures(result, report["models"]["best_single"]["test"])
    images = images[images["split"] == "test"]  # no split column below: only test rows may appear
    moved = images.assign(
        image_path="/elsewhere/" + images["image_path"].str.split("/data/").str[1]
    )
    moved[["image_path", "prob"]].to_csv(tmp_path / "images.csv", index=False)
    again = evaluate_file(fx.table, tmp_path / "images.csv", n_boot=N_BOOT, seed=SEED)
    _same_figures(again, report["models"]["best_single"]["test"])


def test_no_split_column_means_source_split_valid(built, tmp_path):
    fx, out, report = built
    csv = write_submission(out / "predictions.parquet", tmp_path / "submission.csv")
    table = fx.table.drop(columns="split")
    _same_figures(
        evaluate_file(table, csv, n_boot=N_BOOT, seed=SEED), report["models"]["ensemble"]["test"]
    )
    with pytest.raises(ConfigError, match="split.parquet"):
        evaluate_file(table, csv, split="val")


def _lines(built, tmp_path):
    _, out, _ = built
    return (
        write_submission(out / "predictions.parquet", tmp_path / "sub.csv").read_text().splitlines()
    )


def test_unknown_study_raises(built, tmp_path):
    lines = _lines(built, tmp_path) + ["MURA-v1.1/valid/XR_HAND/patient99999/study1_negative/,0.2"]
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=r"1 predicted studies are not in the test split .*patient99999"
    ):
        evaluate_file(built[0].table, tmp_path / "bad.csv", n_boot=5)


def test_missing_studies_raise(built, tmp_path):
    lines = _lines(built, tmp_path)
    (tmp_path / "short.csv").write_text("\n".join(lines[3:]) + "\n")
    with pytest.raises(DataError, match=rf"3 of {len(lines)} test studies have no prediction"):
        evaluate_file(built[0].table, tmp_path / "short.csv", n_boot=5)


@pytest.mark.parametrize(
    "bad", ["MURA-v1.1/valid/XR_HAND/patient1/study1_negative/", "a,b,c", "x,high"]
)
def test_malformed_line_raises(built, tmp_path, bad):
    lines = _lines(built, tmp_path)
    (tmp_path / "bad.csv").write_text("\n".join([lines[0], bad, *lines[1:]]) + "\n")
    with pytest.raises(DataError, match="line 2: expected '<study path>,<probability>'"):
        evaluate_file(built[0].table, tmp_path / "bad.csv", n_boot=5)


def test_probability_out_of_range_raises(built, tmp_path):
    lines = _lines(built, tmp_path)
    study = lines[0].split(",")[0]
    (tmp_path / "bad.csv").write_text("\n".join([f"{study},1.5", *lines[1:]]) + "\n")
    with pytest.raises(
        DataError, match=r"bad.csv line 1 \(.*\): prob must be in \[0, 1\], got '1.5'"
    ):
        evaluate_file(built[0].table, tmp_path / "bad.csv", n_boot=5)


def test_load_predictions_study_level_filters_split(built):
    _, out, _ = built
    preds = load_predictions(out / "predictions.parquet", split="test")
    assert list(preds.columns) == ["study_id", "prob", "threshold"]  # the ensemble's decision rule
    assert preds["study_id"].str.startswith("MURA-v1.1/valid/").all()
    with pytest.raises(DataError, match="not found"):
        load_predictions(out / "nope.parquet")


def test_bootstrap_without_auc_gives_the_same_other_intervals():
    import numpy as np

    from mura_tune.metrics import bootstrap_intervals, cohen_kappa

    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.4
    probs = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)
    full = bootstrap_intervals(labels, probs, n_boot=500, seed=3)
    fast = bootstrap_intervals(labels, probs, n_boot=500, seed=3, auc=False)
    assert "auc" in full and "auc" not in fast
    assert fast == {k: v for k, v in full.items() if k != "auc"}
    low, high = fast["kappa"]
    assert low < cohen_kappa(labels, probs) < high and high - low > 0.05
