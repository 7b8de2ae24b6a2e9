"""Where mura-tune keeps things that outlive one command: the embedded dataset, caches, weights.

``$MURA_TUNE_HOME`` (default ``~/.cache/mura-tune``).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Parameters of the embedded synthetic dataset: 30% of MURA's train studies (4,036; a model
#: trains in a few CPU-minutes at 48 px) and all 1,199 of its valid studies as the test set, so
#: that test kappa resolves differences between models (README: "The embedded synthetic data").
EMBEDDED = {"scale": 0.3, "valid_scale": 1.0, "size": 64, "difficulty": 0.0, "seed": 0}


def home() -> Path:
    return Path(os.environ.get("MURA_TUNE_HOME", Path.home() / ".cache" / "mura-tune")).expanduser()


def embedded_data_dir() -> Path:
    tag = "synth-s{scale}-v{valid_scale}-px{size}-d{difficulty}-seed{seed}".format(**EMBEDDED)
    return home() / "data" / tag


def cache_dir() -> Path:
    return home() / "cache"


def weights_dir() -> Path:
    return home() / "weights"
