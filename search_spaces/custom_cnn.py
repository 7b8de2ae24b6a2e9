"""The source reports' hand-searched CNN, made searchable: depth, filters, convs per cell, BN, pooling, dropout."""

from mura_tune.search.spaces import register_space

#: The default config's values of this space's dimensions (TrainConfig's defaults): run first.
DEFAULT = {
    "depth": 4,
    "base_filters": 16,
    "convs_per_cell": 1,
    "batch_norm": True,
    "spatial_dropout": 0.0,
    "global_pool": "max",
    "dropout": 0.2,
    "aug_strength": 0.2,
    "lr": 1e-3,
}


@register_space(
    "custom_cnn",
    fixed={"model": "custom_cnn", "pretrained": "none", "unfreeze_blocks": "all"},
    presets={
        # 48 px (the findings of the embedded data are learnable there), a full run is ~30
        # epochs, ASHA's first rung at epoch 2 (epoch 1 seldom separates configurations) with
        # reduction factor 3; only cells a CPU trains at no more than twice the default's cost.
        "cpu": {
            "image_size": 48,
            "max_epochs": 30,
            "grace_period": 2,
            "reduction_factor": 3,
            "num_samples": 12,
            "batch_size": 32,
            "space_args": {"cpu": True},
        },
        "gpu": {
            "image_size": 320,
            "max_epochs": 40,
            "grace_period": 2,
            "reduction_factor": 3,
            "num_samples": 100,
            "batch_size": 32,
            "num_workers": 4,
        },
    },
    start=[DEFAULT],
)
def custom_cnn(trial, cpu=False):
    """Cells of conv-BN-ReLU + max-pool with doubling filters (depth 2-6, as searched by hand in the reports).

    ``cpu``: the CPU preset leaves out 32 base filters and two convolutions per cell (4x and 2x
    the cost of an epoch at the same depth); every other range is the reports' own.
    """
    depth = trial.suggest_int("depth", 2, 6)
    trial.suggest_categorical("base_filters", [8, 16] if cpu else [8, 16, 32])
    if not cpu:
        trial.suggest_int("convs_per_cell", 1, 2)
    trial.suggest_categorical("batch_norm", [True, False])
    if depth >= 4:  # spatial dropout only matters once the network is deep enough to overfit
        trial.suggest_float("spatial_dropout", 0.0, 0.3)
    trial.suggest_categorical("global_pool", ["avg", "max", "avgmax"])
    trial.suggest_float("dropout", 0.0, 0.5)
    trial.suggest_float("aug_strength", 0.0, 1.0)
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
