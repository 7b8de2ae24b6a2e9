"""Data layer: the MURA reader, summary counts, patient-disjoint splits, manifests, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import cli, make_tree, placeholder_png
from PIL import Image

from mura_tune.data.images import ImageReadError, letterbox, load_gray, preprocess
from mura_tune.data.mura import read_dataset, read_manifest
from mura_tune.data.split import assign_split
from mura_tune.errors import DataError

# ../shared/MURA.md: per part (train normal, train abnormal, valid normal, valid abnormal) image counts.
MURA_IMAGES = {
    "XR_ELBOW": (2925, 2006, 235, 230),
    "XR_FINGER": (3138, 1968, 214, 247),
    "XR_FOREARM": (1164, 661, 150, 151),
    "XR_HAND": (4059, 1484, 271, 189),
    "XR_HUMERUS": (673, 599, 148, 140),
    "XR_SHOULDER": (4211, 4168, 285, 278),
    "XR_WRIST": (5765, 3987, 364, 295),
}


@pytest.fixture(scope="module")
def index_tree(shared_index, tmp_path_factory):
    """The full 40,005-image MURA-v1.1 tree with placeholder PNGs (hard links)."""
    return make_tree(tmp_path_factory.mktemp("index_tree"), index_dir=shared_index)


@pytest.mark.needs_index
def test_summary_reproduces_mura_counts(index_tree):
    result = cli("data", "summary", "--data", index_tree, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (
        summary["totals"]["train"]["images"] == 36808
        and summary["totals"]["valid"]["images"] == 3197
    )
    assert (
        summary["totals"]["train"]["studies"] == 13457
        and summary["totals"]["valid"]["studies"] == 1199
    )
    assert (
        summary["totals"]["train"]["patients"] == 11184
        and summary["totals"]["valid"]["patients"] == 783
    )
    assert summary["patients_in_several_body_parts"]["train"] == 1467
    assert summary["patients_in_both_splits"] == 0
    assert summary["problems"]["count"] == 0
    by = {(g["source_split"], g["body_part"]): g for g in summary["by_part"]}
    for part, (tn, ta, vn, va) in MURA_IMAGES.items():
        assert (by["train", part]["images_normal"], by["train", part]["images_abnormal"]) == (
            tn,
            ta,
        ), part
        assert (by["valid", part]["images_normal"], by["valid", part]["images_abnormal"]) == (
            vn,
            va,
        ), part


@pytest.mark.needs_index
def test_split_is_patient_disjoint_stratified_and_seeded(index_tree, tmp_path):
    out = tmp_path / "split.parquet"
    result = cli("data", "split", "--data", index_tree, "--out", out, "--seed", "3")
    assert result.returncode == 0, result.stderr
    table = pd.read_parquet(out)
    per_patient = table.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all(), "a patient appears in two of train/val/test"
    studies = table.drop_duplicates("study_id")
    n = studies["split"].value_counts()
    assert abs(n["val"] / (n["val"] + n["train"]) - 0.2) <= 0.01
    assert n["test"] == 1199
    rates = studies[studies["split"] != "test"].pivot_table(
        index="body_part", columns="split", values="label"
    )
    assert ((rates["val"] - rates["train"]).abs() <= 0.03).all(), rates
    # Patients with several body parts stay whole.
    multi = table.groupby("patient_id")["body_part"].nunique()
    assert (
        table[table["patient_id"].isin(multi[multi > 1].index)]
        .groupby("patient_id")["split"]
        .nunique()
        == 1
    ).all()
    # Same seed, identical manifest; another seed, another split.
    again = assign_split(read_dataset(index_tree).table, 0.2, seed=3)
    pd.testing.assert_frame_equal(table, again)
    other = assign_split(read_dataset(index_tree).table, 0.2, seed=4)
    assert not other["split"].equals(table["split"])


def test_reader_accepts_header_rows_and_the_parent_or_release_folder(tmp_path):
    files = {
        "train_image_paths.csv": "path\nMURA-v1.1/train/XR_HAND/patient00001/study1_positive/image1.png\n",
        "train_labeled_studies.csv": "Path,Label\nMURA-v1.1/train/XR_HAND/patient00001/study1_positive/,1\n",
    }
    root = make_tree(tmp_path, files=files)
    for data in (root, root / "MURA-v1.1"):
        table = read_dataset(data).table
        assert table[["study_id", "patient_id", "body_part", "label", "source_split"]].iloc[
            0
        ].tolist() == [
            "MURA-v1.1/train/XR_HAND/patient00001/study1_positive",
            "patient00001",
            "XR_HAND",
            1,
            "train",
        ]


@pytest.mark.parametrize(
    "files, message",
    [
        (
            {
                "train_image_paths.csv": "MURA-v1.1/train/XR_HAND/patient1/study1_positive/image1.png\nMURA-v1.1/train/XR_KNEE/patient2/study1_positive/image1.png\n",
                "train_labeled_studies.csv": "MURA-v1.1/train/XR_HAND/patient1/study1_positive/,1\n",
            },
            "train_image_paths.csv:2: path does not match",
        ),
        (
            {
                "train_image_paths.csv": "MURA-v1.1/train/XR_HAND/patient1/study1_positive/image1.png\n",
                "train_labeled_studies.csv": "MURA-v1.1/train/XR_HAND/patient1/study1_positive/,0\n",
            },
            "train_labeled_studies.csv:1: label 0 contradicts 'positive'",
        ),
        (
            {
                "train_image_paths.csv": "MURA-v1.1/train/XR_HAND/patient1/study1_positive/image1.png\nMURA-v1.1/train/XR_HAND/patient1/study1_positive/image1.png\n",
                "train_labeled_studies.csv": "MURA-v1.1/train/XR_HAND/patient1/study1_positive/,1\n",
            },
            "image listed twice",
        ),
    ],
)
def test_malformed_index_is_one_line_error(tmp_path, files, message):
    root = make_tree(tmp_path, files=files)
    with pytest.raises(DataError, match=message):
        read_dataset(root)
    result = cli("data", "split", "--data", root, "--out", tmp_path / "s.parquet")
    assert result.returncode == 2
    assert message.split(":")[-1].strip() in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_folder_and_folder_without_csvs(tmp_path):
    result = cli("data", "summary", "--data", tmp_path / "nope")
    assert (
        result.returncode == 2
        and "data folder not found" in result.stderr
        and "Traceback" not in result.stderr
    )
    (tmp_path / "MURA-v1.1").mkdir()
    result = cli("data", "summary", "--data", tmp_path)
    assert (
        result.returncode == 2
        and "no index CSVs" in result.stderr
        and str(tmp_path) in result.stderr
    )
    debug = cli("--debug", "data", "summary", "--data", tmp_path)
    assert "Traceback" in debug.stderr


def test_summary_lists_bad_images_by_path(tmp_path):
    lines = [
        f"MURA-v1.1/train/XR_HAND/patient0000{i}/study1_negative/image1.png" for i in range(1, 5)
    ]
    files = {
        "train_image_paths.csv": "\n".join(lines) + "\n",
        "train_labeled_studies.csv": "\n".join(line.rsplit("/", 1)[0] + "/,0" for line in lines)
        + "\n",
    }
    root = make_tree(tmp_path, files=files, images=False)
    placeholder_png(root / lines[0])
    (root / lines[1]).parent.mkdir(parents=True)
    (root / lines[1]).write_bytes(b"")  # zero bytes
    good = (root / lines[0]).read_bytes()
    (root / lines[2]).parent.mkdir(parents=True)
    (root / lines[2]).write_bytes(good[: len(good) // 2])  # truncated
    result = cli("data", "summary", "--data", root, "--json")  # the 4th is missing
    assert result.returncode == 0, result.stderr
    problems = json.loads(result.stdout)["problems"]
    assert problems["count"] == 3
    shown = {p["path"].split("MURA-v1.1/")[1]: (p["kind"], p["detail"]) for p in problems["shown"]}
    assert shown[lines[1][10:]] == ("unreadable", "empty file (0 bytes)")
    assert shown[lines[2][10:]][0] == "unreadable"
    assert shown[lines[3][10:]][0] == "missing"
    text = cli("data", "summary", "--data", root).stdout
    assert "problems: 3" in text and lines[1] in text


def test_manifest_input_relative_paths(tmp_path):
    for i in range(4):
        placeholder_png(tmp_path / "imgs" / f"{i}.png")
    manifest = pd.DataFrame(
        {
            "image_path": [f"imgs/{i}.png" for i in range(4)],
            "study_id": ["s1", "s1", "s2", "s3"],
            "patient_id": ["p1", "p1", "p2", "p3"],
            "body_part": ["CHEST"] * 4,
            "label": [1, 1, 0, 0],
            "source_split": ["train", "train", "train", "valid"],
        }
    )
    manifest.to_csv(tmp_path / "m.csv", index=False)
    table = read_dataset(tmp_path / "m.csv").table
    assert table["image_path"].iloc[0] == str(tmp_path / "imgs" / "0.png")
    manifest.drop(columns="label").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="lacks columns"):
        read_manifest(tmp_path / "bad.csv")


def test_letterbox_keeps_aspect_and_pads_with_zeros():
    img = np.full((20, 10), 200, dtype=np.uint8)
    out = letterbox(img, 20)
    assert out.shape == (20, 20)
    assert (out[:, :5] == 0).all() and (out[:, 15:] == 0).all() and (out[:, 5:15] == 200).all()


def test_image_modes_and_limits(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    Image.fromarray(gray.astype(np.uint16) * 256).save(tmp_path / "i16.png")
    for name in ("rgba", "p", "i16"):
        out = load_gray(tmp_path / f"{name}.png")
        assert out.dtype == np.uint8 and out.shape == (8, 8)
        assert np.corrcoef(out.ravel(), gray.ravel())[0, 1] > 0.99, name
    (tmp_path / "fake.png").write_bytes(b"GIF89a" + b"\0" * 20)
    with pytest.raises(ImageReadError, match="not a PNG"):
        load_gray(tmp_path / "fake.png")
    from mura_tune.data import images

    Image.fromarray(np.zeros((300, 300), dtype=np.uint8)).save(tmp_path / "big.png")
    old = images.MAX_PIXELS
    images.MAX_PIXELS = 10_000
    try:
        with pytest.raises(ImageReadError, match="pixel limit"):
            preprocess(tmp_path / "big.png", 32)
    finally:
        images.MAX_PIXELS = old


def test_own_split_refuses_a_patient_in_val_and_test():
    import pandas as pd

    from mura_tune.data.split import own_split
    from mura_tune.errors import DataError

    rows = [("s1", "p1", "train"), ("s2", "p2", "val"), ("s3", "p2", "test"), ("s4", "p3", "test")]
    table = pd.DataFrame(rows, columns=["study_id", "patient_id", "split"])
    with pytest.raises(DataError, match="patient 'p2' in val and in test"):
        own_split(table)
    assert own_split(table[table["study_id"] != "s3"])["split"].tolist() == ["train", "val", "test"]


def test_a_fold_model_may_keep_its_last_epoch():
    from mura_tune.constants import LAST_EPOCH
    from mura_tune.train.config import TrainConfig

    assert TrainConfig().updated({"select_metric": LAST_EPOCH}).select_metric == "epoch"
