"""Stage 3, search: many training runs as one Ray Tune experiment, proposed by Optuna, cut by ASHA.

``spaces.py`` (the registry of search spaces), ``plan.py`` (SearchPlan: every flag validated,
everything resolved), ``prepare.py`` (split, cache and starting weights, in the driver),
``trainable.py`` (what runs in a Ray worker), ``searcher.py`` (Optuna searcher, ASHA),
``recovery.py`` (after a killed driver), ``driver.py`` (``run_search``, Ray start, signals),
``leaderboard.py`` (one row per trial, readable without Ray), ``tracking.py`` (``--mlflow``: runs
of trials and ensembles; its Ray callback in ``tracking_callback.py``). Only this stage imports Ray Tune,
and only inside the functions that run a search (after :func:`~mura_tune.search.driver.init_ray`
has set Ray's environment), so planning a search, and every error a plan raises, never imports Ray.

May import: core, ``mura_tune.data`` and ``mura_tune.train``; never ensemble, report or cli.
"""
