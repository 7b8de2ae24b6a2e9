"""Read a dataset into one canonical image table.

Two inputs are accepted:

* the official ``MURA-v1.1`` release (the folder itself or its parent), parsed with one
  anchored path pattern and checked against ``*_labeled_studies.csv``;
* a manifest (``.csv`` or ``.parquet``) with the columns of :data:`TABLE_COLUMNS`, image
  paths relative to the manifest's folder, for any other X-ray dataset.

The table has one row per image: ``image_path`` (absolute), ``study_id`` (the study folder
relative to the dataset root, MURA style, no trailing slash), ``patient_id``, ``body_part``,
``label`` (0 normal / 1 abnormal, the study's label) and ``source_split`` (``train``/``valid``).
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mura_tune.constants import BODY_PARTS, MURA_ROOT, SOURCE_SPLITS, SPLITS, TABLE_COLUMNS
from mura_tune.data.embedded import ensure_embedded
from mura_tune.errors import DataError

log = logging.getLogger(__name__)

ROOT_NAME = MURA_ROOT

PATH_PATTERN = re.compile(
    r"^MURA-v1\.1/(?P<split>train|valid)/(?P<part>XR_(?:"
    + "|".join(p[3:] for p in BODY_PARTS)
    + r"))"
    r"/(?P<patient>patient\d+)/(?P<study>study\d+)_(?P<outcome>positive|negative)/image\d+\.png$"
)
STUDY_PATTERN = re.compile(
    r"^MURA-v1\.1/(?P<split>train|valid)/XR_[A-Z]+/patient\d+/study\d+_(?P<outcome>positive|negative)/?$"
)
PATTERN_TEXT = (
    "MURA-v1.1/<split>/XR_<PART>/patient<digits>/study<k>_<positive|negative>/image<j>.png"
)


@dataclass
class Problem:
    """One problem found in the dataset: what kind, which file, and where it was listed."""

    kind: str  # bad_path | label_mismatch | unlabeled_study | study_without_images | duplicate | missing | unreadable (| converted: a note)
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


@dataclass
class Dataset:
    """The canonical image table plus where it came from and what was wrong with it."""

    table: pd.DataFrame
    root: Path
    source: str  # "mura" | "manifest"
    problems: list[Problem] = field(default_factory=list)


def locate_root(data: str | Path) -> Path:
    """Return the folder that *contains* ``MURA-v1.1`` for ``data`` (the release or its parent)."""
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data folder not found: {path}")
    if not path.is_dir():
        raise DataError(f"not a folder or a .csv/.parquet manifest: {path}")
    if path.name == ROOT_NAME:
        return path.parent.resolve()
    if (path / ROOT_NAME).is_dir():
        return path.resolve()
    raise DataError(
        f"no {ROOT_NAME} release in {path}: expected {path}/{ROOT_NAME}/train_image_paths.csv "
        "(pass the MURA-v1.1 folder or its parent, or a .csv/.parquet manifest)"
    )


def _read_rows(csv_path: Path) -> list[tuple[int, list[str], str]]:
    """Non-empty rows of an index CSV: (1-based line number, fields, the line as written).

    Standard CSV quoting (``"MURA-v1.1/.../study1_positive/",1``) and a UTF-8 byte-order mark
    are accepted; a header row is dropped.
    """
    try:
        text = csv_path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        raise DataError(
            f"cannot read index file {csv_path}: {exc.strerror or type(exc).__name__}"
        ) from None
    rows = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        fields = [f.strip() for f in next(csv.reader([raw]))]
        while len(fields) > 1 and not fields[-1]:  # a trailing comma
            fields.pop()
        joined = ",".join(fields)
        if number == 1 and not joined.startswith(ROOT_NAME) and re.search(r"[A-Za-z]", joined):
            # A header row ("path" / "Path,Label" ...): both variants circulate.
            if not re.search(r"\.png|/", joined):
                continue
        rows.append((number, fields, raw.strip()))
    return rows


def read_mura(data: str | Path, strict: bool = True) -> Dataset:
    """Read the official MURA-v1.1 release into the canonical table.

    Args:
        data: the ``MURA-v1.1`` folder or its parent.
        strict: raise :class:`DataError` on the first malformed line or contradicting
            label; otherwise record it in ``Dataset.problems`` and skip the row.

    Returns:
        The dataset; image files are not opened here (see :mod:`mura_tune.data.check`).

    Raises:
        DataError: the folder or its CSVs are missing, or (strict) a line is malformed.
    """
    root = locate_root(data)
    index_dir = root / ROOT_NAME
    problems: list[Problem] = []

    def problem(kind: str, where: str, detail: str) -> None:
        if strict:
            raise DataError(f"{where}: {detail}")
        problems.append(Problem(kind, where, detail))

    rows = []
    dropped: list[Problem] = []  # listed, well-formed, but left out: reported, never silent
    found_any = False
    for split in SOURCE_SPLITS:
        images_csv = index_dir / f"{split}_image_paths.csv"
        studies_csv = index_dir / f"{split}_labeled_studies.csv"
        if not images_csv.exists() and not studies_csv.exists():
            continue
        for index_csv in (images_csv, studies_csv):
            if not index_csv.exists():
                raise DataError(
                    f"missing index file {index_csv} (the release has both *_image_paths.csv and *_labeled_studies.csv)"
                )
        found_any = True
        study_labels: dict[str, int] = {}
        study_lines: dict[str, str] = {}
        for number, fields, line in _read_rows(studies_csv):
            where = f"{studies_csv}:{number}"
            study, label_text = fields if len(fields) == 2 else ("", "")
            match = STUDY_PATTERN.match(study)
            if not match or label_text not in ("0", "1"):
                problem(
                    "bad_path",
                    where,
                    f"line does not match '<study dir>/,<0|1>' under {PATTERN_TEXT}: {line!r}",
                )
                continue
            if match["split"] != split:
                problem(
                    "bad_path",
                    where,
                    f"study of split {match['split']!r} listed in the {split} file: {study}",
                )
                continue
            label = int(label_text)
            if label != (match["outcome"] == "positive"):
                problem(
                    "label_mismatch",
                    where,
                    f"label {label} contradicts '{match['outcome']}' in the path {study}",
                )
                continue
            study_id = study.strip().rstrip("/")
            if study_id in study_labels:
                problem("duplicate", where, f"study listed twice: {study}")
                continue
            study_labels[study_id] = label
            study_lines[study_id] = where

        seen: set[str] = set()
        for number, fields, line in _read_rows(images_csv):
            where = f"{images_csv}:{number}"
            line = fields[0] if len(fields) == 1 else line
            match = PATH_PATTERN.match(line)
            if not match:
                problem("bad_path", where, f"path does not match {PATTERN_TEXT}: {line!r}")
                continue
            if match["split"] != split:
                problem(
                    "bad_path",
                    where,
                    f"image of split {match['split']!r} listed in the {split} file: {line}",
                )
                continue
            if line in seen:
                problem("duplicate", where, f"image listed twice: {line}")
                continue
            seen.add(line)
            study_id = line.rsplit("/", 1)[0]
            label = study_labels.get(study_id)
            if label is None:
                problem("unlabeled_study", where, f"study not in {studies_csv.name}: {study_id}")
                continue
            rows.append((str(root / line), study_id, match["patient"], match["part"], label, split))
        imaged = {row[1] for row in rows}
        dropped.extend(
            Problem(
                "study_without_images",
                where,
                f"labeled study has no image in {images_csv.name}: {study}",
            )
            for study, where in study_lines.items()
            if study not in imaged
        )
    if not found_any:
        raise DataError(
            f"no index CSVs in {index_dir} (expected train_image_paths.csv, train_labeled_studies.csv, ...)"
        )
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    table["label"] = table["label"].astype("int8")
    if table.empty:
        raise DataError(f"no usable images listed in {index_dir}")
    report_dropped(dropped, "labeled stud(ies) without images left out", root)
    return Dataset(table=table, root=root, source="mura", problems=problems + dropped)


def report_dropped(dropped: list[Problem], what: str, data: Path) -> None:
    """One warning for listed items that are left out: how many, the first with its reason, where all are listed."""
    if not dropped:
        return
    more = (
        f"; `mura-tune data summary --data {data}` lists all {len(dropped)}"
        if len(dropped) > 1
        else ""
    )
    log.warning(f"{len(dropped)} {what}: {dropped[0].path}: {dropped[0].detail}{more}")


def read_manifest(path: str | Path) -> Dataset:
    """Read a user manifest (.csv or .parquet) with the canonical columns.

    ``image_path`` may be relative (to the manifest's folder) or absolute. Values are read as
    written: identifiers and paths are strings (``001`` and ``1`` are two studies), a CSV may be
    quoted and start with a UTF-8 byte-order mark. ``label`` must be 0/1 and constant within a
    study; ``source_split`` must be ``train`` or ``valid``. An optional ``split`` column
    (train/val/test) is the manifest's own split: it is used as is, never re-split.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"manifest not found: {path}")
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as exc:  # pyarrow / pandas parser errors
        raise DataError(f"cannot read manifest {path}: {exc}".splitlines()[0]) from exc
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"manifest {path} lacks columns {missing} (needs {list(TABLE_COLUMNS)})")
    has_split = "split" in table.columns  # an experiment's split.parquet is a manifest too
    columns = list(TABLE_COLUMNS) + (["split"] if has_split else [])
    table = table[columns].reset_index(drop=True)
    empty = table.isna() | table.astype(str).apply(lambda col: col.str.strip() == "")
    if empty.any().any():
        row = int(empty.any(axis=1).to_numpy().nonzero()[0][0])
        column = columns[int(empty.iloc[row].to_numpy().nonzero()[0][0])]
        raise DataError(f"manifest {path} row {row + 2}: empty {column}")

    def refuse(bad: pd.Series, rule: str, column: str) -> None:
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(
                f"manifest {path} row {row + 2}: {column} must be {rule}, got {table[column].iloc[row]!r}"
            )

    refuse(~table["source_split"].isin(SOURCE_SPLITS), "train or valid", "source_split")
    label = pd.to_numeric(table["label"], errors="coerce")
    refuse(~label.isin([0, 1]), "0 or 1", "label")
    if has_split:
        refuse(~table["split"].isin(SPLITS), "train, val or test", "split")
    for col in ("image_path", "study_id", "patient_id", "body_part"):
        table[col] = table[col].astype(str)
    table["label"] = label.astype("int8")
    per_study = table.groupby("study_id")["label"].nunique()
    if (per_study > 1).any():
        raise DataError(
            f"manifest {path}: study {per_study[per_study > 1].index[0]!r} has images with different labels"
        )
    dup = table["image_path"].duplicated()
    if dup.any():
        raise DataError(f"manifest {path}: image listed twice: {table['image_path'][dup].iloc[0]}")
    base = path.parent.resolve()
    table["image_path"] = [
        str(p if Path(p).is_absolute() else base / p) for p in table["image_path"]
    ]
    return Dataset(table=table, root=base, source="manifest")


def read_dataset(data: str | Path | None, strict: bool = True) -> Dataset:
    """Read ``--data``: a MURA folder, a manifest file, or (None) the embedded synthetic set."""
    if data is None:
        data = ensure_embedded()
    path = Path(data).expanduser()
    if path.suffix in (".csv", ".parquet") and not path.is_dir():
        return read_manifest(path)
    return read_mura(path, strict=strict)
