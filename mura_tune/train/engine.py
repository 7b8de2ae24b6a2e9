"""The one training core: where tensors run and how a batch goes through a network.

Training (:func:`mura_tune.train.run.run_training`), body-part pretraining
(:mod:`mura_tune.train.pretrain`), ensemble prediction (:mod:`mura_tune.ensemble.predict`) and Grad-CAM
(:mod:`mura_tune.report.cam`) all go through an :class:`Engine`, so a fix here reaches all four:

* device choice (``auto``: CUDA when it is there), CPU thread count;
* mixed precision: on CUDA float16 autocast with a GradScaler (training and evaluation); on a CPU
  with bfloat16 units (AMX / AVX512-BF16) bfloat16 autocast for the training steps only, while
  evaluation stays float32, so predictions are exact and the same on every CPU;
* channels_last memory layout (CUDA and CPU: oneDNN's convolutions prefer it);
* non-blocking host-to-device copies (the loader pins memory on CUDA);
* input preparation: uint8 ``(B, S, S)`` → [0, 1] floats → optional augmentation → ImageNet
  normalisation (3 channels);
* the train-epoch loop (any loss; an optional per-step hook, e.g. a per-step LR schedule or
  accuracy counting) and the predict loop (optional horizontal-flip TTA).

    engine = Engine("auto")
    net = engine.model(build_model(config))
    loss = engine.train_epoch(net, batches, bce_loss, optimizer, engine.grad_scaler(), 0.2, generator)
    probs = engine.predict(net, val_batches, n_val, tta_flip=False)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import numpy as np
import torch

from mura_tune.train.augment import Normalize, augment, to_unit

#: ``loss_fn(logits, labels, weights) -> scalar loss`` (weights: per-image loss weights).
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``on_step(logits, labels, loss)`` after every optimiser step (tensors detached, on the device).
StepHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix work natively (oneDNN's check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else as torch reads it."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    """Device, precision and memory layout of one run, and the loops that use them.

    Measured on this project's 2-core CPU (custom_cnn at 48 px, one thread, batch 32):
    channels_last trains 1.5x and evaluates 2.5x as fast as the default layout, and bfloat16
    autocast a further 1.6x in training (``benchmarks/bench_feed.py`` prints the speed).

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (or a ``torch.device``).
        normalize: the input normalisation (default: ImageNet statistics, 3 channels).
        amp: mixed precision where the hardware has it (float16 on CUDA, bfloat16 training
            steps on a CPU that supports it); ``False`` keeps everything float32.
    """

    def __init__(
        self,
        device: str | torch.device = "auto",
        normalize: torch.nn.Module | None = None,
        amp: bool = True,
    ):
        self.device = resolve_device(device)
        self.cuda = self.device.type == "cuda"
        self.amp = amp and self.cuda  # float16 autocast + GradScaler, training and evaluation
        self.cpu_bf16 = amp and not self.cuda and cpu_has_bf16()  # training steps only
        self.channels_last = True
        self.normalize = (normalize if normalize is not None else Normalize()).to(self.device)

    def set_threads(self, threads: int = 0) -> None:
        """CPU threads for torch (0: ``OMP_NUM_THREADS`` or every core); nothing to do on CUDA."""
        if not self.cuda:
            torch.set_num_threads(
                threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
            )

    def model(self, net: torch.nn.Module) -> torch.nn.Module:
        """Move ``net`` to the device, in channels_last layout."""
        net = net.to(self.device)
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def autocast(self):
        """Mixed precision of evaluation (float16 on CUDA with AMP; float32 on a CPU)."""
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()

    def train_autocast(self):
        """Mixed precision of a training step (also bfloat16 on a CPU that has it)."""
        if self.cpu_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return self.autocast()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler for AMP (a pass-through off CUDA)."""
        return torch.amp.GradScaler("cuda", enabled=self.amp)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def inputs(
        self,
        images: torch.Tensor,
        aug_strength: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """uint8 ``(B, S, S)`` → the network input ``(B, 3, S, S)`` on the device.

        Augmentation (training only) runs on the device, before normalisation.
        """
        x = to_unit(self.to_device(images))
        x = self.normalize(augment(x, aug_strength, generator))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def logits(self, net: torch.nn.Module, x: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
        """Float32 outputs of ``net`` on ``x`` (averaged with the horizontal flip's if ``tta_flip``)."""
        with self.autocast():
            out = net(x).float()
            if tta_flip:
                out = (out + net(torch.flip(x, dims=[3])).float()) / 2
        return out

    def train_epoch(
        self,
        net: torch.nn.Module,
        batches: Iterable,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        aug_strength: float = 0.0,
        generator: torch.Generator | None = None,
        on_step: StepHook | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> float:
        """One pass over ``batches`` (``(images, labels, weights, positions)``); the mean loss per image.

        ``stop()`` is asked after every step; when it answers True the pass ends there (a
        compute budget ran out: the caller asks ``stop()`` again to know).
        """
        net.train()
        loss_sum, seen = torch.zeros((), device=self.device), 0
        for images, labels, weights, _ in batches:
            x = self.inputs(images, aug_strength, generator)
            labels, weights = self.to_device(labels), self.to_device(weights)
            with self.train_autocast():
                logits = net(x).float()
            loss = loss_fn(logits, labels, weights)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
            if on_step is not None:
                on_step(logits.detach(), labels, loss.detach())
            if stop is not None and stop():
                break
        return float(loss_sum) / max(seen, 1)

    def predict(
        self,
        net: torch.nn.Module,
        batches: Iterable,
        n: int,
        tta_flip: bool = False,
        activation: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid,
    ) -> np.ndarray:
        """``activation(logits)`` of ``n`` images in eval mode, rows placed by each batch's positions."""
        net.eval()
        out: np.ndarray | None = None
        with torch.inference_mode():
            for images, _, _, pos in batches:
                values = activation(self.logits(net, self.inputs(images), tta_flip)).cpu().numpy()
                if out is None:
                    out = np.empty((n, *values.shape[1:]), dtype=np.float32)
                out[pos.numpy()] = values
        return out if out is not None else np.empty(0, dtype=np.float32)
