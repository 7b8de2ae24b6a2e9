"""Where a backbone's starting weights come from.

``pretrained`` in a config is one of:

* ``none`` — random initialisation;
* ``imagenet`` — timm's ImageNet weights, from the Hugging Face cache or the network;
* a path to a local ``.safetensors`` / ``.pth`` file (e.g. written by ``mura-tune pretrain``);
* ``auto`` — ImageNet when it can be had, else body-part-pretrained weights for that backbone,
  built once into ``$MURA_TUNE_HOME/weights`` (see :mod:`mura_tune.pretrain`).

Offline machines fail fast: we check the cache first, then make one connection attempt with a
short timeout (skipped when ``HF_HUB_OFFLINE=1``), never a retry loop.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch

from mura_tune.config import CUSTOM_CNN
from mura_tune.errors import WeightsError

PROBE_TIMEOUT_S = 3.0
ALTERNATIVES = "use pretrained: auto (body-part pretraining on your data), a local .safetensors/.pth path, or none"


def _hub_file(model: str) -> tuple[str, str] | None:
    """(hf_hub_id, filename) of timm's default pretrained weights for ``model``."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        return None
    return cfg.hf_hub_id, (cfg.hf_hub_filename or "model.safetensors")


def cached_imagenet_file(model: str) -> Path | None:
    """The ImageNet weights file in the local Hugging Face cache, if present."""
    from huggingface_hub import try_to_load_from_cache

    hub = _hub_file(model)
    if hub is None:
        return None
    for filename in (hub[1], "model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub[0], filename)
        if isinstance(found, str):
            return Path(found)
    return None


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection attempt to the Hugging Face endpoint, bounded by ``timeout`` (DNS included)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result = {"ok": False}

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result["ok"]


def imagenet_available(model: str) -> bool:
    return model != CUSTOM_CNN and _hub_file(model) is not None and (cached_imagenet_file(model) is not None or hub_reachable())


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth`` state dict (``weights_only=True``: no code is run)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"pretrained weights not found: {path} ({ALTERNATIVES})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state


def load_backbone_state(backbone: torch.nn.Module, state: dict[str, torch.Tensor], model: str) -> None:
    """Load backbone weights, ignoring classifier/head keys; mismatches are a one-line error."""
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "classifier.", "fc."))}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"weights do not fit {model}: {len(missing)} missing keys (e.g. {missing[:1]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )


def load_imagenet_state(model: str) -> dict[str, torch.Tensor]:
    """timm's ImageNet weights for ``model`` as a state dict, or a WeightsError within seconds."""
    cached = cached_imagenet_file(model)
    if cached is not None:
        return read_weights_file(cached)
    if _hub_file(model) is None:
        raise WeightsError(f"timm has no ImageNet weights for {model}; {ALTERNATIVES}")
    if not hub_reachable():
        raise WeightsError(
            f"ImageNet weights for {model} are not in the Hugging Face cache and the hub is unreachable; {ALTERNATIVES}"
        )
    import timm

    try:
        return timm.create_model(model, pretrained=True, num_classes=0).state_dict()
    except Exception as exc:
        raise WeightsError(f"downloading ImageNet weights for {model} failed ({str(exc).splitlines()[0]}); {ALTERNATIVES}") from None


def initial_backbone_state(model: str, pretrained: str) -> tuple[dict | None, str]:
    """Resolve ``pretrained`` to a backbone state dict (or None) and a source label for the leaderboard.

    ``auto`` must have been resolved to ``imagenet`` or a path by :func:`resolve_auto` first.
    """
    if pretrained in ("none", "", None):
        return None, "none"
    if pretrained == "imagenet":
        if model == CUSTOM_CNN:
            raise WeightsError(f"custom_cnn has no ImageNet weights; {ALTERNATIVES}")
        return load_imagenet_state(model), "imagenet"
    if pretrained == "auto":
        raise WeightsError("pretrained: auto must be resolved before training (mura_tune.weights.resolve_auto)")
    return read_weights_file(pretrained), f"file:{Path(pretrained).name}"


def resolve_auto(model: str, data=None, image_size: int = 64, verbose: bool = True) -> str:
    """Turn ``pretrained: auto`` into ``imagenet`` or the path of body-part-pretrained weights.

    Body-part weights are built once per (backbone, dataset) into ``$MURA_TUNE_HOME/weights``.
    """
    import sys

    if model == CUSTOM_CNN:
        return "none"
    if imagenet_available(model):
        if verbose:
            print(f"mura-tune: pretrained=auto -> ImageNet weights for {model}", file=sys.stderr)
        return "imagenet"
    from mura_tune.pretrain import ensure_bodypart_weights

    path = ensure_bodypart_weights(model, data=data, image_size=image_size, verbose=verbose)
    if verbose:
        print(f"mura-tune: pretrained=auto -> no ImageNet weights offline; body-part-pretrained {path}", file=sys.stderr)
    return str(path)
