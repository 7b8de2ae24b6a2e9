"""Tests of the synthetic MURA-v1.1 generator (small scales and sizes: a few seconds each)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mura_tune.data.synth import synthesize
from mura_tune.errors import ConfigError, DataError

INDEX = Path(__file__).resolve().parents[1] / ".." / "shared" / "mura-v1.1-index"
PATH_RE = re.compile(
    r"^MURA-v1\.1/(train|valid)/XR_(ELBOW|FINGER|FOREARM|HAND|HUMERUS|SHOULDER|WRIST)"
    r"/patient\d{5}/study\d+_(positive|negative)/image\d+\.png$"
)
CSVS = (
    "train_image_paths.csv",
    "valid_image_paths.csv",
    "train_labeled_studies.csv",
    "valid_labeled_studies.csv",
)
# Real MURA-v1.1 study counts per part: (normal, abnormal).
REAL_STUDIES = {
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
REAL_IMAGES = {
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


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """scale 0.02, seed 1, 48 px: the dataset most tests look at."""
    out = tmp_path_factory.mktemp("synth") / "out"
    synthesize(out, scale=0.02, size=48, seed=1, workers=1, progress=False)
    return out


def test_same_seed_is_byte_identical_whatever_the_workers(tmp_path):
    a = synthesize(tmp_path / "a", scale=0.01, size=32, seed=3, workers=1, progress=False)
    b = synthesize(tmp_path / "b", scale=0.01, size=32, seed=3, workers=2, progress=False)
    c = synthesize(tmp_path / "c", scale=0.01, size=32, seed=4, workers=1, progress=False)
    ta, tb, tc = _tree(a.parent), _tree(b.parent), _tree(c.parent)
    assert len(ta) > 100
    assert ta == tb
    assert ta != tc


def test_layout(small):
    root = small / "MURA-v1.1"
    assert {p.name for p in root.glob("*.csv")} == set(CSVS)
    parts_of: dict[tuple[str, str], set[str]] = {}
    for split in ("train", "valid"):
        images = _lines(root / f"{split}_image_paths.csv")
        studies = _lines(root / f"{split}_labeled_studies.csv")
        assert images and studies
        assert not images[0].lower().startswith(("path", "image")), "CSV must have no header"
        labels = {}
        for line in studies:
            d, lab = line.rsplit(",", 1)
            assert d.endswith("/") and lab in ("0", "1")
            assert ("_positive/" in d) == (lab == "1")
            labels[d] = lab
        for p in images:
            m = PATH_RE.match(p)
            assert m and m.group(1) == split, p
            assert p.rsplit("/", 1)[0] + "/" in labels
            with Image.open(small / p) as im:
                assert im.mode in ("L", "RGB")
                assert max(im.size) == 48
            parts_of.setdefault((split, p.split("/")[3]), set()).add(p.split("/")[2])
        assert {p.rsplit("/", 1)[0] + "/" for p in images} == set(labels)
    train = {pat for s, pat in parts_of if s == "train"}
    valid = {pat for s, pat in parts_of if s == "valid"}
    assert train and valid and not train & valid
    assert any(len(v) >= 2 for (s, _), v in parts_of.items() if s == "train")
    assert max(int(p[7:]) for p in train) < min(int(p[7:]) for p in valid)


def test_abnormal_rates_match_mura(small):
    root = small / "MURA-v1.1"
    for split in ("train", "valid"):
        studies = pd.read_csv(root / f"{split}_labeled_studies.csv", header=None, names=["d", "y"])
        studies["part"] = studies.d.str.split("/").str[2]
        images = pd.read_csv(root / f"{split}_image_paths.csv", header=None, names=["p"])
        images["part"] = images.p.str.split("/").str[2]
        images["y"] = images.p.str.contains("_positive/").astype(int)
        for part, (n, a) in REAL_STUDIES[split].items():
            rate = studies[studies.part == part].y.mean()
            assert abs(rate - a / (n + a)) <= 0.05, (split, part, "study", rate)
            ni, ai = REAL_IMAGES[split][part]
            rate = images[images.part == part].y.mean()
            assert abs(rate - ai / (ni + ai)) <= 0.05, (split, part, "image", rate)


def test_sidecar(small):
    df = pd.read_parquet(small / "synth_findings.parquet")
    paths = _lines(small / "MURA-v1.1" / "train_image_paths.csv")
    paths += _lines(small / "MURA-v1.1" / "valid_image_paths.csv")
    assert df.image_path.tolist() == paths
    assert (df.study_id + "/").isin(
        [ln.rsplit(",", 1)[0] for s in ("train", "valid")
         for ln in _lines(small / "MURA-v1.1" / f"{s}_labeled_studies.csv")]
    ).all()  # fmt: skip
    studies = df.groupby("study_id").agg(
        true=("true_label", "first"), label=("label", "first"), shown=("visible", "any")
    )
    assert studies[studies.true == 1].shown.all()
    assert not studies[studies.true == 0].shown.any()
    noise = (studies.true != studies.label).mean()
    assert 0 < noise <= 0.1
    assert set(df.finding) <= {"none", "fracture", "hardware", "degenerative", "lesion"}
    assert ((df.finding == "none") == (df.true_label == 0)).all()
    shown = df[df.visible]
    assert (df[~df.visible][["x0", "y0", "x1", "y1"]] == -1).all().all()
    for row in shown.itertuples():
        with Image.open(small / row.image_path) as im:
            w, h = im.size
        assert 0 <= row.x0 < row.x1 <= w and 0 <= row.y0 < row.y1 <= h, row
    info = (small / "synth_info.json").read_text()
    assert '"seed": 1' in info


@pytest.mark.needs_index
def test_index_reproduces_paths_and_labels(tmp_path):
    if not INDEX.is_dir():
        pytest.skip("needs ../shared/mura-v1.1-index")
    idx = tmp_path / "index"
    idx.mkdir()
    for name in CSVS:
        with open(INDEX / name) as fh:
            head = [next(fh) for _ in range(30)]
        if "image_paths" in name:  # keep only images whose study is among the 30 study lines
            studies = [
                ln.split(",")[0]
                for ln in open(INDEX / name.replace("image_paths", "labeled_studies"))
            ][:30]
            head = [ln for ln in head if ln.rsplit("/", 1)[0] + "/" in studies]
        (idx / name).write_text("".join(head))
    root = synthesize(tmp_path / "out", size=32, seed=0, index=idx, workers=1, progress=False)
    for name in CSVS:
        assert (root / name).read_text() == (idx / name).read_text()
    for split in ("train", "valid"):
        for p in _lines(idx / f"{split}_image_paths.csv"):
            with Image.open(tmp_path / "out" / p) as im:
                assert im.mode in ("L", "RGB")
    df = pd.read_parquet(tmp_path / "out" / "synth_findings.parquet")
    labels = {}
    for split in ("train", "valid"):
        for ln in _lines(idx / f"{split}_labeled_studies.csv"):
            d, y = ln.rsplit(",", 1)
            labels[d.rstrip("/")] = int(y)
    assert (df.label == df.study_id.map(labels)).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"scale": 0}, ConfigError, "--scale must be in (0, 1], got 0"),
        ({"size": 8}, ConfigError, "--size"),
        ({"difficulty": 1.5}, ConfigError, "--difficulty"),
        ({"index": "nowhere"}, DataError, "--index nowhere"),
    ],
)
def test_bad_input(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        synthesize(tmp_path / "out", progress=False, **kwargs)


def test_index_missing_csv(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "valid_image_paths.csv").write_text("")
    with pytest.raises(DataError, match="missing train_image_paths.csv"):
        synthesize(tmp_path / "out", index=tmp_path / "idx", progress=False)


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "MURA-v1.1").mkdir()
    (tmp_path / "MURA-v1.1" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="already exists; choose another --out or delete it"):
        synthesize(tmp_path, scale=0.01, size=32, progress=False)
    assert (tmp_path / "MURA-v1.1" / "keep.txt").read_text() == "x"
