"""The structure of a synthetic MURA-v1.1: studies, patients, views, labels, findings (no pixels).

Without an index, the studies are drawn to match MURA's statistics at ``scale`` times its size
(per-part study and image abnormal rates, views per study, patients with several studies and
body parts); with one, the exact paths and labels of that index are reproduced. Label noise,
the finding of each abnormal study and the views that show it are drawn here too; the pixels are
drawn by :mod:`mura_tune.data.synth.render`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mura_tune.constants import BODY_PARTS, MURA_ROOT, SOURCE_SPLITS
from mura_tune.data.synth.render import FINDING_PROBS, FINDINGS, ImageJob
from mura_tune.errors import DataError

ROOT_NAME = MURA_ROOT
CSV_NAMES = (
    "train_image_paths.csv",
    "valid_image_paths.csv",
    "train_labeled_studies.csv",
    "valid_labeled_studies.csv",
)

#: Fraction of studies whose drawn content contradicts their label.
LABEL_NOISE = 0.04
#: Probability that a view of an abnormal study shows its finding (at least one always does),
#: at difficulty 0 and 1 (linear in between): subtler data also hides findings in more views.
VIEW_SHOWS_FINDING = (0.9, 0.5)
_RATE_TOL = 0.03

# Real MURA-v1.1 counts per part: (normal, abnormal).
MURA_STUDIES = {
    "train": {
        "XR_ELBOW": (1094, 660), "XR_FINGER": (1280, 655), "XR_FOREARM": (590, 287),
        "XR_HAND": (1497, 521), "XR_HUMERUS": (321, 271), "XR_SHOULDER": (1364, 1457),
        "XR_WRIST": (2134, 1326),
    },
    "valid": {
        "XR_ELBOW": (92, 66), "XR_FINGER": (92, 83), "XR_FOREARM": (69, 64),
        "XR_HAND": (101, 66), "XR_HUMERUS": (68, 67), "XR_SHOULDER": (99, 95),
        "XR_WRIST": (140, 97),
    },
}  # fmt: skip
MURA_IMAGES = {
    "train": {
        "XR_ELBOW": (2925, 2006), "XR_FINGER": (3138, 1968), "XR_FOREARM": (1164, 661),
        "XR_HAND": (4059, 1484), "XR_HUMERUS": (673, 599), "XR_SHOULDER": (4211, 4168),
        "XR_WRIST": (5765, 3987),
    },
    "valid": {
        "XR_ELBOW": (235, 230), "XR_FINGER": (214, 247), "XR_FOREARM": (150, 151),
        "XR_HAND": (271, 189), "XR_HUMERUS": (148, 140), "XR_SHOULDER": (285, 278),
        "XR_WRIST": (364, 295),
    },
}  # fmt: skip
MURA_PATIENTS = {"train": 11184, "valid": 783}
MURA_STUDY_TOTAL = {"train": 13457, "valid": 1199}

# Seed tags (the render module uses 0 and 1).
_TAG_FINDING, _TAG_STRUCTURE, _TAG_NOISE = 2, 3, 4
_IMAGE_RE = re.compile(
    r"^MURA-v1\.1/(train|valid)/(XR_[A-Z]+)/patient(\d+)/study\d+_(?:positive|negative)/image\d+\.png$"
)
_STUDY_RE = re.compile(
    r"^(MURA-v1\.1/(train|valid)/(XR_[A-Z]+)/patient(\d+)/study\d+_(?:positive|negative)/),([01])$"
)


@dataclass
class Study:
    split: str
    part: str
    patient: int
    label: int  # as written to the CSVs
    study_dir: str = ""  # "MURA-v1.1/.../studyK_positive/" (trailing slash)
    images: list[str] = field(default_factory=list)
    n_views: int = 0
    number: int = 0
    true_label: int = 0  # what is drawn
    finding: str = "none"
    visible: list[bool] = field(default_factory=list)


# ----------------------------------------------------------------------------- structure


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _allocate(split: str, part: str, scale: float) -> tuple[int, int, int, int]:
    """Deterministic (normal studies, abnormal studies, normal images, abnormal images).

    Starts from ``max(1, round(scale * real))`` per label; if rounding leaves the study- or
    image-level abnormal rate more than 3 points off MURA's (tiny valid sets), the smallest
    larger study count that matches both is used instead.
    """
    n_real, a_real = MURA_STUDIES[split][part]
    ni_real, ai_real = MURA_IMAGES[split][part]
    r_study, r_image = a_real / (n_real + a_real), ai_real / (ni_real + ai_real)
    m_n, m_a = ni_real / n_real, ai_real / a_real

    def images(n: int, a: int) -> tuple[int, int]:
        return max(n, _round(n * m_n)), max(a, _round(a * m_a))

    def ok(n: int, a: int) -> bool:
        i_n, i_a = images(n, a)
        return (
            abs(a / (n + a) - r_study) <= _RATE_TOL
            and abs(i_a / (i_n + i_a) - r_image) <= _RATE_TOL
        )

    n, a = max(1, _round(scale * n_real)), max(1, _round(scale * a_real))
    total = n + a
    while not ok(n, a):
        total += 1
        best = None
        for cand in {_round(total * r_study) + d for d in (-1, 0, 1)}:
            if 1 <= cand < total and ok(total - cand, cand):
                best = cand
                break
        if best is not None:
            n, a = total - best, best
    return (n, a, *images(n, a))


def _spread_views(rng: np.random.Generator, n: int, total: int) -> list[int]:
    """``n`` view counts (1..8, mostly 2-4) summing exactly to ``total``."""
    mean = total / n
    views = 1 + rng.binomial(7, min(max((mean - 1) / 7, 0.0), 1.0), size=n)
    while views.sum() > total:
        idx = np.flatnonzero(views > 1)
        views[idx[rng.integers(len(idx))]] -= 1
    while views.sum() < total:
        idx = np.flatnonzero(views < 8)
        views[idx[rng.integers(len(idx))]] += 1
    return [int(v) for v in views]


def draw_structure(scale: float, seed: int, valid_scale: float | None = None) -> list[Study]:
    """Studies, patients and view counts matching MURA's statistics at ``scale`` (``valid_scale`` for valid)."""
    rng = np.random.default_rng([seed, _TAG_STRUCTURE, 0])
    out: list[Study] = []
    next_patient = 1
    for split in SOURCE_SPLITS:
        studies: list[Study] = []
        for part in BODY_PARTS:
            fraction = valid_scale if split == "valid" and valid_scale is not None else scale
            n, a, i_n, i_a = _allocate(split, part, fraction)
            for label, count, imgs in ((0, n, i_n), (1, a, i_a)):
                for v in _spread_views(rng, count, imgs):
                    studies.append(Study(split, part, 0, label, n_views=v))
        n_patients = max(1, _round(len(studies) * MURA_PATIENTS[split] / MURA_STUDY_TOTAL[split]))
        order = rng.permutation(len(studies))
        owners: list[list[Study]] = []
        multi: list[int] = []  # patients with several studies
        for rank, i in enumerate(order):
            st = studies[i]
            if rank < n_patients:
                owners.append([st])
                continue
            # Sometimes prefer patients who already have several studies (a few have many).
            if multi and rng.random() < 0.15:
                j = multi[int(rng.integers(len(multi)))]
            else:
                j = int(rng.integers(len(owners)))
            owners[j].append(st)
            if len(owners[j]) == 2:
                multi.append(j)
        for group in owners:
            per_part: Counter = Counter()
            for st in group:
                per_part[st.part] += 1
                st.patient, st.number = next_patient, per_part[st.part]
            next_patient += 1
        studies.sort(key=lambda s: (BODY_PARTS.index(s.part), s.patient, s.number))
        for st in studies:
            kind = "positive" if st.label else "negative"
            st.study_dir = (
                f"{ROOT_NAME}/{split}/{st.part}/patient{st.patient:05d}/study{st.number}_{kind}/"
            )
            st.images = [f"{st.study_dir}image{j}.png" for j in range(1, st.n_views + 1)]
        out += studies
    return out


def layout_lines(studies: list[Study]) -> tuple[dict, dict]:
    images = {s: [] for s in SOURCE_SPLITS}
    labels = {s: [] for s in SOURCE_SPLITS}
    for st in studies:
        images[st.split] += st.images
        labels[st.split].append(f"{st.study_dir},{st.label}")
    return images, labels


def read_index(folder: Path) -> tuple[list[Study], dict, dict]:
    """Studies, image lines and study lines of an official-layout index folder."""
    if not folder.is_dir():
        raise DataError(f"--index {folder}: folder not found")
    for name in CSV_NAMES:
        if not (folder / name).is_file():
            raise DataError(f"--index {folder}: missing {name}")
    studies: list[Study] = []
    by_dir: dict[str, Study] = {}
    image_lines: dict[str, list[str]] = {}
    study_lines: dict[str, list[str]] = {}
    seen: set[str] = set()
    for split in SOURCE_SPLITS:
        name = f"{split}_labeled_studies.csv"
        study_lines[split] = _lines(folder / name)
        for n, line in enumerate(study_lines[split], 1):
            m = _STUDY_RE.match(line)
            if not m or m.group(2) != split or m.group(3) not in BODY_PARTS:
                raise DataError(
                    f"--index {folder}/{name} line {n}: not a MURA study line: {line!r}"
                )
            if m.group(1) in by_dir:
                raise DataError(f"--index {folder}/{name} line {n}: duplicate study {m.group(1)}")
            st = Study(split, m.group(3), int(m.group(4)), int(m.group(5)), study_dir=m.group(1))
            by_dir[st.study_dir] = st
            studies.append(st)
        name = f"{split}_image_paths.csv"
        image_lines[split] = _lines(folder / name)
        for n, line in enumerate(image_lines[split], 1):
            m = _IMAGE_RE.match(line)
            if not m or m.group(1) != split:
                raise DataError(
                    f"--index {folder}/{name} line {n}: not a MURA image path: {line!r}"
                )
            st = by_dir.get(line.rsplit("/", 1)[0] + "/")
            if st is None:
                raise DataError(
                    f"--index {folder}/{name} line {n}: study of {line} is not in "
                    f"{split}_labeled_studies.csv"
                )
            if line in seen:
                raise DataError(f"--index {folder}/{name} line {n}: duplicate image {line}")
            seen.add(line)
            st.images.append(line)
    for st in studies:
        st.n_views = len(st.images)
    return studies, image_lines, study_lines


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def view_shows_finding(difficulty: float) -> float:
    easy, hard = VIEW_SHOWS_FINDING
    return easy + (hard - easy) * difficulty


def assign_truth(studies: list[Study], seed: int, difficulty: float) -> None:
    """Label noise (exactly ~4% of each split's studies), finding kind and visible views."""
    for code, split in enumerate(SOURCE_SPLITS):
        idx = [i for i, st in enumerate(studies) if st.split == split]
        n_flip = max(1, _round(LABEL_NOISE * len(idx))) if len(idx) >= 10 else 0
        flip = (
            set(
                np.random.default_rng([seed, _TAG_NOISE, code])
                .choice(idx, n_flip, replace=False)
                .tolist()
            )
            if n_flip
            else set()
        )
        for i in idx:
            studies[i].true_label = 1 - studies[i].label if i in flip else studies[i].label
    p_visible = view_shows_finding(difficulty)
    for i, st in enumerate(studies):
        if not st.true_label or not st.images:
            continue
        rng = np.random.default_rng([seed, _TAG_FINDING, i])
        st.finding = FINDINGS[int(rng.choice(len(FINDINGS), p=FINDING_PROBS[st.part]))]
        vis = rng.random(len(st.images)) < p_visible
        if not vis.any():
            vis[rng.integers(len(st.images))] = True
        st.visible = [bool(v) for v in vis]


def image_jobs(studies: list[Study], image_lines: dict[str, list[str]]) -> list[ImageJob]:
    """Image jobs in CSV order (train images, then valid), indexed globally."""
    where: dict[str, tuple[int, int]] = {}
    for si, st in enumerate(studies):
        for v, path in enumerate(st.images):
            where[path] = (si, v)
    jobs = []
    for idx, path in enumerate(p for split in SOURCE_SPLITS for p in image_lines[split]):
        si, v = where[path]
        st = studies[si]
        visible = bool(st.visible[v]) if st.visible else False
        jobs.append(ImageJob(idx, si, path[len(ROOT_NAME) + 1 :], st.part, st.finding, visible, v))
    return jobs
