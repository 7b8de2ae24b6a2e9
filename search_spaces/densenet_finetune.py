"""Fine-tune a DenseNet (the MURA paper's family) from a searched unfrozen-block cutoff."""

from mura_tune.search.spaces import register_space


@register_space(
    "densenet_finetune",
    fixed={"pretrained": "auto", "optimizer": "adam"},
    presets={
        # CPU demo: 64 px, a few epochs, DenseNet-121 only (169/201 cost 1.5-2x on a CPU).
        "cpu": {
            "image_size": 64,
            "max_epochs": 4,
            "num_samples": 8,
            "batch_size": 32,
            "space_args": {"backbones": ["densenet121"]},
        },
        "gpu": {
            "image_size": 320,
            "max_epochs": 20,
            "num_samples": 64,
            "batch_size": 16,
            "num_workers": 4,
        },
    },
    aux=("head_layers", "head_width"),
    # Run first: a full fine-tune (what works from ImageNet weights and from random ones alike)
    # and the reports' kind of cutoff (the last two blocks) for ImageNet starts.
    start=[
        {
            "model": "densenet121",
            "unfreeze_blocks": "all",
            "head_layers": 0,
            "global_pool": "max",
            "dropout": 0.2,
            "lr": 1e-3,
            "weight_decay": 1e-5,
            "aug_strength": 0.2,
            "class_weighting": True,
            "batch_size": 32,
        },
        {
            "model": "densenet121",
            "unfreeze_blocks": 2,
            "head_layers": 0,
            "global_pool": "avg",
            "dropout": 0.2,
            "lr": 3e-4,
            "weight_decay": 1e-5,
            "aug_strength": 0.2,
            "class_weighting": True,
            "batch_size": 32,
        },
    ],  # fmt: skip
)
def densenet_finetune(trial, backbones=("densenet121", "densenet169", "densenet201")):
    """DenseNet-121/169/201: unfrozen blocks, MLP head, pooling, lr, weight decay, augmentation, class weighting, batch size."""
    trial.suggest_categorical("model", list(backbones))
    trial.suggest_categorical("unfreeze_blocks", [0, 1, 2, 3, "all"])
    layers = trial.suggest_int("head_layers", 0, 2)
    width = trial.suggest_categorical("head_width", [128, 256, 512]) if layers else 0
    if layers:
        trial.suggest_float("head_dropout", 0.0, 0.5)
    trial.suggest_categorical("global_pool", ["avg", "max", "avgmax"])
    trial.suggest_float("dropout", 0.0, 0.5)
    trial.suggest_float("lr", 1e-5, 3e-3, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    trial.suggest_categorical("class_weighting", [True, False])
    trial.suggest_categorical("batch_size", [16, 32])
    return {"head_widths": [width] * layers}
