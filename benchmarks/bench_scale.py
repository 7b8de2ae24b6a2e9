"""``scale``: build time and size of the decoded cache of the full-size replica (40,005 images, 256 px).

The replica follows the real MURA-v1.1 index exactly (``../shared/mura-v1.1-index``: every
path and label, synthetic pixels at 256 px). Generating it is not timed; the figure is
:func:`mura_tune.data.cache.build_cache` on all 40,005 images with every core, from a cold
cache folder. Only with ``--full`` (``make bench-full``).

    python -m benchmarks.bench_scale
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from benchmarks.common import REPO, WORK, figure, image_table, log, synth_set

INDEX = REPO.parent / "shared" / "mura-v1.1-index"
#: No target in the issue; this is the budget we hold it to: one build per dataset and size.
TARGET_S = 1800.0


def run(index: Path = INDEX, size: int = 256) -> dict:
    """Generate the replica once (cached under ``_work/``), then time a cold cache build."""
    from mura_tune.data.cache import build_cache

    if not (index / "train_image_paths.csv").exists():
        return figure(
            seconds=None,
            op="<=",
            target=TARGET_S,
            raw={"index": str(index)},
            met=None,
            notes=f"skipped: the real MURA-v1.1 index is absent ({index})",
        )
    t0 = time.perf_counter()
    data = synth_set("replica256", index=str(index), size=256, scale=0.02)
    generate_s = time.perf_counter() - t0
    paths = image_table(data)["image_path"].tolist()
    root = WORK / "scale_cache"
    shutil.rmtree(root, ignore_errors=True)
    log(f"scale: building the {size}-px cache of {len(paths)} images")
    t0 = time.perf_counter()
    cache = build_cache(paths, size, root=root, progress=False)
    seconds = time.perf_counter() - t0
    png_bytes = sum(os.stat(p).st_size for p in paths)
    files = sum(f.stat().st_size for f in Path(cache.path).iterdir())
    raw = {
        "images": len(paths), "image_size": size, "workers": os.cpu_count(), "build_seconds": round(seconds, 1),
        "images_per_second": round(len(paths) / seconds, 1), "cache_mb": round(files / 2**20, 1),
        "array_mb": round(cache.images.nbytes / 2**20, 1), "source_png_mb": round(png_bytes / 2**20, 1),
        "unreadable": int((~cache.index["ok"]).sum()),
        "replica_generate_seconds_this_run": round(generate_s, 1),
    }  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)  # 2.5 GB: not kept
    log(f"scale: {len(paths)} images in {seconds:.0f} s, {files / 2**20:.0f} MB")
    notes = (
        f"Cold build of the {size}-px cache of the 40,005-image replica of ../shared/mura-v1.1-index "
        f"(synthetic 256-px PNGs; real MURA PNGs are ~512 px, so decoding real data takes longer), "
        f"{os.cpu_count()} worker processes. No target in the issue; {TARGET_S:g} s is ours."
    )
    return figure(seconds=seconds, op="<=", target=TARGET_S, raw=raw, notes=notes)


if __name__ == "__main__":
    import json

    from benchmarks.common import setup_env

    setup_env()
    print(json.dumps(run(), indent=2))
