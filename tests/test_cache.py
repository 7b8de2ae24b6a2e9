"""The decoded-image cache: same pixels as the uncached path, rebuilt on change, never half-used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mura_tune.data.cache import build_cache, cache_key, open_cache
from mura_tune.data.images import preprocess
from mura_tune.data.loader import SplitData, batch_loader

SIZE = 32


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` small PNGs of the kinds MURA has: 8-bit grayscale (portrait and landscape), RGB, 16-bit."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (40, 29) if i % 2 else (27, 44)
        gray = rng.integers(0, 256, shape, dtype=np.uint8)
        if i % 5 == 1:
            img = Image.fromarray(np.stack([gray, gray[::-1], 255 - gray], axis=-1))  # RGB
        elif i % 7 == 2:
            img = Image.fromarray(gray.astype(np.uint16) * 200)  # 16-bit grayscale
        else:
            img = Image.fromarray(gray)
        path = folder / f"image{i:04d}.png"
        img.save(path)
        paths.append(str(path))
    return paths


def assert_matches_uncached(cache, paths: list[str]) -> None:
    for path, row in zip(paths, cache.rows(paths)):
        np.testing.assert_array_equal(cache.images[row], preprocess(path, cache.size), err_msg=path)


def key_folders(root: Path, paths: list[str], size: int = SIZE) -> list[str]:
    key = cache_key(paths, size)
    return sorted(p.name for p in root.iterdir() if p.name.startswith(key))


def bump_mtime(path: str, seconds: int = 5) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


# --- same preprocessing ----------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_cache_rows_are_pixel_identical_to_preprocess(tmp_path, workers):
    paths = write_images(tmp_path / "img", 24)
    cache = build_cache(paths, SIZE, root=tmp_path / "cache", workers=workers, progress=False)
    assert cache.images.shape == (24, SIZE, SIZE) and cache.images.dtype == np.uint8
    assert cache.index["ok"].all()
    assert_matches_uncached(cache, paths)


def test_training_batches_equal_the_uncached_path(tmp_path):
    """What the loader hands to training is exactly preprocess() of each image, in the batch's order."""
    paths = write_images(tmp_path / "img", 20)
    cache = build_cache(paths, SIZE, root=tmp_path / "cache", workers=1, progress=False)
    table = pd.DataFrame({"image_path": paths})
    split = SplitData(
        rows=cache.rows(paths),
        labels=torch.arange(20, dtype=torch.float32),
        weights=torch.ones(20),
        table=table,
    )
    seen = 0
    for images, labels, _, pos in batch_loader(cache, split, batch_size=6, shuffle=True, seed=3):
        expected = np.stack([preprocess(paths[p], SIZE) for p in pos.tolist()])
        np.testing.assert_array_equal(images.numpy(), expected)
        assert labels.tolist() == [float(p) for p in pos.tolist()]
        seen += len(pos)
    assert seen == 20
    # 19 images in batches of 6: training never gets a 1-image batch (BatchNorm cannot train on
    # one), a different image sits out each epoch; evaluation keeps every image.
    few = SplitData(rows=split.rows[:19], labels=split.labels[:19], weights=split.weights[:19],
                    table=table.iloc[:19].reset_index(drop=True))  # fmt: skip
    left_out = set()
    for epoch in range(3):
        sizes, seen = [], set()
        for _, _, _, pos in batch_loader(cache, few, batch_size=6, shuffle=True, seed=epoch):
            sizes.append(len(pos))
            seen |= set(pos.tolist())
        assert sizes == [6, 6, 6] and len(seen) == 18
        left_out |= set(range(19)) - seen
    assert len(left_out) > 1
    sizes = [len(b[3]) for b in batch_loader(cache, few, batch_size=6, shuffle=False, seed=0)]
    assert sizes == [6, 6, 6, 1]


def test_reopening_and_reordering_give_the_same_cache(tmp_path):
    paths = write_images(tmp_path / "img", 8)
    first = build_cache(paths, SIZE, root=tmp_path / "cache", workers=1, progress=False)
    again = build_cache(
        list(reversed(paths)), SIZE, root=tmp_path / "cache", workers=1, progress=False
    )
    assert again.path == first.path
    assert open_cache(first.path).images.shape == (8, SIZE, SIZE)


# --- rebuilt when the dataset changes --------------------------------------------------------
def test_modified_image_gives_a_new_cache_and_the_old_one_is_not_used(tmp_path):
    root = tmp_path / "cache"
    paths = write_images(tmp_path / "img", 8)
    old = build_cache(paths, SIZE, root=root, workers=1, progress=False)
    Image.fromarray(np.full((30, 30), 7, dtype=np.uint8)).save(paths[3])  # new content
    bump_mtime(paths[3])
    new = build_cache(paths, SIZE, root=root, workers=1, progress=False)
    assert new.path != old.path
    np.testing.assert_array_equal(new.images[new.rows([paths[3]])[0]], preprocess(paths[3], SIZE))
    assert not np.array_equal(
        new.images[new.rows([paths[3]])[0]], old.images[old.rows([paths[3]])[0]]
    )
    assert_matches_uncached(new, paths)


def test_touch_added_or_removed_image_or_other_size_changes_the_key(tmp_path):
    paths = write_images(tmp_path / "img", 6)
    base = cache_key(paths, SIZE)
    assert cache_key(paths, SIZE * 2) != base
    extra = write_images(tmp_path / "more", 1, seed=1)
    assert cache_key(paths + extra, SIZE) != base
    assert cache_key(paths[:-1], SIZE) != base
    bump_mtime(paths[0])  # same bytes, touched
    assert cache_key(paths, SIZE) != base


# --- a half-written cache is never used ------------------------------------------------------
def test_stale_partial_folder_is_ignored(tmp_path):
    root = tmp_path / "cache"
    paths = write_images(tmp_path / "img", 10)
    key = cache_key(paths, SIZE)
    stale = root / f"{key}.partial-999999"
    stale.mkdir(parents=True)
    # Looks done, is not.
    np.save(stale / "images.npy", np.full((10, SIZE, SIZE), 255, dtype=np.uint8))
    cache = build_cache(paths, SIZE, root=root, workers=1, progress=False)
    assert cache.path == root / key
    assert json.loads((cache.path / "meta.json").read_text())["count"] == 10
    assert_matches_uncached(cache, paths)


def test_final_folder_without_meta_json_is_rebuilt(tmp_path):
    """A folder under the final name but without meta.json (e.g. a half-copied cache) is not trusted."""
    root = tmp_path / "cache"
    paths = write_images(tmp_path / "img", 10)
    final = root / cache_key(paths, SIZE)
    final.mkdir(parents=True)
    np.save(final / "images.npy", np.full((10, SIZE, SIZE), 255, dtype=np.uint8))
    cache = build_cache(paths, SIZE, root=root, workers=1, progress=False)
    assert cache.path == final and (final / "meta.json").exists()
    assert_matches_uncached(cache, paths)


SLOW_BUILDER = textwrap.dedent(
    """
    import json, sys, time
    import mura_tune.data.cache as cache_module

    paths, size, root, delay = json.loads(sys.argv[1])
    real = cache_module.preprocess
    calls = 0

    def slow(path, size):
        global calls
        calls += 1
        time.sleep(delay)
        return real(path, size)

    cache_module.preprocess = slow
    print("STARTED", flush=True)
    cache = cache_module.build_cache(paths, size, root=root, workers=1, progress=False)
    print(json.dumps({"path": str(cache.path), "decoded": calls}), flush=True)
    """
)


def start_builder(paths: list[str], root: Path, delay: float) -> subprocess.Popen:
    """``build_cache`` in another process, its per-image decode slowed by ``delay`` seconds."""
    args = json.dumps([paths, SIZE, str(root), delay])
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_BUILDER, args], stdout=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_killed_build_leaves_nothing_usable_and_the_next_build_is_complete(tmp_path):
    root = tmp_path / "cache"
    paths = write_images(tmp_path / "img", 300)
    final = root / cache_key(paths, SIZE)
    proc = start_builder(paths, root, delay=0.01)  # >= 3 s of decoding
    try:
        deadline = time.time() + 60
        while not list(root.glob("*.partial-*/images.npy")):
            assert proc.poll() is None, "the builder exited before it started writing"
            assert time.time() < deadline, "the builder never started writing"
            time.sleep(0.05)
        time.sleep(0.8)  # some chunks written, most not
        assert not (final / "meta.json").exists(), "the build finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not final.exists()  # a killed build never appears under the final name
    leftovers = list(root.glob("*.partial-*"))
    assert leftovers

    # The builder's lock died with it.
    cache = build_cache(paths, SIZE, root=root, workers=1, progress=False)
    assert cache.path == final
    assert json.loads((final / "meta.json").read_text())["count"] == 300
    assert cache.index["ok"].all()
    assert_matches_uncached(cache, paths)


@pytest.mark.slow
def test_two_concurrent_builders_produce_one_cache(tmp_path):
    root = tmp_path / "cache"
    paths = write_images(tmp_path / "img", 120)
    procs = [start_builder(paths, root, delay=0.005) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=90)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0]["path"] == outs[1]["path"] == str(root / cache_key(paths, SIZE))
    # One decoded everything, the other waited for it.
    assert sorted(o["decoded"] for o in outs) == [0, 120]
    assert key_folders(root, paths) == [cache_key(paths, SIZE)]  # no second copy, no partial left
    assert_matches_uncached(open_cache(outs[0]["path"]), paths)


# --- unreadable images -----------------------------------------------------------------------
def test_unreadable_images_are_recorded_with_reasons(tmp_path):
    good = write_images(tmp_path / "img", 5)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("not an image at all")
    (bad / "truncated.png").write_bytes(Path(good[0]).read_bytes()[:60])
    missing = str(bad / "missing.png")
    broken = [str(bad / "empty.png"), str(bad / "text.png"), str(bad / "truncated.png"), missing]
    cache = build_cache(good + broken, SIZE, root=tmp_path / "cache", workers=2, progress=False)

    assert len(cache.index) == 9
    reasons = dict(zip(cache.unreadable["image_path"], cache.unreadable["reason"]))
    assert set(reasons) == set(broken)
    assert "empty" in reasons[broken[0]]
    assert "not a PNG" in reasons[broken[1]]
    assert "decode" in reasons[broken[2]] or "truncated" in reasons[broken[2]]
    assert "not found" in reasons[missing]
    # Zeros, and never trained on: prepare_data skips unreadable rows.
    for row in cache.rows(broken):
        assert not cache.images[row].any()
    assert json.loads((cache.path / "meta.json").read_text())["unreadable"] == 4
    assert_matches_uncached(cache, good)
