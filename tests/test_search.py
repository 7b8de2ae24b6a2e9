"""Search: a real Ray Tune + Optuna TPE + ASHA run, the space registry, the leaderboard's readers."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import run_cli
from helpers import cli

from mura_tune.constants import METRIC
from mura_tune.search.spaces import get_space, list_spaces, sample_config, split_params
from mura_tune.train.config import TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experiment(tiny_data, ray_session, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("results")
    code = run_cli(
        "--space",
        "custom_cnn",
        "--data",
        tiny_data,
        "--num-samples",
        6,
        "--max-epochs",
        3,
        "--grace-period",
        1,
        "--reduction-factor",
        2,
        "--max-concurrent",
        2,
        "--cpus-per-trial",
        1,
        "--results",
        results,
        "--name",
        "acc",
        "--set",
        "image_size=32",
        "--seed",
        1,
    )
    assert code == 0
    return results / "acc"


def test_search_leaderboard_pruning_and_paths(experiment):
    board = pd.read_parquet(experiment / "leaderboard.parquet")
    assert len(board) == 6
    assert set(board["status"]) <= {"COMPLETED", "PRUNED"}
    pruned = board[board["status"] == "PRUNED"]
    assert len(pruned) >= 1, board[["trial_id", "status", "epochs", METRIC]]
    assert (pruned["epochs"] < 3).all()
    assert (board[board["status"] == "COMPLETED"]["epochs"] == 3).all()
    assert board[METRIC].is_monotonic_decreasing
    for col in ("checkpoint_path", "predictions_path"):
        assert board[col].map(lambda p: Path(p).exists()).all(), col
    assert {
        "hp_depth",
        "hp_lr",
        "val_auc",
        "test_kappa_study",
        "wall_seconds",
        "device",
        "node_id",
        "scope",
        "space",
    } <= set(board)
    assert board["hp_depth"].dtype.kind == "i" and board["hp_lr"].dtype.kind == "f"
    assert (board["scope"] == "all").all()


def test_leaderboard_has_bootstrap_intervals_of_kappa(experiment):
    from mura_tune.search.leaderboard import format_leaderboard

    board = pd.read_parquet(experiment / "leaderboard.parquet")
    for split in ("val", "test"):
        low, high = board[f"{split}_kappa_study_ci_low"], board[f"{split}_kappa_study_ci_high"]
        assert (low <= high).all() and low.between(-1, 1).all() and high.between(-1, 1).all(), split
        assert (high > low).any(), split  # a real resampling, not a point copied twice
    best = board.iloc[0]
    assert (
        f"best trial {best['trial_id']}: val study kappa {best[METRIC]:.3f} "
        f"[{best['val_kappa_study_ci_low']:.3f}, {best['val_kappa_study_ci_high']:.3f}]"
    ) in format_leaderboard(board)


@pytest.mark.parametrize("finished", [True, False])
def test_searcher_tells_optuna_each_step_once(tmp_path, finished):
    """Ray may hand a trial's last result to on_trial_result *and* on_trial_complete (e.g. when
    a time budget stops it): Optuna gets the step once, and the right final state."""
    from helpers import search_plan

    from mura_tune.search.searcher import STEP, make_searcher
    from mura_tune.search.spaces import get_space

    plan = search_plan(tmp_path / "x")
    (tmp_path / "x").mkdir()
    searcher = make_searcher(plan, "all", get_space("custom_cnn").sampler_fn("cpu"))
    assert searcher.suggest("t1") is not None
    last = {METRIC: 0.3, STEP: 2, "trial_finished": finished}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns "already reported" for a repeated step
        searcher.on_trial_result("t1", {METRIC: 0.2, STEP: 1})
        searcher.on_trial_result("t1", last)
        searcher.on_trial_complete("t1", last)
    (trial,) = optuna.load_study(
        study_name="x:all", storage=f"sqlite:///{tmp_path / 'x' / 'optuna.db'}"
    ).trials
    assert trial.intermediate_values == {1: pytest.approx(0.2), 2: pytest.approx(0.3)}
    assert trial.state.name == ("COMPLETE" if finished else "PRUNED")


def test_pruned_trials_are_pruned_in_optuna(experiment):
    study = optuna.load_study(study_name="acc:all", storage=f"sqlite:///{experiment / 'optuna.db'}")
    board = pd.read_parquet(experiment / "leaderboard.parquet")
    states = [t.state.name for t in study.trials]
    assert len(study.trials) == 6
    assert states.count("PRUNED") == (board["status"] == "PRUNED").sum()
    assert states.count("COMPLETE") == (board["status"] == "COMPLETED").sum()
    for t in study.trials:
        assert len(t.intermediate_values) >= 1  # every epoch's value reached Optuna


def test_ray_tools_read_the_experiment(experiment):
    from ray import tune
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment))
    assert len(analysis.trials) == 6
    assert tune.Tuner.can_restore(str(experiment))
    from mura_tune.search.trainable import mura_trial

    restored = tune.Tuner.restore(str(experiment), trainable=mura_trial)
    assert len(restored.get_results()) == 6


def test_leaderboard_reads_the_same_in_pandas_polars_duckdb(experiment):
    import duckdb
    import polars as pl

    path = experiment / "leaderboard.parquet"
    pdf = pd.read_parquet(path)
    plf = pl.read_parquet(path)
    ddf = duckdb.sql(f"SELECT trial_id, status, {METRIC} FROM '{path}' ORDER BY rank").df()
    assert plf["trial_id"].to_list() == pdf["trial_id"].tolist() == ddf["trial_id"].tolist()
    assert plf.columns == list(pdf.columns)


def test_leaderboard_command_and_trial_rerun(experiment, tmp_path):
    assert (
        run_cli(
            "leaderboard", "--experiment", experiment, "--out", tmp_path / "lb.parquet", "--top", 3
        )
        == 0
    )
    assert len(pd.read_parquet(tmp_path / "lb.parquet")) == 6
    best = pd.read_parquet(experiment / "leaderboard.parquet").iloc[0]
    assert run_cli("train", "--from-trial", best["trial_dir"], "--out", tmp_path / "rerun") == 0
    assert TrainConfig.load(tmp_path / "rerun" / "config.yaml") == TrainConfig.load(
        Path(best["trial_dir"]) / "config.yaml"
    )


@pytest.mark.parametrize("name", list_spaces())
def test_every_space_samples_valid_configs(name):
    space = get_space(name)
    for preset in (None, "cpu", "gpu"):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(8):
            trial = study.ask()
            params = (
                sample_config(space, trial)
                if preset is None
                else space.sampler_fn(preset)(trial) or {}
            )
            params = {**trial.params, **params}
            fixed = {
                k: v
                for k, v in {**space.fixed, **space.preset(preset or "cpu")}.items()
                if k in TrainConfig.__dataclass_fields__
            }
            config = TrainConfig.from_dict(
                {**fixed, **split_params(space, params), "pretrained": "none"}
            )
            assert config.model
            study.tell(trial, 0.0)
    assert space.dimensions(), name


def test_unknown_space_lists_names_and_closest():
    result = cli("--space", "densenet_finetun")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "custom_cnn" in result.stderr and "did you mean 'densenet_finetune'" in result.stderr
    assert "densenet_finetune" in cli("spaces").stdout


def test_user_space_file(tmp_path, tiny_data):
    (tmp_path / "mine.py").write_text(
        "from mura_tune.search.spaces import register_space\n"
        "from optuna.distributions import FloatDistribution\n"
        "register_space('mine', {'lr': FloatDistribution(1e-4, 1e-2, log=True)}, fixed={'model': 'custom_cnn'})\n"
    )
    space = get_space(str(tmp_path / "mine.py"))
    assert space.name == "mine" and "lr" in space.dimensions()


def test_bad_search_flags_are_one_line_errors(tiny_data, tmp_path):
    for args, text in [
        (["--grace-period", "5", "--max-epochs", "2"], "--grace-period"),
        (["--reduction-factor", "1"], "--reduction-factor"),
        (["--body-part", "XR_KNEE"], "--body-part"),
        (["--set", "dropout=2"], "dropout must be in"),
        (["--resume", "--name", "nope"], "no experiment 'nope'"),
    ]:
        result = cli("--space", "custom_cnn", "--data", tiny_data, "--results", tmp_path, *args)
        assert (
            result.returncode == 2 and text in result.stderr and "Traceback" not in result.stderr
        ), (args, result.stderr)


def test_specialists_add_one_search_per_body_part(tiny_data, ray_session, tmp_path):
    code = run_cli(
        "--space",
        "custom_cnn",
        "--data",
        tiny_data,
        "--num-samples",
        1,
        "--specialists",
        "--specialist-samples",
        1,
        "--max-epochs",
        1,
        "--max-concurrent",
        2,
        "--cpus-per-trial",
        1,
        "--results",
        tmp_path,
        "--name",
        "spec",
        "--set",
        "image_size=32",
        "--set",
        "depth=2",
    )
    assert code == 0
    board = pd.read_parquet(tmp_path / "spec" / "leaderboard.parquet")
    parts = sorted(pd.read_parquet(tmp_path / "spec" / "split.parquet")["body_part"].unique())
    assert sorted(board["scope"]) == sorted(["all", *parts])
    for _, row in board[board["scope"] != "all"].iterrows():
        predictions = pd.read_parquet(row["predictions_path"])
        assert set(predictions["body_part"]) == {row["scope"]}, row[
            "scope"
        ]  # a specialist sees only its part
    study_names = {
        s.study_name
        for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'spec' / 'optuna.db'}")
    }
    assert study_names == {f"spec:{scope}" for scope in ["all", *parts]}


def test_tpe_runs_the_space_default_first_and_random_search_does_not(tmp_path):
    from helpers import search_plan

    from mura_tune.search.searcher import make_searcher

    space = get_space("custom_cnn")
    start = space.start_points("cpu", {})
    assert start and all(k in space.dimensions(preset="cpu") for k in start[0])
    for random_search in (False, True):
        exp = tmp_path / f"r{random_search}"
        exp.mkdir()
        plan = search_plan(exp, random_search=random_search)
        searcher = make_searcher(plan, "all", space.sampler_fn("cpu"), start)
        first = searcher.suggest("t1")
        if random_search:
            assert first != start[0]  # the baseline starts from nothing
        else:
            assert {k: first[k] for k in start[0]} == pytest.approx(start[0])
    # A resumed study is not given its start points again.
    again = make_searcher(search_plan(tmp_path / "rFalse"), "all", space.sampler_fn("cpu"), start)
    trials = again._ot_study.get_trials(deepcopy=False)
    assert len(trials) == 1  # the first searcher's trial only: nothing enqueued twice


def test_start_points_leave_out_what_the_user_fixed_and_what_the_preset_cannot_sample():
    space = get_space("custom_cnn")
    (point,) = space.start_points("cpu", {"lr": 0.01, "depth": 3})
    assert "lr" not in point and "depth" not in point
    assert "convs_per_cell" not in point  # the cpu preset does not search it
    (gpu,) = space.start_points("gpu", {})
    assert gpu["convs_per_cell"] == 1 and gpu["base_filters"] == 16


def test_search_settings_come_from_the_preset_unless_given(tmp_path):
    from mura_tune.search.plan import UNBOUNDED, SearchPlan

    plan = SearchPlan(space="custom_cnn", preset="cpu", results=str(tmp_path))
    assert (plan.max_epochs, plan.grace_period, plan.reduction_factor) == (30, 2, 3)
    assert plan.fixed["image_size"] == 48 and plan.cpus_per_trial == 1.0
    short = SearchPlan(space="custom_cnn", preset="cpu", results=str(tmp_path), max_epochs=1)
    assert short.grace_period == 1  # the preset's rung never lies past the user's max_epochs
    mine = SearchPlan(space="custom_cnn", preset="cpu", results=str(tmp_path), grace_period=3,
                      reduction_factor=2)  # fmt: skip
    assert (mine.grace_period, mine.reduction_factor) == (3, 2)
    budget = SearchPlan(space="custom_cnn", preset="cpu", results=str(tmp_path), time_budget_s=60)
    assert budget.num_samples == UNBOUNDED  # a time budget without a count: as many as fit
    from mura_tune.errors import ConfigError

    with pytest.raises(ConfigError, match="--grace-period must be in"):
        SearchPlan(
            space="custom_cnn", preset="cpu", results=str(tmp_path), max_epochs=2, grace_period=3
        )


def test_the_search_ran_the_space_default_as_its_first_trial(experiment):
    board = pd.read_parquet(experiment / "leaderboard.parquet")
    first = board[board["trial_index"] == 1].iloc[0]
    (start,) = get_space("custom_cnn").start_points("cpu", {"image_size": 32})
    for name, value in start.items():
        assert first[f"hp_{name}"] == pytest.approx(value), name
