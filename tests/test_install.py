"""A non-editable install brings the model store: the shipped default and one rollback, loadable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from cdae.engine.config import default_models_dir
from cdae.engine.package import ModelRegistry, load_package, sha256_file
store = default_models_dir()
reg = ModelRegistry(store)
pkg = reg.resolve("cdae-default")
manifest, state = load_package(pkg)  # checks the weights' sha256 against the manifest
print(json.dumps({"store": str(store), "refs": reg.refs(), "default": manifest.ref}))
"""


def test_a_wheel_install_carries_the_default_and_one_rollback(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("cdae-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:  # a pure-Python wheel installs by unpacking
        z.extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "CDAE_MODELS"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, "PYTHONPATH": str(site)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["store"]).resolve().is_relative_to(site.resolve())  # not the source tree
    shipped = sorted((REPO / "models" / "cdae-default").glob("*/manifest.json"))
    versions = sorted(int(p.parent.name) for p in shipped)
    assert len(versions) == 2, f"the source store should hold the default and one rollback, has {versions}"
    assert got["default"] == f"cdae-default:{versions[-1]}"
    assert sorted(got["refs"]) == sorted(f"cdae-default:{v}" for v in versions)
