"""The one configuration of a training run (a trial, an ensemble member, a specialist).

    mura-tune train --set model=densenet121 --set unfreeze_blocks=1 --set pretrained=auto
    mura-tune train --config run.yaml --set lr=3e-4

Every field has a comment; :meth:`TrainConfig.validate` states the broken rule and the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mura_tune.constants import BODY_PARTS, METRIC, SELECT_METRICS, VAL_METRICS
from mura_tune.errors import ConfigError, closest
from mura_tune.io import write_json, write_yaml

CUSTOM_CNN = "custom_cnn"
TIMM_BACKBONES = (
    "densenet121",
    "densenet169",
    "densenet201",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
)
MODELS = (CUSTOM_CNN, *TIMM_BACKBONES)
GLOBAL_POOLS = ("avg", "max", "avgmax")


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------
    model: str = CUSTOM_CNN  # custom_cnn or a timm backbone (see TIMM_BACKBONES)
    depth: int = 4  # custom_cnn: number of cells (conv block + max-pool)
    base_filters: int = 16  # custom_cnn: filters of the first cell, doubled per cell
    max_filters: int = 256  # custom_cnn: cap on the doubling
    convs_per_cell: int = 1  # custom_cnn: conv-BN-ReLU repeats inside a cell
    batch_norm: bool = True  # custom_cnn: BatchNorm after each conv
    spatial_dropout: float = 0.0  # custom_cnn: Dropout2d rate after each cell (0 = off)
    global_pool: str = "max"  # avg | max | avgmax: how the last feature map becomes one vector (max finds small findings)
    dropout: float = 0.2  # dropout before the final logit
    head_widths: list[int] = field(
        default_factory=list
    )  # hidden widths of an MLP head (e.g. [512, 512])
    head_dropout: float = 0.0  # dropout after each hidden head layer
    pretrained: str = "none"  # none | imagenet | auto (ImageNet if available, else none) | bodypart | path/to/weights.safetensors|.pth
    unfreeze_blocks: int | str = (
        "all"  # backbone: train only the last K blocks (0 = head only) or "all"
    )
    # --- data ----------------------------------------------------------------------------
    image_size: int = 64  # side of the letterboxed square input (the MURA paper used 320)
    body_part: str | None = (
        None  # train/validate a specialist on one part (e.g. XR_WRIST); None = all
    )
    aug_strength: float = (
        0.2  # 0 = no augmentation; scales rotation (±30°·s), zoom, shift, brightness/contrast
    )
    tta_flip: bool = False  # average the prediction with its horizontal flip at evaluation
    # --- optimisation --------------------------------------------------------------------
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-3  # initial learning rate
    weight_decay: float = 0.0  # L2 (adam) or decoupled (adamw) weight decay
    batch_size: int = 32  # images per step
    max_epochs: int = 30  # upper bound on epochs (early stopping usually ends a run before it)
    class_weighting: bool = True  # MURA paper's per-body-part positive/negative weights in the BCE
    lr_factor: float = 0.2  # ReduceLROnPlateau factor on val loss
    lr_patience: int = 2  # ReduceLROnPlateau patience (epochs)
    lr_schedule: list[float] = field(
        default_factory=list
    )  # learning rate of each epoch, replayed in place of the plateau rule (a --cv refit replays its source trial's); [] = the plateau rule
    ema_decay: float = (
        0.998  # evaluate and keep an exponential moving average of the weights (per step; 0 = off)
    )
    early_stop_patience: int = 5  # stop after this many epochs without improving select_metric
    select_metric: str = (
        METRIC  # metric that picks the best checkpoint (maximised; *_loss minimised)
    )
    seed: int = 0  # seeds weights, shuffling and augmentation
    num_workers: int = 0  # data-loading worker processes (0 = in the training process)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision where the hardware has it (float16 on CUDA, bfloat16 training steps on CPUs with AMX/AVX512-BF16)
    threads: int = 0  # CPU threads for torch (0 = the resources given to the trial)

    # ---------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check every field; raise ConfigError naming the rule and the value."""

        def rule(ok: bool, text: str) -> None:
            if not ok:
                raise ConfigError(text)

        for name, kind in _TYPES.items():  # types first: the range rules below compare values
            value = getattr(self, name)
            rule(
                _has_type(value, kind),
                f"{name} must be {_KIND_TEXT.get(kind, kind)}, got {value!r}",
            )
        for name, kind in _TYPES.items():  # inf and nan pass no rule below by accident
            value = getattr(self, name)
            rule(
                kind != "float" or math.isfinite(value),
                f"{name} must be a finite number, got {value}",
            )
        rule(
            self.model in MODELS,
            f"model must be one of {', '.join(MODELS)}, got {self.model!r}"
            + closest(self.model, MODELS),
        )
        for name in (
            "depth",
            "base_filters",
            "max_filters",
            "convs_per_cell",
            "image_size",
            "batch_size",
            "max_epochs",
        ):
            value = getattr(self, name)
            rule(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be an integer >= 1, got {value!r}",
            )
        rule(self.depth <= 8, f"depth must be <= 8, got {self.depth}")
        rule(
            self.image_size >= (8 if self.model == CUSTOM_CNN else 32),
            f"image_size must be >= {8 if self.model == CUSTOM_CNN else 32} for {self.model}, got {self.image_size}",
        )
        for name in ("dropout", "head_dropout", "spatial_dropout"):
            value = getattr(self, name)
            rule(0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}")
        rule(
            0.0 <= self.aug_strength <= 1.0,
            f"aug_strength must be in [0, 1], got {self.aug_strength}",
        )
        rule(self.lr > 0, f"lr must be > 0, got {self.lr}")
        rule(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        rule(0 < self.lr_factor < 1, f"lr_factor must be in (0, 1), got {self.lr_factor}")
        rule(
            all(math.isfinite(v) and v > 0 for v in self.lr_schedule),
            f"lr_schedule must hold finite learning rates > 0, got {self.lr_schedule}",
        )
        rule(
            not self.lr_schedule or len(self.lr_schedule) >= self.max_epochs,
            f"lr_schedule must give a learning rate for each of the {self.max_epochs} epochs "
            f"(max_epochs), got {len(self.lr_schedule)}",
        )
        rule(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        rule(
            self.global_pool in GLOBAL_POOLS,
            f"global_pool must be one of {', '.join(GLOBAL_POOLS)}, got {self.global_pool!r}",
        )
        rule(
            self.optimizer in ("adam", "adamw"),
            f"optimizer must be adam or adamw, got {self.optimizer!r}",
        )
        rule(
            all(isinstance(w, int) and w >= 1 for w in self.head_widths),
            f"head_widths must be positive integers, got {self.head_widths}",
        )
        ub = self.unfreeze_blocks
        rule(
            ub == "all" or (isinstance(ub, int) and not isinstance(ub, bool) and ub >= 0),
            f"unfreeze_blocks must be 'all' or an integer >= 0, got {ub!r}",
        )
        rule(
            self.body_part is None
            or self.body_part in BODY_PARTS
            or not self.body_part.startswith("XR_"),
            f"body_part must be one of {', '.join(BODY_PARTS)}, got {self.body_part!r}"
            + closest(str(self.body_part), BODY_PARTS),
        )
        rule(
            self.lr_patience >= 0 and self.early_stop_patience >= 1,
            "lr_patience must be >= 0 and early_stop_patience >= 1",
        )
        rule(self.num_workers >= 0 and self.threads >= 0, "num_workers and threads must be >= 0")
        rule(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        rule(self.image_size <= 2048, f"image_size must be <= 2048, got {self.image_size}")
        rule(
            self.select_metric in SELECT_METRICS,
            f"select_metric must be a metric a run reports on val ({', '.join(VAL_METRICS[:7])} or "
            f"val_kappa_study_<PART>/val_auc_<PART>), got {self.select_metric!r}"
            + closest(self.select_metric, VAL_METRICS),
        )
        return self

    # ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; unknown keys are an error naming the closest field.

        Raises:
            ConfigError: an unknown key or a broken rule, prefixed with ``source`` (the file or flag).
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r}" + closest(unknown[0], names))
        try:
            return cls(**{k: _coerce(k, v) for k, v in values.items()}).validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"--config {path}: file not found")
        try:
            values = (
                json.loads(path.read_text())
                if path.suffix == ".json"
                else yaml.safe_load(path.read_text())
            )
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"--config {path}: not valid YAML/JSON ({str(exc).splitlines()[0]})"
            ) from None
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: expected a mapping of field: value")
        return cls.from_dict(values, source=str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        return (
            write_json(path, self.to_dict())
            if path.suffix == ".json"
            else write_yaml(path, self.to_dict())
        )

    def updated(self, overrides: dict[str, Any], source: str = "--set") -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **overrides}, source=source)


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Parse ``--set key=value`` pairs; values are read as YAML (numbers, booleans, lists, null)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
_KIND_TEXT = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "str | None": "a string or null",
    "list[int]": "a list of integers",
    "list[float]": "a list of numbers",
    "int | str": "an integer or a string",
}


def _has_type(value: Any, kind: str) -> bool:
    """Whether ``value`` is of the field type ``kind`` (the annotation's text) after :func:`_coerce`."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "int":
        return is_int
    if kind == "float":
        return is_int or isinstance(value, float)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "str | None":
        return value is None or isinstance(value, str)
    if kind == "list[int]":
        return isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    if kind == "list[float]":
        return isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
    if kind == "int | str":
        return is_int or isinstance(value, str)
    return True


def _coerce(name: str, value: Any) -> Any:
    """Light coercion of YAML-parsed values (e.g. ``lr: 1e-3`` parsed as a string by YAML 1.1)."""
    kind = _TYPES.get(name, "")
    if kind == "float" and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if kind == "list[int]" and isinstance(value, tuple):
        return list(value)
    if kind == "list[float]" and isinstance(value, (list, tuple)):
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    if name == "unfreeze_blocks" and isinstance(value, str) and value.isdigit():
        return int(value)
    if name == "pretrained" and value is None:
        return "none"
    return value
