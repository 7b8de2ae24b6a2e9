"""GPU check: does mura-tune really use a CUDA GPU? Training, pretraining and a packed search.

    make gpu-check                       # = python -m benchmarks.gpu_check (at most ~5 min on one GPU)
    python -m benchmarks.gpu_check --device cpu --image-size 32 --max-images 64   # every path but CUDA

On one CUDA GPU it

1. trains densenet121 for one epoch at 320 px through the training core
   (:class:`mura_tune.train.engine.Engine`: AMP, channels_last), checks that the parameters and the
   batches are on CUDA and the weights are channels_last, and records train and eval images/s;
2. pretrains densenet121 on body parts for one epoch (:func:`mura_tune.train.pretrain.pretrain_bodypart`)
   and checks it ran on CUDA;
3. runs a 4-trial search with 0.5 GPUs per trial and checks, from the trials' start and end
   times, that two trials ran on the GPU at the same moment; records each trial's device and peak
   GPU memory (``summary.json``'s ``peak_gpu_memory_mb``);

and writes ``gpu_check.json`` (``--out``): the measurements, a ``checks`` dict of booleans and
``ok``; it exits 1 if a check fails. Without CUDA it prints ``skipped: no CUDA`` and exits 0.
``--device cpu`` runs the same code on the CPU (the 0.5 GPUs become 0.5 CPUs per trial), which is
how its test exercises every path except CUDA itself. Data: ``--data`` or the embedded synthetic
set (generated once into ``$MURA_TUNE_HOME`` on first use: a few minutes; not counted in the
5 minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

MODEL = "densenet121"
SEARCH_TRIALS = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0]
    )
    add = p.add_argument
    add("--device", default="cuda", help="cuda (default) or cpu (every path but CUDA)")
    add("--data", help="dataset folder or manifest (default: the embedded set)")
    add("--image-size", type=int, default=320, help="train/pretrain input side (320)")
    add("--batch-size", type=int, default=32)
    add("--max-images", type=int, default=0, help="at most this many images per split (0: all)")
    add("--search-image-size", type=int, default=128, help="search trials' input side (128)")
    add("--search-epochs", type=int, default=2, help="epochs per search trial (2)")
    add("--skip-search", action="store_true",
        help="train and pretrain only, for a machine without Ray (the search checks are left out)")  # fmt: skip
    add("--results", help="folder for the search and the weights (default: a temporary one)")
    add("--out", default="gpu_check.json", help="JSON to write (default gpu_check.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    results = Path(args.results or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    results.mkdir(parents=True, exist_ok=True)
    table = _split_table(args.data, args.max_images)
    report: dict = {"device": args.device, "torch": torch.__version__, "results": str(results)}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    report["train"] = _train(table, args)
    report["pretrain"] = _pretrain(table, args, results)
    report["search"] = None if args.skip_search else _search(table, args, results)
    kind = torch.device(args.device).type
    checks = {
        "train_params_on_device": report["train"]["param_device"] == kind,
        "train_batches_on_device": report["train"]["batch_device"] == kind,
        # channels_last on every device; float16 AMP on CUDA only
        "train_channels_last_and_amp": report["train"]["channels_last"]
        and report["train"]["amp"] == (kind == "cuda"),
        "pretrain_on_device": report["pretrain"]["device"].startswith(kind),
    }
    if report["search"] is not None:
        checks.update(_search_checks(report["search"], kind))
    report["checks"] = checks
    report["ok"] = all(report["checks"].values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, ok in report["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    search = report["search"]
    print(
        f"train {report['train']['train_images_per_s']:.0f} img/s, eval {report['train']['eval_images_per_s']:.0f} img/s "
        f"at {args.image_size} px; pretrain {report['pretrain']['seconds']:.0f} s; "
        + ("search skipped" if search is None else
           f"search {search['seconds']:.0f} s, at most {search['max_concurrent_trials']} trials at once")
        + f"; wrote {out}"
    )  # fmt: skip
    return 0 if report["ok"] else 1


def _search_checks(search: dict, kind: str) -> dict[str, bool]:
    return {
        "search_trials_on_device": all(t["device"].startswith(kind) for t in search["trials"]),
        "search_two_trials_at_once": search["max_concurrent_trials"] >= 2,
        "search_peak_memory_recorded": all(
            (t["peak_gpu_memory_mb"] is not None) == (kind == "cuda") for t in search["trials"]
        ),
    }


def _split_table(data: str | None, max_images: int):
    """The split of ``data`` (seed 0), with at most ``max_images`` sampled images per split."""
    import pandas as pd

    from mura_tune.data.mura import read_dataset
    from mura_tune.data.split import assign_split

    table = assign_split(read_dataset(data).table, 0.2, 0)
    if max_images:
        table = pd.concat(
            g.sample(n=min(len(g), max_images), random_state=0) for _, g in table.groupby("split")
        )
    return table.reset_index(drop=True)


def _train(table, args) -> dict:
    """One epoch of densenet121 through the training core: where things are, and images/s."""
    import torch

    from mura_tune.data.loader import batch_loader
    from mura_tune.train.config import TrainConfig
    from mura_tune.train.engine import Engine
    from mura_tune.train.models import build_model
    from mura_tune.train.run import prepare_data, weighted_bce

    config = TrainConfig(
        model=MODEL, image_size=args.image_size, batch_size=args.batch_size, device=args.device
    )
    data = prepare_data(table, config.validate(), progress=False)
    engine = Engine(args.device)
    torch.manual_seed(0)
    net = engine.model(build_model(config))
    first = next(iter(batch_loader(data.cache, data.train, args.batch_size, shuffle=False, seed=0)))
    batch = engine.inputs(first[0], config.aug_strength, torch.Generator().manual_seed(0))
    weight = net.backbone.features.conv0.weight
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    start = time.perf_counter()
    batches = batch_loader(
        data.cache, data.train, args.batch_size, shuffle=True, seed=0, pin_memory=engine.cuda
    )
    loss = engine.train_epoch(
        net,
        batches,
        weighted_bce,
        optimizer,
        engine.grad_scaler(),
        config.aug_strength,
        torch.Generator().manual_seed(0),
    )
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    engine.predict(
        net,
        batch_loader(data.cache, data.val, args.batch_size * 2, shuffle=False, seed=0),
        len(data.val),
    )
    eval_s = time.perf_counter() - start
    return {
        "model": MODEL, "image_size": args.image_size, "batch_size": args.batch_size,
        "param_device": weight.device.type, "batch_device": batch.device.type,
        "channels_last": weight.is_contiguous(memory_format=torch.channels_last) and engine.channels_last,
        "amp": engine.amp, "loss": loss, "train_images": len(data.train), "eval_images": len(data.val),
        "train_images_per_s": len(data.train) / train_s, "eval_images_per_s": len(data.val) / eval_s,
    }  # fmt: skip


def _pretrain(table, args, results: Path) -> dict:
    from mura_tune.train.pretrain import pretrain_bodypart

    start = time.perf_counter()
    _, info = pretrain_bodypart(
        MODEL,
        out=results / "bodypart.safetensors",
        epochs=1,
        image_size=args.image_size,
        batch_size=args.batch_size,
        split_table=table,
        device=args.device,
        verbose=False,
    )
    seconds = time.perf_counter() - start
    return {"device": info["device"], "seconds": seconds, "images": info["n_images"],
            "holdout_accuracy": info["holdout_accuracy"]}  # fmt: skip


def _search(table, args, results: Path) -> dict:
    """4 trials with half a GPU each (half a CPU with ``--device cpu``): did two run at once?"""
    from mura_tune.search.driver import run_search
    from mura_tune.search.plan import SearchPlan

    manifest = results / "manifest.parquet"  # the (sampled) images, re-split by the search as usual
    table.drop(columns="split").to_parquet(manifest, index=False)
    cuda = args.device.startswith("cuda")
    plan = SearchPlan(
        space="custom_cnn", data=str(manifest), results=str(results), name="search", preset="cpu",
        num_samples=SEARCH_TRIALS, max_epochs=args.search_epochs, random_search=True,
        # Two at a time, as 0.5 GPU each allows. With a searcher, Ray Tune starts one trial's actor
        # at a time unless max_concurrent is set: short trials would then never overlap.
        max_concurrent=2,
        gpus_per_trial=0.5 if cuda else 0.0, cpus_per_trial=None if cuda else 0.5,
        overrides={"image_size": args.search_image_size, "device": "auto" if cuda else args.device},
    )  # fmt: skip
    start = time.perf_counter()
    result = run_search(plan, verbose=0)
    seconds = time.perf_counter() - start
    trials = []
    for trial in plan.experiment.trial_dirs():
        meta = json.loads(trial.trial_json.read_text())
        summary = json.loads(trial.summary.read_text())
        trials.append({
            "trial_id": trial.trial_id, "start": meta["attempts"][-1]["started"], "end": trial.summary.stat().st_mtime,
            "device": summary["device"], "peak_gpu_memory_mb": summary.get("peak_gpu_memory_mb"),
        })  # fmt: skip
    return {
        "exit_code": result.exit_code,
        "seconds": seconds,
        "trials": trials,
        "max_concurrent_trials": most_at_once(trials),
    }


def most_at_once(trials: list[dict]) -> int:
    """The largest number of trials running at the same moment, from their start and end times."""
    events = sorted(
        [(t["start"], 1) for t in trials] + [(t["end"], -1) for t in trials],
        key=lambda e: (e[0], e[1]),
    )
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


if __name__ == "__main__":
    from benchmarks.common import setup_env

    setup_env()
    sys.exit(main())
