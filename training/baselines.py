"""The classical filters a CDAE must beat, each tuned fairly on a validation set.

A :class:`Baseline` is a named callable ``(noisy float32 DN, adc_max) -> float32 DN``. Its
name is its whole configuration ("median3", "gaussian1.5"), so a report or a model
manifest can record which hand-tuned filter the model was compared against.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from cdae.training.metrics import psnr

__all__ = [
    "BASELINE_FAMILIES",
    "BASELINE_GRID",
    "Baseline",
    "BaselineError",
    "FrameLike",
    "gaussian_filter",
    "make_baseline",
    "median_filter",
    "score_baselines",
    "tune_baselines",
]

BASELINE_FAMILIES = ("median", "gaussian")


class BaselineError(ValueError):
    """A baseline that cannot be built or run (bad name, bad parameter, not a 2-D frame)."""


class FrameLike(Protocol):
    """What tuning needs of a frame (``cdae.training.metrics.EvalFrame`` has it)."""

    @property
    def noisy(self) -> np.ndarray: ...
    @property
    def clean(self) -> np.ndarray: ...
    @property
    def defect_mask(self) -> np.ndarray: ...
    @property
    def adc_max(self) -> int: ...


def _frame(frame: np.ndarray) -> np.ndarray:
    arr = np.asarray(frame, dtype=np.float32)
    if arr.ndim != 2:
        # A 3-D stack would be filtered across frames too; callers loop over frames instead.
        raise BaselineError(f"expected a 2-D frame (H, W); got shape {arr.shape}")
    return arr


def median_filter(frame: np.ndarray, size: int) -> np.ndarray:
    """Square ``size`` x ``size`` median on float32 DN, reflect borders."""
    if size < 1 or size % 2 == 0:
        # Even windows shift the image by half a pixel.
        raise BaselineError(f"median size must be an odd integer >= 1; got {size}")
    return ndimage.median_filter(_frame(frame), size=size, mode="reflect")


def gaussian_filter(frame: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels on float32 DN, reflect borders."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise BaselineError(f"gaussian sigma must be a finite number > 0 pixels; got {sigma}")
    return ndimage.gaussian_filter(_frame(frame), sigma=float(sigma), mode="reflect")


@dataclass(frozen=True)
class Baseline:
    """A named classical filter: ``family`` ("median" | "gaussian") and its parameter.

    The output is clipped to ``[0, adc_max]``, the range the camera can report.
    """

    family: str
    parameter: float

    def __post_init__(self) -> None:
        if self.family not in BASELINE_FAMILIES:
            raise BaselineError(
                f"unknown baseline family {self.family!r}; expected one of {BASELINE_FAMILIES}"
            )

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``median3`` or ``gaussian1.5``; :func:`make_baseline` parses it."""
        if self.family == "median":
            return f"median{int(self.parameter)}"
        return f"gaussian{float(self.parameter)!r}"

    def __call__(self, noisy: np.ndarray, adc_max: int) -> np.ndarray:
        """Filter one frame (float32 DN) and clip to ``[0, adc_max]``."""
        if self.family == "median":
            out = median_filter(noisy, int(self.parameter))
        else:
            out = gaussian_filter(noisy, self.parameter)
        return np.clip(out, 0, adc_max).astype(np.float32, copy=False)

    def __str__(self) -> str:
        return self.name


_NAME = re.compile(r"^(median)(\d+)$|^(gaussian)(\d+(?:\.\d*)?|\.\d+)$")


def make_baseline(name: str) -> Baseline:
    """Parse a baseline name: ``median<odd size>`` or ``gaussian<sigma>`` (e.g. ``gaussian1.5``)."""
    m = _NAME.match(name.strip().lower())
    if m is None:
        raise BaselineError(
            f"unknown baseline {name!r}; expected 'median<odd size>' or 'gaussian<sigma>', "
            "e.g. 'median3' or 'gaussian1.5'"
        )
    if m.group(1):
        size = int(m.group(2))
        if size < 1 or size % 2 == 0:
            raise BaselineError(f"baseline {name!r}: median size must be odd and >= 1; got {size}")
        return Baseline("median", float(size))
    sigma = float(m.group(4))
    if sigma <= 0:
        raise BaselineError(f"baseline {name!r}: gaussian sigma must be > 0; got {sigma}")
    return Baseline("gaussian", sigma)


BASELINE_GRID: tuple[Baseline, ...] = tuple(
    make_baseline(n)
    for n in (
        "median3",
        "median5",
        "median7",
        "gaussian0.5",
        "gaussian0.75",
        "gaussian1.0",
        "gaussian1.5",
        "gaussian2.0",
        "gaussian3.0",
    )
)


def score_baselines(frames: Sequence[FrameLike], baselines: Iterable[Baseline]) -> dict[str, float]:
    """Mean PSNR (dB, ``data_range = adc_max``) of each baseline over ``frames``, by name."""
    if len(frames) == 0:
        raise BaselineError("expected at least one validation frame; got none")
    scores: dict[str, float] = {}
    for baseline in baselines:
        values = [psnr(baseline(f.noisy, f.adc_max), f.clean, f.adc_max) for f in frames]
        scores[baseline.name] = float(np.mean(values))
    return scores


def tune_baselines(
    frames: Sequence[FrameLike],
    families: Sequence[str] = BASELINE_FAMILIES,
    grid: Sequence[Baseline] = BASELINE_GRID,
) -> dict[str, str]:
    """Best parameter of each family on a validation set, by mean PSNR: ``{family: name}``.

    Ties go to the earlier (milder) entry of ``grid``.
    """
    result: dict[str, str] = {}
    for family in families:
        candidates = [b for b in grid if b.family == family]
        if not candidates:
            known = sorted({b.family for b in grid})
            raise BaselineError(f"no baseline of family {family!r} in the grid; expected one of {known}")
        scores = score_baselines(frames, candidates)
        result[family] = max(scores, key=lambda name: scores[name])
    return result
