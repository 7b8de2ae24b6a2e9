"""One training run: a config and a split manifest in, per-epoch metrics, the best checkpoint and
its predictions out. Knows nothing about Ray; :mod:`mura_tune.search` only schedules it.

    mura-tune train --set model=custom_cnn --set max_epochs=3 --out results/one-run

Outputs in ``out_dir`` (a :class:`~mura_tune.layout.TrialDir`): ``config.yaml``, ``metrics.parquet`` (one row per epoch), ``best.pt``
(``{"state_dict", "config", "epoch", "metric"}``, loadable with ``torch.load(weights_only=True)``),
``predictions.parquet`` (the best checkpoint's image probabilities on val and test) and
``summary.json`` (status, best epoch, val and test metrics, parameter counts, device, timing).
Test metrics are stored but never used to choose anything.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mura_tune.constants import KEPT_METRIC, METRIC
from mura_tune.data.cache import ImageCache, build_cache
from mura_tune.data.loader import SplitData, batch_loader
from mura_tune.errors import DataError
from mura_tune.io import write_json, write_parquet
from mura_tune.layout import TrialDir, TrialStatus
from mura_tune.metrics import split_metrics
from mura_tune.train.checkpoint import save_checkpoint
from mura_tune.train.config import TrainConfig
from mura_tune.train.ema import WeightAverage
from mura_tune.train.engine import Engine
from mura_tune.train.models import MuraNet, build_model, count_parameters
from mura_tune.train.weights import check_weights_split, initial_backbone_state

log = logging.getLogger(__name__)

#: Called once per epoch with (metrics, resumable state). Ray's adapter reports from here.
EpochCallback = Callable[[dict, dict], None]


class TrialDiverged(RuntimeError):
    """The loss became NaN/inf: the run stops and is recorded as an error, never as a score."""


@dataclass
class Prepared:
    cache: ImageCache
    train: SplitData
    val: SplitData
    test: SplitData
    skipped: pd.DataFrame  # unreadable images left out


def class_weights(train_table: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """MURA paper's per-body-part BCE weights from *study* counts: part -> (w_negative, w_positive).

    w_pos = |N_T| / (|A_T| + |N_T|) and w_neg = |A_T| / (|A_T| + |N_T|) for study type T.
    """
    studies = train_table.drop_duplicates("study_id")
    out = {}
    for part, grp in studies.groupby("body_part"):
        abnormal, normal = int(grp["label"].sum()), int((grp["label"] == 0).sum())
        total = max(abnormal + normal, 1)
        out[part] = (abnormal / total, normal / total) if abnormal and normal else (0.5, 0.5)
    return out


def prepare_data(
    split_table: pd.DataFrame,
    config: TrainConfig,
    cache_root: Path | None = None,
    strict: bool = False,
    progress: bool = True,
) -> Prepared:
    """Cache the split's images at ``config.image_size`` and index train/val/test (one part if scoped)."""
    # One cache for the whole split (shared by generalists and every specialist), then filter.
    cache = build_cache(
        split_table["image_path"].tolist(), config.image_size, root=cache_root, progress=progress
    )
    table = split_table
    if config.body_part is not None:
        table = table[table["body_part"] == config.body_part]
        if table.empty:
            raise DataError(f"body_part {config.body_part!r} has no images in this dataset")
    bad = cache.unreadable
    skipped = bad[bad["image_path"].isin(set(table["image_path"]))]
    if len(skipped) and strict:
        first = skipped.iloc[0]
        raise DataError(
            f"{len(skipped)} unreadable image(s), e.g. {first['image_path']}: {first['reason']} (--strict)"
        )
    usable = table[~table["image_path"].isin(set(skipped["image_path"]))]
    weights = class_weights(usable[usable["split"] == "train"])

    def subset(name: str) -> SplitData:
        part = usable[usable["split"] == name].reset_index(drop=True)
        labels = part["label"].to_numpy(dtype=np.float32)
        if config.class_weighting:
            w = np.array(
                [weights.get(p, (0.5, 0.5))[int(y)] for p, y in zip(part["body_part"], labels)],
                dtype=np.float32,
            )
            w = w / w.mean() if len(w) else w
        else:
            w = np.ones_like(labels)
        cols = ["image_path", "study_id", "body_part", "label", "split"]
        return SplitData(
            cache.rows(part["image_path"]),
            torch.from_numpy(labels),
            torch.from_numpy(w),
            part[cols],
        )

    prepared = Prepared(
        cache, subset("train"), subset("val"), subset("test"), skipped.reset_index(drop=True)
    )
    if len(prepared.train) == 0 or len(prepared.val) == 0:
        raise DataError(
            "the split has no train or no val images"
            + (f" for {config.body_part}" if config.body_part else "")
        )
    return prepared


def _maximise(metric: str) -> bool:
    return not metric.endswith("_loss")


def predict(
    net: MuraNet,
    data: Prepared,
    split: SplitData,
    device: torch.device | Engine,
    batch_size: int,
    tta_flip: bool,
    normalize: torch.nn.Module | None = None,
) -> np.ndarray:
    """Image probabilities for a split (eval mode, no augmentation, optional flip TTA)."""
    engine = device if isinstance(device, Engine) else Engine(device, normalize)
    batches = batch_loader(data.cache, split, batch_size * 2, shuffle=False, seed=0)
    return engine.predict(net, batches, len(split), tta_flip)


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The training loss: binary cross-entropy of the abnormal logit, weighted per image."""
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weights)


def run_training(
    config: TrainConfig,
    split_table: pd.DataFrame,
    out_dir: str | Path,
    on_epoch: EpochCallback | None = None,
    resume_state: dict | None = None,
    cache_root: Path | None = None,
    strict: bool = False,
    verbose: bool = True,
    weights_source: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Train one model; return the run summary (also written to ``summary.json``).

    Args:
        config: validated configuration (``pretrained`` already resolved from ``auto``).
        split_table: the experiment's split manifest (``split`` column: train/val/test).
        out_dir: the run's own folder.
        on_epoch: called after every epoch with the metrics and a resumable state dict.
        resume_state: a state from ``on_epoch`` to continue from (Ray restores, retries).
        cache_root: where the decoded-image cache lives (default ``$MURA_TUNE_HOME/cache``).
        strict: fail on unreadable images instead of skipping (and listing) them.
        verbose: print one progress line per epoch.
        weights_source: label recorded for the starting weights (default: derived from config).
        should_stop: asked after every training step; once it answers True (a compute budget ran
            out) the epoch in progress is evaluated as usual and the run ends with status
            ``stopped``.

    Raises:
        TrialDiverged: the training loss, or the val predictions, became NaN/inf (status
            ``diverged`` is written first).
    """
    config.validate()
    check_weights_split(
        config.pretrained, split_table, notify=False
    )  # before any work: weights never saw val/test
    started = time.time()
    run = TrialDir(Path(out_dir))
    run.path.mkdir(parents=True, exist_ok=True)
    config.save(run.config)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    engine = Engine(config.device, amp=config.amp)
    engine.set_threads(config.threads)
    if engine.cuda:
        torch.cuda.reset_peak_memory_stats(engine.device)

    data = prepare_data(split_table, config, cache_root=cache_root, strict=strict, progress=verbose)
    if len(data.skipped):
        write_parquet(run.skipped, data.skipped)
        if verbose:
            log.info("skipped %d unreadable image(s); list in %s", len(data.skipped), run.skipped)

    backbone_state, source = initial_backbone_state(config.model, config.pretrained)
    net = engine.model(build_model(config, backbone_state=backbone_state))
    trainable, total = count_parameters(net)
    params = [p for p in net.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience
    )
    scaler = engine.grad_scaler()
    generator = torch.Generator().manual_seed(config.seed)
    # The moving average is the model that is evaluated, kept and predicted with (train/ema.py).
    ema = WeightAverage(net, config.ema_decay) if config.ema_decay > 0 else None
    kept = ema.module if ema is not None else net

    history: list[dict] = []
    best = {"epoch": -1, "value": -math.inf if _maximise(config.select_metric) else math.inf}
    start_epoch = 0
    if resume_state is not None:
        net.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        plateau.load_state_dict(resume_state["plateau"])
        generator.set_state(resume_state["generator"])
        if ema is not None and resume_state.get("ema") is not None:
            ema.load_state_dict(resume_state["ema"])
        elif ema is not None:  # a state saved without an average: start it from the resumed weights
            ema = WeightAverage(net, config.ema_decay)
            kept = ema.module
        history, best, start_epoch = (
            resume_state["history"],
            resume_state["best"],
            resume_state["epoch"],
        )
    if verbose:
        log.info(
            f"{config.model}: {trainable:,} of {total:,} parameters trainable (unfreeze_blocks={config.unfreeze_blocks}); "
            f"weights: {weights_source or source}; device: {engine.device}; train/val/test images: "
            f"{len(data.train)}/{len(data.val)}/{len(data.test)}"
        )
    status = TrialStatus.FINISHED
    summary_base = {
        "trainable_params": trainable,
        "total_params": total,
        "weights_source": weights_source or source,
        "device": str(engine.device),
        "skipped_images": len(data.skipped),
        "images": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
    }

    for epoch in range(start_epoch, config.max_epochs):
        t0 = time.time()
        if config.lr_schedule:  # a replayed schedule (a --cv refit's) sets the rate of each epoch
            for group in optimizer.param_groups:
                group["lr"] = config.lr_schedule[epoch]
        batches = batch_loader(
            data.cache,
            data.train,
            config.batch_size,
            shuffle=True,
            seed=config.seed * 1000 + epoch,
            num_workers=config.num_workers,
            pin_memory=engine.cuda,
        )
        train_loss = engine.train_epoch(
            net,
            batches,
            weighted_bce,
            optimizer,
            scaler,
            config.aug_strength,
            generator,
            on_step=(lambda *_: ema.update(net)) if ema is not None else None,
            stop=should_stop,
        )
        budget_spent = should_stop is not None and should_stop()
        diverged = None
        if not math.isfinite(train_loss):
            diverged = f"training loss became {train_loss} at epoch {epoch + 1}"
        else:
            val_probs = predict(kept, data, data.val, engine, config.batch_size, config.tta_flip)
            if not np.isfinite(val_probs).all():  # the epoch's last update overflowed the weights
                diverged = (
                    f"the weights became non-finite at epoch {epoch + 1} (val predictions are NaN)"
                )
        if diverged:
            status = TrialStatus.DIVERGED
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "status": status.value})
            write_parquet(run.metrics, pd.DataFrame(history))
            _write_summary(
                run, config, summary_base, history, best, status, started, reason=diverged
            )
            raise TrialDiverged(diverged)

        val_frame = data.val.table.assign(prob=val_probs)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            **split_metrics(val_frame, "val"),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": 0.0,
        }
        if not config.lr_schedule:
            plateau.step(metrics["val_loss"])
        value = metrics.get(config.select_metric, math.nan)
        better = value > best["value"] if _maximise(config.select_metric) else value < best["value"]
        if best["epoch"] < 0 or better:
            best = {"epoch": epoch + 1, "value": value}
            test_probs = predict(kept, data, data.test, engine, config.batch_size, config.tta_flip)
            test_frame = data.test.table.assign(prob=test_probs)
            best["test"] = split_metrics(test_frame, "test") if len(test_frame) else {}
            best["val"] = {k: v for k, v in metrics.items() if k.startswith("val_")}
            save_checkpoint(run.checkpoint, kept, config, epoch + 1, {config.select_metric: value})
            write_parquet(run.predictions, pd.concat([val_frame, test_frame], ignore_index=True))
        metrics["epoch_seconds"] = time.time() - t0
        metrics["best_epoch"] = best["epoch"]
        metrics[f"best_{config.select_metric}"] = best["value"]
        metrics[KEPT_METRIC] = best["val"].get(METRIC, math.nan)
        stop_early = epoch + 1 - best["epoch"] >= config.early_stop_patience
        last = stop_early or budget_spent or epoch + 1 == config.max_epochs
        if budget_spent:
            status = TrialStatus.STOPPED
        elif stop_early and epoch + 1 < config.max_epochs:
            status = TrialStatus.EARLY_STOPPED
        metrics["status"] = (status if last else TrialStatus.TRAINING).value
        metrics["trial_finished"] = last
        history.append(metrics)
        write_parquet(run.metrics, pd.DataFrame(history))
        if verbose:
            log.info(
                f"epoch {epoch + 1}/{config.max_epochs}  train_loss {train_loss:.4f}  val_loss {metrics['val_loss']:.4f}  "
                f"val_auc {metrics['val_auc']:.3f}  val_kappa_study {metrics[METRIC]:.3f}  "
                f"({metrics['epoch_seconds']:.1f}s)"
            )
        if last:  # the summary is final before Ray learns the trial is finished
            _write_summary(run, config, summary_base, history, best, status, started)
        if on_epoch is not None:
            state = {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "plateau": plateau.state_dict(),
                "generator": generator.get_state(),
                "ema": ema.state_dict() if ema is not None else None,
                "history": history,
                "best": best,
                "epoch": epoch + 1,
            }
            on_epoch(dict(metrics), state)
        if last:
            break
    return _write_summary(run, config, summary_base, history, best, status, started)


def _write_summary(
    run: TrialDir,
    config: TrainConfig,
    base: dict,
    history: list[dict],
    best: dict,
    status: TrialStatus,
    started: float,
    reason: str | None = None,
) -> dict:
    summary = {
        **base,
        "status": status.value,
        "reason": reason,
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "select_metric": config.select_metric,
        "best_value": best["value"] if best["epoch"] > 0 else None,
        "val": best.get("val", {}),
        "test": best.get("test", {}),
        "wall_seconds": time.time() - started,
        "peak_gpu_memory_mb": _peak_gpu_memory_mb(base["device"]),
    }
    write_json(run.summary, summary)
    return summary


def _peak_gpu_memory_mb(device: str) -> float | None:
    """Peak CUDA memory this process allocated since the run started (None off CUDA)."""
    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)
