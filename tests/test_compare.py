"""`mura-tune compare`: a run, an experiment's best trial and an ensemble on the same test studies."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from ensemble_fixtures import make_experiment

from mura_tune.metrics import cohen_kappa, study_table


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    from mura_tune.ensemble.build import build_ensemble

    root = tmp_path_factory.mktemp("compare")
    fake = make_experiment(root)
    ensemble = build_ensemble(fake.exp, name="ens", out_root=root / "ensembles")
    run = root / "run"
    run.mkdir()
    shutil.copy(fake.exp / "trials" / "g4" / "predictions.parquet", run / "predictions.parquet")
    return fake, run, ensemble


def _test_kappa(images: pd.DataFrame) -> float:
    studies = study_table(images[images["split"] == "test"])
    return cohen_kappa(studies["label"], studies["prob"])


def test_compare_scores_each_model_and_pairs_it_with_the_reference(three, capsys):
    fake, run, ensemble = three
    code = run_cli(
        "compare", run, fake.exp, ensemble, "--names", "default", "best", "ensemble", "--json"
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in result["models"]] == ["default", "best", "ensemble"]
    assert [m["kind"] for m in result["models"]] == ["run", "experiment", "ensemble"]
    assert result["n_test_studies"] == len(fake.test_studies)
    runs = {
        "default": pd.read_parquet(run / "predictions.parquet"),
        # the experiment's best trial: rank 1 of its leaderboard (g0 in the fixture)
        "best": pd.read_parquet(fake.exp / "trials" / "g0" / "predictions.parquet"),
    }
    ens = pd.read_parquet(ensemble / "predictions.parquet").query("split == 'test'")
    kappas = {name: _test_kappa(frame) for name, frame in runs.items()}
    kappas["ensemble"] = cohen_kappa(ens["label"], ens["prob"])
    for model in result["models"]:
        assert model["test_kappa"] == pytest.approx(kappas[model["name"]])
        low, high = model["test_kappa_ci"]
        assert low <= model["test_kappa"] <= high
    reference, *others = result["models"]
    assert reference["diff"] is None
    for model in others:  # paired: the difference of the two kappas, inside its own interval
        assert model["diff"] == pytest.approx(model["test_kappa"] - reference["test_kappa"])
        assert model["diff_ci"][0] <= model["diff"] <= model["diff_ci"][1]
    assert result["models"][1]["source"].endswith("g0")


def test_compare_prints_a_table(three, capsys):
    fake, run, ensemble = three
    assert run_cli("compare", run, ensemble) == 0
    out = capsys.readouterr().out
    assert f"same {len(fake.test_studies)} test studies" in out and "reference" in out


def test_models_of_other_test_studies_are_refused_in_one_line(three, tmp_path, capsys):
    fake, run, _ = three
    other = tmp_path / "other"
    other.mkdir()
    frame = pd.read_parquet(run / "predictions.parquet")
    dropped = sorted(fake.test_studies)[0]
    frame[frame["study_id"] != dropped].to_parquet(other / "predictions.parquet", index=False)
    assert run_cli("compare", run, other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other test studies" in err[0] and str(other) in err[0]


@pytest.mark.parametrize(
    "args, needle",
    [(["{missing}"], "is not a folder"), (["{empty}"], "holds no predictions"),
     (["{run}", "{run}", "--names", "a"], "--names needs one label per FOLDER")],
)  # fmt: skip
def test_bad_compare_input_is_one_line(three, tmp_path, capsys, args, needle):
    _, run, _ = three
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "run": run}
    assert run_cli("compare", *[a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_fitted_thresholds_decide_the_kappa_and_leave_the_auc_alone():
    from mura_tune.metrics import at_half, cohen_kappa, roc_auc
    from mura_tune.report.compare import ModelPredictions, compare

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(0.3 * labels + rng.uniform(0, 0.6, 300), 0, 1)
    thresholds = np.where(np.arange(300) % 2, 0.3, 0.45)
    assert cohen_kappa(labels, at_half(probs, thresholds)) == cohen_kappa(labels, probs, thresholds)
    assert at_half(np.array([0.0, 0.2, 1.0]), np.array([0.0, 1.0, 1.0])).tolist() == [0.5, 0.1, 0.5]
    studies = pd.DataFrame({"split": "test", "study_id": [f"s{i:03d}" for i in range(300)],
                            "body_part": "XR_HAND", "label": labels, "prob": probs})  # fmt: skip
    plain = ModelPredictions("at 0.5", "ensemble", "a", studies)
    fitted = ModelPredictions("fitted", "ensemble", "b", studies.assign(threshold=thresholds))
    rows = compare([plain, fitted], n_boot=200)["models"]
    assert rows[0]["test_kappa"] == pytest.approx(cohen_kappa(labels, probs))
    assert rows[1]["test_kappa"] == pytest.approx(cohen_kappa(labels, probs, thresholds))
    assert rows[1]["test_auc"] == pytest.approx(roc_auc(labels, probs)) == rows[0]["test_auc"]
    assert rows[1]["diff"] == pytest.approx(rows[1]["test_kappa"] - rows[0]["test_kappa"])
