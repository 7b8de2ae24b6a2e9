"""Stage 2, train: one training run, knowing nothing of Ray.

``config.py`` (TrainConfig), ``models.py`` (custom CNN and timm backbones), ``augment.py``,
``weights.py`` (where starting weights come from, and whether they saw a run's val/test images),
``engine.py`` (the one training core: device, AMP, the epoch and predict loops), ``run.py``
(``run_training``), ``checkpoint.py`` (``best.pt``) and ``pretrain.py`` (body-part pretraining).

May import: core and ``mura_tune.data``; never search, ensemble, report or cli.
"""
