"""Score a predictions file against the dataset: study kappa, AUC, accuracy, sensitivity, specificity.

Three file shapes are accepted:

* the MURA submission CSV: no header, ``<study path>,<probability or 0/1>`` per line,
  e.g. ``MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/,0.83``;
* image-level Parquet/CSV with ``image_path`` and ``prob`` (averaged per study, the MURA rule);
* study-level Parquet/CSV with ``study_id`` and ``prob`` (e.g. an ensemble's ``predictions.parquet``).

A study is abnormal when its probability is above 0.5 (the MURA rule), or above its own
``threshold`` when a study-level file has that column (an ensemble's and ``predict``'s Parquet
files do), or above its body part's threshold in an ensemble's manifest (``--ensemble``: fitted
thresholds apply to a submission CSV as well).

:func:`mura_tune.metrics.score_studies` is the one scoring function: the ensemble report uses it
too, so evaluating an ensemble's test predictions reproduces its ``report.json`` exactly.

Example::

    table = read_dataset("path/to/MURA-v1.1").table
    print(format_table(evaluate_file(table, "submission.csv")))
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from mura_tune.errors import ConfigError, DataError
from mura_tune.metrics import METRIC_NAMES, THRESHOLD, format_ci, score_studies

ROOT_MARK = "MURA-v1.1/"
EVAL_SPLITS = ("val", "test")


def format_table(result: dict) -> str:
    """A table with one row per scope (overall, then each part) and one column per metric."""
    rows = {"overall": result["overall"], **result["parts"]}
    frame = pd.DataFrame(
        {
            scope: {"n": b["n"], **{m: format_ci(b[m], b[f"{m}_ci"]) for m in METRIC_NAMES}}
            for scope, b in rows.items()
        }
    ).T
    head = f"split={result.get('split', '?')}  studies={result['n_studies']}  95% bootstrap CIs over studies"
    if result.get("thresholds", "0.5") != "0.5":
        head += f"  (abnormal above {result['thresholds']})"
    return head + "\n" + frame.to_string()


def _mura_suffix(path: str) -> str | None:
    i = path.find(ROOT_MARK)
    return path[i:] if i >= 0 else None


def _read_submission(path: Path) -> pd.DataFrame:
    """``<study path>,<probability>`` lines (standard CSV quoting, an optional UTF-8 byte-order mark)."""
    rows, lines = [], []
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        fields = [f.strip() for f in next(csv.reader([raw]))]
        try:
            if len(fields) != 2 or not fields[0]:
                raise ValueError
            float(fields[1])  # a number; its range is checked with every other row's
        except ValueError:
            raise DataError(
                f"{path} line {lineno}: expected '<study path>,<probability>', got {raw!r}"
            ) from None
        rows.append((fields[0].rstrip("/"), fields[1]))
        lines.append(lineno)
    if not rows:
        raise DataError(f"predictions file is empty: {path}")
    frame = pd.DataFrame(rows, columns=["study_id", "prob"])
    return _checked(frame, path, "study_id", [f"line {n}" for n in lines])


def _read_frame(path: Path) -> tuple[pd.DataFrame, str]:
    """Read a predictions file, every row checked; returns the frame and its shape: submission|image|study."""
    if not path.is_file():
        raise DataError(f"predictions file not found: {path}")
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow errors are long; keep the first line
            raise DataError(f"cannot read predictions {path}: {str(exc).splitlines()[0]}") from exc
        rows = [f"row {i + 1}" for i in range(len(frame))]
    elif path.suffix in (".csv", ".txt"):
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            first = [f.strip() for f in next(csv.reader([fh.readline()]), [])]
        if "prob" not in first:
            return _read_submission(path), "submission"
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        except Exception as exc:  # pandas parser errors
            raise DataError(f"cannot read predictions {path}: {str(exc).splitlines()[0]}") from exc
        rows = [f"line {i + 2}" for i in range(len(frame))]  # line 1 is the header
    else:
        raise DataError(f"predictions file must be .csv or .parquet, got {path}")
    if "prob" not in frame.columns or not {"image_path", "study_id"} & set(frame.columns):
        raise DataError(
            f"predictions {path} needs columns image_path+prob or study_id+prob, got {list(frame.columns)}"
        )
    shape = "image" if "image_path" in frame.columns else "study"
    key = "image_path" if shape == "image" else "study_id"
    frame = frame.reset_index(drop=True)
    frame[key] = frame[key].astype(str)
    if shape == "study":
        frame["study_id"] = frame["study_id"].str.rstrip("/")
    return _checked(frame, path, key, rows), shape


def _checked(frame: pd.DataFrame, path: Path, key: str, rows: list[str]) -> pd.DataFrame:
    """Refuse, naming the row, a probability that is missing, not a number or outside [0, 1], and
    an image or study listed twice: every row is checked before anything is averaged."""
    prob = pd.to_numeric(frame["prob"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(prob) | (prob < 0) | (prob > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{path} {rows[i]} ({frame[key].iloc[i]}): prob must be in [0, 1], "
            f"got {frame['prob'].iloc[i]!r} ({int(bad.sum())} such row(s))"
        )
    keys = frame[key].to_numpy()
    dup = frame[key].duplicated().to_numpy()
    if dup.any():
        again = int(np.argmax(dup))
        first = int(np.argmax(keys == keys[again]))
        what = "image" if key == "image_path" else "study"
        raise DataError(
            f"{path} {rows[again]}: {what} listed twice ({rows[first]} too): {keys[again]}"
        )
    return frame.assign(prob=prob)


def load_predictions(
    path: str | Path, table: pd.DataFrame | None = None, split: str | None = None
) -> pd.DataFrame:
    """Read any accepted predictions file as study-level probabilities.

    Args:
        path: submission CSV, image-level or study-level Parquet/CSV.
        table: the image table, used to map image paths to studies (without it, image paths
            must contain ``MURA-v1.1/`` and the study is the image's folder).
        split: keep only rows of this split when the file has a ``split`` column.

    Returns:
        One row per study: ``study_id`` (no trailing slash), ``prob``; ``attrs["format"]``
        names the file shape.

    Raises:
        DataError: if the file is missing, malformed, lists a study twice, has probabilities
            outside [0, 1], or names images that cannot be matched.
    """
    path = Path(path).expanduser()
    frame, shape = _read_frame(path)
    if split is not None and "split" in frame.columns:
        frame = frame[frame["split"] == split]
    if shape == "image":
        frame = _images_to_studies(frame, table, path)
    out = pd.DataFrame(
        {"study_id": frame["study_id"].to_numpy(), "prob": frame["prob"].to_numpy(dtype=np.float64)}
    )
    if "threshold" in frame:
        out["threshold"] = pd.to_numeric(frame["threshold"], errors="coerce").to_numpy()
        if not out["threshold"].between(0, 1).all():
            raise DataError(f"thresholds in {path} must be in [0, 1]")
    out.attrs["format"] = shape
    return out.sort_values("study_id", kind="stable").reset_index(drop=True)


def _images_to_studies(frame: pd.DataFrame, table: pd.DataFrame | None, path: Path) -> pd.DataFrame:
    images = frame["image_path"].astype(str)
    if table is not None:
        exact = dict(zip(table["image_path"].astype(str), table["study_id"].astype(str)))
        suffix = {_mura_suffix(p): s for p, s in exact.items() if _mura_suffix(p)}
        study = [exact.get(p) or suffix.get(_mura_suffix(p) or "") for p in images]
    else:
        study = [(_mura_suffix(p) or "").rpartition("/")[0] or None for p in images]
    unmatched = [p for p, s in zip(images, study) if s is None]
    if unmatched:
        raise DataError(
            f"{len(unmatched)} images in {path} match no image of the dataset (first: {unmatched[0]})"
        )
    frame = frame.assign(study_id=study, prob=pd.to_numeric(frame["prob"], errors="coerce"))
    return frame.groupby("study_id", sort=True)["prob"].mean().reset_index()


def split_studies(table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The studies of one split of the image table: ``study_id``, ``body_part``, ``label``, sorted.

    Args:
        table: canonical image table; with a ``split`` column (train/val/test) it decides, else
            test is ``source_split == "valid"``.
        split: ``"test"`` or ``"val"``.

    Raises:
        ConfigError: unknown split, or ``"val"`` without a ``split`` column.
        DataError: the table lacks columns or the split is empty.
    """
    if split not in EVAL_SPLITS:
        raise ConfigError(f"split must be one of {list(EVAL_SPLITS)}, got {split!r}")
    need = {"study_id", "body_part", "label"} | (
        {"split"} if "split" in table.columns else {"source_split"}
    )
    missing = sorted(need - set(table.columns))
    if missing:
        raise DataError(f"image table lacks columns {missing}")
    if "split" in table.columns:
        rows = table[table["split"] == split]
    elif split == "test":
        rows = table[table["source_split"] == "valid"]
    else:
        raise ConfigError(
            "split='val' needs a table with a split column: pass the experiment's split.parquet as --data"
        )
    if rows.empty:
        raise DataError(f"the dataset has no {split} studies")
    studies = rows.groupby("study_id", sort=True).agg(
        body_part=("body_part", "first"), label=("label", "first")
    )
    return studies.reset_index()


def evaluate_file(
    table: pd.DataFrame,
    predictions: str | Path,
    split: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    thresholds: dict[str, float] | None = None,
) -> dict:
    """Score a predictions file on one split of the dataset, per study.

    Args:
        table: canonical image table (``image_path``, ``study_id``, ``patient_id``, ``body_part``,
            ``label``, ``source_split`` and optionally ``split``).
        predictions: path of a submission CSV, image-level or study-level predictions.
        split: ``"test"`` (default) or ``"val"``.
        n_boot: bootstrap resamples for the 95% intervals.
        seed: bootstrap seed.
        thresholds: body part -> decision threshold (an ensemble manifest's ``thresholds``);
            default: the file's ``threshold`` column if it has one, else 0.5.

    Returns:
        ``{"predictions", "format", "split", "thresholds", "n_boot", "seed"}`` plus
        :func:`score_studies`' result.

    Raises:
        DataError: predictions for studies outside the split, studies of the split without a
            prediction, malformed file or probabilities outside [0, 1].
        ConfigError: bad split, or ``split="val"`` on a table without a split column.
    """
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    truth = split_studies(table, split)
    preds = load_predictions(predictions, table=table, split=split)
    shape = preds.attrs.get("format")
    known = set(truth["study_id"])
    by_suffix = {_mura_suffix(s): s for s in known if _mura_suffix(s)}
    ids = [s if s in known else by_suffix.get(_mura_suffix(s) or "", s) for s in preds["study_id"]]
    preds = preds.assign(study_id=ids)
    unknown = preds.loc[~preds["study_id"].isin(known), "study_id"]
    if len(unknown):
        raise DataError(
            f"{len(unknown)} predicted studies are not in the {split} split of the dataset "
            f"(first: {unknown.iloc[0]}) in {predictions}"
        )
    if preds["study_id"].duplicated().any():
        raise DataError(
            f"study predicted twice in {predictions}: {preds['study_id'][preds['study_id'].duplicated()].iloc[0]}"
        )
    merged = truth.merge(preds, on="study_id", how="left")
    missing = merged.loc[merged["prob"].isna(), "study_id"]
    if len(missing):
        raise DataError(
            f"{len(missing)} of {len(truth)} {split} studies have no prediction in {predictions} "
            f"(first: {missing.iloc[0]}); every study must be predicted"
        )
    if thresholds is not None:
        threshold = merged["body_part"].map(lambda p: thresholds.get(p, THRESHOLD)).to_numpy()
        rule = "the ensemble manifest's per-part thresholds"
    elif "threshold" in merged:
        threshold, rule = merged["threshold"].to_numpy(), "the file's threshold column"
    else:
        threshold, rule = THRESHOLD, "0.5"
    scores = score_studies(
        merged["label"], merged["prob"], merged["body_part"], n_boot=n_boot, seed=seed,
        threshold=np.asarray(threshold, dtype=np.float64),
    )  # fmt: skip
    head = {"predictions": str(predictions), "format": shape, "split": split, "thresholds": rule}
    return {**head, "n_boot": n_boot, "seed": seed, **scores}
