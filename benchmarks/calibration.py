"""Calibration of the embedded synthetic data (README table).

    python -m benchmarks.calibration [--epochs-short 2] [--epochs-long 8]

Measures val study kappa (overall and per body part) of: the majority baseline, a small CNN trained
briefly, and the same CNN trained longer. The data must make training matter without being
trivially separable; finger should be the hardest part, as in MURA.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mura_tune.config import TrainConfig
from mura_tune.constants import BODY_PARTS
from mura_tune.data.embedded import ensure_embedded
from mura_tune.data.mura import read_dataset
from mura_tune.data.split import assign_split
from mura_tune.metrics import cohen_kappa, study_table
from mura_tune.train import run_training

OUT = Path(__file__).parent / "_work" / "calibration"


def run(epochs_short: int = 2, epochs_long: int = 8, seed: int = 0) -> dict:
    table = assign_split(read_dataset(ensure_embedded()).table, 0.2, seed=seed)
    val = study_table(table[table["split"] == "val"].assign(prob=0.0))
    majority = float(val["label"].mean() > 0.5)
    result = {"majority": {"overall": cohen_kappa(val["label"], np.full(len(val), majority))}}
    for name, epochs in (("short", epochs_short), ("long", epochs_long)):
        config = TrainConfig(model="custom_cnn", depth=4, base_filters=16, image_size=64, max_epochs=epochs,
                             early_stop_patience=epochs, seed=seed).validate()
        t0 = time.time()
        summary = run_training(config, table, OUT / name, verbose=False)
        val_metrics = summary["val"]
        result[name] = {"epochs": epochs, "seconds": round(time.time() - t0, 1),
                        "overall": val_metrics["val_kappa_study"], "auc": val_metrics["val_auc"],
                        **{p: val_metrics.get(f"val_kappa_study_{p}") for p in BODY_PARTS}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs-short", type=int, default=2)
    parser.add_argument("--epochs-long", type=int, default=8)
    args = parser.parse_args()
    result = run(args.epochs_short, args.epochs_long)
    print(json.dumps(result, indent=2))
    (OUT / "calibration.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
