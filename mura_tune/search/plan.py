"""A search, planned: the flags validated and everything resolved in the driver (``experiment.json``).

:class:`SearchPlan` is saved as ``<results>/<name>/experiment.json`` and is what every later step
(preparation, trials, resume, report) reads. Cloud URIs are refused as ``--results``: trials write
their files straight to the folder, so it must be one every node mounts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mura_tune.constants import BODY_PARTS
from mura_tune.errors import ConfigError, ExperimentError
from mura_tune.io import write_json
from mura_tune.search.leaderboard import SPECIALISTS_DIR
from mura_tune.train.config import TrainConfig, parse_overrides

EXPERIMENT_FILE = "experiment.json"
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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
        write_json(Path(self.exp_dir) / EXPERIMENT_FILE, asdict(self))

    @classmethod
    def load(cls, exp_dir: str | Path) -> SearchPlan:
        path = Path(exp_dir) / EXPERIMENT_FILE
        if not path.exists():
            raise ExperimentError(f"no experiment at {Path(exp_dir)} (missing {EXPERIMENT_FILE})")
        return cls(**json.loads(path.read_text()))




def plan_search(args) -> SearchPlan:
    """Validate the flags and resolve everything (paths, preset, resources, split, weights)."""
    from mura_tune.search.spaces import get_space

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
