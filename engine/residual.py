"""The residual, raw − denoised in float32: one definition for the engine's pipeline and the filter IOC.

The IOC computes ``Residual:ArrayData`` itself from the raw frame and the denoised frame it publishes
(only when someone reads it), so the engine does not send it; offline use (``cdae denoise``) takes it
from :func:`cdae.engine.pipeline.denoise_frame`. NumPy only.
"""

from __future__ import annotations

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)


def residual_of(frame: np.ndarray, denoised: np.ndarray) -> np.ndarray:
    """raw − denoised in float32. A float frame near float32's limits (±3e38) can have a difference beyond them:
    those pixels saturate at ±float32 max (never inf), every other pixel is the float32 difference as before."""
    with np.errstate(over="ignore"):
        residual = np.subtract(frame, denoised, dtype=np.float32)
    if frame.dtype.kind == "f" and not np.isfinite(residual).all():
        wide = np.subtract(frame, denoised, dtype=np.float64)
        bad = ~np.isfinite(residual)
        residual[bad] = np.clip(wide[bad], -F32_MAX, F32_MAX)
    return residual
