"""The Ray trainable: one trial = one :func:`mura_tune.train.run.run_training` with per-epoch reports.

Runs in Ray workers. Each trial keeps its own resumable state (``trials/<id>/resume.pt``) on the
shared results folder, so a retried or resumed trial continues from its last finished epoch.
Test hook: ``MURA_TUNE_FAULT`` (see :func:`_fault`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import torch

from mura_tune.constants import EPOCH_METRIC, KEPT_METRIC, METRIC
from mura_tune.errors import ConfigError
from mura_tune.io import atomic_path, write_json
from mura_tune.layout import (
    GENERALIST_SCOPE,
    RUN_ENDED,
    ExperimentDir,
    TrialStatus,
    ray_trial_dirname,
    read_json,
)
from mura_tune.search.plan import SearchPlan
from mura_tune.search.spaces import get_space, split_params
from mura_tune.train.config import TrainConfig
from mura_tune.train.run import TrialDiverged, run_training


def trial_main(params: dict, ctx: dict) -> None:
    """Ray trainable: one trial = one :func:`run_training` with per-epoch ``tune.report``.

    The trial keeps its own resumable state, ``trials/<id>/resume.pt`` (model, optimizer,
    scheduler, RNG, history; written atomically after every epoch, removed when the trial
    finishes), on the shared results folder. Every attempt (the first, a Ray retry after an
    error or a lost node, a restart after ``--resume``) continues from it and appends itself to
    ``trial.json["attempts"]``. Ray gets no checkpoints: its retention deletes a trial's
    previous checkpoint before its own saved state stops pointing at it, so a driver killed in
    between could never restore that trial. A trial that already finished (final
    ``summary.json``) re-reports its last epoch, so Ray, ASHA and TPE learn how it ended, and
    returns leaving its files untouched.
    """
    import ray  # Ray is imported where a trial runs (see the search package's docstring)
    from ray import tune

    context = tune.get_context()
    # A fold model of a refit (search/refit.py) has a folder named by its job, not by Ray's id.
    trial_id = ctx.get("trial_id") or context.get_trial_id()
    index = trial_index(context.get_trial_name())
    trial = ExperimentDir(Path(ctx["exp_dir"])).trial(trial_id)
    trial.path.mkdir(parents=True, exist_ok=True)
    node_id = ray.get_runtime_context().get_node_id()

    summary = read_json(trial.summary) or {}
    if summary.get("status") == TrialStatus.DIVERGED:
        raise TrialDiverged(summary.get("reason"))  # a retry would diverge again
    if summary.get("status") in RUN_ENDED:
        last = json.loads(pd.read_parquet(trial.metrics).iloc[-1].to_json())
        tune.report({**search_report(last), "node_id": node_id})
        return
    resume_path = trial.resume
    resume_state = (
        torch.load(resume_path, map_location="cpu", weights_only=True)
        if resume_path.exists()
        else None
    )

    space = get_space(ctx["space"])
    config = TrainConfig.from_dict(
        {**ctx["fixed"], **split_params(space, params)}, source=f"trial {trial_id}"
    )
    if ctx["cpus_per_trial"] and config.device in ("auto", "cpu") and not torch.cuda.is_available():
        config = config.updated({"threads": max(1, int(ctx["cpus_per_trial"]))})
    fault = _fault(ctx, index)
    if fault and fault[0] == "nan":  # a finite but absurd learning rate: NaN loss in epoch 1
        config = config.updated({"lr": NAN_FAULT_LR}, source="MURA_TUNE_FAULT=nan")
    previous = read_json(trial.trial_json) or {}
    last_error = read_json(trial.error)
    attempt = {
        "node_id": node_id,
        "started": time.time(),
        "resumed_from_epoch": resume_state["epoch"] if resume_state else 0,
        "previous_error": (last_error or {}).get("reason"),
    }
    meta = {
        "trial_id": trial_id,
        "index": index,
        "experiment": ctx["name"],
        "space": ctx["space"],
        "scope": ctx["scope"],
        "params": params,
        "node_id": node_id,
        "weights_source": ctx.get("weights_source"),
        **ctx.get("meta", {}),  # a refit's fold, source trial and hyperparameters
        "started": previous.get("started", attempt["started"]),
        "attempts": [*previous.get("attempts", []), attempt],
    }
    write_json(trial.trial_json, meta)
    # An earlier attempt's error: this attempt may succeed.
    trial.error.unlink(missing_ok=True)

    def on_epoch(metrics: dict, state: dict) -> None:
        if fault and fault[0] != "nan" and metrics["epoch"] == fault[1]:
            _inject(fault[0])
        if metrics["trial_finished"]:
            resume_path.unlink(missing_ok=True)  # summary.json is final: nothing left to resume
        else:
            with atomic_path(resume_path, suffix=".pt") as tmp:
                torch.save(state, tmp)
        tune.report({**search_report(metrics), "node_id": node_id})

    split_table = pd.read_parquet(ctx["split_path"])
    try:
        run_training(
            config,
            split_table,
            trial.path,
            on_epoch=on_epoch,
            resume_state=resume_state,
            strict=ctx["strict"],
            verbose=False,
            weights_source=ctx.get("weights_source"),
        )
    except Exception as exc:
        write_json(
            trial.error,
            {"reason": f"{type(exc).__name__}: {exc}".splitlines()[0], "time": time.time()},
        )
        raise


def search_report(metrics: dict) -> dict:
    """What a trial tells Ray Tune after an epoch: the epoch's metrics, with METRIC the kept checkpoint's.

    The scheduler and the searcher read METRIC; the epoch's own val kappa stays under EPOCH_METRIC
    (see :data:`mura_tune.constants.KEPT_METRIC`).
    """
    report = {
        k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) and v is not None
    }
    if KEPT_METRIC in report:
        report[EPOCH_METRIC] = report.get(METRIC)
        report[METRIC] = report[KEPT_METRIC]
    return report


FAULT_KINDS = ("raise", "oom", "nan")
#: The ``nan`` fault's learning rate: finite (a config refuses inf), yet Adam's first step moves
#: every weight by ~1e38, so activations overflow and the loss is NaN from the second batch on.
#: (Not higher: Adam's bias-corrected step, lr / 0.1, must stay below float32's 3.4e38.)
NAN_FAULT_LR = 1e37


def _fault(ctx: dict, index: int | None) -> tuple[str, int] | None:
    """Test hook: the fault this trial must simulate, if any.

    ``MURA_TUNE_FAULT=KIND@EPOCH`` makes trials fail after that epoch's training, before the
    epoch is reported: ``raise`` (a RuntimeError), ``oom`` (``torch.OutOfMemoryError``) or
    ``nan`` (the learning rate becomes ``NAN_FAULT_LR``, so the loss is NaN in epoch 1 and run_training
    stops the trial as diverged; EPOCH is ignored). ``MURA_TUNE_FAULT_TRIALS=1,3`` limits it to
    those trials, numbered 1, 2, ... in the order the searcher created them (``t<N>_<id>``
    in Ray's trial names); without it every trial fails. Several faults at once:
    ``MURA_TUNE_FAULT=1:raise@1,2:nan,3:oom@2`` (trial N: fault). Read by the driver.
    """
    spec = ctx.get("fault")
    if not spec:
        return None
    faults = parse_faults(spec)
    if index in faults:
        return faults[index]
    if None in faults and (not ctx.get("fault_trials") or index in ctx["fault_trials"]):
        return faults[None]
    return None


def parse_faults(spec: str) -> dict[int | None, tuple[str, int]]:
    """``"raise@1"`` -> {None: ("raise", 1)}; ``"1:raise@1,2:nan"`` -> {1: ("raise", 1), 2: ("nan", 1)}."""
    faults: dict[int | None, tuple[str, int]] = {}
    for item in spec.split(","):
        who, _, what = item.strip().rpartition(":")
        kind, _, at = what.partition("@")
        if kind not in FAULT_KINDS or not (at or "1").isdigit() or (who and not who.isdigit()):
            raise ConfigError(
                f"MURA_TUNE_FAULT must be [TRIAL:]KIND[@EPOCH],... with KIND one of "
                f"{', '.join(FAULT_KINDS)}, got {spec!r}"
            )
        faults[int(who) if who else None] = (kind, int(at or 1))
    return faults


def _inject(kind: str) -> None:
    if kind == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory (injected by MURA_TUNE_FAULT)")
    raise RuntimeError("trial failure injected by MURA_TUNE_FAULT")


def trial_name(trial) -> str:
    """``t<N>_<trial_id>``: N is the trial's 1-based creation order in its scope (Ray's counter)."""
    return f"t{trial.experiment_tag.split('_', 1)[0]}_{trial.trial_id}"


def trial_index(name: str) -> int | None:
    head = name.split("_", 1)[0]
    return int(head[1:]) if head[:1] == "t" and head[1:].isdigit() else None


def trial_dirname(trial) -> str:
    return ray_trial_dirname(trial.trial_id)


def trainable_for(plan: SearchPlan, scope: str):
    """The Ray trainable of one scope: :func:`mura_trial` with its context, and its resources."""
    from ray import tune

    fixed = dict(plan.fixed)
    by_model = fixed.pop("pretrained_by_model", None)
    fault_trials = os.environ.get("MURA_TUNE_FAULT_TRIALS")
    ctx = {
        "exp_dir": plan.exp_dir,
        "name": plan.name,
        "space": plan.space,
        "scope": scope,
        "fixed": fixed,
        "split_path": plan.split_path,
        "strict": plan.strict,
        "cpus_per_trial": plan.cpus_per_trial,
        "fault": os.environ.get("MURA_TUNE_FAULT"),
        "fault_trials": [int(i) for i in fault_trials.split(",") if i.strip().isdigit()]
        if fault_trials
        else None,
    }
    if ctx["fault"]:
        parse_faults(ctx["fault"])  # a malformed MURA_TUNE_FAULT fails here, in the driver
    if scope != GENERALIST_SCOPE:
        ctx["fixed"]["body_part"] = scope
    if by_model:
        ctx["pretrained_by_model"] = by_model
    fn = tune.with_parameters(mura_trial, ctx=ctx)
    return tune.with_resources(fn, {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial})


def mura_trial(params: dict, ctx: dict) -> None:
    """Use the starting weights the driver resolved for this trial's backbone, then run the trial."""
    by_model = ctx.get("pretrained_by_model")
    if by_model:
        model = params.get("model", ctx["fixed"].get("model", "custom_cnn"))
        source = by_model.get(model, "none")
        ctx = {
            **ctx,
            "fixed": {**ctx["fixed"], "pretrained": source},
            # A built body-part file is named as such; imagenet/none are labelled where they load.
            "weights_source": None
            if source in ("imagenet", "none")
            else f"bodypart:{Path(source).name}",
        }
    trial_main(params, ctx)
