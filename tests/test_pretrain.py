"""Body-part pretraining (issue 9): train split only, weights that load, and a fast offline ``auto`` (random init)."""

from __future__ import annotations

import json
import socket
import time

import pandas as pd
import pytest
import torch
from conftest import run_cli

import mura_tune.data.images as images_module
import mura_tune.train.pretrain as pretrain_module
from mura_tune.data.mura import read_dataset
from mura_tune.data.split import assign_split
from mura_tune.errors import ConfigError, WeightsError
from mura_tune.train.config import TrainConfig
from mura_tune.train.models import build_model
from mura_tune.train.pretrain import ensure_bodypart_weights, pretrain_bodypart, save_backbone
from mura_tune.train.weights import (
    image_list_digest,
    initial_backbone_state,
    load_backbone_state,
    read_weights_file,
    resolve_auto,
    resolved_paths,
)

SIZE = 32
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens on loopback port 9: refused at once


@pytest.fixture(scope="module")
def small_data(tiny_data, tmp_path_factory):
    """A manifest of ``tiny_data`` cut to 5 train and 2 valid patients per body part (fast densenet steps)."""
    table = read_dataset(tiny_data).table
    keep = []
    for (_, source), grp in table.groupby(["body_part", "source_split"]):
        keep += sorted(grp["patient_id"].unique())[: 5 if source == "train" else 2]
    small = table[table["patient_id"].isin(set(keep))]
    path = tmp_path_factory.mktemp("small_manifest") / "manifest.csv"
    small.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def pretrained(small_data, tmp_path_factory):
    """densenet121 pretrained for one epoch, with every decoded image path and every cached path recorded."""
    opened, cached = [], []
    real_load, real_build = images_module.load_gray, pretrain_module.build_cache

    def spy_load(path):
        opened.append(str(path))
        return real_load(path)

    def spy_build(paths, *args, **kwargs):
        cached.extend(paths)
        return real_build(paths, *args, **kwargs)

    out = tmp_path_factory.mktemp("pretrained") / "densenet121-bodypart-test-32px.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(images_module, "load_gray", spy_load)
        mp.setattr(pretrain_module, "build_cache", spy_build)
        # workers=1 decodes in this process, so the spy sees every image that is opened.
        path, info = pretrain_bodypart(
            "densenet121",
            data=small_data,
            out=out,
            epochs=1,
            image_size=SIZE,
            batch_size=32,
            threads=1,
            workers=1,
            cache_root=out.parent / "cache",
            verbose=False,
        )
    return {"path": path, "info": info, "opened": opened, "cached": cached}


def _split(small_data) -> pd.DataFrame:
    return assign_split(read_dataset(small_data).table, 0.2, 0)


def test_pretrain_reads_train_images_only(pretrained, small_data):
    split = _split(small_data)
    train = set(split.loc[split["split"] == "train", "image_path"])
    unseen = set(split.loc[split["split"] != "train", "image_path"])
    assert len(unseen) > 0 and pretrained["opened"]
    assert set(pretrained["cached"]) == train
    assert set(pretrained["opened"]) == train  # every train image decoded, nothing else
    assert not set(pretrained["opened"]) & unseen
    written = json.loads(pretrained["path"].with_suffix(".json").read_text())
    assert written["splits"] == ["train"] and pretrained["info"]["splits"] == ["train"]
    assert (
        written["backbone"] == "densenet121"
        and written["task"] == "body_part"
        and written["epochs"] == 1
    )
    assert written["n_images"] + written["holdout"]["images"] == len(train)
    assert 0.0 <= written["holdout_accuracy"] <= 1.0 and len(written["data_hash"]) == 64


def test_weights_load_into_build_model(pretrained):
    import timm

    state = read_weights_file(pretrained["path"])
    assert set(state) == set(timm.create_model("densenet121", num_classes=0).state_dict())
    config = TrainConfig(
        model="densenet121", pretrained=str(pretrained["path"]), unfreeze_blocks=1, image_size=SIZE
    )
    backbone_state, source = initial_backbone_state(config.model, config.pretrained)
    net = build_model(
        config, backbone_state=backbone_state
    )  # load_backbone_state raises on missing keys
    assert source == "file:densenet121-bodypart-test-32px.safetensors"
    assert torch.equal(
        net.backbone.state_dict()["features.conv0.weight"], state["features.conv0.weight"]
    )
    with pytest.raises(WeightsError, match="do not fit resnet18"):
        load_backbone_state(timm.create_model("resnet18", num_classes=0), state, "resnet18")


def test_pth_output_round_trips(tmp_path):
    state = build_model(TrainConfig(model="resnet18")).backbone.state_dict()
    out = save_backbone(state, tmp_path / "w.pth")
    assert set(read_weights_file(out)) == set(state)


def test_bad_backbone_and_out_suffix(tmp_path, capsys):
    with pytest.raises(ConfigError, match="did you mean 'densenet121'"):
        pretrain_bodypart("densenet12", out=tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match=r"\.safetensors or \.pth"):
        pretrain_bodypart("densenet121", out=tmp_path / "w.bin")
    assert run_cli("pretrain", "--backbone", "densnet121", "--out", tmp_path / "w.safetensors") == 2
    assert "mura-tune: error: --backbone must be one of" in capsys.readouterr().err


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset, the hub pointed at a closed loopback port, an empty HF cache; counts connections."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    attempts = []
    real = socket.create_connection

    def counting(address, *args, **kwargs):
        attempts.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counting)
    return attempts


def test_auto_falls_back_within_seconds(no_network, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):  # body-part pretraining is opt-in (pretrained: bodypart)
        raise AssertionError("pretrained: auto built body-part weights")

    monkeypatch.setattr(pretrain_module, "ensure_bodypart_weights", must_not_run)
    monkeypatch.setattr(pretrain_module, "pretrain_bodypart", must_not_run)
    start = time.perf_counter()
    resolved = resolve_auto("densenet121")
    assert time.perf_counter() - start < 5.0
    assert no_network == [("127.0.0.1", 9)]  # exactly one attempt: no retry loop
    assert resolved == "none"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "random initialisation" in err
    assert (
        "weights/imagenet/densenet121.safetensors" in err
    )  # how to provide ImageNet weights offline


def test_imagenet_offline_fails_fast_naming_alternatives(no_network):
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="pretrained: auto.*none"):
        initial_backbone_state("densenet121", "imagenet")
    assert time.perf_counter() - start < 5.0 and len(no_network) == 1


def test_hub_offline_makes_no_connection(no_network, monkeypatch):
    from mura_tune.train.weights import imagenet_available

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not imagenet_available("densenet121") and no_network == []


@pytest.mark.slow
def test_training_records_bodypart_source(pretrained, small_data, tmp_path):
    config = TrainConfig(
        model="densenet121",
        pretrained=str(pretrained["path"]),
        unfreeze_blocks=1,
        image_size=SIZE,
        max_epochs=1,
        batch_size=32,
        threads=1,
    )
    summary = run_training_quiet(config, _split(small_data), tmp_path)
    assert summary["weights_source"] == "file:densenet121-bodypart-test-32px.safetensors"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["weights_source"].startswith(
        "file:densenet121-bodypart"
    )


def run_training_quiet(config, split, tmp_path):
    from mura_tune.train.run import run_training

    return run_training(
        config, split, tmp_path / "run", cache_root=tmp_path / "cache", verbose=False
    )


@pytest.mark.slow
def test_ensure_builds_once(small_data, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    split = _split(small_data)
    first = ensure_bodypart_weights("resnet18", split, image_size=SIZE, verbose=False, epochs=1)
    assert first.name.startswith("resnet18-bodypart-") and f"-{SIZE}px-" in first.name
    assert first.suffix == ".safetensors"
    assert json.loads(first.with_suffix(".json").read_text())["splits"] == ["train"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("weights were rebuilt")

    monkeypatch.setattr(pretrain_module, "pretrain_bodypart", must_not_run)
    assert (
        ensure_bodypart_weights("resnet18", split, image_size=SIZE, verbose=False, epochs=1)
        == first
    )
    # Another recipe (here: epochs) is other weights, never the ones built above.
    train = pretrain_module.train_table(split_table=split)
    digest = image_list_digest(resolved_paths(train["image_path"]))
    other = pretrain_module.bodypart_weights_path("resnet18", digest, SIZE, epochs=2)
    assert other != first and other.parent == first.parent


def _write_arm_predictions(folder, rng, labels, accuracy):
    """Val and test image predictions of one fake run; val predictions are right with ``accuracy``."""
    rows = []
    for split, flip in (("val", False), ("test", True)):
        for study, label in enumerate(labels):
            right = rng.random() < accuracy
            prob = float(label == right) if not flip else float(label != right)
            rows += [
                {"split": split, "study_id": f"{split}{study}", "label": label, "prob": prob}
            ] * 2
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folder / "predictions.parquet")


@pytest.mark.parametrize("better", [True, False])
def test_pretrain_comparison_pairs_val_studies_across_seeds(tmp_path, better):
    import numpy as np

    from benchmarks.pretrain_vs_random import paired_difference

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    for seed in (0, 1):
        _write_arm_predictions(
            tmp_path / f"bodypart-seed{seed}", rng, labels, 0.85 if better else 0.6
        )
        _write_arm_predictions(tmp_path / f"random-seed{seed}", rng, labels, 0.6)
    diff = paired_difference(tmp_path, [0, 1], n_boot=500)
    mean = diff["mean"]
    low, high = mean["ci95"]
    assert diff["val_studies"] == 200  # val only: the test rows (predictions flipped) are not read
    assert low <= mean["kappa_bodypart_minus_random"] <= high
    per_seed = [d["kappa_bodypart_minus_random"] for d in diff["per_seed"].values()]
    assert mean["kappa_bodypart_minus_random"] == pytest.approx(sum(per_seed) / 2, abs=2e-3)
    if better:  # kappa 0.7 vs 0.2 on 200 studies
        assert diff["clearly_higher"] and low > 0.3
    else:
        assert not diff["clearly_higher"] and low < 0 < high
