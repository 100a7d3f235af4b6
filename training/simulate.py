"""Clean diagnostic scenes: what the light looks like before a detector records it.

A scene is a float32 image of *relative intensity*: 0 is no light, 1.0 is the level that
reaches the detector's full scale, and values above 1.0 are real features that legitimately
saturate (the detector model in :mod:`cdae.training.defects` clips them; they are data, not
defects). Every size (spot sigma, filament width, point-spread function, ...) is given in
pixels and every feature count as a density per megapixel, so a model trained on 128x128
crops sees the same local statistics as a 2048x2048 frame.

Everything here is a pure function of a ``numpy.random.Generator``: the same generator state
gives the same scene, bit for bit. ``scene_rng(seed, index)`` makes frame ``index`` of dataset
``seed`` reproducible on its own. Bump :data:`GENERATOR_VERSION` whenever the output for a
given seed changes (here or in :mod:`cdae.training.defects`): model packages record it.

``python -m cdae.training.simulate --out DIR`` writes ``DIR/gallery.png``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, get_args

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from scipy import fft, ndimage

__all__ = [
    "COMPONENT_KINDS",
    "GENERATOR_VERSION",
    "SCENE_KINDS",
    "Scene",
    "SceneConfig",
    "SceneKind",
    "accumulate",
    "deposit_bilinear",
    "deposit_gaussians",
    "generate_scene",
    "loguniform",
    "main",
    "save_gallery",
    "scene_rng",
]

#: Version of the data generator (scenes and detector model). Bump it whenever the arrays
#: produced for a given (seed, index, shape, config) change.
GENERATOR_VERSION: str = "1.2"
# 1.2: plasma emission is imaged through an optical PSF (``plasma_psf_sigma_px``) like point
#      sources; ``plasma_psf_sigma_px = (0, 0)`` gives 1.1's frames bit for bit.

SceneKind = Literal["plasma", "filaments", "spots", "points", "edges", "background", "mixed"]
SCENE_KINDS: tuple[str, ...] = get_args(SceneKind)
#: Kinds that a "mixed" scene combines on top of its background.
COMPONENT_KINDS: tuple[str, ...] = ("plasma", "filaments", "spots", "points", "edges")

_F32 = np.float32
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_MIN_SIDE = 8


def _check_range(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"expected a range (lo, hi) with lo <= hi, got {value!r}")
    return value


def _check_positive_range(value: tuple[float, float]) -> tuple[float, float]:
    _check_range(value)
    if value[0] <= 0:
        raise ValueError(f"expected a range of positive numbers, got {value!r}")
    return value


#: (lo, hi) sampled uniformly.
Range = Annotated[tuple[float, float], AfterValidator(_check_range)]
#: (lo, hi) of positive numbers, sampled log-uniformly.
PositiveRange = Annotated[tuple[float, float], AfterValidator(_check_positive_range)]


def _default_kind_weights() -> dict[str, float]:
    return {
        "mixed": 0.5,
        "plasma": 0.1,
        "filaments": 0.1,
        "spots": 0.08,
        "points": 0.1,
        "edges": 0.07,
        "background": 0.05,
    }


class SceneConfig(BaseModel):
    """How scenes are drawn. Sizes are in pixels, counts in features per megapixel (Mpx)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind_weights: dict[SceneKind, float] = Field(
        default_factory=_default_kind_weights,
        description="Relative probability of each scene kind (need not sum to 1).",
    )
    saturating_fraction: float = Field(
        0.25, ge=0.0, le=1.0,
        description="Probability that a scene's brightest real features exceed 1.0 (full scale) "
        "and therefore legitimately saturate the detector.",
    )
    saturating_peak_range: PositiveRange = Field(
        (1.05, 3.0), description="Peak relative intensity of saturating scenes (log-uniform)."
    )
    peak_range: Range = Field(
        (0.3, 1.0), description="Peak relative intensity of ordinary scenes (uniform)."
    )
    dim_fraction: float = Field(
        0.15, ge=0.0, le=1.0,
        description="Share of the non-saturating scenes that are dim (peak from dim_peak_range).",
    )
    dim_peak_range: PositiveRange = Field(
        (0.04, 0.3), description="Peak relative intensity of dim scenes (log-uniform)."
    )
    background_range: PositiveRange = Field(
        (0.02, 0.3),
        description="Background level, relative intensity (log-uniform; capped at half the peak).",
    )
    plasma_slope_range: Range = Field(
        (-4.0, -2.0), description="Power-law index of the 2-D power spectrum P(k) ~ k**slope."
    )
    plasma_anisotropy_range: PositiveRange = Field(
        (1.0, 4.0), description="Stretch factor of turbulent structures along a random angle."
    )
    plasma_outer_scale_px: PositiveRange = Field(
        (16.0, 256.0), description="Largest turbulent scale in pixels (spectral roll-over)."
    )
    plasma_contrast_range: Range = Field(
        (0.25, 0.8), description="Log-normal contrast: emission = exp(contrast * gaussian field)."
    )
    plasma_psf_sigma_px: Range = Field(
        (0.5, 1.2),
        description="Gaussian sigma, pixels, of the optics' point-spread function through which the "
        "plasma emission is imaged (the same optics as point sources, ``point_sigma_px``): no "
        "camera passes the field's pixel-scale power. (0, 0): unblurred (generator 1.1).",
    )
    filament_width_px: PositiveRange = Field(
        (1.0, 6.0), description="Full width at half maximum of filaments and jets, pixels."
    )
    filament_length_px: PositiveRange = Field(
        (10.0, 160.0), description="Length of one filament along its curve, pixels."
    )
    filaments_per_mpx: Range = Field(
        (100.0, 1000.0), description="Filament density, filaments per megapixel."
    )
    spot_sigma_px: PositiveRange = Field(
        (1.5, 15.0), description="Gaussian sigma (major axis) of compact spots, pixels."
    )
    spots_per_mpx: Range = Field((30.0, 200.0), description="Spot density, spots per megapixel.")
    point_sigma_px: PositiveRange = Field(
        (0.5, 1.2), description="Point-spread-function sigma of point sources, pixels."
    )
    points_per_mpx: Range = Field(
        (150.0, 4000.0), description="Point-source density, sources per megapixel."
    )
    point_amplitude_range: PositiveRange = Field(
        (0.02, 1.0), description="Point-source amplitude relative to the brightest (log-uniform)."
    )
    edge_blur_px: Range = Field(
        (0.0, 1.0), description="Blur sigma of sharp edges (apertures, shadows, slits), pixels."
    )
    slit_width_px: PositiveRange = Field((3.0, 40.0), description="Slit width, pixels.")
    shadow_polygon_radius_px: PositiveRange = Field(
        (8.0, 120.0), description="Circumradius of polygonal target shadows, pixels."
    )
    shadow_polygons_per_mpx: Range = Field(
        (0.0, 40.0), description="Density of polygonal target shadows, per megapixel."
    )

    @field_validator("plasma_psf_sigma_px")
    @classmethod
    def _psf_not_negative(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] < 0:
            raise ValueError(f"plasma_psf_sigma_px must be >= 0, got {value!r}")
        return value

    @field_validator("kind_weights")
    @classmethod
    def _weights_usable(cls, value: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
            raise ValueError(f"kind_weights must be >= 0 with a positive sum, got {value!r}")
        return value


@dataclass
class Scene:
    """One clean scene.

    ``signal`` is float32 (H, W) relative intensity (see the module docstring); ``features``
    names the components present (``"background:vignetting"``, ``"points"``,
    ``"edges:slit"``, ...); ``peak`` is the scene maximum; ``saturating`` says whether real
    features were drawn above 1.0 on purpose.
    """

    signal: np.ndarray
    kind: str
    features: list[str] = field(default_factory=list)
    peak: float = 0.0
    saturating: bool = False


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for frame ``index`` of dataset ``seed``, independent of every other frame."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, index])


# --------------------------------------------------------------------------- helpers


def loguniform(
    rng: np.random.Generator, lo: float, hi: float, size: int | None = None
) -> np.ndarray | float:
    """Log-uniform draw(s) in [lo, hi] (lo > 0): a float, or an array when ``size`` is given."""
    if lo == hi:
        return np.full(size, lo) if size is not None else float(lo)
    value = np.exp(rng.uniform(math.log(lo), math.log(hi), size))
    return value if size is not None else float(value)


def _count(
    rng: np.random.Generator, per_mpx: tuple[float, float], area_px: int, minimum: int, cap: int
) -> int:
    """A Poisson feature count for a density drawn uniformly from ``per_mpx``."""
    density = rng.uniform(per_mpx[0], per_mpx[1])
    return int(min(cap, max(minimum, rng.poisson(density * area_px / 1e6))))


def accumulate(img: np.ndarray, flat_index: np.ndarray, values: np.ndarray) -> None:
    """img.flat[flat_index] += values, duplicates summed (img must be C-contiguous)."""
    if flat_index.size == 0:
        return
    if flat_index.size > img.size // 8:
        img += np.bincount(flat_index, values, minlength=img.size).reshape(img.shape).astype(_F32)
    else:
        np.add.at(img.reshape(-1), flat_index, values.astype(img.dtype, copy=False))


def deposit_bilinear(
    shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, ws: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices and values that share weights ``ws`` at sub-pixel positions among the
    4 nearest pixels (off-image parts dropped). Feed them to :func:`accumulate`."""
    h, w = shape
    y0 = np.floor(ys)
    x0 = np.floor(xs)
    fy = (ys - y0).astype(_F32)
    fx = (xs - x0).astype(_F32)
    y0 = y0.astype(np.intp)
    x0 = x0.astype(np.intp)
    ws = ws.astype(_F32, copy=False)
    idx, val = [], []
    for dy, dx, wgt in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yy = y0 + dy
        xx = x0 + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        idx.append(yy[ok] * w + xx[ok])
        val.append((ws * wgt)[ok])
    return np.concatenate(idx), np.concatenate(val)


def deposit_gaussians(
    shape: tuple[int, int],
    ys: np.ndarray,
    xs: np.ndarray,
    amps: np.ndarray,
    sigmas: np.ndarray,
    radius: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices and values of isotropic Gaussians of peak ``amps`` and width ``sigmas``
    (pixels), cut at ``radius`` pixels; vectorised and separable. For :func:`accumulate`."""
    h, w = shape
    if ys.size == 0:
        return np.zeros(0, np.intp), np.zeros(0, _F32)
    off = np.arange(-radius, radius + 1)
    py = np.rint(ys).astype(np.intp)[:, None] + off
    px = np.rint(xs).astype(np.intp)[:, None] + off
    inv = (1.0 / sigmas)[:, None]
    wy = np.exp(-0.5 * ((py - ys[:, None]) * inv) ** 2) * ((py >= 0) & (py < h))
    wx = np.exp(-0.5 * ((px - xs[:, None]) * inv) ** 2) * ((px >= 0) & (px < w))
    vals = (amps[:, None] * wy)[:, :, None] * wx[:, None, :]
    idx = np.clip(py, 0, h - 1)[:, :, None] * w + np.clip(px, 0, w - 1)[:, None, :]
    return idx.reshape(-1), vals.reshape(-1).astype(_F32)


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 across a boundary at signed distance d = 0 (positive inside), ``width`` px wide."""
    return np.clip(0.5 + d * _F32(1.0 / width), 0.0, 1.0)


def _normalise_max(layer: np.ndarray) -> np.ndarray:
    peak = float(layer.max())
    if peak > 0:
        layer *= _F32(1.0 / peak)
    return layer


def _coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(h, dtype=_F32)[:, None], np.arange(w, dtype=_F32)[None, :]


# --------------------------------------------------------------------------- components


def _render_background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """A smooth field with maximum 1: flat, low-order polynomial, wide Gaussian or vignetting."""
    styles = ["flat", "polynomial", "gaussian", "vignetting"]
    style = str(rng.choice(styles, p=[0.2, 0.3, 0.25, 0.25]))
    if style == "flat":
        return np.ones((h, w), _F32), "background:flat"
    scale = _F32(1.0 / max(h, w))
    y, x = _coords(h, w)
    y = (y - _F32((h - 1) / 2)) * scale  # image units, centred, aspect preserved
    x = (x - _F32((w - 1) / 2)) * scale
    floor = rng.uniform(0.3, 0.9)  # darkest / brightest ratio of the background
    if style == "polynomial":
        c = rng.normal(0.0, 1.0, 5).astype(_F32)
        f = c[0] * x + c[1] * y + c[2] * x * x + c[3] * y * y + c[4] * x * y
    elif style == "gaussian":
        cy, cx = rng.uniform(-0.3, 0.3, 2).astype(_F32)
        s = _F32(rng.uniform(0.3, 1.5))
        f = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    else:  # cos^4-like vignetting around a slightly decentred optical axis
        cy, cx = rng.uniform(-0.15, 0.15, 2).astype(_F32)
        r0 = _F32(rng.uniform(0.4, 1.5))
        f = 1.0 / (1.0 + ((x - cx) ** 2 + (y - cy) ** 2) / (r0 * r0)) ** 2
    f = np.asarray(f, _F32)
    lo, hi = float(f.min()), float(f.max())
    if hi - lo < 1e-12:
        return np.ones((h, w), _F32), f"background:{style}"
    f = (f - _F32(lo)) * _F32((1.0 - floor) / (hi - lo)) + _F32(floor)
    return f, f"background:{style}"


def _render_plasma(
    rng: np.random.Generator, h: int, w: int, cfg: SceneConfig
) -> tuple[np.ndarray, str]:
    """Turbulent emission: FFT-filtered noise with an anisotropic power-law spectrum."""
    slope = rng.uniform(*cfg.plasma_slope_range)
    stretch = math.sqrt(loguniform(rng, *cfg.plasma_anisotropy_range))
    angle = rng.uniform(0.0, math.pi)
    k0 = 1.0 / loguniform(rng, *cfg.plasma_outer_scale_px)
    ky = fft.fftfreq(h).astype(_F32)[:, None]  # cycles per pixel: size-independent statistics
    kx = fft.rfftfreq(w).astype(_F32)[None, :]
    ca, sa = _F32(math.cos(angle)), _F32(math.sin(angle))
    k2 = (
        ((kx * ca + ky * sa) * _F32(stretch)) ** 2
        + ((ky * ca - kx * sa) / _F32(stretch)) ** 2
        + _F32(k0 * k0)
    )
    amplitude = k2 ** _F32(slope / 4.0)  # sqrt of the power spectrum
    amplitude[0, 0] = 0.0
    # White noise drawn directly in Fourier space saves one FFT.
    noise = rng.standard_normal((h, w // 2 + 1, 2), dtype=_F32).view(np.complex64)[..., 0]
    g = fft.irfft2(noise * amplitude, s=(h, w)).astype(_F32, copy=False)
    sub = g[:: max(1, h // 256), :: max(1, w // 256)]
    g -= _F32(sub.mean())
    g *= _F32(1.0 / max(float(sub.std()), 1e-12))
    if rng.random() < 0.6:
        contrast = _F32(rng.uniform(*cfg.plasma_contrast_range))
        layer = np.exp(contrast * g)
        style = "lognormal"
    else:  # patchy emission: only the upper part of the field glows
        threshold = _F32(rng.uniform(-0.5, 1.5))
        layer = np.maximum(g - threshold, 0.0) ** _F32(rng.uniform(0.7, 1.5))
        style = "clipped"
    layer = layer.astype(_F32, copy=False)
    if cfg.plasma_psf_sigma_px[1] > 0:  # (0, 0) draws nothing: generator 1.1's stream
        psf = float(rng.uniform(*cfg.plasma_psf_sigma_px))
        # the field is periodic (drawn in Fourier space): wrap, no edge darkening
        layer = ndimage.gaussian_filter(layer, psf, mode="wrap", truncate=3.0)
    return _normalise_max(layer), f"plasma:{style}"


def _render_filaments(
    rng: np.random.Generator, h: int, w: int, cfg: SceneConfig
) -> tuple[np.ndarray, str]:
    """Thin curved streaks (and jets: a bright core in a wider halo) with smooth intensity."""
    n = _count(rng, cfg.filaments_per_mpx, h * w, minimum=1, cap=4000)
    sigmas = np.sort(np.asarray(loguniform(rng, *cfg.filament_width_px, size=2))) / _FWHM_PER_SIGMA
    length = np.asarray(loguniform(rng, *cfg.filament_length_px, size=n))
    y0 = rng.uniform(0, h, n)
    x0 = rng.uniform(0, w, n)
    theta0 = rng.uniform(0.0, 2 * math.pi, n)
    turn = rng.normal(0.0, 1.0, n)  # total bending, radians
    wiggle = rng.normal(0.0, 0.3, n)
    wiggle_freq = rng.uniform(0.5, 2.0, n)
    phase = rng.uniform(0.0, 2 * math.pi, (2, n))
    taper = rng.uniform(0.2, 0.8, n)
    ripple = rng.uniform(0.0, 0.6, n)
    ripple_freq = rng.uniform(0.5, 3.0, n)
    amp = np.asarray(loguniform(rng, 0.2, 1.0, size=n))
    amp[0] = 1.0
    jet = rng.random(n) < 0.3
    decay = rng.uniform(0.5, 3.0, n)
    wide = rng.random(n) < 0.5

    m = int(math.ceil(float(length.max()) / 0.5)) + 2  # <= 0.5 px between samples
    t = np.linspace(0.0, 1.0, m)[None, :]
    theta = (
        theta0[:, None] + turn[:, None] * t
        + wiggle[:, None] * np.sin(2 * math.pi * wiggle_freq[:, None] * t + phase[0][:, None])
    )
    ds = (length / (m - 1))[:, None]
    ys = y0[:, None] + np.cumsum(np.sin(theta), axis=1) * ds
    xs = x0[:, None] + np.cumsum(np.cos(theta), axis=1) * ds
    profile = np.sin(np.pi * t) ** taper[:, None] * (
        1.0 + ripple[:, None] * np.sin(2 * math.pi * ripple_freq[:, None] * t + phase[1][:, None])
    )
    profile = np.where(jet[:, None], profile * np.exp(-decay[:, None] * t), profile)
    line_density = amp[:, None] * profile * ds  # charge per sample, before the width factor

    layer = np.zeros((h, w), _F32)
    for b, sigma in enumerate(sigmas):
        # A line of linear density L blurred by a Gaussian of sigma s peaks at L / (sqrt(2 pi) s).
        norm = math.sqrt(2 * math.pi) * sigma
        members = (wide if b == 1 else ~wide)
        weights = line_density * norm * members[:, None]
        if b == 1:  # jet halo: every jet also glows in the wide component
            weights = weights + line_density * norm * 0.4 * (jet & ~wide)[:, None]
        keep = np.flatnonzero(weights.any(axis=1))
        if keep.size == 0:
            continue
        deposit = np.zeros((h, w), _F32)
        samples = (ys[keep].ravel(), xs[keep].ravel(), weights[keep].ravel())
        accumulate(deposit, *deposit_bilinear((h, w), *samples))
        layer += ndimage.gaussian_filter(deposit, float(sigma), truncate=3.0, mode="constant")
    name = "filaments:jets" if jet.any() else "filaments"
    return _normalise_max(layer), name


def _render_spots(
    rng: np.random.Generator, h: int, w: int, cfg: SceneConfig
) -> tuple[np.ndarray, str]:
    """Compact elliptical Gaussian / super-Gaussian (flat-top) spots, e.g. a beam spot."""
    n = _count(rng, cfg.spots_per_mpx, h * w, minimum=1, cap=3000)
    sig_major = np.asarray(loguniform(rng, *cfg.spot_sigma_px, size=n))
    ratio = np.asarray(loguniform(rng, 1.0, 2.0, size=n))
    angle = rng.uniform(0.0, math.pi, n)
    flat_top = rng.random(n) < 0.4
    power = np.where(flat_top, rng.uniform(1.5, 4.0, n), 1.0)
    amp = rng.uniform(0.3, 1.0, n)
    amp[0] = 1.0
    cy = rng.uniform(0, h, n)
    cx = rng.uniform(0, w, n)
    layer = np.zeros((h, w), _F32)
    for i in range(n):
        r = int(math.ceil(sig_major[i] * (3.5 if power[i] == 1.0 else 2.5))) + 1
        ya, yb = max(0, int(cy[i]) - r), min(h, int(cy[i]) + r + 1)
        xa, xb = max(0, int(cx[i]) - r), min(w, int(cx[i]) + r + 1)
        if ya >= yb or xa >= xb:
            continue
        yy = np.arange(ya, yb, dtype=_F32)[:, None] - _F32(cy[i])
        xx = np.arange(xa, xb, dtype=_F32)[None, :] - _F32(cx[i])
        c, s = _F32(math.cos(angle[i])), _F32(math.sin(angle[i]))
        u = (xx * c + yy * s) * _F32(1.0 / sig_major[i])
        v = (yy * c - xx * s) * _F32(ratio[i] / sig_major[i])
        q = _F32(0.5) * (u * u + v * v)
        if power[i] != 1.0:
            q = q ** _F32(power[i])
        layer[ya:yb, xa:xb] += _F32(amp[i]) * np.exp(-q)
    return _normalise_max(layer), "spots:flat-top" if flat_top.any() else "spots"


def _render_points(
    rng: np.random.Generator, h: int, w: int, cfg: SceneConfig
) -> tuple[np.ndarray, str]:
    """Point sources through one optical PSF (1-3 px wide): what median filters destroy."""
    n = _count(rng, cfg.points_per_mpx, h * w, minimum=1, cap=50000)
    psf = rng.uniform(*cfg.point_sigma_px)
    sigmas = psf * rng.uniform(0.9, 1.1, n)
    amps = np.asarray(loguniform(rng, *cfg.point_amplitude_range, size=n))
    amps[0] = cfg.point_amplitude_range[1]
    ys = rng.uniform(-0.5, h - 0.5, n)
    xs = rng.uniform(-0.5, w - 0.5, n)
    layer = np.zeros((h, w), _F32)
    radius = int(math.ceil(3.0 * float(sigmas.max())))
    accumulate(layer, *deposit_gaussians((h, w), ys, xs, amps, sigmas, radius))
    return _normalise_max(layer), "points"


def _render_edges(
    rng: np.random.Generator, h: int, w: int, cfg: SceneConfig
) -> tuple[np.ndarray, list[str]]:
    """Transmission in [0, 1] with sharp straight or circular boundaries (0-1 px blur)."""
    transmission = np.ones((h, w), _F32)
    y, x = _coords(h, w)
    width = 1.0 + 2.5 * rng.uniform(*cfg.edge_blur_px)  # ramp width, px
    names: list[str] = []
    options = ["aperture:circle", "aperture:rectangle", "shadow", "slit"]
    chosen = [str(o) for o in rng.choice(options, size=int(rng.integers(1, 3)), replace=False)]
    if "slit" in chosen:  # a slit combined with another stop leaves almost nothing lit
        chosen = ["slit"]

    def aligned_angle() -> float:
        if rng.random() < 0.5:
            return float(rng.integers(0, 4)) * math.pi / 2
        return rng.uniform(0.0, 2 * math.pi)

    for obj in chosen:
        leak = _F32(rng.uniform(0.0, 0.08))
        cy = _F32(rng.uniform(0.2, 0.8) * h)
        cx = _F32(rng.uniform(0.2, 0.8) * w)
        if obj == "aperture:circle":
            radius = _F32(rng.uniform(0.35, 0.75) * min(h, w))
            d = radius - np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
        elif obj == "aperture:rectangle":
            a = _F32(rng.uniform(0.2, 0.45) * w)
            b = _F32(rng.uniform(0.2, 0.45) * h)
            ang = 0.0 if rng.random() < 0.5 else rng.uniform(-0.2, 0.2)
            c, s = _F32(math.cos(ang)), _F32(math.sin(ang))
            u = (x - cx) * c + (y - cy) * s
            v = (y - cy) * c - (x - cx) * s
            d = np.minimum(a - np.abs(u), b - np.abs(v))
        elif obj == "shadow":  # half-plane, e.g. a knife edge or target holder
            ang = aligned_angle()
            d = (x - cx) * _F32(math.cos(ang)) + (y - cy) * _F32(math.sin(ang))
        else:  # slit
            ang = aligned_angle()
            half = _F32(0.5 * loguniform(rng, *cfg.slit_width_px))
            d = half - np.abs((x - cx) * _F32(math.cos(ang)) + (y - cy) * _F32(math.sin(ang)))
        transmission *= leak + (1 - leak) * _ramp(d, width)
        names.append(f"edges:{obj}")

    n_poly = _count(rng, cfg.shadow_polygons_per_mpx, h * w, minimum=0, cap=500)
    for _ in range(n_poly):
        leak = _F32(rng.uniform(0.0, 0.08))
        radius = loguniform(rng, *cfg.shadow_polygon_radius_px)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        k = int(rng.integers(3, 7))
        ang = np.sort(rng.uniform(0.0, 2 * math.pi, k))
        vy = cy + radius * np.sin(ang)
        vx = cx + radius * np.cos(ang)
        ya, yb = max(0, int(vy.min()) - 2), min(h, int(vy.max()) + 3)
        xa, xb = max(0, int(vx.min()) - 2), min(w, int(vx.max()) + 3)
        if ya >= yb or xa >= xb:
            continue
        py = np.arange(ya, yb, dtype=_F32)[:, None]
        px = np.arange(xa, xb, dtype=_F32)[None, :]
        d = np.full((yb - ya, xb - xa), np.inf, _F32)
        for i in range(k):  # convex polygon: signed distance = min over its edges
            ey, ex = vy[(i + 1) % k] - vy[i], vx[(i + 1) % k] - vx[i]
            norm = math.hypot(ey, ex)
            if norm < 1e-6:
                continue
            ny, nx = _F32(ex / norm), _F32(-ey / norm)  # inward for counter-clockwise vertices
            d = np.minimum(d, (py - _F32(vy[i])) * ny + (px - _F32(vx[i])) * nx)
        transmission[ya:yb, xa:xb] *= leak + (1 - leak) * (1 - _ramp(d, width))
    if n_poly:
        names.append("edges:polygons")
    return transmission, names


_ADDITIVE = {
    "plasma": _render_plasma,
    "filaments": _render_filaments,
    "spots": _render_spots,
    "points": _render_points,
}


# --------------------------------------------------------------------------- scenes


def _sample_peak(rng: np.random.Generator, cfg: SceneConfig) -> tuple[float, bool]:
    u = rng.random()
    if u < cfg.saturating_fraction:
        return float(loguniform(rng, *cfg.saturating_peak_range)), True
    if rng.random() < cfg.dim_fraction:
        return float(loguniform(rng, *cfg.dim_peak_range)), False
    return float(rng.uniform(*cfg.peak_range)), False


def generate_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    config: SceneConfig | None = None,
    kind: str | None = None,
) -> Scene:
    """Draw one clean scene of shape (height, width); ``kind`` None draws it from the config."""
    cfg = config if config is not None else SceneConfig()
    if height < _MIN_SIDE or width < _MIN_SIDE:
        raise ValueError(f"scene must be at least {_MIN_SIDE}x{_MIN_SIDE}, got {height}x{width}")
    if kind is None:
        kinds = list(cfg.kind_weights)
        p = np.array([cfg.kind_weights[k] for k in kinds], dtype=float)
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    elif kind not in SCENE_KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {SCENE_KINDS}")
    h, w = int(height), int(width)
    peak, saturating = _sample_peak(rng, cfg)
    background, bg_name = _render_background(rng, h, w)
    features = [bg_name]

    if kind == "background":
        signal = background
    elif kind == "edges":
        # Illumination fills the field; the edges cut it.
        transmission, names = _render_edges(rng, h, w, cfg)
        signal = background * transmission
        features += names
    else:
        if kind == "mixed":
            n = int(rng.integers(2, 5))
            parts = [str(p) for p in rng.choice(COMPONENT_KINDS, size=n, replace=False)]
        else:
            parts = [kind]
        bg_level = min(float(loguniform(rng, *cfg.background_range)), 0.5 * peak)
        additive = [p for p in parts if p != "edges"]
        total = np.zeros((h, w), _F32)
        for i, part in enumerate(additive):
            layer, name = _ADDITIVE[part](rng, h, w, cfg)
            weight = 1.0 if i == 0 else float(loguniform(rng, 0.15, 1.0))
            total += _F32(weight) * layer
            features.append(name)
        top = float(total.max())
        if top > 0:
            total *= _F32((peak - bg_level) / top)
        signal = total
        signal += _F32(bg_level) * background
        if "edges" in parts:
            transmission, names = _render_edges(rng, h, w, cfg)
            signal *= transmission
            features += names

    top = float(signal.max())
    if top > 0:
        signal *= _F32(peak / top)
    signal = np.ascontiguousarray(signal, dtype=_F32)
    if saturating:
        features.append("saturating")
    return Scene(signal=signal, kind=kind, features=features, peak=float(signal.max()),
                 saturating=saturating)


# --------------------------------------------------------------------------- gallery


def save_gallery(path: str, seed: int = 0) -> None:
    """Write a PNG: one scene of each kind, then detector frames with defect masks overlaid."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    from cdae.training import defects

    size = 128
    n = len(SCENE_KINDS)
    fig = Figure(figsize=(2.2 * n, 2.4 * 3), dpi=90)
    axes = fig.subplots(3, n)
    heavy = defects.DefectConfig.all_defects()
    colours = {  # RGBA per mask bit, later ones drawn on top
        defects.BLOOM: (1.0, 0.6, 0.0, 0.6),
        defects.BAD_LINE: (0.0, 0.8, 1.0, 0.5),
        defects.RADIATION: (1.0, 0.0, 1.0, 0.8),
        defects.SATURATED_BLOB: (1.0, 1.0, 0.0, 0.7),
        defects.DEAD: (0.0, 0.3, 1.0, 0.9),
        defects.HOT: (1.0, 0.0, 0.0, 0.9),
    }
    for col, kind in enumerate(SCENE_KINDS):
        rng = scene_rng(seed, col)
        scene = generate_scene(rng, size, size, kind=kind)
        ax = axes[0, col]
        ax.imshow(scene.signal, cmap="magma", vmin=0.0, vmax=max(1.0, scene.peak))
        ax.set_title(f"{kind}\npeak {scene.peak:.2f}", fontsize=8)
        bit_depth = (8, 12, 16)[col % 3]
        params = defects.sample_defect_params(rng, heavy if col % 2 else None, bit_depth)
        frame = defects.apply_detector(scene.signal, rng, params)
        axes[1, col].imshow(frame.noisy, cmap="gray", vmin=0, vmax=frame.adc_max)
        axes[1, col].set_title(f"noisy {bit_depth}-bit", fontsize=8)
        axes[2, col].imshow(frame.noisy, cmap="gray", vmin=0, vmax=frame.adc_max)
        overlay = np.zeros((size, size, 4), np.float32)
        for bit, rgba in colours.items():
            overlay[(frame.defect_mask & bit) != 0] = rgba
        axes[2, col].imshow(overlay)
        axes[2, col].set_title(f"mask: {int((frame.defect_mask > 0).sum())} px", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"cdae scenes (generator {GENERATOR_VERSION}, seed {seed}); mask colours: "
        "hot red, dead blue, bad line cyan, bloom orange, radiation magenta, glint yellow",
        fontsize=9,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def main(argv: list[str] | None = None) -> None:
    """``python -m cdae.training.simulate --out DIR [--seed N]`` writes DIR/gallery.png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gallery.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out) / "gallery.png"
    save_gallery(str(out), seed=args.seed)
    print(out)


if __name__ == "__main__":
    main()
