"""Grad-CAM: where in the radiograph a trained model looks when it calls a study abnormal.

    mura-tune cam --checkpoint results/demo/trials/ID/best.pt --image path/to/image1.png
    mura-tune cam --checkpoint results/demo/trials/ID/best.pt --study path/to/study1_positive --out cams/

Grad-CAM (Selvaraju et al. 2017) weights the channels of the last feature map
(``MuraNet.forward_features``) by the mean gradient of the abnormal logit, keeps the positive
part and scales it to [0, 1]. It works for the custom CNN and every timm backbone alike.
The overlay is drawn on the radiograph letterboxed at its own resolution (not the model's).
Inputs are prepared and the model is run through :class:`mura_tune.train.engine.Engine`, as in training
(``cam_command`` runs on CUDA when present).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mura_tune.data.images import ImageReadError, letterbox, load_gray, preprocess
from mura_tune.errors import ConfigError, DataError
from mura_tune.io import atomic_path
from mura_tune.train.checkpoint import load_checkpoint
from mura_tune.train.config import TrainConfig
from mura_tune.train.engine import Engine
from mura_tune.train.models import MuraNet

log = logging.getLogger(__name__)

#: Opacity of the heat map over the radiograph.
ALPHA = 0.45
#: Narrower overlays get no text label (it would hide the image).
LABEL_MIN_WIDTH = 160
#: Overlays are drawn at the radiograph's own resolution, up to this side.
OVERLAY_MAX_SIDE = 2048


def grad_cam(net: MuraNet, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM of the abnormal logit on the last feature map, resized to the input size.

    Args:
        net: a model with ``forward_features`` (last feature map) and ``head`` (pooled → logit).
        x: normalised input, ``(3, H, W)`` or ``(B, 3, H, W)``.

    Returns:
        ``(H, W)`` (or ``(B, H, W)`` for a batch) float32 maps in [0, 1]; all zeros where no
        location raises the logit.
    """
    single = x.dim() == 3
    x = (x.unsqueeze(0) if single else x).detach().clone().requires_grad_(True)
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            features = net.forward_features(x)
            logits = net.head(net.pool(features)).squeeze(1)
            (grads,) = torch.autograd.grad(logits.sum(), features)
    finally:
        net.train(was_training)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    flat = cam.flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1), flat.max(1).values.view(-1, 1, 1)
    span = high - low
    cam = torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))
    out = cam.clamp_(0.0, 1.0).float().cpu().numpy()
    return out[0] if single else out


def _read_gray(path: str | Path) -> np.ndarray:
    try:
        return load_gray(path)
    except ImageReadError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def model_input(
    path: str | Path, config: TrainConfig, engine: Engine | None = None
) -> torch.Tensor:
    """The exact network input for one image: ``(1, 3, S, S)`` (letterboxed, ImageNet-normalised).

    Uses :func:`mura_tune.data.images.preprocess` and :meth:`Engine.inputs`, the same
    preparation as training (on ``engine``'s device; default the CPU).

    Raises:
        DataError: the image cannot be read.
    """
    try:
        pixels = preprocess(path, config.image_size)
    except ImageReadError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return (engine or Engine("cpu")).inputs(torch.from_numpy(np.array(pixels)).unsqueeze(0))


def probability(
    net: MuraNet, x: torch.Tensor, tta_flip: bool = False, engine: Engine | None = None
) -> float:
    """The model's abnormal probability for one input (with flip TTA if the run used it)."""
    with torch.inference_mode():
        logit = (engine or Engine(x.device)).logits(net, x, tta_flip)
    return float(torch.sigmoid(logit)[0])


def jet(values: np.ndarray) -> np.ndarray:
    """The classic jet colormap (blue, cyan, yellow, red) of values in [0, 1]: ``(..., 3)`` floats."""
    v = np.asarray(values, dtype=np.float32)[..., None]
    return np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0], dtype=np.float32)), 0.0, 1.0)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Blend a jet-coloured CAM over a grayscale image of any size: ``(H, W, 3)`` uint8."""
    h, w = gray.shape
    heat = Image.fromarray(cam.astype(np.float32), mode="F")
    colour = jet(np.clip(np.asarray(heat.resize((w, h), Image.Resampling.BILINEAR)), 0.0, 1.0))
    base = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    blended = (1.0 - alpha) * base + alpha * colour
    return (np.clip(blended, 0.0, 1.0) * 255).round().astype(np.uint8)


def cam_image(
    net: MuraNet, config: TrainConfig, path: str | Path, engine: Engine | None = None
) -> tuple[np.ndarray, float]:
    """Overlay of one radiograph at its own letterboxed resolution, and its abnormal probability.

    Raises:
        DataError: the image cannot be read.
    """
    x = model_input(path, config, engine)
    cam = grad_cam(net, x[0])
    gray = _read_gray(path)
    # The model's framing, at the image's own resolution (capped: a large image stays cheap).
    native = letterbox(gray, min(max(gray.shape), OVERLAY_MAX_SIDE))
    return overlay(native, cam), probability(net, x, config.tta_flip, engine)


def save_overlay(image: np.ndarray, prob: float, path: str | Path) -> Path:
    """Write an overlay PNG, with ``p(abnormal)`` in its top-left corner when the image is large enough."""
    img = Image.fromarray(image)
    if img.width >= LABEL_MIN_WIDTH:
        draw = ImageDraw.Draw(img)
        text = f"p(abnormal)={prob:.2f}"
        box = draw.textbbox((4, 4), text)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
        draw.text((4, 4), text, fill=(255, 255, 255))
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def _views(study: Path) -> list[Path]:
    if not study.is_dir():
        raise DataError(f"--study {study}: not a folder")
    views = sorted(
        p for p in study.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")
    )
    if not views:
        raise DataError(f"--study {study}: no .png views in the folder")
    return views


def cam_command(
    checkpoint: str | Path,
    image: str | Path | None = None,
    study: str | Path | None = None,
    out: str | Path | None = None,
) -> list[Path]:
    """Write Grad-CAM overlays for one image or every view of a study.

    Args:
        checkpoint: a trial's ``best.pt``.
        image: one radiograph (PNG); ``out`` is then the output file (default ``cam-<study>-<image>.png``).
        study: a study folder; ``out`` is then a folder (default ``cam-<patient>-<study>/``) that
            receives one ``<view>.png`` per view.
        out: see above.

    Returns:
        The PNGs written.

    Raises:
        ConfigError: neither or both of ``image``/``study``, or an ``--out`` of the wrong kind.
        DataError: a missing checkpoint, image or study folder, or an unreadable image.
    """
    if (image is None) == (study is None):
        raise ConfigError("give exactly one of --image PNG or --study DIR")
    if image is not None:
        src = Path(image)
        if not src.is_file():
            raise DataError(f"--image {src}: file not found")
        dest = Path(out) if out else Path(f"cam-{src.parent.name}-{src.stem}.png")
        if dest.suffix.lower() != ".png":
            raise ConfigError(f"--out must be a .png file with --image, got {dest}")
        jobs = [(src, dest)]
    else:
        folder = Path(study)
        views = _views(folder)
        dest_dir = Path(out) if out else Path(f"cam-{folder.parent.name}-{folder.name}")
        if dest_dir.suffix.lower() == ".png":
            raise ConfigError(f"--out must be a folder with --study, got {dest_dir}")
        jobs = [(view, dest_dir / f"{view.stem}.png") for view in views]
    net, config = load_checkpoint(checkpoint)
    engine = Engine("auto")
    net = engine.model(net)
    written, probs = [], []
    for src, dest in jobs:
        try:
            picture, prob = cam_image(net, config, src, engine)
        except DataError as exc:
            if image is not None:
                raise
            log.warning(f"skipped a view: {exc}")  # the study's other views still get theirs
            continue
        written.append(save_overlay(picture, prob, dest))
        probs.append(prob)
        log.info(f"{src}: p(abnormal) = {prob:.3f}")
    if not probs:
        raise DataError(f"--study {study}: none of its {len(jobs)} view(s) could be read")
    if study is not None:
        verdict = "abnormal" if np.mean(probs) > 0.5 else "normal"
        log.info(
            f"study {study}: mean p(abnormal) = {np.mean(probs):.3f} over {len(probs)} view(s) -> {verdict}"
        )
    return written
