"""The output contract: no real pixel moves beyond the camera's noise; every pixel that moves more
is flagged, with its reason.

A camera's noise is Poisson-Gaussian (``sigma^2 = read^2 + (level - offset) / gain`` in DN) and its
optics blur every real feature by at least a minimum PSF. Both bound what real light can look
like, and so what a filter may do to it:

1. **Noise-bounded change.** On every unflagged pixel, ``|out - raw| <= k * sigma(raw)``. The
   network may remove noise, never real structure (a ring, an edge, a point source it doubts).
2. **Flags, each with a class** (:data:`FLAG_NAMES`): the camera's bad-pixel map (filled by the
   map, see ``badpixels``); saturated at the ADC or the full well (information lost: kept raw,
   never "restored"); an impulse (an excursion sharper than the optics allow, at ``n_sigma``
   against the noise model, as L.A.Cosmic tests cosmic rays: replaced by the local background);
   the network's defect head above a threshold calibrated on held-out frames to a stated rate of
   false flags on real bright structure (conformal risk control), where the pixel is also sharper
   than real light through the optics can be (:func:`impulse_evidence`): takes the network's output.

The noise model is measured on the frame itself when the camera's is not given (local variance
against local level on pixel pairs, robust per level bin, a straight-line fit of variance on
level), so the bound holds for cameras nobody characterised. Everything here is numpy on the
whole frame; the cost is benchmarked beside the network's (``bench/guard.py``).
"""

from __future__ import annotations

import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cdae.engine.robust import MAD_TO_SIGMA, percentile
from cdae.engine.robust import median as _median

#: The defect head's calibrated threshold, beside a model package's manifest (``cdae calibrate``).
CALIBRATION_FILE = "guard-calibration.json"

#: Per-pixel flag classes (uint8 codes of the flag map); 0 = not flagged, bounded by the noise.
NONE, BAD_PIXEL_MAP, SATURATED, IMPULSE, LEARNED = 0, 1, 2, 3, 4
FLAG_NAMES: dict[int, str] = {NONE: "none", BAD_PIXEL_MAP: "bad_pixel_map", SATURATED: "saturated",
                              IMPULSE: "impulse", LEARNED: "learned"}


class GuardConfig(BaseModel):
    """How far the filter may move a pixel, and when a pixel counts as a defect instead."""

    model_config = ConfigDict(extra="forbid")

    k_sigma: float = Field(1.0, gt=0, le=10, description="unflagged pixels move at most k sigma of the noise")
    impulse_sigma: float = Field(5.0, gt=0, description="significance of an impulse against the noise model")
    psf_sigma_px: float = Field(0.45, gt=0.2, le=10, description="the optics' narrowest PSF (Gaussian sigma, pixels): "
                                                               "a real feature is never sharper")
    gain_e_per_dn: float | None = Field(None, gt=0, description="the camera's conversion gain; None: measured per frame")
    read_noise_dn: float | None = Field(None, gt=0, description="the camera's read noise, DN RMS (> 0: no camera "
                                        "reads without noise; its rounding alone is 0.29 DN); None: measured")
    offset_dn: float | None = Field(None, description="the camera's bias level, DN; None: measured")
    defect_threshold: float | Literal["calibrated"] | None = Field(
        "calibrated", description="the defect head's probability above which a pixel is flagged 'learned' and takes "
        "the network's output; 'calibrated': the model package's own (``cdae calibrate``), none if it has none; "
        "None: the head flags nothing")
    optics_tolerance: float = Field(0.05, ge=0, le=1, description="how far real optics may be from the PSF model, as "
                                    "a fraction of a feature's excess (added to the noise of the impulse test)")
    line_length: int = Field(9, ge=1, le=64, description="pixels along a column or row over which a bad line's "
                                                         "sharpness is averaged (1: single pixels only)")
    impulse_passes: int = Field(2, ge=1, le=4, description="passes of the impulse test; later ones look again "
                                                           "beside what earlier ones found (wider hits)")
    learned_evidence_sigma: float | None = Field(
        2.0, gt=0, description="a learned flag stands only where the pixel is also an impulse at this significance, "
        "tested against the looser optics of learned_evidence_psf_px: the head's word alone never moves real light "
        "beyond the bound; None: no such test (with learned_peak_sigma None too, the head alone decides)")
    learned_evidence_psf_px: float = Field(1.0, gt=0.2, le=10, description="the optics (Gaussian sigma, pixels) a "
                                           "learned flag's evidence is tested against: blurrier than psf_sigma_px, "
                                           "so weaker evidence than an impulse flag needs")
    learned_peak_sigma: float | None = Field(
        1.0, ge=0, description="a learned flag stands only where the pixel is also sharper than the narrowest "
        "optics (psf_sigma_px) allow, by this significance above or below its surroundings (the median of the 16 "
        "pixels two away): the head may not move a peak or a valley real light can make; None: no such test")
    learned_line_peaks: bool = Field(
        True, description="the peak test also sees lines: a learned flag on a row (column) whose line_length pixels, "
        "averaged along it, are sharper across it than the narrowest optics allow stands (a bad line's noise "
        "averaged down, as the impulse test's line test does); False: single pixels only")
    full_well_candidates: int = Field(
        8, ge=1, le=64, description="pile-ups the full-well search tries (engine.normalise.find_full_well): where "
        "the densest band near the top (what the model was trained with, 1) is no full well, the next highest "
        "peaks, each held to the same tests and with nothing but lone pixels above it; the pixels of one found are "
        "saturated: kept raw, not moved by a shot noise they no longer have")


@dataclass(frozen=True)
class NoiseModel:
    """``sigma(level)^2 = read_dn^2 + max(level - offset_dn, 0) * dn_per_e`` (1 / gain)."""

    read_dn: float
    dn_per_e: float
    offset_dn: float
    measured: bool

    def variance(self, level: np.ndarray) -> np.ndarray:
        var = np.maximum(np.asarray(level, dtype=np.float32) - np.float32(self.offset_dn), 0)
        var *= np.float32(self.dn_per_e)
        var += np.float32(self.read_dn**2)
        return var

    def sigma(self, level: np.ndarray) -> np.ndarray:
        var = self.variance(level)
        return np.sqrt(var, out=var)


@dataclass(frozen=True)
class GuardResult:
    output: np.ndarray  # float32 DN
    flags: np.ndarray  # uint8 class codes
    counts: dict[str, int]  # pixels per flag class
    noise: NoiseModel


def count_flags(flags: np.ndarray) -> dict[str, int]:
    """Pixels per flag class (not ``none``), in one pass over the flag map."""
    return {name: int(np.count_nonzero(flags == c)) for c, name in FLAG_NAMES.items() if c}


def for_package(config: GuardConfig, package: Path | str | None) -> GuardConfig:
    """``config`` with its ``'calibrated'`` threshold replaced by the package's (``CALIBRATION_FILE``), or
    by None (the head flags nothing) where the package has none or it cannot be read."""
    if config.defect_threshold != "calibrated":
        return config
    threshold = None
    if package is not None:
        try:
            record = json.loads((Path(package) / CALIBRATION_FILE).read_text())
            value = record.get("defect_threshold") if isinstance(record, dict) else None
            if isinstance(value, (int, float)) and 0 < value < 1:
                threshold = float(value)
        except (OSError, ValueError):
            threshold = None
    return config.model_copy(update={"defect_threshold": threshold})


def centre_to_neighbour_ratio(psf_sigma_px: float) -> float:
    """Light in a pixel over light in a side neighbour for a Gaussian PSF centred on the pixel and
    sampled at pixel centres: the sharpest a real feature can be (pixel integration and an
    off-centre feature only soften it). ``exp(1 / (2 sigma^2))``: 11.8 at sigma 0.45 px."""
    return math.exp(min(1.0 / (2.0 * psf_sigma_px**2), 50.0))


def measure_noise(raw: np.ndarray, exclude: np.ndarray | None = None, bins: int = 16,
                  max_pairs: int = 1 << 16, quantum: float = 1.0) -> NoiseModel:
    """The frame's own Poisson-Gaussian noise model, from 3x3 blocks of pixels.

    A block's second difference across and down, ``(K * f) / 6`` with Immerkaer's kernel
    ``[[1, -2, 1], [-2, 4, -2], [1, -2, 1]]`` (the product of the two 1-D second differences; Immerkaer,
    "Fast noise variance estimation", 1996), carries the noise variance and, where the scene is smooth, little
    else: a plane cancels, and so does any light that varies along one axis only (an edge, a ramp, a streak
    on the pixel grid). Light passes it only where it curves both ways at the pixel scale, which optics
    blur away: against the 1-D second difference along rows (what this measured before), it cut the mean
    error on the simulator's validation frames to about a third (``experiments/noise_model.py``). The blocks
    do not overlap.
    Smoothness is judged on the blocks above and below (their own second differences), whose noise is
    independent of the block's, so choosing the smoother half does not bias the noise estimate; per
    equal-count level bin (a block's level: its mean) the robust (MAD) variance of the chosen blocks keeps
    edges and defects out. Variance against level is fitted by a line with non-negative slope (shot noise)
    and intercept (read noise); the offset is the frame's 0.1th percentile level. ``max_pairs``: at most
    this many blocks (rows of blocks evenly spaced). ``quantum``: one DN in the frame's units (the rounding's
    variance floor, ``quantum^2 / 12``). Where the install built engine/_impulse.c, its ``noise_fit`` does the
    samples, the sort and the level bins in one call, the same numbers (half the time at 1024²).
    """
    f = np.asarray(raw, dtype=np.float32)
    h, w = f.shape
    by, bx = h // 3, w // 3
    if by < 3 or bx < 1:  # not three rows of blocks: a block, one above and one below
        return NoiseModel(read_dn=1.0, dn_per_e=0.0, offset_dn=float(f.min()) if f.size else 0.0, measured=True)
    stride = max(1, math.ceil((by - 2) * bx / max_pairs))
    if _NOISE_FIT is not None and _COMPILED[0] and 1 <= bins <= 64:  # engine/_impulse.c: the same numbers
        ex = None if exclude is None else _blocks_touched(np.asarray(exclude, dtype=bool), by, bx)
        _, offset, rows = _NOISE_FIT(np.ascontiguousarray(f), h, w, stride,
                                     b"" if ex is None else ex.view(np.uint8), bins, 64)
        if rows is not None:  # else too few samples for the fit: NumPy's answer below (its min's signed zero)
            return _noise_from_bins(rows, offset, quantum)
    rows = np.arange(1, by - 1, stride)
    near = np.stack([rows - 1, rows, rows + 1])  # the rows of blocks used, and those above and below
    blocks = f[:3 * by, :3 * bx].reshape(by, 3, bx, 3)[near]  # (3, rows, 3, bx, 3): block row, pixel row, block, column
    across = blocks[..., 0] - 2 * blocks[..., 1] + blocks[..., 2]  # each pixel row's second difference
    d_all = (across[:, :, 0] - 2 * across[:, :, 1] + across[:, :, 2]) * np.float32(1 / 6)  # and down: noise var 1
    diff = d_all[1]
    sums = blocks[1, ..., 0] + blocks[1, ..., 1] + blocks[1, ..., 2]  # (rows, 3, bx)
    level = (sums[:, 0] + sums[:, 1] + sums[:, 2]) * np.float32(1 / 9)
    structure = np.abs(d_all[0]) + np.abs(d_all[2])
    if exclude is not None and (ex := _blocks_touched(np.asarray(exclude, dtype=bool), by, bx)) is not None:
        keep = ~(ex[rows] | ex[rows - 1] | ex[rows + 1])
        level, diff, structure = level[keep], diff[keep], structure[keep]
    return fit_noise(level.ravel(), diff.ravel(), structure.ravel(), bins, quantum)


def _blocks_touched(exclude: np.ndarray, by: int, bx: int) -> np.ndarray | None:
    """Which of the ``by x bx`` 3x3 blocks hold an excluded pixel (``.any(axis=(1, 3))`` of the blocks, whose
    reduction over two strided axes cost 4 ms of a 1024² frame's 9), None where none does (most frames)."""
    ex = exclude[:3 * by, :3 * bx]
    if not ex.any():
        return None
    rows = ex[0::3] | ex[1::3] | ex[2::3]  # (by, 3 bx)
    return rows[:, 0::3] | rows[:, 1::3] | rows[:, 2::3]


def measure_noise_rows(raw: np.ndarray, exclude: np.ndarray | None = None, max_pairs: int = 1 << 16,
                       quantum: float = 1.0) -> NoiseModel:
    """:func:`measure_noise` from horizontal pixel triples' second differences ``(a - 2b + c) / sqrt(6)``
    (smoothness from the triples above and below), the guard's estimator until session 15. Less robust to
    texture than the blocks (a gradient cancels, curvature along rows does not), but three times the samples
    of a small frame: the camera-health tracker (``cdae.health``), whose thresholds were set on it, keeps it."""
    f = np.asarray(raw, dtype=np.float32)
    h, w = f.shape
    if h < 3 or w < 3:
        return NoiseModel(read_dn=1.0, dn_per_e=0.0, offset_dn=float(f.min()) if f.size else 0.0, measured=True)
    triples = w // 3  # second differences of (a, b, c): a linear gradient cancels, the noise does not
    stride = max(1, math.ceil((h - 2) * triples / max_pairs))
    rows = np.arange(1, h - 1, stride)
    near = np.stack([rows - 1, rows, rows + 1])  # the rows used, and those above and below
    a, b, c = (f[:, i:3 * triples:3][near] for i in range(3))
    d_all = (a - 2 * b + c) * np.float32(1 / math.sqrt(6))
    level = (a[1] + b[1] + c[1]) * np.float32(1 / 3)
    structure = np.abs(d_all[0]) + np.abs(d_all[2])
    diff = d_all[1]
    if exclude is not None:
        ex = exclude[near]
        ex = ex[..., 0:3 * triples:3] | ex[..., 1:3 * triples:3] | ex[..., 2:3 * triples:3]
        keep = ~(ex[1] | ex[0] | ex[2])
        level, diff, structure = level[keep], diff[keep], structure[keep]
    return fit_noise(level.ravel(), diff.ravel(), structure.ravel(), quantum=quantum)


def fit_noise(level: np.ndarray, diff: np.ndarray, structure: np.ndarray, bins: int = 16,
              quantum: float = 1.0) -> NoiseModel:
    """:func:`measure_noise`'s model from its samples (1-D float32): each sample's level, its noise-only
    difference (unit noise variance) and the structure beside it (the smoother half of each level bin is used)."""
    if level.size < 64:
        return NoiseModel(read_dn=1.0, dn_per_e=0.0, offset_dn=float(level.min()) if level.size else 0.0,
                          measured=True)
    bins = max(1, min(bins, level.size // 64))  # a small frame: fewer bins, each with 32 smooth samples or more
    order = _stable_argsort(level)
    level, diff, structure = level[order], diff[order], structure[order]
    offset = float(level[int(0.001 * (level.size - 1))])
    rows = []
    for lv, d, st in zip(np.array_split(level, bins), np.array_split(diff, bins), np.array_split(structure, bins)):
        smooth = st <= _median(st)  # equal-count level bins, the smoother half of each
        d = d[smooth]
        if d.size < 16:
            continue
        rows.append((float(_median(lv[smooth], ordered=True)), float(_median(np.abs(d - _median(d)))), d.size))
    return _noise_from_bins(rows, offset, quantum)


def _noise_from_bins(rows: list[tuple[float, float, int]], offset: float, quantum: float) -> NoiseModel:
    """fit_noise's line through its level bins, each (median level, MAD of the differences, samples)."""
    x = np.array([r[0] for r in rows])
    v = np.array([(MAD_TO_SIGMA * r[1]) ** 2 for r in rows])  # mad_sigma(d), its medians ours
    n = np.array([r[2] for r in rows], dtype=float)
    floor = quantum * quantum / 12.0  # integer frames: the rounding's own variance
    slope, intercept = fit_variance(x - offset, v, n, floor)
    intercept = max(float(intercept), floor)
    return NoiseModel(read_dn=math.sqrt(intercept), dn_per_e=float(slope), offset_dn=offset, measured=True)


def _stable_argsort(x: np.ndarray) -> np.ndarray:
    """``np.argsort(x, kind="stable")`` of a 1-D float32 array, as two stable radix passes over 16-bit halves
    of an order-preserving integer key (numpy's radix sort, a few times faster than its float merge sort):
    -0 ties with +0 and every NaN goes last, in order, as numpy sorts them."""
    bits = np.add(x, np.float32(0)).view(np.uint32)  # -0 + 0 = +0
    key = np.where(bits >= np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    key[np.isnan(x)] = np.uint32(0xFFFFFFFF)
    first = np.argsort((key & np.uint32(0xFFFF)).astype(np.uint16), kind="stable")
    return first[np.argsort((key >> np.uint32(16)).astype(np.uint16)[first], kind="stable")]


def fit_variance(x: np.ndarray, v: np.ndarray, n: np.ndarray, floor: float = 1.0 / 12.0) -> tuple[float, float]:
    """``v = slope * x + intercept`` through the level bins, slope and intercept >= 0, fitted from below.

    Structure the smooth-pair selection missed only ever adds variance, and the brightest bins
    (mostly the features themselves: point sources, filaments) hold the most: they are left out of
    the first fit, and bins far above the line (twice its variance) are dropped and the line fitted
    again, so that a frame of bright structure on a dark background does not read as a huge gain.
    A bin's variance is known to a fixed fraction of itself (a MAD of ``n`` samples: ``~1.6 v / sqrt(n)``),
    so each bin weighs ``sqrt(n) / v`` in the fit, ``v`` the line's variance there once there is a line: a
    bright bin that structure inflated no longer tilts the line below zero at the dark end, where the
    darkest bins measure the read noise (weighted by ``sqrt(n)`` alone, such a tilt clipped the intercept to
    nothing and then dropped those bins as "far above" it: a 16-bit frame read 68 DN of noise as 14).
    ``floor``: the least variance a bin can have (the rounding's), for the weights of bins whose MAD is 0.
    """
    keep = np.ones(x.size, dtype=bool)
    if x.size > 6:
        keep[-2:] = False  # the brightest eighth of the pixels
    slope = intercept = 0.0
    scale = np.maximum(v, floor)  # each bin's variance, the measured one until there is a line
    for _ in range(4):
        xs, vs, ns = x[keep], v[keep], n[keep]
        if xs.size >= 2 and np.ptp(xs) > 0:
            w = np.sqrt(ns) / scale[keep]
            slope, intercept = (float(c) for c in np.polyfit(xs, vs, 1, w=w / w.max()))
        else:
            slope, intercept = 0.0, float(np.average(vs, weights=ns)) if vs.size else 1.0
        if slope < 0:  # no shot noise visible: read noise alone
            slope, intercept = 0.0, float(np.average(vs, weights=ns))
        intercept = max(intercept, 0.0)
        line = slope * x + intercept
        inliers = v <= 2.0 * line + 1e-12
        if (inliers == keep).all() or inliers.sum() < 2:
            break
        keep = inliers
        scale = np.maximum(line, floor)
    return slope, intercept


def noise_model(raw: np.ndarray, config: GuardConfig, exclude: np.ndarray | None = None,
                quantum: float = 1.0) -> NoiseModel:
    """The camera's noise model where the site gave it, else the frame's own."""
    if config.gain_e_per_dn is not None and config.read_noise_dn is not None:
        offset = config.offset_dn if config.offset_dn is not None else float(percentile(raw[::4, ::4], 0.1))
        return NoiseModel(read_dn=config.read_noise_dn, dn_per_e=1.0 / config.gain_e_per_dn, offset_dn=offset,
                          measured=False)
    return measure_noise(raw, exclude, quantum=quantum)


def _median4(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, ...]:
    """Minimum, median (mean of the middle two) and maximum of four arrays, elementwise, without sorting."""
    ab_lo, ab_hi = np.minimum(a, b), np.maximum(a, b)
    cd_lo, cd_hi = np.minimum(c, d), np.maximum(c, d)
    median = 0.5 * (np.maximum(ab_lo, cd_lo) + np.minimum(ab_hi, cd_hi))
    return np.minimum(ab_lo, cd_lo), median, np.maximum(ab_hi, cd_hi)


def _excess(f: np.ndarray, lo: np.ndarray, hi: np.ndarray, neighbours: tuple[np.ndarray, ...],
            ratio: float, var: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference form of :func:`_tests`' sharpness (which computes it in place, its shared terms once,
    element for element the same arithmetic); engine/device_frame.py mirrors it.

    How far ``f`` stands out beyond what the optics allow given its neighbours' light, up (``up``) and down
    (``down``), and the test's noise (``scale``: ``var`` the pixel's noise variance; plus ``tolerance`` of the
    excess, for optics that are not exactly the model).

    Light in a pixel spills at least ``1/R`` of itself into each side neighbour, so a real peak has
    ``f - lo <= (R / m) * sum(n - lo)`` over its ``m`` neighbours (noise ``sigma sqrt(1 + R^2 / m)``),
    measured from the lowest of the eight surrounding pixels ``lo``, not a median: in a crowded
    field a median background sits on the next source and makes a real peak look sharp. A dip
    (dead) is tested the same way down from the highest, ``hi``. The neighbours lie between ``lo`` and
    ``hi``, so ``up + down = (1 - R)(hi - lo) <= 0``: at most one of the two is positive.
    """
    r = np.float32(ratio / len(neighbours))
    m = np.float32(len(neighbours))
    total = neighbours[0].copy()
    for n in neighbours[1:]:
        total += n
    up = f - lo
    slack = np.float32(tolerance) * np.maximum(up, hi - f)
    up -= r * (total - m * lo)
    down = hi - f - r * (m * hi - total)
    slack *= slack
    scale = np.sqrt(var * np.float32(1 + ratio * ratio / len(neighbours)) + slack)
    return up, down, scale


def _sharpness(f: np.ndarray, lo: np.ndarray, hi: np.ndarray, neighbours: tuple[np.ndarray, ...],
               ratio: float, var: np.ndarray, tolerance: float) -> np.ndarray:
    """:func:`_excess` signed, in units of the test's noise: up where the pixel stands above what the optics
    allow, minus down where it sits below (one of the two is zero)."""
    up, down, scale = _excess(f, lo, hi, neighbours, ratio, var, tolerance)
    return (np.maximum(up, 0) - np.maximum(down, 0)) / scale


def _beyond(f: np.ndarray, lo: np.ndarray, hi: np.ndarray, neighbours: tuple[np.ndarray, ...],
            ratio: float, var: np.ndarray, tolerance: float, z: np.float32) -> np.ndarray:
    """``|_sharpness| > z`` without the division: up or down beyond ``z`` of the test's noise."""
    up, down, scale = _excess(f, lo, hi, neighbours, ratio, var, tolerance)
    return np.maximum(up, down) > z * scale


def _variance(noise, level: np.ndarray) -> np.ndarray:  # noqa: ANN001 - a NoiseModel, or anything with a sigma
    """The pixel noise's variance at ``level``, as :func:`_tests` computes it."""
    if isinstance(noise, NoiseModel):
        return noise.variance(level)
    s = np.asarray(noise.sigma(level), dtype=np.float32)
    return s * s


def find_impulses(raw: np.ndarray, noise: NoiseModel, config: GuardConfig,
                  exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Impulses (:func:`impulse_pass`) over ``config.impulse_passes`` passes, as L.A.Cosmic iterates: each
    later pass looks again at the neighbours of the hits so far, on the frame with those hits
    replaced, so a two-pixel radiation spot or a double column is found from its edge in. Later
    passes test only those neighbours (a few pixels), not the frame. Returns (mask, background)."""
    f = np.asarray(raw, dtype=np.float32)
    h, w = f.shape
    mask, background = impulse_pass(f, noise, config)
    if exclude is not None:
        mask &= ~exclude
    for _ in range(config.impulse_passes - 1):
        ys, xs = np.divmod(np.flatnonzero(mask), w)  # np.nonzero's, in a tenth of its time
        if ys.size == 0:
            break
        dy, dx = np.mgrid[-1:2, -1:2]
        cy = np.clip(ys[:, None] + dy.ravel(), 0, h - 1).ravel()
        cx = np.clip(xs[:, None] + dx.ravel(), 0, w - 1).ravel()
        flat = np.unique(cy * w + cx)
        flat = flat[~mask.ravel()[flat]]
        if exclude is not None:
            flat = flat[~exclude.ravel()[flat]]
        if flat.size == 0:
            break
        cy, cx = flat // w, flat % w
        # the frame with the hits so far replaced, edge-extended (np.pad's "edge"), at the candidates only
        at = _replaced(f, mask, background, cy, cx)
        hit, bg = _tests(at(0, 0), at, noise, config, line_axes=None)
        if not hit.any():
            break
        mask[cy[hit], cx[hit]] = True
        background[cy[hit], cx[hit]] = bg[hit]
    return mask, background


def evidence_config(config: GuardConfig) -> GuardConfig:
    """The impulse test a learned flag must also pass: ``learned_evidence_sigma`` against optics of
    ``learned_evidence_psf_px`` (``config`` itself when the rule is off)."""
    if config.learned_evidence_sigma is None:
        return config
    return config.model_copy(update={"impulse_sigma": config.learned_evidence_sigma,
                                     "psf_sigma_px": config.learned_evidence_psf_px})


def impulse_evidence(raw: np.ndarray, noise: NoiseModel, config: GuardConfig, candidates: np.ndarray,
                     impulses: np.ndarray | None = None, background: np.ndarray | None = None) -> np.ndarray:
    """Of the ``candidates`` (a boolean map), those that pass :func:`evidence_config`'s impulse test (points and
    single axes, as later passes test: no line average) and, if it is on, the peak test
    (:func:`_not_a_real_peak`), for the defect head's flags.

    The head is trained on the simulator's defects and may take real light it never saw for one (a large ring,
    a bright strip): such light is smooth on the scale of the optics. A defect of any class the head finds
    (hot, dead, a radiation hit, a bad line seen across) is sharper than even blurry optics allow, so asking
    for that, at a low significance, keeps almost all of the head's real finds and drops most of its false
    ones. The tests see the frame with the ``impulses`` already found replaced by their ``background`` (a
    real pixel between two hot columns is no dip). Only the candidates are tested (a few per cent of the
    frame)."""
    f = np.asarray(raw, dtype=np.float32)
    out = np.zeros(f.shape, dtype=bool)
    idx = np.flatnonzero(candidates)
    if idx.size == 0:
        return out
    h, w = f.shape
    cy, cx = np.divmod(idx, w)
    if impulses is None or background is None:
        impulses, background = np.zeros(f.shape, dtype=bool), f
    at = _replaced(f, impulses, background, cy, cx)  # np.pad(..., 2, mode="edge") at the candidates moved
    hit = np.ones(idx.size, dtype=bool)
    with np.errstate(all="ignore"):
        if config.learned_evidence_sigma is not None:
            hit &= _tests(at(0, 0), at, noise, evidence_config(config), line_axes=None)[0]
        if config.learned_peak_sigma is not None:
            peak = _not_a_real_peak(at, noise, config)
            if config.learned_line_peaks and config.line_length > 1:  # the line test on those the point test refused
                again = np.flatnonzero(hit & ~peak)
                if again.size:
                    peak[again] = _line_peak(lambda y, x: _replaced(f, impulses, background, y, x),
                                             candidates | impulses, cy[again], cx[again], noise, config)
            hit &= peak
    out.ravel()[idx[hit]] = True
    return out


#: The 16 pixels two away (the 5x5 square's rim): the peak test's background.
PEAK_RIM = tuple((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if max(abs(dy), abs(dx)) == 2)


def _not_a_real_peak(at, noise: NoiseModel, config: GuardConfig) -> np.ndarray:  # noqa: ANN001 - at: (dy, dx) -> array
    """For :func:`impulse_evidence`: False where a pixel could be real light through the narrowest optics.

    The background ``B`` is the median of the 16 pixels two away (the mean of the middle two), unbiased on
    a flat field, where the impulse test's lowest-of-eight sits about 1.4 sigma low (which only ever makes
    that test flag less, right for a flag of its own, wrong for refusing the head). A peak stands out by
    ``up = (f - B) - (R / m) sum(n - B)`` beyond what light through the narrowest optics (``R``, as the
    impulse test's) could give its ``m`` side neighbours: across each axis and both together, tested at
    ``learned_peak_sigma`` times ``sigma sqrt(1 + R^2 / m)``; each axis's pair counts as twice its brighter
    side, so that a dead or dark neighbour does not make a real peak look sharp (the brighter of two sits
    about 0.56 sigma high: stricter on a flat field, never looser). A dip is tested the same way down from
    ``B``, each pair as twice its darker side (a real pixel beside a bright edge or clipped light is no
    dead pixel). The head's flag on a pixel that is nowhere sharper than that (a real point source, a
    valley between two, or a radiation spot one cannot tell from a point source in one frame) is refused.
    The arithmetic is mirrored, operation for operation, in engine/device_frame.py.
    """
    f = at(0, 0)
    rim = np.sort(np.stack([at(dy, dx) for dy, dx in PEAK_RIM]), axis=0)
    b = (rim[7] + rim[8]) * np.float32(0.5)
    var = noise.sigma(b)
    var *= var
    w, e, n, s = at(0, -1), at(0, 1), at(-1, 0), at(1, 0)
    # a dip is a peak of the negated frame (exact in float), each pair's darker side its brighter one
    return _peaks(f, b, np.maximum(w, e), np.maximum(n, s), var, config) | \
        _peaks(-f, -b, -np.minimum(w, e), -np.minimum(n, s), var, config)


def _peaks(f: np.ndarray, b: np.ndarray, one: np.ndarray, other: np.ndarray | None, var: np.ndarray,
           config: GuardConfig) -> np.ndarray:
    """The peak test's arithmetic: ``f`` above ``b`` beyond the narrowest optics, each axis's pair as twice ``one``
    (``other``) of its sides, across each axis and both together (``other`` None: across ``one``'s axis alone);
    ``var`` the noise variance of ``f``, ``b`` and the sides."""
    r = centre_to_neighbour_ratio(config.psf_sigma_px)
    z = np.float32(config.learned_peak_sigma)
    excess = f - b
    slack = np.float32(config.optics_tolerance) * excess
    slack *= slack
    one = one + one
    tests = [(2, one)]
    if other is not None:
        other = other + other
        tests += [(2, other), (4, one + other)]
    sharp = np.zeros(f.shape, dtype=bool)
    for m, total in tests:
        up = excess - np.float32(r / m) * (total - np.float32(m) * b)
        sharp |= up > z * np.sqrt(var * np.float32(1 + r * r / m) + slack)
    return (excess > 0) & sharp


def _line_peak(gather, claimed: np.ndarray, cy: np.ndarray, cx: np.ndarray, noise: NoiseModel,  # noqa: ANN001
               config: GuardConfig) -> np.ndarray:
    """:func:`_not_a_real_peak` for lines: True where the pixel's row (column), its ``line_length`` pixels averaged
    along it, is sharper across it than the narrowest optics allow, above or below its surroundings.

    A bad row's pixels one by one may be no sharper than the optics allow within their noise (the test's noise is
    ``sigma sqrt(1 + R^2 / 2)``, 8.4 sigma at 0.45 px, and a dead row's darker side sits low by chance), but its
    average along the row is: the noise falls by ``sqrt(line_length)``. The test is the point test's across the
    line, on the averages: ``f`` the pixel's stretch of the line, ``n`` and ``s`` the stretches either side (the
    pair as twice its brighter side for a peak, its darker for a dip), the background the median of the four
    stretches two and three away (a neighbouring bad line is out of it). Real light obeys the optics on every
    pixel and so on their average (the test is linear in the pixels, but for the background's median and the
    pair's brighter side, which only make it stricter); what it could take for a defect is what the impulse
    test's line test could: a real line that thin, straight and on the pixel grid. The stretch counts only
    where every pixel of it is ``claimed`` (a boolean map: where the head or the impulse test flagged it): the
    head claims a bad line along its length, and the pixel-scale texture of a photograph it claims here and
    there (rows of roof tiles) is refused (chosen on validation frames: there it kept the head's false flags
    where they were without the line test, 9.6e-5 of real pixels, against 1.15e-4 for unclaimed stretches).
    The arithmetic is mirrored, operation for operation, in engine/device_frame.py."""
    length = config.line_length
    steps = range(-(length // 2), length - length // 2)
    inverse = np.float32(1 / length)
    h, w = claimed.shape
    out = np.zeros(cy.size, dtype=bool)
    for (ay, ax), (qy, qx) in (((0, 1), (1, 0)), ((1, 0), (0, 1))):  # a row (across: y), a column (across: x)
        whole = ~out  # the stretch claimed whole (a bad line is, along its length; texture is not): tested first
        for k in steps:
            whole &= claimed[np.clip(cy + k * ay, 0, h - 1), np.clip(cx + k * ax, 0, w - 1)]
        sel = np.flatnonzero(whole)
        if sel.size == 0:
            continue
        at = gather(cy[sel], cx[sel])

        def stretch(d: int, ay: int = ay, ax: int = ax, qy: int = qy, qx: int = qx, at=at) -> np.ndarray:  # noqa: ANN001
            total = at(d * qy - (length // 2) * ay, d * qx - (length // 2) * ax).copy()
            for k in steps[1:]:
                total += at(d * qy + k * ay, d * qx + k * ax)
            total *= inverse
            return total

        f, n, s = stretch(0), stretch(-1), stretch(1)
        b = _median4(stretch(-2), stretch(2), stretch(-3), stretch(3))[1]
        var = noise.sigma(b)
        var *= var
        var *= inverse  # the noise of a stretch's mean
        out[sel] = _peaks(f, b, np.maximum(n, s), None, var, config) | \
            _peaks(-f, -b, -np.minimum(n, s), None, var, config)
    return out


def _replaced(f: np.ndarray, mask: np.ndarray, background: np.ndarray, cy: np.ndarray, cx: np.ndarray):  # noqa: ANN202
    """``at(oy, ox)``: ``np.pad(np.where(mask, background, f), 2, mode="edge")[cy + 2 + oy, cx + 2 + ox]``,
    gathered without building the frame."""
    h, w = f.shape
    ff, mm, bb = f.ravel(), mask.ravel(), background.ravel()
    rows: dict[int, np.ndarray] = {}  # the clipped row offsets (times w) and columns, once per offset
    cols: dict[int, np.ndarray] = {}

    def at(oy: int, ox: int) -> np.ndarray:
        r = rows.get(oy)
        if r is None:
            r = rows[oy] = np.minimum(np.maximum(cy + oy, 0), h - 1) * w
        c = cols.get(ox)
        if c is None:
            c = cols[ox] = np.minimum(np.maximum(cx + ox, 0), w - 1)
        i = r + c
        return np.where(mm[i], bb[i], ff[i])

    return at


def impulse_pass(raw: np.ndarray, noise: NoiseModel, config: GuardConfig,
                 block_rows: int = 64, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One pass of the impulse test (:func:`_tests`) over the whole frame, lines included, in blocks
    of rows (with the halo the line test needs) so that its temporaries stay in the CPU's cache.

    The blocks are independent (each writes its own rows), so ``threads`` (default :func:`guard_threads`)
    share them out, numpy releasing the GIL in its loops; the result is the same bits for any count."""
    f = np.asarray(raw, dtype=np.float32)
    h, w = f.shape
    if _impulse is not None and _COMPILED[0] and isinstance(noise, NoiseModel) and f.size:
        return _compiled_pass(f, noise, config, block_rows, guard_threads(f.size) if threads is None else threads)
    halo = config.line_length // 2
    # the padded frame, one spare row below; the blocks work "wide": rows of the padded width, contiguous
    # (numpy's loops are ~3x faster on contiguous operands than on 2-D views), the last 4 columns of
    # each row junk (finite pixel values), dropped at the end
    wide = w + 4
    padded = np.empty((h + 5, wide), dtype=np.float32)
    padded[:h + 4] = np.pad(f, 2, mode="edge")
    padded[h + 4] = padded[h + 3]
    flat = padded.reshape(-1)
    mask = np.empty((h, w), dtype=bool)
    background = np.empty((h, w), dtype=np.float32)

    def run(starts: list[int]) -> None:
        work: dict = {}  # one set of buffers per thread
        for y0 in starts:
            y1 = min(h, y0 + block_rows)
            a, b = max(0, y0 - halo), min(h, y1 + halo)  # rows computed; [y0, y1) kept

            def at(dy: int, dx: int, a: int = a, b: int = b) -> np.ndarray:  # the rows moved by (dy, dx), wide
                start = (2 + a + dy) * wide + 2 + dx
                return flat[start: start + (b - a) * wide].reshape(b - a, wide)

            with np.errstate(all="ignore"):  # the junk columns may do what no real pixel does
                m, bg = _tests(at(0, 0), at, noise, config, line_axes=(0, 1), work=work,
                               keep=slice(y0 - a, y1 - a), width=w)
            mask[y0:y1], background[y0:y1] = m[:, :w], bg[:, :w]

    blocks = list(range(0, h, block_rows))
    n = min(guard_threads(f.size) if threads is None else threads, len(blocks))
    if n <= 1:
        run(blocks)
    else:  # interleaved, so that each thread gets as many full blocks
        for done in [_pool(n).submit(run, blocks[i::n]) for i in range(n)]:
            done.result()
    return mask, background


try:  # engine/_impulse.c, built at install; without a C compiler the NumPy pass serves, the same bits
    from cdae.engine import _impulse
except ImportError:  # pragma: no cover - an install without the compiled pass
    _impulse = None
#: the compiled noise model, where the built extension has it (one built before it still serves the impulse pass)
_NOISE_FIT = getattr(_impulse, "noise_fit", None)
_COMPILED = [True]
_SCRATCH = threading.local()  # each thread's work buffers, by frame shape


def compiled_pass() -> bool:
    """Whether :func:`impulse_pass` runs engine/_impulse.c (built at install), not the NumPy blocks."""
    return _impulse is not None and _COMPILED[0]


def use_compiled_pass(on: bool) -> None:
    """Run the compiled impulse pass where it is built (the default), or the NumPy one (to compare them)."""
    _COMPILED[0] = bool(on)


def _c_noise(noise: NoiseModel) -> tuple[float, float, float]:
    """The noise model as engine/_impulse.c's variance() takes it: offset, DN per electron, read variance (float32)."""
    return float(np.float32(noise.offset_dn)), float(np.float32(noise.dn_per_e)), float(np.float32(noise.read_dn**2))


def _compiled_pass(f: np.ndarray, noise: NoiseModel, config: GuardConfig, block_rows: int = 64,
                   threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """:func:`impulse_pass` by engine/_impulse.c: the same arithmetic fused per pixel, a block of ``block_rows``
    rows at a time (its tests with their halo, its line tests, its output: the scratch stays in cache) instead of
    NumPy's ~80 passes over the frame (the same bits: tests/engine/test_guard.py), its column sums restarted per
    block as NumPy's (they differ where a sum met a NaN or an infinity, or rounded). ``threads``: the blocks split
    into that many runs of rows, one per thread, the GIL released (the same bits for any count)."""
    h, w = f.shape
    r = centre_to_neighbour_ratio(config.psf_sigma_px)
    z = np.float32(config.impulse_sigma)
    f = np.ascontiguousarray(f)
    padded = np.pad(f, 2, mode="edge")
    mask = np.empty((h, w), dtype=bool)
    background = np.empty((h, w), dtype=np.float32)
    f32 = [float(np.float32(v)) for v in (r / 2, r / 4, 1 + r * r / 2, 1 + r * r / 4)]
    args = (*f32, float(z), float(z / np.float32(math.sqrt(config.line_length))),
            float(np.float32(config.optics_tolerance)), *_c_noise(noise), config.line_length, block_rows)
    rows = block_rows + 2 * (config.line_length // 2 if config.line_length > 1 else 0)

    def run(y0: int, y1: int) -> None:
        buffers = _SCRATCH.__dict__.setdefault("by_shape", {})  # this thread's, by row width and block height
        scratch = buffers.get((w, rows))
        if scratch is None:
            if len(buffers) > 8:  # a few frame shapes at a time
                buffers.clear()
            scratch = buffers[(w, rows)] = (np.empty(5 * rows * w, dtype=np.float32), np.empty(4 * w, dtype=np.float64))
        _impulse.impulse_pass(padded, f, h, w, mask.view(np.uint8), background, scratch[0], scratch[1], *args, y0, y1)

    blocks = -(-h // block_rows)
    n = max(1, min(threads, blocks))
    edges = [min(h, (blocks * i // n) * block_rows) for i in range(n + 1)]  # runs of whole blocks
    if n == 1:
        run(0, h)
    else:
        for done in [_pool(n).submit(run, a, b) for a, b in zip(edges[:-1], edges[1:])]:
            done.result()
    return mask, background


_THREADS: int | None = None
_POOLS: dict[int, ThreadPoolExecutor] = {}


#: Frames of at least this many pixels share the impulse pass between two threads by default (where the process
#: has two CPUs): at 1024² it paid on every host measured (docs/results.md), at 512² not on all.
AUTO_THREADS_PIXELS = 1 << 20


def guard_threads(pixels: int = 0) -> int:
    """Threads the whole-frame impulse pass uses on a frame of ``pixels``: :func:`set_guard_threads`'s, else two
    from :data:`AUTO_THREADS_PIXELS` up where this process may run on two CPUs or more, else one. The bits are the
    same for any count."""
    if _THREADS is not None:
        return _THREADS
    return 2 if pixels >= AUTO_THREADS_PIXELS and _cpus() >= 2 else 1


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_guard_threads(threads: int | None) -> None:
    """The impulse pass's threads for this process; None: :func:`guard_threads`' default (by frame size)."""
    global _THREADS
    if threads is not None and threads < 1:
        raise ValueError(f"guard threads must be >= 1, not {threads}")
    _THREADS = threads


def _pool(n: int) -> ThreadPoolExecutor:
    pool = _POOLS.get(n)
    if pool is None:
        pool = _POOLS.setdefault(n, ThreadPoolExecutor(n, thread_name_prefix="cdae-guard"))
    return pool


def _tests(f: np.ndarray, at, noise: NoiseModel, config: GuardConfig,  # noqa: ANN001 - at: (dy, dx) -> array
           line_axes: tuple[int, int] | None, work: dict | None = None,
           keep: slice | None = None, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels sharper than the optics allow, and the background to replace them with.

    ``at(dy, dx)`` gives the pixels at that offset from each of ``f``'s (the whole frame moved, or
    the neighbours of a list of pixels). ``R`` is the sharpest ratio of a pixel's light to a side
    neighbour's that a real feature of the narrowest PSF can have (a Gaussian centred on the pixel;
    off-centre features are less sharp). Along each axis the background is the median of the two
    pixels either side (distance 1 and 2); a pixel's excess ``E`` over it is tested against its two
    side neighbours' excesses ``e1 + e2``: a real feature has ``E <= (R / 2) (e1 + e2)``, so
    ``T = E - (R / 2)(e1 + e2)``, whose noise is about ``sigma sqrt(1 + R^2 / 2)``, stays below
    ``impulse_sigma`` of that (above: hot, radiation; below: dead). Both axes' four neighbours
    together test points (``R / 4``, noise ``sqrt(1 + R^2 / 4)``); one axis alone tests lines: a
    bad column is sharp across, a point source is blurred both ways, and averaged along
    ``line_length`` pixels of the column (row) the test sees a faint bad line no single pixel gives
    away (a real line that thin, straight and on the pixel grid is the one thing it could take for
    a defect). ``line_axes``: the array axes along columns and rows (None: no line test).

    ``work``: buffers kept between calls of one shape (:func:`impulse_pass`'s blocks); the arrays returned are
    among them, to be copied before the next call. ``keep``: the rows of ``f`` to return (the others are a
    halo, needed only by the column average). ``width``: the columns of ``f`` that are pixels (the others
    junk, left out of the row average and of nothing else). The arithmetic is :func:`_median4`'s,
    :func:`_sharpness`'s and :func:`_beyond`'s, element for element in the same order (the same float32 bits), with the terms
    the three tests share (the eight pixels' extremes, ``f - lo``, ``hi - f``, the optics slack) computed once.
    """
    work = {} if work is None else work

    def buf(key: str, dtype: type = np.float32) -> np.ndarray:
        a = work.get(key)
        if a is None or a.shape != f.shape:
            a = work[key] = np.empty(f.shape, dtype=dtype)
        return a

    r = centre_to_neighbour_ratio(config.psf_sigma_px)
    z = np.float32(config.impulse_sigma)
    z_line = z / np.float32(math.sqrt(config.line_length))
    half = np.float32(0.5)

    def v(a: np.ndarray) -> np.ndarray:  # the rows kept
        return a if keep is None else a[keep]

    tmp = buf("tmp")
    sides, backgrounds = [], []
    lo = hi = None
    for k, (dy, dx) in enumerate(((0, 1), (1, 0))):
        n1, p1, n2, p2 = at(-dy, -dx), at(dy, dx), at(-2 * dy, -2 * dx), at(2 * dy, 2 * dx)
        ab_lo, ab_hi = np.minimum(n1, p1, out=buf("ab_lo")), np.maximum(n1, p1, out=buf("ab_hi"))
        cd_lo, cd_hi = np.minimum(n2, p2, out=buf("cd_lo")), np.maximum(n2, p2, out=buf("cd_hi"))
        w = (lambda a: a) if k == 0 else v  # only the first axis's test is needed beyond the rows kept
        bg = np.maximum(w(ab_lo), w(cd_lo), out=w(buf(f"bg{k}")))  # median: the mean of the middle two
        bg += np.minimum(w(ab_hi), w(cd_hi), out=w(tmp))
        bg *= half
        backgrounds.append(bg)
        sides.append((w(n1), w(p1)))
        # the extremes of all eight surrounding pixels: a side neighbour is never its own background
        if k == 0:
            lo, hi = np.minimum(ab_lo, cd_lo, out=buf("lo")), np.maximum(ab_hi, cd_hi, out=buf("hi"))
        else:
            np.minimum(lo, np.minimum(ab_lo, cd_lo, out=ab_lo), out=lo)
            np.maximum(hi, np.maximum(ab_hi, cd_hi, out=ab_hi), out=hi)
    tolerance = np.float32(config.optics_tolerance)
    f_lo = np.subtract(f, lo, out=buf("f_lo"))
    hi_f = np.subtract(hi, f, out=buf("hi_f"))
    slack = np.maximum(f_lo, hi_f, out=buf("slack"))
    slack *= tolerance
    slack *= slack
    m_lo, m_hi = buf("m_lo"), buf("m_hi")
    var, t_buf, up_buf, absolute = buf("var"), buf("t"), buf("up"), buf("abs")
    other = buf("other", bool)
    zero = work.get(("zero", f.shape))
    if zero is None:  # np.maximum(x, 0) against an array of zeros: the same values, a vector loop (~3x faster)
        zero = work[("zero", f.shape)] = np.zeros(f.shape, dtype=np.float32)

    def noise_var(level: np.ndarray, w) -> np.ndarray:  # noqa: ANN001 - _variance, into var
        if not isinstance(noise, NoiseModel):  # another noise (the camera-health window mean's): its own sigma
            out = w(var)
            out[...] = noise.sigma(level)
            out *= out
            return out
        out = np.subtract(level, np.float32(noise.offset_dn), out=w(var))
        np.maximum(out, w(zero), out=out)
        out *= np.float32(noise.dn_per_e)
        out += np.float32(noise.read_dn**2)
        return out

    def sharpness(total: np.ndarray, m: int, w, significant: np.ndarray | None = None) -> np.ndarray:  # noqa: ANN001
        """_sharpness into t; given ``significant``, _beyond (``|t| > z``) into it instead, without the division."""
        rm = np.float32(r / m)
        scale, up, t = w(tmp), w(up_buf), w(t_buf)
        np.subtract(total, w(m_lo), out=scale)
        np.multiply(scale, rm, out=scale)
        np.subtract(w(f_lo), scale, out=up)
        np.subtract(w(m_hi), total, out=scale)
        np.multiply(scale, rm, out=scale)
        np.subtract(w(hi_f), scale, out=t)  # down
        np.multiply(w(var), np.float32(1 + r * r / m), out=scale)
        np.add(scale, w(slack), out=scale)
        np.sqrt(scale, out=scale)
        if significant is not None:
            np.maximum(up, t, out=up)
            np.multiply(scale, z, out=scale)
            return np.greater(up, scale, out=significant)
        np.maximum(up, w(zero), out=up)
        np.maximum(t, w(zero), out=t)
        np.subtract(up, t, out=t)
        return np.divide(t, scale, out=t)

    np.multiply(lo, np.float32(2), out=m_lo)
    np.multiply(hi, np.float32(2), out=m_hi)
    total = buf("total")
    axis_hits = []
    for k in range(2):
        w = (lambda a: a) if k == 0 else v  # the rows computed
        inner = v if k == 0 else (lambda a: a)  # of those, the rows kept
        bg = backgrounds[k]
        noise_var(bg, w)
        n1, p1 = sides[k]
        t = sharpness(np.add(n1, p1, out=w(buf(f"total{k}"))), 2, w)
        hit = np.greater(np.abs(inner(t), out=v(absolute)), z, out=v(buf(f"hit{k}", bool)))
        if line_axes is not None and config.line_length > 1:  # a bad column (row): average along it
            along = _along(t, config.line_length, line_axes[k], w(buf("along")), work, z_line,
                           keep if k == 0 else None, width)
            if along is None:  # no pixel where the average is beyond z_line
                axis_hits.append(hit)
                continue
            along = inner(along)
            line = np.greater(np.abs(along, out=v(absolute)), z_line, out=v(buf("line", bool)))
            count = np.count_nonzero(line)
            tk, fk, bk, vk = inner(t), v(f), inner(bg), v(var)
            if 8 * count > line.size:
                spare = v(other)
                line &= np.greater(np.multiply(tk, along, out=v(absolute)), 0, out=spare)
                np.abs(np.subtract(fk, bk, out=v(absolute)), out=v(absolute))
                sk = np.sqrt(vk, out=v(tmp))  # the pixel noise
                line &= np.greater(v(absolute), np.multiply(sk, z, out=sk), out=spare)
                hit |= line
            elif count:  # the few candidates alone, the same arithmetic
                where = np.flatnonzero(line)
                ok = (np.take(tk, where) * np.take(along, where) > 0) & \
                    (np.abs(np.take(fk, where) - np.take(bk, where)) > z * np.sqrt(np.take(vk, where)))
                np.put(hit, where[ok], True)
        axis_hits.append(hit)
    backgrounds[0] = v(backgrounds[0])
    bg = np.add(backgrounds[0], backgrounds[1], out=v(buf("bg")))
    bg *= half
    total = np.add(v(buf("total0")), sides[1][0], out=v(total))  # ((n1 + p1) + n1') + p1'
    total += sides[1][1]
    np.multiply(v(lo), np.float32(4), out=v(m_lo))
    np.multiply(v(hi), np.float32(4), out=v(m_hi))
    noise_var(bg, v)
    mask = sharpness(total, 4, v, significant=v(buf("mask", bool)))
    mask |= axis_hits[0]
    mask |= axis_hits[1]
    # a line pixel is replaced from across the line, a point from both axes
    only = v(buf("only", bool))
    np.copyto(bg, backgrounds[1], where=np.greater(axis_hits[1], axis_hits[0], out=only))
    np.copyto(bg, backgrounds[0], where=np.greater(axis_hits[0], axis_hits[1], out=only))
    return mask, bg


def _along(t: np.ndarray, length: int, axis: int, out: np.ndarray, work: dict, z_line: np.float32,
           keep: slice | None, width: int | None = None) -> np.ndarray | None:
    """``uniform_filter1d(t, length, axis, mode="nearest")`` into ``out``; along the first axis of a 2-D block
    on its transpose (the same lines, the same running sums: the same values, without strided lines), and
    None instead where no pixel of the rows kept has ``|average| > z_line`` (nothing for the line test)."""
    from scipy.ndimage import uniform_filter1d  # here: scipy.ndimage costs 0.6 s to import, the IOC needs no guard

    if axis == 0 and t.ndim == 2:
        key = ("T", t.shape)
        pair = work.get(key)
        if pair is None:
            pair = work[key] = (np.empty(t.shape[::-1], np.float32), np.empty(t.shape[::-1], np.float32))
        np.copyto(pair[0], t.T)
        uniform_filter1d(pair[0], length, axis=1, output=pair[1], mode="nearest")
        kept = pair[1][:width] if keep is None else pair[1][:width, keep]
        if not np.count_nonzero(np.abs(kept) > z_line):
            return None
        np.copyto(out, pair[1].T)
        return out
    if width is not None and t.ndim == 2 and axis == 1:  # the rows' pixels alone (junk columns not averaged in)
        uniform_filter1d(t[:, :width], length, axis=1, output=out[:, :width], mode="nearest")
        out[:, width:] = 0
        return out
    return uniform_filter1d(t, length, axis=axis, output=out, mode="nearest")


#: Largest magnitude the guard's float32 arithmetic takes as it is (sums of a few pixels and their squares
#: stay finite); a frame beyond it is scaled down by a power of two, exactly, and back.
HEADROOM = 2.0**60


def _compiled_finish(f: np.ndarray, denoised: np.ndarray, impulses: np.ndarray, background: np.ndarray,
                     saturated: np.ndarray, learned: np.ndarray | None, config: GuardConfig,
                     noise: NoiseModel) -> GuardResult:
    """:func:`_guard`'s bound, fills, flags and counts in one pass by engine/_impulse.c (the NumPy steps' bits:
    tests/engine/test_guard.py): a dozen frame-sized NumPy passes (the bound, its clip, six masked copies, three
    counts) read and wrote ~100 MB of a 1024² frame."""
    out = np.empty(f.shape, dtype=np.float32)
    flags = np.empty(f.shape, dtype=np.uint8)
    if learned is None:
        learned = np.zeros(f.shape, dtype=bool)
    c = [np.ascontiguousarray(a) for a in (f, denoised, impulses, background, saturated, learned)]
    n_sat, n_imp, n_learned = _impulse.finish(
        c[0], c[1], c[2].view(np.uint8), c[3], c[4].view(np.uint8), c[5].view(np.uint8),
        float(np.float32(config.k_sigma)), *_c_noise(noise), out, flags)
    counts = {FLAG_NAMES[BAD_PIXEL_MAP]: 0, FLAG_NAMES[SATURATED]: n_sat, FLAG_NAMES[IMPULSE]: n_imp,
              FLAG_NAMES[LEARNED]: n_learned}
    return GuardResult(output=out, flags=flags, counts=counts, noise=noise)


def frame_quantum(raw: np.ndarray) -> float:
    """One step of the frame's values, whose rounding sets the floor of its noise (``quantum**2 / 12``): 1 for
    an integer camera, and for a float frame of whole numbers (a camera's DN carried in floats); else (a float
    frame in physical units, [0, 1] or photons) the float32 spacing at its typical magnitude, no floor to speak
    of: a floor of one DN there would read a noise of 0.01 as 0.29 and let the bound move pixels 29 sigma."""
    a = np.asarray(raw)
    if a.dtype.kind in "biu":
        return 1.0
    s = np.asarray(a[::7, ::7] if a.ndim == 2 else a.ravel()[::49], dtype=np.float32).ravel()
    s = s[np.isfinite(s)]
    if s.size == 0 or np.array_equal(s, np.rint(s)):
        return 1.0
    return float(np.spacing(np.float32(max(float(np.median(np.abs(s))), float(np.finfo(np.float32).tiny)))))


def guard(raw: np.ndarray, denoised_dn: np.ndarray, saturated: np.ndarray, config: GuardConfig,
          defect_probability: np.ndarray | None = None) -> GuardResult:
    """The network's float DN output held to the noise bound, impulses replaced, saturation kept raw,
    and where the calibrated defect head is sure, the network's output unbounded."""
    quantum = frame_quantum(raw)
    f = np.asarray(raw, dtype=np.float32)
    peak = max(float(f.max()), -float(f.min())) if f.size else 0.0  # max |f|; NaN where f has a NaN
    if math.isfinite(peak) and peak > HEADROOM:  # a float frame near float32's limit: sums would overflow
        scale = 2.0 ** (math.frexp(HEADROOM)[1] - math.frexp(peak)[1])
        scaled = config.model_copy(update={
            "read_noise_dn": None if config.read_noise_dn is None else config.read_noise_dn * scale,
            "offset_dn": None if config.offset_dn is None else config.offset_dn * scale,
            "gain_e_per_dn": None if config.gain_e_per_dn is None else config.gain_e_per_dn / scale})
        s32 = np.float32(scale)
        r = _guard(f * s32, np.asarray(denoised_dn, dtype=np.float32) * s32, saturated, scaled, defect_probability,
                   quantum=quantum * scale)
        noise = NoiseModel(read_dn=r.noise.read_dn / scale, dn_per_e=r.noise.dn_per_e / scale,
                           offset_dn=r.noise.offset_dn / scale, measured=r.noise.measured)
        return GuardResult(output=r.output / s32, flags=r.flags, counts=r.counts, noise=noise)
    return _guard(f, denoised_dn, saturated, config, defect_probability, quantum=quantum)


def _guard(f: np.ndarray, denoised_dn: np.ndarray, saturated: np.ndarray, config: GuardConfig,
           defect_probability: np.ndarray | None, quantum: float = 1.0) -> GuardResult:
    noise = noise_model(f, config, exclude=saturated, quantum=quantum)
    # a lone pixel at the ADC maximum is a defect, not saturated light: the impulse test decides first
    impulses, background = find_impulses(f, noise, config)
    saturated = saturated & ~impulses
    denoised = np.asarray(denoised_dn, dtype=np.float32)
    learned = None
    if isinstance(config.defect_threshold, float) and defect_probability is not None:
        learned = (defect_probability > np.float32(config.defect_threshold)) & ~impulses & ~saturated
        if config.learned_evidence_sigma is not None or config.learned_peak_sigma is not None:
            learned = impulse_evidence(f, noise, config, learned, impulses, background)  # the optics agree
    if compiled_pass() and isinstance(noise, NoiseModel) and all(  # the steps below in one pass (engine/_impulse.c)
            a.dtype == np.bool_ and a.shape == f.shape for a in (saturated, *(() if learned is None else (learned,)))) \
            and denoised.shape == f.shape:  # anything else: NumPy's own errors, or its broadcasting
        return _compiled_finish(f, denoised, impulses, background, saturated, learned, config, noise)
    bound = noise.sigma(f)
    if config.k_sigma != 1.0:  # x * 1 is x
        bound *= np.float32(config.k_sigma)
    low = np.subtract(f, bound)
    out = np.clip(denoised, low, np.add(f, bound, out=bound), out=low)
    flags = np.zeros(f.shape, dtype=np.uint8)
    if learned is not None:
        np.copyto(out, denoised, where=learned)
        np.copyto(flags, np.uint8(LEARNED), where=learned)
    np.copyto(out, background, where=impulses)
    np.copyto(out, f, where=saturated)
    np.copyto(flags, np.uint8(IMPULSE), where=impulses)
    np.copyto(flags, np.uint8(SATURATED), where=saturated)
    # count_flags(flags), from the masks (disjoint: learned excludes both, saturated the impulses)
    counts = {FLAG_NAMES[BAD_PIXEL_MAP]: 0, FLAG_NAMES[SATURATED]: int(np.count_nonzero(saturated)),
              FLAG_NAMES[IMPULSE]: int(np.count_nonzero(impulses)),
              FLAG_NAMES[LEARNED]: 0 if learned is None else int(np.count_nonzero(learned))}
    return GuardResult(output=out, flags=flags, counts=counts, noise=noise)
