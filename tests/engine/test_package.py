"""Model packages: round trip, sha256 verification, tampering, unknown architectures, registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdae.engine.architecture import ArchitectureConfig, build_model
from cdae.engine.inference import Denoiser
from cdae.engine.package import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ModelPackageError,
    ModelRegistry,
    load_model,
    load_package,
    parse_ref,
    read_manifest,
    write_package,
)

ARCH = ArchitectureConfig(base_width=4, depth=1, convs_per_level=1)


def _write(root: Path, version: str = "1", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(ARCH)
    return write_package(root, name="m", version=version, state_dict=model.state_dict(), architecture=ARCH, seed=seed)


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ARCH).eval()
    pkg = write_package(tmp_path, name="m", version="1", state_dict=model.state_dict(), architecture=ARCH, seed=7)
    manifest, loaded = load_model(pkg)
    assert manifest.seed == 7 and manifest.architecture == ARCH and manifest.parameters > 0
    x = torch.randn(1, 2, 16, 24)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_weights_are_not_pickle(tmp_path: Path) -> None:
    pkg = _write(tmp_path)
    head = (pkg / WEIGHTS_FILE).read_bytes()[:16]
    assert not head.startswith(b"\x80")  # pickle protocol marker
    assert b"PK" not in head[:2]  # torch.save zip


def test_tampered_weights_rejected(tmp_path: Path) -> None:
    pkg = _write(tmp_path)
    data = bytearray((pkg / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01  # one bit in one weight
    (pkg / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="sha256 .* does not match"):
        load_package(pkg)


def test_truncated_weights_rejected(tmp_path: Path) -> None:
    pkg = _write(tmp_path)
    data = (pkg / WEIGHTS_FILE).read_bytes()
    (pkg / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelPackageError, match="tampered or truncated"):
        load_package(pkg)


def test_weights_with_matching_hash_but_wrong_shapes_rejected(tmp_path: Path) -> None:
    pkg = _write(tmp_path)
    manifest = json.loads((pkg / MANIFEST_FILE).read_text())
    manifest["architecture"]["base_width"] = 8  # manifest edited, weights unchanged
    (pkg / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match="do not fit the architecture"):
        load_model(pkg)


def test_unknown_architecture_rejected(tmp_path: Path) -> None:
    pkg = _write(tmp_path)
    manifest = json.loads((pkg / MANIFEST_FILE).read_text())
    manifest["architecture"]["name"] = "transformer-xl"
    (pkg / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match="unknown architecture 'transformer-xl'"):
        read_manifest(pkg)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"name": "m"}'])
def test_corrupt_manifest_rejected(tmp_path: Path, text: str) -> None:
    pkg = _write(tmp_path)
    (pkg / MANIFEST_FILE).write_text(text)
    with pytest.raises(ModelPackageError, match="manifest"):
        load_package(pkg)


def test_not_safetensors_rejected(tmp_path: Path) -> None:
    pkg = _write(tmp_path)
    import hashlib

    junk = b"\x80\x04\x95garbage-pickle-like"
    (pkg / WEIGHTS_FILE).write_bytes(junk)
    manifest = json.loads((pkg / MANIFEST_FILE).read_text())
    manifest["weights_sha256"] = hashlib.sha256(junk).hexdigest()  # a consistent but bogus package
    (pkg / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match="not a readable safetensors file"):
        load_package(pkg)


def test_registry_resolves_latest_and_lists(tmp_path: Path) -> None:
    for v in ("1", "2", "10"):
        _write(tmp_path, v)
    reg = ModelRegistry(tmp_path)
    assert reg.versions("m") == ["1", "2", "10"]
    assert reg.resolve("m") == tmp_path / "m" / "10"
    assert reg.resolve("m:2") == tmp_path / "m" / "2"
    with pytest.raises(ModelPackageError, match="no version '3'"):
        reg.resolve("m:3")
    with pytest.raises(ModelPackageError, match="no model named 'x'"):
        reg.resolve("x")
    with pytest.raises(ModelPackageError, match="invalid model name"):
        parse_ref("../etc:1")


def test_existing_package_not_overwritten(tmp_path: Path) -> None:
    _write(tmp_path)
    with pytest.raises(ModelPackageError, match="already exists"):
        _write(tmp_path)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "float32"])
@pytest.mark.parametrize("shape", [(37, 50), (64, 64), (5, 7)])
def test_denoiser_keeps_dtype_and_shape(tmp_path: Path, dtype: str, shape: tuple[int, int]) -> None:
    den = Denoiser.from_package(_write(tmp_path))
    rng = np.random.default_rng(0)
    frame = (rng.random(shape) * 200).astype(dtype)
    res = den(frame)
    assert res.denoised.dtype == np.dtype(dtype) and res.denoised.shape == shape
    assert res.residual.dtype == np.float32 and res.defect_probability.shape == shape
    np.testing.assert_allclose(res.residual, frame.astype(np.float32) - res.denoised.astype(np.float32))


def test_denoiser_rejects_nan(tmp_path: Path) -> None:
    from cdae.engine.normalise import NormalisationError

    den = Denoiser.from_package(_write(tmp_path))
    frame = np.ones((16, 16), np.float32)
    frame[3, 3] = np.nan
    with pytest.raises(NormalisationError, match="NaN"):
        den(frame)


def test_copy_of_package_loads_elsewhere(tmp_path: Path) -> None:
    pkg = _write(tmp_path / "a")
    shutil.copytree(pkg, tmp_path / "b" / "m" / "1")
    assert ModelRegistry(tmp_path / "b").load("m:1")[0].name == "m"
