"""Dependency direction (docs/design.md) and a light IOC: checked on the source, not by convention."""

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


def _files(module: str, root: Path = ROOT) -> list[Path]:
    if module in FOLDERS:
        return sorted((root / FOLDERS[module]).rglob("*.py"))
    package, _, name = module.rpartition(".")  # one module, e.g. cdae.notify → cdae/notify.py
    return [f for f in [root / FOLDERS[package] / f"{name}.py"] if f.is_file()]


def violations(contract: dict, root: Path = ROOT) -> list[str]:
    """Every import in the contract's source modules (files under ``root``) that it forbids."""
    assert contract["type"] == "forbidden"
    found = []
    for source in contract["source_modules"]:
        files = _files(source, root)
        assert files, f"no source files for {source}"
        for f in files:
            for name in _imports(f):
                for forbidden in contract["forbidden_modules"]:
                    if name == forbidden or name.startswith(forbidden + "."):
                        found.append(f"{f.relative_to(root)} imports {name}")
    return found


@pytest.mark.parametrize("contract", _contracts(), ids=lambda c: c["name"])
def test_forbidden_imports(contract: dict) -> None:
    found = violations(contract)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("contract", _contracts(), ids=lambda c: c["name"])
def test_each_contract_catches_a_violation(contract: dict, tmp_path: Path) -> None:
    """A copy of the tree with one forbidden import added to a source module fails the contract."""
    for m in contract["source_modules"]:  # every source module present, importing nothing forbidden
        f = tmp_path / FOLDERS[m] / "clean.py" if m in FOLDERS else tmp_path / FOLDERS[m.rpartition(".")[0]] / f"{m.rpartition('.')[2]}.py"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("import json\n")
    source = contract["source_modules"][0]
    forbidden = contract["forbidden_modules"][0]
    target = (tmp_path / FOLDERS[source] / "smuggled.py" if source in FOLDERS
              else tmp_path / FOLDERS[source.rpartition(".")[0]] / f"{source.rpartition('.')[2]}.py")
    target.write_text(f"import json\nfrom {forbidden} import something  # noqa\n")
    found = violations(contract, tmp_path)
    assert found == [f"{target.relative_to(tmp_path)} imports {forbidden}"]


def test_the_simulated_camera_lives_outside_the_ioc() -> None:
    """The IOC of the live filter imports no simulator: the camera that uses one is a tool in cdae/."""
    contract = next(c for c in _contracts() if c["source_modules"] == ["cdae.ioc"])
    assert "cdae.training" in contract["forbidden_modules"]
    assert not (ROOT / "ioc" / "camera.py").exists() and (ROOT / "cdae" / "simcamera.py").is_file()


def test_cli_help_does_not_import_torch() -> None:
    code = "import sys, cdae.cli, cdae.errors; cdae.errors.user_errors(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
