"""Backends: torch-cpu is the reference; every other backend matches it within a stated tolerance.

Tolerances against torch-cpu (FP32), on the restored frame in normalised units (1.0 = the frame's
robust dynamic range) and on the defect probability:
- torch-cuda FP32 (TF32 convolutions allowed): max |Δ| <= 5e-3
- torch-cuda FP16/BF16 autocast and TensorRT FP16: max |Δ| <= 5e-2, mean |Δ| <= 5e-3
  (the residual addition stays in FP32, so bright pixels are not quantised by FP16).
GPU and TensorRT tests run only where ``torch.cuda.is_available()`` / ``import tensorrt`` work.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cdae.engine.architecture import ArchitectureConfig, build_model
from cdae.engine.backends import (
    OnnxRuntimeBackend,
    ShapeProfile,
    TorchCPUBackend,
    artefact_dir,
    export_onnx,
    load_backend,
    plan_key,
    resolve_kind,
)
from cdae.engine.config import BackendOptions
from cdae.engine.errors import BackendError, BackendUnavailable
from cdae.engine.inference import Denoiser
from cdae.engine.normalise import NormalisationConfig, network_input
from cdae.engine.package import Manifest, ModelPackageError, load_model, read_manifest, write_package
from cdae.engine.pipeline import denoise_frame, synthetic_frame

ARCH = ArchitectureConfig(base_width=8, depth=2, convs_per_level=1)
HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(5)
    return write_package(tmp_path_factory.mktemp("b"), name="b", version="1",
                         state_dict=build_model(ARCH).state_dict(), architecture=ARCH)


def _inputs() -> list[np.ndarray]:
    out = []
    for shape in ((64, 64), (75, 130)):  # one not a multiple of the network's 4
        frame = synthetic_frame(shape, "uint16", seed=shape[1])
        out.append(network_input(frame, 65535.0, NormalisationConfig())[0])
    return out


def test_torch_cpu_backend_is_the_denoiser_path(pkg: Path) -> None:
    backend = load_backend("torch-cpu", pkg)
    assert isinstance(backend, TorchCPUBackend) and backend.ref == "b:1" and backend.device == "cpu"
    frame = synthetic_frame((70, 90), "uint16", seed=1)
    ref = Denoiser.from_package(pkg)(frame)
    got = denoise_frame(frame, backend)
    np.testing.assert_array_equal(got.denoised, ref.denoised)
    np.testing.assert_array_equal(got.residual, ref.residual)
    np.testing.assert_allclose(got.defect_probability, ref.defect_probability, atol=1e-6)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "float32"])
def test_passthrough_returns_the_frame(pkg: Path, dtype: str) -> None:
    backend = load_backend("passthrough", pkg)
    frame = synthetic_frame((33, 47), dtype, seed=2)
    out = denoise_frame(frame, backend)
    assert out.denoised.dtype == frame.dtype and not out.defect_probability.any()
    if dtype == "float32":
        np.testing.assert_allclose(out.denoised, frame, rtol=1e-5, atol=1e-3)
    else:
        np.testing.assert_array_equal(out.denoised, frame)


def test_backends_load_only_verified_packages(pkg: Path, tmp_path: Path) -> None:
    bad = write_package(tmp_path, name="b", version="2", state_dict=build_model(ARCH).state_dict(), architecture=ARCH)
    w = bad / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + b"\x00")
    for kind in ("torch-cpu", "passthrough", "auto"):
        with pytest.raises(ModelPackageError, match="sha256"):
            load_backend(kind, bad)


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU path")
def test_auto_without_gpu_is_torch_cpu_and_gpu_backends_say_why_not(pkg: Path) -> None:
    assert resolve_kind("auto") == "torch-cpu"
    assert load_backend("auto", pkg).name == "torch-cpu"
    with pytest.raises(BackendUnavailable, match=r"torch.cuda.is_available\(\) is False"):
        load_backend("torch-cuda", pkg)
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        load_backend("tensorrt", pkg)


def test_plan_key_changes_with_everything_a_plan_depends_on() -> None:
    m = Manifest(name="b", version="1", architecture=ARCH, weights_sha256="0" * 64, weights_bytes=0, parameters=0)
    prof = ShapeProfile.for_model(m, 1024, 2048)
    assert prof.min_hw == (4, 4) and prof.opt_hw == (1024, 1024) and prof.max_hw == (2048, 2048)
    base = dict(gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), trt_version="10.3.0",
                profile=prof, precision="fp16", weights_sha256="ab" * 32)
    key = plan_key(**base)  # type: ignore[arg-type]
    assert key.startswith("nvidia-h100-80gb-hbm3-sm90-trt10.3.0-fp16-c2-4x4-1024x1024-2048x2048-wabab")
    assert "/" not in key and " " not in key
    variants = [dict(gpu_name="NVIDIA A100-SXM4-40GB"), dict(compute_capability=(8, 0)), dict(trt_version="10.4.0"),
                dict(profile=ShapeProfile.for_model(m, 512, 2048)), dict(precision="fp32"),
                dict(weights_sha256="cd" * 32)]
    keys = {plan_key(**{**base, **v}) for v in variants}  # type: ignore[arg-type]
    assert key not in keys and len(keys) == len(variants)


def test_artefacts_go_beside_the_package_or_to_the_user_cache(pkg: Path, tmp_path: Path, monkeypatch) -> None:
    m = read_manifest(pkg)
    assert artefact_dir(pkg, m, None) == pkg / "cache"
    assert artefact_dir(pkg, m, tmp_path / "c") == tmp_path / "c" / "b" / "1"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    try:
        d = artefact_dir(ro, m, None)
    finally:
        ro.chmod(0o700)
    if os.geteuid() != 0:  # root writes anywhere, so the fallback only shows for normal users
        assert d == tmp_path / "xdg" / "cdae" / "b" / "1"


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="needs onnxruntime and onnxscript")
def test_onnx_export_has_dynamic_size_and_matches_torch(pkg: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    manifest, model = load_model(pkg)
    path = export_onnx(model, manifest, tmp_path / "m.onnx", max_side=512)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["restored", "defect_probability"]
    cpu = TorchCPUBackend(*load_model(pkg))
    for x in _inputs():
        h, w = x.shape[1:]
        xp = np.pad(x, ((0, 0), (0, -h % 4), (0, -w % 4)), mode="reflect")[None]
        restored, prob = sess.run(None, {"input": np.ascontiguousarray(xp)})
        ref_r, ref_p = cpu.infer(x)
        np.testing.assert_allclose(restored[0, 0, :h, :w], ref_r, atol=1e-5)
        np.testing.assert_allclose(prob[0, 0, :h, :w], ref_p, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="needs onnxruntime and onnxscript")
def test_onnxruntime_backend_matches_torch_and_caches_its_export(pkg: Path, tmp_path: Path) -> None:
    options = BackendOptions(artefact_dir=tmp_path / "cache", trt_max_side=256)
    backend = load_backend("onnxruntime", pkg, options)
    assert backend.describe()["backend"] == "onnxruntime"
    onnx_file = backend.onnx_path
    assert onnx_file.is_file() and str(onnx_file).startswith(str(tmp_path / "cache"))
    cpu = TorchCPUBackend(*load_model(pkg))
    for x in _inputs():
        r, p = backend.infer(x)
        ref_r, ref_p = cpu.infer(x)
        np.testing.assert_allclose(r, ref_r, atol=1e-5)
        np.testing.assert_allclose(p, ref_p, atol=1e-5)
    stamp = onnx_file.stat().st_mtime_ns
    assert load_backend("onnxruntime", pkg, options).onnx_path == onnx_file
    assert onnx_file.stat().st_mtime_ns == stamp  # exported once, then reused


def test_onnxruntime_backend_refuses_a_corrupt_graph(pkg: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a graph")
    manifest, model = load_model(pkg)
    with pytest.raises(BackendError, match="onnxruntime cannot load bad.onnx"):
        OnnxRuntimeBackend(manifest, model, pkg, BackendOptions(), onnx_path=bad)


def _compare(backend, pkg: Path, max_tol: float, mean_tol: float) -> None:  # noqa: ANN001
    cpu = TorchCPUBackend(*load_model(pkg))
    for x in _inputs():
        for _ in range(3):  # eager, then captured/cached paths
            r, p = backend.infer(x)
        ref_r, ref_p = cpu.infer(x)
        assert r.shape == ref_r.shape and p.shape == ref_p.shape
        d = np.abs(r - ref_r)
        assert d.max() <= max_tol and d.mean() <= mean_tol, (d.max(), d.mean())
        assert np.abs(p - ref_p).max() <= max_tol


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision,max_tol,mean_tol", [("fp32", 5e-3, 5e-4), ("fp16", 5e-2, 5e-3), ("bf16", 5e-2, 5e-3)])
def test_torch_cuda_matches_cpu(pkg: Path, precision: str, max_tol: float, mean_tol: float) -> None:
    backend = load_backend("torch-cuda", pkg, BackendOptions(precision=precision))
    _compare(backend, pkg, max_tol, mean_tol)
    assert backend.graph_captures >= 2  # both steady shapes got a CUDA graph
    # a graph replay gives what eager execution gives
    eager = load_backend("torch-cuda", pkg, BackendOptions(precision=precision, cuda_graphs=False))
    x = _inputs()[1]
    np.testing.assert_allclose(backend.infer(x)[0], eager.infer(x)[0], atol=1e-3)
    backend.close()
    eager.close()


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRT), reason="needs a CUDA GPU and TensorRT")
def test_tensorrt_matches_cpu_and_caches_its_plan(pkg: Path, tmp_path: Path) -> None:
    logs: list[str] = []
    opts = BackendOptions(trt_opt_side=256, trt_max_side=512, artefact_dir=tmp_path)
    backend = load_backend("tensorrt", pkg, opts, logs.append)
    assert any("building TensorRT" in s for s in logs)
    plan = backend.plan_path  # type: ignore[attr-defined]
    assert plan.is_file() and plan.parent.parent == tmp_path / "b" / "1"
    _compare(backend, pkg, 5e-2, 5e-3)
    # larger frames than the profile are tiled by the pipeline, not refused
    frame = synthetic_frame((700, 300), "uint16")
    big = denoise_frame(frame, backend, max_pixels=10**8)
    assert big.tiles > 1 and big.denoised.shape == frame.shape
    backend.close()
    mtime = plan.stat().st_mtime_ns
    logs.clear()
    again = load_backend("tensorrt", pkg, opts, logs.append)
    assert not any("building" in s for s in logs) and plan.stat().st_mtime_ns == mtime
    again.close()
    other = load_backend("tensorrt", pkg, opts.model_copy(update={"trt_max_side": 256}), logs.append)
    assert other.plan_path != plan  # type: ignore[attr-defined]  # a new profile, a new plan
    other.close()


# --- torch-cpu in BF16 ----------------------------------------------------------------------------

def _with_bf16_record(pkg: Path, sha: str | None = None) -> None:
    from cdae.engine.package import ArtefactRecord, write_manifest

    m = read_manifest(pkg)
    record = ArtefactRecord(kind="torch-bf16", path="weights.safetensors", sha256=sha or m.weights_sha256, bytes=1,
                            precision="bf16", parity={"passed": True})
    write_manifest(pkg, m.model_copy(update={"artefacts": [record]}))


def test_torch_cpu_runs_fp32_unless_the_package_records_bf16_parity(pkg: Path) -> None:
    backend = load_backend("torch-cpu", pkg)  # precision auto
    info = backend.describe()
    assert info["precision"] == "fp32"
    assert "no native BF16" in str(info["precision_choice"]) or "no passed torch-bf16 parity" in str(info["precision_choice"])
    with pytest.raises(BackendError, match="fp32 or bf16"):
        load_backend("torch-cpu", pkg, BackendOptions(precision="fp16"))


def test_torch_cpu_auto_takes_bf16_with_a_record_for_these_weights(pkg: Path, tmp_path: Path) -> None:
    import shutil

    from cdae.engine.backends import cpu_bf16_native

    if not cpu_bf16_native():
        pytest.skip("this CPU has no native BF16 (AVX512-BF16/AMX): auto keeps fp32, bf16 is refused")
    copy = tmp_path / "b" / "1"
    shutil.copytree(pkg, copy)
    _with_bf16_record(copy, sha="0" * 64)  # a record for other weights does not count
    assert load_backend("torch-cpu", copy).describe()["precision"] == "fp32"
    _with_bf16_record(copy)
    fast = load_backend("torch-cpu", copy)
    info = fast.describe()
    # on a CPU where BF16 is not faster, auto keeps fp32 and says so
    assert info["precision"] == "bf16" or "not faster" in str(info["precision_choice"]), info
    asked = load_backend("torch-cpu", copy, BackendOptions(precision="bf16"))
    assert asked.describe()["precision"] == "bf16"
    _compare(asked, pkg, max_tol=5e-2, mean_tol=5e-3)  # the tolerances of the GPU's reduced precisions
