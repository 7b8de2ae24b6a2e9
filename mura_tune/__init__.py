"""mura-tune: hyperparameter search, fine-tuning and ensembling for MURA radiograph classifiers.

Quick start (embedded synthetic data, CPU)::

    mura-tune data summary
    mura-tune train --set model=custom_cnn --set max_epochs=3
    mura-tune --space densenet_finetune --num-samples 8
    mura-tune ensemble --experiment results/<name>

The same from Python::

    from mura_tune import SearchPlan, build_ensemble, run_search

    plan = SearchPlan(space="densenet_finetune", num_samples=8)
    result = run_search(plan)            # result.leaderboard: one row per trial
    build_ensemble(plan.exp_dir)

The package is laid out by pipeline stage: ``data`` → ``train`` → ``search`` → ``ensemble`` →
``report``, with ``cli`` on top and the core modules (``errors``, ``constants``, ``io``, ``home``,
``layout``, ``metrics``) below; each imports only from the stages before it. The names below are imported
on first use, so ``import mura_tune`` costs nothing (no torch, no Ray).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mura_tune.constants import VERSION as __version__

#: Public name -> the module that defines it.
_API = {
    "read_dataset": "mura_tune.data.mura",
    "assign_split": "mura_tune.data.split",
    "synthesize": "mura_tune.data.synth",
    "TrainConfig": "mura_tune.train.config",
    "run_training": "mura_tune.train.run",
    "load_checkpoint": "mura_tune.train.checkpoint",
    "pretrain_bodypart": "mura_tune.train.pretrain",
    "register_space": "mura_tune.search.spaces",
    "get_space": "mura_tune.search.spaces",
    "list_spaces": "mura_tune.search.spaces",
    "SearchPlan": "mura_tune.search.plan",
    "run_search": "mura_tune.search.driver",
    "SearchResult": "mura_tune.search.driver",
    "build_leaderboard": "mura_tune.search.leaderboard",
    "GreedyEnsemble": "mura_tune.ensemble.greedy",
    "build_ensemble": "mura_tune.ensemble.build",
    "predict_with_ensemble": "mura_tune.ensemble.predict",
    "export_ensemble": "mura_tune.ensemble.export",
    "evaluate_file": "mura_tune.report.evaluate",
    "write_report": "mura_tune.report.html",
}

__all__ = [
    "__version__",
    "read_dataset",
    "assign_split",
    "synthesize",
    "TrainConfig",
    "run_training",
    "load_checkpoint",
    "pretrain_bodypart",
    "register_space",
    "get_space",
    "list_spaces",
    "SearchPlan",
    "run_search",
    "SearchResult",
    "build_leaderboard",
    "GreedyEnsemble",
    "build_ensemble",
    "predict_with_ensemble",
    "export_ensemble",
    "evaluate_file",
    "write_report",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load on first use
    from mura_tune.data.mura import read_dataset
    from mura_tune.data.split import assign_split
    from mura_tune.data.synth import synthesize
    from mura_tune.ensemble.build import build_ensemble
    from mura_tune.ensemble.export import export_ensemble
    from mura_tune.ensemble.greedy import GreedyEnsemble
    from mura_tune.ensemble.predict import predict_with_ensemble
    from mura_tune.report.evaluate import evaluate_file
    from mura_tune.report.html import write_report
    from mura_tune.search.driver import SearchResult, run_search
    from mura_tune.search.leaderboard import build_leaderboard
    from mura_tune.search.plan import SearchPlan
    from mura_tune.search.spaces import get_space, list_spaces, register_space
    from mura_tune.train.checkpoint import load_checkpoint
    from mura_tune.train.config import TrainConfig
    from mura_tune.train.pretrain import pretrain_bodypart
    from mura_tune.train.run import run_training


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'mura_tune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
