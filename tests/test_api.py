"""The Python API of a search: the README's example runs, SearchPlan checks what the CLI checked,
and run_search passes Ray Tune stop criteria, callbacks and a time budget through."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from helpers import REPO

from mura_tune.errors import ConfigError

pytestmark = pytest.mark.slow
TINY = {"image_size": 32, "depth": 2, "base_filters": 8}


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### From Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tiny_data, ray_session, tmp_path):
    code = readme_example()
    for old, new in (('"path/to/MURA-v1.1"', repr(str(tiny_data))), ('results="results"', f"results={str(tmp_path)!r}"),
                     ('out_root="ensembles"', f"out_root={str(tmp_path / 'ensembles')!r}")):  # fmt: skip
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    board = namespace["result"].leaderboard
    assert len(board) == 4 and set(board["status"]) <= {"COMPLETED", "PRUNED"}
    assert (namespace["ensemble"] / "manifest.json").is_file()
    assert (tmp_path / "api-example" / "experiment.json").is_file()


def test_plan_checks_what_the_cli_checked(tmp_path):
    from mura_tune.search.plan import SearchPlan

    for fields, text in [({"num_samples": 0}, "--num-samples must be an integer >= 1, got 0"),
                         ({"grace_period": 5, "max_epochs": 2}, "--grace-period must be in [1, --max-epochs=2], got 5"),
                         ({"time_budget_s": 0}, "--time-budget must be a number > 0, got 0"),
                         ({"overrides": {"dropout": 2}}, "dropout must be in [0, 1)"),
                         ({"body_part": "XR_KNEE"}, "--body-part must be one of")]:  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(text)):
            SearchPlan(space="custom_cnn", results=str(tmp_path), **fields)
    plan = SearchPlan(
        space="custom_cnn", results=str(tmp_path), name="x", specialists=True, num_samples=8
    )
    assert (
        plan.scopes["all"] == 8
        and plan.scopes["XR_WRIST"] == 2
        and plan.exp_dir == str(tmp_path.resolve() / "x")
    )

    from mura_tune.cli.parser import build_parser

    args = build_parser().parse_args(["search", "--space", "custom_cnn", "--time-budget", "30"])
    assert args.time_budget_s == 30.0


def test_run_search_passes_stop_and_callbacks(tiny_data, ray_session, tmp_path):
    from ray.tune import Callback

    from mura_tune.search.driver import run_search
    from mura_tune.search.plan import SearchPlan

    class Seen(Callback):
        def __init__(self):
            self.results = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.results.append((trial.trial_id, result["epoch"]))

    seen = Seen()
    plan = SearchPlan(space="custom_cnn", data=str(tiny_data), results=str(tmp_path), name="stop", num_samples=2,
                      max_epochs=3, cpus_per_trial=1, overrides=TINY)  # fmt: skip
    result = run_search(plan, stop={"epoch": 1}, callbacks=[seen], verbose=0)
    assert not result.interrupted and result.exit_code == 0
    assert result.leaderboard["epochs"].tolist() == [
        1,
        1,
    ]  # stopped by the extra criterion, not max_epochs
    assert sorted(seen.results) == sorted((t, 1) for t in result.leaderboard["trial_id"])


def test_time_budget_stops_the_search(tiny_data, ray_session, tmp_path):
    from mura_tune.search.driver import run_search
    from mura_tune.search.plan import SearchPlan

    plan = SearchPlan(space="custom_cnn", data=str(tiny_data), results=str(tmp_path), name="budget", num_samples=6,
                      max_epochs=3, cpus_per_trial=1, overrides=TINY, time_budget_s=3)  # fmt: skip
    result = run_search(plan, verbose=0)
    assert result.budget_reached and not result.interrupted and result.exit_code == 0
    board = result.leaderboard if result.leaderboard is not None else pd.DataFrame({"status": []})
    assert (board["status"] == "COMPLETED").sum() < 6  # far from six 3-epoch trials in 3 s
