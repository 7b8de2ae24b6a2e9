"""Cross-validated refit (issue 19): folds, out-of-fold predictions, Ray trials, resumption, prediction.

The end-to-end tests share one module-scoped search (3 trials x 1 epoch, custom_cnn at 32 px on
``tiny_data``) and one 2-fold refit of its 2 best configurations (1-epoch fold models).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from ensemble_fixtures import make_experiment, make_refit
from helpers import cli
from test_reliability import _fingerprint, _start, _stop_group

from mura_tune.data.split import NO_FOLD, assign_folds, fold_split
from mura_tune.ensemble.oof import load_oof, read_refit
from mura_tune.errors import ConfigError, ExperimentError
from mura_tune.layout import ExperimentDir, TrialDir, fold_trial_id
from mura_tune.train.config import TrainConfig

K, TOP = 2, 2
TIMEOUT = 900


# ------------------------------------------------------------------------- folds (pure)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_are_patient_disjoint_across_parts_and_cover_train_val_once(tiny_split, k):
    table, _ = tiny_split
    folds = assign_folds(table, k, seed=0)
    pool = folds[folds["split"].isin(["train", "val"])]
    assert (folds.loc[folds["split"] == "test", "fold"] == NO_FOLD).all()
    assert set(pool["fold"]) == set(range(k))
    # Patients whole: every image, every study, every body part of a patient in one fold.
    assert (pool.groupby("patient_id")["fold"].nunique() == 1).all()
    several_parts = pool.groupby("patient_id")["body_part"].nunique() > 1
    assert several_parts.any()  # the data has patients across parts: the check above bites
    studies = pool.drop_duplicates("study_id")
    assert (pool.groupby("study_id")["fold"].nunique() == 1).all()
    assert len(studies) == table.loc[table["split"] != "test", "study_id"].nunique()
    sizes = studies["fold"].value_counts()
    assert sizes.max() - sizes.min() <= max(3, 0.1 * len(studies) / k)  # balanced
    for f in range(k):
        split = fold_split(folds, f)
        assert set(split.loc[split["split"] == "val", "study_id"]) == set(
            studies.loc[studies["fold"] == f, "study_id"]
        )
        assert (split.loc[folds["split"] == "test", "split"] == "test").all()
        held_out = set(split.loc[split["split"] == "val", "patient_id"])
        assert not held_out & set(split.loc[split["split"] == "train", "patient_id"])


def test_folds_are_seeded_and_check_k(tiny_split):
    table, _ = tiny_split
    a, b = assign_folds(table, 3, seed=1), assign_folds(table, 3, seed=1)
    assert a["fold"].tolist() == b["fold"].tolist()
    assert a["fold"].tolist() != assign_folds(table, 3, seed=2)["fold"].tolist()
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ConfigError, match="--cv must be an integer >= 2"):
            assign_folds(table, bad)


# ---------------------------------------------------------------- out-of-fold (no training)
def test_oof_has_one_prediction_per_study_and_configuration(tmp_path):
    fx = make_experiment(tmp_path)
    make_refit(fx, k=3)
    configs, skipped, refit = read_refit(fx.exp, 3)
    assert [c.trial_id for c in configs] == ["g0", "g1", "g2"] and not skipped
    oof = load_oof(configs, fx.exp)
    assert oof.split == "oof" and set(oof.study_ids) == fx.val_studies
    assert oof.probs.shape == (3, len(fx.val_studies)) and np.isfinite(oof.probs).all()
    assert all(np.isfinite(c.val_loss) for c in configs)
    # A fold model that also predicts a study of another fold is refused, in one line.
    trial = ExperimentDir(fx.exp).trial(fold_trial_id("g1", 0))
    preds = pd.read_parquet(trial.predictions)
    other = pd.read_parquet(ExperimentDir(fx.exp).trial(fold_trial_id("g1", 1)).predictions)
    extra = other[other["split"] == "val"].head(1)
    pd.concat([preds, extra]).to_parquet(trial.predictions, index=False)
    with pytest.raises(ExperimentError, match="configuration g1 has 2 out-of-fold predictions"):
        load_oof(configs, fx.exp)
    with pytest.raises(ConfigError, match="--cv 5: the refit .* has 3 folds"):
        read_refit(fx.exp, 5)


def test_unfinished_fold_model_skips_its_configuration(tmp_path):
    fx = make_experiment(tmp_path)
    make_refit(fx, k=3)
    ExperimentDir(fx.exp).trial(fold_trial_id("g2", 1)).summary.unlink()
    configs, skipped, _ = read_refit(fx.exp, 3)
    assert [c.trial_id for c in configs] == ["g0", "g1"]
    assert skipped == [
        {"trial_id": "g2", "reason": "fold model cv-g2-f1 has not finished (status None)"}
    ]


def test_source_lr_schedule_replays_the_sources_rates_or_none(tmp_path):
    from mura_tune.search.refit import source_lr_schedule

    trial = TrialDir(tmp_path / "t")
    assert source_lr_schedule(trial, 2) == []  # no history: a constant rate
    trial.path.mkdir()
    pd.DataFrame({"epoch": [1, 2, 3], "lr": [1e-3, 1e-3, 2e-4]}).to_parquet(trial.metrics)
    assert source_lr_schedule(trial, 3) == [1e-3, 1e-3, 2e-4]
    assert source_lr_schedule(trial, 2) == [1e-3, 1e-3]  # up to the source's best epoch
    assert source_lr_schedule(trial, 4) == []  # the history does not cover the epochs


# ------------------------------------------------------------------ end to end (Ray trials)
@pytest.fixture(scope="module")
def refit(ray_session, tiny_data, tmp_path_factory):
    from mura_tune.search.refit import RefitPlan, run_refit

    root = tmp_path_factory.mktemp("refit")
    args = ["--space", "custom_cnn", "--data", tiny_data, "--num-samples", 3, "--max-epochs", 1]
    args += ["--results", root / "results", "--name", "x", "--cpus-per-trial", 1]
    assert run_cli(*args, "--set", "image_size=32", "--seed", 1) == 0
    exp = root / "results" / "x"
    pristine = root / "pristine"
    shutil.copytree(exp, pristine)  # the search alone, for the kill test
    result = run_refit(RefitPlan(exp, k=K, top=TOP, verbose=0))
    return SimpleNamespace(root=root, exp=exp, pristine=pristine, result=result)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_refit_trains_top_configurations_on_every_fold(refit):
    result, exp = refit.result, ExperimentDir(refit.exp)
    assert result.complete and not result.interrupted
    assert len(result.fold_models) == K * TOP == len(result.finished)
    board = pd.read_parquet(exp.leaderboard)
    search = board[board["scope"] != "cv"]
    assert (board["scope"] == "cv").to_numpy().nonzero()[0].min() == len(search)  # listed after
    fold_rows = board[board["scope"] == "cv"]
    finished = search[search["status"].isin(["COMPLETED", "PRUNED"])]
    assert list(dict.fromkeys(fold_rows["refit_of"])) == finished["trial_id"].head(TOP).tolist()
    assert (fold_rows["status"] == "COMPLETED").all()
    assert fold_rows.groupby("refit_of")["fold"].apply(sorted).tolist() == [[0, 1]] * TOP
    folds = pd.read_parquet(exp.cv.folds)
    for row in fold_rows.itertuples():
        trial = exp.trial(row.trial_id)
        meta = json.loads(trial.trial_json.read_text())
        assert meta["scope"] == "cv" and meta["fold"] == row.fold
        source = json.loads(exp.trial(row.refit_of).trial_json.read_text())
        assert meta["params"] == source["params"]  # the same configuration
        assert row.epochs == row.best_epoch == 1  # the source's best epoch, the last one kept
        # the source's learning rates, replayed (its held-out fold may not drive a plateau rule)
        rates = pd.read_parquet(exp.trial(row.refit_of).metrics)["lr"].head(row.epochs).tolist()
        assert TrainConfig.load(trial.config).lr_schedule == rates
        assert pd.read_parquet(trial.metrics)["lr"].tolist() == rates
        preds = pd.read_parquet(trial.predictions)
        held_out = set(folds.loc[folds["fold"] == row.fold, "study_id"])
        assert set(preds.loc[preds["split"] == "val", "study_id"]) == held_out
        assert set(preds.loc[preds["split"] == "test", "study_id"]) == set(
            folds.loc[folds["fold"] == NO_FOLD, "study_id"]
        )
    configs, _, _ = read_refit(exp.path, K)
    oof = load_oof(configs, exp.path)
    assert set(oof.study_ids) == set(folds.loc[folds["fold"] != NO_FOLD, "study_id"])
    assert oof.probs.shape[0] == TOP and np.isfinite(oof.probs).all()


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_refit_again_trains_nothing(refit):
    from mura_tune.search.refit import RefitPlan, run_refit

    exp = ExperimentDir(refit.exp)
    before = {t: _fingerprint(exp.trial(t).path) for t in refit.result.fold_models}
    again = run_refit(RefitPlan(refit.exp, k=K, top=TOP, verbose=0))
    assert again.fold_models == refit.result.fold_models and again.complete
    assert {t: _fingerprint(exp.trial(t).path) for t in again.fold_models} == before
    with pytest.raises(ConfigError, match=f"already holds a --cv {K} refit"):
        run_refit(RefitPlan(refit.exp, k=K + 1, top=TOP, verbose=0))


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_refit_runs_as_many_fold_models_at_once_as_asked(refit, monkeypatch):
    """``--max-concurrent`` reaches Ray Tune; without it the refit keeps the search's setting."""
    from ray import tune

    from mura_tune.search.plan import SearchPlan
    from mura_tune.search.refit import RefitPlan, _tuner

    asked = []
    monkeypatch.setattr(tune, "Tuner", lambda *a, tune_config, **kw: asked.append(tune_config))
    search = SearchPlan.load(refit.exp)
    for max_concurrent in (3, None):
        plan = RefitPlan(refit.exp, k=K, top=TOP, max_concurrent=max_concurrent, verbose=0)
        _tuner(plan, search, [])
    assert [c.max_concurrent_trials for c in asked] == [3, search.max_concurrent]
    with pytest.raises(ConfigError, match="--max-concurrent must be an integer >= 1, got 0"):
        RefitPlan(refit.exp, k=K, top=TOP, max_concurrent=0)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_cv_ensemble_predicts_test_as_the_mean_of_fold_models(refit, tiny_data, capsys):
    out_root = refit.root / "ens"
    code = run_cli(
        "ensemble", "--experiment", refit.exp, "--cv", K, "--top", TOP, "--out-root", out_root,
        "--name", "cv", "--threshold", "fit",
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "selected on out-of-fold" in printed and "Selection methods" in printed
    ens = out_root / "cv"
    manifest = json.loads((ens / "manifest.json").read_text())
    assert manifest["selection"]["split"] == "oof"
    for member in manifest["ensembles"]["generalist"]["members"]:
        assert [f["trial_id"] for f in member["folds"]] == [
            fold_trial_id(member["trial_id"], f) for f in range(K)
        ]
    report = json.loads((ens / "report.json").read_text())
    assert set(report["methods"]) >= {"val-greedy", "oof-greedy", "oof-greedy-thresholds"}
    assert report["cv"]["fold_models"] == K * len(manifest["selection"]["refit"]["configurations"])
    assert report["cv"]["compute"]["multiple"] > 0

    from mura_tune.report.html import write_report

    page = write_report(refit.exp, ensemble=ens, out=refit.root / "report").read_text()
    assert "could not draw this section" not in page
    methods = page[page.index('<section id="methods">') :]
    assert "out-of-fold (--cv 2), greedy, fitted thresholds" in methods
    assert "Cross-validated refit" in methods

    out = refit.root / "pred" / "p.csv"
    assert run_cli("predict", "--ensemble", ens, "--data", tiny_data, "--out", out) == 0
    studies = pd.read_parquet(out.with_suffix(".parquet")).set_index("study_id")
    expected = pd.read_parquet(ens / "predictions.parquet").query("split == 'test'")
    got = studies.loc[expected["study_id"]]
    np.testing.assert_allclose(got["prob"], expected["prob"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got["threshold"], expected["threshold"])
    assert (got["abnormal"] == (got["prob"] > got["threshold"])).all()


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_killed_refit_resumes_to_exactly_top_times_k_fold_models(refit, tmp_path):
    """SIGKILL the refit's driver (and its local Ray) once one fold model has finished; running
    the same command again ends with exactly TOP x K fold models, the finished ones untouched."""
    exp = tmp_path / "x"
    shutil.copytree(refit.pristine, exp)
    command = ("ensemble", "--experiment", exp, "--cv", K, "--top", TOP, "--out-root", tmp_path)
    command += ("--max-concurrent", 1)  # one fold model at a time: the kill lands between two
    folder = ExperimentDir(exp)

    def finished() -> set[str]:
        return {
            p.parent.name
            for p in folder.trials.glob("cv-*/summary.json")
            if json.loads(p.read_text() or "{}").get("status") == "completed"
        }

    proc = _start(command, tmp_path / "run1.log")
    try:
        start = time.time()
        while not finished():
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert time.time() - start < 400, "no fold model finished in time"
            time.sleep(0.05)
    finally:
        _stop_group(proc)
    assert proc.returncode == -signal.SIGKILL
    done = finished()
    assert 1 <= len(done) < K * TOP
    before = {t: _fingerprint(folder.trial(t).path) for t in done}

    assert run_cli(*command) == 0
    fold_models = sorted(p.name for p in folder.trials.glob("cv-*") if p.is_dir())
    refit_json = json.loads(folder.cv.refit.read_text())
    assert fold_models == sorted(m["trial_id"] for m in refit_json["fold_models"])
    assert len(fold_models) == K * TOP == len(finished())
    for trial_id, fingerprint in before.items():
        assert _fingerprint(folder.trial(trial_id).path) == fingerprint
    board = pd.read_parquet(folder.leaderboard)
    rows = board[board["scope"] == "cv"]
    assert len(rows) == K * TOP and (rows["status"] == "COMPLETED").all()
    assert sorted(zip(rows["refit_of"], rows["fold"])) == sorted(
        (m["source"], m["fold"]) for m in refit_json["fold_models"]
    )
    assert not list(folder.cv.path.glob("../trials/cv-*/resume.pt"))


# ------------------------------------------------------------------------ errors (one line)
def test_cv_errors_are_one_line_and_import_neither_torch_nor_ray(tmp_path):
    fx = make_experiment(tmp_path)  # a folder with trials but no experiment.json: not a search
    cases = [
        (
            ["--experiment", fx.exp, "--cv", 3],
            ["--cv needs a search's experiment folder", str(fx.exp)],
        ),
        (["--experiment", fx.exp, "--cv", 1], ["--cv", "1"]),
        (["--experiment", fx.exp, "--threshold", "0.3"], ["--threshold", "'0.3'"]),
        (["--experiment", fx.exp, "--bags", 0], ["--bags", "0"]),
        (["--experiment", fx.exp, "--cv", 3, "--max-concurrent", 0], ["--max-concurrent", "0"]),
        (["--experiment", fx.exp, "--address", "auto"], ["--address", "only", "--cv"]),
        (["--experiment", fx.exp, "--max-concurrent", 2], ["--max-concurrent", "only", "--cv"]),
    ]
    for argv, phrases in cases:
        result = cli("ensemble", *argv, "--out-root", tmp_path / "ens", timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("mura-tune: error: ") and "Traceback" not in result.stderr
        assert all(p in lines[0] for p in phrases), lines[0]
    code = (
        "import sys\nfrom mura_tune.cli import main\n"
        f"assert main(['ensemble', '--experiment', {str(fx.exp)!r}, '--cv', '3']) == 2\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
