"""Search spaces, registered by name (timm-style registry).

A space is one small file in ``search_spaces/`` (or any file passed as ``--space path.py``)::

    from mura_tune.search.spaces import register_space

    @register_space("my_space", fixed={"model": "custom_cnn"},
                    presets={"cpu": {"image_size": 64, "max_epochs": 4, "num_samples": 8}})
    def my_space(trial):
        depth = trial.suggest_int("depth", 2, 6)
        if depth >= 4:                       # conditional dimensions are fine (define-by-run)
            trial.suggest_float("spatial_dropout", 0.0, 0.3)
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)

A plain dict of Optuna distributions works too (``register_space("name", {"lr": FloatDistribution(...)})``).
The sampled values plus anything the function returns become the trial's config on top of
``fixed`` and the preset. Names that are not config fields must be listed in ``aux`` (they are
still recorded in the leaderboard).

``start`` lists known-good configurations (parameter values of this space) that a TPE search
runs first, before its random start-up trials: the defaults mura-tune ships. ASHA then
compares every new trial, rung by rung, with a model worth having, and the ensemble has one
from the first minutes on (random search, the baseline, starts from nothing).

A dimension the user fixes (``--set depth=2``) leaves the search: the function is handed a
:class:`FixedTrial`, whose ``suggest_*`` of a fixed name returns the fixed value and registers
nothing in Optuna, so conditional code sees the fixed value and TPE never proposes one.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from mura_tune.errors import ConfigError
from mura_tune.train.config import TrainConfig

#: Search settings a space's preset may give (trials, ASHA's max_t, grace period and reduction
#: factor), and their values when neither the user nor the preset does.
SEARCH_DEFAULTS = {"num_samples": 10, "max_epochs": 5, "grace_period": 1, "reduction_factor": 3.0}
SEARCH_KEYS = tuple(SEARCH_DEFAULTS)
#: Keys a preset may hold besides config fields: the search settings and keyword arguments of the
#: space's function (e.g. ``space_args: {backbones: [densenet121]}`` for the CPU demo).
PRESET_KEYS = (*SEARCH_KEYS, "space_args")


@dataclass
class SearchSpace:
    name: str
    sample: Callable[[optuna.Trial], dict | None]  # define-by-run function
    fixed: dict[str, Any] = field(default_factory=dict)  # config values shared by every trial
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # cpu / gpu
    aux: tuple[str, ...] = ()  # sampled names that are not config fields
    description: str = ""
    source: str = ""  # the file that defined it
    start: tuple[dict[str, Any], ...] = ()  # known-good parameter values a TPE search runs first

    def preset(self, name: str) -> dict[str, Any]:
        return dict(self.presets.get(name, {}))

    def start_points(self, preset: str | None, fixed: dict[str, Any]) -> list[dict[str, Any]]:
        """The ``start`` configurations a search with this preset runs first.

        A value the preset's ranges do not contain, or a field fixed for every trial (``--set``),
        is left out of a point: what the user fixed stays fixed.
        """
        dims = self.dimensions(preset=preset)
        points = []
        for point in self.start:
            kept = {
                k: v
                for k, v in point.items()
                if k not in fixed and k in dims and _contains(dims[k], v)
            }
            if kept and kept not in points:
                points.append(kept)
        return points

    def sampler_fn(
        self, preset: str | None = None, fixed: dict[str, Any] | None = None
    ) -> Callable[[optuna.Trial], dict | None]:
        """The define-by-run function with the preset's ``space_args`` bound (picklable); the
        dimensions named in ``fixed`` (the user's ``--set``) are not searched."""
        args = self.presets.get(preset or "", {}).get("space_args")
        fn = functools.partial(self.sample, **args) if args else self.sample
        return functools.partial(_sample_fixed, fn, dict(fixed)) if fixed else fn

    def dimensions(
        self,
        n_samples: int = 64,
        seed: int = 0,
        preset: str | None = None,
        fixed: dict[str, Any] | None = None,
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        """Every dimension the space can sample (conditional ones included), found by sampling;
        with ``fixed``, those the search keeps once the fixed names are taken out."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        dims: dict[str, optuna.distributions.BaseDistribution] = {}
        sample = self.sampler_fn(preset, fixed=fixed)
        for _ in range(n_samples):
            trial = study.ask()
            sample(trial)
            dims.update(trial.distributions)
            study.tell(trial, 0.0)
        return dims


class FixedTrial:
    """The Optuna trial a space function sees when the user fixed some of its dimensions.

    ``suggest_*`` of a fixed name returns the fixed value without asking Optuna (nothing is
    registered, so TPE never proposes it and the trial's params do not hold it); every other
    call goes to the real trial.
    """

    def __init__(self, trial, fixed: dict[str, Any]):
        self._trial, self._fixed = trial, fixed

    def _suggest(self, method: str, name: str, *args, **kwargs):
        if name in self._fixed:
            return self._fixed[name]
        return getattr(self._trial, method)(name, *args, **kwargs)

    def suggest_float(self, name: str, *args, **kwargs):
        return self._suggest("suggest_float", name, *args, **kwargs)

    def suggest_int(self, name: str, *args, **kwargs):
        return self._suggest("suggest_int", name, *args, **kwargs)

    def suggest_categorical(self, name: str, *args, **kwargs):
        return self._suggest("suggest_categorical", name, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._trial, name)


def _sample_fixed(sample: Callable, fixed: dict[str, Any], trial, **kwargs):
    """``sample`` on a :class:`FixedTrial` (module level, so the searcher's state pickles it)."""
    return sample(FixedTrial(trial, fixed), **kwargs)


def fixed_dimensions(
    space: SearchSpace, overrides: dict[str, Any], preset: str | None = None
) -> dict[str, Any]:
    """The user's ``--set`` values of dimensions ``space`` searches (with ``preset``): they leave
    the search."""
    dims = space.dimensions(preset=preset)
    return {k: v for k, v in overrides.items() if k in dims}


_REGISTRY: dict[str, SearchSpace] = {}
_LOADED_BUILTINS = False


def register_space(
    name: str,
    space: dict | None = None,
    *,
    fixed: dict | None = None,
    presets: dict | None = None,
    aux: tuple[str, ...] = (),
    description: str = "",
    start: list[dict[str, Any]] | None = None,
):
    """Register a space. Use as a decorator on a define-by-run function, or pass a dict of distributions."""

    def add(fn: Callable) -> Callable:
        module = sys.modules.get(fn.__module__)
        _REGISTRY[name] = SearchSpace(
            name,
            fn,
            dict(fixed or {}),
            dict(presets or {}),
            tuple(aux),
            description or (fn.__doc__ or "").strip().split("\n")[0],
            getattr(module, "__file__", "") or "",
            tuple(dict(point) for point in start or ()),
        )
        return fn

    if space is not None:
        add(_dict_space(space, name))
        return _REGISTRY[name]
    return add


def _dict_space(space: dict, name: str) -> Callable:
    """Turn ``{name: optuna distribution}`` into a define-by-run function."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    for key, dist in space.items():
        if not isinstance(dist, (FloatDistribution, IntDistribution, CategoricalDistribution)):
            raise ConfigError(
                f"space {name}: {key} must be an Optuna distribution, got {type(dist).__name__}"
            )

    def sample(trial: optuna.Trial) -> None:
        for key, dist in space.items():
            if isinstance(dist, FloatDistribution):
                trial.suggest_float(key, dist.low, dist.high, log=dist.log, step=dist.step)
            elif isinstance(dist, IntDistribution):
                trial.suggest_int(key, dist.low, dist.high, log=dist.log, step=dist.step)
            else:
                trial.suggest_categorical(key, dist.choices)

    sample.__module__ = "mura_tune.search.spaces"
    sample.__qualname__ = f"dict_space_{name}"
    return sample


def _load_builtins() -> None:
    global _LOADED_BUILTINS
    if _LOADED_BUILTINS:
        return
    # The built-in spaces live in the top-level ``search_spaces`` package (a plain checkout, an
    # editable install and the wheel all provide it); imported here, not at module level, because
    # each of them imports this module to register itself.
    import search_spaces as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED_BUILTINS = True


def list_spaces(pattern: str = "*") -> list[str]:
    """Names of the registered spaces (``fnmatch`` pattern), sorted."""
    import fnmatch

    _load_builtins()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def load_space_file(path: str | Path) -> SearchSpace:
    """Import a user's space file (explicitly named: the only code we execute from a path)."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"--space {path}: file not found")
    module_name = f"mura_tune_user_space_{path.stem}"
    before = set(_REGISTRY)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # stable name: the searcher's state pickles its function
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(
            f"--space {path}: importing it failed: {type(exc).__name__}: {exc}"
        ) from None
    added = [n for n in _REGISTRY if n not in before or _REGISTRY[n].source == str(path)]
    if len(added) != 1:
        raise ConfigError(
            f"--space {path}: the file must call register_space exactly once, it registered {len(added)}"
        )
    return _REGISTRY[added[0]]


def get_space(name: str) -> SearchSpace:
    """A registered space by name, or a user's space file (``*.py``)."""
    if name.endswith(".py"):
        return load_space_file(name)
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown --space {name!r}; available: {', '.join(list_spaces())}{hint}")
    return _REGISTRY[name]


def sample_config(space: SearchSpace, trial: optuna.Trial) -> dict[str, Any]:
    """Sample one trial's parameters the way the searcher does (captured suggestions + returned dict)."""
    returned = space.sample(trial) or {}
    return {**trial.params, **returned}


def split_params(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """Config fields among sampled ``params``; unknown names (not in ``aux``) are an error."""
    fields = set(TrainConfig.__dataclass_fields__)
    unknown = [k for k in params if k not in fields and k not in space.aux]
    if unknown:
        raise ConfigError(
            f"space {space.name}: {unknown[0]!r} is neither a config field nor declared in aux"
        )
    return {k: v for k, v in params.items() if k in fields}


def _contains(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def describe_spaces() -> str:
    """`mura-tune spaces`: each space with its dimensions and ranges."""
    lines = []
    for name in list_spaces():
        space = _REGISTRY[name]
        lines.append(f"{name}: {space.description}")
        for dim, dist in sorted(space.dimensions().items()):
            lines.append(f"    {dim:<18} {_format_dist(dist)}")
        if space.fixed:
            lines.append(f"    fixed: {space.fixed}")
        for point in space.start:
            lines.append(f"    runs first: {point}")
        for preset, values in sorted(space.presets.items()):
            lines.append(f"    preset {preset}: {values}")
        lines.append("")
    lines.append(
        "Add one: a file calling mura_tune.search.spaces.register_space, passed as --space path/to/file.py"
    )
    return "\n".join(lines)


def _format_dist(dist) -> str:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return "{" + ", ".join(map(str, dist.choices)) + "}"
    kind = (
        "int"
        if isinstance(dist.low, int)
        and not isinstance(dist.low, bool)
        and type(dist).__name__ == "IntDistribution"
        else "float"
    )
    return (
        f"{kind} [{dist.low}, {dist.high}]"
        + (" log" if dist.log else "")
        + (f" step {dist.step}" if dist.step else "")
    )
