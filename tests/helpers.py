"""Small helpers shared by tests: build MURA trees from index lines, run the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def placeholder_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 6), 128, dtype=np.uint8)).save(path)
    return path


def make_tree(
    root: Path,
    index_dir: Path | None = None,
    files: dict[str, str] | None = None,
    images: bool = True,
) -> Path:
    """Write ``root/MURA-v1.1`` with the given CSV texts (or copies of ``index_dir``'s) and placeholder PNGs.

    Images are hard links to one tiny PNG, so a 40,005-image tree takes seconds.
    """
    mura = root / "MURA-v1.1"
    mura.mkdir(parents=True, exist_ok=True)
    texts = dict(files or {})
    if index_dir is not None:
        for name in (
            "train_image_paths.csv",
            "valid_image_paths.csv",
            "train_labeled_studies.csv",
            "valid_labeled_studies.csv",
        ):
            texts.setdefault(name, (index_dir / name).read_text())
    for name, text in texts.items():
        (mura / name).write_text(text)
    if images:
        template = placeholder_png(root / ".placeholder.png")
        for name in ("train_image_paths.csv", "valid_image_paths.csv"):
            for line in texts.get(name, "").splitlines():
                line = line.strip()
                if line.endswith(".png") and line.startswith("MURA-v1.1/"):
                    target = root / line
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if not target.exists():
                        os.link(template, target)
    return root


def cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``mura-tune`` as a real subprocess (to see exit codes and stderr as a user does)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mura_tune", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 400):
    """Poll ``condition()`` until it is truthy and return it; fail (with the log's tail) if ``proc``
    exits first or ``timeout`` seconds pass (then ``proc`` is killed; callers stop its group)."""
    start = time.time()
    while not (found := condition()):
        if proc.poll() is not None:
            raise AssertionError(
                f"search exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
            )
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return found


def search_plan(exp: Path, **fields):
    """A search plan for an experiment folder built by hand (named ``x``, custom_cnn, one CPU)."""
    from mura_tune.search.plan import SearchPlan

    defaults = dict(
        name="x", exp_dir=str(exp), space="custom_cnn", preset="cpu", fixed={}, num_samples=4, max_epochs=2,
        grace_period=1, reduction_factor=2, max_concurrent=None, cpus_per_trial=1, gpus_per_trial=0, seed=0,
        scopes={"all": 4}, split_path=str(exp / "split.parquet"), data=None, max_failures=0, strict=False,
        random_search=False,
    )  # fmt: skip
    return SearchPlan.from_dict({**defaults, **fields})
