"""``torch-cpu``: the package's network with channels-last memory (oneDNN), in FP32 or BF16.

:class:`TorchBackend` is the same network on any torch device, what offline use runs on (FP32).

BF16 on the CPU: oneDNN runs the convolutions in bfloat16 (autocast) where the CPU has native
BF16 instructions (AVX512-BF16, AMX); the input's range compression, the residual sum and the
output stay FP32. A package runs in BF16 by ``auto`` only when its manifest holds a passed
``torch-bf16`` parity record for its weights (``cdae export --to torch-bf16``: the frame path
compared with FP32 in DN, and PSNR and bright-feature error on held-out simulated frames), the
CPU has native BF16, and a timing at load shows it faster on this machine. In BF16 the network runs
as fused oneDNN calls (:mod:`cdae.engine.backends.cpu_fused`: each convolution with its activation,
the decoder's concatenations never made), ``backend_options.cpu_kernels = "module"`` runs the module
under autocast instead; FP32, the reference every parity check compares with, is always the module.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdae.engine.architecture import pad_to_multiple
from cdae.engine.backends.base import Backend, Log
from cdae.engine.backends.cpu_fused import FusedCDAE, fused_unsupported
from cdae.engine.device_frame import FrameStaging
from cdae.engine.errors import BackendError
from cdae.engine.package import ArtefactRecord, Manifest

#: Frame side of the timing that decides ``auto``: large enough for oneDNN's steady kernels, quick at load.
TIMING_SIDE = 256


def cpu_bf16_native() -> bool:
    """Whether oneDNN has native BF16 kernels on this CPU (AVX512-BF16 or AMX); without, BF16 is emulated, slow."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_record(manifest: Manifest) -> ArtefactRecord | None:
    """The package's passed ``torch-bf16`` parity record for its current weights, if any."""
    for a in manifest.artefacts:
        if a.kind == "torch-bf16" and a.sha256 == manifest.weights_sha256 and a.parity.get("passed") is True:
            return a
    return None


class TorchBackend(Backend):
    """The package's network on a torch device; channels-last on the CPU (oneDNN).

    ``autocast``: None (FP32) or a dtype the convolutions run in (``torch.bfloat16`` on the CPU).
    The engine's ``torch-cpu`` backend, and what offline use (:class:`cdae.engine.inference.Denoiser`)
    runs on any device through the same pipeline.
    """

    name = "torch"

    def __init__(self, manifest: Manifest, model: nn.Module, device: str | torch.device = "cpu",
                 autocast: torch.dtype | None = None, device_pre_post: bool = False) -> None:
        dev = torch.device(device)
        super().__init__(manifest, str(dev))
        self.torch_device = dev
        self.autocast = autocast
        # the pipeline's pre/post-processing in torch on this device (off: NumPy on the host, torch-cpu's numbers)
        self.frame_on_device = device_pre_post
        self.frame_staging = FrameStaging(dev)
        self.model = model.to(dev).eval()
        if dev.type == "cpu":
            # channels-last halves CPU convolution time with oneDNN
            self.model = self.model.to(memory_format=torch.channels_last)
        #: the BF16 network as fused oneDNN calls (TorchCPUBackend sets it; None: the module under autocast)
        self.fused: FusedCDAE | None = None

    def _network(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None and self.autocast is torch.bfloat16:
            return self.fused(t)  # planar in, its own layout inside
        if self.torch_device.type == "cpu":
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.torch_device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            return self.model(t)

    def _padded(self, t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``t`` padded to the network's multiple; in BF16 on the CPU also to at least two of it per side: oneDNN's
        BF16 stride-2 convolution (AMX, torch 2.13) returns NaN, at random, where its output is one pixel wide
        (a frame up to ``multiple`` pixels wide reaches a one-pixel bottleneck; autocast and the fused plan alike)."""
        t, (h, w) = pad_to_multiple(t, self.multiple)
        if self.torch_device.type == "cpu" and self.autocast is torch.bfloat16:
            least = 2 * self.multiple
            ph, pw = max(0, least - t.shape[-2]), max(0, least - t.shape[-1])
            if ph or pw:
                t = F.pad(t, (0, pw, 0, ph), mode="replicate")
        return t, (h, w)

    @torch.inference_mode()
    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(self.torch_device)
        t, (h, w) = self._padded(t)
        restored, logit = self._network(t)
        restored_np = restored[0, 0, :h, :w].float().cpu().numpy()
        prob = torch.sigmoid(logit[0, 0, :h, :w].float()).cpu().numpy()
        return restored_np, prob

    @torch.no_grad()
    def infer_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``_run`` on a (C, h, w) tensor already on the device: (restored, probability) stay there."""
        t, (h, w) = self._padded(x[: self.architecture.in_channels][None])
        restored, logit = self._network(t)
        return restored[0, 0, :h, :w].float(), torch.sigmoid(logit[0, 0, :h, :w].float())

    def device_scope(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast, str(self.autocast))


class TorchCPUBackend(TorchBackend):
    """The engine's CPU backend: :class:`TorchBackend` on the CPU, FP32 or BF16 (``precision``)."""

    name = "torch-cpu"

    def __init__(self, manifest: Manifest, model: nn.Module, precision: str = "fp32", log: Log = lambda s: None,
                 kernels: str = "fused") -> None:
        super().__init__(manifest, model, "cpu")
        if kernels not in ("fused", "module"):
            raise BackendError(f"torch-cpu: unknown cpu_kernels {kernels!r}; expected fused or module")
        self.kernels = "module"
        if kernels == "fused" and precision != "fp32" and cpu_bf16_native():
            why = fused_unsupported(self.model)
            if why is None:
                self.fused = FusedCDAE(self.model)  # type: ignore[arg-type]
                self.kernels = "fused"
            else:
                log(f"torch-cpu: bf16 runs the module under autocast ({why})")
        self.choice = ""
        self.autocast = self._choose(precision, log)

    def _choose(self, precision: str, log: Log) -> torch.dtype | None:
        if precision == "fp32":
            self.choice = "fp32 (asked)"
            return None
        if precision == "fp16":
            raise BackendError("torch-cpu runs in fp32 or bf16 (FP16 convolutions have no CPU kernels worth using); "
                               "set precision to auto, bf16 or fp32")
        native = cpu_bf16_native()
        if precision == "bf16":
            if not native:
                raise BackendError("torch-cpu: bf16 needs a CPU with native BF16 (AVX512-BF16 or AMX); this one "
                                   "emulates it, slower than fp32; set precision to auto or fp32")
            self.choice = "bf16 (asked)"
            return torch.bfloat16
        if precision != "auto":
            raise BackendError(f"torch-cpu: unknown precision {precision!r}; expected auto, bf16 or fp32")
        if not native:
            self.choice = "fp32 (auto: no native BF16 on this CPU)"
            return None
        if bf16_record(self.manifest) is None:
            self.choice = (f"fp32 (auto: {self.ref} has no passed torch-bf16 parity record for its weights; "
                           "`cdae export --to torch-bf16` makes one)")
            return None
        fp32_s, bf16_s = self._time(None), self._time(torch.bfloat16)
        if bf16_s >= fp32_s:
            self.choice = f"fp32 (auto: bf16 not faster here, {bf16_s * 1e3:.0f} vs {fp32_s * 1e3:.0f} ms)"
            return None
        self.choice = f"bf16 (auto: parity recorded, {fp32_s / bf16_s:.1f}x fp32 on a {TIMING_SIDE}² frame here)"
        log(f"torch-cpu: {self.choice}")
        return torch.bfloat16

    def _time(self, dtype: torch.dtype | None, repeats: int = 3) -> float:
        self.autocast = dtype
        x = np.zeros((self.architecture.in_channels, TIMING_SIDE, TIMING_SIDE), np.float32)
        x[0] = np.random.default_rng(0).random((TIMING_SIDE, TIMING_SIDE), dtype=np.float32)
        self._run(x)  # first call: oneDNN picks and caches its kernels
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            self._run(x)
            best = min(best, time.perf_counter() - t)
        return best

    def describe(self) -> dict[str, str | int | float | bool | None]:
        return {**super().describe(), "threads": torch.get_num_threads(), "precision": self.precision,
                "precision_choice": self.choice,
                "bf16_kernels": self.kernels if self.autocast is torch.bfloat16 else None}
