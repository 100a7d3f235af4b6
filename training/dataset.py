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
        frames.append(EvalFrame(det.noisy, det.clean, det.defect_mask, det.adc_max, bits, scene.kind))
    return frames
