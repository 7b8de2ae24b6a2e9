"""The source reports' hand-searched CNN, made searchable: depth, filters, convs per cell, BN, pooling, dropout."""

from mura_tune.search.spaces import register_space


@register_space(
    "custom_cnn",
    fixed={"model": "custom_cnn", "pretrained": "none", "unfreeze_blocks": "all"},
    presets={
        "cpu": {"image_size": 64, "max_epochs": 6, "num_samples": 12, "batch_size": 32},
        "gpu": {
            "image_size": 320,
            "max_epochs": 40,
            "num_samples": 100,
            "batch_size": 32,
            "num_workers": 4,
        },
    },
)
def custom_cnn(trial):
    """Cells of conv-BN-ReLU + max-pool with doubling filters (depth 2-6, as searched by hand in the reports)."""
    depth = trial.suggest_int("depth", 2, 6)
    trial.suggest_categorical("base_filters", [8, 16, 32])
    trial.suggest_int("convs_per_cell", 1, 2)
    trial.suggest_categorical("batch_norm", [True, False])
    if depth >= 4:  # spatial dropout only matters once the network is deep enough to overfit
        trial.suggest_float("spatial_dropout", 0.0, 0.3)
    trial.suggest_categorical("global_pool", ["avg", "max", "avgmax"])
    trial.suggest_float("dropout", 0.0, 0.5)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
