"""Trial core: models, unfreezing, augmentation, metrics, checkpoints, predictions, divergence."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from mura_tune.errors import ConfigError
from mura_tune.metrics import cohen_kappa, roc_auc, split_metrics, study_table
from mura_tune.train.augment import augment
from mura_tune.train.checkpoint import load_checkpoint
from mura_tune.train.config import MODELS, TrainConfig, parse_overrides
from mura_tune.train.models import backbone_blocks, build_model, count_parameters
from mura_tune.train.run import TrialDiverged, run_training

TINY = {"image_size": 32, "depth": 3, "base_filters": 8, "batch_size": 16, "seed": 0}


@pytest.mark.parametrize("model", MODELS)
def test_every_model_builds_and_trains_one_step(model):
    config = TrainConfig(
        model=model,
        image_size=32 if model == "custom_cnn" else 64,
        head_widths=[16],
        head_dropout=0.1,
    ).validate()
    net = build_model(config).train()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(2, 3, config.image_size, config.image_size)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), torch.tensor([0.0, 1.0]))
    loss.backward()
    opt.step()
    assert net(x).shape == (2,) and math.isfinite(loss.item())


def test_global_pool_max_lets_one_small_finding_decide():
    fmap = torch.zeros(1, 4, 8, 8)
    fmap[0, 2, 5, 3] = 64.0  # one hot cell in a 8x8 map
    pooled = {}
    for pool in ("avg", "max", "avgmax"):
        net = build_model(TrainConfig(global_pool=pool, **TINY).validate())
        pooled[pool] = net.pool(fmap)[0, 2].item()
    assert pooled == {"avg": 1.0, "max": 64.0, "avgmax": 32.5}
    with pytest.raises(ConfigError, match="global_pool must be one of avg, max, avgmax, got 'sum'"):
        TrainConfig(global_pool="sum").validate()


@pytest.mark.parametrize("model", ["custom_cnn", "densenet121", "resnet18", "efficientnet_b0"])
def test_unfreeze_blocks_trainable_counts(model):
    blocks = backbone_blocks(model, build_model(TrainConfig(model=model)).backbone)
    counts = []
    for k in range(len(blocks) + 1):
        net = build_model(TrainConfig(model=model, unfreeze_blocks=k).validate())
        head = sum(p.numel() for p in net.head.parameters())
        block_params = sum(
            p.numel() for block in blocks[len(blocks) - k :] for m in block for p in m.parameters()
        )
        trainable, total = count_parameters(net)
        # Documented: the last K blocks plus the head train, nothing else.
        expected = head + sum(
            p.numel()
            for block in backbone_blocks(model, net.backbone)[len(blocks) - k :]
            for m in block
            for p in m.parameters()
        )
        assert trainable == expected, (model, k)
        counts.append(trainable)
        assert block_params >= 0
    assert counts[0] == sum(
        p.numel()
        for p in build_model(TrainConfig(model=model, unfreeze_blocks=0)).head.parameters()
    )
    assert counts == sorted(counts) and counts[-1] == total
    assert (
        count_parameters(build_model(TrainConfig(model=model, unfreeze_blocks="all")))[0] == total
    )


def test_frozen_weights_bit_identical_after_an_epoch(tiny_split, tmp_path):
    table, _ = tiny_split
    config = TrainConfig(
        model="resnet18", unfreeze_blocks=1, image_size=32, max_epochs=1, batch_size=16
    ).validate()
    torch.manual_seed(0)
    before = build_model(config).state_dict()
    run_training(config, table, tmp_path, verbose=False)
    net, _ = load_checkpoint(tmp_path / "best.pt")
    after = net.state_dict()
    frozen = [
        k
        for k in before
        if k.startswith(
            (
                "backbone.conv1",
                "backbone.bn1",
                "backbone.layer1",
                "backbone.layer2",
                "backbone.layer3",
            )
        )
    ]
    trained = [k for k in before if k.startswith("backbone.layer4") and k.endswith("weight")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), (
        "a frozen tensor (weight or BN buffer) changed"
    )
    assert any(not torch.equal(before[k], after[k]) for k in trained), (
        "the unfrozen block did not train"
    )


def test_augmentation_identity_at_zero_and_changes_above():
    x = torch.rand(4, 1, 32, 32)
    assert torch.equal(augment(x, 0.0), x)
    y = augment(x, 1.0, torch.Generator().manual_seed(0))
    assert (
        y.shape == x.shape
        and not torch.allclose(x, y)
        and float(y.min()) >= 0
        and float(y.max()) <= 1
    )


def test_metrics_match_sklearn_and_edge_cases():
    rng = np.random.default_rng(0)
    images = pd.DataFrame(
        {"study_id": rng.integers(0, 40, 200).astype(str), "body_part": "XR_HAND"}
    )
    images["label"] = images["study_id"].astype(int) % 2
    images["prob"] = np.clip(images["label"] * 0.3 + rng.random(200) * 0.7, 0, 1)
    studies = study_table(images)
    expected = images.groupby("study_id")["prob"].mean()
    assert np.allclose(studies.set_index("study_id")["prob"], expected)
    m = split_metrics(images, "val")
    assert m["val_kappa_study"] == pytest.approx(
        cohen_kappa_score(studies["label"], studies["prob"] > 0.5)
    )
    assert m["val_auc"] == pytest.approx(roc_auc_score(studies["label"], studies["prob"]))
    assert cohen_kappa(np.array([0, 1, 1]), np.array([0.9, 0.9, 0.9])) == 0.0  # constant predictor
    assert cohen_kappa(np.array([1, 1]), np.array([0.9, 0.9])) == 0.0  # undefined -> 0, not NaN
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.7])))  # one class -> missing


def test_run_outputs_checkpoint_reproduces_predictions(tiny_split, tmp_path):
    table, _ = tiny_split
    config = TrainConfig(**TINY, max_epochs=2).validate()
    summary = run_training(config, table, tmp_path, verbose=False)
    for name in (
        "config.yaml",
        "metrics.parquet",
        "best.pt",
        "predictions.parquet",
        "summary.json",
    ):
        assert (tmp_path / name).exists(), name
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    assert len(metrics) == 2 and {
        "train_loss",
        "val_loss",
        "val_auc",
        "val_accuracy",
        "val_kappa_image",
        "val_kappa_study",
    } <= set(metrics)
    assert any(c.startswith("val_kappa_study_XR_") for c in metrics) and any(
        c.startswith("val_auc_XR_") for c in metrics
    )
    blob = torch.load(tmp_path / "best.pt", weights_only=True)
    assert blob["epoch"] == summary["best_epoch"]
    preds = pd.read_parquet(tmp_path / "predictions.parquet")
    assert set(preds["split"]) == {"val", "test"}
    assert list(preds.columns) == ["image_path", "study_id", "body_part", "label", "split", "prob"]
    # Kappa/AUC from predictions.parquet equal sklearn's on study labels, and the recorded metrics.
    val = study_table(preds[preds["split"] == "val"])
    best = metrics[metrics["epoch"] == summary["best_epoch"]].iloc[0]
    assert best["val_kappa_study"] == pytest.approx(
        cohen_kappa_score(val["label"], val["prob"] > 0.5)
    )
    assert best["val_auc"] == pytest.approx(roc_auc_score(val["label"], val["prob"]))
    # A loaded checkpoint reproduces the saved val predictions.
    from mura_tune.train.augment import Normalize
    from mura_tune.train.run import predict, prepare_data

    net, loaded = load_checkpoint(tmp_path / "best.pt")
    data = prepare_data(table, loaded, progress=False)
    again = predict(net, data, data.val, torch.device("cpu"), 16, False, Normalize())
    saved = preds[preds["split"] == "val"].set_index("image_path")["prob"]
    assert np.allclose(saved.loc[data.val.table["image_path"]].to_numpy(), again, atol=1e-5)


def test_specialist_scope_trains_and_predicts_one_part(tiny_split, tmp_path):
    table, _ = tiny_split
    run_training(
        TrainConfig(**TINY, max_epochs=1, body_part="XR_WRIST").validate(),
        table,
        tmp_path,
        verbose=False,
    )
    preds = pd.read_parquet(tmp_path / "predictions.parquet")
    assert set(preds["body_part"]) == {"XR_WRIST"} and set(preds["split"]) == {"val", "test"}
    wrist = table[(table["body_part"] == "XR_WRIST") & table["split"].isin(["val", "test"])]
    assert set(preds["study_id"]) == set(wrist["study_id"])


def test_nan_loss_stops_with_status_and_no_garbage_checkpoint(tiny_split, tmp_path):
    table, _ = tiny_split
    config = TrainConfig(**TINY, max_epochs=3, lr=1e30).validate()  # explodes
    with pytest.raises(TrialDiverged):
        run_training(config, table, tmp_path, verbose=False)
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    assert metrics["status"].iloc[-1] == "diverged"
    assert not (tmp_path / "best.pt").exists() or not math.isnan(
        torch.load(tmp_path / "best.pt", weights_only=True)["epoch"]
    )
    import json

    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_config_validation_and_round_trip(tmp_path):
    with pytest.raises(ConfigError, match=r"dropout must be in \[0, 1\), got 1.5"):
        TrainConfig(dropout=1.5).validate()
    with pytest.raises(ConfigError, match="did you mean 'densenet121'"):
        TrainConfig.from_dict({"model": "densenet12"})
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1})
    config = TrainConfig().updated(
        parse_overrides(["lr=3e-4", "head_widths=[64, 32]", "unfreeze_blocks=2"])
    )
    for suffix in (".yaml", ".json"):
        config.save(tmp_path / f"c{suffix}")
        assert TrainConfig.load(tmp_path / f"c{suffix}") == config


def test_moving_average_is_the_model_kept_and_it_resumes_exactly(tiny_split, tmp_path):
    """The checkpoint holds the average of the weights, and a run resumed from epoch 1 continues
    the saved average (it is not restarted from the resumed weights)."""
    table, _ = tiny_split
    config = TrainConfig(**TINY, max_epochs=2, ema_decay=0.9, early_stop_patience=5).validate()
    states: list[dict] = []  # copies: a state holds the live tensors (a trial saves it at once)
    run_training(config, table, tmp_path / "a", verbose=False,
                 on_epoch=lambda m, s: states.append(copy.deepcopy(s)))  # fmt: skip
    first, last = states
    assert last["ema"] is not None and last["ema"]["steps"] > first["ema"]["steps"] > 0
    moved = [k for k, v in last["model"].items() if v.is_floating_point()]
    assert any(not torch.equal(last["model"][k], last["ema"]["module"][k]) for k in moved)
    blob = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    kept = (first if blob["epoch"] == 1 else last)["ema"]["module"]
    assert all(torch.equal(blob["state_dict"][k], kept[k]) for k in kept)  # the average is kept
    resumed: list[dict] = []
    run_training(config, table, tmp_path / "b", verbose=False, resume_state=first,
                 on_epoch=lambda m, s: resumed.append(s))  # fmt: skip
    (again,) = resumed
    assert again["ema"]["steps"] == last["ema"]["steps"]  # the saved average's steps, continued
    off = TrainConfig(**TINY, max_epochs=1, ema_decay=0.0).validate()
    plain: list[dict] = []
    run_training(off, table, tmp_path / "c", verbose=False, on_epoch=lambda m, s: plain.append(s))
    assert plain[0]["ema"] is None


def test_replayed_lr_schedule_sets_each_epochs_rate_and_ignores_plateaus(tiny_split, tmp_path):
    """A --cv refit replays its source's rates: the plateau rule (patience 0 here, so it would
    cut the rate after any epoch that does not improve val loss) no longer changes them."""
    table, _ = tiny_split
    schedule = [2e-3, 1e-3, 1e-3, 2e-4]
    config = TrainConfig(**TINY, max_epochs=4, lr_patience=0, early_stop_patience=9)
    run_training(config.updated({"lr_schedule": schedule}), table, tmp_path / "a", verbose=False)
    assert pd.read_parquet(tmp_path / "a" / "metrics.parquet")["lr"].tolist() == schedule
    with pytest.raises(
        ConfigError, match="lr_schedule must give a learning rate for each of the 4"
    ):
        config.updated({"lr_schedule": schedule[:3]})
    with pytest.raises(ConfigError, match="lr_schedule must hold finite learning rates > 0"):
        config.updated({"lr_schedule": [1e-3, 0, 1e-3, 1e-3]})


def test_should_stop_ends_the_run_mid_epoch_and_keeps_what_it_has(tiny_split, tmp_path):
    table, _ = tiny_split
    asked = []
    summary = run_training(
        TrainConfig(**TINY, max_epochs=5).validate(), table, tmp_path, verbose=False,
        should_stop=lambda: asked.append(1) or True,
    )  # fmt: skip
    assert summary["status"] == "stopped" and summary["epochs"] == 1 and summary["best_epoch"] == 1
    assert (tmp_path / "best.pt").exists() and (tmp_path / "predictions.parquet").exists()
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    assert metrics["trial_finished"].tolist() == [True]
    assert len(asked) <= 3  # asked after the first step, and once more when the epoch ends


def test_engine_mixed_precision_trains_only_and_evaluates_in_float32(tiny_split):
    from mura_tune.train.engine import Engine, cpu_has_bf16

    mixed, plain = Engine("cpu", amp=True), Engine("cpu", amp=False)
    assert mixed.channels_last and plain.channels_last
    assert mixed.cpu_bf16 == cpu_has_bf16() and not plain.cpu_bf16
    assert not mixed.amp  # float16 AMP is for CUDA only
    with mixed.train_autocast():
        dtype = torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype
    assert dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    net = build_model(TrainConfig(**TINY))
    x = torch.rand(4, 3, 32, 32)
    a = mixed.logits(mixed.model(net).eval(), mixed.inputs((x[:, 0] * 255).to(torch.uint8)))
    b = plain.logits(plain.model(net).eval(), plain.inputs((x[:, 0] * 255).to(torch.uint8)))
    assert a.dtype == torch.float32 and torch.equal(a, b)  # evaluation: exact, whatever the CPU
