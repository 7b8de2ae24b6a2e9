"""Where a backbone's starting weights come from, and whether they can be trusted with a split.

``pretrained`` in a config is one of:

* ``none`` — random initialisation;
* ``imagenet`` — timm's ImageNet weights: a file copied in by hand
  (``$MURA_TUNE_HOME/weights/imagenet/<model>.safetensors`` or ``.pth``, a state dict as
  ``timm.create_model(model).state_dict()``; classifier keys are ignored), else the Hugging Face
  cache, else the hub if it answers one bounded connection attempt;
* ``auto`` — ImageNet weights when they can be had as above, otherwise random initialisation
  with a one-line notice saying how to provide ImageNet weights offline;
* ``bodypart`` — body-part-pretrained weights built once per exact train image list into
  ``$MURA_TUNE_HOME/weights`` from the run's own train split (see :mod:`mura_tune.train.pretrain`);
* a path to a local ``.safetensors`` / ``.pth`` file (e.g. written by ``mura-tune pretrain``).

Weights written by ``mura-tune pretrain`` carry the list of images they were trained on
(``<stem>.images.parquet``, its sha256 and count in ``<stem>.json``). Before a run or a search
trains from such a file, :func:`check_weights_split` refuses it if any of the run's val or test
images is in that list.

Offline machines fail fast: the local file and the cache are checked first, then one connection
attempt with a short timeout (skipped when ``HF_HUB_OFFLINE=1``), never a retry loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import torch

from mura_tune.errors import WeightsError, without_unsafe_advice
from mura_tune.home import weights_dir
from mura_tune.train.config import CUSTOM_CNN

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
ALTERNATIVES = "use pretrained: auto, bodypart (body-part pretraining on your train split), a local .safetensors/.pth path, or none"
WEIGHT_SUFFIXES = (".safetensors", ".pth")
#: ``pretrained`` values that name no file.
KEYWORDS = ("none", "", "imagenet", "auto", "bodypart")
#: Beside ``<stem>.safetensors``: the images the weights were trained on (one ``image_path`` column).
IMAGES_SUFFIX = ".images.parquet"


def imagenet_dir() -> Path:
    """``$MURA_TUNE_HOME/weights/imagenet``: ImageNet weights copied in by hand, ``<model>.safetensors|.pth``."""
    return weights_dir() / "imagenet"


def offline_hint(model: str) -> str:
    return (
        f"copy timm's ImageNet weights for {model} to {imagenet_dir() / model}.safetensors "
        "(or .pth), or set pretrained: bodypart"
    )


def local_imagenet_file(model: str) -> Path | None:
    """The hand-copied ImageNet weights file of ``model``, if present."""
    for suffix in WEIGHT_SUFFIXES:
        path = imagenet_dir() / f"{model}{suffix}"
        if path.is_file():
            return path
    return None


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
    host, port = (
        url.hostname or "huggingface.co",
        url.port or (443 if url.scheme == "https" else 80),
    )
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
    """Whether ImageNet weights of ``model`` can be had: a local file, the HF cache, or a hub that answers."""
    if model == CUSTOM_CNN:
        return False
    if local_imagenet_file(model) is not None:
        return True
    return _hub_file(model) is not None and (
        cached_imagenet_file(model) is not None or hub_reachable()
    )


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
        reason = without_unsafe_advice(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise WeightsError(f"cannot read weights {path}: {reason}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state


def load_backbone_state(
    backbone: torch.nn.Module, state: dict[str, torch.Tensor], model: str
) -> None:
    """Load backbone weights, ignoring classifier/head keys; mismatches are a one-line error."""
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "classifier.", "fc."))}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"weights do not fit {model}: {len(missing)} missing keys (e.g. {missing[:1]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )


def load_imagenet_state(model: str) -> tuple[dict[str, torch.Tensor], str]:
    """timm's ImageNet weights for ``model`` and where they came from, or a WeightsError within seconds.

    Returns:
        The state dict and its source label: ``imagenet:file:<path>`` (copied in by hand),
        ``imagenet:hf-cache`` or ``imagenet:hub``.
    """
    local = local_imagenet_file(model)
    if local is not None:
        return read_weights_file(local), f"imagenet:file:{local}"
    cached = cached_imagenet_file(model)
    if cached is not None:
        return read_weights_file(cached), "imagenet:hf-cache"
    if _hub_file(model) is None:
        raise WeightsError(f"timm has no ImageNet weights for {model}; {ALTERNATIVES}")
    if not hub_reachable():
        raise WeightsError(
            f"ImageNet weights for {model} are not in {imagenet_dir()} nor the Hugging Face cache, and the hub is "
            f"unreachable; {ALTERNATIVES}"
        )
    import timm

    try:
        return timm.create_model(model, pretrained=True, num_classes=0).state_dict(), "imagenet:hub"
    except Exception as exc:
        raise WeightsError(
            f"downloading ImageNet weights for {model} failed ({str(exc).splitlines()[0]}); {ALTERNATIVES}"
        ) from None


def initial_backbone_state(model: str, pretrained: str) -> tuple[dict | None, str]:
    """Resolve ``pretrained`` to a backbone state dict (or None) and a source label for the leaderboard.

    ``auto`` and ``bodypart`` must have been resolved by :func:`mura_tune.train.pretrain.resolve_pretrained` first.
    """
    if pretrained in ("none", "", None):
        return None, "none"
    if pretrained == "imagenet":
        if model == CUSTOM_CNN:
            raise WeightsError(f"custom_cnn has no ImageNet weights; {ALTERNATIVES}")
        return load_imagenet_state(model)
    if pretrained in ("auto", "bodypart"):
        raise WeightsError(
            f"pretrained: {pretrained} must be resolved before training (mura_tune.train.pretrain.resolve_pretrained)"
        )
    return read_weights_file(pretrained), f"file:{Path(pretrained).name}"


def resolve_auto(model: str, verbose: bool = True) -> str:
    """Turn ``pretrained: auto`` into ``imagenet`` (when it can be had) or ``none``.

    Offline without a local copy a warning (one line) says how to provide one.
    """
    if model == CUSTOM_CNN:
        return "none"
    if imagenet_available(model):
        if verbose:
            log.info("pretrained=auto -> ImageNet weights for %s", model)
        return "imagenet"
    if verbose:
        log.warning(
            "pretrained=auto -> random initialisation for %s: no ImageNet weights offline; %s",
            model,
            offline_hint(model),
        )
    return "none"


# --- provenance: which images a weights file has seen ---------------------------------------------
def resolved_paths(paths: Iterable[str]) -> list[str]:
    """Absolute paths with symlinks resolved: how image lists are written and compared."""
    return [os.path.realpath(p) for p in paths]


def image_list_digest(paths: Iterable[str]) -> str:
    """sha256 of the sorted (already resolved) image paths, one per line."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path}\n".encode())
    return digest.hexdigest()


def images_file(weights: str | Path) -> Path:
    """``<stem>.images.parquet`` beside a weights file."""
    weights = Path(weights)
    return weights.with_name(weights.stem + IMAGES_SUFFIX)


def provenance(weights: str | Path) -> dict | None:
    """The description written beside a weights file (``<stem>.json``), if any."""
    path = Path(weights).expanduser().with_suffix(".json")
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    return info if isinstance(info, dict) else None


def trained_images(weights: str | Path) -> set[str] | None:
    """The resolved image paths ``weights`` were trained on (None: the file records no list).

    Raises:
        WeightsError: the list is missing or does not match the digest and count recorded.
    """
    info = provenance(weights)
    record = (info or {}).get("images")
    if not isinstance(record, dict):
        return None
    listing = images_file(weights)
    try:
        paths = pd.read_parquet(listing, columns=["image_path"])["image_path"].tolist()
    except Exception as exc:
        raise WeightsError(
            f"weights {weights}: cannot read their image list {listing} ({str(exc).splitlines()[0]})"
        ) from None
    if len(paths) != record.get("count") or image_list_digest(paths) != record.get("sha256"):
        raise WeightsError(
            f"weights {weights}: image list {listing} does not match the digest and count in "
            f"{Path(weights).with_suffix('.json').name}"
        )
    return set(paths)


def check_weights_split(pretrained: str | None, split_table, notify: bool = True) -> None:
    """Refuse weights trained on any val or test image of ``split_table``.

    Args:
        pretrained: the config's ``pretrained`` (keywords such as ``imagenet`` are not files: nothing to check).
        split_table: the run's split manifest (``image_path``, ``split``).
        notify: log a warning when the file records no image list (nothing could be checked).

    Raises:
        WeightsError: one line naming the weights file and how many val/test images it was trained on.
    """
    if pretrained is None or str(pretrained) in KEYWORDS:
        return
    seen = trained_images(pretrained)
    if seen is None:
        if notify:
            log.warning(
                "%s records no list of the images it was trained on; cannot check that it never "
                "saw this run's val/test images",
                pretrained,
            )
        return
    held_out = split_table[split_table["split"].isin(["val", "test"])]
    overlap = [
        s for s, p in zip(held_out["split"], resolved_paths(held_out["image_path"])) if p in seen
    ]
    if overlap:
        n_val = overlap.count("val")
        raise WeightsError(
            f"weights {pretrained} were trained on {len(overlap)} of this run's held-out images "
            f"({n_val} val, {len(overlap) - n_val} test); pretrain on this split's train images "
            "(pretrained: bodypart, or `mura-tune pretrain` with the same --seed/--val-fraction or --split)"
        )
