"""Backends: run a model package's network on normalised input, on CPU, CUDA or TensorRT.

Every backend takes the (C, H, W) float32 network input of a frame or tile (``network_input``,
computed once per frame by the pipeline) and returns the restored frame, still normalised, and
the defect probability, both (H, W) float32. Normalisation, tiling and dtype handling live in
the pipeline, so backends differ only in how the network runs:

- ``torch-cpu``: the package's network with channels-last memory (oneDNN); works everywhere; BF16
  where the CPU has it natively and the package's manifest records a passed BF16 parity check.
- ``torch-cuda``: FP16/BF16 autocast, channels-last, pinned host buffers, CUDA graphs captured
  for each steady input shape.
- ``tensorrt``: the package exported to ONNX with dynamic height/width, built into an FP16 plan
  with one optimisation profile, cached beside the package under a key of GPU model + compute
  capability + TensorRT version + shape profile + weights, and run with TensorRT 10's named
  tensors on buffers that torch owns.
- ``passthrough``: an identity network (restored = input), to measure everything but the model.

One module per backend (``torch_backend``, ``torch_cuda_backend``, ``onnx_backend``,
``tensorrt_backend``, ``passthrough``), the interface in ``base``; ONNX export and the TensorRT plan
cache are :mod:`cdae.engine.artefacts`. This package chooses and loads a backend (``load_backend``,
``resolve_kind``) and re-exports every public name, so ``from cdae.engine.backends import X`` works.

Models are only ever loaded through ``cdae.engine.package`` (sha256-verified safetensors).
GPU libraries are imported inside functions: this package imports on machines without them.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cdae.engine.artefacts import (
    EXPORT_DIR,
    ONNX_EXPORT_FORMAT,
    ONNX_INPUT,
    ONNX_OPSET,
    ONNX_OUTPUTS,
    ArtefactIntegrityError,
    ShapeProfile,
    artefact_dir,
    export_onnx,
    onnx_artefact,
    plan_key,
    read_verified_artefact,
)
from cdae.engine.backends.base import Backend, Log, cuda_available, require_cuda
from cdae.engine.backends.onnx_backend import OnnxRuntimeBackend
from cdae.engine.backends.passthrough import PassthroughBackend
from cdae.engine.backends.tensorrt_backend import TensorRTBackend, build_plan, import_tensorrt, tensorrt_importable
from cdae.engine.backends.torch_backend import TorchBackend, TorchCPUBackend, bf16_record, cpu_bf16_native
from cdae.engine.backends.torch_cuda_backend import TorchCUDABackend, autocast_dtype
from cdae.engine.config import BackendOptions
from cdae.engine.errors import BackendError, BackendUnavailable
from cdae.engine.kinds import AUTO_ORDER, BACKEND_KINDS
from cdae.engine.package import Manifest, load_model

__all__ = [
    "AUTO_ORDER", "BACKEND_KINDS", "EXPORT_DIR", "ONNX_EXPORT_FORMAT", "ONNX_INPUT", "ONNX_OPSET", "ONNX_OUTPUTS",
    "ArtefactIntegrityError", "Backend", "BackendError", "BackendUnavailable", "Log", "OnnxRuntimeBackend",
    "PassthroughBackend", "ShapeProfile", "TensorRTBackend", "TorchBackend", "TorchCPUBackend", "TorchCUDABackend",
    "artefact_dir", "autocast_dtype", "bf16_record", "cpu_bf16_native", "build_plan", "cuda_available", "export_onnx", "load_backend", "make_backend",
    "onnx_artefact", "plan_key", "read_verified_artefact", "resolve_kind", "set_cpu_threads", "tensorrt_importable",
]


def set_cpu_threads(threads: int | None) -> None:
    """A frame-path process's CPU threads (an engine's or a Triton model's ``threads``): torch's, and with one
    thread the guard's impulse pass too (by default it takes two on large frames); None: the defaults."""
    if not threads:
        return
    import torch

    from cdae.engine.guard import set_guard_threads

    torch.set_num_threads(threads)
    if threads == 1:
        set_guard_threads(1)


def resolve_kind(kind: str) -> str:
    """The backend ``auto`` would pick here, or ``kind`` itself after checking it can run."""
    if kind == "auto":
        if cuda_available() and tensorrt_importable():
            return "tensorrt"
        return "torch-cuda" if cuda_available() else "torch-cpu"
    if kind not in BACKEND_KINDS:
        raise BackendError(f"unknown backend {kind!r}; expected one of {', '.join(BACKEND_KINDS)}")
    if kind in ("torch-cuda", "tensorrt"):
        require_cuda(kind)
    if kind == "tensorrt":
        import_tensorrt()
    return kind


def load_backend(kind: str, pkg: Path | str, options: BackendOptions | None = None, log: Log = lambda s: None) -> Backend:
    """Load a model package (sha256-verified) into a backend; ``auto`` falls back tensorrt → torch-cuda → torch-cpu."""
    options = options or BackendOptions()
    pkg = Path(pkg)
    manifest, model = load_model(pkg)
    if kind == "auto":
        candidates = [k for k in AUTO_ORDER if k != "tensorrt" or tensorrt_importable()]
        if not cuda_available():
            candidates = ["torch-cpu"]
        for k in candidates:
            try:
                return make_backend(k, manifest, model, pkg, options, log)
            except ArtefactIntegrityError:
                raise  # a changed artefact is refused loudly, not hidden by the next backend
            except BackendError as e:
                if k == candidates[-1]:
                    raise
                log(f"backend {k} unavailable ({e}); trying the next")
        raise AssertionError("unreachable")
    return make_backend(resolve_kind(kind), manifest, model, pkg, options, log)


def make_backend(kind: str, manifest: Manifest, model: nn.Module, pkg: Path, options: BackendOptions, log: Log) -> Backend:
    if kind == "torch-cpu":
        return TorchCPUBackend(manifest, model, options.precision, log, options.cpu_kernels)
    if kind == "passthrough":
        return PassthroughBackend(manifest)
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(manifest, model, pkg, options, log)
    if kind == "torch-cuda":
        return TorchCUDABackend(manifest, model, options, log)
    if kind == "tensorrt":
        return TensorRTBackend(manifest, model, pkg, options, log)
    raise BackendError(f"unknown backend {kind!r}; expected one of {', '.join(BACKEND_KINDS)}")
