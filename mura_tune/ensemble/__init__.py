"""Stage 4, ensemble: choose checkpoints on val, route body parts, report on test, predict new data.

``greedy.py`` (GreedyEnsemble, the algorithm), ``candidates.py`` (an experiment's trials as
study-level probabilities, one split at a time), ``build.py`` (``build_ensemble``: selection on
val, then test), ``predict.py`` (an ensemble on new images), ``export.py`` (``export_ensemble``:
the ensemble as one ONNX or TorchScript model, checked against predict; the traced module in
``graph.py``, its sidecar in ``sidecar.py``).

May import: core, ``mura_tune.data``, ``mura_tune.train`` and ``mura_tune.search``; never report or cli.
"""
