"""Starting weights you can trust (issue 16): the run's own split reaches body-part pretraining,
weights that saw val/test images are refused, ImageNet weights from a local file, one training core."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run_cli

import mura_tune.train.pretrain as pretrain_module
from mura_tune.data.mura import read_dataset
from mura_tune.data.split import assign_split, write_split
from mura_tune.errors import WeightsError
from mura_tune.train.config import TrainConfig
from mura_tune.train.engine import Engine
from mura_tune.train.models import build_model
from mura_tune.train.pretrain import pretrain_bodypart
from mura_tune.train.weights import (
    check_weights_split,
    imagenet_dir,
    images_file,
    initial_backbone_state,
    resolve_auto,
    resolved_paths,
    trained_images,
)

SIZE = 32


def _train_paths(split: pd.DataFrame) -> set[str]:
    return set(resolved_paths(split.loc[split["split"] == "train", "image_path"]))


@pytest.fixture(scope="module")
def seed0_weights(tiny_data, tmp_path_factory):
    """resnet18 pretrained 1 epoch on the train rows of ``tiny_data``'s seed-0 split, and that split."""
    split = assign_split(read_dataset(tiny_data).table, 0.2, 0)
    out = tmp_path_factory.mktemp("seed0") / "resnet18-bodypart.safetensors"
    pretrain_bodypart("resnet18", out=out, epochs=1, image_size=SIZE, split_table=split, split_info={"seed": 0},
                      threads=1, workers=1, verbose=False)  # fmt: skip
    return out, split


def test_weights_record_the_exact_images_they_were_trained_on(seed0_weights):
    weights, split = seed0_weights
    info = json.loads(weights.with_suffix(".json").read_text())
    listed = pd.read_parquet(images_file(weights))["image_path"].tolist()
    assert info["images"]["count"] == len(listed) == info["n_images"] > 0
    assert (
        len(info["images"]["sha256"]) == 64 and info["images"]["file"] == images_file(weights).name
    )
    assert set(listed) <= _train_paths(split)  # resolved train-split paths only
    assert info["split"]["seed"] == 0 and info["split"]["images"]["val"] == int(
        (split["split"] == "val").sum()
    )
    assert trained_images(weights) == set(listed)
    assert check_weights_split(str(weights), split) is None  # its own split: nothing to refuse


def test_tampered_image_list_is_refused(seed0_weights, tmp_path):
    weights, split = seed0_weights
    copy = tmp_path / weights.name
    for src in (weights, weights.with_suffix(".json"), images_file(weights)):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    listed = pd.read_parquet(images_file(copy))
    listed.iloc[:-1].to_parquet(images_file(copy), index=False)  # one image dropped from the list
    with pytest.raises(WeightsError, match="does not match the digest and count"):
        check_weights_split(str(copy), split)


def test_run_given_weights_that_saw_its_val_images_is_refused_in_one_line(
    seed0_weights, tiny_data, tmp_path, capsys
):
    weights, seed0 = seed0_weights
    other = assign_split(read_dataset(tiny_data).table, 0.2, 3)
    split_path = write_split(other, tmp_path / "split3.parquet")
    held = other[other["split"].isin(["val", "test"])]
    overlap = set(resolved_paths(held["image_path"])) & trained_images(weights)
    assert overlap  # seed 3 moves some of seed 0's train patients into val
    out = tmp_path / "run"
    code = run_cli(
        "train",
        "--data",
        tiny_data,
        "--split",
        split_path,
        "--out",
        out,
        "--set",
        "model=resnet18",
        "--set",
        f"pretrained={weights}",
        "--set",
        f"image_size={SIZE}",
        "--set",
        "max_epochs=1",
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("mura-tune: error: weights ") and str(weights) in err
    assert f"trained on {len(overlap)} of this run's held-out images" in err
    assert (
        not (out / "metrics.parquet").exists() and not (out / "config.yaml").exists()
    )  # nothing trained
    # The library refuses the same way, before writing anything.
    config = TrainConfig(model="resnet18", pretrained=str(weights), image_size=SIZE, max_epochs=1)
    from mura_tune.train.run import run_training

    with pytest.raises(WeightsError, match=f"trained on {len(overlap)} "):
        run_training(config, other, tmp_path / "lib", verbose=False)
    assert not (tmp_path / "lib").exists()


def test_search_refuses_such_weights_before_any_trial(seed0_weights, tiny_data, tmp_path, capsys):
    weights, _ = seed0_weights
    code = run_cli(
        "--space",
        "custom_cnn",
        "--data",
        tiny_data,
        "--results",
        tmp_path,
        "--name",
        "leak",
        "--seed",
        3,
        "--num-samples",
        1,
        "--set",
        f"pretrained={weights}",
        "--set",
        f"image_size={SIZE}",
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2
        and err[-1].startswith("mura-tune: error: weights ")
        and "held-out images" in err[-1]
    )
    assert not (tmp_path / "leak" / "trials").exists()


BODYPART_SPACE = """
from mura_tune.search.spaces import register_space


@register_space(
    "tiny_bodypart",
    fixed={"model": "resnet18", "pretrained": "bodypart", "unfreeze_blocks": 1},
    presets={"cpu": {"image_size": 32, "max_epochs": 1, "num_samples": 1, "batch_size": 32}},
)
def tiny_bodypart(trial):
    trial.suggest_float("lr", 1e-4, 1e-3, log=True)
"""


@pytest.mark.slow
def test_bodypart_search_pretrains_on_its_own_train_split(
    tiny_data, ray_session, tmp_path, monkeypatch
):
    """Acceptance: --seed 3 with pretrained: bodypart; every image the weights saw is in this experiment's train split."""
    monkeypatch.setattr(
        pretrain_module, "BODYPART_EPOCHS", 1
    )  # the driver builds them, in this process
    space = tmp_path / "tiny_bodypart.py"
    space.write_text(BODYPART_SPACE)
    code = run_cli(
        "--space",
        space,
        "--data",
        tiny_data,
        "--results",
        tmp_path,
        "--name",
        "bp",
        "--seed",
        3,
        "--cpus-per-trial",
        1,
    )
    assert code == 0
    exp = tmp_path / "bp"
    plan = json.loads((exp / "experiment.json").read_text())
    weights = Path(plan["fixed"]["pretrained_by_model"]["resnet18"])
    assert weights.parent == Path(os.environ["MURA_TUNE_HOME"]) / "weights"
    split = pd.read_parquet(exp / "split.parquet")
    seen = trained_images(weights)
    assert seen and seen <= _train_paths(split)
    assert not seen & set(resolved_paths(split.loc[split["split"] != "train", "image_path"]))
    info = json.loads(weights.with_suffix(".json").read_text())
    assert (
        info["split"]["seed"] == 3
        and Path(info["split"]["path"]) == (exp / "split.parquet").resolve()
    )
    board = pd.read_parquet(exp / "leaderboard.parquet")
    assert board["status"].tolist() == ["COMPLETED"]
    assert board["weights_source"].tolist() == [f"bodypart:{weights.name}"]


def test_auto_offline_builds_no_bodypart_weights(tiny_split, tmp_path, monkeypatch, capsys):
    """What `make demo` does (densenet_finetune, pretrained: auto, offline): random init, no pretraining."""
    import huggingface_hub.constants
    from helpers import search_plan

    from mura_tune.search.prepare import prepare_weights

    monkeypatch.setenv("MURA_TUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf")
    )  # an empty cache
    monkeypatch.setattr(
        pretrain_module, "pretrain_bodypart", lambda *a, **k: pytest.fail("built body-part weights")
    )
    table, _ = tiny_split
    plan = search_plan(
        tmp_path / "x", space="densenet_finetune", fixed={"pretrained": "auto", "image_size": 64}
    )
    prepare_weights(plan, table, {"seed": 0})
    assert plan.fixed["pretrained_by_model"] == {"densenet121": "none"}
    assert not (tmp_path / "home" / "weights").exists()
    assert "random initialisation for densenet121" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_imagenet_file_is_picked_up_and_loaded(suffix, tiny_split, tmp_path, monkeypatch):
    """timm-format ImageNet weights copied to $MURA_TUNE_HOME/weights/imagenet/<model><suffix>."""
    import timm

    monkeypatch.setenv("MURA_TUNE_HOME", str(tmp_path / "home"))
    torch.manual_seed(1)
    state = timm.create_model("resnet18").state_dict()  # random values, timm's keys (fc included)
    path = imagenet_dir() / f"resnet18{suffix}"
    path.parent.mkdir(parents=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    assert resolve_auto("resnet18", verbose=False) == "imagenet"
    loaded, source = initial_backbone_state("resnet18", "imagenet")
    assert source == f"imagenet:file:{path}"
    net = build_model(TrainConfig(model="resnet18"), backbone_state=loaded)
    backbone = net.backbone.state_dict()
    assert set(backbone) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(backbone[k], state[k]) for k in backbone)
    if suffix == ".safetensors":  # the source reaches summary.json, which the leaderboard reads
        from mura_tune.train.run import run_training

        table, _ = tiny_split
        config = TrainConfig(
            model="resnet18",
            pretrained="imagenet",
            unfreeze_blocks=0,
            image_size=SIZE,
            max_epochs=1,
            threads=1,
        )
        summary = run_training(config, table, tmp_path / "run", verbose=False)
        assert summary["weights_source"] == f"imagenet:file:{path}"


def test_train_pretrain_predict_and_cam_share_the_engine(tiny_split, tmp_path, monkeypatch):
    """One training core: every training epoch and every forward pass of the four users goes through Engine."""
    from mura_tune.ensemble.predict import Member, image_probabilities
    from mura_tune.report.cam import cam_image
    from mura_tune.train.run import run_training

    calls: dict[str, int] = {"train_epoch": 0, "logits": 0}
    for name in calls:
        real = getattr(Engine, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(Engine, name, spy)
    table, _ = tiny_split
    config = TrainConfig(image_size=SIZE, depth=2, base_filters=8, max_epochs=1, batch_size=32)
    run_training(config, table, tmp_path / "run", verbose=False)
    assert calls["train_epoch"] == 1 and calls["logits"] > 0
    pretrain_bodypart("custom_cnn", out=tmp_path / "cnn.safetensors", epochs=1, image_size=16, split_table=table,
                      threads=1, workers=1, verbose=False)  # fmt: skip
    assert calls["train_epoch"] == 2
    before = calls["logits"]
    image = table["image_path"].iloc[0]
    net = build_model(config).eval()
    cam_image(net, config, image)
    member = Member("t", Path("t.pt"), net, SIZE, False, {"generalist"})
    probs, _ = image_probabilities(table.head(3), {member.checkpoint: member}, pd.Series(["generalist"] * 3).to_numpy(),
                                   Engine("cpu"), progress=False)  # fmt: skip
    assert calls["logits"] >= before + 2 and probs[member.checkpoint].shape == (3,)


@pytest.mark.slow
def test_gpu_check_runs_every_path_on_cpu(tiny_data, ray_session, tmp_path, capsys):
    from benchmarks import gpu_check

    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--data", str(tiny_data), "--image-size", str(SIZE), "--max-images", "32",
                           "--batch-size", "16", "--search-image-size", str(SIZE), "--search-epochs", "2",
                           "--results", str(tmp_path / "results"), "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 0 and report["ok"], report["checks"]
    assert len(report["search"]["trials"]) == gpu_check.SEARCH_TRIALS
    assert report["train"]["train_images_per_s"] > 0 and report["pretrain"]["device"] == "cpu"
    assert (
        gpu_check.most_at_once(
            [{"start": 0, "end": 2}, {"start": 1, "end": 3}, {"start": 3, "end": 4}]
        )
        == 2
    )
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 0 and capsys.readouterr().out.strip().endswith(
            "skipped: no CUDA"
        )


def test_gpu_check_without_ray_skips_only_the_search(tiny_data, tmp_path, monkeypatch):
    """``--skip-search`` (a GPU machine without Ray): train and pretrain are checked, the search is not run."""
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "_train", lambda table, args: {
        "param_device": "cpu", "batch_device": "cpu", "channels_last": True, "amp": False,
        "train_images_per_s": 1.0, "eval_images_per_s": 1.0})  # fmt: skip
    monkeypatch.setattr(gpu_check, "_pretrain", lambda *a: {"device": "cpu", "seconds": 1.0})
    monkeypatch.setattr(gpu_check, "_search", lambda *a: pytest.fail("the search ran"))
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--data", str(tiny_data), "--skip-search",
                           "--results", str(tmp_path / "r"), "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 0 and report["ok"] and report["search"] is None
    assert not any(name.startswith("search") for name in report["checks"])
