"""A search, planned: what was asked for, every rule checked, everything resolved (``experiment.json``).

The Python API of a search::

    from mura_tune import SearchPlan, run_search

    plan = SearchPlan(space="custom_cnn", data="path/to/MURA-v1.1", num_samples=8, max_epochs=4,
                      overrides={"image_size": 64}, name="my-search")
    result = run_search(plan)

:class:`SearchPlan` is the one place a search's settings are validated: the command line only
parses its flags (with this module's :data:`RULES`) and builds a plan. Constructing a plan checks
every field, resolves the defaults (the space's preset, resources, the experiment folder) and
fails with one :class:`~mura_tune.errors.ConfigError` line naming the rule and the value. The
plan is saved as ``<results>/<name>/experiment.json`` and is what every later step (preparation,
trials, resume, report) reads. Cloud URIs are refused as ``results``: trials write their files
straight to the folder, so it must be one every node mounts.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mura_tune.constants import BODY_PARTS
from mura_tune.errors import ConfigError, ExperimentError, Range, closest
from mura_tune.io import write_json
from mura_tune.layout import GENERALIST_SCOPE, ExperimentDir
from mura_tune.train.config import TrainConfig

#: ``num_samples`` of a search bounded by its time budget only.
UNBOUNDED = 100_000

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
#: The numeric rules of a plan's fields: the CLI parses its flags with them, the plan checks them.
RULES = {
    "num_samples": Range(int, 1),
    "max_epochs": Range(int, 1),
    "grace_period": Range(int, 1),
    "reduction_factor": Range(float, 1, low_open=True),
    "max_concurrent": Range(int, 1),
    "gpus_per_trial": Range(float, 0),
    "cpus_per_trial": Range(float, 0, low_open=True),
    "specialist_samples": Range(int, 1),
    "max_failures": Range(int, 0),
    "val_fraction": Range(float, 0, 1, low_open=True, high_open=True),
    "time_budget_s": Range(float, 0, low_open=True),
    "seed": Range(int, 0, 2**32 - 1),
}
#: Config fields a search flag sets for every trial: ``--set`` of one must agree with the flag.
SEARCH_FLAG_FIELDS = {"max_epochs": "max_epochs", "seed": "seed", "body_part": "body_part"}
SEARCH_FLAG_ROLES = {
    "max_epochs": "is also ASHA's max_t (trials longer than it are cut)",
    "seed": "also seeds the split and the sampler",
    "body_part": "also names the search's scope",
}
#: Fields whose flag is not ``--`` + the name with dashes.
FLAGS = {"time_budget_s": "--time-budget", "overrides": "--set"}


def flag_name(field_name: str) -> str:
    """The command-line flag of a plan field (how error messages name it)."""
    return FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


@dataclass
class SearchPlan:
    """Everything about a search: the settings asked for, checked and resolved; saved as ``experiment.json``.

    Args:
        space: a registered space (``mura-tune spaces``) or the path of a space file.
        data: MURA-v1.1 folder or manifest (None: the embedded synthetic set).
        results: the folder experiments go in (shared by every node on a cluster).
        name: the experiment's folder name (default ``<space>-<time>``).
        preset: ``cpu`` or ``gpu`` (default: ``gpu`` when CUDA is visible).
        num_samples: trials (default: the preset's; with ``time_budget_s``, as many as fit).
        max_epochs: ASHA's ``max_t`` (default: the preset's).
        grace_period: ASHA's first rung in epochs (default: the preset's, else 1).
        reduction_factor: ASHA's reduction factor, > 1 (default: the preset's, else 3).
        max_concurrent: trials at once (default: what the resources allow).
        cpus_per_trial: default 1 on CPU (as many trials as cores), 4 with a GPU.
        gpus_per_trial: fractions allowed (0.5: two trials share a GPU); default 1 with CUDA, else 0.
        seed: seeds the split, the samplers and the trials.
        val_fraction: share of the official train studies held out as val (by patient).
        body_part: search a specialist of one part (e.g. ``XR_WRIST``).
        specialists: the generalist search plus one search per body part.
        specialist_samples: trials per body part with ``specialists`` (default ``max(2, num_samples // 4)``).
        overrides: config fields fixed for every trial (``--set key=value``).
        max_failures: retries of a failed trial from its last finished epoch.
        strict: fail on unreadable images instead of skipping them.
        random_search: the baseline: random sampling and no early stopping.
        time_budget_s: wall-clock budget of each scope's Ray Tune run (Ray's ``time_budget_s``).
        address: join the Ray cluster at ``auto`` or ``HOST:PORT`` (default: a private local Ray).
        mlflow: log every trial as an MLflow run: ``True`` for the experiment's own store
            (``<exp>/mlruns/mlflow.db``) or a tracking URI (see :mod:`mura_tune.search.tracking`);
            saved resolved, so ``--resume`` keeps logging.

    Resolved when the plan is made (not arguments): ``exp_dir``, ``fixed`` (the config every
    trial shares: space + preset + overrides), ``fixed_dimensions`` (dimensions of the space
    that ``overrides`` fix: they are not searched), ``scopes`` (scope -> trials),
    ``split_path``, ``created``; ``space``, ``data`` and the defaulted fields hold their
    resolved values.

    Raises:
        ConfigError: a field breaks its rule, the space, preset or overrides are invalid, or an
            override contradicts a search flag (``--set max_epochs=3`` with ``--max-epochs 1``).
    """

    space: str
    data: str | None = None
    results: str = "results"
    name: str | None = None
    preset: str | None = None
    num_samples: int | None = None
    max_epochs: int | None = None
    grace_period: int | None = None
    reduction_factor: float | None = None
    max_concurrent: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    seed: int = 0
    val_fraction: float = 0.2
    body_part: str | None = None
    specialists: bool = False
    specialist_samples: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    max_failures: int = 2
    strict: bool = False
    random_search: bool = False
    time_budget_s: float | None = None
    address: str | None = None
    mlflow: str | bool | None = None
    # --- resolved ---------------------------------------------------------------------------------
    exp_dir: str = field(init=False, default="")
    fixed: dict[str, Any] = field(init=False, default_factory=dict)
    fixed_dimensions: dict[str, Any] = field(init=False, default_factory=dict)
    scopes: dict[str, int] = field(
        init=False, default_factory=dict
    )  # GENERALIST_SCOPE or a part -> trials
    split_path: str = field(init=False, default="")
    created: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._resolve()

    def _resolve(self) -> None:
        for name, rule in RULES.items():
            value = getattr(self, name)
            if value is not None:
                rule.check(value, flag_name(name))
        # The space registry imports Optuna: here, not at module level, so --help stays light.
        from mura_tune.search.spaces import SEARCH_DEFAULTS, SEARCH_KEYS, get_space

        space = get_space(self.space)
        fields_ = TrainConfig.__dataclass_fields__
        unknown = [k for k in self.overrides if k not in fields_]
        _check(
            not unknown,
            f"--set {unknown[0] if unknown else ''}: not a config field"
            + closest(unknown[0] if unknown else "", fields_),
        )
        self._adopt_overrides()
        cuda = _cuda_visible()
        self.preset = self.preset or ("gpu" if cuda else "cpu")
        if self.preset not in ("cpu", "gpu"):
            raise ConfigError(f"--preset must be cpu or gpu, got {self.preset!r}")
        preset = space.preset(self.preset)
        search = {key: preset.pop(key) for key in SEARCH_KEYS if key in preset}
        preset.pop("space_args", None)  # used by the space's sampler, not a config field
        # What the user gave wins, then the preset's value, then mura-tune's default. A time
        # budget without a trial count runs as many trials as fit.
        unbounded = self.time_budget_s is not None and self.num_samples is None
        defaults = {
            **SEARCH_DEFAULTS,
            **search,
            **({"num_samples": UNBOUNDED} if unbounded else {}),
        }
        given_grace = self.grace_period is not None
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if not given_grace:  # a preset's first rung never lies past the user's --max-epochs
            self.grace_period = min(self.grace_period, self.max_epochs)
        _check(
            1 <= self.grace_period <= self.max_epochs,
            f"--grace-period must be in [1, --max-epochs={self.max_epochs}], got {self.grace_period}",
        )
        if self.gpus_per_trial is None:
            self.gpus_per_trial = 1.0 if cuda else 0.0
        if self.cpus_per_trial is None:
            # On CPUs one thread per trial and as many trials as cores: small networks do not
            # speed up with more threads, and ASHA decides better with trials side by side.
            self.cpus_per_trial = 4.0 if self.gpus_per_trial else 1.0
        fixed = {
            **space.fixed,
            **preset,
            "max_epochs": self.max_epochs,
            "seed": self.seed,
            **self.overrides,
        }
        if self.body_part:
            _check(
                self.body_part in BODY_PARTS,
                f"--body-part must be one of {', '.join(BODY_PARTS)}, got {self.body_part!r}",
            )
            _check(not self.specialists, "--body-part and --specialists exclude each other")
            fixed["body_part"] = self.body_part
        TrainConfig.from_dict(
            {k: v for k, v in fixed.items() if k in TrainConfig.__dataclass_fields__},
            source="--set/preset",
        )
        unknown = [k for k in fixed if k not in fields_]
        _check(
            not unknown,
            f"space {space.name}: {unknown[0] if unknown else ''} is not a config field",
        )
        self.fixed = fixed
        from mura_tune.search.spaces import fixed_dimensions

        self.fixed_dimensions = fixed_dimensions(space, self.overrides, self.preset)
        self.scopes = {self.body_part or GENERALIST_SCOPE: self.num_samples}
        if self.specialists:
            per_part = self.specialist_samples or max(2, self.num_samples // 4)
            self.scopes.update({part: per_part for part in BODY_PARTS})
        results = results_dir(self.results)
        self.results = str(results)
        self.name = self.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        _check(
            "/" not in self.name and self.name not in ("", ".", ".."),
            f"--name must be a plain folder name, got {self.name!r}",
        )
        self.space = space.source if self.space.endswith(".py") else space.name
        self.data = str(Path(self.data).expanduser().resolve()) if self.data else None
        self.exp_dir = str(results / self.name)
        self.split_path = str(self.experiment.split)
        if self.mlflow or self.mlflow == "":
            from mura_tune.search.tracking import store_uri  # light: MLflow is not imported

            self.mlflow = store_uri(self.mlflow, self.experiment)
        else:
            self.mlflow = None
        self.created = time.time()

    def _adopt_overrides(self) -> None:
        """``--set`` of a field a search flag also sets: the same value, or the flag's when it is
        not given; a different value is refused (it would be silently overridden)."""
        for key, flag_field in SEARCH_FLAG_FIELDS.items():
            if key not in self.overrides:
                continue
            value, current = self.overrides[key], getattr(self, flag_field)
            if flag_field in RULES:
                RULES[flag_field].check(value, f"--set {key}")
            if current is None:
                setattr(self, flag_field, value)
            elif value != current:
                flag = flag_name(flag_field)
                raise ConfigError(
                    f"--set {key}={value} conflicts with {flag} {current}: {flag} {SEARCH_FLAG_ROLES[key]}; "
                    f"pass {flag} {value} instead of --set {key}"
                )

    @property
    def experiment(self) -> ExperimentDir:
        """The experiment's folder and the paths in it."""
        return ExperimentDir(Path(self.exp_dir))

    def ray_dir(self, scope: str) -> Path:
        """The Ray experiment folder of one scope (the experiment folder itself for the main scope)."""
        main = next(iter(self.scopes))
        return self.experiment.path if scope == main else self.experiment.specialists / scope

    def save(self) -> None:
        write_json(self.experiment.plan, asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchPlan:
        """A plan as saved (nothing is checked or resolved again: a space file is not imported)."""
        plan = cls.__new__(cls)
        for f in fields(cls):
            if f.name in values:
                setattr(plan, f.name, values[f.name])
            else:  # a field newer than the file
                setattr(
                    plan, f.name, f.default_factory() if callable(f.default_factory) else f.default
                )
        if "results" not in values and values.get("exp_dir"):
            plan.results = str(Path(values["exp_dir"]).parent)
        return plan

    @classmethod
    def load(cls, exp_dir: str | Path) -> SearchPlan:
        path = ExperimentDir(Path(exp_dir)).plan
        if not path.exists():
            raise ExperimentError(f"no experiment at {Path(exp_dir)} (missing {path.name})")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def for_resume(
        cls,
        results: str,
        name: str | None,
        space: str,
        address: str | None = None,
        mlflow: str | bool | None = None,
    ) -> SearchPlan:
        """The saved plan of experiment ``name``, to continue it (``--resume``).

        A search started with ``--mlflow`` keeps logging to its store; ``mlflow`` (the flag given
        again) cannot add MLflow to a search started without it (Ray restores its callbacks).

        Raises:
            ConfigError: no ``name``, ``space`` is not the space the experiment searched (a space
                file recorded in ``experiment.json`` is only executed if the user names it again),
                or ``mlflow`` for an experiment that was started without it.
            ExperimentError: there is no such experiment.
        """
        if not name:
            raise ConfigError("--resume needs --name of the experiment to continue")
        exp_dir = results_dir(results) / name
        if not ExperimentDir(exp_dir).plan.exists():
            raise ExperimentError(
                f"--resume: no experiment {name!r} in {exp_dir.parent} (missing {ExperimentDir(exp_dir).plan})"
            )
        plan = cls.load(exp_dir)
        named = str(Path(space).expanduser().resolve()) if space.endswith(".py") else space
        if named != plan.space:
            raise ConfigError(
                f"--resume: experiment {plan.name!r} searched --space {plan.space}; pass that, got --space {space}"
            )
        if address:
            plan.address = address
        if mlflow is not None and not plan.mlflow:
            raise ConfigError(
                f"--resume --mlflow: experiment {plan.name!r} was started without --mlflow, "
                "and MLflow logging cannot be added to a resumed search"
            )
        return plan

    def resume_command(self) -> str:
        """The exact command that continues this experiment."""
        parts = ["mura-tune", "--space", self.space, "--results", str(Path(self.exp_dir).parent), "--name", self.name,
                 "--resume"]  # fmt: skip
        if self.address:
            parts += ["--address", self.address]
        return shlex.join(parts)


def results_dir(results: str) -> Path:
    """``results`` as an absolute folder. Cloud URIs are refused: trials write their checkpoints,
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
    import torch  # only once the space is known: an unknown --space fails without it

    return torch.cuda.is_available()
