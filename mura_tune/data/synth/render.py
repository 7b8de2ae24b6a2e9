"""Rendering of synthetic radiographs for :mod:`mura_tune.data.synth`.

Each image is drawn from a small set of primitives in a canonical frame whose unit is the
image's long side: hollow *tubes* (long-bone shafts and phalanges, projected as cylinders
with a cortical shell, so their edges are brighter than their marrow), *blobs* (projected
ellipsoids: epiphyses, carpals, humeral heads) and solid soft-tissue envelopes. A pose
(rotation, scale, mirror, shift) maps them to pixels; densities are accumulated only inside
each primitive's bounding box and turned into brightness with ``1 - exp(-attenuation)``.

Findings (fracture, hardware, degenerative change, lesion) modify the bone density;
confounders (L/R markers, collimation, inversion, noise, low contrast) are independent of
the label. Everything is vectorised numpy; every random draw comes from generators seeded
by ``(seed, tag, index)`` so the output does not depend on the worker that renders it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

FINDINGS = ("fracture", "hardware", "degenerative", "lesion")

#: Finding kind probabilities per body part (order of :data:`FINDINGS`).
FINDING_PROBS = {
    "XR_ELBOW": (0.45, 0.15, 0.20, 0.20),
    "XR_FINGER": (0.45, 0.10, 0.30, 0.15),
    "XR_FOREARM": (0.50, 0.30, 0.05, 0.15),
    "XR_HAND": (0.40, 0.15, 0.30, 0.15),
    "XR_HUMERUS": (0.45, 0.25, 0.05, 0.25),
    "XR_SHOULDER": (0.30, 0.30, 0.30, 0.10),
    "XR_WRIST": (0.45, 0.25, 0.15, 0.15),
}

#: Size/contrast multiplier of findings per part (finger smallest, wrist largest).
PART_EASE = {
    "XR_ELBOW": 0.95,
    "XR_FINGER": 0.6,
    "XR_FOREARM": 1.0,
    "XR_HAND": 1.05,
    "XR_HUMERUS": 0.9,
    "XR_SHOULDER": 0.95,
    "XR_WRIST": 1.15,
}

# Seed tags: generators are default_rng([seed, TAG, index]).
TAG_IMAGE, TAG_ANATOMY = 0, 1

_MU_BONE, _MU_SOFT = 40.0, 2.6
_CORTEX, _MARROW = 1.0, 0.22
_GLYPHS = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}


@dataclass(frozen=True)
class ImageJob:
    """One image to render.

    Attributes:
        idx: Global image index (seeds the image's generator).
        study_idx: Global study index (seeds the study's shared anatomy).
        rel_path: Path below the ``MURA-v1.1`` folder, e.g. ``train/XR_HAND/.../image1.png``.
        part: Body part, e.g. ``XR_HAND``.
        finding: Finding kind drawn in the study, or ``"none"``.
        visible: Whether this view shows the finding.
        view: 0-based position of the image within its study.
    """

    idx: int
    study_idx: int
    rel_path: str
    part: str
    finding: str
    visible: bool
    view: int


@dataclass(frozen=True)
class Tube:
    """A bone shaft (or solid soft-tissue cylinder) from (x0, y0) to (x1, y1), radius r."""

    x0: float
    y0: float
    x1: float
    y1: float
    r: float
    k: float = 0.62  # inner/outer radius: 0 = solid
    dens: float = 1.0


@dataclass(frozen=True)
class Blob:
    """A projected ellipsoid with semi-axes a, b rotated by ang (radians)."""

    x: float
    y: float
    a: float
    b: float
    ang: float = 0.0
    k: float = 0.85
    dens: float = 1.0


@dataclass
class Anatomy:
    """Primitives of one view plus the places findings can go."""

    bones: list = field(default_factory=list)
    soft: list = field(default_factory=list)
    shafts: list[int] = field(default_factory=list)  # indices of Tube bones
    heads: list[int] = field(default_factory=list)  # indices of Blob bones (lesion sites)
    joints: list[tuple[float, float, float, float]] = field(default_factory=list)

    def bone(self, prim, site: bool = True) -> None:
        if site:
            (self.shafts if isinstance(prim, Tube) else self.heads).append(len(self.bones))
        self.bones.append(prim)

    def joint(self, x: float, y: float, ang: float, hw: float) -> None:
        """Joint centre; ``ang`` is the limb axis direction (0 = along y), ``hw`` half-width."""
        self.joints.append((x, y, ang, hw))


# ----------------------------------------------------------------------------- anatomy


def _dir(a: float) -> tuple[float, float]:
    """Unit vector of angle ``a`` measured from 'up' (negative y), clockwise."""
    return math.sin(a), -math.cos(a)


def _chain(an, x, y, ang, lengths, radii, gap, bend, soft_r, site=True):
    """Draw consecutive bone segments from (x, y) in direction ``ang``; joints between them."""
    pts = [(x, y)]
    for i, (ln, r) in enumerate(zip(lengths, radii)):
        dx, dy = _dir(ang)
        x1, y1 = x + dx * ln, y + dy * ln
        an.bone(Tube(x, y, x1, y1, r), site)
        an.bone(Blob(x1 - dx * r * 0.3, y1 - dy * r * 0.3, r * 1.25, r * 0.55, ang, 0.8), False)
        if i < len(lengths) - 1:
            an.joint(x1 + dx * gap / 2, y1 + dy * gap / 2, ang, r * 1.2)
            ang += bend
        x, y = x1 + dx * gap, y1 + dy * gap
        pts.append((x1, y1))
    an.soft.append(Tube(*pts[0], *pts[-1], soft_r, 0.0, 1.0))
    return x, y, ang


def _build_finger(p, view):
    an = Anatomy()
    bend = (0.0, 0.22, 0.08)[view] * p["flex"]
    x0, y0 = 0.0, 0.52
    lengths = [0.28, 0.27 * p["len"], 0.16 * p["len"], 0.11 * p["len"]]
    radii = [r * p["wf"] for r in (0.05, 0.045, 0.037, 0.031)]
    an.joint(x0, y0 - 0.28 - 0.01, 0.0, radii[0] * 1.2)
    _chain(an, x0, y0, p["tilt"] * 0.5, lengths, radii, 0.022, bend, 0.085)
    if view != 1:  # neighbour finger(s), partly in frame
        for side in (-1.0, 1.0)[: 1 + (view == 0)]:
            _chain(
                an,
                side * 0.24,
                y0 + 0.04,
                side * 0.12,
                lengths,
                [r * 0.9 for r in radii],
                0.02,
                bend,
                0.075,
                site=False,
            )
    return an


def _build_hand(p, view):
    an = Anatomy()
    spread = (1.0, 0.28, 0.7)[view] * p["spread"]
    bend = (0.0, 0.25, 0.1)[view] * p["flex"]
    dy = -0.25
    an.bone(Tube(-0.055, 0.75 + dy, -0.05, 0.40 + dy, 0.038 * p["wf"]))
    an.bone(Blob(-0.045, 0.385 + dy, 0.06, 0.028))
    an.bone(Tube(0.06 * spread, 0.75 + dy, 0.055 * spread, 0.42 + dy, 0.026 * p["wf"]))
    an.bone(Blob(0.055 * spread, 0.41 + dy, 0.028, 0.022), False)
    an.joint(-0.03, 0.355 + dy, 0.0, 0.07)
    jit = p["jit"]
    for row, y in enumerate((0.33, 0.275)):
        for j, x in enumerate((-0.05, -0.017, 0.016, 0.048)):
            e = jit[4 * row + j]
            a = (0.022 - 0.003 * (j == 3)) * (1 + 0.15 * e)
            an.bone(
                Blob(
                    x * spread - 0.005 * row + 0.004 * e,
                    y + dy + 0.005 * jit[8 + j],
                    a,
                    0.019 * (1 - 0.1 * e),
                    0.3 * (j - 1.5) + 0.4 * e,
                    0.8,
                ),
                False,
            )
    an.soft.append(Tube(0.0, 0.75 + dy, 0.0, 0.3 + dy, 0.1, 0.0, 1.0))
    an.soft.append(Blob(0.0, 0.17 + dy, 0.06 + 0.06 * spread, 0.13, 0.0, 0.0, 1.2))
    fl = (0.95, 1.0, 0.95, 0.8)
    for i in range(4):
        xb, xh = (-0.045 + 0.03 * i) * spread, (-0.07 + 0.047 * i) * spread
        ang = math.atan2(xh - xb, 0.21)
        r = 0.0145 * p["wf"]
        an.bone(Tube(xb, 0.24 + dy, xh, 0.03 + dy, r))
        an.bone(Blob(xh, 0.03 + dy, r * 1.3, r * 1.1, ang, 0.8), False)
        dx, dyy = _dir(ang)
        an.joint(xh + dx * 0.014, 0.03 + dy + dyy * 0.014, ang, r * 1.3)
        _chain(
            an,
            xh + dx * 0.025,
            0.03 + dy + dyy * 0.025,
            ang,
            [0.10 * fl[i] * p["len"], 0.06 * fl[i] * p["len"], 0.045 * fl[i] * p["len"]],
            [0.013 * p["wf"], 0.011 * p["wf"], 0.009 * p["wf"]],
            0.012,
            bend,
            0.024,
        )
    ta = -0.65 * (0.5 + 0.5 * spread)
    tx, ty = -0.075 * spread, 0.25 + dy
    tdx, tdy = _dir(ta)
    an.bone(Tube(tx, ty, tx + tdx * 0.1, ty + tdy * 0.1, 0.016 * p["wf"]))
    _chain(
        an,
        tx + tdx * 0.115,
        ty + tdy * 0.115,
        ta + 0.15,
        [0.065, 0.05],
        [0.013 * p["wf"], 0.011 * p["wf"]],
        0.012,
        bend * 0.5,
        0.026,
    )
    return an


def _build_wrist(p, view):
    an = Anatomy()
    sx = (1.0, 0.45, 0.75)[view]
    an.bone(Tube(-0.06 * sx, 0.65, -0.05 * sx, 0.17, 0.055 * p["wf"]))
    an.bone(Blob(-0.045 * sx, 0.15, 0.085 * sx + 0.02, 0.04))
    an.bone(Blob(-0.115 * sx, 0.12, 0.02, 0.03), False)
    an.bone(Tube(0.085 * sx, 0.65, 0.08 * sx, 0.2, 0.035 * p["wf"]))
    an.bone(Blob(0.08 * sx, 0.18, 0.04, 0.03), False)
    an.joint(-0.04 * sx, 0.112, 0.0, 0.085)
    an.joint(-0.01 * sx, 0.02, 0.0, 0.09)
    jit = p["jit"]
    rows = (
        (
            0.07,
            (-0.08, -0.032, 0.017, 0.062),
            (0.036, 0.033, 0.03, 0.02),
            (0.03, 0.028, 0.026, 0.024),
        ),
        (
            -0.025,
            (-0.088, -0.045, 0.0, 0.048),
            (0.028, 0.024, 0.033, 0.03),
            (0.032, 0.028, 0.036, 0.03),
        ),
    )
    for r_i, (y, xs, a, b) in enumerate(rows):
        for j, (x, ax, bx) in enumerate(zip(xs, a, b)):
            e, e2 = jit[4 * r_i + j], jit[8 + 4 * r_i + j]
            an.bone(
                Blob(
                    (x + 0.006 * e) * sx,
                    y + 0.008 * e2 + 0.012 * (j == 3) * (1 - 2 * r_i),
                    ax * (0.6 + 0.4 * sx) * (1 + 0.12 * e2),
                    bx * (1 + 0.12 * e),
                    0.25 * x / 0.08 + 0.5 * e,
                    0.82,
                ),
                y > 0,
            )
    an.bone(Blob(0.072 * sx, 0.02, 0.014, 0.016, 0.0, 0.8), False)  # pisiform
    for i, x in enumerate((-0.1, -0.05, -0.01, 0.03, 0.065)):
        ang = (-0.5 if i == 0 else 0.1 * (i - 2)) * (0.5 + 0.5 * sx)
        dx, dy = _dir(ang)
        x0 = x * sx
        r = (0.026 if i < 3 else 0.022) * p["wf"]
        an.bone(Blob(x0, -0.09, r * 1.3, r * 0.8, ang, 0.8), False)
        an.bone(Tube(x0, -0.1, x0 + dx * 0.5, -0.1 + dy * 0.5, r))
    an.soft.append(Tube(0.0, 0.7, 0.0, 0.0, 0.13 * (0.7 + 0.3 * sx), 0.0, 1.0))
    an.soft.append(Tube(0.0, 0.0, 0.0, -0.7, 0.16 * (0.6 + 0.4 * sx), 0.0, 0.9))
    return an


def _build_forearm(p, view):
    an = Anatomy()
    sx = (1.0, 0.35, 0.7)[view]
    r_r, r_u = 0.03 * p["wf"], 0.027 * p["wf"]
    bow = -0.015 * p["spread"]
    an.bone(Tube(-0.055 * sx, -0.42, (-0.06 + bow) * sx, 0.0, r_r))
    an.bone(Tube((-0.06 + bow) * sx, 0.0, -0.06 * sx, 0.40, r_r))
    an.bone(Blob(-0.045 * sx, -0.44, 0.035, 0.02), False)
    an.bone(Blob(-0.06 * sx, 0.43, 0.06 * sx + 0.015, 0.028))
    an.bone(Tube(0.05 * sx, -0.42, 0.045 * sx, 0.42, r_u))
    an.bone(Blob(0.05 * sx, -0.45, 0.04, 0.045))
    an.bone(Blob(0.045 * sx, 0.44, 0.03, 0.024), False)
    an.bone(Blob(0.0, -0.535, 0.1 * (0.5 + 0.5 * sx), 0.05), False)
    an.joint(0.0, -0.485, 0.0, 0.07)
    an.joint(-0.02 * sx, 0.475, 0.0, 0.08)
    an.soft.append(Tube(0.0, -0.6, 0.0, 0.0, 0.13, 0.0, 1.0))
    an.soft.append(Tube(0.0, 0.0, 0.0, 0.6, 0.105, 0.0, 1.0))
    return an


def _build_humerus(p, view):
    an = Anatomy()
    r = 0.042 * p["wf"]
    an.bone(Tube(0.0, -0.33, 0.01, 0.33, r))
    an.bone(Blob(0.02, -0.39, 0.085, 0.08, 0.0, 0.88))
    an.bone(Blob(0.085, -0.37, 0.03, 0.04), False)
    an.bone(Blob(-0.09, -0.39, 0.03, 0.07, 0.0, 0.8, 0.8), False)
    an.bone(Tube(-0.1, -0.32, -0.24, -0.05, 0.018, 0.5, 0.8), False)  # scapula, lateral border
    an.bone(Blob(0.01, 0.37, 0.085 if view != 1 else 0.05, 0.035))
    for s in (-1, 1):
        an.bone(Tube(0.03 * s, 0.43, 0.04 * s, 0.62, 0.025), False)
    an.joint(-0.05, -0.39, math.pi / 2, 0.07)
    an.joint(0.01, 0.415, 0.0, 0.08)
    an.soft.append(Tube(0.0, -0.55, 0.0, 0.55, 0.14, 0.0, 1.0))
    an.soft.append(Blob(0.04, -0.3, 0.15, 0.2, 0.0, 0.0, 0.3))
    return an


def _build_elbow(p, view):
    an = Anatomy()
    beta = (0.05, 1.35, 0.35)[view] * p["flex"]
    cb, sb = math.cos(beta), math.sin(beta)

    def rot(x, y):
        return x * cb - y * sb, x * sb + y * cb

    shift = -0.12 * math.sin(beta)
    an.bone(Tube(shift, -0.6, shift, -0.1, 0.055 * p["wf"]))
    an.bone(Blob(shift, -0.06, 0.115 if view != 1 else 0.07, 0.05, 0.0, 0.85))
    an.joint(shift, -0.005, 0.0, 0.1)
    for x0, y0, x1, y1, r in ((0.025, 0.04, 0.04, 0.6, 0.035), (-0.055, 0.06, -0.065, 0.6, 0.03)):
        a0, b0 = rot(x0, y0)
        a1, b1 = rot(x1, y1)
        an.bone(Tube(a0 + shift, b0, a1 + shift, b1, r * p["wf"]))
    for x, y, a, b in ((0.03, 0.01, 0.045, 0.04), (-0.055, 0.045, 0.035, 0.018)):
        a0, b0 = rot(x, y)
        an.bone(Blob(a0 + shift, b0, a, b, beta))
    an.soft.append(Tube(shift, -0.65, shift, 0.0, 0.13, 0.0, 1.0))
    a1, b1 = rot(0.0, 0.65)
    an.soft.append(Tube(shift, 0.0, a1 + shift, b1, 0.12, 0.0, 1.0))
    return an


def _build_shoulder(p, view):
    an = Anatomy()
    hx = 0.06 if view != 1 else -0.02
    an.bone(Blob(hx, -0.02, 0.12 * p["wf"], 0.12 * p["wf"], 0.0, 0.9))
    an.bone(Blob(hx + 0.1, -0.05, 0.05, 0.06), False)
    an.bone(Tube(hx + 0.04, 0.08, hx + 0.08, 0.6, 0.055 * p["wf"]))
    an.bone(Blob(-0.085, -0.01, 0.03, 0.085, 0.0, 0.8))
    sw = (1.0, 0.45, 0.75)[view]
    an.bone(Blob(-0.22, 0.15, 0.15 * sw, 0.28, 0.3, 0.0, 0.06), False)
    an.bone(Tube(-0.1, 0.08, -0.1 - 0.15 * sw, 0.45, 0.02), False)
    an.bone(Tube(-0.15, -0.2, 0.12, -0.2, 0.028), False)
    an.bone(Tube(-0.55, -0.33, 0.05, -0.25, 0.03))
    an.bone(Tube(-0.06, -0.12, 0.02, -0.1, 0.018), False)
    for i in range(4):
        y = -0.1 + 0.16 * i
        an.bone(Tube(-0.6, y, -0.28, y + 0.1, 0.012, 0.5, 0.7), False)
    an.joint(-0.055, -0.01, math.pi / 2, 0.09)
    an.joint(0.08, -0.2, math.pi / 2, 0.03)
    an.soft.append(Blob(0.05, 0.08, 0.42, 0.55, 0.0, 0.0, 0.32))
    an.soft.append(Blob(0.12, 0.05, 0.18, 0.3, 0.2, 0.0, 0.4))
    return an


_BUILDERS = {
    "XR_ELBOW": _build_elbow,
    "XR_FINGER": _build_finger,
    "XR_FOREARM": _build_forearm,
    "XR_HAND": _build_hand,
    "XR_HUMERUS": _build_humerus,
    "XR_SHOULDER": _build_shoulder,
    "XR_WRIST": _build_wrist,
}


def _study_params(seed: int, study_idx: int) -> dict:
    """Anatomy shared by all views of a study (bone width, finger length, flexion...)."""
    r = np.random.default_rng([seed, TAG_ANATOMY, study_idx])
    return {
        "wf": float(r.uniform(0.85, 1.15)),
        "len": float(r.uniform(0.9, 1.1)),
        "spread": float(r.uniform(0.85, 1.15)),
        "flex": float(r.uniform(0.6, 1.3)),
        "tilt": float(r.uniform(-0.15, 0.15)),
        "density": float(r.uniform(0.8, 1.2)),
        "view0": int(r.integers(0, 3)),
        "side": float(r.choice([-1.0, 1.0])),
        "jit": r.uniform(-1.0, 1.0, 24).tolist(),
    }


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Pose:
    cx: float
    cy: float
    scale: float  # pixels per canonical unit
    cos: float
    sin: float
    mirror: float

    def pt(self, x: float, y: float) -> tuple[float, float]:
        x *= self.mirror
        return (
            self.cx + self.scale * (self.cos * x - self.sin * y),
            self.cy + self.scale * (self.sin * x + self.cos * y),
        )

    def ang(self, a: float) -> float:
        """Map a direction angle measured from 'up' (see :func:`_dir`)."""
        dx, dy = _dir(a)
        dx *= self.mirror
        return math.atan2(self.cos * dx - self.sin * dy, -(self.sin * dx + self.cos * dy))

    def prim(self, p):
        if isinstance(p, Tube):
            x0, y0 = self.pt(p.x0, p.y0)
            x1, y1 = self.pt(p.x1, p.y1)
            return Tube(x0, y0, x1, y1, p.r * self.scale, p.k, p.dens)
        x, y = self.pt(p.x, p.y)
        a = p.ang * self.mirror + math.atan2(self.sin, self.cos)
        return Blob(x, y, p.a * self.scale, p.b * self.scale, a, p.k, p.dens)


def _box(shape, x0, x1, y0, y1):
    h, w = shape
    xa, xb = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, w)
    ya, yb = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, h)
    if xa >= xb or ya >= yb:
        return None
    xs = np.arange(xa, xb, dtype=np.float32)[None, :]
    ys = np.arange(ya, yb, dtype=np.float32)[:, None]
    return (slice(ya, yb), slice(xa, xb)), xs, ys


def _tube_box(t: Tube, shape):
    p = t.r + 1.0
    return _box(
        shape, min(t.x0, t.x1) - p, max(t.x0, t.x1) + p, min(t.y0, t.y1) - p, max(t.y0, t.y1) + p
    )


def _tube_val(t: Tube, xs, ys):
    """Projected density of a hollow (k>0) or solid cylinder with rounded ends."""
    dx, dy = t.x1 - t.x0, t.y1 - t.y0
    l2 = max(dx * dx + dy * dy, 1e-6)
    u = ((xs - t.x0) * dx + (ys - t.y0) * dy) * (1.0 / l2)
    np.clip(u, 0.0, 1.0, out=u)
    ex, ey = xs - t.x0 - u * dx, ys - t.y0 - u * dy
    d2 = ex * ex + ey * ey
    outer = np.sqrt(np.maximum(t.r * t.r - d2, 0.0))
    if t.k <= 0:
        return outer * t.dens
    inner = np.sqrt(np.maximum((t.k * t.r) ** 2 - d2, 0.0))
    return ((outer - inner) * _CORTEX + inner * _MARROW) * t.dens


def _blob_val(b: Blob, xs, ys):
    c, s = math.cos(b.ang), math.sin(b.ang)
    u = ((xs - b.x) * c + (ys - b.y) * s) * (1.0 / b.a)
    v = ((ys - b.y) * c - (xs - b.x) * s) * (1.0 / b.b)
    rho2 = u * u + v * v
    depth = min(b.a, b.b)
    outer = np.sqrt(np.maximum(1.0 - rho2, 0.0))
    if b.k <= 0:
        return outer * (depth * b.dens)
    inner = np.sqrt(np.maximum(b.k * b.k - rho2, 0.0))
    return ((outer - inner) * _CORTEX + inner * _MARROW) * (depth * b.dens)


def _add(acc, prim) -> None:
    if isinstance(prim, Tube):
        box = _tube_box(prim, acc.shape)
        if box:
            acc[box[0]] += _tube_val(prim, box[1], box[2])
        return
    m = max(prim.a, prim.b) + 1.0
    box = _box(acc.shape, prim.x - m, prim.x + m, prim.y - m, prim.y + m)
    if box:
        acc[box[0]] += _blob_val(prim, box[1], box[2])


def _rect(acc, cx, cy, ang, hl, hw, val) -> None:
    """Add ``val`` inside a rotated rectangle (half-length ``hl`` along ``ang``) with soft edges."""
    dx, dy = _dir(ang)
    m = math.hypot(hl, hw) + 1.0
    box = _box(acc.shape, cx - m, cx + m, cy - m, cy + m)
    if not box:
        return
    sl, xs, ys = box
    u = (xs - cx) * dx + (ys - cy) * dy
    v = (xs - cx) * -dy + (ys - cy) * dx
    acc[sl] += val * np.clip(hl + 0.5 - np.abs(u), 0, 1) * np.clip(hw + 0.5 - np.abs(v), 0, 1)


# ----------------------------------------------------------------------------- findings


@dataclass
class _Finding:
    """A planned finding: the changes it makes and the points that bound it (pixels)."""

    pts: list[tuple[float, float]] = field(default_factory=list)
    #: (bone index, point, line normal, band width, depth, distal offset) of a fracture.
    fracture: tuple | None = None
    extra_soft: list = field(default_factory=list)  # swelling around a fracture
    extra_bone: list = field(default_factory=list)  # osteophytes, sclerosis
    metal: list[tuple] = field(default_factory=list)  # rectangles (cx, cy, ang, hl, hw)
    lesion: tuple | None = None  # (x, y, radius, lucent, depth)

    def bbox(self, shape) -> tuple[int, int, int, int]:
        """Integer box ``(x0, y0, x1, y1)`` clipped to the image, ends exclusive (-1s if empty)."""
        h, w = shape
        xs = [p[0] for p in self.pts]
        ys = [p[1] for p in self.pts]
        x0, x1 = max(int(math.floor(min(xs))), 0), min(int(math.ceil(max(xs))) + 1, w)
        y0, y1 = max(int(math.floor(min(ys))), 0), min(int(math.ceil(max(ys))) + 1, h)
        if x0 >= x1 or y0 >= y1:
            return (-1, -1, -1, -1)
        return (x0, y0, x1, y1)

    def around(self, x: float, y: float, r: float) -> None:
        self.pts += [(x - r, y - r), (x + r, y + r)]

    def draw(self, bone: np.ndarray, soft: np.ndarray, metal: np.ndarray) -> None:
        """Apply everything but the fracture (drawn with its bone) to the density maps."""
        for p in self.extra_soft:
            _add(soft, p)
        for p in self.extra_bone:
            _add(bone, p)
        for r in self.metal:
            _rect(metal, *r, 8.0)
        if self.lesion is not None:
            _draw_lesion(bone, *self.lesion)


@dataclass(frozen=True)
class _Ctx:
    """Where a finding can go and how large/contrasted it is."""

    rng: np.random.Generator
    an: Anatomy
    bones: list
    joints: list
    shape: tuple[int, int]
    size: int
    sev: float  # size multiplier (~1.6 at difficulty 0.5 for an average part)
    contrast: float  # contrast multiplier (<= 1)
    difficulty: float

    def pick(self, cands):
        """A random candidate whose anchor lies inside the frame (else the most central one)."""
        h, w = self.shape
        margin = 0.08 * min(self.shape)
        for i in self.rng.permutation(len(cands)):
            x, y = cands[i][0]
            if margin <= x <= w - margin and margin <= y <= h - margin:
                return cands[i]
        return min(cands, key=lambda c: abs(c[0][0] - w / 2) + abs(c[0][1] - h / 2))

    def shaft_points(self, lo: float = 0.25, hi: float = 0.75):
        """``((x, y), bone index)`` at a random position along each long-enough shaft."""
        out = []
        for i in self.an.shafts:
            t = self.bones[i]
            if math.hypot(t.x1 - t.x0, t.y1 - t.y0) >= 2.5 * t.r:
                u = float(self.rng.uniform(lo, hi))
                out.append(((t.x0 + u * (t.x1 - t.x0), t.y0 + u * (t.y1 - t.y0)), i))
        return out or [
            (((t.x0 + t.x1) / 2, (t.y0 + t.y1) / 2), i)
            for i in self.an.shafts
            for t in [self.bones[i]]
        ]

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))


def _axis(t: Tube) -> tuple[float, float, float]:
    ax, ay = t.x1 - t.x0, t.y1 - t.y0
    n = max(math.hypot(ax, ay), 1e-6)
    return ax / n, ay / n, n


def _plan_fracture(c: _Ctx, f: _Finding) -> None:
    """A dark, slightly wavy band across a shaft; often the distal part is shifted sideways."""
    (fx, fy), i = c.pick(c.shaft_points())
    t = c.bones[i]
    ax, ay, _ = _axis(t)
    phi = c.u(-0.6, 0.6)  # obliquity of the fracture line
    nx, ny = ax * math.cos(phi) - ay * math.sin(phi), ax * math.sin(phi) + ay * math.cos(phi)
    width = max(0.8, 0.028 * c.size * c.sev * c.u(0.7, 1.3))
    depth = min(0.95, 0.9 * c.contrast * c.u(0.85, 1.1))
    displaced = c.rng.random() < max(0.1, 0.9 - 0.7 * (1.2 - c.sev))
    side = float(c.rng.choice([-1.0, 1.0]))
    off = t.r * c.u(0.3, 0.8) * min(c.sev, 1.3) * side if displaced else 0.0
    bend = c.u(0.05, 0.25) * min(c.sev, 1.3) * side if displaced else 0.0  # angulation
    # The distal fragment: rotated by `bend` about the fracture point, then shifted sideways.
    cb, sb = math.cos(bend), math.sin(bend)

    def move(x: float, y: float) -> tuple[float, float]:
        return (
            fx + cb * (x - fx) - sb * (y - fy) - ay * off,
            fy + sb * (x - fx) + cb * (y - fy) + ax * off,
        )

    distal = Tube(*move(t.x0, t.y0), *move(t.x1, t.y1), t.r, t.k, t.dens)
    f.fracture = (i, (fx, fy), (nx, ny), width, depth, distal)
    half = t.r / max(abs(math.cos(phi)), 0.5) + abs(off) + abs(bend) * t.r
    lx, ly = -ny, nx
    f.pts += [
        (fx + s * lx * half + w * nx * 2 * width, fy + s * ly * half + w * ny * 2 * width)
        for s in (-1, 1)
        for w in (-1, 1)
    ]
    f.extra_soft.append(
        Tube(
            fx - ax * t.r * 2,
            fy - ay * t.r * 2,
            fx + ax * t.r * 2,
            fy + ay * t.r * 2,
            t.r * 2.4,
            0.0,
            0.5 * c.contrast * min(c.sev, 1.2),
        )
    )
    if c.rng.random() < 0.4 * (1.0 - c.difficulty):  # a cast: a faint wide sleeve
        reach = min(0.3 * c.size, 0.5 * _axis(t)[2])
        f.extra_bone.append(
            Tube(fx - ax * reach, fy - ay * reach, fx + ax * reach, fy + ay * reach,
                 t.r * c.u(2.6, 3.4), 0.88, 0.12)
        )  # fmt: skip


def _plan_hardware(c: _Ctx, f: _Finding) -> None:
    """Saturating metal: a plate with screws, a few screws, or a K-wire across a shaft."""
    (hx, hy), i = c.pick(c.shaft_points())
    t = c.bones[i]
    ax, ay, length = _axis(t)
    ang = math.atan2(ax, -ay)
    p = [0.6, 0.3, 0.1] if c.sev >= 0.9 else [0.4, 0.4, 0.2] if c.sev >= 0.6 else [0.15, 0.45, 0.4]
    style = str(c.rng.choice(["plate", "screws", "wire"], p=p))
    if style == "plate":
        hl = min(0.14 * c.size * max(c.sev, 0.45) * c.u(0.8, 1.2), 0.45 * length)
        hw = max(1.2, 0.4 * t.r)
        side = float(c.rng.choice([-1.0, 1.0]))
        pcx, pcy = hx - ay * side * (t.r + hw), hy + ax * side * (t.r + hw)
        f.metal.append((pcx, pcy, ang, hl, hw))
        k = int(c.rng.integers(3, 7))
        for j in range(k):
            s = -hl + (j + 0.5) * 2 * hl / k
            sx, sy = hx + ax * s - ay * side * 0.1 * t.r, hy + ay * s + ax * side * 0.1 * t.r
            f.metal.append((sx, sy, ang + math.pi / 2, t.r * 1.4, max(0.8, 0.2 * t.r)))
        for cx, cy in ((pcx, pcy), (hx, hy)):
            f.pts += [
                (cx + ax * hl * u - ay * v * t.r * 1.3, cy + ay * hl * u + ax * v * t.r * 1.3)
                for u in (-1, 1)
                for v in (-1, 1)
            ]
        return
    k = 1 if style == "wire" else int(c.rng.integers(1, 4))
    for j in range(k):
        s = (j - (k - 1) / 2) * t.r * 1.8
        tilt = c.u(-0.5, 0.5) + (0.6 if style == "wire" else 0.0)
        hl = t.r * (1.5 if style == "screws" else 3.0) * max(c.sev, 0.6)
        wid = max(0.7, (0.22 if style == "screws" else 0.1) * t.r * max(c.sev, 0.7))
        cx, cy = hx + ax * s, hy + ay * s
        f.metal.append((cx, cy, ang + math.pi / 2 + tilt, hl, wid))
        f.around(cx, cy, hl + 1)


def _plan_degenerative(c: _Ctx, f: _Finding) -> None:
    """Joint-space narrowing (a dense band across the joint) and osteophyte spurs at its rims."""
    if not c.joints:
        _plan_fracture(c, f)
        return
    (jx, jy), ja, hw = c.pick([((j[0], j[1]), j[2], j[3]) for j in c.joints])
    dx, dy = _dir(ja)
    px, py = -dy, dx
    spur = max(1.5, min(0.036 * c.size * c.sev * c.u(0.75, 1.25), 1.3 * hw))
    band = max(1.0, 0.4 * hw * min(c.sev, 1.2))
    f.extra_bone.append(Blob(jx, jy, hw * 0.95, band, math.atan2(dy, dx), 0.0, 1.2 * c.contrast))
    for side in (-1.0, 1.0):
        for along in (-1.0, 1.0):
            if c.rng.random() < 0.3:
                continue
            bx = jx + side * px * hw * 0.95 + along * dx * band
            by = jy + side * py * hw * 0.95 + along * dy * band
            tilt = c.u(0.2, 0.8) * along
            ox, oy = side * px + tilt * dx, side * py + tilt * dy
            n = math.hypot(ox, oy)
            f.extra_bone.append(
                Tube(
                    bx,
                    by,
                    bx + ox / n * spur,
                    by + oy / n * spur,
                    spur * 0.45,
                    0.0,
                    1.5 * c.contrast,
                )
            )
    reach, ext = hw + spur, band + spur
    f.pts += [
        (jx + s * px * reach + t * dx * ext, jy + s * py * reach + t * dy * ext)
        for s in (-1, 1)
        for t in (-1, 1)
    ]


def _plan_lesion(c: _Ctx, f: _Finding) -> None:
    """A round lucent (with a sclerotic rim) or sclerotic spot inside a bone."""
    cands = c.shaft_points(0.15, 0.85) + [((c.bones[i].x, c.bones[i].y), i) for i in c.an.heads]
    (lx, ly), i = c.pick(cands)
    b = c.bones[i]
    bone_r = b.r if isinstance(b, Tube) else min(b.a, b.b)
    jit = c.u(-0.25, 0.25) * bone_r
    rad = max(1.5, min(0.055 * c.size * c.sev * c.u(0.75, 1.3), 2.0 * bone_r))
    lucent = bool(c.rng.random() < 0.65)
    depth = min(0.95, 0.9 * c.contrast * c.u(0.85, 1.1))
    f.lesion = (lx + jit * 0.7, ly + jit * 0.7, rad, lucent, depth)
    f.around(lx + jit * 0.7, ly + jit * 0.7, rad * 1.15)


_PLANNERS = {
    "fracture": _plan_fracture,
    "hardware": _plan_hardware,
    "degenerative": _plan_degenerative,
    "lesion": _plan_lesion,
}


def _draw_lesion(b: np.ndarray, lx: float, ly: float, rad: float, lucent: bool, depth: float):
    box = _box(b.shape, lx - rad * 1.4, lx + rad * 1.4, ly - rad * 1.4, ly + rad * 1.4)
    if not box:
        return
    sl, xs, ys = box
    d = np.sqrt((xs - lx) ** 2 + (ys - ly) ** 2) * (1.0 / rad)
    core = np.sqrt(np.maximum(1.0 - d * d, 0.0))
    if lucent:  # expansile: the sclerotic rim may bulge out of the bone
        rim = np.exp(-(((d - 1.0) / 0.15) ** 2))
        b[sl] *= 1.0 - depth * core
        b[sl] += rim * (0.3 * rad * depth)
    else:
        b[sl] += core * (0.9 * rad * depth)


def _draw_fracture(b: np.ndarray, t: Tube, fr) -> None:
    """Draw bone ``t`` broken: a dark wobbly band across it, the distal fragment displaced."""
    _, (fx, fy), (nx, ny), width, depth, distal = fr
    p = t.r + 1.0
    xs_all = (t.x0, t.x1, distal.x0, distal.x1)
    ys_all = (t.y0, t.y1, distal.y0, distal.y1)
    box = _box(b.shape, min(xs_all) - p, max(xs_all) + p, min(ys_all) - p, max(ys_all) + p)
    if not box:
        return
    sl, xs, ys = box
    s = (xs - fx) * nx + (ys - fy) * ny
    along = (xs - fx) * -ny + (ys - fy) * nx
    s = s + 0.35 * width * np.sin(along * (2.6 / max(t.r, 1.0)))
    mix = np.clip(s + 0.5, 0.0, 1.0)
    v = _tube_val(t, xs, ys) * (1.0 - mix) + _tube_val(distal, xs, ys) * mix
    v *= 1.0 - depth * np.exp(-((s * (1.0 / width)) ** 2))
    b[sl] += v


# ----------------------------------------------------------------------------- image


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    try:
        from scipy.ndimage import gaussian_filter
    except ImportError:  # pragma: no cover - scipy is a dependency of scikit-learn
        k = np.array([1, 4, 6, 4, 1], np.float32) / 16.0
        img = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 0, img)
        return np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 1, img)
    return gaussian_filter(img, sigma, mode="nearest", truncate=3.0)


def _smooth_noise(rng, h: int, w: int, cells: int) -> np.ndarray:
    small = rng.standard_normal((max(2, h // cells), max(2, w // cells)), dtype=np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR))


def _marker(img, rng, avoid) -> None:
    """Stamp a bright block letter L or R near a corner, avoiding the finding's box."""
    h, w = img.shape
    glyph = np.array(
        [[c == "1" for c in row] for row in _GLYPHS[str(rng.choice(["L", "R"]))]], np.float32
    )
    cell = max(1, int(round(min(h, w) * float(rng.uniform(0.045, 0.08)) / 7)))
    g = np.kron(glyph, np.ones((cell, cell), np.float32))
    gh, gw = g.shape
    boxed = rng.random() < 0.4
    pad = cell if boxed else 0
    mx, my = int(w * float(rng.uniform(0.03, 0.1))), int(h * float(rng.uniform(0.03, 0.1)))
    for corner in rng.permutation(4):
        x = mx if corner % 2 == 0 else w - mx - gw
        y = my if corner < 2 else h - my - gh
        if x - pad < 0 or y - pad < 0 or x + gw + pad > w or y + gh + pad > h:
            continue
        if avoid[0] >= 0 and not (
            x + gw + pad < avoid[0]
            or x - pad > avoid[2]
            or y + gh + pad < avoid[1]
            or y - pad > avoid[3]
        ):
            continue
        val = float(rng.uniform(0.85, 1.0))
        if boxed:
            img[y - pad : y + gh + pad, x - pad : x + gw + pad] = float(rng.uniform(0.0, 0.15))
        region = img[y : y + gh, x : x + gw]
        region[:] = region * (1 - g) + val * g
        return


def render(job: ImageJob, seed: int, size: int, difficulty: float):
    """Render one radiograph.

    Args:
        job: What to draw.
        seed: Dataset seed.
        size: Long side in pixels.
        difficulty: 0 (large, high-contrast findings) .. 1 (small, faint findings).

    Returns:
        ``(pixels, visible, bbox)``: a uint8 array (H, W) or (H, W, 3), whether the finding
        was drawn, and its ``(x0, y0, x1, y1)`` box (exclusive ends; -1s if none).
    """
    rng = np.random.default_rng([seed, TAG_IMAGE, job.idx])
    sp = _study_params(seed, job.study_idx)
    view = (sp["view0"] + job.view) % 3
    short = int(round(size * float(rng.uniform(0.6, 1.0))))
    portrait = rng.random() < 0.75
    h, w = (size, short) if portrait else (short, size)
    base = 0.0 if portrait else math.pi / 2 * float(rng.choice([-1.0, 1.0]))
    theta = base + math.radians(float(rng.uniform(-20, 20)))
    scale = size * float(rng.uniform(0.85, 1.1))
    pose = _Pose(
        w / 2 + size * float(rng.uniform(-0.04, 0.04)),
        h / 2 + size * float(rng.uniform(-0.04, 0.04)),
        scale,
        math.cos(theta),
        math.sin(theta),
        sp["side"] * float(rng.choice([-1.0, 1.0], p=[0.2, 0.8])),
    )
    an = _BUILDERS[job.part](sp, view)
    bones = [pose.prim(p) for p in an.bones]
    joints = [(*pose.pt(x, y), pose.ang(a), hw * scale) for x, y, a, hw in an.joints]
    shape = (h, w)

    finding = None
    bbox = (-1, -1, -1, -1)
    if job.finding != "none" and job.visible:
        ease = PART_EASE[job.part]
        ctx = _Ctx(
            np.random.default_rng([seed, TAG_IMAGE, job.idx, 1]),
            an,
            bones,
            joints,
            shape,
            size,
            sev=ease * (0.45 + 2.3 * (1.0 - difficulty)),
            contrast=min(1.0, math.sqrt(ease) * (1.5 - 0.9 * difficulty)),
            difficulty=difficulty,
        )
        finding = _Finding()
        _PLANNERS[job.finding](ctx, finding)
        bbox = finding.bbox(shape)

    soft = np.zeros(shape, np.float32)
    for p in an.soft:
        _add(soft, pose.prim(p))
    bone = np.zeros(shape, np.float32)
    metal = np.zeros(shape, np.float32)
    broken = finding.fracture[0] if finding is not None and finding.fracture else -1
    for i, p in enumerate(bones):
        if i == broken:
            _draw_fracture(bone, p, finding.fracture)
        else:
            _add(bone, p)
    if finding is not None:
        finding.draw(bone, soft, metal)

    tex = _smooth_noise(rng, h, w, max(3, size // 40))
    bone *= 1.0 + 0.12 * tex
    atten = (
        _MU_SOFT * soft * float(rng.uniform(0.7, 1.3)) + _MU_BONE * sp["density"] * bone
    ) / size
    atten *= float(rng.uniform(0.8, 1.25))
    atten += metal
    ramp = np.linspace(-1, 1, h, dtype=np.float32)[:, None] * float(rng.uniform(-0.08, 0.08))
    img = 1.0 - np.exp(-np.maximum(atten, 0.0))
    lo, hi = float(rng.uniform(0.02, 0.12)), float(rng.uniform(0.85, 1.0))
    img = lo + (hi - lo) * img ** float(rng.uniform(0.8, 1.3)) + 0.5 * lo * ramp
    img = _blur(img.astype(np.float32), max(0.35, 0.65 * size / 256))

    if rng.random() < 0.3:  # collimation: a bright or dark frame, never over the finding
        m = [int(d * float(rng.uniform(0.0, 0.12))) for d in (w, h, w, h)]
        x0, y0, x1, y1 = m[0], m[1], w - m[2], h - m[3]
        if bbox[0] >= 0:
            x0, y0, x1, y1 = min(x0, bbox[0]), min(y0, bbox[1]), max(x1, bbox[2]), max(y1, bbox[3])
        val = float(rng.uniform(0.8, 0.97)) if rng.random() < 0.6 else float(rng.uniform(0.0, 0.04))
        frame = np.full(shape, val, np.float32)
        frame[y0:y1, x0:x1] = img[y0:y1, x0:x1]
        img = frame
    if rng.random() < 0.45:
        _marker(img, rng, bbox)
    if rng.random() < 0.1:  # low contrast
        a, c = float(rng.uniform(0.1, 0.3)), float(rng.uniform(0.5, 0.75))
        img = a + (c - a) * img
    img += rng.standard_normal(shape, dtype=np.float32) * float(rng.uniform(0.005, 0.03))
    if rng.random() < 0.05:
        img = 1.0 - img
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.03:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return out, bbox[0] >= 0, bbox


def render_chunk(root: str, jobs: list[ImageJob], seed: int, size: int, difficulty: float):
    """Render and save a list of images below ``root``; return ``[(visible, bbox), ...]``.

    Module-level so that worker processes can run it.
    """
    results = []
    base = Path(root)
    for job in jobs:
        pixels, visible, bbox = render(job, seed, size, difficulty)
        Image.fromarray(pixels).save(
            base / job.rel_path, format="PNG", optimize=False, compress_level=6
        )
        results.append((visible, bbox))
    return results
