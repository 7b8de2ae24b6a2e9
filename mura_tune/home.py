"""Where mura-tune keeps things that outlive one command: the embedded dataset, caches, weights.

``$MURA_TUNE_HOME`` (default ``~/.cache/mura-tune``).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Parameters of the embedded synthetic dataset (small enough for a CPU demo).
EMBEDDED = {"scale": 0.1, "size": 128, "difficulty": 0.0, "seed": 0}


def home() -> Path:
    return Path(os.environ.get("MURA_TUNE_HOME", Path.home() / ".cache" / "mura-tune")).expanduser()


def embedded_data_dir() -> Path:
    tag = "synth-s{scale}-px{size}-d{difficulty}-seed{seed}".format(**EMBEDDED)
    return home() / "data" / tag


def cache_dir() -> Path:
    return home() / "cache"


def weights_dir() -> Path:
    return home() / "weights"
