"""``loader``: images/s of the cached pipeline vs decoding every PNG every epoch.

Cached: :func:`mura_tune.data.loader.batch_loader` over the memory-mapped cache, then
``to_unit`` and ``Normalize`` (exactly what training does before augmentation). Per-epoch
decode: what the source reports' Keras generators did, PIL decode + letterbox of every image
(:func:`mura_tune.data.images.preprocess`), stacked into the same normalised batch. Both run in
one process with the same torch threads, on warm page caches (epoch 2 onward of a search),
alternating batch by batch so the load of a shared machine hits both alike.

    python -m benchmarks.bench_loader
"""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path

import numpy as np

from benchmarks.common import figure, image_table, log, stopwatch, synth_set

TARGET = 10.0


def run(
    sizes: tuple[int, ...] = (128, 256),
    batch_size: int = 32,
    png_batches: int = 18,
    cached_per_png: int = 6,
    threads: int = 1,
) -> dict:
    """Measure both paths at each size.

    Args:
        sizes: image sides to measure.
        batch_size: images per batch (both paths).
        png_batches: PNG batches measured (random images; rates are per image).
        cached_per_png: cached batches measured after each PNG batch (the arms alternate).
        threads: torch CPU threads.
    """
    import torch

    from mura_tune.data.cache import build_cache
    from mura_tune.data.loader import SplitData, batch_loader
    from mura_tune.train.augment import Normalize

    torch.set_num_threads(threads)
    table = image_table(synth_set())
    paths = sorted(table["image_path"])
    normalize = Normalize()
    raw: dict = {
        "images": len(paths),
        "batch_size": batch_size,
        "threads": threads,
        "png_batches": png_batches,
        "cached_batches_per_png_batch": cached_per_png,
        "source_png_mb": round(sum(_size(p) for p in paths) / 2**20, 1),
    }
    cases = {}
    worst = None
    for size in sizes:
        t0 = time.perf_counter()
        cache = build_cache(paths, size, progress=False)
        build_s = time.perf_counter() - t0
        split = SplitData(
            rows=cache.rows(paths),
            labels=torch.zeros(len(paths)),
            weights=torch.ones(len(paths)),
            table=table,
        )
        rng = np.random.default_rng(size)
        totals: dict[str, float] = {}
        counts = {"cached": 0, "png": 0, "uint8": 0}
        # Warm the page cache (epoch 2 onward of a search) and the PNG files: both read from memory.
        _consume(batch_loader(cache, split, batch_size, shuffle=True, seed=0), normalize)
        for p in paths:
            Path(p).read_bytes()
        cached = _epochs(cache, split, batch_size)
        uint8 = _epochs(cache, split, batch_size)
        # The arms alternate batch by batch, so load changes on a shared machine hit both alike.
        for _ in range(png_batches):
            batch = [paths[i] for i in rng.choice(len(paths), batch_size, replace=False)]
            with stopwatch(totals, "png"):
                counts["png"] += _png_batch(batch, size, normalize)
            with stopwatch(totals, "cached"):
                counts["cached"] += _consume(islice(cached, cached_per_png), normalize)
            with stopwatch(totals, "uint8"):
                counts["uint8"] += _consume(islice(uint8, cached_per_png), None)
        ips = {k: counts[k] / totals[k] for k in counts}
        ips_cpu = {k: counts[k] / max(totals[f"{k}_cpu"], 1e-9) for k in counts}
        ratio = ips["cached"] / ips["png"]
        raw[f"{size}px"] = {
            "cached_images_per_s": round(ips["cached"], 1), "png_images_per_s": round(ips["png"], 1),
            "cached_images": counts["cached"], "png_images": counts["png"],
            "cached_seconds": round(totals["cached"], 3), "png_seconds": round(totals["png"], 3),
            "ratio_by_cpu_time": round(ips_cpu["cached"] / ips_cpu["png"], 2),
            "loader_only_uint8_images_per_s": round(ips["uint8"], 1),
            "loader_only_ratio": round(ips["uint8"] / ips["png"], 1),
            "cache_mb": round(cache.images.nbytes / 2**20, 1), "cache_build_seconds_if_built": round(build_s, 2),
        }  # fmt: skip
        cases[f"{size}px"] = {
            "ratio": round(ratio, 2),
            "target": f">= {TARGET:g}",
            "met": ratio >= TARGET,
        }
        worst = ratio if worst is None else min(worst, ratio)
        log(
            f"loader {size}px: cached {ips['cached']:.0f} img/s vs PNG {ips['png']:.0f} img/s -> {ratio:.1f}x"
        )
    notes = (
        f"Images/s to normalised float batches of {batch_size}, {threads} torch thread, warm page cache, "
        f"{len(paths)} synthetic 512-px PNGs; {png_batches} PNG batches of random images, each followed by "
        f"{cached_per_png} cached batches (the arms alternate). Headline = the lower of the sizes."
    )
    notes += (
        " loader_only_* = the uint8 batches alone (no to_unit/Normalize): the rest of the cached path is "
        "float conversion and ImageNet normalisation into 3 channels, which the PNG path pays too."
    )
    return figure(ratio=worst, op=">=", target=TARGET, raw=raw, notes=notes, cases=cases)


def _consume(batches, normalize) -> int:
    """Turn cached uint8 batches into normalised float batches (``normalize=None``: uint8 only)."""
    from mura_tune.train.augment import to_unit

    n = 0
    for images, _, _, _ in batches:
        x = normalize(to_unit(images)) if normalize is not None else images
        n += x.shape[0]
    return n


def _png_batch(paths: list[str], size: int, normalize) -> int:
    """Decode and letterbox every PNG of one batch, then the same float conversion and normalisation."""
    import torch

    from mura_tune.data.images import preprocess
    from mura_tune.train.augment import to_unit

    batch = np.stack([preprocess(p, size) for p in paths])
    return normalize(to_unit(torch.from_numpy(batch))).shape[0]


def _epochs(cache, split, batch_size: int):
    """Shuffled cached batches, epoch after epoch, without end."""
    from mura_tune.data.loader import batch_loader

    epoch = 1
    while True:
        yield from batch_loader(cache, split, batch_size, shuffle=True, seed=epoch)
        epoch += 1


def _size(path: str) -> int:
    import os

    return os.stat(path).st_size


if __name__ == "__main__":
    import json

    from benchmarks.common import setup_env

    setup_env()
    print(json.dumps(run(), indent=2))
