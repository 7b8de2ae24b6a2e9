"""Fine-tune a ResNet-18/50 from a searched unfrozen-block cutoff."""

from mura_tune.search.spaces import register_space


@register_space(
    "resnet_finetune",
    fixed={"pretrained": "auto", "optimizer": "adamw"},
    presets={
        "cpu": {"image_size": 64, "max_epochs": 4, "num_samples": 8, "batch_size": 32},
        "gpu": {
            "image_size": 320,
            "max_epochs": 20,
            "num_samples": 64,
            "batch_size": 32,
            "num_workers": 4,
        },
    },
    start=[
        {
            "model": "resnet18",
            "unfreeze_blocks": "all",
            "global_pool": "max",
            "dropout": 0.2,
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "aug_strength": 0.2,
            "class_weighting": True,
        },
    ],  # fmt: skip
)
def resnet_finetune(trial):
    """ResNet-18/50: unfrozen blocks, dropout, lr, weight decay, augmentation, class weighting."""
    trial.suggest_categorical("model", ["resnet18", "resnet50"])
    trial.suggest_categorical("unfreeze_blocks", [0, 1, 2, "all"])
    trial.suggest_categorical("global_pool", ["avg", "max", "avgmax"])
    trial.suggest_float("dropout", 0.0, 0.5)
    trial.suggest_float("lr", 1e-5, 3e-3, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    trial.suggest_categorical("class_weighting", [True, False])
