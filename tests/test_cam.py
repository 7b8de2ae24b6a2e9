"""Grad-CAM: shape and range for every kind of backbone, localisation on a learnable finding, the CLI.

The localisation test renders radiographs with the synthetic generator (forearms, half with
metal hardware, half normal; every confounder of the generator included) and trains a small
custom_cnn with max pooling to tell them apart; Grad-CAM must then peak inside the box where the
generator says it drew the finding. The other tests use a cheaper model trained on 32 px noise
images with a bright square (plus a bright distractor line in every image).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from PIL import Image

from mura_tune.data.images import letterbox
from mura_tune.data.synth.render import ImageJob, render
from mura_tune.report.cam import cam_command, grad_cam
from mura_tune.train.augment import Normalize, to_unit
from mura_tune.train.config import TrainConfig
from mura_tune.train.models import build_model

SIZE, SQUARE = 32, 6


def squares(
    n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
    """``n`` uint8 images (half with a bright square), labels, and each image's square box (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(60, 12, (n, SIZE + 4, SIZE + 4))
    images = (noise[:, :-4, :-4] + noise[:, 4:, 4:] + noise[:, 2:-2, 2:-2]) / 3
    labels = rng.random(n) < 0.5
    boxes = []
    for i in range(n):
        lx, ly = rng.integers(1, SIZE - 1), rng.integers(0, SIZE - 10)
        images[i, ly : ly + 10, lx] = 230  # the distractor, in every image
        x0, y0 = (int(v) for v in rng.integers(2, SIZE - SQUARE - 2, 2))
        boxes.append((x0, y0, x0 + SQUARE, y0 + SQUARE))
        if labels[i]:
            images[i, y0 : y0 + SQUARE, x0 : x0 + SQUARE] = 230
    pixels = torch.from_numpy(np.clip(images, 0, 255).astype(np.uint8))
    return pixels, torch.from_numpy(labels.astype(np.float32)), boxes


def small_config(**kw) -> TrainConfig:
    base = {
        "model": "custom_cnn",
        "depth": 2,
        "base_filters": 8,
        "image_size": SIZE,
        "dropout": 0.0,
        "batch_norm": True,
        "spatial_dropout": 0.0,
        "head_widths": [],
        "pretrained": "none",
    }
    return TrainConfig().updated({**base, **kw})


@pytest.fixture(scope="module")
def trained():
    """A custom_cnn trained to find the square (two epochs, a few seconds)."""
    torch.manual_seed(0)
    images, labels, _ = squares(256, seed=0)
    config = small_config()
    net, norm = build_model(config), Normalize()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(2):
        net.train()
        for batch in torch.randperm(len(images)).split(32):
            loss = F.binary_cross_entropy_with_logits(
                net(norm(to_unit(images[batch]))), labels[batch]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), config


@pytest.mark.parametrize("model", ["custom_cnn", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_cam_has_the_input_size_and_values_in_unit_range(model):
    torch.manual_seed(0)
    net = build_model(
        small_config(model=model, unfreeze_blocks=0)
    ).eval()  # frozen backbone: CAM still works
    x = Normalize()(to_unit(squares(3, seed=1)[0]))
    single = grad_cam(net, x[0])
    assert single.shape == (SIZE, SIZE) and single.dtype == np.float32
    batch = grad_cam(net, x)
    assert batch.shape == (3, SIZE, SIZE)
    assert np.isfinite(batch).all() and batch.min() >= 0.0 and batch.max() <= 1.0
    np.testing.assert_allclose(batch[0], single, atol=1e-5)
    odd = grad_cam(net, torch.nn.functional.interpolate(x[:1], size=(40, 40)))
    assert odd.shape == (1, 40, 40)
    assert not net.training


RADIOGRAPH = 64


def radiographs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``n`` letterboxed forearm radiographs from the generator (odd ones with visible hardware),
    labels, and the generator's box of each finding mapped into the letterboxed frame (else None)."""
    images, labels, boxes = [], [], []
    for i in range(n):
        abnormal = i % 2 == 1
        job = ImageJob(
            idx=i,
            study_idx=i,
            rel_path="unused.png",
            part="XR_FOREARM",
            finding="hardware" if abnormal else "none",
            visible=abnormal,
            view=0,
        )
        pixels, visible, (x0, y0, x1, y1) = render(job, seed, RADIOGRAPH, difficulty=0.0)
        gray = pixels if pixels.ndim == 2 else pixels[..., 0]
        h, w = gray.shape
        side = max(h, w)
        top, left, k = (side - h) // 2, (side - w) // 2, RADIOGRAPH / side
        images.append(letterbox(gray, RADIOGRAPH))
        labels.append(float(abnormal))
        boxes.append((round((x0 + left) * k), round((y0 + top) * k), round((x1 + left) * k), round((y1 + top) * k))
                     if visible else None)  # fmt: skip
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), boxes


def test_cam_is_highest_over_the_generators_finding():
    torch.manual_seed(0)
    images, labels, _ = radiographs(320, seed=0)
    config = small_config(depth=3, base_filters=16, image_size=RADIOGRAPH, global_pool="max")
    net, norm = build_model(config), Normalize()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(5):
        net.train()
        for batch in torch.randperm(len(images)).split(32):
            loss = F.binary_cross_entropy_with_logits(
                net(norm(to_unit(images[batch]))), labels[batch]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    test_images, test_labels, boxes = radiographs(64, seed=1)  # other patients, other poses
    x = norm(to_unit(test_images))
    with torch.no_grad():
        accuracy = ((net(x) > 0).float() == test_labels).float().mean().item()
    assert accuracy >= 0.75, (
        f"the model did not learn to see the hardware (accuracy {accuracy:.2f})"
    )
    shown = [i for i, box in enumerate(boxes) if box is not None]
    peaks_inside, box_share = [], []
    for cam, i in zip(grad_cam(net, x[shown]), shown):
        x0, y0, x1, y1 = boxes[i]
        inside = np.zeros_like(cam, dtype=bool)
        inside[y0:y1, x0:x1] = True
        peak = np.unravel_index(cam.argmax(), cam.shape)
        peaks_inside.append(bool(inside[peak]))
        box_share.append(inside.mean())
    # A map that ignored the finding would peak inside its box about as often as the box's share of the image.
    assert np.mean(peaks_inside) >= 0.7 > 2 * np.mean(box_share), (
        f"CAM peaks on the finding in {np.mean(peaks_inside):.0%} of images (boxes cover {np.mean(box_share):.0%})"
    )


def _checkpoint(trained, path):
    net, config = trained
    torch.save(
        {"state_dict": net.state_dict(), "config": config.to_dict(), "epoch": 2, "metric": {}}, path
    )
    return path


def test_cam_command_writes_overlays_at_native_letterboxed_size(trained, tmp_path, monkeypatch):
    ckpt = _checkpoint(trained, tmp_path / "best.pt")
    study = tmp_path / "patient00001" / "study1_positive"
    study.mkdir(parents=True)
    images, _, _ = squares(2, seed=3)
    for k, pixels in enumerate(images, 1):  # non-square views: 48 wide, 36 high
        Image.fromarray(pixels.numpy()).resize((48, 36)).save(study / f"image{k}.png")
    written = cam_command(ckpt, study=study, out=tmp_path / "cams")
    assert written == [tmp_path / "cams" / "image1.png", tmp_path / "cams" / "image2.png"]
    for path in written:
        with Image.open(path) as img:
            assert img.size == (48, 48) and img.mode == "RGB"
    monkeypatch.chdir(tmp_path)
    (single,) = cam_command(ckpt, image=study / "image1.png")
    assert single.resolve() == tmp_path / "cam-study1_positive-image1.png" and single.is_file()
    assert (
        run_cli(
            "cam",
            "--checkpoint",
            ckpt,
            "--image",
            study / "image2.png",
            "--out",
            tmp_path / "o.png",
        )
        == 0
    )
    assert (tmp_path / "o.png").is_file()


def test_cam_bad_paths_are_one_line_errors(trained, tmp_path, capsys):
    ckpt = _checkpoint(trained, tmp_path / "best.pt")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    cases = [
        (("--checkpoint", tmp_path / "missing.pt", "--image", tmp_path / "bad.png"), "missing.pt"),
        (("--checkpoint", ckpt, "--image", tmp_path / "nope.png"), "nope.png"),
        (("--checkpoint", ckpt, "--image", tmp_path / "bad.png"), "bad.png"),
        (("--checkpoint", ckpt, "--study", tmp_path / "empty"), "empty"),
        (("--checkpoint", ckpt, "--study", tmp_path / "nodir"), "nodir"),
    ]
    for args, needle in cases:
        capsys.readouterr()
        code = run_cli("cam", *args)
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            code == 2
            and len(err) == 1
            and err[0].startswith("mura-tune: error: ")
            and needle in err[0]
        ), err
