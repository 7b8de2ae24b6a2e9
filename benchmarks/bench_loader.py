"""``loader``: images/s of the cached pipeline vs decoding every PNG every epoch.

Cached: :func:`mura_tune.data.loader.batch_loader` over the memory-mapped cache, then
``to_unit`` and ``Normalize`` (exactly what training does before augmentation). Per-epoch
decode: what the source reports' Keras generators did, PIL decode + letterbox of every image
(:func:`mura_tune.data.images.preprocess`), stacked into the same normalised batch. Both run in
one process with the same torch threads, on warm page caches (epoch 2 onward of a search),
measured in interleaved blocks so the load of a shared machine hits both alike.

    python -m benchmarks.bench_loader
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import figure, image_table, log, stopwatch, synth_set

TARGET = 10.0


def run(sizes: tuple[int, ...] = (128, 256), batch_size: int = 32, png_images: int = 192, rounds: int = 3,
        threads: int = 1) -> dict:
    """Measure both paths at each size.

    Args:
        sizes: image sides to measure.
        batch_size: images per batch (both paths).
        png_images: images decoded from PNG per round (a random subset; rates are per image).
        rounds: interleaved rounds; each is one cached epoch and one PNG block.
        threads: torch CPU threads.
    """
    import torch

    from mura_tune.augment import Normalize, to_unit
    from mura_tune.data.cache import build_cache
    from mura_tune.data.images import preprocess
    from mura_tune.data.loader import SplitData, batch_loader

    torch.set_num_threads(threads)
    table = image_table(synth_set())
    paths = sorted(table["image_path"])
    normalize = Normalize()
    raw: dict = {"images": len(paths), "batch_size": batch_size, "threads": threads, "rounds": rounds,
                 "png_images_per_round": png_images, "source_png_mb": round(sum(_size(p) for p in paths) / 2**20, 1)}
    cases = {}
    worst = None
    for size in sizes:
        t0 = time.perf_counter()
        cache = build_cache(paths, size, progress=False)
        build_s = time.perf_counter() - t0
        split = SplitData(rows=cache.rows(paths), labels=torch.zeros(len(paths)), weights=torch.ones(len(paths)),
                          table=table)
        rng = np.random.default_rng(size)
        totals: dict[str, float] = {}
        counts = {"cached": 0, "png": 0, "uint8": 0}
        _cached_epoch(cache, split, batch_size, 0, normalize)  # warm the page cache (epoch 2+ of a search)
        for p in paths[:png_images]:
            preprocess(p, size)  # warm the PNG files too: both paths read from memory
        for r in range(rounds):
            with stopwatch(totals, "cached"):
                counts["cached"] += _cached_epoch(cache, split, batch_size, r + 1, normalize)
            with stopwatch(totals, "uint8"):
                counts["uint8"] += _cached_epoch(cache, split, batch_size, r + 1, None)
            subset = [paths[i] for i in rng.permutation(len(paths))[:png_images]]
            with stopwatch(totals, "png"):
                counts["png"] += _png_epoch(subset, size, batch_size, normalize)
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
        cases[f"{size}px"] = {"ratio": round(ratio, 2), "target": f">= {TARGET:g}", "met": ratio >= TARGET}
        worst = ratio if worst is None else min(worst, ratio)
        log(f"loader {size}px: cached {ips['cached']:.0f} img/s vs PNG {ips['png']:.0f} img/s -> {ratio:.1f}x")
    notes = (f"Images/s to normalised float batches of {batch_size}, {threads} torch thread, warm page cache, "
             f"{len(paths)} synthetic 512-px PNGs (cached: whole epochs; PNG: {png_images}-image random subsets), "
             f"{rounds} interleaved rounds. Headline = the lower of the sizes.")
    notes += (" loader_only_* = the uint8 batches alone (no to_unit/Normalize): the rest of the cached path is "
              "float conversion and ImageNet normalisation into 3 channels, which the PNG path pays too.")
    return figure(ratio=worst, op=">=", target=TARGET, raw=raw, notes=notes, cases=cases)


def _cached_epoch(cache, split, batch_size: int, seed: int, normalize) -> int:
    from mura_tune.augment import to_unit
    from mura_tune.data.loader import batch_loader

    n = 0
    for images, _, _, _ in batch_loader(cache, split, batch_size, shuffle=True, seed=seed):
        x = normalize(to_unit(images)) if normalize is not None else images  # None: uint8 batches only
        n += x.shape[0]
    return n


def _png_epoch(paths: list[str], size: int, batch_size: int, normalize) -> int:
    import torch

    from mura_tune.augment import to_unit
    from mura_tune.data.images import preprocess

    n = 0
    for i in range(0, len(paths), batch_size):
        batch = np.stack([preprocess(p, size) for p in paths[i : i + batch_size]])
        x = normalize(to_unit(torch.from_numpy(batch)))
        n += x.shape[0]
    return n


def _size(path: str) -> int:
    import os

    return os.stat(path).st_size


if __name__ == "__main__":
    import json

    from benchmarks.common import setup_env

    setup_env()
    print(json.dumps(run(), indent=2))
