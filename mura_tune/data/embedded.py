"""The embedded default dataset: a small synthetic MURA, generated once into ``$MURA_TUNE_HOME``."""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from mura_tune.data.synth import synthesize
from mura_tune.home import EMBEDDED, embedded_data_dir

log = logging.getLogger(__name__)


def ensure_embedded(verbose: bool = True) -> Path:
    """Return the embedded dataset's folder, generating it on first use (safe across processes)."""
    out = embedded_data_dir()
    done = out / ".complete"
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if verbose:
                log.warning("generating the embedded synthetic dataset into %s (once)", out)
            tmp = out.with_name(out.name + ".partial")
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            synthesize(tmp, **EMBEDDED, progress=verbose)
            tmp.rename(out)
            done.touch()
    if verbose:
        log.warning("using the embedded synthetic dataset at %s", out)
    return out
