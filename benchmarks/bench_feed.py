"""``feed``: training images/s with the real data path vs the same batches already in memory.

Real: cache -> :func:`~mura_tune.data.loader.batch_loader` -> ``to_unit`` -> ``augment`` ->
``Normalize`` -> forward/backward/step, as :func:`mura_tune.train.run.run_training` does it.
In memory: the same batches, produced once beforehand (augmented, normalised float tensors),
then only forward/backward/step: the compute limit. The two arms run in one process on one
model, alternating batch by batch, so machine load hits both alike. Also measured, to say where the
difference goes: the data path alone (loader + augment + normalise, no model). Evaluation
images/s are measured too, through :func:`mura_tune.train.run.predict` (eval mode, inference_mode).

    python -m benchmarks.bench_feed
"""

from __future__ import annotations

from benchmarks.common import case, figure, image_table, log, stopwatch, synth_set

TARGETS = {"custom_cnn": 0.8, "densenet121": 0.9}
MODELS = {
    "custom_cnn": {"model": "custom_cnn", "depth": 4},
    "densenet121": {"model": "densenet121", "unfreeze_blocks": 1, "pretrained": "none"},
}


def run(
    size: int = 128,
    batch_size: int = 32,
    batches: dict[str, int] | None = None,
    threads: int = 1,
    aug_strength: float = 0.5,
) -> dict:
    """Measure both arms for each model.

    Args:
        size: image side.
        batch_size: images per step.
        batches: measured batches per arm and model (after one warm-up batch each).
        threads: torch CPU threads.
        aug_strength: augmentation strength of the real path.
    """
    import torch

    from mura_tune.data.cache import build_cache
    from mura_tune.data.loader import SplitData
    from mura_tune.train.augment import Normalize
    from mura_tune.train.config import TrainConfig
    from mura_tune.train.models import build_model

    batches = batches or {"custom_cnn": 16, "densenet121": 8}
    torch.set_num_threads(threads)
    table = image_table(synth_set()).reset_index(drop=True)
    paths = table["image_path"].tolist()
    cache = build_cache(paths, size, progress=False)
    split = SplitData(
        rows=cache.rows(paths),
        labels=torch.tensor(table["label"].to_numpy(), dtype=torch.float32),
        weights=torch.ones(len(paths)),
        table=table,
    )
    normalize = Normalize()
    raw: dict = {
        "image_size": size,
        "batch_size": batch_size,
        "threads": threads,
        "aug_strength": aug_strength,
        "num_workers": 0,
        "device": "cpu",
        "images_in_cache": len(paths),
    }
    cases = {}
    for name, overrides in MODELS.items():
        n_batches = batches[name]
        config = TrainConfig(**overrides, image_size=size, batch_size=batch_size).validate()
        torch.manual_seed(0)
        net = build_model(config)
        real_batch, step = _arms(net, cache, split, batch_size, normalize, aug_strength)

        # The in-memory arm's batches: produced by the same pipeline, once, before timing.
        memory = [real_batch() for _ in range(min(n_batches, 4))]
        totals: dict[str, float] = {}
        counts = {"real": 0, "memory": 0, "data_only": 0}
        step(*real_batch())  # warm-up (allocator, first-call kernels)
        step(*memory[0])
        # Arms alternate batch by batch (and which goes first), so load changes hit both alike.
        for i in range(n_batches):
            for arm in ("real", "memory") if i % 2 == 0 else ("memory", "real"):
                with stopwatch(totals, arm):
                    x, labels, weights = real_batch() if arm == "real" else memory[i % len(memory)]
                    step(x, labels, weights)
                counts[arm] += len(labels)
            with stopwatch(totals, "data_only"):
                counts["data_only"] += len(real_batch()[1])
        ips = {k: counts[k] / totals[k] for k in counts}
        eval_ips = _eval_images_per_s(
            net, cache, split, batch_size, normalize, 4 * n_batches * batch_size
        )
        ratio = ips["real"] / ips["memory"]
        cpu_ratio = (counts["real"] / totals["real_cpu"]) / (
            counts["memory"] / totals["memory_cpu"]
        )
        raw[name] = {
            "real_images_per_s": round(ips["real"], 2), "memory_images_per_s": round(ips["memory"], 2),
            "data_path_only_images_per_s": round(ips["data_only"], 1), "eval_images_per_s": round(eval_ips, 1),
            "real_seconds": round(totals["real"], 2), "memory_seconds": round(totals["memory"], 2),
            "data_path_seconds": round(totals["data_only"], 2), "images_per_arm": counts["real"],
            "ratio_by_cpu_time": round(cpu_ratio, 3),
            "data_path_share_of_step": round(totals["data_only"] / (totals["data_only"] + totals["memory"]), 3),
            "config": {k: v for k, v in config.to_dict().items() if k in ("model", "depth", "unfreeze_blocks", "pretrained")},
        }  # fmt: skip
        cases[name] = case(ratio, ">=", TARGETS[name])
        log(
            f"feed {name}: real {ips['real']:.1f} img/s vs in-memory {ips['memory']:.1f} img/s -> {ratio:.3f}; "
            f"evaluation {eval_ips:.1f} img/s"
        )
    worst = min(c["ratio"] / TARGETS[n] for n, c in cases.items())
    headline = cases["densenet121"]["ratio"]
    notes = (
        f"Training images/s at {size} px, batch {batch_size}, {threads} torch thread, CPU, num_workers=0 "
        f"(loader, augment and normalise run in the training thread, in series with the model). "
        f"Headline = densenet121 (unfreeze_blocks=1, random init); cases hold both models' ratios "
        f"(targets: custom_cnn >= 0.8, densenet121 >= 0.9). data_path_share_of_step = the data path's "
        f"time / (data path + compute): on a GPU the augment runs on the device and num_workers>0 "
        f"overlaps loading with compute. eval_images_per_s = mura_tune.train.run.predict over the cache "
        f"(no augmentation, no gradients). Min ratio/target: {worst:.3f}."
    )
    return figure(
        ratio=headline, op=">=", target=TARGETS["densenet121"], raw=raw, notes=notes, cases=cases
    )


def _arms(net, cache, split, batch_size: int, normalize, aug_strength: float):
    """``real_batch()`` (the next batch through the real data path) and ``step(x, labels, weights)``."""
    import torch

    from mura_tune.data.loader import batch_loader
    from mura_tune.train.augment import augment, to_unit

    net.train()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batches = _endless(lambda e: batch_loader(cache, split, batch_size, shuffle=True, seed=e))

    def real_batch():
        images, labels, weights, _ = next(batches)
        return normalize(augment(to_unit(images), aug_strength, gen)), labels, weights

    def step(x, labels, weights) -> None:
        logits = net(x).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return real_batch, step


def _eval_images_per_s(net, cache, split, batch_size: int, normalize, n_images: int) -> float:
    """Images/s of the evaluation path (:func:`mura_tune.train.run.predict`) on the first ``n_images``."""
    import time
    from types import SimpleNamespace

    import torch

    from mura_tune.data.loader import SplitData
    from mura_tune.train.run import predict

    def first(n: int) -> SplitData:
        return SplitData(split.rows[:n], split.labels[:n], split.weights[:n], split.table.iloc[:n])

    data, cpu, n = SimpleNamespace(cache=cache), torch.device("cpu"), min(n_images, len(split))
    predict(net, data, first(batch_size), cpu, batch_size, False, normalize)  # warm-up
    t0 = time.perf_counter()
    predict(net, data, first(n), cpu, batch_size, False, normalize)
    seconds = time.perf_counter() - t0
    net.train()
    return n / seconds


def _endless(make):
    epoch = 0
    while True:
        yield from make(epoch)
        epoch += 1


if __name__ == "__main__":
    import json

    from benchmarks.common import setup_env

    setup_env()
    print(json.dumps(run(), indent=2))
