"""Decode every image once: a memory-mapped ``N × S × S`` uint8 array per dataset and size.

Layout of one cache folder (``$MURA_TUNE_HOME/cache/<key>/``)::

    images.npy      uint8 (N, S, S), opened with ``np.load(mmap_mode="r")``
    index.parquet   image_path, row, ok, reason  (ok=False rows are unreadable images, zeros)
    meta.json       size, count, key, preprocessing version

The key hashes the sorted source list (path, byte size, mtime), the size and the preprocessing
version, so a changed dataset gets a new cache. Building writes into ``<key>.partial-<pid>``
and renames it into place; an exclusive file lock makes concurrent builders wait for the first
one rather than doing the work twice. Every trial on a node memory-maps the same file, so the
page cache holds one copy whatever the number of concurrent trials. On a multi-node cluster each
node builds its own node-local copy under its ``$MURA_TUNE_HOME`` (decoding is cheap next to a
search; copying from shared storage would need that storage to be fast).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mura_tune.data.images import PREPROCESS_VERSION, ImageReadError, preprocess
from mura_tune.home import cache_dir
from mura_tune.io import write_json, write_parquet

CHUNK = 64
#: A build in progress: ``<key>.partial-<pid>``, renamed to ``<key>`` when complete.
PARTIAL = ".partial-"

log = logging.getLogger(__name__)


@dataclass
class ImageCache:
    """An opened cache: the memory-mapped array and the row of each image path."""

    path: Path
    images: np.ndarray  # (N, S, S) uint8, memory-mapped read-only
    index: pd.DataFrame

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def rows(self, image_paths) -> np.ndarray:
        """Row numbers of ``image_paths`` in the array (KeyError if one is not cached)."""
        lookup = pd.Series(self.index["row"].to_numpy(), index=self.index["image_path"].to_numpy())
        return lookup.loc[list(image_paths)].to_numpy(dtype=np.int64)

    @property
    def unreadable(self) -> pd.DataFrame:
        return self.index.loc[~self.index["ok"], ["image_path", "reason"]]


def cache_key(image_paths: list[str], size: int) -> str:
    """Hash of the source list (path, size in bytes, mtime), the image size and preprocessing."""
    digest = hashlib.sha256(f"v{PREPROCESS_VERSION}|{size}|".encode())
    for path in sorted(image_paths):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{path}|{stamp}\n".encode())
    return f"{digest.hexdigest()[:20]}-{size}px"


def _decode_chunk(args: tuple[str, int, int, list[str]]) -> list[tuple[int, str | None]]:
    array_path, size, start, paths = args
    images = np.load(array_path, mmap_mode="r+")
    failures = []
    for offset, path in enumerate(paths):
        try:
            images[start + offset] = preprocess(path, size)
        except ImageReadError as exc:
            images[start + offset] = 0
            failures.append((start + offset, str(exc)))
    images.flush()
    return failures


def build_cache(
    image_paths: list[str],
    size: int,
    root: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ImageCache:
    """Open the cache for these images at this size, building it first if needed.

    Args:
        image_paths: absolute image paths (order does not matter).
        size: side of the square images.
        root: where caches live (default ``$MURA_TUNE_HOME/cache``).
        workers: decoding processes (default: all cores).
        progress: show a progress bar while building.
    """
    root = Path(root) if root is not None else cache_dir()
    paths = sorted(set(image_paths))
    final = root / cache_key(paths, size)
    remove_abandoned_builds(root)
    if (final / "meta.json").exists():
        return open_cache(final)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds it built
        if (final / "meta.json").exists():
            return open_cache(final)
        tmp = root / f"{final.name}{PARTIAL}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        array_path = tmp / "images.npy"
        np.lib.format.open_memmap(
            array_path, mode="w+", dtype=np.uint8, shape=(len(paths), size, size)
        ).flush()
        jobs = [
            (str(array_path), size, i, paths[i : i + CHUNK]) for i in range(0, len(paths), CHUNK)
        ]
        failures: dict[int, str] = {}
        workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
        # A bar only on a terminal: in logs and pipes it is noise around the one-line messages.
        bar = tqdm(
            total=len(paths),
            desc=f"caching {size}px images",
            unit="img",
            file=sys.stderr,
            disable=not progress or not sys.stderr.isatty(),
        )
        if workers == 1:
            results = map(_decode_chunk, jobs)
        else:
            pool = ProcessPoolExecutor(workers)
            results = pool.map(_decode_chunk, jobs)
        for job, chunk_failures in zip(jobs, results):
            failures.update(chunk_failures)
            bar.update(len(job[3]))
        bar.close()
        if workers > 1:
            pool.shutdown()
        index = pd.DataFrame(
            {
                "image_path": paths,
                "row": np.arange(len(paths), dtype=np.int64),
                "ok": [i not in failures for i in range(len(paths))],
                "reason": [failures.get(i, "") for i in range(len(paths))],
            }
        )
        write_parquet(tmp / "index.parquet", index)
        # meta.json is written last: a folder without it is never trusted.
        write_json(
            tmp / "meta.json",
            {
                "size": size,
                "count": len(paths),
                "key": final.name,
                "preprocess_version": PREPROCESS_VERSION,
                "unreadable": len(failures),
            },
        )
        if final.exists():  # a folder without meta.json (half-copied, crashed) is never trusted
            shutil.rmtree(final)
        os.replace(tmp, final)
    return open_cache(final)


def remove_abandoned_builds(root: Path) -> list[Path]:
    """Remove ``<key>.partial-<pid>`` folders of interrupted builds; return them.

    A build holds its key's lock for as long as it runs, so a partial folder whose lock can be
    taken belongs to a builder that died (killed, out of memory, machine crash), on this node or,
    with a shared ``$MURA_TUNE_HOME``, on another.
    """
    removed = []
    for partial in sorted(root.glob(f"*{PARTIAL}*")):
        key = partial.name.split(PARTIAL, 1)[0]
        with open(root / f".{key}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a builder is at work on it
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    if removed:
        log.info("removed %d interrupted image-cache build(s) in %s", len(removed), root)
    return removed


def open_cache(path: str | Path) -> ImageCache:
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    images = np.load(path / "images.npy", mmap_mode="r")
    if images.shape != (meta["count"], meta["size"], meta["size"]):
        raise ImageReadError(f"cache {path} is inconsistent: array {images.shape} vs meta {meta}")
    return ImageCache(path=path, images=images, index=pd.read_parquet(path / "index.parquet"))
