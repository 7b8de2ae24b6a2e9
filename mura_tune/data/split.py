"""Patient-disjoint train/val/test splits.

The official ``valid`` set becomes ``test`` and is never used for fitting or selection. The
official ``train`` set is split into ``train`` and ``val`` by *patient* (across all body parts,
because some patients have studies of several parts), stratified by body part and label so
that each part's abnormal rate in val stays close to train's.

For a cross-validated refit, :func:`assign_folds` deals the train+val studies into ``K`` folds
by the same rule (patients whole, across body parts; strata balanced), and :func:`fold_split`
turns one fold into the split its fold model trains on. Test stays out of every fold.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from mura_tune.constants import SPLITS, TABLE_COLUMNS
from mura_tune.errors import ConfigError, DataError, check_int
from mura_tune.io import write_parquet

log = logging.getLogger(__name__)


def assign_split(table: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """Return ``table`` with a ``split`` column (``train``/``val``/``test``).

    Patients are visited in a seeded random order (largest first) and each goes to val when
    that brings the val study counts of every (body part, label) stratum closer to
    ``val_fraction`` of the total; this hits the fraction to within a few studies and keeps
    each part's abnormal rate balanced.

    A table that already has a ``split`` column (a manifest's own split, or an experiment's
    ``split.parquet`` passed as data) keeps it: it is checked, never re-split
    (:func:`own_split`).

    Raises:
        ConfigError: ``val_fraction`` is not in (0, 1).
        DataError: the table's own split is unusable (see :func:`own_split`).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if "split" in table.columns:
        return own_split(table)
    out = table.copy()
    out["split"] = np.where(out["source_split"] == "valid", "test", "train")
    train = out[out["source_split"] == "train"]
    if train.empty:
        raise DataError("the dataset has no train images to split")
    patients, matrix, order = _patient_strata(train, seed)
    target = val_fraction * matrix.sum(axis=0)
    val_counts = np.zeros_like(target)
    in_val = np.zeros(len(patients), dtype=bool)
    for i in order:
        row = matrix[i]
        gain = np.abs(val_counts - target).sum() - np.abs(val_counts + row - target).sum()
        if gain > 0:
            val_counts += row
            in_val[i] = True
    val_patients = set(patients[in_val])
    out.loc[(out["split"] == "train") & out["patient_id"].isin(val_patients), "split"] = "val"
    return out


def _patient_strata(images: pd.DataFrame, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patients, their study counts per (body part, label) stratum, and the order to deal them in.

    The order is a seeded random permutation, then largest patients first (stable), so the small
    patients dealt last can even out the counts.
    """
    studies = images.drop_duplicates("study_id")[["study_id", "patient_id", "body_part", "label"]]
    strata = pd.Categorical(studies["body_part"].astype(str) + ":" + studies["label"].astype(str))
    counts = pd.crosstab(studies["patient_id"], strata.codes)  # patients × strata study counts
    matrix = counts.to_numpy(dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(matrix))
    order = order[np.argsort(-matrix[order].sum(axis=1), kind="stable")]
    return counts.index.to_numpy(), matrix, order


#: The ``fold`` of a test image: it belongs to no fold.
NO_FOLD = -1


def assign_folds(split_table: pd.DataFrame, k: int, seed: int = 0) -> pd.DataFrame:
    """Return ``split_table`` with a ``fold`` column: ``0..k-1`` for train+val images, -1 for test.

    Patients are dealt whole (all their studies, of every body part, land in one fold), in the
    order of :func:`assign_split`, each to the fold whose (body part, label) study counts it
    brings closest to ``1/k`` of the totals (ties: the fold with fewer studies, then the lower
    index). Each train+val study is in exactly one fold; test images are in none.

    Args:
        split_table: an image table with ``split`` (train/val/test), ``study_id``, ``patient_id``,
            ``body_part`` and ``label``.
        k: number of folds (>= 2).
        seed: seeds the order patients are dealt in.

    Raises:
        ConfigError: ``k`` is not an integer >= 2, or exceeds the number of train+val patients.
    """
    check_int("--cv", k, 2)
    out = split_table.copy()
    pool = out[out["split"].isin(["train", "val"])]
    patients, matrix, order = _patient_strata(pool, seed)
    if len(patients) < k:
        raise ConfigError(
            f"--cv {k} needs at least {k} train+val patients, the split has {len(patients)}"
        )
    target = matrix.sum(axis=0) / k
    counts = np.zeros((k, matrix.shape[1]))
    fold_of = np.empty(len(patients), dtype=np.int64)
    for i in order:
        # How much closer to the target each fold's counts would get with this patient in it.
        gain = np.abs(counts - target).sum(1) - np.abs(counts + matrix[i] - target).sum(1)
        best = np.flatnonzero(gain >= gain.max() - 1e-9)
        f = best[np.argmin(counts[best].sum(1))]  # ties: the smaller fold, then the lower index
        counts[f] += matrix[i]
        fold_of[i] = f
    fold = pd.Series(fold_of, index=patients)
    in_pool = out["split"].isin(["train", "val"])
    out["fold"] = NO_FOLD
    out.loc[in_pool, "fold"] = out.loc[in_pool, "patient_id"].map(fold).to_numpy()
    out["fold"] = out["fold"].astype(np.int64)
    return out


def fold_split(folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The split one fold model trains on: its fold becomes ``val``, the other folds ``train``.

    ``val`` is the held-out fold: the fold model never selects anything on it (its predictions
    there are out-of-fold); test rows stay ``test``.

    Args:
        folds: a table from :func:`assign_folds`.
        fold: which fold is held out.
    """
    out = folds.copy()
    pool = out["fold"] != NO_FOLD
    out.loc[pool, "split"] = np.where(out.loc[pool, "fold"] == fold, "val", "train")
    return out


def own_split(table: pd.DataFrame) -> pd.DataFrame:
    """The table's own ``split`` column, used as written (``--val-fraction`` and ``--seed`` do not re-split it).

    Raises:
        DataError: a value other than train/val/test, no train or no val study, or a patient on
            both sides of train and val/test (the selection would see the patient's other studies).
    """
    split = table["split"].astype(str)
    bad = ~split.isin(SPLITS)
    if bad.any():
        raise DataError(
            f"the data's own split column must hold train, val or test, got {split[bad].iloc[0]!r}"
        )
    studies = table.assign(split=split).drop_duplicates("study_id")
    counts = studies["split"].value_counts()
    if not counts.get("train") or not counts.get("val"):
        raise DataError(
            "the data's own split column has no train or no val study "
            f"(train {counts.get('train', 0)}, val {counts.get('val', 0)}); drop the column to have mura-tune split it"
        )
    for side, others in (("train", ("val", "test")), ("val", ("test",))):
        patients = set(studies.loc[studies["split"] == side, "patient_id"])
        leaked = studies[studies["split"].isin(others) & studies["patient_id"].isin(patients)]
        if len(leaked):
            first = leaked.iloc[0]
            raise DataError(
                f"the data's own split column puts patient {first['patient_id']!r} in {side} and in "
                f"{first['split']} (study {first['study_id']}); splits must be patient-disjoint"
            )
    log.info(
        "using the data's own split column (studies: "
        + ", ".join(f"{k} {int(counts.get(k, 0))}" for k in SPLITS)
        + "); it is not re-split"
    )
    return table.assign(split=split)


def split_report(split_table: pd.DataFrame) -> dict:
    """Facts about a split: study counts, val fraction, per-part abnormal study rates, leaks."""
    studies = split_table.drop_duplicates("study_id")
    patients_per_split = studies.groupby("patient_id")["split"].nunique()
    rates = studies.pivot_table(index="body_part", columns="split", values="label", aggfunc="mean")
    n = studies["split"].value_counts()
    return {
        "studies": {k: int(v) for k, v in n.items()},
        "val_fraction_of_train_studies": float(
            n.get("val", 0) / max(n.get("val", 0) + n.get("train", 0), 1)
        ),
        "patients_in_several_splits": int((patients_per_split > 1).sum()),
        "abnormal_study_rate": {
            part: {k: float(v) for k, v in row.items()} for part, row in rates.iterrows()
        },
    }


def write_split(table: pd.DataFrame, out: str | Path) -> Path:
    """Write the split manifest atomically (Parquet)."""
    return write_parquet(out, table)


def load_split(path: str | Path) -> pd.DataFrame:
    """Read a split manifest written by :func:`write_split` (or ``mura-tune data split``).

    Raises:
        DataError: the file is missing, is not Parquet, or lacks the canonical or ``split`` columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split manifest not found: {path}")
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # pyarrow's errors are long; keep the first line
        raise DataError(f"cannot read split manifest {path}: {str(exc).splitlines()[0]}") from None
    if "split" not in table.columns:
        raise DataError(f"{path} has no 'split' column (write one with `mura-tune data split`)")
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"split manifest {path} lacks columns {missing}")
    bad = ~table["split"].isin(["train", "val", "test"])
    if bad.any():
        raise DataError(
            f"split manifest {path}: split must be train, val or test, got {table['split'][bad].iloc[0]!r}"
        )
    return table
