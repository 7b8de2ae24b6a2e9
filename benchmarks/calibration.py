"""Calibration of the embedded synthetic data (README table).

    python -m benchmarks.calibration [--seeds 3]

Measures val study kappa (overall and per body part, median over seeds) of: the majority baseline,
a small CNN trained briefly, the same CNN trained longer, and a better-chosen variant of it. The data must make training matter without being
trivially separable; finger should be the hardest part, as in MURA.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mura_tune.constants import BODY_PARTS
from mura_tune.data.embedded import ensure_embedded
from mura_tune.data.mura import read_dataset
from mura_tune.data.split import assign_split
from mura_tune.metrics import cohen_kappa, study_table
from mura_tune.train.config import TrainConfig
from mura_tune.train.run import run_training

OUT = Path(__file__).parent / "_work" / "calibration"

#: (name, epochs, config overrides): brief training, longer training, and a better-chosen model.
ARMS = (
    ("brief", 2, {}),
    ("long", 12, {}),
    ("long_reports_style", 12, {"global_pool": "avg", "aug_strength": 0.5}),
)


def run(seeds=(0, 1), arms=ARMS) -> dict:
    """Val study kappa (median over seeds, and each seed) of the majority baseline and each arm."""
    table = assign_split(read_dataset(ensure_embedded()).table, 0.2, seed=0)
    val = study_table(table[table["split"] == "val"].assign(prob=0.0))
    majority = float(val["label"].mean() > 0.5)
    result = {
        "majority": {"overall": cohen_kappa(val["label"], np.full(len(val), majority))},
        "val_studies": len(val),
        "seeds": list(seeds),
    }
    for name, epochs, overrides in arms:
        runs = []
        for seed in seeds:
            config = TrainConfig(
                max_epochs=epochs, early_stop_patience=epochs, seed=seed, **overrides
            ).validate()
            t0 = time.time()
            summary = run_training(config, table, OUT / f"{name}-s{seed}", verbose=False)
            runs.append(
                {
                    "seconds": round(time.time() - t0, 1),
                    "overall": summary["val"]["val_kappa_study"],
                    "auc": summary["val"]["val_auc"],
                    "test": summary["test"]["test_kappa_study"],
                    "test_auc": summary["test"]["test_auc"],
                    **{p: summary["val"].get(f"val_kappa_study_{p}") for p in BODY_PARTS},
                }
            )
        median = {k: float(np.median([r[k] for r in runs if r[k] is not None])) for k in runs[0]}
        result[name] = {"epochs": epochs, "overrides": overrides, "median": median, "runs": runs}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    result = run(tuple(range(args.seeds)))
    print(json.dumps(result, indent=2))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "calibration.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
