"""What every backend shares: the :class:`Backend` interface, and the CUDA helpers of the GPU backends."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch

from cdae.engine.architecture import pad_to_multiple
from cdae.engine.errors import BackendError, BackendUnavailable
from cdae.engine.package import Manifest

Log = Callable[[str], None]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def require_cuda(kind: str) -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            f"{kind} backend needs a CUDA GPU and a CUDA build of torch "
            f"(torch {torch.__version__}: torch.cuda.is_available() is False); use --backend torch-cpu"
        )


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


# --- the GPU backends' host buffers -------------------------------------------------------------

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


class HostStaging:
    """A GPU backend's way in and out: pinned host buffers, asynchronous copies on its stream, one sync a call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._in = _PinnedBuffers()
        self._out = _PinnedBuffers()

    def upload(self, x: np.ndarray, multiple: int,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """(C, H, W) host input → (1, C, H', W') on the device, padded to multiples of ``multiple``
        (the copy is queued on the current stream)."""
        c, h, w = x.shape
        host_in = self._in.get((1, c, h, w))
        host_in.numpy()[0] = x
        dev = host_in.to(self.device, non_blocking=True)
        padded, _ = pad_to_multiple(dev, multiple)
        return padded.contiguous(memory_format=memory_format)

    def download(self, restored: torch.Tensor, prob: torch.Tensor, h: int, w: int,
                 stream: torch.cuda.Stream) -> tuple[np.ndarray, np.ndarray]:
        """The top-left (h, w) of each (1, 1, H, W) output, on the host once ``stream`` has finished."""
        host_out = self._out.get((2, h, w))
        host_out[0].copy_(restored[0, 0, :h, :w], non_blocking=True)
        host_out[1].copy_(prob[0, 0, :h, :w], non_blocking=True)
        stream.synchronize()
        out = host_out.numpy().copy()  # the pinned buffer is reused by the next call
        return out[0], out[1]

    def clear(self) -> None:
        self._in.clear()
        self._out.clear()
