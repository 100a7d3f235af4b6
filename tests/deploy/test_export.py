"""``cdae export`` (ONNX parity against torch, recorded in the manifest) and ``cdae models``."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdae.deploy.export import ExportError, export_package, measure_parity, verify_artefacts
from cdae.engine.backends import OnnxRuntimeBackend, TorchCPUBackend
from cdae.engine.config import BackendOptions
from cdae.engine.package import load_model, read_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ioc"))
from ioc_helpers import Stack, cdae, write_tiny_store  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, onnxscript and onnxruntime (the onnx extra)")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return write_tiny_store(tmp_path / "models")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the shipped default model (export writes beside the package)."""
    dst = tmp_path_factory.mktemp("shipped") / "cdae-default" / "7"
    shutil.copytree(REPO / "models" / "cdae-default" / "7", dst, ignore=shutil.ignore_patterns("cache", "artefacts"))
    return dst


@needs_onnx
def test_shipped_model_exports_to_onnx_that_reproduces_torch(shipped: Path) -> None:
    record = export_package(shipped, "onnx", frames=4)
    onnx_file = shipped / record.path
    assert onnx_file.is_file() and record.path == "artefacts/cdae-default-7.onnx"
    par = record.parity
    assert par["passed"] is True and par["frames"] == 4
    # in DN of a 16-bit camera at most: float rounding, far below one DN
    assert isinstance(par["max_abs_dn"], float) and par["max_abs_dn"] < 0.5
    assert "300x200" in par["sizes"]  # a size that is not a multiple of the network's: padding checked
    manifest = read_manifest(shipped)
    (onnx_record,) = [a for a in manifest.artefacts if a.kind == "onnx"]
    assert onnx_record.sha256 == record.sha256 and record.tools["onnxruntime"]
    assert verify_artefacts(shipped) == []
    # exporting again replaces the record, it does not pile up
    export_package(shipped, "onnx", frames=1)
    assert len([a for a in read_manifest(shipped).artefacts if a.kind == "onnx"]) == 1


@needs_onnx
def test_onnx_export_has_dynamic_height_and_width(shipped: Path) -> None:
    import onnx

    record = export_package(shipped, "onnx", frames=1)
    graph = onnx.load(str(shipped / record.path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == [1, 2] and all(isinstance(d, str) for d in dims[2:])


@needs_onnx
def test_parity_check_catches_a_different_network(store: Path, tmp_path: Path) -> None:
    m1, net1 = load_model(store / "tiny" / "1")
    m2, net2 = load_model(store / "tiny" / "2")
    wrong = OnnxRuntimeBackend(m2, net2, store / "tiny" / "2", BackendOptions(artefact_dir=tmp_path, trt_max_side=512))
    parity = measure_parity(wrong, TorchCPUBackend(m1, net1), "fp32", frames=2)
    assert not parity.passed and parity.max_abs_full_scale > 1e-3


@needs_onnx
def test_tampered_artefact_fails_verification(store: Path) -> None:
    pkg = store / "tiny" / "1"
    record = export_package(pkg, "onnx", frames=1)
    ok = subprocess.run(cdae("models", "verify", "tiny:1", "--models-dir", str(store)), capture_output=True, text=True)
    assert ok.returncode == 0 and "tiny:1: OK" in ok.stdout
    with open(pkg / record.path, "r+b") as f:
        f.seek(200)
        f.write(b"\0\0\0\0")
    bad = subprocess.run(cdae("models", "verify", "--models-dir", str(store)), capture_output=True, text=True)
    assert bad.returncode == 1
    assert "tiny:1: FAILED" in bad.stdout and "sha256 differs" in bad.stdout and "tiny:2: OK" in bad.stdout
    (pkg / record.path).unlink()
    assert verify_artefacts(pkg) == ["onnx artefact artefacts/tiny-1.onnx is missing"]


def test_tampered_weights_fail_verification(store: Path) -> None:
    weights = store / "tiny" / "2" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = subprocess.run(cdae("models", "verify", "--models-dir", str(store)), capture_output=True, text=True)
    assert out.returncode == 1 and "tiny:2: FAILED" in out.stdout and "sha256" in out.stdout


def test_export_refuses_fp16_onnx_and_read_only_stores(store: Path) -> None:
    with pytest.raises(ExportError, match="--fp16 applies to --to tensorrt"):
        export_package(store / "tiny" / "1", "onnx", fp16=True)
    out = subprocess.run(cdae("export", "--model", "tiny:1", "--to", "onnx", "--fp16", "--models-dir", str(store)),
                         capture_output=True, text=True)
    assert out.returncode == 2 and "cdae export: error:" in out.stderr and "Traceback" not in out.stderr
    pkg = store / "tiny" / "2"
    pkg.chmod(0o555)
    try:
        import os

        if os.geteuid() != 0:  # root writes anywhere
            with pytest.raises(ExportError, match="read-only"):
                export_package(pkg, "onnx")
    finally:
        pkg.chmod(0o755)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is importable here: the real export runs in the tensorrt test")
def test_tensorrt_export_without_tensorrt_says_what_to_install(store: Path) -> None:
    out = subprocess.run(cdae("export", "--model", "tiny:1", "--to", "tensorrt", "--models-dir", str(store)),
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "tensorrt" in out.stderr.lower() and "Traceback" not in out.stderr


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_plan_reproduces_torch_and_is_found_read_only(shipped: Path, fp16: bool) -> None:
    from cdae.engine.backends import load_backend

    record = export_package(shipped, "tensorrt", fp16=fp16, frames=4, max_side=1024, opt_side=512)
    assert record.kind == "tensorrt" and record.parity["passed"] is True and record.tools["gpu"]
    plan = shipped / record.path
    assert plan.is_file()
    shipped.chmod(0o555)  # the engine's store is read-only: the exported plan must be used, not rebuilt
    try:
        backend = load_backend("tensorrt", shipped, BackendOptions(precision="fp16" if fp16 else "fp32",
                                                                   trt_max_side=1024, trt_opt_side=512))
        assert Path(backend.describe()["plan"]) == plan  # type: ignore[arg-type]
        backend.close()
    finally:
        shipped.chmod(0o755)


def test_models_list_and_show(store: Path) -> None:
    from cdae.engine.package import read_manifest, write_manifest

    pkg = store / "tiny" / "2"  # as if evaluated: PSNRs say which scene generator's held-out set they are on
    m = read_manifest(pkg)
    write_manifest(pkg, m.model_copy(update={"metrics": {**m.metrics, "held_out": {
        "summary": {"psnr_db": 40.5}, "held_out": {"generator": "9.9"}}}}))
    out = subprocess.run(cdae("models", "list", "--models-dir", str(store)), capture_output=True, text=True,
                         check=True).stdout
    assert "tiny:1" in out and "tiny:2" in out
    rows = json.loads(subprocess.run(cdae("models", "list", "--json", "--models-dir", str(store)),
                                     capture_output=True, text=True, check=True).stdout)
    assert [r["ref"] for r in rows] == ["tiny:1", "tiny:2"]
    assert rows[1]["psnr_db"] == 40.5 and rows[1]["held_out_generator"] == "9.9"
    assert "40.50 (9.9)" in out
    show = subprocess.run(cdae("models", "show", "tiny:2", "--models-dir", str(store)), capture_output=True,
                          text=True, check=True).stdout
    assert show.startswith("tiny:2") and "sha256" in show
    missing = subprocess.run(cdae("models", "show", "tiny:9", "--models-dir", str(store)), capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "no version '9'" in missing.stderr


def test_models_activate_switches_a_running_engine(store: Path) -> None:
    stack = Stack(store)
    try:
        engine = stack.engine(model="tiny:1")
        assert engine.match is not None
        control = engine.match["control"]
        ok = subprocess.run(cdae("models", "activate", "tiny:2", "--engine", control, "--timeout", "60"),
                            capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        assert "now serving tiny:2" in ok.stdout
        from cdae.engine.client import ControlClient

        with ControlClient(control) as ctl:
            assert ctl.status().result["model"] == "tiny:2"
        bad = subprocess.run(cdae("models", "activate", "tiny:7", "--engine", control, "--timeout", "60"),
                             capture_output=True, text=True)
        assert bad.returncode == 1 and "keeps its current model" in bad.stderr
        with ControlClient(control) as ctl:
            assert ctl.status().result["model"] == "tiny:2"
    except BaseException:
        print(stack.output())
        raise
    finally:
        stack.stop_all()


def test_bf16_on_the_cpu_is_checked_against_fp32_and_recorded(shipped: Path) -> None:
    from cdae.engine.backends import cpu_bf16_native, load_backend

    if not cpu_bf16_native():
        with pytest.raises(ExportError, match="native BF16"):
            export_package(shipped, "torch-bf16", frames=1, quality_frames=2, real_scenes=False)
        return
    record = export_package(shipped, "torch-bf16", frames=2, quality_frames=4, real_scenes=False)
    m = read_manifest(shipped)
    assert record.kind == "torch-bf16" and record.path == "weights.safetensors" and record.sha256 == m.weights_sha256
    par = record.parity
    assert par["passed"] is True and 0 < par["max_abs_full_scale"] <= 2.5e-2  # type: ignore[operator]
    (quality,) = par["quality"]  # type: ignore[misc]
    assert quality["passed"] is True and quality["frames"] == 4 and abs(quality["psnr_drop_db"]) <= 0.2
    assert verify_artefacts(shipped) == []
    # the engine's CPU backend now takes bf16 by itself (where it is faster here), and says why
    info = load_backend("torch-cpu", shipped).describe()
    assert info["precision"] == "bf16" or "not faster" in str(info["precision_choice"]), info
