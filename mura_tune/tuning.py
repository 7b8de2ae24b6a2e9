"""The Ray Tune adapter: the only module that imports Ray Tune.

    mura-tune --space densenet_finetune                       # local Ray, embedded data
    mura-tune --space custom_cnn --num-samples 50 --address auto --results /shared/results --preset gpu

Trials run :func:`mura_tune.train.run_training` through ``tune.Tuner``, reporting once per epoch.
Optuna's TPE (seeded, ``constant_liar`` so parallel trials do not duplicate) proposes
configurations; ASHA stops weak trials at its rungs, and those reach Optuna as PRUNED. Every path
is resolved here in the driver; trials write only below ``<results>/<name>/``, which must be a
folder every node mounts (cloud URIs are refused).

Failures: a trial that raises, diverges or runs out of memory is ERROR (FAIL in Optuna, never a
score); a trial whose node dies is retried (``--max-failures``) from its own ``resume.pt``;
Ctrl-C or SIGTERM stops cleanly (exit 130, the resume command printed); after a SIGKILL,
``--resume`` restarts unfinished trials from their ``resume.pt``, keeps finished ones untouched
and re-queues in Optuna what the dead driver had started but Ray had not recorded. Test hook:
``MURA_TUNE_FAULT`` (see :func:`_fault`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mura_tune.constants import BODY_PARTS, METRIC, MODE, TIME_ATTR
from mura_tune.errors import ConfigError, ExperimentError
from mura_tune.leaderboard import RECOVERED_FILE, SPECIALISTS_DIR, read_ray_state

EXPERIMENT_FILE = "experiment.json"
RESUME_FILE = "resume.pt"  # trials/<id>/resume.pt: the unfinished trial's resumable state
#: ASHA's and TPE's time axis: our own epoch counter, which survives restarts (Ray's
#: ``training_iteration`` starts again at 1 when a trial is restarted without a Ray checkpoint).
STEP = TIME_ATTR
#: <exp>/orphaned/<id>/: trials a killed driver started but Ray never recorded (re-run on --resume).
ORPHANED_DIR = "orphaned"
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")
REPORT_COLUMNS = [METRIC, "val_auc", "val_loss", "train_loss", "epoch"]


@dataclass
class SearchPlan:
    """Everything about a search, resolved in the driver and saved as ``experiment.json``."""

    name: str
    exp_dir: str  # absolute
    space: str  # registered name or absolute path of a space file
    preset: str
    fixed: dict[str, Any]  # config shared by every trial (space.fixed + preset + --set)
    num_samples: int
    max_epochs: int
    grace_period: int
    reduction_factor: float
    max_concurrent: int | None
    cpus_per_trial: float
    gpus_per_trial: float
    seed: int
    scopes: dict[str, int]  # scope ("all" or a body part) -> trials
    split_path: str
    data: str | None
    max_failures: int
    strict: bool
    random_search: bool
    address: str | None = None
    created: float = field(default_factory=time.time)

    def ray_dir(self, scope: str) -> Path:
        """The Ray experiment folder of one scope (the experiment folder itself for the main scope)."""
        main = next(iter(self.scopes))
        return Path(self.exp_dir) if scope == main else Path(self.exp_dir) / SPECIALISTS_DIR / scope

    def save(self) -> None:
        from mura_tune.io import write_json

        write_json(Path(self.exp_dir) / EXPERIMENT_FILE, asdict(self))

    @classmethod
    def load(cls, exp_dir: str | Path) -> SearchPlan:
        path = Path(exp_dir) / EXPERIMENT_FILE
        if not path.exists():
            raise ExperimentError(f"no experiment at {Path(exp_dir)} (missing {EXPERIMENT_FILE})")
        return cls(**json.loads(path.read_text()))


# --- the trainable (runs in Ray workers) -----------------------------------------------------------
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
    import pandas as pd
    import ray
    import torch
    from ray import tune

    from mura_tune.config import TrainConfig
    from mura_tune.io import atomic_path, write_json
    from mura_tune.spaces import get_space, split_params
    from mura_tune.train import TrialDiverged, run_training

    context = tune.get_context()
    trial_id = context.get_trial_id()
    index = trial_index(context.get_trial_name())
    out = Path(ctx["exp_dir"]) / "trials" / trial_id
    out.mkdir(parents=True, exist_ok=True)
    node_id = ray.get_runtime_context().get_node_id()

    summary = _read_json(out / "summary.json") or {}
    if summary.get("status") == "diverged":
        raise TrialDiverged(summary.get("reason"))  # a retry would diverge again
    if summary.get("status") in ("completed", "early_stopped"):
        last = json.loads(pd.read_parquet(out / "metrics.parquet").iloc[-1].to_json())
        tune.report({**{k: v for k, v in last.items() if v is not None}, "node_id": node_id})
        return
    resume_path = out / RESUME_FILE
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
    if fault and fault[0] == "nan":  # an infinite learning rate: the loss becomes NaN in epoch 1
        config = config.updated({"lr": float("inf")}, source="MURA_TUNE_FAULT=nan")
    previous = _read_json(out / "trial.json") or {}
    last_error = _read_json(out / "error.json")
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
        "started": previous.get("started", attempt["started"]),
        "attempts": [*previous.get("attempts", []), attempt],
    }
    write_json(out / "trial.json", meta)
    # An earlier attempt's error: this attempt may succeed.
    (out / "error.json").unlink(missing_ok=True)

    def on_epoch(metrics: dict, state: dict) -> None:
        if fault and fault[0] != "nan" and metrics["epoch"] == fault[1]:
            _inject(fault[0])
        if metrics["trial_finished"]:
            resume_path.unlink(missing_ok=True)  # summary.json is final: nothing left to resume
        else:
            with atomic_path(resume_path, suffix=".pt") as tmp:
                torch.save(state, tmp)
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        tune.report({**report, "node_id": node_id})

    split_table = pd.read_parquet(ctx["split_path"])
    try:
        run_training(
            config,
            split_table,
            out,
            on_epoch=on_epoch,
            resume_state=resume_state,
            strict=ctx["strict"],
            verbose=False,
            weights_source=ctx.get("weights_source"),
        )
    except Exception as exc:
        write_json(
            out / "error.json",
            {"reason": f"{type(exc).__name__}: {exc}".splitlines()[0], "time": time.time()},
        )
        raise


FAULT_KINDS = ("raise", "oom", "nan")


def _fault(ctx: dict, index: int | None) -> tuple[str, int] | None:
    """Test hook: the fault this trial must simulate, if any.

    ``MURA_TUNE_FAULT=KIND@EPOCH`` makes trials fail after that epoch's training, before the
    epoch is reported: ``raise`` (a RuntimeError), ``oom`` (``torch.OutOfMemoryError``) or
    ``nan`` (the learning rate becomes inf, so the loss is NaN in epoch 1 and run_training
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
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory (injected by MURA_TUNE_FAULT)")
    raise RuntimeError("trial failure injected by MURA_TUNE_FAULT")


def trial_name(trial) -> str:
    """``t<N>_<trial_id>``: N is the trial's 1-based creation order in its scope (Ray's counter)."""
    return f"t{trial.experiment_tag.split('_', 1)[0]}_{trial.trial_id}"


def trial_index(name: str) -> int | None:
    head = name.split("_", 1)[0]
    return int(head[1:]) if head[:1] == "t" and head[1:].isdigit() else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def trial_dirname(trial) -> str:
    return f"ray-{trial.trial_id}"


# --- searcher ------------------------------------------------------------------------------------
def _searcher_class():
    from optuna.trial import TrialState
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class MuraOptunaSearch(OptunaSearch):
        """OptunaSearch that tells Optuna the truth about how a trial ended.

        Ray's OptunaSearch marks every trial with a final metric COMPLETE, so a trial ASHA
        stopped after one epoch would count as a finished trial with its 1-epoch score. Our
        trainable reports ``trial_finished`` on its last epoch; a trial that ends without it
        was stopped by the scheduler and is told to Optuna as PRUNED (its intermediate values
        were reported every epoch, with the epoch as step). Errors and non-finite values are
        FAIL, never a score.

        Crash safety: each Optuna trial records its Ray trial id (user attribute
        ``ray_trial_id``), so a resumed search can tell which Optuna trials a killed driver left
        behind; telling an Optuna trial that is already finished is a no-op; and the study
        never grows past ``num_samples`` trials (re-queued WAITING trials are proposed first),
        whatever Ray's own trial counter restored from a state saved before the crash says.
        """

        def __init__(self, *args, num_samples: int, **kwargs):
            super().__init__(*args, **kwargs)
            self._num_samples = num_samples

        def suggest(self, trial_id: str):
            if trial_id not in self._ot_trials and self._budget_spent():
                return Searcher.FINISHED
            config = super().suggest(trial_id)
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None and ot_trial.user_attrs.get("ray_trial_id") != trial_id:
                ot_trial.set_user_attr("ray_trial_id", trial_id)  # also re-points a re-queued trial
            return config

        def _budget_spent(self) -> bool:
            trials = self._ot_study.get_trials(deepcopy=False)
            return len(trials) >= self._num_samples and not any(
                t.state == TrialState.WAITING for t in trials
            )

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            value, step = result.get(self.metric), result.get(STEP)
            if (
                trial_id in self._ot_trials
                and trial_id not in self._completed_trials
                and step is not None
                and isinstance(value, (int, float))
                and math.isfinite(value)
                and not self._finished_in_storage(trial_id)
            ):
                self._ot_trials[trial_id].report(value, step)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            self._completed_trials.add(trial_id)
            stored = self._stored(trial_id)
            if stored.state.is_finished():
                return
            ot_trial = self._ot_trials[trial_id]
            result = result or {}
            value, step = result.get(self.metric), result.get(STEP)
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            if not error and finite and step is not None and step not in stored.intermediate_values:
                # Ray may hand the final result only to on_trial_complete: record it as the last rung value.
                ot_trial.report(value, step)
            if error or not finite:
                state, value = TrialState.FAIL, None
            elif result.get("trial_finished"):
                state = TrialState.COMPLETE
            else:
                state, value = TrialState.PRUNED, None
            self._ot_study.tell(ot_trial, value, state=state, skip_if_finished=True)

        def _stored(self, trial_id: str):
            """The Optuna trial as stored (state and intermediate values), not the searcher's handle."""
            return self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id)

        def _finished_in_storage(self, trial_id: str) -> bool:
            return self._stored(trial_id).state.is_finished()

    return MuraOptunaSearch


def make_searcher(plan: SearchPlan, scope: str, sample_fn):
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n = plan.scopes[scope]
    if plan.random_search:
        sampler = optuna.samplers.RandomSampler(seed=plan.seed)
    else:
        # Few startup trials for small budgets, TPE's default (10) for large ones.
        startup = max(2, min(10, n // 3))
        sampler = optuna.samplers.TPESampler(
            seed=plan.seed,
            constant_liar=True,
            multivariate=True,
            group=True,
            n_startup_trials=startup,
        )
    storage = optuna.storages.RDBStorage(f"sqlite:///{Path(plan.exp_dir) / 'optuna.db'}")
    return _searcher_class()(
        space=sample_fn,
        metric=METRIC,
        mode=MODE,
        sampler=sampler,
        study_name=f"{plan.name}:{scope}",
        storage=storage,
        seed=plan.seed,
        num_samples=n,
    )


def make_scheduler(plan: SearchPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if plan.random_search:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=STEP,
        metric=METRIC,
        mode=MODE,
        max_t=plan.max_epochs,
        grace_period=plan.grace_period,
        reduction_factor=plan.reduction_factor,
    )


# --- driver ------------------------------------------------------------------------------------
def plan_search(args) -> SearchPlan:
    """Validate the flags and resolve everything (paths, preset, resources, split, weights)."""
    from mura_tune.config import TrainConfig, parse_overrides
    from mura_tune.spaces import get_space

    space = get_space(args.space)
    cuda = _cuda_visible()
    preset_name = args.preset or ("gpu" if cuda else "cpu")
    preset = space.preset(preset_name)
    preset_samples, preset_epochs = preset.pop("num_samples", 10), preset.pop("max_epochs", 5)
    preset.pop("space_args", None)  # used by the space's sampler, not a config field
    num_samples = args.num_samples if args.num_samples is not None else preset_samples
    max_epochs = args.max_epochs if args.max_epochs is not None else preset_epochs
    _check(num_samples >= 1, f"--num-samples must be >= 1, got {num_samples}")
    _check(max_epochs >= 1, f"--max-epochs must be >= 1, got {max_epochs}")
    _check(
        1 <= args.grace_period <= max_epochs,
        f"--grace-period must be in [1, --max-epochs={max_epochs}], got {args.grace_period}",
    )
    _check(
        args.reduction_factor > 1, f"--reduction-factor must be > 1, got {args.reduction_factor}"
    )
    _check(
        args.max_concurrent is None or args.max_concurrent >= 1,
        f"--max-concurrent must be >= 1, got {args.max_concurrent}",
    )
    _check(args.max_failures >= 0, f"--max-failures must be >= 0, got {args.max_failures}")
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if cuda else 0.0)
    _check(gpus >= 0, f"--gpus-per-trial must be >= 0, got {gpus}")
    cpus = (
        args.cpus_per_trial
        if args.cpus_per_trial is not None
        else (4.0 if gpus else float(os.cpu_count() or 1))
    )
    _check(cpus > 0, f"--cpus-per-trial must be > 0, got {cpus}")
    overrides = parse_overrides(args.set)
    fixed = {**space.fixed, **preset, "max_epochs": max_epochs, "seed": args.seed, **overrides}
    if args.body_part:
        _check(
            args.body_part in BODY_PARTS,
            f"--body-part must be one of {', '.join(BODY_PARTS)}, got {args.body_part!r}",
        )
        fixed["body_part"] = args.body_part
    TrainConfig.from_dict(
        {k: v for k, v in fixed.items() if k in TrainConfig.__dataclass_fields__},
        source="--set/preset",
    )
    unknown = [k for k in fixed if k not in TrainConfig.__dataclass_fields__]
    _check(not unknown, f"--set {unknown[0] if unknown else ''}: not a config field")
    scopes = {args.body_part or "all": num_samples}
    if args.specialists:
        per_part = args.specialist_samples or max(2, num_samples // 4)
        scopes.update({part: per_part for part in BODY_PARTS})
    results = results_dir(args.results)
    name = args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check(
        "/" not in name and name not in ("", ".", ".."),
        f"--name must be a plain folder name, got {name!r}",
    )
    return SearchPlan(
        name=name,
        exp_dir=str(results / name),
        space=space.source if args.space.endswith(".py") else space.name,
        preset=preset_name,
        fixed=fixed,
        num_samples=num_samples,
        max_epochs=max_epochs,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        max_concurrent=args.max_concurrent,
        cpus_per_trial=cpus,
        gpus_per_trial=gpus,
        seed=args.seed,
        scopes=scopes,
        split_path=str(results / name / "split.parquet"),
        data=str(Path(args.data).expanduser().resolve()) if args.data else None,
        max_failures=args.max_failures,
        strict=args.strict,
        random_search=args.random_search,
        address=args.address,
    )


def results_dir(results: str) -> Path:
    """``--results`` as an absolute folder. Cloud URIs are refused: trials write their checkpoints,
    metrics and predictions straight to this path, so it must be a filesystem every node mounts.

    Raises:
        ConfigError: ``results`` is a URI (``s3://``, ``gs://``, ...).
    """
    if URI.match(str(results)):
        raise ConfigError(
            f"--results {results}: cloud URIs are not supported; trials write their files directly, "
            "so --results must be a folder on a filesystem shared by every node (e.g. NFS)"
        )
    return Path(results).expanduser().resolve()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_experiment(plan: SearchPlan, val_fraction: float) -> None:
    """Write the split once, build the shared image cache and resolve the starting weights.

    ``pretrained: auto`` and ``bodypart`` are resolved per backbone with the experiment's own
    split (body-part weights see its train images only), and every weights file a trial may
    start from is checked against that split here, before any trial starts.
    """
    from mura_tune.data.cache import build_cache
    from mura_tune.data.mura import read_dataset
    from mura_tune.data.split import assign_split, write_split

    exp = Path(plan.exp_dir)
    exp.mkdir(parents=True, exist_ok=True)
    table = assign_split(read_dataset(plan.data).table, val_fraction, plan.seed)
    write_split(table, plan.split_path)
    cache = build_cache(table["image_path"].tolist(), int(plan.fixed.get("image_size", 64)))
    if len(cache.unreadable):
        from mura_tune.io import write_parquet

        write_parquet(exp / "skipped_images.parquet", cache.unreadable)
        if plan.strict:  # one line: the error, not a "will be skipped" notice before it
            first = cache.unreadable.iloc[0]
            raise ExperimentError(
                f"{len(cache.unreadable)} unreadable image(s), e.g. {first['image_path']}: {first['reason']} "
                f"(--strict; list in {exp / 'skipped_images.parquet'})"
            )
        print(
            f"mura-tune: {len(cache.unreadable)} unreadable image(s) will be skipped; list in {exp / 'skipped_images.parquet'}",
            file=sys.stderr,
        )
    prepare_weights(plan, table, {"seed": plan.seed, "val_fraction": val_fraction, "path": plan.split_path})


def prepare_weights(plan: SearchPlan, table, split_info: dict) -> None:
    """Resolve ``pretrained: auto``/``bodypart`` per backbone and check every weights file against the split."""
    from mura_tune.weights import check_weights_split, resolve_pretrained

    pretrained = plan.fixed.get("pretrained", "none")
    if pretrained in ("auto", "bodypart"):
        image_size = int(plan.fixed.get("image_size", 64))
        plan.fixed["pretrained_by_model"] = {
            m: resolve_pretrained(m, pretrained, table, image_size, split_info=split_info)[0]
            for m in _space_models(plan)
        }
    for source in {pretrained, *plan.fixed.get("pretrained_by_model", {}).values()}:
        notice = check_weights_split(source, table)
        if notice:
            print(notice, file=sys.stderr)


def _space_models(plan: SearchPlan) -> list[str]:
    from mura_tune.spaces import get_space

    space = get_space(plan.space)
    if "model" in plan.fixed:
        return [plan.fixed["model"]]
    dims = space.dimensions()
    if "model" in dims:
        args = space.presets.get(plan.preset, {}).get("space_args", {})
        return list(args.get("backbones") or dims["model"].choices)
    return ["custom_cnn"]


def init_ray(address: str | None):
    """Start a private local Ray (no ``--address``) or join the cluster at ``address`` (``auto`` or HOST:PORT).

    Without ``--address`` (and without ``$RAY_ADDRESS``) Ray is started locally: plain
    ``ray.init()`` would silently join whatever cluster ``/tmp/ray/ray_current_cluster`` names.
    """
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address is None:  # a local Ray binds 127.0.0.1
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS") or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            configure_logging=True,
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"--address {address}: cannot connect to a Ray cluster ({str(exc).splitlines()[0]})"
        ) from None


def _trainable(plan: SearchPlan, scope: str):
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
    if scope != "all":
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
            "weights_source": None if source in ("imagenet", "none") else f"bodypart:{Path(source).name}",
        }
    trial_main(params, ctx)


def _run_scope(plan: SearchPlan, scope: str, resume: bool):
    from ray import tune

    ray_dir = plan.ray_dir(scope)
    trainable = _trainable(plan, scope)
    if resume and tune.Tuner.can_restore(str(ray_dir)) and read_ray_state(ray_dir) is not None:
        tuner = tune.Tuner.restore(
            str(ray_dir), trainable=trainable, resume_unfinished=True, resume_errored=False
        )
        return tuner.fit()
    return build_tuner(plan, scope, trainable).fit()


def build_tuner(plan: SearchPlan, scope: str, trainable=None, callbacks=(), verbose: int = 1, **tune_config):
    """The ``tune.Tuner`` of one scope; extra ``TuneConfig`` fields (e.g. ``time_budget_s``) for benchmarks."""
    from ray import tune

    from mura_tune.spaces import get_space

    ray_dir = plan.ray_dir(scope)
    space = get_space(plan.space)
    searcher = make_searcher(plan, scope, space.sampler_fn(plan.preset))
    reporter = tune.CLIReporter(
        metric_columns=REPORT_COLUMNS,
        parameter_columns=_report_params(space, plan),
        max_report_frequency=30,
        sort_by_metric=True,
        metric=METRIC,
        mode=MODE,
    )
    return tune.Tuner(
        trainable or _trainable(plan, scope),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_scheduler(plan),
            num_samples=plan.scopes[scope],
            max_concurrent_trials=plan.max_concurrent,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
            # One actor process runs trial after trial: its imports, torch threads and memory-mapped
            # cache are set up once, not per trial (benchmarks/bench_ray.py: ~9 s -> ~0.3 s per trial
            # here). A trial that errors or loses its node gets a fresh actor.
            reuse_actors=True,
            **tune_config,
        ),
        run_config=tune.RunConfig(
            name=ray_dir.name,
            storage_path=str(ray_dir.parent),
            # A retried trial (error, lost node) continues from its resume.pt.
            failure_config=tune.FailureConfig(max_failures=plan.max_failures),
            progress_reporter=reporter,
            callbacks=list(callbacks),
            verbose=verbose,
        ),
    )


def _report_params(space, plan) -> list[str]:
    return sorted(space.dimensions())[:4]


# --- crash recovery ----------------------------------------------------------------------------------
def _study(plan: SearchPlan, scope: str):
    """(storage, study id, trials) of the scope's Optuna study; (None, None, []) before it exists."""
    import optuna

    db = Path(plan.exp_dir) / "optuna.db"
    if not db.exists():
        return None, None, []
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    try:
        study_id = storage.get_study_id_from_name(f"{plan.name}:{scope}")
    except KeyError:
        return storage, None, []
    return storage, study_id, storage.get_all_trials(study_id, deepcopy=False)


def scope_done(plan: SearchPlan, scope: str) -> bool:
    """Every planned trial of the scope has ended, according to both Ray's saved state and Optuna."""
    state = read_ray_state(plan.ray_dir(scope))
    if state is None or any(t["status"] in UNFINISHED for t in state.values()):
        return False
    _, _, trials = _study(plan, scope)
    return len(trials) >= plan.scopes[scope] and all(t.state.is_finished() for t in trials)


def recover_scope(plan: SearchPlan, scope: str) -> tuple[list[str], int]:
    """Before resuming a scope, put back what a killed driver left half-done.

    Ray saves its experiment state every few seconds, so a driver killed with SIGKILL may have
    started trials Ray never recorded ("orphans"). An orphan that finished (its own files say
    so, or Optuna heard its end) is kept: Optuna is told its result if it was not, and the
    searcher's budget counts it. Any other orphan (seconds of work) moves to ``<exp>/orphaned/``
    for inspection, and its Optuna trial, still RUNNING in ``optuna.db``, goes back to WAITING
    so the resumed searcher proposes exactly those parameters again: the study ends with
    ``num_samples`` trials, as planned.

    Returns:
        (orphaned trial ids moved aside, Optuna trials re-queued)
    """
    import pandas as pd
    from optuna.trial import TrialState

    from mura_tune.io import write_json

    known = set(read_ray_state(plan.ray_dir(scope)) or {})
    storage, study_id, trials = _study(plan, scope)
    by_ray_id = {t.user_attrs.get("ray_trial_id"): t for t in trials}
    exp = Path(plan.exp_dir)
    moved = []
    for trial_dir in sorted((exp / "trials").glob("*")):
        meta = _read_json(trial_dir / "trial.json")
        if trial_dir.name in known or meta is None or meta.get("scope") != scope:
            continue
        told = by_ray_id.get(trial_dir.name)
        final = (_read_json(trial_dir / "summary.json") or {}).get("status")
        failed = final == "diverged" or (trial_dir / "error.json").exists()
        if (
            told is not None
            and not told.state.is_finished()
            and (failed or final in ("completed", "early_stopped"))
        ):
            optuna_id = storage.get_trial_id_from_study_id_trial_number(study_id, told.number)
            values = (
                []
                if failed
                else pd.read_parquet(trial_dir / "metrics.parquet")[[STEP, METRIC]].dropna().values
            )
            # As the searcher would have: every epoch, then the last one as the result.
            for epoch, value in values:
                storage.set_trial_intermediate_value(optuna_id, int(epoch), float(value))
            if len(values) and math.isfinite(values[-1][1]):
                storage.set_trial_state_values(
                    optuna_id, TrialState.COMPLETE, [float(values[-1][1])]
                )
            else:
                storage.set_trial_state_values(optuna_id, TrialState.FAIL)
            told = storage.get_trial(optuna_id)
        if told is not None and told.state.is_finished():
            write_json(
                trial_dir / RECOVERED_FILE, {"optuna_state": told.state.name, "time": time.time()}
            )
            continue
        dest = exp / ORPHANED_DIR / trial_dir.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(trial_dir, dest)
        ray_trial = plan.ray_dir(scope) / f"ray-{trial_dir.name}"
        if ray_trial.exists():
            os.replace(ray_trial, dest / "ray")
        moved.append(trial_dir.name)
    requeued = 0
    for trial in _study(plan, scope)[2]:  # re-read: the loop above may have finished some
        if trial.state == TrialState.RUNNING and trial.user_attrs.get("ray_trial_id") not in known:
            optuna_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            requeued += bool(storage.set_trial_state_values(optuna_id, TrialState.WAITING))
    return moved, requeued


def _drop_resume_states(plan: SearchPlan, scope: str) -> None:
    """A scope is done: no trial will resume, so free the disk its resume states hold (pruned trials')."""
    for trial_id in read_ray_state(plan.ray_dir(scope)) or {}:
        (Path(plan.exp_dir) / "trials" / trial_id / RESUME_FILE).unlink(missing_ok=True)


def resume_command(plan: SearchPlan) -> str:
    """The exact command that continues this experiment."""
    parts = [
        "mura-tune",
        "--space",
        plan.space,
        "--results",
        str(Path(plan.exp_dir).parent),
        "--name",
        plan.name,
        "--resume",
    ]
    if plan.address:
        parts += ["--address", plan.address]
    return shlex.join(parts)


def _load_for_resume(args) -> SearchPlan:
    if not args.name:
        raise ConfigError("--resume needs --name of the experiment to continue")
    exp_dir = results_dir(args.results) / args.name
    if not (exp_dir / EXPERIMENT_FILE).exists():
        raise ExperimentError(
            f"--resume: no experiment {args.name!r} in {exp_dir.parent} (missing {exp_dir / EXPERIMENT_FILE})"
        )
    plan = SearchPlan.load(exp_dir)
    named = (
        str(Path(args.space).expanduser().resolve()) if args.space.endswith(".py") else args.space
    )
    if named != plan.space:
        # The space file recorded in experiment.json is only executed if the user names it again.
        raise ConfigError(
            f"--resume: experiment {plan.name!r} searched --space {plan.space}; pass that, got --space {args.space}"
        )
    if args.address:
        plan.address = args.address
    return plan


def run_search(args) -> int:
    """`mura-tune --space ...`: plan or resume, run every scope, write and print the leaderboard.

    Ctrl-C (SIGINT) or SIGTERM stops the search cleanly: Ray saves its state, the leaderboard of
    what finished is written and the command prints how to resume; the exit code is 130.
    """
    from mura_tune.leaderboard import build_leaderboard, format_leaderboard

    if args.resume:
        plan = _load_for_resume(args)
    else:
        plan = plan_search(args)
        # A folder holding only what an interrupted preparation wrote (no experiment.json yet) is reused.
        leftovers = {p.name for p in Path(plan.exp_dir).glob("[!.]*")} - {
            "split.parquet",
            "skipped_images.parquet",
        }
        if leftovers:
            raise ExperimentError(
                f"experiment {plan.exp_dir} already exists; pass --resume to continue it or choose another --name"
            )
        prepare_experiment(plan, args.val_fraction)
        plan.save()
    print(
        f"mura-tune: experiment {plan.exp_dir} ({', '.join(f'{s}: {n} trials' for s, n in plan.scopes.items())})"
    )
    init_ray(plan.address)
    interrupted = False
    previous_term = _forward_sigterm()
    try:
        for scope in plan.scopes:
            if args.resume:
                if scope_done(plan, scope):
                    continue
                moved, requeued = recover_scope(plan, scope)
                if moved or requeued:
                    print(
                        f"mura-tune: {scope}: {requeued} trial(s) the stopped driver had started but Ray had not "
                        f"recorded will run again with the same parameters (old folders: {Path(plan.exp_dir) / ORPHANED_DIR})"
                    )
            _run_scope(plan, scope, resume=args.resume)
            if not scope_done(plan, scope):
                interrupted = True
                break
            _drop_resume_states(plan, scope)
    except KeyboardInterrupt:  # a second Ctrl-C: Ray may not have saved its very latest state
        interrupted = True
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    try:
        board = build_leaderboard(plan.exp_dir)
        print(format_leaderboard(board, top=5))
        print(f"wrote {Path(plan.exp_dir) / 'leaderboard.parquet'}")
    except ExperimentError as exc:  # interrupted before any trial started
        print(f"mura-tune: {exc}", file=sys.stderr)
    print(f"experiment folder: {plan.exp_dir}  (Optuna study: {Path(plan.exp_dir) / 'optuna.db'})")
    if interrupted:
        print(
            f"mura-tune: interrupted; finished trials are kept. Resume with: {resume_command(plan)}",
            file=sys.stderr,
        )
        return 130
    return 0


def _forward_sigterm():
    """Treat SIGTERM (cluster schedulers, ``kill``) like Ctrl-C, so Ray saves its state and stops cleanly."""
    try:
        return signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    except ValueError:  # not the main thread
        return None
