"""Shared pieces of the benchmark suite: the work folder, the synthetic sets, figures, timing.

Everything the suite generates lives in ``benchmarks/_work/`` (git-ignored) and is reused by
later runs: the 512-px synthetic set, ``$MURA_TUNE_HOME`` (embedded data, decoded caches) and
the experiments of the Ray figures. Delete the folder to measure a run from scratch.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / "_work"
HOME = WORK / "home"

#: The "realistic PNG" set: ~1,200 radiograph-like images whose long side is 512 px (as MURA's).
SYNTH512 = {"scale": 0.03, "size": 512, "difficulty": 0.5, "seed": 0}


def setup_env() -> None:
    """Environment for every figure (and the subprocesses they start): loopback Ray, offline, own home."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["MURA_TUNE_HOME"] = str(HOME)
    HOME.mkdir(parents=True, exist_ok=True)


def log(message: str) -> None:
    """One progress line on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synth_set(name: str = "synth512", **overrides: Any) -> Path:
    """A synthetic MURA tree under ``_work/``, generated once (atomically) and reused.

    Returns:
        The folder holding ``MURA-v1.1``.
    """
    from mura_tune.data.synth import synthesize

    out = WORK / name
    done = out / ".complete"
    if done.exists():
        return out
    args = {**SYNTH512, **overrides}
    tmp = WORK / f"{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    log(f"generating the synthetic set {name} ({args}) once")
    synthesize(tmp, progress=False, **args)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    done.write_text(f"{time.perf_counter() - started:.1f}\n")
    return out


def image_table(data: Path | None):
    """The canonical image table of a MURA folder (``read_dataset(data).table``; None: the embedded set)."""
    from mura_tune.data.mura import read_dataset

    return read_dataset(data).table


def embedded_cache(size: int):
    """The decoded-image cache of the embedded set at ``size`` px (built once, then reused)."""
    from mura_tune.data.cache import build_cache

    return build_cache(image_table(None)["image_path"].tolist(), size, progress=False)


def load_1m() -> float:
    """The 1-minute load average (how busy the machine was while a figure was measured)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def machine() -> dict:
    """CPU model, cores, memory and library versions (recorded with every figure)."""
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "python": platform.python_version(),
        "torch": torch.__version__, "numpy": numpy.__version__, "platform": platform.platform(),
    }  # fmt: skip


@contextmanager
def stopwatch(totals: dict[str, float], key: str):
    """Add the wall and CPU seconds of the ``with`` block to ``totals[key]`` / ``totals[key+'_cpu']``."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - wall
        totals[f"{key}_cpu"] = totals.get(f"{key}_cpu", 0.0) + time.process_time() - cpu


def check(value: float | None, op: str, target: float) -> bool | None:
    """Whether ``value op target`` holds (None if there is no value)."""
    if value is None or value != value:  # NaN
        return None
    return value >= target if op == ">=" else value <= target


def figure(
    *,
    ratio: float | None = None,
    seconds: float | None = None,
    op: str,
    target: float,
    raw: dict,
    notes: str,
    cases: dict[str, dict] | None = None,
    met: bool | None = None,
) -> dict:
    """One entry of ``latest.json``.

    Args:
        ratio: the headline ratio (or ``seconds`` for an absolute time).
        op: ``">="`` or ``"<="``: how the headline compares to ``target``.
        target: the target value.
        raw: the measurements behind the headline.
        notes: what was measured, on what, and why a target is missed.
        cases: per-case ``{"ratio", "target", "met"}`` when one figure covers several cases.
        met: override (default: the headline compared with the target, and every case met).
    """
    value = ratio if ratio is not None else seconds
    if met is None:
        met = check(value, op, target)
        if cases and met is not None:
            met = met and all(c.get("met") for c in cases.values())
    out: dict[str, Any] = (
        {"ratio": _round(ratio)} if seconds is None else {"seconds": _round(seconds)}
    )
    out.update({"target": f"{op} {target:g}", "met": met, "raw": raw, "notes": notes})
    if cases:
        out["cases"] = cases
    return out


def case(value: float | None, op: str, target: float) -> dict:
    return {"ratio": _round(value), "target": f"{op} {target:g}", "met": check(value, op, target)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def timed(fn: Callable[[], dict]) -> tuple[dict, float, float, float]:
    """Run one figure; return it with its wall seconds and the load average before and after."""
    before, start = load_1m(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, before, load_1m()
