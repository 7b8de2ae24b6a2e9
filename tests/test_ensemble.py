"""Greedy ensemble selection, specialist routing and the test-set isolation of ``build_ensemble``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from ensemble_fixtures import make_experiment, make_refit, permute_test_labels
from sklearn.metrics import cohen_kappa_score

from mura_tune.ensemble import build as ensemble_build
from mura_tune.ensemble.candidates import drop_incomplete, read_candidates
from mura_tune.ensemble.candidates import load_study_probs as load_split
from mura_tune.ensemble.gates import clearly_wins, paired_gain, too_small
from mura_tune.ensemble.greedy import BaggedEnsemble, GreedyEnsemble, score
from mura_tune.ensemble.thresholds import best_threshold, fit_thresholds
from mura_tune.errors import ConfigError
from mura_tune.metrics import cohen_kappa, log_loss, roc_auc, study_table

N_BOOT = 50


def random_candidates(seed: int, n_cand: int = 30, n_studies: int = 200):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_studies)
    skill = rng.uniform(0.0, 1.5, (n_cand, 1))
    logits = skill * (2 * y - 1) + rng.normal(0.0, 1.5, (n_cand, n_studies))
    return 1.0 / (1.0 + np.exp(-logits)), y


def three_way(n: int = 60):
    """Candidates 0-2 are each wrong on a different third; only their equal mix is perfect."""
    y = np.arange(n) % 2
    third = np.arange(n) * 3 // n
    probs = []
    for c in range(3):
        wrong = third == c
        probs.append(np.where(y == 1, np.where(wrong, 0.1, 0.8), np.where(wrong, 0.9, 0.2)))
    return np.array(probs), y


# ----------------------------------------------------------------------------- estimator
@pytest.mark.parametrize("seed", range(5))
def test_ensemble_at_least_best_single_kappa(seed):
    probs, y = random_candidates(seed)
    ens = GreedyEnsemble(max_size=15, seed=seed).fit(probs, y)
    best_single = max(cohen_kappa(y, p) for p in probs)
    assert cohen_kappa(y, ens.predict_proba(probs)) >= best_single - 1e-12
    assert ens.score_ == pytest.approx(cohen_kappa(y, ens.predict_proba(probs)))
    assert ens.weights_.sum() == pytest.approx(1.0)
    assert len(ens.members_) == ens.best_size_
    np.testing.assert_allclose(
        np.bincount(ens.members_, minlength=len(probs)) / ens.best_size_, ens.weights_
    )


@pytest.mark.parametrize("metric", ["logloss", "auc"])
def test_other_metrics_at_least_best_single(metric):
    probs, y = random_candidates(7, n_cand=15)
    ens = GreedyEnsemble(max_size=8, metric=metric).fit(probs, y)
    pred = ens.predict_proba(probs)
    if metric == "logloss":
        assert log_loss(y, pred) <= min(log_loss(y, p) for p in probs) + 1e-12
    else:
        assert roc_auc(y, pred) >= max(roc_auc(y, p) for p in probs) - 1e-12
    assert ens.score_ == pytest.approx(score(y, pred, metric))


def test_known_optimal_combination_found():
    probs, y = three_way()
    distractors = np.array(
        [np.full(y.size, 0.45), np.full(y.size, 0.55), np.where(y == 1, 0.4, 0.6)]
    )
    ens = GreedyEnsemble(max_size=10).fit(np.vstack([distractors, probs]), y)
    assert ens.score_ == 1.0
    assert ens.best_size_ == 3
    np.testing.assert_allclose(ens.weights_, [0, 0, 0, 1 / 3, 1 / 3, 1 / 3])


def test_tie_prefers_model_already_chosen():
    y = np.array([1, 1, 0, 0])
    a = np.array([0.51, 0.51, 0.49, 0.49])  # perfect but unsure
    b = np.array([0.99, 0.99, 0.01, 0.505])  # one error alone; a+b is perfect and sharper
    assert log_loss(y, (a + b) / 2) < log_loss(y, a)  # so log-loss alone would pick b
    ens = GreedyEnsemble(max_size=2, n_init=1).fit(np.array([a, b]), y)
    assert [t["score"] for t in ens.trajectory_] == [1.0, 1.0]
    assert ens.trajectory_[1]["added"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_tie_between_new_models_prefers_lower_logloss(seed):
    y = np.array([1, 1, 1, 0, 0, 0])
    a = np.array([0.45, 0.7, 0.7, 0.3, 0.3, 0.3])
    c = np.array([0.8, 0.4, 0.4, 0.4, 0.4, 0.4])
    b = np.array([0.9, 0.4, 0.4, 0.4, 0.4, 0.4])  # same kappa with a as c, lower log-loss
    ens = GreedyEnsemble(max_size=2, n_init=1, seed=seed).fit(np.array([a, c, b]), y)
    assert ens.trajectory_[0]["added"] == 0
    assert ens.trajectory_[1]["added"] == 2
    assert ens.score_ == 1.0


def test_full_tie_is_deterministic_per_seed():
    probs, y = random_candidates(0, n_cand=1)
    copies = np.repeat(probs, 8, axis=0)
    picks = []
    for seed in range(12):
        first = GreedyEnsemble(max_size=4, seed=seed).fit(copies, y).members_
        again = GreedyEnsemble(max_size=4, seed=seed).fit(copies, y).members_
        assert first == again
        picks.append(first[0])
    assert len(set(picks)) > 1  # the seed, not the index, breaks full ties


def test_best_prefix_kept_when_trajectory_goes_on():
    probs, y = three_way()
    ens = GreedyEnsemble(max_size=6, n_init=3).fit(probs, y)
    scores = [t["score"] for t in ens.trajectory_]
    assert [t["size"] for t in ens.trajectory_] == [1, 2, 3, 4, 5, 6]
    assert scores[2] == 1.0 and min(scores[3:]) < 1.0
    assert ens.best_size_ == 3 and len(ens.members_) == 3
    np.testing.assert_allclose(ens.weights_, [1 / 3, 1 / 3, 1 / 3])


def test_prune_top_limits_candidates():
    probs, y = random_candidates(3)
    ens = GreedyEnsemble(max_size=10, prune_top=3).fit(probs, y)
    kept = ens.candidates_kept_
    others = np.setdiff1d(np.arange(len(probs)), kept)
    assert len(kept) == 3
    assert ens.candidate_scores_[kept].min() >= ens.candidate_scores_[others].max()
    assert set(np.flatnonzero(ens.weights_)) <= set(kept.tolist())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_size": 0}, "max_size must be an integer >= 1, got 0"),
        ({"metric": "f1"}, "metric must be one of"),
        ({"n_init": 30, "max_size": 25}, "n_init must be <= max_size"),
        ({"prune_top": 0}, "prune_top must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GreedyEnsemble(**kwargs)


def test_bad_arrays_raise_config_error():
    probs, y = random_candidates(0, n_cand=3, n_studies=10)
    with pytest.raises(ConfigError, match="labels must have shape"):
        GreedyEnsemble().fit(probs, y[:5])
    with pytest.raises(ConfigError, match=r"probs must be finite and in \[0, 1\]"):
        GreedyEnsemble().fit(probs * 2, y)
    ens = GreedyEnsemble(max_size=2).fit(probs, y)
    with pytest.raises(ConfigError, match="n_candidates=3"):
        ens.predict_proba(probs[:2])


# ------------------------------------------------------------------------ build_ensemble
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    fx = make_experiment(root)
    out = ensemble_build.build_ensemble(fx.exp, out_root=root / "ensembles", n_boot=N_BOOT)
    return fx, out


def read_json(path):
    return json.loads(path.read_text())


def test_build_writes_manifest_predictions_report(built):
    fx, out = built
    manifest = read_json(out / "manifest.json")
    assert manifest["n_skipped"] == 2
    assert {s["trial_id"] for s in manifest["skipped"]} == {"g_err", "g_lost"}
    assert manifest["split_manifest"] == str(fx.exp / "split.parquet")
    for ens in manifest["ensembles"].values():
        assert sum(m["weight"] for m in ens["members"]) == pytest.approx(1.0)
        assert all(
            m["checkpoint_path"].endswith(f"{m['trial_id']}/checkpoint.pt") for m in ens["members"]
        )
    preds = pd.read_parquet(out / "predictions.parquet")
    assert set(preds.loc[preds["split"] == "val", "study_id"]) == fx.val_studies
    assert set(preds.loc[preds["split"] == "test", "study_id"]) == fx.test_studies
    report = read_json(out / "report.json")
    assert set(report["models"]) == {"ensemble", "best_single", "mura_recipe"}
    assert len(manifest["baselines"]["mura_recipe"]) == 5


def test_report_kappa_equals_sklearn(built):
    fx, out = built
    report = read_json(out / "report.json")
    preds = pd.read_parquet(out / "predictions.parquet").query("split == 'test'")
    test = report["models"]["ensemble"]["test"]
    expected = cohen_kappa_score(preds["label"], (preds["prob"] > 0.5).astype(int))
    assert test["overall"]["kappa"] == pytest.approx(expected, abs=1e-12)
    for part, rows in preds.groupby("body_part"):
        expected = cohen_kappa_score(rows["label"], (rows["prob"] > 0.5).astype(int))
        assert test["parts"][part]["kappa"] == pytest.approx(expected, abs=1e-12)
    best = read_json(out / "manifest.json")["baselines"]["best_single"]["trial_id"]
    images = pd.read_parquet(fx.exp / "trials" / best / "predictions.parquet").query(
        "split == 'test'"
    )
    studies = study_table(images)
    expected = cohen_kappa_score(studies["label"], (studies["prob"] > 0.5).astype(int))
    assert report["models"]["best_single"]["test"]["overall"]["kappa"] == pytest.approx(
        expected, abs=1e-12
    )


@pytest.fixture(scope="module")
def val_data(built):
    fx, _ = built
    candidates, _ = read_candidates(fx.exp)
    return drop_incomplete(candidates, load_split(candidates, "val"))[:2]


def _route(val_data, margin):
    candidates, val = val_data
    kw = {"max_size": 10, "metric": "kappa", "seed": 0, "prune_top": None}
    return ensemble_build.select(val, candidates, specialists=True, margin=margin, **kw).routing


def test_specialist_used_only_above_margin(val_data):
    gain = _route(val_data, 0.02)["XR_WRIST"]["gain"]
    assert gain > 0.05  # the fixture's wrist specialists are much better there
    above = _route(val_data, gain - 0.01)["XR_WRIST"]
    below = _route(val_data, gain + 0.01)["XR_WRIST"]
    assert above["served_by"] == "part" and "beats the generalist" in above["reason"]
    assert below["served_by"] == "generalist" and "generalist kept" in below["reason"]
    assert above["part_val_score"] == below["part_val_score"]
    assert above["generalist_val_score"] == below["generalist_val_score"]
    assert "no specialist trials for this part" in _route(val_data, 0.02)["XR_ELBOW"]["reason"]


def test_best_single_is_by_study_kappa_whatever_the_selection_metric():
    # The baseline is the search's own pick (the leaderboard ranks by val study kappa), also when
    # log-loss or AUC drives the ensemble's selection.
    from mura_tune.ensemble.candidates import Candidate, StudyProbs

    y = np.tile([0, 1], 50)
    timid = np.where(y == 1, 0.51, 0.49)  # every study right, barely: kappa 1, log-loss 0.67
    sure = np.where(y == 1, 0.9, 0.1)
    sure[:10] = 1 - y[:10] - (0.5 - y[:10]) * 0.2  # 10 wrong at 0.4/0.6: kappa 0.8, log-loss 0.19
    val = StudyProbs("val", np.arange(100), np.full(100, "XR_WRIST"), y, np.stack([sure, timid]))
    candidates = [Candidate(t, "all", None, None, 0.5) for t in ("sure", "timid")]
    assert log_loss(y, sure) < log_loss(y, timid) and cohen_kappa(y, timid) > cohen_kappa(y, sure)
    for metric in ("logloss", "auc", "kappa"):
        kw = {"max_size": 5, "metric": metric, "seed": 0, "prune_top": None}
        sel = ensemble_build.select(val, candidates, specialists=False, **kw)
        assert candidates[sel.best_single].trial_id == "timid", metric


def test_an_ensemble_that_calls_every_study_the_same_is_said_in_one_line(caplog):
    # Log-loss picked a base-rate model on a weak demo search (every study normal, kappa 0).
    from mura_tune.ensemble.candidates import Candidate, StudyProbs

    y = (np.arange(100) % 5 < 2).astype(int)
    informative = np.where(y == 1, 0.7, 0.3)
    for probs, warned in ((np.full(100, 0.4), True), (informative, False)):
        val = StudyProbs("val", np.arange(100), np.full(100, "XR_WRIST"), y, probs[None, :])
        caplog.clear()
        kw = {"max_size": 3, "metric": "logloss", "seed": 0, "prune_top": None}
        ensemble_build.select(
            val, [Candidate("m", "all", None, None, 0.5)], specialists=False, **kw
        )
        lines = [
            r.getMessage() for r in caplog.records if "calls every val study" in r.getMessage()
        ]
        assert len(lines) == int(warned), lines
        if warned:
            assert "every val study normal at threshold 0.5 (kappa 0); --metric kappa" in lines[0]


def test_permuting_test_labels_changes_no_selection(tmp_path):
    fx = make_experiment(tmp_path)
    first = ensemble_build.build_ensemble(fx.exp, out_root=tmp_path / "a", n_boot=N_BOOT)
    permute_test_labels(fx.exp)
    second = ensemble_build.build_ensemble(fx.exp, out_root=tmp_path / "b", n_boot=N_BOOT)
    m1, m2 = read_json(first / "manifest.json"), read_json(second / "manifest.json")
    for key in ("ensembles", "routing", "baselines", "skipped"):
        assert m1[key] == m2[key]
    r1, r2 = read_json(first / "report.json"), read_json(second / "report.json")
    assert r1["models"]["ensemble"]["val"] == r2["models"]["ensemble"]["val"]
    assert r1["models"]["ensemble"]["test"] != r2["models"]["ensemble"]["test"]  # labels did change


def test_selection_is_given_no_test_rows(built, tmp_path, monkeypatch):
    fx, _ = built
    events = []
    real_load, real_select, real_fit = (
        ensemble_build.load_study_probs,
        ensemble_build.select,
        GreedyEnsemble.fit,
    )

    def load_spy(candidates, split, only=None):
        data = real_load(candidates, split, only)
        events.append(("load", split, set(data.study_ids)))
        return data

    def select_spy(val, *args, **kwargs):
        events.append(("select", val.split, set(val.study_ids)))
        return real_select(val, *args, **kwargs)

    def fit_spy(self, probs, labels, names=None):
        events.append(("fit", np.shape(probs)[1], None))
        return real_fit(self, probs, labels, names)

    monkeypatch.setattr(ensemble_build, "load_study_probs", load_spy)
    monkeypatch.setattr(ensemble_build, "select", select_spy)
    monkeypatch.setattr(GreedyEnsemble, "fit", fit_spy)
    ensemble_build.build_ensemble(fx.exp, out_root=tmp_path, n_boot=5)

    first_test = next(i for i, e in enumerate(events) if e[:2] == ("load", "test"))
    assert [e[:2] for e in events[:2]] == [("load", "val"), ("select", "val")]
    assert events[0][2] == fx.val_studies and events[1][2] == fx.val_studies
    assert events[first_test][2] <= fx.test_studies
    fits = [e for e in events if e[0] == "fit"]
    assert fits
    assert all(e[1] <= len(fx.val_studies) for e in fits)
    assert not any(e[0] == "fit" for e in events[first_test:])


# ------------------------------------------------------- bagged selection, the member cap
def test_max_members_caps_distinct_models():
    probs, y = random_candidates(5, n_cand=30)
    free = GreedyEnsemble(max_size=40).fit(probs, y)
    capped = GreedyEnsemble(max_size=40, max_members=3).fit(probs, y)
    assert np.count_nonzero(free.weights_) > 3
    assert np.count_nonzero(capped.weights_) <= 3 and len(capped.trajectory_) == 40


def test_bagged_selection_averages_bags_of_half_the_candidates():
    probs, y = random_candidates(2, n_cand=20)
    ens = BaggedEnsemble(n_bags=8, bag_fraction=0.5, max_size=10, seed=3).fit(probs, y)
    assert len(ens.bags_) == 8 and all(len(b["candidates"]) == 10 for b in ens.bags_)
    assert len({tuple(b["candidates"]) for b in ens.bags_}) > 1
    expected = np.zeros(len(probs))
    for bag in ens.bags_:
        assert set(bag["members"]) <= set(bag["candidates"])
        expected += np.bincount(bag["members"], minlength=len(probs)) / len(bag["members"]) / 8
    np.testing.assert_allclose(ens.weights_, expected)
    assert ens.score_ == pytest.approx(cohen_kappa(y, ens.predict_proba(probs)))
    again = BaggedEnsemble(n_bags=8, bag_fraction=0.5, max_size=10, seed=3).fit(probs, y)
    np.testing.assert_array_equal(again.weights_, ens.weights_)
    one = BaggedEnsemble(n_bags=1, bag_fraction=1.0, max_size=10, seed=3).fit(probs, y)
    np.testing.assert_allclose(
        one.weights_, GreedyEnsemble(max_size=10, seed=3).fit(probs, y).weights_
    )
    capped = BaggedEnsemble(n_bags=8, max_size=10, max_members=2).fit(probs, y)
    assert np.count_nonzero(capped.weights_) == 2 and capped.weights_.sum() == pytest.approx(1)
    with pytest.raises(ConfigError, match=r"bag_fraction must be in \(0, 1\], got 0"):
        BaggedEnsemble(bag_fraction=0)
    with pytest.raises(ConfigError, match="n_bags must be an integer >= 1"):
        BaggedEnsemble(n_bags=0)


# ------------------------------------------------------------------- gates and thresholds
def test_gate_needs_an_interval_above_zero():
    y = np.array([0, 1] * 60)
    good = np.where(y == 1, 0.8, 0.2)
    assert paired_gain(y, good, good, n_boot=100) == (0.0, [0.0, 0.0])
    coin = np.random.default_rng(0).random(y.size)
    gain, ci = paired_gain(y, good, coin, n_boot=200)
    assert gain > 0.5 and ci[0] > 0 and clearly_wins(gain, ci)
    assert not clearly_wins(gain, ci, margin=gain)
    assert too_small(y) is None and too_small(y[:19]) == "19 studies, 9 abnormal"
    assert too_small(np.array([1] * 4 + [0] * 40)) == "44 studies, 4 abnormal"


def test_fitted_threshold_only_where_it_clearly_wins():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    shifted = np.clip(0.2 + 0.25 * y + rng.normal(0, 0.05, n), 0, 1)  # best cut near 0.325
    calibrated = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.05, n), 0, 1)  # 0.5 already best
    parts = np.array(["XR_HAND"] * n + ["XR_WRIST"] * n + ["XR_ELBOW"] * 10)
    labels = np.concatenate([y, y, y[:10]])
    probs = np.concatenate([shifted, calibrated, shifted[:10]])
    thresholds, details = fit_thresholds(labels, probs, parts, n_boot=200)
    assert 0.25 < thresholds["XR_HAND"] < 0.4 and details["XR_HAND"]["gain_ci"][0] > 0
    assert thresholds["XR_WRIST"] == 0.5 and "already" in details["XR_WRIST"]["reason"]
    assert thresholds["XR_ELBOW"] == 0.5 and "too few studies" in details["XR_ELBOW"]["reason"]
    assert best_threshold(y, shifted) == thresholds["XR_HAND"]


@pytest.mark.parametrize(("n_per_part", "whole"), [(8, False), (5, True)])
def test_too_small_selection_set_is_said_in_one_line(tmp_path, capsys, n_per_part, whole):
    fx = make_experiment(tmp_path, n_per_part=n_per_part)
    capsys.readouterr()
    out = ensemble_build.build_ensemble(fx.exp, out_root=tmp_path / "e", n_boot=N_BOOT)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "too few" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("mura-tune: too few val studies")
    assert ("the whole selection set" in warnings[0]) == whole
    assert f"XR_HAND ({n_per_part} studies" in warnings[0]
    manifest = read_json(out / "manifest.json")
    assert {r["served_by"] for r in manifest["routing"].values()} == {"generalist"}
    assert all("too few selection studies" in r["reason"] for r in manifest["routing"].values())
    assert set(manifest["thresholds"].values()) == {0.5}


# --------------------------------------------- out-of-fold and bagged selection never see test
def test_permuting_test_labels_changes_no_oof_or_bagged_selection(tmp_path):
    fx = make_experiment(tmp_path)
    make_refit(fx, k=3)
    kw = {"cv": 3, "bags": 5, "threshold": "fit", "n_boot": N_BOOT}
    first = ensemble_build.build_ensemble(fx.exp, out_root=tmp_path / "a", **kw)
    permute_test_labels(fx.exp)  # every trial's and every fold model's test rows
    second = ensemble_build.build_ensemble(fx.exp, out_root=tmp_path / "b", **kw)
    m1, m2 = read_json(first / "manifest.json"), read_json(second / "manifest.json")
    assert m1["selection"]["split"] == "oof" and "bags" in m1["ensembles"]["generalist"]
    for key in ("ensembles", "routing", "baselines", "skipped", "thresholds", "threshold_fit"):
        assert m1[key] == m2[key]
    r1, r2 = read_json(first / "report.json"), read_json(second / "report.json")
    assert set(r1["methods"]) == {
        f"{s}-{k}{t}"
        for s in ("val", "oof")
        for k in ("greedy", "bagged")
        for t in ("", "-thresholds")
    }
    for key, row in r1["methods"].items():  # every method's decisions: the same selection kappa
        assert row["selection_kappa"] == r2["methods"][key]["selection_kappa"]
    assert r1["models"]["ensemble"]["oof"] == r2["models"]["ensemble"]["oof"]
    assert r1["models"]["ensemble"]["test"] != r2["models"]["ensemble"]["test"]
