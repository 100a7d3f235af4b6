"""Backends: run a model package's network on normalised input, on CPU, CUDA or TensorRT.

Every backend takes the (C, H, W) float32 network input of a frame or tile (``network_input``,
computed once per frame by the pipeline) and returns the restored frame, still normalised, and
the defect probability, both (H, W) float32. Normalisation, tiling and dtype handling live in
the pipeline, so backends differ only in how the network runs:

- ``torch-cpu``: the package's network with channels-last memory (oneDNN); works everywhere.
- ``torch-cuda``: FP16/BF16 autocast, channels-last, pinned host buffers, CUDA graphs captured
  for each steady input shape.
- ``tensorrt``: the package exported to ONNX with dynamic height/width, built into an FP16 plan
  with one optimisation profile, cached beside the package under a key of GPU model + compute
  capability + TensorRT version + shape profile + weights, and run with TensorRT 10's named
  tensors on buffers that torch owns.
- ``passthrough``: an identity network (restored = input), to measure everything but the model.

Models are only ever loaded through ``cdae.engine.package`` (sha256-verified safetensors).
GPU libraries are imported inside functions: this module imports on machines without them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from cdae.engine.architecture import pad_to_multiple
from cdae.engine.config import BackendOptions
from cdae.engine.errors import BackendError, BackendUnavailable
from cdae.engine.kinds import AUTO_ORDER, BACKEND_KINDS
from cdae.engine.package import Manifest, load_model, sha256_file

ONNX_EXPORT_FORMAT = 1  # bump when the exported graph changes (it is part of every cache key)
ONNX_OPSET = 18
EXPORT_DIR = "artefacts"  # `cdae export` writes here, beside weights.safetensors

Log = Callable[[str], None]


class ArtefactIntegrityError(BackendError):
    """An exported ONNX file or TensorRT plan is not the one its manifest records: never loaded, never fallen back from."""


def read_verified_artefact(pkg: Path, manifest: Manifest, path: Path, kind: str) -> bytes:
    """The bytes of an artefact beside the package, if the manifest records this file with this sha256
    and a passed parity check (what `cdae export` writes and `cdae models verify` checks)."""
    data = path.read_bytes()  # hashed and then used as read: nothing can change between check and use
    try:
        rel = path.relative_to(pkg).as_posix()
    except ValueError:
        rel = None
    records = [a for a in manifest.artefacts if a.kind == kind and Path(a.path).as_posix() == rel]
    if not records:
        raise ArtefactIntegrityError(
            f"{path}: not recorded in the manifest of {manifest.ref} (artefacts beside a package come from "
            f"`cdae export`, which records their sha256); refusing to load an unverified {kind} file")
    record = records[-1]
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.sha256:
        raise ArtefactIntegrityError(
            f"{path}: sha256 {digest[:16]}… does not match the manifest's {record.sha256[:16]}… (changed after "
            f"`cdae export`); refusing to load (`cdae models verify` lists every problem)")
    if record.parity.get("passed") is not True:
        raise ArtefactIntegrityError(f"{path}: its parity check against torch did not pass; refusing to load")
    return data


def _cache_hash_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _record_cache_hash(path: Path, data: bytes | None = None) -> None:
    """Beside a file the engine made in its cache: its sha256, checked before every later use."""
    digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    tmp = _cache_hash_file(path).with_name(_cache_hash_file(path).name + f".{os.getpid()}.tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, _cache_hash_file(path))


def _cache_intact(path: Path, log: Log, data: bytes | None = None) -> bool:
    """Whether a cached artefact is byte for byte what the engine made; if not it is made again, not used."""
    try:
        want = _cache_hash_file(path).read_text().strip()
    except OSError:
        want = ""
    got = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    if want and got == want:
        return True
    why = "its sha256 differs from the one recorded when it was made" if want else "no sha256 was recorded for it"
    log(f"cached {path}: {why}; making it again instead of loading it")
    return False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def tensorrt_importable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def _import_tensorrt():  # noqa: ANN202 - the tensorrt module
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


def _require_cuda(kind: str) -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            f"{kind} backend needs a CUDA GPU and a CUDA build of torch "
            f"(torch {torch.__version__}: torch.cuda.is_available() is False); use --backend torch-cpu"
        )


# --- the interface -----------------------------------------------------------------------------

class Backend:
    """A loaded model on one device. ``infer`` is called from one thread at a time."""

    name: ClassVar[str] = "backend"

    def __init__(self, manifest: Manifest, device: str) -> None:
        self.manifest = manifest
        self.device = device
        self.architecture = manifest.architecture
        self.normalisation = manifest.normalisation
        self.multiple = manifest.architecture.multiple
        self.max_side: int | None = None  # frames or tiles with a larger padded side are tiled

    @property
    def ref(self) -> str:
        return self.manifest.ref

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) float32 network input → (restored, defect probability), each (H, W) float32."""
        if x.ndim != 3 or x.shape[0] < self.architecture.in_channels:
            raise BackendError(f"{self.name}: expected a ({self.architecture.in_channels}, H, W) input, got {x.shape}")
        return self._run(x[: self.architecture.in_channels])

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict[str, str | int | float | bool | None]:
        return {"backend": self.name, "device": self.device, "model": self.ref, "max_side": self.max_side}

    def close(self) -> None:
        """Release device memory; the backend is not used afterwards."""


class TorchBackend(Backend):
    """The package's network in FP32 on a torch device; channels-last on the CPU (oneDNN).

    The engine's ``torch-cpu`` backend, and what offline use (:class:`cdae.engine.inference.Denoiser`)
    runs on any device through the same pipeline.
    """

    name = "torch"

    def __init__(self, manifest: Manifest, model: nn.Module, device: str | torch.device = "cpu") -> None:
        dev = torch.device(device)
        super().__init__(manifest, str(dev))
        self.torch_device = dev
        self.model = model.to(dev).eval()
        if dev.type == "cpu":
            # channels-last halves CPU convolution time with oneDNN
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(self.torch_device)
        t, (h, w) = pad_to_multiple(t, self.multiple)
        if self.torch_device.type == "cpu":
            t = t.contiguous(memory_format=torch.channels_last)
        restored, logit = self.model(t)
        restored_np = restored[0, 0, :h, :w].float().cpu().numpy()
        prob = torch.sigmoid(logit[0, 0, :h, :w]).float().cpu().numpy()
        return restored_np, prob


class TorchCPUBackend(TorchBackend):
    """The engine's CPU backend: :class:`TorchBackend` on the CPU."""

    name = "torch-cpu"

    def __init__(self, manifest: Manifest, model: nn.Module) -> None:
        super().__init__(manifest, model, "cpu")

    def describe(self) -> dict[str, str | int | float | bool | None]:
        return {**super().describe(), "threads": torch.get_num_threads()}


class PassthroughBackend(Backend):
    """Identity network: restored = input frame, defect probability 0. Measures the engine without a model."""

    name = "passthrough"

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest, "cpu")

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.array(x[0], dtype=np.float32), np.zeros(x.shape[1:], dtype=np.float32)


# --- torch-cuda --------------------------------------------------------------------------------

def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type for a precision setting; None means plain FP32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    with torch.cuda.device(device):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_restored: torch.Tensor
    static_prob: torch.Tensor


class _PinnedBuffers:
    """Page-locked host buffers keyed by shape, so host↔device copies are asynchronous DMA."""

    def __init__(self, keep: int = 8) -> None:
        self._buffers: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._keep = keep

    def get(self, shape: tuple[int, ...]) -> torch.Tensor:
        buf = self._buffers.pop(shape, None)
        if buf is None:
            buf = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        self._buffers[shape] = buf
        while len(self._buffers) > self._keep:
            self._buffers.popitem(last=False)
        return buf

    def clear(self) -> None:
        self._buffers.clear()


class TorchCUDABackend(Backend):
    """The package's network on a CUDA GPU: autocast, channels-last, pinned memory, CUDA graphs."""

    name = "torch-cuda"
    GRAPH_AFTER = 2  # capture a shape's graph the second time it is seen (a steady shape)

    def __init__(self, manifest: Manifest, model: nn.Module, options: BackendOptions) -> None:
        _require_cuda(self.name)
        dev = torch.device(options.device)
        if dev.type != "cuda":
            raise BackendError(f"torch-cuda backend: device must be cuda[:N], got {options.device!r}")
        super().__init__(manifest, str(dev))
        self.torch_device = dev
        self.autocast = autocast_dtype(options.precision, dev)
        self.use_graphs = options.cuda_graphs
        self.max_graphs = options.max_cuda_graphs
        torch.backends.cudnn.benchmark = True  # steady shapes: let cuDNN pick the fastest kernels once
        with torch.cuda.device(dev):
            self.model = model.to(dev).eval().to(memory_format=torch.channels_last)
            self.stream = torch.cuda.Stream(dev)  # each backend its own: a swap warms up beside the live one
        self._pinned_in = _PinnedBuffers()
        self._pinned_out = _PinnedBuffers()
        self._graphs: OrderedDict[tuple[int, ...], _Graph] = OrderedDict()
        self._seen: dict[tuple[int, ...], int] = {}
        self.graph_captures = 0

    def describe(self) -> dict[str, str | int | float | bool | None]:
        return {
            **super().describe(), "gpu": torch.cuda.get_device_name(self.torch_device),
            "precision": str(self.autocast).replace("torch.", "") if self.autocast else "float32",
            "cuda_graphs": self.use_graphs, "graph_captures": self.graph_captures,
        }

    def _forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # cache_enabled=False: autocast's weight cache must not outlive a CUDA graph capture
        with torch.autocast("cuda", dtype=self.autocast or torch.float32, enabled=self.autocast is not None,
                            cache_enabled=False):
            restored, logit = self.model(t)
        # restored = frame (float32) + correction: type promotion keeps the sum in float32
        return restored.float(), torch.sigmoid(logit.float())

    def _capture(self, static_in: torch.Tensor) -> _Graph:
        # warm up on the side stream first (cuDNN autotuning, allocator), as torch's graph docs ask
        for _ in range(2):
            self._forward(static_in)
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the serving thread may run another model while a swap captures this one
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            restored, prob = self._forward(static_in)
        self.graph_captures += 1
        return _Graph(graph, static_in, restored, prob)

    def _graph_for(self, padded: torch.Tensor) -> _Graph | None:
        if not self.use_graphs:
            return None
        key = tuple(padded.shape)
        g = self._graphs.pop(key, None)
        if g is None:
            if len(self._seen) > 1024:  # shapes that never settle: forget them rather than grow
                self._seen.clear()
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < self.GRAPH_AFTER:
                return None
            static_in = torch.empty_like(padded, memory_format=torch.channels_last)
            static_in.copy_(padded)
            g = self._capture(static_in)
        self._graphs[key] = g
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return g

    @torch.no_grad()
    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, h, w = x.shape
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self.stream):
            host_in = self._pinned_in.get((1, c, h, w))
            host_in.numpy()[0] = x
            dev = host_in.to(self.torch_device, non_blocking=True)
            padded, _ = pad_to_multiple(dev, self.multiple)
            padded = padded.contiguous(memory_format=torch.channels_last)
            g = self._graph_for(padded)
            if g is not None:
                g.static_in.copy_(padded)
                g.graph.replay()
                restored, prob = g.static_restored, g.static_prob
            else:
                restored, prob = self._forward(padded)
            host_out = self._pinned_out.get((2, h, w))
            host_out[0].copy_(restored[0, 0, :h, :w], non_blocking=True)
            host_out[1].copy_(prob[0, 0, :h, :w], non_blocking=True)
            self.stream.synchronize()
            out = host_out.numpy().copy()  # the pinned buffer is reused by the next call
        return out[0], out[1]

    def close(self) -> None:
        self._graphs.clear()
        self._pinned_in.clear()
        self._pinned_out.clear()
        self.model = None  # type: ignore[assignment]
        torch.cuda.empty_cache()


# --- onnxruntime -------------------------------------------------------------------------------

def _import_onnxruntime():  # noqa: ANN202
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable("the onnxruntime backend needs onnxruntime: pip install 'cdae[onnx]'") from e
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    """The package's exported ONNX graph in ONNX Runtime: what `cdae export` verifies, and a CPU
    backend for hosts where the ONNX graph runs faster than torch (see bench/)."""

    name = "onnxruntime"

    def __init__(self, manifest: Manifest, model: nn.Module, pkg: Path, options: BackendOptions,
                 log: Log = lambda s: None, onnx_path: Path | None = None, threads: int | None = None) -> None:
        ort = _import_onnxruntime()
        super().__init__(manifest, "cpu")
        if onnx_path is None:
            cache = artefact_dir(pkg, manifest, options.artefact_dir)
            onnx_path = onnx_artefact(pkg, manifest, model, cache, options.trt_max_side, log)
        self.onnx_path = Path(onnx_path)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BackendError(f"onnxruntime cannot load {self.onnx_path.name}: {e}") from e
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if names != ([ONNX_INPUT], list(ONNX_OUTPUTS)):
            raise BackendError(f"{self.onnx_path.name}: unexpected inputs/outputs {names}")
        self.ort_version = ort.__version__

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, h, w = x.shape
        t, _ = pad_to_multiple(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None], self.multiple)
        restored, prob = self.session.run(None, {ONNX_INPUT: t.numpy()})
        return (np.ascontiguousarray(restored[0, 0, :h, :w], dtype=np.float32),
                np.ascontiguousarray(prob[0, 0, :h, :w], dtype=np.float32))

    def describe(self) -> dict[str, str | int | float | bool | None]:
        return {**super().describe(), "onnx": str(self.onnx_path), "onnxruntime": self.ort_version}


# --- tensorrt ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeProfile:
    """A TensorRT optimisation profile over (height, width), all multiples of the network's ``multiple``."""

    channels: int
    min_hw: tuple[int, int]
    opt_hw: tuple[int, int]
    max_hw: tuple[int, int]

    @classmethod
    def for_model(cls, manifest: Manifest, opt_side: int, max_side: int) -> ShapeProfile:
        m = manifest.architecture.multiple
        mx = max(m, max_side // m * m)
        opt = min(mx, max(m, -(-opt_side // m) * m))
        return cls(manifest.architecture.in_channels, (m, m), (opt, opt), (mx, mx))

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        c = self.channels
        return (1, c, *self.min_hw), (1, c, *self.opt_hw), (1, c, *self.max_hw)

    def describe(self) -> str:
        (a, b), (c, d), (e, f) = self.min_hw, self.opt_hw, self.max_hw
        return f"c{self.channels}-{a}x{b}-{c}x{d}-{e}x{f}"


def plan_key(
    *, gpu_name: str, compute_capability: tuple[int, int], trt_version: str, profile: ShapeProfile,
    precision: str, weights_sha256: str,
) -> str:
    """The cache key (and file stem) of a TensorRT plan.

    A plan runs only on the TensorRT version and GPU architecture that built it, for the shapes of
    its profile, and holds the weights it was built from: any change means a rebuild.
    """
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    trt_v = re.sub(r"[^0-9A-Za-z.]+", "-", trt_version)
    cc = f"sm{compute_capability[0]}{compute_capability[1]}"
    return f"{gpu}-{cc}-trt{trt_v}-{precision}-{profile.describe()}-w{weights_sha256[:12]}-x{ONNX_EXPORT_FORMAT}"


def artefact_dir(pkg: Path, manifest: Manifest, configured: Path | None) -> Path:
    """Where derived artefacts of a package live: beside it when writable, else the user cache."""
    if configured is not None:
        d = Path(configured) / manifest.name / manifest.version
    else:
        d = Path(pkg) / "cache"
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            pass
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        d = base / "cdae" / manifest.name / manifest.version
    d.mkdir(parents=True, exist_ok=True)
    return d


class _ExportWrapper(nn.Module):
    """What the ONNX graph computes: restored frame and defect probability (sigmoid inside)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        restored, logit = self.model(x)
        return restored, torch.sigmoid(logit)


ONNX_INPUT = "input"
ONNX_OUTPUTS = ("restored", "defect_probability")


def export_onnx(model: nn.Module, manifest: Manifest, path: Path, max_side: int = 4096) -> Path:
    """Export a package's network to ONNX with dynamic height and width (multiples of the network's).

    Needs ``onnx`` and ``onnxscript`` (torch's exporter). Written atomically; returns ``path``.
    """
    for mod in ("onnx", "onnxscript"):
        if importlib.util.find_spec(mod) is None:
            raise BackendUnavailable(f"ONNX export needs {mod}; install the GPU extra: pip install 'cdae[gpu]' {mod}")
    m = manifest.architecture.multiple
    c = manifest.architecture.in_channels
    wrapper = _ExportWrapper(model.float().eval().cpu()).eval()
    blocks = max(2, max_side // m)
    # height and width are multiples of 2**depth: say so, or export trips over the U-Net's skip concat
    hb = torch.export.Dim("height_blocks", min=1, max=blocks)
    wb = torch.export.Dim("width_blocks", min=1, max=blocks)
    example = torch.zeros(1, c, 4 * m, 6 * m)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    try:
        with warnings.catch_warnings():
            # the exporter reports its progress and internal deprecations as warnings and log lines
            warnings.simplefilter("ignore")
            quiet.setLevel(logging.ERROR)
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS),
                dynamic_shapes=({2: m * hb, 3: m * wb},), opset_version=ONNX_OPSET, external_data=False,
                verbose=False,
            )
            if program is None:
                raise BackendError("torch.onnx.export returned no program")
            program.save(str(tmp), external_data=False)
    finally:
        quiet.setLevel(level)
    os.replace(tmp, path)
    return path


def onnx_artefact(pkg: Path, manifest: Manifest, model: nn.Module, cache: Path, max_side: int, log: Log) -> Path:
    """The package's ONNX file: an exported one recorded beside the package (its sha256 checked), else the
    cache's (exported once, its sha256 recorded beside it and checked at every later load)."""
    recorded = [Path(pkg) / a.path for a in manifest.artefacts if a.kind == "onnx"]
    for exported in [*recorded, Path(pkg) / EXPORT_DIR / f"{manifest.name}-{manifest.version}.onnx"]:
        if exported.is_file():
            read_verified_artefact(Path(pkg), manifest, exported, "onnx")
            return exported
    path = cache / "onnx" / f"{manifest.name}-{manifest.version}-w{manifest.weights_sha256[:12]}-x{ONNX_EXPORT_FORMAT}.onnx"
    if not path.is_file() or not _cache_intact(path, log):
        log(f"exporting {manifest.ref} to {path}")
        try:
            export_onnx(model, manifest, path, max_side=max_side)
        except BackendError:
            raise
        except Exception as e:  # the exporter raises many types; the engine reports one
            raise BackendError(f"ONNX export of {manifest.ref} failed: {type(e).__name__}: {e}") from e
        _record_cache_hash(path)
    return path


def build_plan(onnx_path: Path, profile: ShapeProfile, precision: str, workspace_mib: int, log: Log) -> bytes:
    """Parse ONNX and build a serialised TensorRT plan with one optimisation profile."""
    trt = _import_tensorrt()
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
        trt = _import_tensorrt()
        _require_cuda(self.name)
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
        self._pinned_in = _PinnedBuffers()
        self._pinned_out = _PinnedBuffers()
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
                    if not _cache_intact(candidate, log, data):
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
            self.plan_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.plan_path.with_name(self.plan_path.name + f".{os.getpid()}.tmp")
            tmp.write_bytes(plan)
            os.replace(tmp, self.plan_path)
            _record_cache_hash(self.plan_path, plan)
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
        c, h, w = x.shape
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self.stream):
            host_in = self._pinned_in.get((1, c, h, w))
            host_in.numpy()[0] = x
            dev = host_in.to(self.torch_device, non_blocking=True)
            padded, _ = pad_to_multiple(dev, self.multiple)
            padded = padded.contiguous()  # TensorRT's input binding is linear NCHW
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
            host_out = self._pinned_out.get((2, h, w))
            host_out[0].copy_(outs[ONNX_OUTPUTS[0]][0, 0, :h, :w], non_blocking=True)
            host_out[1].copy_(outs[ONNX_OUTPUTS[1]][0, 0, :h, :w], non_blocking=True)
            # padded must stay alive until the engine has read it: synchronise before it goes
            self.stream.synchronize()
            out = host_out.numpy().copy()
        return out[0], out[1]

    def close(self) -> None:
        self._device_out.clear()
        self._pinned_in.clear()
        self._pinned_out.clear()
        self.context = None
        self.engine = None
        torch.cuda.empty_cache()


# --- choosing and loading ----------------------------------------------------------------------

def resolve_kind(kind: str) -> str:
    """The backend ``auto`` would pick here, or ``kind`` itself after checking it can run."""
    if kind == "auto":
        if cuda_available() and tensorrt_importable():
            return "tensorrt"
        return "torch-cuda" if cuda_available() else "torch-cpu"
    if kind not in BACKEND_KINDS:
        raise BackendError(f"unknown backend {kind!r}; expected one of {', '.join(BACKEND_KINDS)}")
    if kind in ("torch-cuda", "tensorrt"):
        _require_cuda(kind)
    if kind == "tensorrt":
        _import_tensorrt()
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
                return _make(k, manifest, model, pkg, options, log)
            except ArtefactIntegrityError:
                raise  # a changed artefact is refused loudly, not hidden by the next backend
            except BackendError as e:
                if k == candidates[-1]:
                    raise
                log(f"backend {k} unavailable ({e}); trying the next")
        raise AssertionError("unreachable")
    return _make(resolve_kind(kind), manifest, model, pkg, options, log)


def _make(kind: str, manifest: Manifest, model: nn.Module, pkg: Path, options: BackendOptions, log: Log) -> Backend:
    if kind == "torch-cpu":
        return TorchCPUBackend(manifest, model)
    if kind == "passthrough":
        return PassthroughBackend(manifest)
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(manifest, model, pkg, options, log)
    if kind == "torch-cuda":
        return TorchCUDABackend(manifest, model, options)
    if kind == "tensorrt":
        return TensorRTBackend(manifest, model, pkg, options, log)
    raise BackendError(f"unknown backend {kind!r}; expected one of {', '.join(BACKEND_KINDS)}")
