"""The package's shape: imports run one way through the stages (core < data < train < search <
ensemble < report < cli), with no cycle, counting module-level and function-level imports alike."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mura_tune"
#: Stage of each subpackage; modules directly in mura_tune/ are the core (the package's own
#: __init__ and __main__, the public API, sit above everything).
STAGES = {"data": 1, "train": 2, "search": 3, "ensemble": 4, "report": 5, "cli": 6}
TOP = 7
MAX_LINES = 500
#: The image renderer draws seven body parts and four findings; it may stay long.
LONG_MODULES = {"mura_tune.data.synth.render"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> int:
    parts = module.split(".")
    if module == "mura_tune" or module == "mura_tune.__main__":
        return TOP
    return STAGES.get(parts[1], 0) if len(parts) > 2 or parts[1] in STAGES else 0


def imports(module: str) -> set[str]:
    """The mura_tune modules ``module`` imports anywhere in its file (functions included)."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import sub`` imports the module pkg.sub when there is one.
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # ``import a.b.c`` of an attribute path
                name = name.rpartition(".")[0]
            if name.startswith("mura_tune") and name != module:
                found.add(name)
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_every_import_runs_down_the_stages():
    upward = [
        f"{m} (stage {stage(m)}) imports {d} (stage {stage(d)})"
        for m, deps in GRAPH.items()
        for d in sorted(deps)
        if stage(d) > stage(m) and d != "mura_tune"
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_what_it_must():
    """The graph is built from real imports: a known edge of each kind is present."""
    assert "mura_tune.train.engine" in GRAPH["mura_tune.train.run"]  # module level
    assert "mura_tune.search.driver" in GRAPH["mura_tune.cli.commands"]  # inside a function
    assert stage("mura_tune.metrics") == 0 and stage("mura_tune.report.html") == 5


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    if module in LONG_MODULES:
        return
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines: does it hold two jobs?"


def test_every_stage_says_its_job_and_what_it_may_import():
    for name in STAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        assert "May import" in doc or "may import" in doc, name


def test_public_api_loads_lazily_and_completely():
    import subprocess
    import sys

    code = (
        "import sys, mura_tune\n"
        "assert not {'torch', 'ray'} & set(sys.modules), 'import mura_tune imported torch or Ray'\n"
        "assert set(mura_tune.__all__) == {'__version__', *mura_tune._API}\n"
        "for name in mura_tune.__all__: getattr(mura_tune, name)\n"
        "print(mura_tune.SearchPlan.__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mura_tune.search.plan"


def test_the_library_logs_and_only_the_cli_prints():
    """Below cli/, modules report through logging.getLogger("mura_tune...."); the CLI decides what is shown."""
    printing = [
        f"{m}:{node.lineno}"
        for m, path in MODULES.items()
        if stage(m) < STAGES["cli"]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]
    assert not printing, printing
