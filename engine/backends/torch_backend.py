"""``torch-cpu``: the package's network in FP32 with channels-last memory (oneDNN); works everywhere.

:class:`TorchBackend` is the same network on any torch device, what offline use runs on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cdae.engine.architecture import pad_to_multiple
from cdae.engine.backends.base import Backend
from cdae.engine.package import Manifest


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

