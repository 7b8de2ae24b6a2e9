"""`mura-tune data summary`: counts per split and body part, and every problem found.

Problems (the image cannot be used: missing, empty, truncated, not a PNG, too many pixels; or
the index is malformed) are listed by path with the reason. Notes are images that are usable
but were converted from an unusual mode (16-bit, alpha channel, palette): training uses them as
converted, and the summary lists them so that a conversion is never silent.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pandas as pd
from tqdm.auto import tqdm

from mura_tune.data.images import inspect_image
from mura_tune.data.mura import Dataset, Problem

SHOW_PROBLEMS = 50


def check_images(
    paths: list[str], workers: int | None = None, progress: bool = True
) -> tuple[dict[str, str], dict[str, str]]:
    """Decode every image in parallel.

    Returns:
        ``({path: reason}`` of the unusable images, ``{path: note}`` of the converted ones``)``.
    """
    workers = workers or os.cpu_count() or 1
    bad: dict[str, str] = {}
    notes: dict[str, str] = {}
    chunk = max(1, min(256, len(paths) // (workers * 8) or 1))
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(inspect_image, paths, chunksize=chunk)
        bar = tqdm(
            zip(paths, results),
            total=len(paths),
            desc="checking images",
            unit="img",
            file=sys.stderr,
            disable=not progress or not sys.stderr.isatty(),
        )
        for path, (reason, note) in bar:
            if reason is not None:
                bad[path] = reason
            elif note is not None:
                notes[path] = note
    return bad, notes


def summarize(dataset: Dataset, check: bool = True, progress: bool = True) -> dict:
    """Counts per source split and body part, patients across parts/splits, and problems.

    Args:
        dataset: from :func:`mura_tune.data.mura.read_dataset` (``strict=False`` to collect problems).
        check: decode every image to find missing, unreadable or truncated files.
    """
    table = dataset.table
    problems = list(dataset.problems)
    notes: list[Problem] = []
    if check and len(table):
        bad, converted = check_images(table["image_path"].tolist(), progress=progress)
        for path, reason in bad.items():
            problems.append(
                Problem("missing" if reason == "file not found" else "unreadable", path, reason)
            )
        notes = [Problem("converted", path, note) for path, note in converted.items()]

    groups = []
    for (split, part), grp in table.groupby(["source_split", "body_part"], sort=True):
        studies = grp.drop_duplicates("study_id")
        groups.append(
            {
                "source_split": split,
                "body_part": part,
                "images": len(grp),
                "images_normal": int((grp["label"] == 0).sum()),
                "images_abnormal": int((grp["label"] == 1).sum()),
                "studies": len(studies),
                "studies_normal": int((studies["label"] == 0).sum()),
                "studies_abnormal": int((studies["label"] == 1).sum()),
                "patients": int(grp["patient_id"].nunique()),
                "abnormal_rate_images": float(grp["label"].mean()),
                "abnormal_rate_studies": float(studies["label"].mean()),
            }
        )
    totals = {}
    for split, grp in table.groupby("source_split", sort=True):
        totals[split] = {
            "images": len(grp),
            "studies": int(grp["study_id"].nunique()),
            "patients": int(grp["patient_id"].nunique()),
            "abnormal_rate_images": float(grp["label"].mean()),
            "abnormal_rate_studies": float(grp.drop_duplicates("study_id")["label"].mean()),
        }
    parts_per_patient = table.groupby(["source_split", "patient_id"])["body_part"].nunique()
    multi_part = {s: int((v > 1).sum()) for s, v in parts_per_patient.groupby(level=0)}
    splits_per_patient = table.groupby("patient_id")["source_split"].nunique()
    return {
        "root": str(dataset.root),
        "source": dataset.source,
        "totals": totals,
        "by_part": groups,
        "patients_in_several_body_parts": multi_part,
        "patients_in_both_splits": int((splits_per_patient > 1).sum()),
        "problems": _listing(problems, key=lambda p: p.kind),
        # Usable images converted from an unusual mode, counted per kind (16-bit, palette, alpha channel, ...).
        "notes": _listing(notes, key=lambda p: p.detail.split(":")[0]),
    }


def _listing(items: list[Problem], key) -> dict:
    """``{"count", "by_kind", "shown"}``: the first :data:`SHOW_PROBLEMS` items by path, and counts."""
    by_kind: dict[str, int] = {}
    for item in items:
        by_kind[key(item)] = by_kind.get(key(item), 0) + 1
    return {
        "count": len(items),
        "by_kind": by_kind,
        "shown": [
            {"kind": p.kind, "path": p.path, "detail": p.detail} for p in items[:SHOW_PROBLEMS]
        ],
    }


def format_summary(summary: dict) -> str:
    """A human-readable version of :func:`summarize`'s result."""
    lines = [f"dataset: {summary['root']} ({summary['source']})", ""]
    frame = pd.DataFrame(summary["by_part"])
    if not frame.empty:
        frame = frame[
            [
                "source_split",
                "body_part",
                "images",
                "studies",
                "patients",
                "abnormal_rate_images",
                "abnormal_rate_studies",
            ]
        ]
        frame = frame.rename(
            columns={
                "source_split": "split",
                "abnormal_rate_images": "abn% img",
                "abnormal_rate_studies": "abn% study",
            }
        )
        for col in ("abn% img", "abn% study"):
            frame[col] = (100 * frame[col]).round(1)
        lines.append(frame.to_string(index=False))
        lines.append("")
    for split, t in summary["totals"].items():
        lines.append(
            f"{split}: {t['images']:,} images, {t['studies']:,} studies, {t['patients']:,} patients, "
            f"abnormal {100 * t['abnormal_rate_images']:.1f}% of images / {100 * t['abnormal_rate_studies']:.1f}% of studies"
        )
    multi = ", ".join(f"{k} {v:,}" for k, v in summary["patients_in_several_body_parts"].items())
    lines.append(
        f"patients with several body parts: {multi}; patients in both splits: {summary['patients_in_both_splits']}"
    )
    prob = summary["problems"]
    if prob["count"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(prob["by_kind"].items()))
        lines.append(f"problems: {prob['count']} ({kinds})")
        for p in prob["shown"]:
            lines.append(f"  {p['kind']}: {p['path']}: {p['detail']}")
        if prob["count"] > len(prob["shown"]):
            lines.append(f"  ... and {prob['count'] - len(prob['shown'])} more")
    else:
        lines.append("problems: none")
    notes = summary.get("notes", {})
    if notes.get("count"):
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(notes["by_kind"].items()))
        lines.append(
            f"notes: {notes['count']} usable image(s) converted to 8-bit grayscale ({kinds})"
        )
        for p in notes["shown"]:
            lines.append(f"  converted: {p['path']}: {p['detail']}")
        if notes["count"] > len(notes["shown"]):
            lines.append(f"  ... and {notes['count'] - len(notes['shown'])} more")
    return "\n".join(lines)
