"""mura-tune: hyperparameter search, fine-tuning and ensembling for MURA radiograph classifiers.

Quick start (embedded synthetic data, CPU)::

    mura-tune data summary
    mura-tune train --set model=custom_cnn --set max_epochs=3
    mura-tune --space densenet_finetune --num-samples 8
    mura-tune ensemble --experiment results/<name>
"""

from mura_tune.constants import VERSION as __version__

__all__ = ["__version__"]
