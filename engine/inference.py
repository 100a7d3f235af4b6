"""Offline use of a model package: a thin caller of the one frame path (``cdae.engine.pipeline``).

``cdae denoise``, ``cdae evaluate``, fine-tuning and fusion run frames through
:func:`~cdae.engine.pipeline.denoise_frame` on the package's torch network
(:class:`~cdae.engine.backends.TorchBackend`), exactly as the engine's ``torch-cpu`` backend serves
them: an evaluated number is a number of the live filter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cdae.engine.backends import TorchBackend
from cdae.engine.badpixels import BadPixelMap
from cdae.engine.guard import GuardConfig, for_package
from cdae.engine.normalise import NormalisationError
from cdae.engine.package import Manifest, load_model
from cdae.engine.pipeline import FrameResult, denoise_frame


class Denoiser:
    """A loaded model package, ready to denoise 2-D frames on a torch device."""

    def __init__(self, manifest: Manifest, model: nn.Module, device: str | torch.device = "cpu",
                 guard: GuardConfig | None = None) -> None:
        self.manifest = manifest
        self.backend = TorchBackend(manifest, model, device)
        self.guard = guard  # None: the network's output as it is (a 'calibrated' threshold: see from_package)

    @classmethod
    def from_package(cls, pkg: Path | str, device: str | torch.device = "cpu",
                     guard: GuardConfig | None = None) -> Denoiser:
        manifest, model = load_model(pkg)
        return cls(manifest, model, device, for_package(guard, pkg) if guard is not None else None)

    def __call__(self, frame: np.ndarray, bit_depth: int | None = None,
                 bad_pixels: BadPixelMap | None = None) -> FrameResult:
        """Denoise one 2-D frame of any supported dtype; output keeps its dtype and shape.

        ``bad_pixels``: the camera's bad-pixel map, filled in the denoised frame (defect probability 1 there).
        """
        _refuse_empty(frame)
        return denoise_frame(frame, self.backend, bit_depth=bit_depth, bad_pixels=bad_pixels, guard_config=self.guard)

    def denoise_dn(self, frame: np.ndarray, adc_max: float) -> tuple[np.ndarray, np.ndarray]:
        """Float DN in, float32 DN out (not rounded or clipped: scores round like the camera) plus the
        defect probability: the same path, for evaluation on simulated float frames."""
        _refuse_empty(frame)
        r = denoise_frame(np.asarray(frame, dtype=np.float32), self.backend, adc_max=float(adc_max),
                          want_residual=False, guard_config=self.guard)
        return r.denoised, r.defect_probability


def _refuse_empty(frame: np.ndarray) -> None:
    """A frame with no pixels has nothing to denoise (the frame path would fail deep inside, unhelpfully)."""
    if np.size(frame) == 0:
        raise NormalisationError(f"empty frame (shape {np.shape(frame)}): nothing to denoise; expected a 2-D "
                                 "frame with pixels")
