"""The built-in spaces (top-level ``search_spaces/``) import the same from a plain checkout, an
editable install and a built wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO

#: Imports the package and a built-in space, and says where both came from.
PROBE = (
    "import json, mura_tune, search_spaces\n"
    "from mura_tune.search.spaces import get_space\n"
    "space = get_space('custom_cnn')\n"
    "print(json.dumps({'mura_tune': mura_tune.__file__, 'search_spaces': search_spaces.__file__,\n"
    "                  'space': space.source, 'dims': sorted(space.dimensions())}))\n"
)


def probe(cwd: Path, pythonpath: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert "depth" in found["dims"] and Path(found["space"]).name == "custom_cnn.py"
    return found


def test_plain_checkout(tmp_path):
    found = probe(tmp_path, str(REPO))
    for key in ("mura_tune", "search_spaces", "space"):
        assert Path(found[key]).is_relative_to(REPO), found


def test_editable_install(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([sys.executable, "-c", "import mura_tune; print(mura_tune.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60).stdout.strip()  # fmt: skip
    if not where or not Path(where).is_relative_to(REPO):
        pytest.skip(f"the installed mura_tune is not this checkout ({where or 'not installed'})")
    found = probe(tmp_path, None)  # no PYTHONPATH, outside the checkout: the installed package
    assert Path(found["search_spaces"]).is_relative_to(REPO) and Path(
        found["space"]
    ).is_relative_to(REPO)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_built_wheel(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("mura_tune", "search_spaces"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=240)  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("mura_tune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "search_spaces/custom_cnn.py" in names and "mura_tune/search/spaces.py" in names
    assert not any(n.startswith("mura_tune/search_spaces/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    found = probe(tmp_path, str(site))
    for key in ("mura_tune", "search_spaces", "space"):
        assert Path(found[key]).is_relative_to(site), found
