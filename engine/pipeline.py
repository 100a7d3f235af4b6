"""One frame through cdae: normalise once → tiles → backend → stitch → denormalise → camera dtype
→ the camera's bad-pixel map filled.

This is the only frame path: the engine server calls :func:`denoise_frame` per request, the hot
swap calls :func:`warm_up` on the live shape, and offline use (``cdae denoise``, ``cdae evaluate``,
:class:`cdae.engine.inference.Denoiser`) calls the same function, so evaluated numbers are the live
filter's. Pure functions over a backend (anything with ``infer``, ``multiple`` and ``max_side``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cdae.engine.architecture import ArchitectureConfig
from cdae.engine.badpixels import BadPixelMap
from cdae.engine.guard import BAD_PIXEL_MAP, GuardConfig, count_flags, guard
from cdae.engine.normalise import NormalisationConfig, adc_max_for, denormalise, network_input, to_dtype
from cdae.engine.residual import residual_of
from cdae.engine.tiling import plan_tiles, run_tiled


class NetworkRunner(Protocol):
    """What the pipeline needs from a backend."""

    multiple: int
    max_side: int | None
    normalisation: NormalisationConfig
    architecture: ArchitectureConfig

    def infer(self, x: np.ndarray) -> Sequence[np.ndarray]:  # (C, h, w) → (restored, defect_probability)
        ...


@dataclass(frozen=True)
class FrameResult:
    denoised: np.ndarray  # the frame's dtype and shape
    residual: np.ndarray | None  # float32 raw − denoised, when asked for
    defect_probability: np.ndarray  # float32 in [0, 1]
    tiles: int
    inference_ms: float  # the whole path, guard and bad-pixel fill included
    flags: np.ndarray | None = None  # uint8 flag class per pixel (``guard.FLAG_NAMES``), when guarded
    flag_counts: dict[str, int] | None = None  # pixels per flag class, when guarded


def receptive_radius(arch: ArchitectureConfig) -> int:
    """An upper bound, in input pixels, on how far the CDAE looks from an output pixel.

    3x3 convolutions at scale s reach s pixels; each 2x2 stride-2 down/up-sampling step reaches
    one pixel at its finer scale. Tiles whose margin covers this reproduce the whole-frame result.
    """
    n, d = arch.convs_per_level, arch.depth
    encoder = n + sum(2 ** (i - 1) + n * 2**i for i in range(1, d + 1))
    decoder = sum(2**i + n * 2 ** (i - 1) for i in range(1, d + 1))
    return encoder + decoder


def tile_margin(arch: ArchitectureConfig, requested: int | None = None) -> int:
    """The margin used for tiling: at least the receptive radius, on the downsampling grid."""
    m = max(receptive_radius(arch), requested or 0)
    return -(-m // arch.multiple) * arch.multiple


def denoise_frame(
    frame: np.ndarray,
    runner: NetworkRunner,
    *,
    bit_depth: int | None = None,
    max_pixels: int = 4096 * 4096,
    margin: int | None = None,
    want_residual: bool = True,
    bad_pixels: BadPixelMap | None = None,
    adc_max: float | None = None,
    guard_config: GuardConfig | None = None,
) -> FrameResult:
    """Denoise one 2-D frame of any supported dtype; tiles when larger than ``max_pixels``.

    The network input (offset, scale, saturation mask) is computed once on the whole frame and
    the tiles are cut from it, so tiled and untiled frames see identical inputs. ``bad_pixels``:
    the camera's map, filled in the denoised frame after the network (which sees the raw frame it
    was trained on); the residual moves with the fill and the defect probability is 1 there.
    ``adc_max`` (full scale in DN) overrides what ``bit_depth`` and the dtype say, for float frames
    whose camera is known. ``guard_config``: hold the output to the camera's noise and flag every
    pixel that moves further, with its class (``cdae.engine.guard``); None: the network's output.
    A runner with ``frame_on_device`` set runs all of this on its torch device instead
    (:mod:`cdae.engine.device_frame`: the same steps in torch, one upload and one download).
    """
    if getattr(runner, "frame_on_device", False):
        from cdae.engine.device_frame import denoise_frame_on_device, fits_device_path

        if fits_device_path(frame):
            on_device = denoise_frame_on_device(
                frame, runner, bit_depth=bit_depth, max_pixels=max_pixels,  # type: ignore[arg-type]
                margin=tile_margin(runner.architecture, margin), want_residual=want_residual,
                bad_pixels=bad_pixels, adc_max=adc_max, guard_config=guard_config)
            if on_device is not None:
                return on_device
    t0 = time.perf_counter()
    if adc_max is None:
        adc_max = adc_max_for(frame.dtype, bit_depth)
    x, offset, scale = network_input(frame, adc_max, runner.normalisation,
                                     guard_config.full_well_candidates if guard_config is not None else 1)
    tiles = plan_tiles(
        frame.shape, max_pixels=max_pixels, margin=tile_margin(runner.architecture, margin),
        multiple=runner.multiple, max_side=runner.max_side,
    )
    restored, prob = run_tiled(x, runner.infer, tiles)
    out_dn = denormalise(restored, offset, scale)
    flags = counts = None
    if guard_config is not None:
        g = guard(frame, out_dn, x[1] > 0.5, guard_config, prob)
        out_dn, flags, counts = g.output, g.flags, g.counts
    denoised = to_dtype(out_dn, frame.dtype, adc_max)
    residual = None
    if want_residual:
        residual = residual_of(frame, denoised)
    prob = np.asarray(prob, dtype=np.float32)
    if bad_pixels is not None:
        denoised, residual, prob = bad_pixels.fill_output(denoised, residual, prob)
        if flags is not None and counts is not None:
            listed = bad_pixels.mask(frame.shape)
            flags[listed] = BAD_PIXEL_MAP
            counts = count_flags(flags)
    return FrameResult(
        denoised=denoised, residual=residual, defect_probability=prob,
        tiles=len(tiles), inference_ms=(time.perf_counter() - t0) * 1e3, flags=flags, flag_counts=counts,
    )


def synthetic_frame(shape: tuple[int, int], dtype: np.dtype | str, seed: int = 0) -> np.ndarray:
    """A plausible frame for warm-up: a smooth ramp with noise and a few bright spots, in range for ``dtype``."""
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = 0.2 + 0.3 * (yy / max(h, 1)) + 0.2 * (xx / max(w, 1))
    f += rng.normal(0.0, 0.02, size=shape).astype(np.float32)
    f[rng.integers(0, h, 8), rng.integers(0, w, 8)] = 0.95
    if dt.kind in "ui":
        hi = min(float(np.iinfo(dt).max), 65535.0)
        return np.clip(f * hi, 0, hi).astype(dt)
    return (f * 1000.0).astype(dt)


def warm_up(runner: NetworkRunner, shape: tuple[int, int], dtype: np.dtype | str, *, runs: int = 2,
            max_pixels: int = 4096 * 4096, margin: int | None = None) -> float:
    """Run the full path on a synthetic frame of the live shape (autotuning, CUDA graphs); returns the last ms."""
    frame = synthetic_frame(shape, dtype)
    ms = 0.0
    for _ in range(max(1, runs)):
        result = denoise_frame(frame, runner, max_pixels=max_pixels, margin=margin, want_residual=False)
        if not np.isfinite(result.defect_probability).all():
            raise ValueError("warm-up produced non-finite defect probabilities")
        ms = result.inference_ms
    return ms
