"""The benchmark suite: every figure of the Performance table, as side-by-side ratios.

    python -m benchmarks.run                    # make bench       (about 65 min on 2 cores; ~35 after benchmarks.value)
    python -m benchmarks.run --full             # make bench-full  (adds `scale`, longer searches)
    python -m benchmarks.run --only loader,feed # some figures; the others keep their last values

Prints a table and writes ``benchmarks/latest.json``: figure name -> ``{"ratio"|"seconds",
"target", "met", "raw", "notes", "context"}`` (``cases`` when a figure covers several cases).
Each ratio compares two runs measured in the same process or run, so machine load cancels
to first order; ``context`` records the load average while it ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import BENCH_DIR, log, machine, setup_env, timed

LATEST = BENCH_DIR / "latest.json"
ORDER = ("loader", "feed", "memory", "ensemble", "ray_overhead", "search_efficiency", "scale")


def _loader(full: bool) -> dict:
    from benchmarks import bench_loader

    return bench_loader.run(png_batches=30 if full else 18)


def _feed(full: bool) -> dict:
    from benchmarks import bench_feed

    batches = (
        {"custom_cnn": 24, "densenet121": 12} if full else {"custom_cnn": 12, "densenet121": 6}
    )
    return bench_feed.run(batches=batches)


def _memory(full: bool) -> dict:
    from benchmarks import bench_memory

    return bench_memory.run()


def _ensemble(full: bool) -> dict:
    from benchmarks import bench_ensemble
    from benchmarks.common import figure

    runs = [bench_ensemble.run(seed=s) for s in range(3)]
    seconds = sorted(r["seconds"] for r in runs)[1]
    first = runs[0]
    return figure(
        seconds=seconds, op="<=", target=1.0,
        raw={"runs_seconds": [r["seconds"] for r in runs], "candidates": first["candidates"],
             "studies": first["studies"], "steps": first["steps"], "metric": first["metric"]},
        notes=(f"GreedyEnsemble.fit on {first['candidates']} candidates x {first['studies']} studies x "
               f"{first['steps']} steps ({first['metric']}), random data; median of 3 seeds "
               "(benchmarks/bench_ensemble.py)."),
    )  # fmt: skip


def _ray_overhead(full: bool) -> dict:
    from benchmarks import bench_ray

    # --full: trials of ~20 s or more measured, not extrapolated.
    if full:
        return bench_ray.run(n_trials=3, trial_epochs=6, image_size=64)
    return bench_ray.run(n_trials=3, trial_epochs=2, image_size=32)


SEARCH_BUDGET = {"quick": 600.0, "full": 600.0}


def _search(full: bool) -> dict:
    from benchmarks import bench_search

    # 5 seeds x 2 arms of 600 CPU-seconds (reusing the value benchmark's search arms if it ran).
    return bench_search.run(
        seeds=(0, 1, 2, 3, 4), budget=SEARCH_BUDGET["full" if full else "quick"]
    )


def _scale(full: bool) -> dict:
    from benchmarks import bench_scale

    return bench_scale.run()


FIGURES: dict[str, Callable[[bool], dict]] = {
    "loader": _loader, "feed": _feed, "memory": _memory, "ensemble": _ensemble,
    "ray_overhead": _ray_overhead, "search_efficiency": _search, "scale": _scale,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--full", action="store_true", help="also `scale`, and longer/more seeds elsewhere"
    )
    parser.add_argument("--only", help=f"comma-separated figures ({', '.join(ORDER)})")
    parser.add_argument(
        "--out", default=str(LATEST), help="JSON to write (default benchmarks/latest.json)"
    )
    parser.add_argument(
        "--search-budget",
        type=float,
        help="CPU-seconds per search of search_efficiency (default 600)",
    )
    args = parser.parse_args(argv)
    if args.search_budget:
        SEARCH_BUDGET["full" if args.full else "quick"] = args.search_budget
    names = (
        [n.strip() for n in args.only.split(",")]
        if args.only
        else [n for n in ORDER if args.full or n != "scale"]
    )
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        parser.error(f"--only: unknown figure {unknown[0]!r}; choose from {', '.join(ORDER)}")

    setup_env()
    from mura_tune.io import write_json

    out = Path(args.out)
    results = _read(out)
    info = machine()
    started = time.perf_counter()
    failed = []
    for name in names:
        log(f"--- {name}")
        try:
            result, seconds, load_before, load_after = timed(lambda n=name: FIGURES[n](args.full))
        except Exception as exc:  # one broken figure must not lose the others
            traceback.print_exc()
            failed.append(name)
            results[name] = {
                "ratio": None,
                "target": None,
                "met": False,
                "raw": {},
                "notes": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            }
            continue
        result["context"] = {
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mode": "full" if args.full else "quick",
            "seconds": round(seconds, 1),
            "load_1m_before": load_before,
            "load_1m_after": load_after,
            "machine": info,
        }
        results[name] = result
        # After every figure: an interruption keeps what was measured.
        write_json(out, _ordered(results))
    if "scale" not in results:
        results["scale"] = {
            "seconds": None,
            "target": "<= 1800",
            "met": None,
            "raw": {},
            "notes": "not measured: only with --full (make bench-full)",
        }
    write_json(out, _ordered(results))
    total = time.perf_counter() - started
    print(format_table(results, names))
    print(
        f"\n{len(names)} figure(s) in {total / 60:.1f} min on {info['cores']} x {info['cpu']}; wrote {out}"
    )
    return 1 if failed else 0


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _ordered(results: dict) -> dict:
    return {
        k: results[k]
        for k in sorted(results, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER))
    }


def format_table(results: dict, ran: list[str]) -> str:
    """The Performance table (Markdown), one row per figure."""
    rows = ["| figure | value | target | met | measured in |", "| --- | --- | --- | --- | --- |"]
    for name in ORDER:
        fig = results.get(name)
        if fig is None:
            continue
        if "seconds" in fig:
            value = "n/a" if fig["seconds"] is None else f"{fig['seconds']:.3g} s"
        else:
            value = "n/a" if fig.get("ratio") is None else f"{fig['ratio']:.3g}x"
        met = {True: "yes", False: "NO", None: "-"}[fig.get("met")]
        ctx = fig.get("context", {})
        when = f"{ctx['seconds']:.0f} s" if "seconds" in ctx else "-"
        if name not in ran and ctx:
            when += " (earlier run)"
        rows.append(f"| {name} | {value} | {fig.get('target') or '-'} | {met} | {when} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
