"""The Ray Tune adapter: the only module that imports Ray Tune.

    mura-tune --space densenet_finetune                       # local Ray, embedded data
    mura-tune --space custom_cnn --num-samples 50 --address auto --results /shared/results --preset gpu

Trials run :func:`mura_tune.train.run_training` through ``tune.Tuner``, reporting once per epoch
with a checkpoint. Optuna's TPE (seeded, ``constant_liar`` so parallel trials do not duplicate)
proposes configurations; ASHA stops weak trials at its rungs, and those reach Optuna as PRUNED.
Every path is resolved here in the driver; trials write only below ``<results>/<name>/``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mura_tune.constants import BODY_PARTS, METRIC, MODE, TIME_ATTR
from mura_tune.errors import ConfigError, ExperimentError

EXPERIMENT_FILE = "experiment.json"
SPECIALISTS_DIR = "specialists"
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
    """Ray trainable: one trial = one :func:`run_training` with per-epoch ``tune.report``."""
    import pandas as pd
    import ray
    import torch
    from ray import tune

    from mura_tune.config import TrainConfig
    from mura_tune.io import write_json
    from mura_tune.spaces import get_space, split_params
    from mura_tune.train import TrialDiverged, run_training

    trial_id = tune.get_context().get_trial_id()
    out = Path(ctx["exp_dir"]) / "trials" / trial_id
    out.mkdir(parents=True, exist_ok=True)
    node_id = ray.get_runtime_context().get_node_id()
    space = get_space(ctx["space"])
    config = TrainConfig.from_dict({**ctx["fixed"], **split_params(space, params)}, source=f"trial {trial_id}")
    if ctx["cpus_per_trial"] and config.device in ("auto", "cpu") and not torch.cuda.is_available():
        config = config.updated({"threads": max(1, int(ctx["cpus_per_trial"]))})
    meta = {"trial_id": trial_id, "experiment": ctx["name"], "space": ctx["space"], "scope": ctx["scope"],
            "params": params, "node_id": node_id, "weights_source": ctx.get("weights_source"), "started": time.time()}
    write_json(out / "trial.json", meta)

    summary_path = out / "summary.json"
    if summary_path.exists() and json.loads(summary_path.read_text()).get("status") == "diverged":
        raise TrialDiverged(json.loads(summary_path.read_text()).get("reason"))  # a retry would diverge again

    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume_state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)

    def on_epoch(metrics: dict, state: dict) -> None:
        _maybe_inject_fault(ctx, trial_id, metrics["epoch"])
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        report["node_id"] = node_id
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / "state.pt")
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))

    split_table = pd.read_parquet(ctx["split_path"])
    try:
        run_training(config, split_table, out, on_epoch=on_epoch, resume_state=resume_state,
                     strict=ctx["strict"], verbose=False, weights_source=ctx.get("weights_source"))
    except Exception as exc:
        write_json(out / "error.json", {"reason": f"{type(exc).__name__}: {exc}".splitlines()[0], "time": time.time()})
        raise


def _maybe_inject_fault(ctx: dict, trial_id: str, epoch: int) -> None:
    """Test hook: ``MURA_TUNE_FAULT=kind@epoch`` (kind raise|oom) for trials listed by index."""
    fault = ctx.get("fault")
    if not fault:
        return
    kind, _, at = fault.partition("@")
    if epoch != int(at or 1) or (ctx.get("fault_trials") and trial_id[-5:].lstrip("0") not in ctx["fault_trials"]):
        return
    import torch

    if kind == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory (injected by MURA_TUNE_FAULT)")
    raise RuntimeError("trial failure injected by MURA_TUNE_FAULT")


def trial_dirname(trial) -> str:
    return f"ray-{trial.trial_id}"


# --- searcher ------------------------------------------------------------------------------------
def _searcher_class():
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class MuraOptunaSearch(OptunaSearch):
        """OptunaSearch that tells Optuna the truth about how a trial ended.

        Ray's OptunaSearch marks every trial with a final metric COMPLETE, so a trial ASHA
        stopped after one epoch would count as a finished trial with its 1-epoch score. Our
        trainable reports ``trial_finished`` on its last epoch; a trial that ends without it
        was stopped by the scheduler and is told to Optuna as PRUNED (its intermediate values
        were reported every epoch). Errors are FAIL, never a score.
        """

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            value = (result or {}).get(self.metric)
            step = (result or {}).get(TIME_ATTR)
            if not error and value is not None and step is not None and math.isfinite(value):
                # Ray hands the final result only to on_trial_complete: record it as the last rung value.
                ot_trial.report(value, step)
            if error or value is None or (isinstance(value, float) and math.isnan(value)):
                state, value = TrialState.FAIL, None
            elif result.get("trial_finished"):
                state = TrialState.COMPLETE
            else:
                state, value = TrialState.PRUNED, None
            self._ot_study.tell(ot_trial, value, state=state)
            self._completed_trials.add(trial_id)

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
        sampler = optuna.samplers.TPESampler(seed=plan.seed, constant_liar=True, multivariate=True, group=True,
                                             n_startup_trials=startup)
    storage = optuna.storages.RDBStorage(f"sqlite:///{Path(plan.exp_dir) / 'optuna.db'}")
    return _searcher_class()(space=sample_fn, metric=METRIC, mode=MODE, sampler=sampler,
                             study_name=f"{plan.name}:{scope}", storage=storage, seed=plan.seed)


def make_scheduler(plan: SearchPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if plan.random_search:
        return FIFOScheduler()
    return ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode=MODE, max_t=plan.max_epochs,
                         grace_period=plan.grace_period, reduction_factor=plan.reduction_factor)


# --- driver ------------------------------------------------------------------------------------
def plan_search(args) -> SearchPlan:
    """Validate the flags and resolve everything (paths, preset, resources, split, weights)."""
    from mura_tune.config import TrainConfig, parse_overrides
    from mura_tune.spaces import get_space

    space = get_space(args.space)
    cuda = _cuda_visible()
    preset_name = args.preset or ("gpu" if cuda else "cpu")
    preset = space.preset(preset_name)
    num_samples = args.num_samples or preset.pop("num_samples", 10)
    max_epochs = args.max_epochs or preset.pop("max_epochs", 5)
    preset.pop("num_samples", None), preset.pop("max_epochs", None), preset.pop("space_args", None)
    _check(num_samples >= 1, f"--num-samples must be >= 1, got {num_samples}")
    _check(max_epochs >= 1, f"--max-epochs must be >= 1, got {max_epochs}")
    _check(1 <= args.grace_period <= max_epochs, f"--grace-period must be in [1, --max-epochs={max_epochs}], got {args.grace_period}")
    _check(args.reduction_factor > 1, f"--reduction-factor must be > 1, got {args.reduction_factor}")
    _check(args.max_concurrent is None or args.max_concurrent >= 1, f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    _check(args.max_failures >= 0, f"--max-failures must be >= 0, got {args.max_failures}")
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if cuda else 0.0)
    _check(gpus >= 0, f"--gpus-per-trial must be >= 0, got {gpus}")
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else (4.0 if gpus else float(os.cpu_count() or 1))
    _check(cpus > 0, f"--cpus-per-trial must be > 0, got {cpus}")
    overrides = parse_overrides(args.set)
    fixed = {**space.fixed, **preset, "max_epochs": max_epochs, "seed": args.seed, **overrides}
    if args.body_part:
        _check(args.body_part in BODY_PARTS, f"--body-part must be one of {', '.join(BODY_PARTS)}, got {args.body_part!r}")
        fixed["body_part"] = args.body_part
    TrainConfig.from_dict({k: v for k, v in fixed.items() if k in TrainConfig.__dataclass_fields__}, source="--set/preset")
    unknown = [k for k in fixed if k not in TrainConfig.__dataclass_fields__]
    _check(not unknown, f"--set {unknown[0] if unknown else ''}: not a config field")
    scopes = {args.body_part or "all": num_samples}
    if args.specialists:
        per_part = args.specialist_samples or max(2, num_samples // 4)
        scopes.update({part: per_part for part in BODY_PARTS})
    results = Path(args.results).expanduser().resolve()
    name = args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check("/" not in name and name not in ("", ".", ".."), f"--name must be a plain folder name, got {name!r}")
    return SearchPlan(
        name=name, exp_dir=str(results / name), space=space.source if args.space.endswith(".py") else space.name,
        preset=preset_name, fixed=fixed, num_samples=num_samples, max_epochs=max_epochs, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, max_concurrent=args.max_concurrent, cpus_per_trial=cpus,
        gpus_per_trial=gpus, seed=args.seed, scopes=scopes, split_path=str(results / name / "split.parquet"),
        data=str(Path(args.data).expanduser().resolve()) if args.data else None, max_failures=args.max_failures,
        strict=args.strict, random_search=args.random_search, address=args.address,
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_experiment(plan: SearchPlan, val_fraction: float) -> None:
    """Write the split once, build the shared image cache and resolve ``pretrained: auto``."""
    from mura_tune.data.cache import build_cache
    from mura_tune.data.mura import read_dataset
    from mura_tune.data.split import assign_split, write_split
    from mura_tune.weights import resolve_auto

    exp = Path(plan.exp_dir)
    exp.mkdir(parents=True, exist_ok=True)
    table = assign_split(read_dataset(plan.data).table, val_fraction, plan.seed)
    write_split(table, plan.split_path)
    cache = build_cache(table["image_path"].tolist(), int(plan.fixed.get("image_size", 64)))
    if len(cache.unreadable):
        from mura_tune.io import write_parquet

        write_parquet(exp / "skipped_images.parquet", cache.unreadable)
        print(f"mura-tune: {len(cache.unreadable)} unreadable image(s) will be skipped; list in {exp / 'skipped_images.parquet'}",
              file=sys.stderr)
        if plan.strict:
            first = cache.unreadable.iloc[0]
            raise ExperimentError(f"{len(cache.unreadable)} unreadable image(s), e.g. {first['image_path']}: {first['reason']} (--strict)")
    if plan.fixed.get("pretrained") == "auto":
        models = _space_models(plan)
        resolved = {m: resolve_auto(m, data=plan.data, image_size=int(plan.fixed.get("image_size", 64))) for m in models}
        plan.fixed["pretrained_by_model"] = resolved


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
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray binds 127.0.0.1
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--address {address}: cannot connect to a Ray cluster ({str(exc).splitlines()[0]})") from None


def _trainable(plan: SearchPlan, scope: str):
    from ray import tune

    fixed = dict(plan.fixed)
    by_model = fixed.pop("pretrained_by_model", None)
    ctx = {"exp_dir": plan.exp_dir, "name": plan.name, "space": plan.space, "scope": scope, "fixed": fixed,
           "split_path": plan.split_path, "strict": plan.strict, "cpus_per_trial": plan.cpus_per_trial,
           "fault": os.environ.get("MURA_TUNE_FAULT"), "fault_trials": os.environ.get("MURA_TUNE_FAULT_TRIALS", "").split(",")
           if os.environ.get("MURA_TUNE_FAULT_TRIALS") else None}
    if scope != "all":
        ctx["fixed"]["body_part"] = scope
    if by_model:
        ctx["pretrained_by_model"] = by_model
    fn = tune.with_parameters(mura_trial, ctx=ctx)
    return tune.with_resources(fn, {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial})


def mura_trial(params: dict, ctx: dict) -> None:
    """Resolve ``pretrained: auto`` per backbone (done once in the driver), then run the trial."""
    by_model = ctx.get("pretrained_by_model")
    if by_model:
        model = params.get("model", ctx["fixed"].get("model", "custom_cnn"))
        source = by_model.get(model, "none")
        ctx = {**ctx, "fixed": {**ctx["fixed"], "pretrained": source},
               "weights_source": source if source in ("imagenet", "none") else f"bodypart:{Path(source).name}"}
    trial_main(params, ctx)


def _run_scope(plan: SearchPlan, scope: str, resume: bool):
    from ray import tune

    from mura_tune.spaces import get_space

    ray_dir = plan.ray_dir(scope)
    trainable = _trainable(plan, scope)
    if resume and tune.Tuner.can_restore(str(ray_dir)):
        tuner = tune.Tuner.restore(str(ray_dir), trainable=trainable, resume_unfinished=True, resume_errored=False)
        return tuner.fit()
    space = get_space(plan.space)
    searcher = make_searcher(plan, scope, space.sampler_fn(plan.preset))
    reporter = tune.CLIReporter(metric_columns=REPORT_COLUMNS, parameter_columns=_report_params(space, plan),
                                max_report_frequency=30, sort_by_metric=True, metric=METRIC, mode=MODE)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler(plan), num_samples=plan.scopes[scope],
                                    max_concurrent_trials=plan.max_concurrent, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=ray_dir.name, storage_path=str(ray_dir.parent),
            failure_config=tune.FailureConfig(max_failures=plan.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            progress_reporter=reporter, verbose=1,
        ),
    )
    return tuner.fit()


def _report_params(space, plan) -> list[str]:
    return sorted(space.dimensions())[:4]


def run_search(args) -> int:
    """`mura-tune --space ...`: plan or resume, run every scope, write and print the leaderboard."""
    from mura_tune.leaderboard import build_leaderboard, format_leaderboard

    if args.resume:
        if not args.name:
            raise ConfigError("--resume needs --name of the experiment to continue")
        exp_dir = Path(args.results).expanduser().resolve() / args.name
        if not (exp_dir / EXPERIMENT_FILE).exists():
            raise ExperimentError(f"--resume: no experiment {args.name!r} in {exp_dir.parent} (missing {exp_dir / EXPERIMENT_FILE})")
        plan = SearchPlan.load(exp_dir)
        if plan.space.endswith(".py"):
            from mura_tune.spaces import load_space_file

            load_space_file(plan.space)
        if args.address:
            plan.address = args.address
    else:
        plan = plan_search(args)
        if Path(plan.exp_dir).exists() and any(Path(plan.exp_dir).iterdir()):
            raise ExperimentError(f"experiment {plan.exp_dir} already exists; pass --resume to continue it or choose another --name")
        prepare_experiment(plan, args.val_fraction)
        plan.save()
    print(f"mura-tune: experiment {plan.exp_dir} ({', '.join(f'{s}: {n} trials' for s, n in plan.scopes.items())})")
    init_ray(plan.address)
    interrupted = False
    for scope in plan.scopes:
        result = _run_scope(plan, scope, resume=args.resume)
        if _was_interrupted(result):
            interrupted = True
            break
    board = build_leaderboard(plan.exp_dir)
    print(format_leaderboard(board, top=5))
    print(f"wrote {Path(plan.exp_dir) / 'leaderboard.parquet'}")
    print(f"experiment folder: {plan.exp_dir}  (Optuna study: {Path(plan.exp_dir) / 'optuna.db'})")
    if interrupted:
        print(f"mura-tune: interrupted; resume with: mura-tune --space {args.space} --name {plan.name} "
              f"--results {Path(plan.exp_dir).parent} --resume", file=sys.stderr)
        return 130
    return 0


def _was_interrupted(result_grid) -> bool:
    """True if Tuner.fit() returned early because of Ctrl-C (the experiment is resumable)."""
    state = getattr(result_grid, "_experiment_analysis", None)
    trials = getattr(state, "trials", []) if state is not None else []
    return any(t.status in ("PENDING", "RUNNING", "PAUSED") for t in trials)
