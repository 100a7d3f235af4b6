"""``torch-cuda``: FP16/BF16 autocast, channels-last, pinned host buffers, CUDA graphs captured for each
steady input shape; with ``device_pre_post`` (the default) the frame path's pre- and post-processing on the
GPU too (:mod:`cdae.engine.device_frame`): one upload of the camera frame, one download of the results."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cdae.engine.architecture import pad_to_multiple
from cdae.engine.backends.base import Backend, HostStaging, require_cuda
from cdae.engine.config import BackendOptions
from cdae.engine.device_frame import FrameStaging, GuardGraphs
from cdae.engine.errors import BackendError
from cdae.engine.package import Manifest


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


class TorchCUDABackend(Backend):
    """The package's network on a CUDA GPU: autocast, channels-last, pinned memory, CUDA graphs."""

    name = "torch-cuda"
    GRAPH_AFTER = 2  # capture a shape's graph the second time it is seen (a steady shape)

    def __init__(self, manifest: Manifest, model: nn.Module, options: BackendOptions,
                 log: Callable[[str], None] = lambda s: None) -> None:
        require_cuda(self.name)
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
        self._staging = HostStaging(dev)
        self.frame_on_device = options.device_pre_post  # the pipeline then runs on this GPU (device_frame)
        self.host_statistics = options.host_statistics  # its scalar decisions read on the host (device_frame)
        self.tile_batch = options.tile_batch
        self.frame_staging = FrameStaging(dev)
        # the guard after its noise model as one CUDA graph per frame shape (device_frame.GuardGraphs)
        self.guard_graphs = GuardGraphs(dev, options.max_guard_graphs, log) \
            if options.cuda_graphs and options.guard_graphs else None
        self._graphs: OrderedDict[tuple[int, ...], _Graph] = OrderedDict()
        self._seen: dict[tuple[int, ...], int] = {}
        self.graph_captures = 0

    def describe(self) -> dict[str, str | int | float | bool | None]:
        return {
            **super().describe(), "gpu": torch.cuda.get_device_name(self.torch_device),
            "precision": str(self.autocast).replace("torch.", "") if self.autocast else "float32",
            "cuda_graphs": self.use_graphs, "graph_captures": self.graph_captures,
            "device_pre_post": self.frame_on_device, "host_statistics": self.host_statistics,
            "guard_graph_captures": self.guard_graphs.captures if self.guard_graphs is not None else 0,
            "guard_graphs": self.guard_graphs.state if self.guard_graphs is not None else "off",
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

    def _network(self, padded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H', W') padded input → (N, 1, H', W') restored and probability: a graph replay once the shape is
        steady (its static outputs: valid until the next replay of that shape), else eager."""
        g = self._graph_for(padded)
        if g is None:
            return self._forward(padded)
        g.static_in.copy_(padded)
        g.graph.replay()
        return g.static_restored, g.static_prob

    @torch.no_grad()
    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, h, w = x.shape
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self.stream):
            padded = self._staging.upload(x, self.multiple, torch.channels_last)
            restored, prob = self._network(padded)
            return self._staging.download(restored, prob, h, w, self.stream)

    @torch.no_grad()
    def infer_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (C, h, w) input already on the GPU → (restored, probability) on it (called inside ``device_scope``)."""
        restored, prob = self.infer_batch(x[None])
        return restored[0], prob[0]

    @torch.no_grad()
    def infer_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, h, w) tiles of one shape on the GPU → (N, h, w) restored and probability, in one call (one graph)."""
        _, _, h, w = x.shape
        padded, _ = pad_to_multiple(x[:, : self.architecture.in_channels], self.multiple)
        restored, prob = self._network(padded.contiguous(memory_format=torch.channels_last))
        return restored[:, 0, :h, :w], prob[:, 0, :h, :w]

    def device_scope(self) -> contextlib.AbstractContextManager[object]:
        """This GPU and this backend's stream current: the device path's copies and kernels queue there."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.torch_device))
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def close(self) -> None:
        self._graphs.clear()
        self.guard_graphs = None
        self._staging.clear()
        self.model = None  # type: ignore[assignment]
        torch.cuda.empty_cache()

