"""Grad-CAM: shape and range for every kind of backbone, localisation on a learnable finding, the CLI.

The localisation test trains a small custom_cnn for two epochs on 32 px images whose finding is
a bright square at a known random place (every image also carries a bright line, like an L/R
marker, so "anything bright" is not enough). The project's synthetic radiographs were tried
first: their findings are too subtle for a CNN to learn within a few CPU seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from PIL import Image

from mura_tune.augment import Normalize, to_unit
from mura_tune.cam import cam_command, grad_cam
from mura_tune.config import TrainConfig
from mura_tune.models import build_model

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


def test_cam_is_highest_over_the_finding(trained):
    net, _ = trained
    images, labels, boxes = squares(64, seed=7)
    x = Normalize()(to_unit(images))
    with torch.no_grad():
        accuracy = ((torch.sigmoid(net(x)) > 0.5).float() == labels).float().mean().item()
    assert accuracy >= 0.9, f"the model did not learn the finding (accuracy {accuracy:.2f})"
    positives = [i for i in range(len(labels)) if labels[i] == 1]
    cams = grad_cam(net, x[positives])
    inside_wins = []
    for cam, i in zip(cams, positives):
        x0, y0, x1, y1 = boxes[i]
        mask = np.zeros_like(cam, dtype=bool)
        mask[y0:y1, x0:x1] = True
        inside_wins.append(cam[mask].mean() > cam[~mask].mean())
    assert np.mean(inside_wins) >= 0.7, (
        f"CAM peaks on the finding in only {np.mean(inside_wins):.0%} of images"
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
