"""``tensorrt``: the package exported to ONNX with dynamic height/width, built into an FP16 plan with one
optimisation profile, cached beside the package under a key of GPU model + compute capability +
TensorRT version + shape profile + weights (:mod:`cdae.engine.artefacts`), and run with TensorRT 10's
named tensors on buffers that torch owns. TensorRT itself is imported only when a plan is built or run.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cdae.engine.artefacts import (
    EXPORT_DIR,
    ONNX_INPUT,
    ONNX_OUTPUTS,
    ShapeProfile,
    artefact_dir,
    cache_intact,
    onnx_artefact,
    plan_key,
    read_verified_artefact,
    write_cached,
)
from cdae.engine.backends.base import Backend, HostStaging, Log, require_cuda
from cdae.engine.config import BackendOptions
from cdae.engine.errors import BackendError, BackendUnavailable
from cdae.engine.package import Manifest


def tensorrt_importable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def import_tensorrt():  # noqa: ANN202 - the tensorrt module
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional dependency, imported where used
    except ImportError as e:
        raise BackendUnavailable(
            f"tensorrt backend: cannot import tensorrt ({e}); install the GPU extra: pip install 'cdae[gpu]'"
        ) from e
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise BackendUnavailable(f"tensorrt backend needs TensorRT >= 10 (named tensors API), found {trt.__version__}")
    return trt


def build_plan(onnx_path: Path, profile: ShapeProfile, precision: str, workspace_mib: int, log: Log) -> bytes:
    """Parse ONNX and build a serialised TensorRT plan with one optimisation profile."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        # Keep the pointwise frame path in FP32: range compression (asinh/sinh: UNARY), the residual
        # addition (frame + correction: ELEMENTWISE), slicing and ensemble averaging. Restored values
        # near 1.0 in FP16 would be quantised to ~5e-4 of the frame's scale (tens of DN at 16 bits),
        # and sinh amplifies that for bright pixels. Convolutions and activations stay FP16.
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        fp32_types = {trt.LayerType.ELEMENTWISE, trt.LayerType.UNARY, trt.LayerType.SLICE, trt.LayerType.REDUCE}
        floats = {trt.float32, trt.float16}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
            # shape arithmetic (int tensors) keeps its own types
            if layer.type in fp32_types and outputs and all(t.dtype in floats for t in outputs):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    opt = builder.create_optimization_profile()
    mn, op, mx = profile.shapes()
    opt.set_shape(ONNX_INPUT, mn, op, mx)
    config.add_optimization_profile(opt)
    log(f"building TensorRT {trt.__version__} {precision} plan for {onnx_path.name}, profile {profile.describe()}"
        " (once per GPU model, TensorRT version and profile; can take minutes)")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"TensorRT failed to build a plan from {onnx_path.name} (see the TensorRT log above)")
    log(f"built TensorRT plan in {time.perf_counter() - t0:.1f} s")
    return bytes(plan)


_TRT_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32}


class TensorRTBackend(Backend):
    """A TensorRT 10 engine built from the package, on torch-owned device buffers (no pycuda)."""

    name = "tensorrt"
    _build_lock = threading.Lock()  # one build at a time per process: builds use all the GPU memory they get

    def __init__(self, manifest: Manifest, model: nn.Module, pkg: Path, options: BackendOptions,
                 log: Log = lambda s: None) -> None:
        trt = import_tensorrt()
        require_cuda(self.name)
        dev = torch.device(options.device)
        super().__init__(manifest, str(dev))
        self.torch_device = dev
        self.precision = "fp32" if options.precision == "fp32" else "fp16"
        self.profile = ShapeProfile.for_model(manifest, options.trt_opt_side, options.trt_max_side)
        self.max_side = self.profile.max_hw[0]
        props = torch.cuda.get_device_properties(dev)
        key = plan_key(
            gpu_name=props.name, compute_capability=(props.major, props.minor), trt_version=trt.__version__,
            profile=self.profile, precision=self.precision, weights_sha256=manifest.weights_sha256,
        )
        cache = artefact_dir(pkg, manifest, options.artefact_dir)
        self.plan_path = cache / "tensorrt" / f"{key}.plan"
        with torch.cuda.device(dev):
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self._load_or_build(trt, model, pkg, cache, options, log)
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise BackendError(f"TensorRT could not create an execution context for {self.plan_path.name}")
            self.stream = torch.cuda.Stream(dev)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if self.inputs != [ONNX_INPUT] or sorted(self.outputs) != sorted(ONNX_OUTPUTS):
            raise BackendError(f"{self.plan_path.name}: unexpected I/O tensors {names}")
        self.out_dtypes = {n: _TRT_TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in self.outputs}
        self._staging = HostStaging(dev)
        self._device_out: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()

    def _load_or_build(self, trt, model: nn.Module, pkg: Path, cache: Path, options: BackendOptions,  # noqa: ANN001, ANN202
                       log: Log):
        # a plan made by `cdae export` beside the package (read-only store) first, then the cache
        exported = Path(pkg) / EXPORT_DIR / self.plan_path.name
        for candidate in (exported, self.plan_path):
            if candidate.is_file():
                if candidate == exported:
                    data = read_verified_artefact(Path(pkg), self.manifest, candidate, "tensorrt")
                else:
                    data = candidate.read_bytes()
                    if not cache_intact(candidate, log, data):
                        continue
                engine = self.runtime.deserialize_cuda_engine(data)
                if engine is not None:
                    self.plan_path = candidate
                    log(f"loaded TensorRT plan {candidate}")
                    return engine
                log(f"plan {candidate} does not deserialise here; trying the next or rebuilding")
        with self._build_lock:
            onnx_path = onnx_artefact(pkg, self.manifest, model, cache, self.profile.max_hw[0], log)
            plan = build_plan(onnx_path, self.profile, self.precision, options.trt_workspace_mib, log)
            write_cached(self.plan_path, plan)
            meta = {"profile": self.profile.describe(), "precision": self.precision, "trt_version": trt.__version__,
                    "gpu": torch.cuda.get_device_name(self.torch_device), "model": self.ref,
                    "weights_sha256": self.manifest.weights_sha256, "onnx": onnx_path.name}
            self.plan_path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        engine = self.runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendError(f"TensorRT could not deserialise the plan it just built ({self.plan_path.name})")
        return engine

    def describe(self) -> dict[str, str | int | float | bool | None]:
        return {**super().describe(), "gpu": torch.cuda.get_device_name(self.torch_device),
                "precision": self.precision, "profile": self.profile.describe(), "plan": str(self.plan_path)}

    def _outputs_for(self, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        bufs = self._device_out.pop(hw, None)
        if bufs is None:
            bufs = {}
            for n in self.outputs:
                shape = tuple(self.context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise BackendError(f"TensorRT output {n} has unresolved shape {shape}")
                bufs[n] = torch.empty(shape, dtype=self.out_dtypes[n], device=self.torch_device)
        self._device_out[hw] = bufs
        while len(self._device_out) > 8:
            self._device_out.popitem(last=False)
        return bufs

    @torch.no_grad()
    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, h, w = x.shape
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self.stream):
            padded = self._staging.upload(x, self.multiple)  # TensorRT's input binding is linear NCHW
            hp, wp = padded.shape[-2:]
            if hp > self.profile.max_hw[0] or wp > self.profile.max_hw[1]:
                raise BackendError(f"tensorrt: input {hp}x{wp} exceeds the plan's profile {self.profile.describe()}")
            if not self.context.set_input_shape(ONNX_INPUT, tuple(padded.shape)):
                raise BackendError(f"tensorrt: input shape {tuple(padded.shape)} rejected by the plan")
            outs = self._outputs_for((hp, wp))
            self.context.set_tensor_address(ONNX_INPUT, padded.data_ptr())
            for n, t in outs.items():
                self.context.set_tensor_address(n, t.data_ptr())
            if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                raise BackendError("tensorrt: execute_async_v3 failed (see the TensorRT log)")
            # padded must stay alive until the engine has read it: download synchronises before it goes
            return self._staging.download(outs[ONNX_OUTPUTS[0]], outs[ONNX_OUTPUTS[1]], h, w, self.stream)

    def close(self) -> None:
        self._device_out.clear()
        self._staging.clear()
        self.context = None
        self.engine = None
        torch.cuda.empty_cache()

