"""A trained model on disk: ``best.pt``, written and read without pickled code.

``best.pt`` holds ``{"state_dict", "config", "epoch", "metric"}`` (tensors and plain values only),
so it loads with ``torch.load(weights_only=True)``: a file that would run code is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mura_tune.errors import REFUSED_PICKLE, DataError, without_unsafe_advice
from mura_tune.io import atomic_path
from mura_tune.train.config import TrainConfig
from mura_tune.train.models import MuraNet, build_model


def save_checkpoint(
    path: str | Path, net: torch.nn.Module, config: TrainConfig, epoch: int, metric: dict
) -> Path:
    """Write ``best.pt`` atomically: the model's state dict, its config, the epoch and the metric it was chosen by."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(
            {
                "state_dict": net.state_dict(),
                "config": config.to_dict(),
                "epoch": epoch,
                "metric": metric,
            },
            tmp,
        )
    return Path(path)


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[MuraNet, TrainConfig]:
    """Rebuild a model from ``best.pt`` (``weights_only=True``: no pickled code is executed).

    Raises:
        DataError: the file is missing, unreadable, holds pickled objects, or is not a checkpoint
            written by ``mura-tune train`` (other keys, or weights that do not fit its config).
        ConfigError: its config breaks a rule of this version.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"refusing checkpoint {path}: {REFUSED_PICKLE}") from None
    except Exception as exc:
        reason = without_unsafe_advice(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise DataError(f"cannot load checkpoint {path}: {reason}") from None
    if not (
        isinstance(blob, dict)
        and isinstance(blob.get("config"), dict)
        and isinstance(blob.get("state_dict"), dict)
    ):
        found = sorted(map(str, blob))[:6] if isinstance(blob, dict) else type(blob).__name__
        raise DataError(
            f"{path} is not a checkpoint written by `mura-tune train` (expected a dict with "
            f"state_dict and config, found {found})"
        )
    config = TrainConfig.from_dict({**blob["config"], "pretrained": "none"}, source=str(path))
    net = build_model(config)
    try:
        net.load_state_dict(blob["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise DataError(
            f"{path}: its weights do not fit the {config.model} its config describes "
            f"({str(exc).splitlines()[0][:200]})"
        ) from None
    return net.eval(), config
