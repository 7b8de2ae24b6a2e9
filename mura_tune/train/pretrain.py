"""Body-part pretraining: a starting point for fine-tuning when ImageNet weights cannot be had.

Every radiograph carries a free label, its body part (7 classes in MURA). A backbone trained to
tell them apart learns radiograph edges and bone shapes. On the embedded synthetic data that ranks
val studies a little better than frozen random blocks but does not clearly raise kappa (README,
benchmarks/pretrain_vs_random.py): it need not keep small findings. It is therefore opt-in:
``pretrained: bodypart`` (or a file written by ``mura-tune pretrain``), never ``auto``.

Only the ``train`` split is used: the experiment's own split table when it is given
(``pretrained: bodypart`` in a search or ``mura-tune train``), else the split
:func:`mura_tune.data.split.assign_split` makes with ``--val-fraction`` and ``--seed`` (match the
search's); the decoded cache is built from train paths only, and val/test images are never
opened. A slice of the train patients (``HOLDOUT_FRACTION``) is held out to report an honest
body-part accuracy. Training runs through :class:`mura_tune.train.engine.Engine` (CUDA when present).

    mura-tune pretrain --backbone densenet121 --epochs 2 --seed 3 --out weights/densenet121-bodypart.safetensors
    mura-tune train --set model=densenet121 --set unfreeze_blocks=1 \\
        --set pretrained=weights/densenet121-bodypart.safetensors

Writes the backbone's state dict (keys as ``timm.create_model(name, num_classes=0)``; the 7-way
head is dropped) atomically to ``--out`` (``.safetensors`` or ``.pth``), beside it
``<stem>.images.parquet`` (the resolved paths of the exact images it was trained on) and, last,
``<stem>.json``: backbone, task, classes, the image list's sha256 and count, the split it came
from, epochs, accuracy, device, timing. Loading such weights into a run checks that none of the
run's val or test images is in that list (:func:`mura_tune.train.weights.check_weights_split`).
``pretrained: bodypart`` builds such weights once per (backbone, exact train image list, size)
into ``$MURA_TUNE_HOME/weights`` (:func:`ensure_bodypart_weights`).
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mura_tune.data.cache import ImageCache, build_cache
from mura_tune.data.loader import SplitData, batch_loader
from mura_tune.data.mura import read_dataset
from mura_tune.data.split import assign_split
from mura_tune.errors import ConfigError, DataError
from mura_tune.home import weights_dir
from mura_tune.io import atomic_path, write_json, write_parquet
from mura_tune.train.config import CUSTOM_CNN, MODELS, TrainConfig
from mura_tune.train.engine import Engine
from mura_tune.train.models import build_model
from mura_tune.train.weights import (
    WEIGHT_SUFFIXES,
    image_list_digest,
    images_file,
    resolve_auto,
    resolved_paths,
)

log = logging.getLogger(__name__)

TASK = "body_part"
#: Fraction of train *patients* held out of pretraining to measure body-part accuracy.
HOLDOUT_FRACTION = 0.1
#: ``pretrained: bodypart`` defaults. On the embedded data at 64 px, densenet121 takes ~1-2 min an
#: epoch on 2 CPUs; 6 epochs reach 0.947 held-out body-part accuracy (2 epochs: 0.878).
BODYPART_EPOCHS = 6
BODYPART_LR = 1e-3
BODYPART_BATCH_SIZE = 32
AUG_STRENGTH = 0.5


class BodyPartNet(nn.Module):
    """Backbone → global average pool → linear layer over the body parts."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x).mean(dim=(2, 3)))


def check_backbone(backbone: str) -> None:
    """Raise ConfigError unless ``backbone`` is a model mura-tune can build."""
    if backbone not in MODELS:
        match = difflib.get_close_matches(backbone, list(MODELS), n=1)
        raise ConfigError(
            f"--backbone must be one of {', '.join(MODELS)}, got {backbone!r}"
            + (f" (did you mean {match[0]!r}?)" if match else "")
        )


def check_out(out: str | Path) -> Path:
    """The output path, or ConfigError when its suffix is not a weights format we read back."""
    path = Path(out).expanduser()
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(f"--out must end in .safetensors or .pth, got {path}")
    return path


def train_table(
    data: str | Path | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    split_table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The ``train`` rows of ``split_table``, or of ``data`` split as a search with this fraction and seed splits it."""
    if split_table is None:
        split_table = assign_split(read_dataset(data).table, val_fraction, split_seed)
    elif "split" not in split_table.columns:
        raise DataError("the split table given for pretraining has no 'split' column")
    return split_table[split_table["split"] == "train"].reset_index(drop=True)


def data_hash(train: pd.DataFrame) -> str:
    """sha256 of the sorted train images (path relative to their common folder, byte size, body part).

    A fingerprint of the data that survives moving the dataset (recorded in the description);
    the exact image list, with absolute paths, is what the load-time check compares.
    """
    root = os.path.commonpath(list(train["image_path"])) if len(train) else ""
    digest = hashlib.sha256(f"{TASK}\n".encode())
    for path, part in sorted(zip(train["image_path"], train["body_part"])):
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1
        digest.update(f"{os.path.relpath(path, root) if root else path}|{size}|{part}\n".encode())
    return digest.hexdigest()


def holdout_mask(train: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """True for the images of a seeded ``fraction`` of train patients (none if < 10 patients)."""
    patients = np.array(sorted(train["patient_id"].astype(str).unique()))
    if fraction <= 0 or len(patients) < 10:
        return np.zeros(len(train), dtype=bool)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(patients, size=max(1, int(round(fraction * len(patients)))), replace=False)
    return train["patient_id"].astype(str).isin(set(chosen)).to_numpy()


def _subset(cache: ImageCache, table: pd.DataFrame, classes: list[str]) -> SplitData:
    labels = torch.tensor([classes.index(p) for p in table["body_part"]], dtype=torch.long)
    return SplitData(
        cache.rows(table["image_path"]),
        labels,
        torch.ones(len(table)),
        table.reset_index(drop=True),
    )


def _cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, _weights: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def split_provenance(split_table: pd.DataFrame, **known) -> dict:
    """What identifies a split: sha256 of its (resolved image path, split) pairs, images per split, and ``known`` facts."""
    pairs = sorted(zip(resolved_paths(split_table["image_path"]), split_table["split"]))
    digest = hashlib.sha256("".join(f"{p}|{s}\n" for p, s in pairs).encode()).hexdigest()
    counts = split_table["split"].value_counts()
    return {
        "sha256": digest,
        "images": {name: int(counts.get(name, 0)) for name in ("train", "val", "test")},
        **{k: v for k, v in known.items() if v is not None},
    }


def save_backbone(
    state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write a backbone state dict atomically as ``.safetensors`` or ``.pth`` (by suffix)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out, suffix=out.suffix) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata=metadata)
        else:
            torch.save(state, tmp)
    return out


def pretrain_bodypart(
    backbone: str = "densenet121",
    data: str | Path | None = None,
    out: str | Path = "weights.safetensors",
    epochs: int = BODYPART_EPOCHS,
    image_size: int = 64,
    batch_size: int = BODYPART_BATCH_SIZE,
    lr: float = BODYPART_LR,
    seed: int = 0,
    val_fraction: float = 0.2,
    split_seed: int | None = None,
    split_table: pd.DataFrame | None = None,
    split_info: dict | None = None,
    threads: int = 0,
    workers: int | None = None,
    cache_root: Path | None = None,
    device: str = "auto",
    verbose: bool = True,
) -> tuple[Path, dict]:
    """Train ``backbone`` as a body-part classifier on the train split; write its backbone weights.

    Args:
        backbone: ``custom_cnn`` (default cell shape) or a timm backbone of :data:`~mura_tune.train.config.TIMM_BACKBONES`.
        data: dataset folder or manifest (None: the embedded synthetic set).
        out: ``.safetensors`` or ``.pth`` file for the backbone state dict; the image list and
            the description go beside it (``<stem>.images.parquet``, ``<stem>.json``).
        epochs: passes over the (train minus held-out) images.
        image_size: side of the square input; use the size you will fine-tune at.
        batch_size: images per step.
        lr: Adam's peak learning rate (cosine decay to 0 over the run).
        seed: seeds weights, shuffling, augmentation and the held-out patients.
        val_fraction: the val share of the split whose ``train`` part is used.
        split_seed: seed of that split (default: ``seed``); match the experiment's ``--seed``.
        split_table: an experiment's split manifest to take the ``train`` rows from instead
            (``val_fraction``/``split_seed`` are then unused).
        split_info: what is known of how ``split_table`` was made (seed, val_fraction, path),
            recorded in the description.
        threads: CPU threads for torch (0: ``OMP_NUM_THREADS`` or all cores).
        workers: image-decoding processes for the cache (default: all cores).
        cache_root: where the decoded cache lives (default ``$MURA_TUNE_HOME/cache``).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
        verbose: print progress to stderr.

    Returns:
        ``(out, info)``; ``info`` is also written to the ``.json`` beside ``out`` and holds
        ``holdout_accuracy`` (held-out train patients), ``train_accuracy`` (last epoch, augmented),
        ``images`` (sha256 and count of the image list written beside ``out``) and ``split``.

    Raises:
        ConfigError: unknown backbone, bad ``out`` suffix, or invalid epochs/size/batch/lr.
        DataError: the train split has fewer than two body parts.
    """
    started = time.time()
    check_backbone(backbone)
    out = check_out(out)
    config = TrainConfig(
        model=backbone,
        image_size=image_size,
        batch_size=batch_size,
        max_epochs=epochs,
        lr=lr,
        seed=seed,
        pretrained="none",
        unfreeze_blocks="all",
        device=device,
    )
    try:
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"pretrain: {exc}") from None
    split_seed = seed if split_seed is None else split_seed
    if split_table is None:
        split_table = assign_split(read_dataset(data).table, val_fraction, split_seed)
        split_info = {"val_fraction": val_fraction, "seed": split_seed, **(split_info or {})}
    train = train_table(split_table=split_table)
    classes = sorted(train["body_part"].astype(str).unique())
    if len(classes) < 2:
        raise DataError(
            f"body-part pretraining needs at least 2 body parts in the train split, found {classes}"
        )

    # Only train paths reach the decoder: val/test images are never opened.
    cache = build_cache(
        train["image_path"].tolist(), image_size, root=cache_root, workers=workers, progress=verbose
    )
    usable = train[~train["image_path"].isin(set(cache.unreadable["image_path"]))].reset_index(
        drop=True
    )
    held = holdout_mask(usable, HOLDOUT_FRACTION, seed)
    fit, holdout = _subset(cache, usable[~held], classes), _subset(cache, usable[held], classes)
    trained_on = sorted(resolved_paths(fit.table["image_path"]))

    torch.manual_seed(seed)
    engine = Engine(device)
    engine.set_threads(threads)
    body = build_model(config).backbone
    net = engine.model(BodyPartNet(body, body.num_features, len(classes)))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(len(fit) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    scaler = engine.grad_scaler()
    generator = torch.Generator().manual_seed(seed)
    if verbose:
        log.info(
            f"pretraining {backbone} on body parts ({len(classes)} classes) at {image_size}px on "
            f"{engine.device}: {len(fit)} train-split images, {len(holdout)} held out (val/test never read)"
        )
    train_acc = math.nan
    counts = {"correct": 0, "seen": 0}  # this epoch's training accuracy, counted step by step

    def on_step(logits: torch.Tensor, labels: torch.Tensor, _loss: torch.Tensor) -> None:
        schedule.step()  # the cosine schedule is per step
        counts["correct"] += int((logits.argmax(1) == labels).sum())
        counts["seen"] += len(labels)

    for epoch in range(epochs):
        t0 = time.time()
        counts.update(correct=0, seen=0)
        batches = batch_loader(
            cache, fit, batch_size, shuffle=True, seed=seed * 1000 + epoch, pin_memory=engine.cuda
        )
        loss = engine.train_epoch(
            net,
            batches,
            _cross_entropy,
            optimizer,
            scaler,
            AUG_STRENGTH,
            generator,
            on_step=on_step,
        )
        train_acc = counts["correct"] / max(counts["seen"], 1)
        if not math.isfinite(loss):
            raise ConfigError(
                f"body-part pretraining diverged at epoch {epoch + 1} (loss {loss}); lower --lr"
            )
        if verbose:
            log.info(
                f"pretrain epoch {epoch + 1}/{epochs}  loss {loss:.4f}  train_acc {train_acc:.3f}  "
                f"({time.time() - t0:.1f}s)"
            )
    holdout_acc = _accuracy(engine, net, cache, holdout, batch_size)

    info = {
        "backbone": backbone,
        "task": TASK,
        "classes": classes,
        "data": "embedded" if data is None else str(data),
        "data_hash": data_hash(train),
        "cache_key": cache.path.name,
        "splits": ["train"],
        "split": split_provenance(split_table, **(split_info or {})),
        "images": {
            "file": images_file(out).name,
            "sha256": image_list_digest(trained_on),
            "count": len(trained_on),
        },
        "holdout": {"fraction_of_train_patients": HOLDOUT_FRACTION, "images": len(holdout)},
        "n_images": len(fit),
        "epochs": epochs,
        "image_size": image_size,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "device": str(engine.device),
        "holdout_accuracy": holdout_acc,
        "train_accuracy": train_acc,
        "architecture": {
            k: getattr(config, k)
            for k in ("depth", "base_filters", "max_filters", "convs_per_cell", "batch_norm")
        }
        if backbone == CUSTOM_CNN
        else None,
        "seconds": round(time.time() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_parquet(images_file(out), pd.DataFrame({"image_path": trained_on}))
    save_backbone(
        net.backbone.state_dict(),
        out,
        metadata={"backbone": backbone, "task": TASK, "images_sha256": info["images"]["sha256"]},
    )
    write_json(out.with_suffix(".json"), info)  # last: weights without it are never picked up
    if verbose:
        log.info(
            f"body-part accuracy {holdout_acc:.3f} on {len(holdout)} held-out train-split images; "
            f"weights {out} ({info['seconds']:.0f}s)"
        )
    return out, info


def _accuracy(
    engine: Engine, net: nn.Module, cache: ImageCache, split: SplitData, batch_size: int
) -> float:
    if len(split) == 0:
        return math.nan
    batches = batch_loader(cache, split, batch_size * 2, shuffle=False, seed=0)
    logits = engine.predict(net, batches, len(split), activation=lambda x: x)
    return float((logits.argmax(1) == split.labels.numpy()).mean())


def bodypart_weights_path(
    model: str, digest: str, image_size: int, epochs: int | None = None
) -> Path:
    """``$MURA_TUNE_HOME/weights/<model>-bodypart-<train list digest>-<size>px-<recipe>.safetensors``.

    ``<recipe>`` hashes how the weights are trained (epochs, lr, batch, augmentation), so weights
    built by another recipe (an older mura-tune, other ``epochs``) are never picked up.
    """
    epochs = BODYPART_EPOCHS if epochs is None else epochs
    recipe = f"{TASK}|{epochs}|{BODYPART_LR}|{BODYPART_BATCH_SIZE}|{AUG_STRENGTH}"
    tag = hashlib.sha256(recipe.encode()).hexdigest()[:8]
    return weights_dir() / f"{model}-bodypart-{digest[:16]}-{image_size}px-{tag}.safetensors"


def ensure_bodypart_weights(
    model: str,
    split_table: pd.DataFrame,
    image_size: int = 64,
    verbose: bool = True,
    epochs: int | None = None,
    split_info: dict | None = None,
) -> Path:
    """Body-part-pretrained weights for ``model`` on ``split_table``'s train rows, built once (safe across processes).

    Args:
        model: backbone name.
        split_table: the run's split manifest: only its ``train`` rows are read, and the weights
            are keyed on that exact image list (another split is other weights).
        image_size: input side the weights are trained at (the experiment's ``image_size``).
        verbose: print what happens to stderr.
        epochs: pretraining epochs when the weights have to be built (default :data:`BODYPART_EPOCHS`).
        split_info: how the split was made (seed, val_fraction, path), for the description.

    Returns:
        The ``.safetensors`` path (its image list and ``.json`` description beside it).
    """
    check_backbone(model)
    epochs = BODYPART_EPOCHS if epochs is None else epochs
    train = train_table(split_table=split_table)
    path = bodypart_weights_path(
        model, image_list_digest(resolved_paths(train["image_path"])), image_size, epochs
    )
    done = path.with_suffix(".json")
    if path.exists() and done.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds it built
        if not (path.exists() and done.exists()):
            if verbose:
                log.info("building body-part-pretrained %s weights into %s (once)", model, path)
            pretrain_bodypart(
                model,
                out=path,
                epochs=epochs,
                image_size=image_size,
                seed=0,  # the weights are a function of the train list (and the recipe) alone
                split_table=split_table,
                split_info=split_info,
                verbose=verbose,
            )
    return path


def resolve_pretrained(
    model: str,
    pretrained: str,
    split_table,
    image_size: int,
    verbose: bool = True,
    split_info: dict | None = None,
) -> tuple[str, str | None]:
    """Resolve ``auto`` and ``bodypart`` for one backbone, with the run's own split.

    Args:
        model: the backbone.
        pretrained: the config's value.
        split_table: the run's split manifest: ``bodypart`` weights are trained on its
            ``train`` rows only.
        image_size: input side the ``bodypart`` weights are trained at.
        verbose: print what was chosen (stderr).
        split_info: what is known about how ``split_table`` was made (seed, val_fraction, path),
            recorded in the weights' provenance.

    Returns:
        ``(pretrained, weights_source)``: the value to train with, and the leaderboard label
        (None: derived when the weights are loaded).
    """
    if pretrained == "auto":
        return resolve_auto(model, verbose=verbose), None
    if pretrained != "bodypart":
        return pretrained, None
    if model == CUSTOM_CNN:
        raise ConfigError(
            "pretrained: bodypart is for timm backbones (custom_cnn's cells are searched per trial); "
            "use none, or a file written by `mura-tune pretrain --backbone custom_cnn` for the same cells"
        )
    path = ensure_bodypart_weights(
        model, split_table, image_size=image_size, verbose=verbose, split_info=split_info
    )
    if verbose:
        log.info("pretrained=bodypart -> %s", path)
    return str(path), f"bodypart:{path.name}"
