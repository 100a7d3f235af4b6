"""Dependency direction (DESIGN.md) and a light IOC: checked on the source, not by convention."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"cdae.engine": "engine", "cdae.training": "training", "cdae.ioc": "ioc", "cdae.deploy": "deploy", "cdae": "cdae"}


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(module: str) -> list[Path]:
    if module in FOLDERS:
        return sorted((ROOT / FOLDERS[module]).rglob("*.py"))
    package, _, name = module.rpartition(".")  # one module, e.g. cdae.notify → cdae/notify.py
    return [f for f in [ROOT / FOLDERS[package] / f"{name}.py"] if f.is_file()]


@pytest.mark.parametrize("contract", _contracts(), ids=lambda c: c["name"])
def test_forbidden_imports(contract: dict) -> None:
    assert contract["type"] == "forbidden"
    violations = []
    for source in contract["source_modules"]:
        files = _files(source)
        assert files, f"no source files for {source}"
        for f in files:
            for name in _imports(f):
                for forbidden in contract["forbidden_modules"]:
                    if name == forbidden or name.startswith(forbidden + "."):
                        violations.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not violations, "\n".join(violations)


def test_layering_check_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from cdae.ioc.server import X\nimport caproto.server\n")
    assert {"cdae.ioc.server", "caproto.server"} <= _imports(bad)


def test_cli_help_does_not_import_torch() -> None:
    code = "import sys, cdae.cli, cdae.errors; cdae.errors.user_errors(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
