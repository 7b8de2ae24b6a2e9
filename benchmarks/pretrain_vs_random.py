"""Does body-part pretraining give ``unfreeze_blocks=1`` fine-tuning a higher val kappa than random weights?

On the embedded synthetic data, fine-tune DenseNet-121 with only its last block (and the head)
trainable, at equal epochs (lr 1e-4 as in the MURA paper), from (a) body-part-pretrained weights
built exactly as ``pretrained: bodypart`` builds them and (b) random weights
(``pretrained: none``), for a few seeds; report each run's best-epoch val study kappa and the
paired body-part minus random difference per seed and averaged over seeds, with bootstrap
intervals over val studies (test is never looked at here). Body-part pretraining gives a clearly
higher kappa when the averaged difference's interval lies above 0.

A run whose folder already holds a finished run with the same settings is reused, so seeds can
be split across processes and combined by a last call with all of them. Run (64 px: ~11 min per
run on one core here; 6 seeds x 2 arms)::

    python -m benchmarks.pretrain_vs_random --seeds 0 1 2 &
    python -m benchmarks.pretrain_vs_random --seeds 3 4 5; wait
    python -m benchmarks.pretrain_vs_random    # reuses the 12 runs, prints the comparison
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "densenet121"
ARMS = ("bodypart", "random")


def run(
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5),
    epochs: int = 10,
    image_size: int = 64,
    unfreeze_blocks: int = 1,
    pretrain_epochs: int | None = None,
    weights: str | Path | None = None,
    lr: float = 1e-4,
    threads: int = 1,
    out: str | Path = "results/pretrain_vs_random",
    arms: tuple[str, ...] = ARMS,
) -> dict:
    """Fine-tune from body-part-pretrained and from random weights; return both arms' val kappas.

    Args:
        seeds: fine-tuning seeds (the split is the default one, seed 0, in both arms).
        epochs: fine-tuning epochs of every run (equal in both arms).
        image_size: input side for pretraining and fine-tuning.
        unfreeze_blocks: trainable last blocks of the backbone during fine-tuning.
        pretrain_epochs: body-part pretraining epochs (default: what ``pretrained: bodypart`` uses).
        weights: body-part weights to fine-tune from (default: build or reuse exactly the file
            ``pretrained: bodypart`` builds, with ``pretrain_epochs``).
        lr: fine-tuning learning rate.
        threads: torch CPU threads per run (1 is fastest on a shared 2-core machine).
        out: folder for the runs' outputs.
        arms: which of ``bodypart`` and ``random`` to run.

    Returns:
        ``{"pretrain", "settings", "runs": [{arm, seed, val_kappa_study, val_auc, ...}], "difference"
        (see :func:`paired_difference`), "mean": {arm: kappa}, "mean_auc": {arm: auc}}``.
    """
    from mura_tune.data.mura import read_dataset
    from mura_tune.data.split import assign_split
    from mura_tune.layout import TrialDir
    from mura_tune.train.config import TrainConfig
    from mura_tune.train.pretrain import BODYPART_EPOCHS, ensure_bodypart_weights, pretrain_bodypart
    from mura_tune.train.run import run_training

    os.environ["OMP_NUM_THREADS"] = str(threads)
    out = Path(out)
    table = assign_split(read_dataset(None).table, 0.2, 0)
    t0 = time.time()
    if weights is not None:
        weights = Path(weights)
    elif pretrain_epochs in (None, BODYPART_EPOCHS):  # exactly what `pretrained: bodypart` builds
        weights = ensure_bodypart_weights(
            MODEL, table, image_size=image_size, split_info={"seed": 0, "val_fraction": 0.2}
        )
    else:
        weights = out / f"{MODEL}-bodypart-e{pretrain_epochs}-{image_size}px.safetensors"
        if not weights.with_suffix(".json").exists():
            pretrain_bodypart(
                MODEL,
                out=weights,
                epochs=pretrain_epochs,
                image_size=image_size,
                threads=threads,
                split_table=table,
            )
    info = json.loads(weights.with_suffix(".json").read_text())
    result = {
        "pretrain": {
            "path": str(weights),
            "epochs": info["epochs"],
            "seconds": info["seconds"],
            "holdout_accuracy": info["holdout_accuracy"],
            "built_now_seconds": round(time.time() - t0, 1),
        },
        "settings": {
            "model": MODEL,
            "epochs": epochs,
            "image_size": image_size,
            "unfreeze_blocks": unfreeze_blocks,
            "lr": lr,
            "threads": threads,
        },
        "runs": [],
    }
    for seed in seeds:
        for arm, pretrained in (("bodypart", str(weights)), ("random", "none")):
            if arm not in arms:
                continue
            config = TrainConfig(
                model=MODEL,
                pretrained=pretrained,
                unfreeze_blocks=unfreeze_blocks,
                image_size=image_size,
                max_epochs=epochs,
                early_stop_patience=epochs,
                lr=lr,
                seed=seed,
                threads=threads,
            )
            run_dir = out / f"{arm}-seed{seed}"
            run = TrialDir(run_dir)
            if run.summary.exists() and TrainConfig.load(run.config) == config:
                summary = json.loads(run.summary.read_text())  # finished earlier, same settings
            else:
                summary = run_training(config, table, run_dir, verbose=False)
            val = summary["val"]
            row = {
                "arm": arm,
                "seed": seed,
                "val_kappa_study": round(val.get("val_kappa_study", float("nan")), 3),
                "val_auc": round(val.get("val_auc", float("nan")), 3),
                "best_epoch": summary["best_epoch"],
                "weights_source": summary["weights_source"],
                "seconds": round(summary["wall_seconds"], 1),
            }
            result["runs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if set(arms) == set(ARMS):
        result["difference"] = paired_difference(out, seeds)
    for key, metric in (("mean", "val_kappa_study"), ("mean_auc", "val_auc")):
        result[key] = {
            arm: round(sum(r[metric] for r in result["runs"] if r["arm"] == arm) / len(seeds), 3)
            for arm in sorted(arms)
        }
    return result


def paired_difference(
    out: str | Path, seeds: tuple[int, ...] | list[int], n_boot: int = 2000
) -> dict:
    """Body-part minus random val study kappa of each seed's best checkpoints and their mean over
    seeds, with paired 95% bootstrap intervals over val studies: every resample scores both arms of
    every seed on the same studies (the test split is not read).

    Returns:
        ``{"per_seed": {seed: {"kappa_bodypart_minus_random", "ci95"}}, "mean": {...},
        "val_studies": S, "clearly_higher": bool}``; clearly higher means the mean's interval is above 0.
    """
    import numpy as np
    import pandas as pd

    from mura_tune.layout import TrialDir
    from mura_tune.metrics import THRESHOLD, kappa_batch, study_table

    def val_studies(arm: str, seed: int) -> pd.DataFrame:
        preds = pd.read_parquet(TrialDir(Path(out) / f"{arm}-seed{seed}").predictions)
        return study_table(preds[preds["split"] == "val"]).set_index("study_id")

    studies = {(arm, seed): val_studies(arm, seed) for seed in seeds for arm in ARMS}
    first = studies[ARMS[0], seeds[0]]
    labels = first["label"].to_numpy()
    idx = np.random.default_rng(0).integers(0, len(first), size=(n_boot, len(first)))
    point, boot = [], []
    for seed in seeds:
        body, rand = (
            studies[arm, seed]["prob"].reindex(first.index).to_numpy() > THRESHOLD for arm in ARMS
        )
        point.append(kappa_batch(labels, body) - kappa_batch(labels, rand))
        boot.append(kappa_batch(labels[idx], body[idx]) - kappa_batch(labels[idx], rand[idx]))

    def summary(value, draws) -> dict:
        low, high = np.percentile(draws, [2.5, 97.5])
        return {
            "kappa_bodypart_minus_random": round(float(value), 3),
            "ci95": [round(float(low), 3), round(float(high), 3)],
        }

    mean = summary(np.mean(point), np.mean(boot, axis=0))
    return {
        "per_seed": {str(seed): summary(v, b) for seed, v, b in zip(seeds, point, boot)},
        "mean": mean,
        "val_studies": int(len(first)),
        "clearly_higher": mean["ci95"][0] > 0,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--unfreeze-blocks", type=int, default=1)
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/pretrain_vs_random")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    a = parser.parse_args()
    print(
        json.dumps(
            run(
                tuple(a.seeds),
                a.epochs,
                a.image_size,
                a.unfreeze_blocks,
                a.pretrain_epochs,
                a.weights,
                a.lr,
                a.threads,
                a.out,
                tuple(a.arms),
            ),
            indent=2,
        )
    )
