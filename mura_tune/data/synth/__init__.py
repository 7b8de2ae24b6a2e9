"""A synthetic stand-in for the Stanford MURA-v1.1 dataset, in the official layout.

Real MURA images need a research-use agreement. :func:`synthesize` writes radiograph-like
images in exactly the MURA-v1.1 folder and CSV layout, so any MURA reader takes them
unchanged::

    OUT/MURA-v1.1/{train,valid}_image_paths.csv        one image path per line, no header
    OUT/MURA-v1.1/{train,valid}_labeled_studies.csv    "<study dir>/,<0|1>", no header
    OUT/MURA-v1.1/{train,valid}/XR_<PART>/patient<NNNNN>/study<K>_<positive|negative>/image<J>.png
    OUT/synth_findings.parquet                         one row per image: finding, box, true label
    OUT/synth_info.json                                arguments and counts

Without ``index`` the structure is drawn to match MURA's statistics at ``scale`` times its
size (per-part study and image abnormal rates, views per study, patients with several studies
and body parts); ``valid_scale`` sets the official ``valid`` split's fraction on its own (e.g.
1.0: all 1,199 of MURA's valid studies as a test set that can resolve small differences,
beside a train set small enough for a CPU). With ``index`` (a folder holding the four official CSVs) the exact paths
and labels of that index are reproduced, one image per listed path.

Output is byte-identical for the same arguments, whatever ``workers`` is. This module checks the
arguments, writes the files and orchestrates; :mod:`.structure` draws studies, patients, labels
and findings, :mod:`.render` draws the pixels.
"""

from __future__ import annotations

import functools
import math
import multiprocessing as mp
import numbers
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from mura_tune.constants import SOURCE_SPLITS
from mura_tune.data.synth.render import FINDINGS, ImageJob, render_chunk
from mura_tune.data.synth.structure import (
    LABEL_NOISE,
    ROOT_NAME,
    assign_truth,
    draw_structure,
    image_jobs,
    layout_lines,
    read_index,
    view_shows_finding,
)
from mura_tune.errors import ConfigError, DataError
from mura_tune.io import write_json, write_parquet

__all__ = ["SIDECAR_COLUMNS", "synthesize"]

#: Columns of OUT/synth_findings.parquet (box: pixel coordinates, ends exclusive, -1 if none).
SIDECAR_COLUMNS = (
    "image_path", "study_id", "body_part", "label", "true_label", "finding", "visible",
    "x0", "y0", "x1", "y1",
)  # fmt: skip


def synthesize(
    out: str | Path,
    *,
    scale: float = 0.02,
    valid_scale: float | None = None,
    size: int = 256,
    difficulty: float = 0.5,
    seed: int = 0,
    index: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write OUT/MURA-v1.1 (+ OUT/synth_findings.parquet and OUT/synth_info.json).

    Args:
        out: Output folder; ``OUT/MURA-v1.1`` must not exist or be empty.
        scale: Fraction of MURA's studies to draw, in (0, 1] (ignored with ``index``).
        valid_scale: Fraction of MURA's ``valid`` studies to draw, in (0, 1]; default ``scale``.
        size: Long side of every image in pixels, 16..2048.
        difficulty: 0 (large, high-contrast findings) .. 1 (small, faint findings).
        seed: Non-negative seed; the same arguments give byte-identical output.
        index: Folder with the four official MURA-v1.1 CSVs to replicate exactly.
        workers: Rendering processes (default ``os.cpu_count()``); does not change output.
        progress: Show a tqdm progress bar on stderr.

    Returns:
        The path of the ``MURA-v1.1`` folder.

    Raises:
        ConfigError: An argument is out of range.
        DataError: The index is missing or malformed, or the output already exists.
    """
    _check_args(scale, size, difficulty, seed, workers)
    if valid_scale is not None and (
        not isinstance(valid_scale, numbers.Real) or not 0 < valid_scale <= 1
    ):
        raise ConfigError(f"--valid-scale must be in (0, 1], got {valid_scale}")
    out = Path(out)
    root = out / ROOT_NAME
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{out}/{ROOT_NAME} already exists; choose another --out or delete it")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")

    if index is not None:
        studies, image_lines, study_lines = read_index(Path(index))
    else:
        studies = draw_structure(scale, seed, valid_scale)
        image_lines, study_lines = layout_lines(studies)
    assign_truth(studies, seed, difficulty)
    jobs = image_jobs(studies, image_lines)

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{ROOT_NAME}.partial-", dir=out))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
    try:
        for st in studies:
            if st.images:
                (staging / st.study_dir[len(ROOT_NAME) + 1 :]).mkdir(parents=True, exist_ok=True)
        for split in SOURCE_SPLITS:
            for name, lines in (("image_paths", image_lines), ("labeled_studies", study_lines)):
                text = "".join(f"{line}\n" for line in lines[split])
                (staging / f"{split}_{name}.csv").write_bytes(text.encode())
        results = _render_all(staging, jobs, seed, size, difficulty, workers, progress)
        if root.exists():
            root.rmdir()
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    _write_sidecars(
        out,
        studies,
        jobs,
        results,
        scale=scale,
        valid_scale=valid_scale,
        size=size,
        difficulty=difficulty,
        seed=seed,
        index=index,
    )
    return root


# ----------------------------------------------------------------------------- checks


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_args(scale, size, difficulty, seed, workers) -> None:
    if not isinstance(scale, numbers.Real) or not 0 < scale <= 1:
        raise ConfigError(f"--scale must be in (0, 1], got {scale}")
    if not _is_int(size) or not 16 <= size <= 2048:
        raise ConfigError(f"--size must be an integer in 16..2048, got {size}")
    if not isinstance(difficulty, numbers.Real) or not 0 <= difficulty <= 1:
        raise ConfigError(f"--difficulty must be in [0, 1], got {difficulty}")
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
    if workers is not None and (not _is_int(workers) or workers < 1):
        raise ConfigError(f"--workers must be a positive integer, got {workers}")


# ----------------------------------------------------------------------------- render + write


def _render_all(staging: Path, jobs: list[ImageJob], seed, size, difficulty, workers, progress):
    """Render and save every job, in worker processes if ``workers > 1``; results in job order."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    chunk = max(8, min(64, math.ceil(len(jobs) / (workers * 4)))) if jobs else 1
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    bar = functools.partial(
        tqdm,
        total=len(jobs),
        unit="img",
        desc="synth",
        disable=not progress or not sys.stderr.isatty(),
        file=sys.stderr,
    )
    results: list = []
    if workers == 1 or len(chunks) <= 1:
        with bar() as b:
            for c in chunks:
                results += render_chunk(str(staging), c, seed, size, difficulty)
                b.update(len(c))
        return results
    # fork starts fast and works whatever __main__ is (stdin, notebooks); spawn off Linux.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as ex:
        futures = [ex.submit(render_chunk, str(staging), c, seed, size, difficulty) for c in chunks]
        try:
            with bar() as b:  # after the workers start: no tqdm thread exists at fork time
                for fut, c in zip(futures, chunks):
                    results += fut.result()
                    b.update(len(c))
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _write_sidecars(out: Path, studies, jobs, results, **args) -> None:
    import pandas as pd

    rows = []
    for job, (visible, box) in zip(jobs, results):
        st = studies[job.study_idx]
        rows.append({
            "image_path": f"{ROOT_NAME}/{job.rel_path}",
            "study_id": st.study_dir.rstrip("/"),
            "body_part": st.part,
            "label": st.label,
            "true_label": st.true_label,
            "finding": st.finding,
            "visible": bool(visible),
            "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
        })  # fmt: skip
    df = pd.DataFrame(rows, columns=list(SIDECAR_COLUMNS))
    ints = {"label": "int8", "true_label": "int8", "x0": "int32", "y0": "int32"}
    df = df.astype({**ints, "x1": "int32", "y1": "int32", "visible": "bool"})
    write_parquet(out / "synth_findings.parquet", df)

    counts = {}
    for split in SOURCE_SPLITS:
        sts = [s for s in studies if s.split == split]
        parts_per_patient: dict[int, set] = {}
        for s in sts:
            parts_per_patient.setdefault(s.patient, set()).add(s.part)
        counts[split] = {
            "images": sum(len(s.images) for s in sts),
            "studies": len(sts),
            "patients": len(parts_per_patient),
            "multi_part_patients": sum(len(p) >= 2 for p in parts_per_patient.values()),
            "abnormal_studies": sum(s.label for s in sts),
            "abnormal_images": sum(len(s.images) for s in sts if s.label),
            "label_noise_studies": sum(s.label != s.true_label for s in sts),
            "findings": {k: sum(s.finding == k for s in sts) for k in FINDINGS},
        }
    info = {
        "generator": "mura_tune.data.synth",
        "format": ROOT_NAME,
        "args": {
            **args,
            "scale": None if args["index"] is not None else args["scale"],
            "valid_scale": None if args["index"] is not None else args["valid_scale"],
            "index": None if args["index"] is None else str(args["index"]),
        },
        "label_noise": LABEL_NOISE,
        "view_shows_finding": view_shows_finding(args["difficulty"]),
        "counts": counts,
    }
    write_json(out / "synth_info.json", info)
