"""Predict the studies of new data with a built ensemble (``ensembles/<name>/manifest.json``).

    mura-tune predict --ensemble ensembles/demo --data path/to/MURA-v1.1 --out predictions.csv

``--data`` is a MURA-layout folder (every listed image, both source splits), a ``.csv``/``.parquet``
manifest (see :func:`mura_tune.data.mura.read_dataset`), or a plain folder of study folders
(``DIR/<study>/*.png``, nested or not: a study is a folder that directly holds PNGs; its body
part is the nearest ``XR_<PART>`` folder above it, else ``unknown``).

Each image is decoded once and letterboxed once per input size the members need (exactly
:func:`mura_tune.data.images.preprocess`, as in training); every member checkpoint loads with
``weights_only=True``. A member's study probability is the mean of its image probabilities
(:func:`mura_tune.metrics.study_table`), and a study's probability is the weighted mean of the
members of the ensemble that serves its body part (the routing in the manifest; parts without
a routed ensemble, and ``unknown``, use the generalist ensemble). A member of a cross-validated
ensemble is its K fold models (the manifest's ``folds``): its probability is their mean. This
reproduces the ensemble's own ``predictions.parquet`` on the experiment's test studies (and on its
val studies, for an ensemble selected on val). A study is abnormal when its probability is above
its body part's threshold in the manifest (0.5 unless ``--threshold fit`` fitted one).

Outputs: ``OUT`` (MURA submission format, ``<study path>/,<probability>``, no header),
``OUT.parquet`` (``study_id, body_part, label, prob, n_images, served_by, threshold, abnormal``),
``OUT.images.parquet`` (image probabilities: the ensemble's, and ``prob_<trial_id>`` per member, nan
where the member does not serve the image's part) and, only when some image
could not be read, ``OUT.skipped.csv`` (``image_path, reason``).
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mura_tune.constants import MURA_ROOT
from mura_tune.data.images import ImageReadError, letterbox, load_gray
from mura_tune.data.mura import read_dataset
from mura_tune.errors import ConfigError, DataError, ExperimentError
from mura_tune.io import write_parquet, write_text
from mura_tune.layout import GENERALIST_ENSEMBLE, SERVED_BY_PART, EnsembleDir, read_manifest
from mura_tune.metrics import THRESHOLD, study_table

if TYPE_CHECKING:  # torch is imported where a model runs: a bad flag or folder fails in a second
    import torch

    from mura_tune.train.engine import Engine

log = logging.getLogger(__name__)

UNKNOWN_PART = "unknown"
ROOT_NAME = MURA_ROOT
PART_DIR = re.compile(r"^XR_[A-Z]+$")
BATCH_SIZE = 64


@dataclass
class Member:
    """One checkpoint of the ensemble: its model and which routes (ensembles) use it."""

    trial_id: str
    checkpoint: Path
    net: torch.nn.Module
    image_size: int
    tta_flip: bool
    routes: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------------- manifest
def ensemble_routes(manifest: dict) -> dict[str, list[tuple[str, str, float]]]:
    """The ensembles in use: ``{GENERALIST_ENSEMBLE | part: [(trial_id, checkpoint_path, weight)]}``.

    A part appears only if the manifest's routing serves it with its own ensemble. A member made
    of K fold models (``folds``) becomes its K checkpoints, each with 1/K of its weight: the
    weighted mean of study probabilities is linear, so this is the mean of the fold models.
    """
    ensembles, routing = manifest["ensembles"], manifest.get("routing", {})
    routes = {}
    for key, ens in ensembles.items():
        served = routing.get(key, {}).get("served_by") == SERVED_BY_PART
        if key == GENERALIST_ENSEMBLE or (served and ens.get("used", True)):
            routes[key] = [
                (str(f["trial_id"]), str(f["checkpoint_path"]), float(m["weight"]) / len(folds))
                for m in ens["members"]
                for folds in [m.get("folds") or [m]]
                for f in folds
            ]
    return routes


def study_thresholds(manifest: dict, body_parts: pd.Series) -> np.ndarray:
    """Each study's decision threshold: its body part's in the manifest, else 0.5."""
    thresholds = manifest.get("thresholds") or {}
    return np.array([float(thresholds.get(p, THRESHOLD)) for p in body_parts], dtype=np.float64)


def _checkpoint_path(raw: str, trial_id: str, manifest: dict, where: Path) -> Path:
    if raw in ("", "None", "nan"):
        raise ExperimentError(f"ensemble member {trial_id} has no checkpoint in {where}")
    path = Path(raw).expanduser()
    if not path.is_absolute() and manifest.get("experiment"):
        path = Path(manifest["experiment"]) / path
    if not path.is_file():
        raise ExperimentError(f"checkpoint of ensemble member {trial_id} not found: {path}")
    return path


def load_members(
    routes: dict[str, list[tuple[str, str, float]]],
    manifest: dict,
    where: Path,
    engine: Engine,
) -> tuple[dict[Path, Member], dict[str, list[tuple[Path, float]]]]:
    """Load every checkpoint the routes use, once each (``weights_only=True``).

    Returns:
        The members by checkpoint path, and the routes as ``[(checkpoint path, weight)]``.
    """
    from mura_tune.train.checkpoint import load_checkpoint

    members: dict[Path, Member] = {}
    keyed: dict[str, list[tuple[Path, float]]] = {}
    for key, entries in routes.items():
        keyed[key] = []
        for trial_id, raw, weight in entries:
            path = _checkpoint_path(raw, trial_id, manifest, where)
            if path not in members:
                net, config = load_checkpoint(path)
                members[path] = Member(
                    trial_id, path, engine.model(net).eval(), config.image_size, config.tta_flip
                )
            members[path].routes.add(key)
            keyed[key].append((path, weight))
    return members, keyed


# ------------------------------------------------------------------------------------- data
def read_images(data: str | Path) -> tuple[pd.DataFrame, Path, list[tuple[str, str]]]:
    """The images to predict: ``image_path, study_id, body_part, label`` (label may be missing).

    Args:
        data: MURA folder (or its parent), ``.csv``/``.parquet`` manifest, or a folder of
            study folders.

    Returns:
        The image table, the data root, and the files of a study folder that are left out
        (``(path, reason)``: not a PNG).

    Raises:
        DataError: the path does not exist or holds no images.
    """
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"--data not found: {path}")
    left_out: list[tuple[str, str]] = []
    if path.is_file():
        if path.suffix not in (".csv", ".parquet"):
            raise DataError(f"--data must be a folder or a .csv/.parquet manifest, got {path}")
        dataset = read_dataset(path)
        table, root = dataset.table, dataset.root
    elif path.name == ROOT_NAME or (path / ROOT_NAME).is_dir():
        dataset = read_dataset(path, strict=False)
        for problem in dataset.problems[:5]:
            log.info("  skipped index line: %s", problem)
        if len(dataset.problems) > 5:
            log.info("  ... %d more index problems", len(dataset.problems) - 5)
        table, root = dataset.table, dataset.root
    else:
        (table, left_out), root = scan_study_folders(path), path.resolve()
    table = table[["image_path", "study_id", "body_part"]].assign(
        label=pd.array(
            table["label"] if "label" in table.columns else [pd.NA] * len(table), dtype="Int8"
        )
    )
    if table.empty:
        raise DataError(f"no images found in {path}")
    return table.reset_index(drop=True), root, left_out


def scan_study_folders(root: Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Index a plain folder of study folders (any depth): one row per PNG, no labels.

    ``study_id`` is the study folder relative to ``root`` (or from ``MURA-v1.1/`` on if the path
    has that component); ``body_part`` is the nearest ``XR_<PART>`` folder name, else ``unknown``.

    Returns:
        The image table, and every other file found (``(path, reason)``; hidden files aside):
        they are left out, and reported.
    """
    root = root.resolve()
    found = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = [p for p in found if p.suffix.lower() == ".png"]
    left_out = [
        (str(p), f"not a PNG ({p.suffix or 'no extension'}): only PNG radiographs are read")
        for p in found
        if p.suffix.lower() != ".png"
    ]
    if not files:
        raise DataError(f"no images found in {root} (expected <study folder>/*.png)")
    rows = []
    for image in files:
        study = image.parent
        parts = study.parts
        if ROOT_NAME in parts:
            study_id = "/".join(parts[len(parts) - 1 - parts[::-1].index(ROOT_NAME) :])
        else:
            rel = study.relative_to(root).as_posix()
            study_id = root.name if rel == "." else rel
        part = next((p for p in reversed(parts) if PART_DIR.match(p)), UNKNOWN_PART)
        rows.append((str(image), study_id, part))
    return pd.DataFrame(rows, columns=["image_path", "study_id", "body_part"]), left_out


# ------------------------------------------------------------------------------- inference
def _route_of(parts: pd.Series, routes: dict) -> np.ndarray:
    return np.array(
        [p if p in routes and p != GENERALIST_ENSEMBLE else GENERALIST_ENSEMBLE for p in parts]
    )


def image_probabilities(
    table: pd.DataFrame,
    members: dict[Path, Member],
    route: np.ndarray,
    engine: Engine,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
) -> tuple[dict[Path, np.ndarray], list[tuple[str, str]]]:
    """Each member's probability for the images it serves (nan elsewhere) and the unreadable images.

    Images are decoded once, letterboxed once per member input size, and run in batches through
    ``engine`` (the training core: the same input preparation, AMP and layout on CUDA).
    """
    import torch

    with torch.inference_mode():
        return _image_probabilities(table, members, route, engine, batch_size, progress)


def _image_probabilities(table, members, route, engine, batch_size, progress):
    import torch

    n = len(table)
    probs = {path: np.full(n, np.nan, dtype=np.float32) for path in members}
    by_size: dict[int, list[Member]] = {}
    for m in members.values():
        by_size.setdefault(m.image_size, []).append(m)
    skipped: list[tuple[str, str]] = []
    paths = table["image_path"].tolist()
    bar = tqdm(
        total=n,
        desc="predicting",
        unit="img",
        file=sys.stderr,
        disable=not progress or not sys.stderr.isatty(),
    )
    for start in range(0, n, batch_size):
        idx, grays = [], []
        for i in range(start, min(start + batch_size, n)):
            try:
                grays.append(load_gray(paths[i]))
                idx.append(i)
            except ImageReadError as exc:
                skipped.append((paths[i], str(exc)))
        bar.update(min(batch_size, n - start))
        if not idx:
            continue
        idx_arr = np.asarray(idx)
        for size, group in by_size.items():
            x = engine.inputs(torch.from_numpy(np.stack([letterbox(g, size) for g in grays])))
            for m in group:
                use = np.isin(route[idx_arr], list(m.routes))
                if not use.any():
                    continue
                logits = engine.logits(
                    m.net, x[engine.to_device(torch.from_numpy(use))], m.tta_flip
                )
                probs[m.checkpoint][idx_arr[use]] = torch.sigmoid(logits).cpu().numpy()
    bar.close()
    return probs, skipped


def combine(
    table: pd.DataFrame,
    route: np.ndarray,
    routes: dict[str, list[tuple[Path, float]]],
    probs: dict[Path, np.ndarray],
) -> tuple[pd.DataFrame, np.ndarray]:
    """Study probabilities: per member the mean over the study's images, then the weighted mean.

    Args:
        table: readable images (``study_id``, ``body_part``, ``label``).
        route: ``(n_images,)`` the ensemble serving each image.
        routes: ensemble key -> ``[(checkpoint path, weight)]``.
        probs: checkpoint path -> ``(n_images,)`` image probabilities.

    Returns:
        The study table (sorted by ``study_id``) and the ensemble's image probabilities.
    """
    studies, image_prob = [], np.zeros(len(table))
    base = table[["study_id", "body_part"]].assign(label=np.int8(0))
    for key, entries in routes.items():
        rows = route == key
        if not rows.any():
            continue
        per_member = [
            study_table(base[rows].assign(prob=probs[ckpt][rows].astype(np.float64)))
            for ckpt, _ in entries
        ]
        prob = sum(w * t["prob"].to_numpy() for (_, w), t in zip(entries, per_member))
        image_prob[rows] = sum(w * probs[ckpt][rows].astype(np.float64) for ckpt, w in entries)
        first = per_member[0][["study_id", "body_part", "n_images"]]
        studies.append(first.assign(prob=prob, served_by=key))
    out = pd.concat(studies, ignore_index=True).sort_values("study_id", kind="stable")
    labels = table.groupby("study_id", sort=False)["label"].first()
    out["label"] = pd.array(labels.reindex(out["study_id"]).to_numpy(), dtype="Int8")
    columns = ["study_id", "body_part", "label", "prob", "n_images", "served_by"]
    return out[columns].reset_index(drop=True), image_prob


# ------------------------------------------------------------------------------------- main
def predict_with_ensemble(
    ensemble_dir: str | Path,
    data: str | Path,
    out: str | Path,
    batch_size: int = BATCH_SIZE,
    device: str = "auto",
    progress: bool = True,
) -> list[Path]:
    """Predict every study of ``data`` with the ensemble in ``ensemble_dir``.

    Args:
        ensemble_dir: ``ensembles/<name>`` (with ``manifest.json``).
        data: MURA folder, ``.csv``/``.parquet`` manifest, or a folder of study folders.
        out: the submission CSV to write; the Parquet files go beside it.
        batch_size: images decoded and run per batch.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        progress: show a progress bar on stderr.

    Returns:
        The files written: the CSV, the study Parquet, the image Parquet (and the skipped list).

    Raises:
        ExperimentError: no manifest, or a member's checkpoint is missing.
        DataError: no images found, none readable, or a checkpoint cannot be loaded.
        ConfigError: ``out`` is a ``.parquet`` path or ``batch_size`` < 1.
    """
    out = Path(out).expanduser()
    if out.suffix == ".parquet":
        raise ConfigError(
            f"--out is the submission CSV (a .parquet is written beside it), got {out}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    manifest = read_manifest(ensemble_dir)
    manifest_path = EnsembleDir(Path(ensemble_dir).expanduser()).manifest
    from mura_tune.train.engine import Engine

    engine = Engine(device)
    routes = ensemble_routes(manifest)
    members, keyed = load_members(routes, manifest, manifest_path, engine)
    table, root, left_out = read_images(data)
    route = _route_of(table["body_part"], routes)
    sizes = sorted({m.image_size for m in members.values()})
    served = ", ".join(f"{k}: {len(v)} model(s)" for k, v in routes.items())
    log.info(
        f"ensemble {manifest.get('name', Path(ensemble_dir).name)}: {len(members)} checkpoint(s) "
        f"at {sizes} px on {engine.device}; {served}"
    )
    log.info(f"predicting {len(table)} images in {table['study_id'].nunique()} studies from {data}")

    probs, skipped = image_probabilities(table, members, route, engine, batch_size, progress)
    skipped = left_out + skipped
    ok = ~table["image_path"].isin({p for p, _ in skipped}).to_numpy()
    if not ok.any():
        raise DataError(
            f"none of the {len(table)} images in {data} could be read (first: {skipped[0][0]}: {skipped[0][1]})"
        )
    readable = table[ok].reset_index(drop=True)
    probs = {k: v[ok] for k, v in probs.items()}
    studies, image_prob = combine(readable, route[ok], keyed, probs)
    threshold = study_thresholds(manifest, studies["body_part"])
    studies["threshold"] = threshold
    studies["abnormal"] = studies["prob"].to_numpy() > threshold

    lost = sorted(set(table["study_id"]) - set(studies["study_id"]))
    csv = "".join(f"{s}/,{float(p)!r}\n" for s, p in zip(studies["study_id"], studies["prob"]))
    images = readable[["image_path", "study_id", "body_part"]].assign(
        prob=image_prob,
        served_by=route[ok],
        **{f"prob_{m.trial_id}": probs[k] for k, m in members.items()},
    )
    stem = out.with_suffix("")
    written = [
        write_text(out, csv),
        write_parquet(out.with_suffix(".parquet"), studies),
        write_parquet(Path(f"{stem}.images.parquet"), images),
    ]
    side = Path(f"{stem}.skipped.csv")
    if skipped:
        text = pd.DataFrame(skipped, columns=["image_path", "reason"]).to_csv(index=False)
        written.append(write_text(side, text))
        log.info(
            f"skipped {len(skipped)} unreadable image(s) (listed in {side}); first: {skipped[0][0]}: {skipped[0][1]}"
        )
    elif side.exists():
        side.unlink()  # a list from an earlier run would be wrong now
    if lost:
        log.info(f"{len(lost)} studies have no readable image and no prediction (first: {lost[0]})")
    log.info(f"predicted {len(studies)} studies ({len(readable)} images) relative to {root}")
    return written
