"""Input normalisation and output denormalisation: pure functions of arrays.

Frames arrive in detector units (DN) of any integer or float type. The network sees
``(frame - offset) / scale`` where offset and scale are robust per-frame statistics (low and high
percentiles): cameras differ in bias, gain and exposure from frame to frame, so fixed constants
recorded at install time would not stay true. The percentiles and the floor on ``scale`` are
recorded in each model's manifest.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "int32", "float32", "float64", "uint32", "int8")


class NormalisationError(ValueError):
    """A frame cannot be normalised (wrong type, non-finite values, bad bit depth)."""


class NormalisationConfig(BaseModel):
    """How a frame is mapped to the network's input range; saved in the model manifest."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["percentile"] = "percentile"
    low_percentile: float = Field(0.5, ge=0.0, lt=50.0, description="percentile taken as offset (dark level)")
    high_percentile: float = Field(99.9, gt=50.0, le=100.0, description="percentile mapped to 1.0")
    min_scale_fraction: float = Field(
        2e-3, gt=0.0, description="floor on scale as a fraction of the ADC full scale (flat frames)"
    )
    max_samples: int = Field(
        65536, ge=1024, description="percentiles use a regular pixel grid of at most about this many pixels"
    )


def adc_max_for(dtype: np.dtype | str, bit_depth: int | None = None) -> float:
    """Full-scale value (saturation level) of a frame type; ``inf`` for float frames without a bit depth.

    12-bit cameras deliver uint16 containers: pass ``bit_depth=12`` to get 4095.
    """
    dt = np.dtype(dtype)
    if bit_depth is not None:
        if not 1 <= bit_depth <= 32:
            raise NormalisationError(f"bit depth must be 1..32, got {bit_depth}")
        return float(2**bit_depth - 1)
    if dt.kind in "ui":
        return float(np.iinfo(dt).max)
    if dt.kind == "f":
        return math.inf
    raise NormalisationError(f"unsupported frame dtype {dt}; expected one of {', '.join(SUPPORTED_DTYPES)}")


def frame_offset_scale(frame: np.ndarray, adc_max: float, config: NormalisationConfig) -> tuple[float, float]:
    """Robust per-frame (offset, scale) in DN.

    Saturated pixels are left out of the percentiles: a saturated glint or bloom trail covering a
    few percent of the frame would otherwise set the scale and squash the real scene.
    """
    h, w = frame.shape[-2:]
    s = max(1, int(math.sqrt(h * w / config.max_samples)))
    sample = np.asarray(frame[::s, ::s], dtype=np.float32).ravel()
    if math.isfinite(adc_max):
        unsaturated = sample[sample < adc_max - 0.5]
        if unsaturated.size >= max(16, sample.size // 10):
            sample = unsaturated
    lo, hi = np.percentile(sample, [config.low_percentile, config.high_percentile])
    lo = float(lo)
    span = float(hi) - lo
    full_scale = adc_max if math.isfinite(adc_max) else max(float(np.max(np.abs(sample))), 1.0)
    floor = config.min_scale_fraction * full_scale
    return lo, max(span, floor, 1e-6)


def network_input(frame: np.ndarray, adc_max: float, config: NormalisationConfig) -> tuple[np.ndarray, float, float]:
    """Build the (2, H, W) float32 network input: normalised frame and saturation mask.

    Returns the input and the (offset, scale) needed to denormalise the network's output.
    """
    if frame.ndim != 2:
        raise NormalisationError(f"expected a 2-D frame, got shape {frame.shape}")
    f = np.asarray(frame, dtype=np.float32)
    if not np.isfinite(f).all():
        raise NormalisationError(f"frame contains {int((~np.isfinite(f)).sum())} NaN/Inf pixels")
    offset, scale = frame_offset_scale(f, adc_max, config)
    x = np.empty((2, *f.shape), dtype=np.float32)
    np.subtract(f, offset, out=x[0])
    x[0] *= np.float32(1.0 / scale)
    if math.isfinite(adc_max):
        # a clipped pixel carries no noise: the network is told which ones are
        np.greater_equal(f, np.float32(adc_max - 0.5), out=x[1], casting="unsafe")
    else:
        x[1] = 0.0
    return x, offset, scale


def denormalise(y: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """Network output back to DN (float32)."""
    out = np.asarray(y, dtype=np.float32) * np.float32(scale)
    out += np.float32(offset)
    return out


def to_dtype(frame_dn: np.ndarray, dtype: np.dtype | str, adc_max: float) -> np.ndarray:
    """Cast a float DN frame to the camera's type: round and clip integers to the valid range."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return frame_dn.astype(dt, copy=False)
    info = np.iinfo(dt)
    hi = min(float(info.max), adc_max)
    lo = float(info.min) if dt.kind == "i" else 0.0
    return np.clip(np.rint(frame_dn), lo, hi).astype(dt)
