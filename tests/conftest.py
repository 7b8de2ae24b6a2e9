"""Session-wide fixtures: one tiny synthetic MURA, one split, one Ray instance, an isolated home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports Ray or huggingface_hub: loopback only, no network, no telemetry.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")

SHARED_INDEX = Path(__file__).resolve().parents[1].parent / "shared" / "mura-v1.1-index"


@pytest.fixture(scope="session", autouse=True)
def console_logging():
    """The library's log on the console as the CLI shows it (notes on stdout, warnings on stderr)."""
    from mura_tune.cli import console_logging

    console_logging()


@pytest.fixture(scope="session", autouse=True)
def mura_home(tmp_path_factory) -> Path:
    """An isolated $MURA_TUNE_HOME (embedded data, caches, weights) for the whole suite."""
    home = tmp_path_factory.mktemp("mura_home")
    os.environ["MURA_TUNE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def shared_index() -> Path:
    if not (SHARED_INDEX / "train_image_paths.csv").exists():
        pytest.skip(f"needs the real MURA-v1.1 index at {SHARED_INDEX} (absent here)")
    return SHARED_INDEX


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic MURA-v1.1 tree (48 px) shared by the suite. Returns the folder holding MURA-v1.1."""
    from mura_tune.data.synth import synthesize

    out = tmp_path_factory.mktemp("tiny_mura") / "data"
    synthesize(out, scale=0.012, size=48, difficulty=0.3, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_split(tiny_data, tmp_path_factory):
    """(split table, path of its Parquet manifest) for ``tiny_data``."""
    from mura_tune.data.mura import read_dataset
    from mura_tune.data.split import assign_split, write_split

    table = assign_split(read_dataset(tiny_data).table, 0.25, seed=0)
    path = write_split(table, tmp_path_factory.mktemp("split") / "split.parquet")
    return table, path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every search test (Ray costs seconds to start)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
    yield ray
    ray.shutdown()


def run_cli(*args: str) -> int:
    """Run ``mura-tune`` in-process (shares the session's Ray)."""
    from mura_tune.cli import main

    return main([str(a) for a in args])
