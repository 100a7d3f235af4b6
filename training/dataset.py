"""Simulated frame streams: frame ``index`` of stream ``seed`` is a pure function of both.

Training, validation and held-out evaluation draw from different seeds, so the sets are
disjoint by construction and any frame can be regenerated without storing data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cdae.training.config import DataConfig
from cdae.training.defects import simulate_frame
from cdae.training.metrics import EvalFrame


def bit_depth_for(bit_depths: Sequence[int], seed: int, index: int) -> int:
    """The bit depth of frame ``index`` of stream ``seed`` (drawn from its own generator)."""
    return int(bit_depths[np.random.default_rng([seed, index, 17]).integers(len(bit_depths))])


def simulated_frames(
    data: DataConfig, seed: int, start: int, count: int, sizes: Sequence[tuple[int, int]]
) -> list[EvalFrame]:
    """Frames ``start .. start+count-1`` of stream ``seed``; frame i has size ``sizes[i % len(sizes)]``."""
    frames: list[EvalFrame] = []
    for index in range(start, start + count):
        h, w = sizes[index % len(sizes)]
        bits = bit_depth_for(data.bit_depths, seed, index)
        scene, det = simulate_frame(seed, index, h, w, bits, data.scene, data.defects)
        frames.append(EvalFrame(det.noisy, det.clean, det.defect_mask, det.adc_max, bits, scene.kind,
                                 det.params.saturation_dn))
    return frames


#: Dark frames and flat fields a site takes to find a camera's bad pixels (``cdae badpixels``).
CALIBRATION_FRAMES = 16
#: Flat-field level, fraction of the full well: well lit, well below saturation.
FLAT_LEVEL = 0.3


def calibration_frames(data: DataConfig, seed: int, index: int, height: int, width: int, bit_depth: int,
                       count: int = CALIBRATION_FRAMES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dark frames and flat fields of frame ``index``'s simulated camera, and its permanent-defect mask.

    The same camera as :func:`simulated_frames` draws for that frame (its parameters and layout of
    dead, hot and bad-line pixels), recorded ``count`` times with no light and ``count`` times under
    even light, with fresh noise (radiation hits included: they fall on darks too) and no glints
    (ghost reflections need light from the scene). Returns (darks, flats) as (count, H, W) float32
    DN and the uint8 mask of DEAD | HOT | BAD_LINE pixels.
    """
    from cdae.training.defects import apply_detector, frame_camera

    _, params, layout = frame_camera(seed, index, height, width, bit_depth, data.defects)
    calib = params.model_copy(update={"saturated_blobs": 0, "exposure_scale": 1.0})
    cal_rng = np.random.default_rng([seed, index, 7])
    dark = np.zeros((height, width), np.float32)
    flat = np.full((height, width), FLAT_LEVEL, np.float32)
    darks = np.stack([apply_detector(dark, cal_rng, calib, layout).noisy for _ in range(count)])
    flats = np.stack([apply_detector(flat, cal_rng, calib, layout).noisy for _ in range(count)])
    return darks, flats, layout.static_mask()
