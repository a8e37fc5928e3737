"""The import rule of docs/ARCHITECTURE.md, checked with import-linter (its contracts are in
pyproject.toml): the rooms of ``stream`` import only the rooms below them, ``operators`` imports
no stream, dask or zmq, the streaming operators do not import the analysis packages, the
emulator imports only the wire protocol and the security room, and no room has an import circle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stream", "operators", "sim_detector")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """import-linter over the packages in ``tree`` with the contracts of its pyproject.toml."""
    pytest.importorskip("importlinter")
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
    return subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})


def copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tree / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_tree_keeps_the_import_rule():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("module,line,broken", [
    # a streaming operator that reaches for dask
    ("operators/virtual.py", "import dask", "operators: computation only"),
    # the wire protocol must not know the session (transport is below session)
    ("stream/transport/protocol.py", "import stream.session.coordinator", "each room imports only the rooms below it"),
    # the viewer sits above the session: only Session.start may start it (one ignored import)
    ("stream/session/finalize.py", "import stream.viewer.feed", "each room imports only the rooms below it"),
    # the security room is the lowest of stream: it knows no transport
    ("stream/security/keys.py", "import stream.transport.protocol", "each room imports only the rooms below it"),
    # the emulator may import the wire protocol only
    ("sim_detector/model.py", "import operators.com", "the emulator imports only the wire protocol"),
    # a streaming kernel importing an analysis package
    ("operators/events.py", "import operators.structure.neighbors", "streaming operators do not import the analysis"),
    # a circle between two modules of one room
    ("operators/fused.py", "import operators.com", "no import circles"),
])
def test_a_broken_rule_fails(tmp_path, module, line, broken):
    """The same check on a copy of the tree with one forbidden import added fails, naming it."""
    tree = copy_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # added by the test\n")
    r = lint_imports(tree)
    assert r.returncode != 0, r.stdout
    assert broken in r.stdout.split("Broken contracts")[1], r.stdout
    assert line.split()[-1].rsplit(".", 1)[-1] in r.stdout, r.stdout  # the report names the import
