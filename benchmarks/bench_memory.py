"""``memory``: what a second concurrent trial on the same cache adds, vs one trial alone.

Each trial is a real :func:`mura_tune.train.run.run_training` in its own process (as Ray runs
them), on one decoded cache of ~125 MB (1,216 images at 320 px). The parent samples
``/proc/<pid>/smaps`` while they run: whole-process RSS and PSS (proportional set size: a page
shared by two processes counts half in each), and the same for the cache's mapping alone
(``images.npy``). Each trial stops after its epoch, with every cache row read and the mapping
still open, until the parent has taken a synchronised sample of all trials; then it finishes.

The figure: (sum of the trials' cache-mapping PSS with 2 trials - the same with 1 trial) /
cache size. It is 0 when the second trial reads the first one's page-cache pages and 1 when it
holds its own copy. The whole-process numbers (torch, model, Python) are reported beside it.

    python -m benchmarks.bench_memory
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import REPO, WORK, figure, image_table, log, synth_set

TARGET = 0.25
SIZE = 320
MIB = 2**20


def run(size: int = SIZE, poll_s: float = 1.0, timeout_s: float = 900) -> dict:
    """Run 1 trial, then 2 concurrent trials, on the same cache; compare their memory."""
    from mura_tune.data.cache import build_cache
    from mura_tune.data.split import assign_split, write_split

    table = assign_split(image_table(synth_set()), 0.2, seed=0)
    split_path = write_split(table, WORK / "memory" / "split.parquet")
    cache = build_cache(table["image_path"].tolist(), size, progress=False)
    array = str(cache.path / "images.npy")
    cache_bytes = cache.images.nbytes
    single = _phase(1, split_path, array, size, poll_s, timeout_s)
    pair = _phase(2, split_path, array, size, poll_s, timeout_s)

    s_cache = single["sync"][0]["cache"]["Pss"]
    p_cache = sum(p["cache"]["Pss"] for p in pair["sync"])
    added_data = p_cache - s_cache
    ratio = added_data / cache_bytes
    added_total = pair["peak_total_pss"] - single["peak_total_pss"]
    raw = {
        "cache_mb": round(cache_bytes / MIB, 1), "cache_images": len(cache.index), "image_size": size,
        "single": _summary(single), "pair": _summary(pair),
        "cache_pss_sum_single_mb": round(s_cache / MIB, 1), "cache_pss_sum_pair_mb": round(p_cache / MIB, 1),
        "second_trial_adds_cache_mb": round(added_data / MIB, 1),
        "second_trial_adds_whole_process_pss_mb": round(added_total / MIB, 1),
        "whole_process_ratio_to_cache": round(added_total / cache_bytes, 3),
        "peak_rss_single_mb": round(single["peak_rss"][0] / MIB, 1),
        "peak_rss_pair_mb": [round(x / MIB, 1) for x in pair["peak_rss"]],
    }  # fmt: skip
    log(
        f"memory: second trial adds {added_data / MIB:.1f} MB of cache pages ({ratio:.3f} of the "
        f"{cache_bytes / MIB:.0f} MB cache); whole-process PSS +{added_total / MIB:.0f} MB"
    )
    notes = (
        "Linux /proc/<pid>/smaps of real run_training processes (custom_cnn depth 1, 1 epoch, 1 thread, num_workers=0), "
        "sampled every second (smaps_rollup) and once in sync (full smaps) when every trial has read every cache row with the "
        "mapping open. ratio = (sum over trials of the images.npy mapping's PSS with 2 trials - with "
        "1 trial) / cache size: the cache memory the second trial adds. Each trial's RSS counts the "
        "whole shared cache (RSS double-counts shared pages; PSS does not), and its cache mapping has "
        "no private pages. second_trial_adds_whole_process_pss_mb is everything the second trial "
        "adds (Python, torch, model, batches), not data."
    )
    return figure(ratio=ratio, op="<=", target=TARGET, raw=raw, notes=notes)


def _phase(
    n: int, split_path: Path, array: str, size: int, poll_s: float, timeout_s: float
) -> dict:
    """Start ``n`` trials at once, sample them until all have signalled, then release them."""
    procs = []
    for i in range(n):
        out = WORK / "memory" / f"trial{n}-{i}"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_memory",
            "--child",
            str(split_path),
            str(out),
            str(size),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        )
    ready = [False] * n

    def watch(i: int, stream) -> None:
        for line in stream:
            if line.startswith("READY"):
                ready[i] = True

    for i, p in enumerate(procs):
        threading.Thread(target=watch, args=(i, p.stdout), daemon=True).start()
    peak_rss, peak_total_pss, samples = [0] * n, 0, 0
    start = time.time()
    try:
        while not all(ready):
            if time.time() - start > timeout_s:
                raise RuntimeError(f"memory benchmark: trials did not finish in {timeout_s} s")
            total = 0
            for i, p in enumerate(procs):
                if p.poll() is not None and not ready[i]:
                    raise RuntimeError(
                        f"memory benchmark: trial {i} exited early with code {p.returncode}"
                    )
                m = _rollup(p.pid)
                peak_rss[i] = max(peak_rss[i], m["Rss"])
                total += m["Pss"]
            peak_total_pss = max(peak_total_pss, total)
            samples += 1
            time.sleep(poll_s)
        sync = [_smaps(p.pid, array) for p in procs]  # every trial has read every row, mapping open
        peak_total_pss = max(peak_total_pss, sum(m["total"]["Pss"] for m in sync))
        for i, m in enumerate(sync):
            peak_rss[i] = max(peak_rss[i], m["total"]["Rss"])
    finally:
        for p in procs:
            try:
                p.stdin.write("go\n")
                p.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
    return {
        "sync": sync,
        "peak_rss": peak_rss,
        "peak_total_pss": peak_total_pss,
        "samples": samples,
        "seconds": round(time.time() - start, 1),
    }


def _summary(phase: dict) -> dict:
    def mb(d: dict) -> dict:
        return {k: round(v / MIB, 1) for k, v in d.items()}

    return {
        "trials": [
            {"whole": mb(m["total"]), "cache_mapping": mb(m["cache"])} for m in phase["sync"]
        ],
        "peak_total_pss_mb": round(phase["peak_total_pss"] / MIB, 1),
        "samples": phase["samples"],
        "seconds": phase["seconds"],
    }


FIELDS = (
    "Rss",
    "Pss",
    "Shared_Clean",
    "Shared_Dirty",
    "Private_Clean",
    "Private_Dirty",
    "Anonymous",
)


def _rollup(pid: int) -> dict:
    """Whole-process smaps totals (bytes) from the cheap ``smaps_rollup``."""
    out = dict.fromkeys(FIELDS, 0)
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        if key in out:
            out[key] = int(rest.split()[0]) * 1024
    return out


def _smaps(pid: int, array: str) -> dict:
    """Sum of the smaps fields (bytes) over the whole process and over the cache file's mappings."""
    total = dict.fromkeys(FIELDS, 0)
    cache = dict.fromkeys(FIELDS, 0)
    in_cache = False
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return {"total": total, "cache": cache}
    for line in text.splitlines():
        head = line.split(None, 1)[0] if line else ""
        if head.endswith(":") and head[:-1] in FIELDS:
            value = int(line.split()[1]) * 1024
            total[head[:-1]] += value
            if in_cache:
                cache[head[:-1]] += value
        elif "-" in head and not head.endswith(":"):  # a new mapping's header line
            in_cache = line.rstrip().endswith(array)
    return {"total": total, "cache": cache}


def child(split_path: str, out: str, size: int) -> None:
    """One trial: run_training for one epoch, then wait (mapping open) until the parent says go."""
    import pandas as pd

    from mura_tune.train.config import TrainConfig
    from mura_tune.train.run import run_training

    # The smallest trial that still reads every row: the figure is about memory, not compute.
    config = TrainConfig(
        model="custom_cnn",
        depth=1,
        base_filters=1,
        batch_norm=False,
        image_size=size,
        batch_size=32,
        max_epochs=1,
        aug_strength=0.0,
        threads=1,
        device="cpu",
    )

    def on_epoch(metrics: dict, state: dict) -> None:
        print("READY", flush=True)
        sys.stdin.readline()

    run_training(config, pd.read_parquet(split_path), out, on_epoch=on_epoch, verbose=False)


if __name__ == "__main__":
    from benchmarks.common import setup_env

    setup_env()
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        print(json.dumps(run(), indent=2))
