"""benchmarks/ensemble_methods.py runs end to end on two fake searches of the same test studies."""

from __future__ import annotations

import json
import shutil

import pytest
from ensemble_fixtures import make_experiment

from benchmarks import ensemble_methods as bench


def test_every_method_is_scored_with_paired_differences(tmp_path, capsys):
    fx = make_experiment(tmp_path / "a")
    (fx.exp / "experiment.json").write_text(json.dumps({"seed": 0, "space": "fake"}))
    second = tmp_path / "b" / "exp"
    shutil.copytree(fx.exp, second)
    out = tmp_path / "methods.json"
    assert (
        bench.main(["--experiments", str(fx.exp), str(second), "--n-boot", "50", "--out", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert set(methods) == {*bench.VARIANTS, bench.SINGLE, "mura-recipe"}
    assert result["n_test_studies"] > 0 and len(result["experiments"]) == 2
    for key, m in methods.items():
        assert m["optimism"] == pytest.approx(m["selection_kappa"] - m["test_kappa"])
        low, high = m["test_kappa_ci"]
        assert low <= m["test_kappa"] <= high, key
        assert len(m["test_kappa_per_run"]) == 2
    for ref in (bench.SINGLE, bench.DEFAULT):
        assert methods[ref][f"vs_{ref}"]["diff"] == 0.0
    # The old margin rule routes at least every part the interval gate lets through.
    for margin, gated in zip(methods["kappa-margin"]["routed"], methods["kappa-gated"]["routed"]):
        assert set(gated) <= set(margin)
    assert "greedy on val kappa, gated routing" in capsys.readouterr().out
