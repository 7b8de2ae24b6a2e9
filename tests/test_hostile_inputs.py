"""Hostile input and cluster misconfiguration (issue 17): nothing hangs, nothing the user asked
for is silently changed, every mistake is one line.

Every case asserts one of two outcomes, as a user meets it (the real CLI, as a subprocess,
wherever the exit code and stderr matter):

* a refusal: a non-zero exit, exactly one stderr line ``mura-tune: error: ...`` naming the flag
  or file, what was asked and what exists, no traceback, no advice to load a file unsafely, and
  nothing written that the corrected command would trip over;
* or, where skipping is the promise, exit 0 with every item left out listed by path and reason.

The fast refusals run as one catalogue (:data:`CASES`, a few subprocesses at a time, like
``test_bad_inputs.py``); searches use tiny images and 1-epoch trials.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import run_cli
from helpers import REPO, cli, make_tree, search_plan
from PIL import Image
from test_bad_inputs import (
    FIRST,
    SECOND,
    STUDIES,
    _study,
    assert_one_line_error,
    bomb_png,
    fill,
    index_files,
    png_bytes,
    replace,
)

UNSAFE = ("weights_only=False", "can still be loaded")
TINY_SEARCH = ["--space", "custom_cnn", "--set", "image_size=32", "--num-samples", "1"]


# ----------------------------------------------------------------------------------- builders
class _Payload:
    """Unpickling this would run code (it touches ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def gray_png(path: Path, height: int = 8, width: int = 8, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width), value, dtype=np.uint8)).save(path)
    return path


def animated_png(path: Path, frames: int = 3) -> Path:
    images = [Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:])
    return path


def write_manifest(path: Path, rows: list[dict], bom: bool = False) -> Path:
    """A manifest CSV with every field quoted (standard CSV), optionally with a byte-order mark."""
    text = pd.DataFrame(rows).to_csv(index=False, quoting=1)  # csv.QUOTE_ALL
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def manifest_rows(root: Path, studies: list[tuple[str, str, str, int]], split=None) -> list[dict]:
    """Two images per ``(study_id, patient_id, source_split, label)`` study, written under ``root``."""
    rows = []
    for i, (study, patient, source, label) in enumerate(studies):
        for view in (1, 2):
            name = f"study {study}, view {view}.png"  # a comma and spaces: quoting matters
            gray_png(root / name, value=20 * i + view)
            row = {"image_path": name, "study_id": study, "patient_id": patient}
            row |= {"body_part": "XR_HAND", "label": label, "source_split": source}
            if split is not None:
                row["split"] = split[i]
            rows.append(row)
    return rows


# Numeric-looking identifiers: "001" and "1" are different studies of different patients.
ID_STUDIES = [
    ("001", "007", "train", 1),
    ("1", "7", "train", 0),
    ("002", "008", "train", 1),
    ("2", "8", "train", 0),
    ("003", "009", "train", 1),
    ("3", "9", "train", 0),
    ("004", "010", "valid", 1),
    ("4", "10", "valid", 0),
]
OWN_SPLIT = ["train", "train", "train", "train", "val", "val", "test", "test"]


def tiny_checkpoint(path: Path) -> Path:
    """A real ``best.pt`` of a tiny custom CNN (16 px), written without training."""
    from mura_tune.train.checkpoint import save_checkpoint
    from mura_tune.train.config import TrainConfig
    from mura_tune.train.models import build_model

    config = TrainConfig(image_size=16, depth=2, base_filters=4)
    return save_checkpoint(path, build_model(config), config, 1, {"val_kappa_study": 0.0})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def not_ray_listener() -> int:
    """A port that accepts TCP connections and never says a word (not a Ray cluster)."""
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(64)

    def accept_and_hold(held=[]):  # noqa: B006 (the connections stay open)
        while True:
            held.append(server.accept())

    threading.Thread(target=accept_and_hold, daemon=True).start()
    return server.getsockname()[1]


@pytest.fixture(scope="module")
def h(tmp_path_factory) -> dict[str, Path]:
    """Every folder and file the cases need (built in about a second)."""
    import torch

    root = tmp_path_factory.mktemp("hostile")
    paths: dict[str, Path] = {"tmp": root, "results": root / "results"}
    paths["good"] = make_tree(root / "good", files=index_files(STUDIES))
    # Index CSVs as other tools write them: quoted fields, a UTF-8 byte-order mark.
    files = index_files(STUDIES)
    quoted = {
        name: "".join(
            ",".join(f'"{field}"' for field in line.split(",")) + "\n" for line in text.splitlines()
        )
        for name, text in files.items()
    }
    paths["quoted"] = make_tree(root / "quoted", files=quoted)
    for name in ("train_image_paths.csv", "train_labeled_studies.csv"):
        target = paths["quoted"] / "MURA-v1.1" / name
        target.write_bytes(b"\xef\xbb\xbf" + target.read_bytes())
    # A labeled study whose images are not listed.
    lonely = ("train", "XR_HAND", 77, True)
    files = index_files(STUDIES)
    files["train_labeled_studies.csv"] += f"{_study(*lonely)}/,1\n"
    paths["no_images"] = make_tree(root / "no_images", files=files)
    paths["lonely_study"] = Path(_study(*lonely))
    # Manifests: numeric-looking ids (quoted, BOM), their own split, a bad split, a leak, a missing file.
    folder = root / "manifests"
    paths["ids"] = write_manifest(folder / "ids.csv", manifest_rows(folder, ID_STUDIES), bom=True)
    paths["own_split"] = write_manifest(
        folder / "own_split.csv", manifest_rows(folder, ID_STUDIES, OWN_SPLIT)
    )
    bad = OWN_SPLIT[:-1] + ["validation"]
    paths["bad_split"] = write_manifest(
        folder / "bad_split.csv", manifest_rows(folder, ID_STUDIES, bad)
    )
    leak = [(s, "007" if s == "002" else p, src, y) for s, p, src, y in ID_STUDIES]
    paths["leak"] = write_manifest(
        folder / "leak.csv", manifest_rows(folder, leak, OWN_SPLIT[:2] + ["val"] + OWN_SPLIT[3:])
    )
    rows = manifest_rows(folder, ID_STUDIES)
    rows[0] = {**rows[0], "image_path": "gone.png"}
    paths["missing_file"] = write_manifest(folder / "missing_file.csv", rows)
    paths["gone"] = folder / "gone.png"
    # Images past a limit: an extreme aspect ratio, a side too long (tiny pixel count), animated.
    paths["odd"] = make_tree(root / "odd", files=index_files(STUDIES))
    odd = {
        "thin": png_bytes(Image.fromarray(np.full((2, 300), 90, dtype=np.uint8))),
        "long side": bomb_png(20_000, 2),
        "animated": b"",
    }
    paths["odd_images"] = {}
    for (kind, data), rel in zip(odd.items(), (FIRST, SECOND, f"{_study(*STUDIES[2])}/image1.png")):
        target = paths["odd"] / rel
        replace(target, data)
        if kind == "animated":
            target.unlink()
            animated_png(target)
        paths["odd_images"][kind] = target
    paths["thin"] = paths["odd_images"]["thin"]
    # Checkpoints: a real one, a plain state dict, one that would run code when unpickled.
    paths["ckpt"] = tiny_checkpoint(root / "best.pt")
    torch.save({"weight": torch.zeros(3)}, root / "plain.pt")
    paths["plain_ckpt"] = root / "plain.pt"
    paths["marker"] = root / "pwned"
    torch.save({"state_dict": {}, "config": _Payload(paths["marker"])}, root / "evil.pt")
    paths["evil_ckpt"] = root / "evil.pt"
    torch.save({"conv.weight": _Payload(paths["marker"])}, root / "evil.pth")
    paths["evil_weights"] = root / "evil.pth"
    # Predictions: out of range, NaN, duplicated, and a valid quoted submission with a BOM.
    valid = [s for s in STUDIES if s[0] == "valid"]
    images = [f"{_study(*s)}/image{v}.png" for s in valid for v in (1, 2)]
    preds = pd.DataFrame({"image_path": [str(paths["good"] / i) for i in images], "prob": 0.5})
    paths["range"] = root / "range.csv"
    preds.assign(prob=[1.5, -0.5] + [0.5] * (len(preds) - 2)).to_csv(paths["range"], index=False)
    paths["nan"] = root / "nan.csv"
    preds.assign(prob=[np.nan] + [0.5] * (len(preds) - 1)).to_csv(paths["nan"], index=False)
    paths["dup"] = root / "dup.csv"
    pd.concat([preds, preds.iloc[[1]]]).to_csv(paths["dup"], index=False)
    paths["sub_high"] = root / "sub_high.csv"
    paths["sub_high"].write_text(
        "".join(f"{_study(*s)}/,{1.7 if i == 1 else 0.5}\n" for i, s in enumerate(valid))
    )
    paths["sub_quoted"] = root / "sub_quoted.csv"
    paths["sub_quoted"].write_bytes(
        b"\xef\xbb\xbf" + "".join(f'"{_study(*s)}/","0.6"\n' for s in valid).encode()
    )
    # Cluster misconfiguration: nothing at a port; a port that is not Ray's.
    paths["closed_port"] = free_port()
    paths["not_ray_port"] = not_ray_listener()
    # An experiment another driver is running (this process holds its claim while the module runs).
    running = root / "results" / "running"
    search_plan(running, name="running", num_samples=1, max_epochs=1, scopes={"all": 1}).save()
    holder = open(running / ".driver.lock", "w")  # noqa: SIM115 (held until the module ends)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    )
    holder.flush()
    paths["running"] = running
    yield paths
    holder.close()


# ----------------------------------------------------------------------------------- the catalogue
SEARCH = [*TINY_SEARCH, "--data", "{good}", "--results", "{results}"]
# (id, argv with {name} placeholders for ``h``, phrases the one error line must contain)
# fmt: off
CASES = [
    # --- 1. fail fast on what can never run (answered in seconds; nothing written)
    ("more CPUs per trial than the machine has", [*SEARCH, "--name", "cpus", "--cpus-per-trial", "64"],
     ["--cpus-per-trial 64", "no trial could ever start", "this machine has"]),
    ("more GPUs per trial than the machine has", [*SEARCH, "--name", "gpus", "--gpus-per-trial", "64"],
     ["--gpus-per-trial 64", "asks for 64 GPU(s)", "this machine has"]),
    ("unreachable --address", [*SEARCH, "--name", "addr", "--address", "127.0.0.1:{closed_port}"],
     ["--address 127.0.0.1:{closed_port}", "nothing answers within 5 s"]),
    ("--address that is not a Ray cluster", [*SEARCH, "--name", "notray", "--address", "127.0.0.1:{not_ray_port}"],
     ["--address 127.0.0.1:{not_ray_port}", "does not answer as a Ray cluster"]),
    ("malformed --address", [*SEARCH, "--name", "badaddr", "--address", "nonsense"],
     ["--address nonsense", "Invalid address format"]),
    # --- 2. what the user fixes stays fixed
    ("--max-epochs 1 --set max_epochs=3", [*SEARCH, "--name", "ep", "--max-epochs", "1", "--set", "max_epochs=3"],
     ["--set max_epochs=3 conflicts with --max-epochs 1", "ASHA's max_t"]),
    ("--set seed=3 against --seed 0", [*SEARCH, "--name", "seed", "--set", "seed=3"],
     ["--set seed=3 conflicts with --seed 0", "pass --seed 3"]),
    ("--set body_part against --body-part", [*SEARCH, "--name", "part", "--body-part", "XR_WRIST", "--set", "body_part=XR_HAND"],
     ["--set body_part=XR_HAND conflicts with --body-part XR_WRIST"]),
    ("mistyped --set field (search)", [*SEARCH, "--name", "typo", "--set", "dropuot=0.1"],
     ["--set dropuot: not a config field", "did you mean 'dropout'"]),
    ("mistyped select_metric", ["train", "--data", "{good}", "--out", "{tmp}/run", "--set", "select_metric=val_kapa"],
     ["select_metric must be a metric a run reports on val", "did you mean 'val_kappa_study'"]),
    # --- 3. one experiment, one driver
    ("a search on the name of a running experiment", [*SEARCH, "--name", "running"],
     ["experiment 'running' is being run by another driver", f"pid {os.getpid()}"]),
    ("--resume of a running experiment", ["--space", "custom_cnn", "--results", "{results}", "--name", "running", "--resume"],
     ["experiment 'running' is being run by another driver", "choose another --name"]),
    # --- 4. read data as written
    ("manifest split column with an unknown value", ["data", "split", "--data", "{bad_split}", "--out", "{tmp}/s.parquet"],
     ["{bad_split} row 16", "split must be train, val or test", "'validation'"]),
    ("manifest split column with a patient on both sides", ["data", "split", "--data", "{leak}", "--out", "{tmp}/s.parquet"],
     ["patient '007' in train and in val", "patient-disjoint"]),
    # --- 5. validate the outputs you are given
    ("evaluate: image probabilities outside [0, 1] that average inside", ["evaluate", "--data", "{good}", "--predictions", "{range}"],
     ["{range} line 2", "prob must be in [0, 1]", "'1.5'", "2 such row(s)"]),
    ("evaluate: NaN probability", ["evaluate", "--data", "{good}", "--predictions", "{nan}"],
     ["{nan} line 2", "prob must be in [0, 1]"]),
    ("evaluate: duplicated image rows", ["evaluate", "--data", "{good}", "--predictions", "{dup}"],
     ["{dup} line 10", "image listed twice (line 3 too)"]),
    ("evaluate: submission probability 1.7", ["evaluate", "--data", "{good}", "--predictions", "{sub_high}"],
     ["{sub_high} line 2", "prob must be in [0, 1], got '1.7'"]),
    # --- 6. decode defensively (one image: nothing else to draw, so a one-line refusal)
    ("cam of an extreme-aspect image", ["cam", "--checkpoint", "{ckpt}", "--image", "{thin}", "--out", "{tmp}/thin-cam.png"],
     ["cannot read image {thin}", "300x2 has an aspect ratio beyond 20:1"]),
    # --- impossible values and files not written by train: one line, no traceback
    ("search --seed -1", [*SEARCH, "--name", "neg", "--seed", "-1"],
     ["--seed", "got -1"]),
    ("train --set seed=-1", ["train", "--data", "{good}", "--out", "{tmp}/run", "--set", "seed=-1"],
     ["seed must be in [0, 2**32), got -1"]),
    ("pretrain --seed -1", ["pretrain", "--data", "{good}", "--out", "{tmp}/w.safetensors", "--seed", "-1"],
     ["--seed", "got -1"]),
    ("train --set lr=.inf", ["train", "--data", "{good}", "--out", "{tmp}/run", "--set", "lr=.inf"],
     ["lr must be a finite number, got inf"]),
    ("train --set weight_decay=.nan", ["train", "--data", "{good}", "--out", "{tmp}/run", "--set", "weight_decay=.nan"],
     ["weight_decay must be a finite number, got nan"]),
    ("train --set image_size=100000", ["train", "--data", "{good}", "--out", "{tmp}/run", "--set", "image_size=100000"],
     ["image_size must be <= 2048, got 100000"]),
    ("cam with a plain state dict", ["cam", "--checkpoint", "{plain_ckpt}", "--image", "{good}/" + FIRST],
     ["{plain_ckpt} is not a checkpoint written by `mura-tune train`", "['weight']"]),
    ("cam with a checkpoint that would run code", ["cam", "--checkpoint", "{evil_ckpt}", "--image", "{good}/" + FIRST],
     ["refusing checkpoint {evil_ckpt}", "weights_only=True"]),
]
# fmt: on
#: Refusals that must come in seconds, not minutes (Ray's own loops wait forever).
TIMED = {
    "more CPUs per trial than the machine has",
    "more GPUs per trial than the machine has",
    "unreachable --address",
    "--address that is not a Ray cluster",
}  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(h, request) -> dict[str, tuple[subprocess.CompletedProcess, float]]:
    """Run the selected cases a few at a time; each result comes with its wall time."""
    selected = {
        item.callspec.id
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_hostile_input_gives_one_line"
    }

    def run(argv):
        started = time.monotonic()
        result = cli(*[fill(a, h) for a in argv], timeout=300)
        return result, time.monotonic() - started

    todo = [(case[0], case[1]) for case in CASES if case[0] in selected]
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip([c for c, _ in todo], pool.map(run, [argv for _, argv in todo])))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case_id, phrases", [pytest.param(c[0], c[2], id=c[0]) for c in CASES])
def test_hostile_input_gives_one_line(h, outcomes, case_id, phrases):
    result, wall = outcomes[case_id]
    line = assert_one_line_error(result, [fill(p, h) for p in phrases])
    assert result.returncode == 2
    assert not any(advice in line for advice in UNSAFE), line  # no risky advice, ever
    assert not h["marker"].exists()
    if case_id in TIMED:
        assert wall < 45, f"{case_id} took {wall:.0f} s"
    # Nothing written that the corrected command would trip over.
    for name in ("cpus", "gpus", "addr", "notray", "badaddr", "ep", "seed", "part", "typo", "neg"):
        assert not (h["results"] / name).exists(), name


# ----------------------------------------------------------------------------------- exit 0, listed
def assert_listed(result: subprocess.CompletedProcess, phrases: list[str]) -> str:
    """Exit 0, no traceback, no error line, and every phrase in what the user sees."""
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "mura-tune: error" not in result.stderr
    seen = result.stdout + result.stderr
    for phrase in phrases:
        assert phrase in seen, f"{phrase!r} not in:\n{seen}"
    return seen


def test_numeric_looking_ids_stay_strings(h):
    """Study "001" and "1" (of patients "007" and "7") are two studies, read from a quoted CSV
    with a byte-order mark; before, they merged into study 1 (and the labels then clashed)."""
    out = h["tmp"] / "ids.parquet"
    assert_listed(cli("data", "split", "--data", h["ids"], "--out", out), ["wrote"])
    table = pd.read_parquet(out)
    assert sorted(table["study_id"].unique()) == sorted(s for s, *_ in ID_STUDIES)
    assert set(table["patient_id"]) == {p for _, p, *_ in ID_STUDIES}
    assert table.groupby("study_id")["label"].first().to_dict() == {
        s: y for s, _, _, y in ID_STUDIES
    }
    assert all(Path(p).exists() for p in table["image_path"])  # "study 001, view 1.png": quoting


def test_manifest_split_column_is_used_not_resplit(h):
    out = h["tmp"] / "own.parquet"
    seen = assert_listed(
        cli("data", "split", "--data", h["own_split"], "--out", out, "--seed", "5"),
        ["using the data's own split column", "it is not re-split"],
    )
    assert "mura-tune: error" not in seen
    table = pd.read_parquet(out)
    got = table.groupby("study_id")["split"].first().to_dict()
    assert got == {s: split for (s, *_), split in zip(ID_STUDIES, OWN_SPLIT)}


def test_quoted_index_with_bom_reads_as_written(h):
    out = h["tmp"] / "quoted.parquet"
    result = cli("data", "split", "--data", h["quoted"], "--out", out)
    assert_listed(result, ["wrote"])
    assert result.stderr.strip() == ""
    plain = h["tmp"] / "plain.parquet"
    assert_listed(cli("data", "split", "--data", h["good"], "--out", plain), ["wrote"])
    columns = ["study_id", "patient_id", "label", "split"]
    a = pd.read_parquet(out)[columns].sort_values("study_id").reset_index(drop=True)
    b = pd.read_parquet(plain)[columns].sort_values("study_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_labeled_study_without_images_is_reported(h):
    out = h["tmp"] / "lonely.parquet"
    result = cli("data", "split", "--data", h["no_images"], "--out", out)
    assert_listed(
        result, [str(h["lonely_study"]), "labeled study has no image in train_image_paths.csv"]
    )
    warning = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith(
        "mura-tune: 1 labeled stud(ies) without images"
    )
    assert str(h["lonely_study"]) not in set(pd.read_parquet(out)["study_id"])
    summary = json.loads(
        cli("data", "summary", "--data", h["no_images"], "--json", "--no-image-check").stdout
    )
    kinds = {p["kind"] for p in summary["problems"]["shown"]}
    assert "study_without_images" in kinds


def test_manifest_row_whose_file_is_missing_is_listed(h):
    result = cli("data", "cache", "--data", h["missing_file"], "--size", "16")
    assert_listed(result, [f"unreadable: {h['gone']}: file not found", "1 unreadable"])


def test_images_past_a_limit_are_listed_not_fatal(h):
    summary = json.loads(cli("data", "summary", "--data", h["odd"], "--json").stdout)
    problems = {p["path"]: p["detail"] for p in summary["problems"]["shown"]}
    odd = h["odd_images"]
    assert problems[str(odd["thin"])] == "300x2 has an aspect ratio beyond 20:1"
    assert problems[str(odd["long side"])] == "20000x2 exceeds the 10,000-pixel limit per side"
    assert problems[str(odd["animated"])] == "animated PNG (3 frames): a radiograph has one"
    result = cli("data", "cache", "--data", h["odd"], "--size", "16")
    assert_listed(result, [f"unreadable: {path}" for path in odd.values()])


@pytest.mark.slow  # one real training run
def test_train_skips_extreme_images(h, tmp_path):
    """Before: a 1 x 1,000,000 image passed the pixel limit and crashed caching with a 931 GiB
    allocation. Now every image past a limit is skipped and listed, and training runs."""
    out = tmp_path / "run"
    result = cli("train", "--data", h["odd"], "--out", out, "--set", "image_size=16",
                 "--set", "max_epochs=1", "--set", "depth=2", "--set", "batch_size=8")  # fmt: skip
    assert_listed(result, ["skipped 3 unreadable image(s)"])
    skipped = pd.read_parquet(out / "skipped_images.parquet")
    assert set(skipped["image_path"]) == {str(p) for p in h["odd_images"].values()}
    assert (out / "best.pt").exists()


def test_train_that_diverges_is_one_line(h, tmp_path):
    """Before: a traceback (TrialDiverged). Now exit 1, one line naming the epoch and summary.json."""
    out = tmp_path / "run"
    result = cli("train", "--data", h["good"], "--out", out, "--set", "lr=1e37", "--set", "image_size=16",
                 "--set", "max_epochs=1", "--set", "depth=2", "--set", "base_filters=4")  # fmt: skip
    assert_one_line_error(
        result, ["training diverged", "at epoch 1", str(out / "summary.json"), "try a lower lr"]
    )
    assert result.returncode == 1
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


def test_cam_study_skips_an_unreadable_view(h, tmp_path):
    study = tmp_path / "study1_positive"
    gray_png(study / "image1.png", 40, 30)
    (study / "image2.png").write_bytes(h["thin"].read_bytes())
    result = cli("cam", "--checkpoint", h["ckpt"], "--study", study, "--out", tmp_path / "cams")
    seen = assert_listed(
        result, ["skipped a view", str(study / "image2.png"), "aspect ratio beyond 20:1"]
    )
    assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1, seen
    assert (tmp_path / "cams" / "image1.png").exists()
    assert not (tmp_path / "cams" / "image2.png").exists()


def test_predict_lists_every_file_it_leaves_out(h, tmp_path):
    """A predict folder: a PNG, a JPEG, a text file, an animated PNG and an extreme-aspect one."""
    from mura_tune.io import write_json

    ensemble = tmp_path / "ensemble"
    member = {"trial_id": "t1", "checkpoint_path": str(h["ckpt"]), "weight": 1.0}
    write_json(ensemble / "manifest.json", {
        "name": "e", "experiment": str(tmp_path), "settings": {}, "routing": {}, "baselines": {},
        "ensembles": {"generalist": {"members": [member]}},
    })  # fmt: skip
    study = tmp_path / "new" / "XR_HAND" / "patient1" / "study1"
    gray_png(study / "image1.png", 30, 20)
    (study / "image2.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 32)
    (study / "notes.txt").write_text("left for a colleague\n")
    animated_png(study / "image3.png")
    (study / "image4.png").write_bytes(h["thin"].read_bytes())
    out = tmp_path / "p.csv"
    result = cli("predict", "--ensemble", ensemble, "--data", tmp_path / "new", "--out", out)
    assert_listed(result, ["skipped 4 unreadable image(s)", "predicted 1 studies (1 images)"])
    skipped = pd.read_csv(tmp_path / "p.skipped.csv")
    reasons = dict(zip(skipped["image_path"], skipped["reason"]))
    assert reasons == {
        str(study / "image2.jpg"): "not a PNG (.jpg): only PNG radiographs are read",
        str(study / "notes.txt"): "not a PNG (.txt): only PNG radiographs are read",
        str(study / "image3.png"): "animated PNG (3 frames): a radiograph has one",
        str(study / "image4.png"): "300x2 has an aspect ratio beyond 20:1",
    }


def test_evaluate_reads_a_quoted_submission_with_bom(h):
    result = cli("evaluate", "--data", h["good"], "--predictions", h["sub_quoted"], "--json")
    assert_listed(result, [])
    assert json.loads(result.stdout)["n_studies"] == 4


# ----------------------------------------------------------------------------------- one driver
@pytest.mark.slow  # two drivers; the winner starts its own Ray before it is stopped
@pytest.mark.timeout(600)
def test_two_same_name_searches_started_together(tiny_data, tmp_path):
    """Both start at the same instant: one runs, the other is refused in one line. Before, both
    ran in one folder, duplicated each other's trials, and one then reported it was interrupted."""
    argv = [sys.executable, "-m", "mura_tune", *TINY_SEARCH, "--data", str(tiny_data),
            "--results", str(tmp_path), "--name", "twin", "--max-epochs", "1", "--cpus-per-trial", "1"]  # fmt: skip
    procs = [
        subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 300
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        done = [p for p in procs if p.poll() is not None]
        assert len(done) == 1, "neither driver was refused (or both ended at once)"
        loser, winner = done[0], next(p for p in procs if p is not done[0])
        result = subprocess.CompletedProcess(loser.args, loser.returncode, *loser.communicate())
        assert_one_line_error(result, ["experiment 'twin' is being run by another driver"])
        assert winner.poll() is None  # the other one runs on, alone
        assert json.loads((tmp_path / "twin" / "experiment.json").read_text())["name"] == "twin"
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
            proc.stdout.close()
            proc.stderr.close()


def test_claim_without_file_locks(tmp_path, monkeypatch):
    """On a filesystem without locks the claim is an exclusive create: a second claim is refused,
    and a claim left by a dead driver of this machine is taken over."""
    import errno

    from mura_tune.errors import ExperimentError
    from mura_tune.layout import ExperimentDir
    from mura_tune.search import preflight

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(preflight.fcntl, "flock", no_locks)
    exp = ExperimentDir(tmp_path / "x")
    with preflight.claim_experiment(exp, "x"):
        claim = exp.path / ".driver.lock.claim"
        assert json.loads(claim.read_text())["pid"] == os.getpid()
        with pytest.raises(ExperimentError, match="'x' is being run by another driver"):
            with preflight.claim_experiment(exp, "x"):
                pass
    assert not claim.exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    claim.write_text(
        json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": 0})
    )
    with preflight.claim_experiment(exp, "x"):
        assert json.loads(claim.read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------------- fixed stays fixed
def test_fixed_dimension_is_never_proposed():
    """The space function sees the fixed value (conditional code follows it); Optuna registers
    nothing for it, through TPE's proposals too; the sampler still pickles for Ray."""
    import pickle

    from mura_tune.search.spaces import get_space

    space = get_space("custom_cnn")
    sample = pickle.loads(
        pickle.dumps(space.sampler_fn("cpu", fixed={"depth": 5, "image_size": 32}))
    )
    study = optuna.create_study(
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3), direction="maximize"
    )
    for i in range(8):
        trial = study.ask()
        sample(trial)
        study.tell(trial, float(i % 3))
    assert all("depth" not in t.params and "depth" not in t.distributions for t in study.trials)
    assert all("spatial_dropout" in t.params for t in study.trials)  # depth 5 >= 4: conditional on
    assert "depth" not in space.dimensions(fixed={"depth": 5})


def test_set_of_a_flag_field_is_adopted_or_refused():
    from mura_tune.errors import ConfigError
    from mura_tune.search.plan import SearchPlan

    plan = SearchPlan(space="custom_cnn", overrides={"max_epochs": 2, "depth": 3}, name="x")
    assert plan.max_epochs == 2 and plan.fixed["max_epochs"] == 2  # ASHA's max_t agrees
    assert plan.fixed_dimensions == {"depth": 3}
    with pytest.raises(ConfigError, match="--set max_epochs must be an integer >= 1"):
        SearchPlan(space="custom_cnn", overrides={"max_epochs": 0}, name="x")


def test_val_metric_names_match_what_a_run_reports():
    from mura_tune.constants import VAL_METRICS
    from mura_tune.metrics import split_metrics

    images = pd.DataFrame({"study_id": ["a", "b", "c", "d"], "body_part": ["XR_HAND", "XR_HAND", "XR_WRIST", "XR_WRIST"],
                           "label": [0, 1, 0, 1], "prob": [0.2, 0.7, 0.4, 0.9]})  # fmt: skip
    assert set(split_metrics(images, "val")) <= set(VAL_METRICS)


@pytest.mark.slow  # a real 3-trial search on the session's Ray
@pytest.mark.timeout(600)
def test_fixed_searched_field_stays_fixed(tiny_data, ray_session, tmp_path):
    """``--set depth=2`` on a space that searches depth: TPE never proposes depth, every trial
    trains depth 2, and the leaderboard and experiment.json show it fixed. Before, the trials
    still searched depth while experiment.json recorded depth=2."""
    code = run_cli(*TINY_SEARCH[:-1], "3", "--data", tiny_data, "--results", tmp_path, "--name", "fixed",
                   "--set", "depth=2", "--max-epochs", "1", "--cpus-per-trial", "1", "--max-concurrent", "2")  # fmt: skip
    assert code == 0
    exp = tmp_path / "fixed"
    study = optuna.load_study(study_name="fixed:all", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.trials) == 3
    assert all("depth" not in t.params and "spatial_dropout" not in t.params for t in study.trials)
    assert all(len(t.params) >= 5 for t in study.trials)  # the other dimensions are still searched
    board = pd.read_parquet(exp / "leaderboard.parquet")
    assert (board["hp_depth"] == 2).all() and len(board) == 3
    for trial_dir in map(Path, board["trial_dir"]):
        assert "depth: 2\n" in (trial_dir / "config.yaml").read_text()
    plan = json.loads((exp / "experiment.json").read_text())
    assert plan["fixed_dimensions"] == {"depth": 2} and plan["overrides"]["depth"] == 2


# ----------------------------------------------------------------------------------- resources on a cluster
@pytest.mark.slow  # needs the session's Ray (2 CPUs)
def test_trial_larger_than_every_node_is_refused(ray_session, tmp_path, capsys):
    started = time.monotonic()
    code = run_cli(*TINY_SEARCH, "--results", tmp_path, "--name", "big", "--cpus-per-trial", "3")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--cpus-per-trial 3: no trial could ever start" in err
    assert "the largest node of the Ray cluster has 2" in err
    assert time.monotonic() - started < 45 and not (tmp_path / "big").exists()


# ----------------------------------------------------------------------------------- a failed search fails
@pytest.mark.slow  # a real search whose one trial fails
@pytest.mark.timeout(600)
def test_search_where_every_trial_failed_exits_non_zero(tiny_data, tmp_path):
    """Before: exit 0, and Ray's tracebacks on the terminal. Now: exit 1, one line pointing at
    the trials' error files, Ray's log (with the tracebacks) in the experiment folder."""
    result = cli(*TINY_SEARCH, "--data", tiny_data, "--results", tmp_path, "--name", "doomed",
                 "--max-epochs", "1", "--cpus-per-trial", "1", "--max-failures", "0",
                 env={"MURA_TUNE_FAULT": "raise@1"})  # fmt: skip
    exp = tmp_path / "doomed"
    line = assert_one_line_error(result, ["no trial of experiment 'doomed' finished", "1 ERROR",
                                          "trial failure injected", f"{exp}/trials/<id>/error.json",
                                          f"{exp}/ray.log"])  # fmt: skip
    assert result.returncode == 1, line
    assert "Traceback" in (exp / "ray.log").read_text()
    assert len(list(exp.glob("trials/*/error.json"))) == 1


# ----------------------------------------------------------------------------------- damaged files
def fabricate_trial(exp: Path, trial_id: str, kappa: float) -> Path:
    """A finished trial written by hand: trial.json, summary.json, metrics and predictions."""
    trial = exp / "trials" / trial_id
    trial.mkdir(parents=True)
    (trial / "trial.json").write_text(json.dumps(
        {"trial_id": trial_id, "space": "custom_cnn", "scope": "all", "params": {"lr": 0.001}}
    ))  # fmt: skip
    (trial / "summary.json").write_text(json.dumps({"status": "completed", "epochs": 1}))
    pd.DataFrame({"epoch": [1], "best_epoch": [1], "val_kappa_study": [kappa], "val_auc": [0.6],
                  "val_loss": [0.7], "epoch_seconds": [1.0]}).to_parquet(trial / "metrics.parquet")  # fmt: skip
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 8)
    pd.DataFrame({
        "image_path": [f"i{i}.png" for i in range(16)], "study_id": [f"s{i}" for i in range(16)],
        "body_part": "XR_HAND", "label": labels, "split": ["val"] * 8 + ["test"] * 8,
        "prob": np.clip(labels * 0.5 + rng.random(16) * 0.5, 0, 1),
    }).to_parquet(trial / "predictions.parquet")  # fmt: skip
    return trial


def test_damaged_trial_files_are_reported_the_others_rank(tmp_path):
    """A trial with a truncated metrics.parquet and one with a truncated trial.json: both appear
    as DAMAGED naming the file; the healthy trial ranks first. Before: a traceback."""
    exp = tmp_path / "exp"
    fabricate_trial(exp, "good", 0.4)
    cut = fabricate_trial(exp, "cut", 0.9) / "metrics.parquet"
    cut.write_bytes(cut.read_bytes()[:40])
    broken = fabricate_trial(exp, "broken", 0.9) / "trial.json"
    broken.write_text(broken.read_text()[:25])
    result = cli("leaderboard", "--experiment", exp)
    assert_listed(result, ["3 trials", "DAMAGED 2"])
    board = pd.read_parquet(exp / "leaderboard.parquet").set_index("trial_id")
    assert board.loc["good", "rank"] == 1 and board.loc["good", "val_kappa_study"] == pytest.approx(
        0.4
    )
    assert board.loc["cut", "status"] == "DAMAGED" and str(cut) in board.loc["cut", "reason"]
    assert (
        board.loc["broken", "status"] == "DAMAGED" and str(broken) in board.loc["broken", "reason"]
    )
    assert board.loc[["cut", "broken"], "val_kappa_study"].isna().all()

    from mura_tune.report.html import write_report

    assert write_report(exp).exists()  # the report is written around the damaged trials


def test_ensemble_skips_a_damaged_predictions_file(tmp_path):
    from ensemble_fixtures import make_experiment

    from mura_tune.ensemble.build import build_ensemble

    fake = make_experiment(tmp_path)
    preds = fake.exp / "trials" / "g1" / "predictions.parquet"
    preds.write_bytes(preds.read_bytes()[:100])
    out = build_ensemble(fake.exp, out_root=tmp_path / "ensembles", n_boot=20)
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {s["trial_id"]: s["reason"] for s in manifest["skipped"]}
    assert reasons["g1"].startswith(f"damaged predictions file {preds}")
    chosen = {m["trial_id"] for e in manifest["ensembles"].values() for m in e.get("members", [])}
    assert "g1" not in chosen and chosen


# ----------------------------------------------------------------------------------- cache, advice
def test_interrupted_cache_builds_are_removed(tmp_path):
    """``<key>.partial-<pid>`` of a build that died is removed by the next run; one whose build is
    still at work (its key's lock held) is left alone."""
    from mura_tune.data.cache import build_cache

    images = [str(gray_png(tmp_path / "img" / f"{i}.png")) for i in range(3)]
    root = tmp_path / "cache"
    root.mkdir()
    dead = root / "aaaa-16px.partial-999999"
    busy = root / "bbbb-16px.partial-1"
    for folder in (dead, busy):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"\0" * 64)
    with open(root / ".bbbb-16px.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a builder at work
        cache = build_cache(images, 16, root=root, workers=1, progress=False)
        assert not dead.exists() and busy.exists()
    assert len(cache.index) == 3 and busy.exists()


def test_training_from_weights_that_would_run_code(h, tmp_path):
    """One error line (a notice that the file lists no training images may precede it), no
    traceback, no advice to load the file unsafely, and the payload never ran."""
    result = cli("train", "--data", h["good"], "--out", tmp_path / "run", "--set", "model=resnet18",
                 "--set", f"pretrained={h['evil_weights']}", "--set", "image_size=32")  # fmt: skip
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("mura-tune: error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr
    assert str(h["evil_weights"]) in errors[0] and "refused" in errors[0]
    assert not any(a in result.stderr for a in UNSAFE) and not h["marker"].exists()


def test_no_advice_to_load_unsafely(h):
    from mura_tune.errors import WeightsError, without_unsafe_advice
    from mura_tune.train.weights import read_weights_file

    torch_says = ("Weights only load failed. This file can still be loaded, to do so you have two "
                  "options, do those steps only if you trust the source: weights_only=False")  # fmt: skip
    assert not any(a in without_unsafe_advice(f"cannot read x.pth: {torch_says}") for a in UNSAFE)
    assert without_unsafe_advice("plain reason") == "plain reason"
    with pytest.raises(WeightsError) as info:
        read_weights_file(h["evil_weights"])
    assert str(h["evil_weights"]) in str(info.value)
    assert not any(a in str(info.value) for a in UNSAFE) and not h["marker"].exists()
