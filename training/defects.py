"""Detector model: a clean scene in, a noisy quantised frame and its ground truth out.

The chain, per pixel (electrons ``e``, digital numbers ``DN``)::

    expected photo-electrons  e_exp = signal * exposure_scale * full_well_e
    clean (training target)   min(e_exp, full_well_e) / gain_e_per_dn + bias_dn, clipped to ADC
    light                     e_exp * PRNU (+ artefact glints)
    shot noise                Poisson(light)  (Gaussian above SHOT_NOISE_GAUSSIAN_ABOVE_E)
    dead pixels / lines       photo-charge scaled by their residual response
    radiation                 + deposited charge (spots and tracks)
    full well                 charge above full_well_e is lost (anti-blooming) or blooms
                              up and down its column (CCD-like)
    read noise                + Normal(0, read_noise_e)
    conversion                e / gain_e_per_dn + bias_dn + DSNU
    hot lines, warm pixels    + offset DN;  stuck (hot) pixels: fixed DN
    quantisation              round, clip to [0, adc_max]

Full scale: ``signal == 1.0`` fills the well (``full_well_e``), which maps to
``bias_dn + full_scale_fraction * (adc_max - bias_dn)`` DN. Real features above 1.0 saturate
in ``clean`` as well: they are data. Bloom trails they cause are defects.

Defect mask bits (:data:`DEAD` ... :data:`SATURATED_BLOB`): DEAD, HOT and BAD_LINE describe the
*pixel* (a camera property, marked whether or not the scene makes it visible); RADIATION,
SATURATED_BLOB and BLOOM mark only pixels that the event changed by more than
:data:`SIGNIFICANCE_SIGMA` times the local noise, and not pixels already saturated by the scene.

Changing what this module produces for a given seed means bumping
:data:`cdae.training.simulate.GENERATOR_VERSION`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from scipy import ndimage
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from cdae.training.simulate import (
    PositiveRange,
    Range,
    Scene,
    SceneConfig,
    deposit_bilinear,
    deposit_gaussians,
    generate_scene,
    loguniform,
    scene_rng,
)

__all__ = [
    "BAD_LINE",
    "BIT_DEPTHS",
    "BLOOM",
    "DEAD",
    "HOT",
    "MASK_BITS",
    "MASK_SUBCLASSES",
    "RADIATION",
    "SATURATED_BLOB",
    "SHOT_NOISE_GAUSSIAN_ABOVE_E",
    "SIGNIFICANCE_SIGMA",
    "BadLine",
    "DefectConfig",
    "DefectLayout",
    "DefectParams",
    "DetectorFrame",
    "apply_detector",
    "mask_subclass",
    "radiation_tracks",
    "detector_rng",
    "frame_camera",
    "has_saturation_artefacts",
    "sample_defect_layout",
    "sample_defect_params",
    "simulate_frame",
]

DEAD = 1  #: pixel with (almost) no photo-response: reads bias + read noise
HOT = 2  #: stuck pixel (fixed high DN) or warm pixel (extra dark offset)
BAD_LINE = 4  #: dead or hot column/row (whole, or from a charge trap to the frame edge)
BLOOM = 8  #: charge spilled along a column from a saturated pixel (real or artefact)
RADIATION = 16  #: cosmic ray / X-ray hit: spot or track of deposited charge
SATURATED_BLOB = 32  #: artefact glint (stray reflection) bright enough to saturate
MASK_BITS: dict[str, int] = {
    "dead": DEAD,
    "hot": HOT,
    "bad_line": BAD_LINE,
    "bloom": BLOOM,
    "radiation": RADIATION,
    "saturated_blob": SATURATED_BLOB,
}
BIT_DEPTHS: tuple[int, ...] = (8, 12, 16)
#: Shot noise is drawn from Poisson below this many expected electrons and above it from a
#: skewness-corrected (Cornish-Fisher) Gaussian, rounded to whole electrons: mean, variance
#: and skewness are Poisson's, the excess kurtosis (1/mean < 2 %) is not. numpy's Poisson
#: sampler costs ~5x a Gaussian draw, which matters at thousands of frames per second.
SHOT_NOISE_GAUSSIAN_ABOVE_E: float = 50.0
#: Sub-classes of the mask bits that training can weigh on their own (``loss.class_weights``), found
#: from the mask's shape by :func:`mask_subclass`.
MASK_SUBCLASSES: tuple[str, ...] = ("radiation_track",)
#: A radiation track: a hit of at least this many pixels, this many times longer than wide.
TRACK_MIN_PIXELS = 4
TRACK_MIN_ELONGATION = 2.0
#: Event masks (RADIATION, SATURATED_BLOB, BLOOM) mark pixels changed by more than this many
#: standard deviations of the local noise (shot + read + quantisation).
SIGNIFICANCE_SIGMA: float = 3.0

_F32 = np.float32


def _check_int_range(value: tuple[int, int]) -> tuple[int, int]:
    if value[0] < 0 or value[0] > value[1]:
        raise ValueError(f"expected a count range (lo, hi) with 0 <= lo <= hi, got {value!r}")
    return value


#: (lo, hi) inclusive count range, sampled uniformly.
CountRange = Annotated[tuple[int, int], AfterValidator(_check_int_range)]
_Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class DefectConfig(BaseModel):
    """Ranges from which one frame's detector is drawn (``sample_defect_params``).

    Ranges are (lo, hi); "log-uniform" ones must be positive. ``*_probability`` fields give the
    chance that a defect class is present in a frame at all, so that some frames are clean and
    some heavily damaged.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- sensor and ADC
    full_well_e: PositiveRange = Field(
        (2e3, 1e5),
        description="Full-well capacity, electrons: the charge at relative signal 1.0 "
        "(log-uniform). Sets the shot-noise level: SNR at full scale = sqrt(full_well_e).",
    )
    full_scale_fraction: Range = Field(
        (0.9, 1.0),
        description="Fraction of the ADC span above bias (adc_max - bias_dn) reached by a full "
        "well; the conversion gain is derived from it.",
    )
    read_noise_e: PositiveRange = Field(
        (1.0, 30.0), description="Read noise, electrons RMS, Gaussian (log-uniform)."
    )
    bias_frac: Range = Field(
        (0.0, 0.08), description="Bias (offset) level as a fraction of adc_max, DN/DN."
    )
    prnu_frac: Range = Field(
        (0.0, 0.02),
        description="Photo-response non-uniformity: RMS of the per-pixel gain, fraction of 1 "
        "(multiplicative fixed pattern).",
    )
    dsnu_frac: Range = Field(
        (0.0, 0.002),
        description="Dark-signal non-uniformity: RMS of the per-pixel offset as a fraction of "
        "adc_max (additive fixed pattern).",
    )
    exposure_scale: Range = Field(
        (0.3, 1.2),
        description="Exposure (time x flux) factor multiplying the scene before conversion.",
    )
    # --- pixel defects
    dead_pixel_probability: _Probability = Field(0.5, description="Chance a frame has dead pixels.")
    dead_pixel_frac: Range = Field(
        (0.0, 2e-3), description="Fraction of pixels that are dead, when present."
    )
    dead_pixel_response: Range = Field(
        (0.0, 0.1), description="Residual photo-response of a dead pixel, fraction of nominal."
    )
    hot_pixel_probability: _Probability = Field(0.5, description="Chance a frame has hot pixels.")
    hot_pixel_frac: Range = Field(
        (0.0, 2e-3), description="Fraction of pixels that are hot (stuck or warm), when present."
    )
    warm_pixel_share: _Probability = Field(
        0.5, description="Share of hot pixels that are warm (extra offset) rather than stuck."
    )
    hot_stuck_level_frac: Range = Field(
        (0.2, 1.0), description="DN of a stuck pixel as a fraction of adc_max (up to saturation)."
    )
    warm_offset_frac: PositiveRange = Field(
        (0.03, 0.5),
        description="Extra dark offset of a warm pixel, fraction of the ADC span above bias "
        "(log-uniform).",
    )
    # --- bad lines
    bad_line_probability: _Probability = Field(
        0.3, description="Chance a frame has bad columns/rows (then at least one)."
    )
    dead_columns: CountRange = Field((0, 3), description="Dead columns per frame, when present.")
    hot_columns: CountRange = Field((0, 3), description="Hot columns per frame, when present.")
    dead_rows: CountRange = Field((0, 2), description="Dead rows per frame, when present.")
    hot_rows: CountRange = Field((0, 2), description="Hot rows per frame, when present.")
    partial_line_share: _Probability = Field(
        0.3,
        description="Share of bad lines that run from a charge trap to one edge of the frame "
        "instead of across it.",
    )
    bad_line_response: Range = Field(
        (0.0, 0.3), description="Residual photo-response of a dead line, fraction of nominal."
    )
    hot_line_offset_frac: Range = Field(
        (0.02, 0.3), description="Extra offset of a hot line, fraction of the ADC span above bias."
    )
    # --- artefact glints and blooming
    saturated_blob_probability: _Probability = Field(
        0.2, description="Chance a frame has artefact glints (stray reflections) that saturate."
    )
    saturated_blobs: CountRange = Field((1, 2), description="Glints per frame, when present.")
    saturated_blob_radius_px: PositiveRange = Field(
        (3.0, 16.0), description="Glint (ghost disc or annulus) outer radius, pixels (log-uniform)."
    )
    saturated_blob_peak_full_wells: PositiveRange = Field(
        (1.2, 12.0), description="Glint peak charge in full wells (log-uniform); > 1 saturates."
    )
    bloom_probability: _Probability = Field(
        0.5,
        description="Chance the sensor blooms (CCD-like): charge above full well spills along "
        "its column; otherwise it is drained (anti-blooming CMOS).",
    )
    bloom_up_share: Range = Field(
        (0.3, 0.7), description="Share of the spilled charge that goes up (to lower row index)."
    )
    # --- radiation
    radiation_probability: _Probability = Field(
        0.4, description="Chance a frame has radiation hits (cosmic rays, scattered X-rays)."
    )
    radiation_hits_per_mpx: Range = Field(
        (0.0, 300.0), description="Hit density per megapixel per frame, when present."
    )
    radiation_track_share: _Probability = Field(
        0.4, description="Share of hits that are straight tracks rather than 1-3 px spots."
    )
    radiation_track_length_px: PositiveRange = Field(
        (3.0, 30.0), description="Track length, pixels (log-uniform)."
    )
    radiation_charge_full_wells: PositiveRange = Field(
        (0.1, 2.0),
        description="Charge deposited per pixel of a hit (spot peak, or per pixel of track "
        "length), in full wells (log-uniform).",
    )

    @classmethod
    def noise_only(cls, **overrides: object) -> DefectConfig:
        """Shot, read and fixed-pattern noise; every defect class off."""
        values: dict[str, object] = {
            "dead_pixel_probability": 0.0,
            "hot_pixel_probability": 0.0,
            "bad_line_probability": 0.0,
            "saturated_blob_probability": 0.0,
            "bloom_probability": 0.0,
            "radiation_probability": 0.0,
        }
        values.update(overrides)
        return cls.model_validate(values)

    @classmethod
    def all_defects(cls, **overrides: object) -> DefectConfig:
        """Every defect class present in every frame, at clearly visible levels."""
        values: dict[str, object] = {
            "dead_pixel_probability": 1.0,
            "dead_pixel_frac": (1e-3, 2e-3),
            "hot_pixel_probability": 1.0,
            "hot_pixel_frac": (1e-3, 2e-3),
            "bad_line_probability": 1.0,
            "dead_columns": (1, 2),
            "hot_columns": (1, 2),
            "dead_rows": (1, 1),
            "hot_rows": (1, 1),
            "saturated_blob_probability": 1.0,
            "bloom_probability": 1.0,
            "radiation_probability": 1.0,
            "radiation_hits_per_mpx": (300.0, 600.0),
        }
        values.update(overrides)
        return cls.model_validate(values)


class DefectParams(BaseModel):
    """The detector drawn for one frame (or one camera): scalars, in physical units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bit_depth: int = Field(description="ADC bits (8, 12 or 16).")
    adc_max: int = Field(description="Largest DN, 2**bit_depth - 1.")
    full_well_e: float = Field(gt=0, description="Full-well capacity, electrons (= signal 1.0).")
    full_scale_fraction: float = Field(
        gt=0, le=1, description="Fraction of (adc_max - bias_dn) that a full well reaches."
    )
    gain_e_per_dn: float = Field(gt=0, description="Conversion gain, electrons per DN.")
    read_noise_e: float = Field(ge=0, description="Read noise, electrons RMS.")
    bias_dn: float = Field(ge=0, description="Bias (offset), DN.")
    prnu_frac: float = Field(ge=0, description="Per-pixel gain non-uniformity, RMS fraction.")
    dsnu_dn: float = Field(ge=0, description="Per-pixel offset non-uniformity, DN RMS.")
    exposure_scale: float = Field(ge=0, description="Factor on the scene before conversion.")
    dead_pixel_frac: float = Field(ge=0, le=1, description="Fraction of dead pixels.")
    dead_pixel_response: tuple[float, float] = Field(
        description="Range of a dead pixel's residual response, fraction of nominal."
    )
    hot_pixel_frac: float = Field(ge=0, le=1, description="Fraction of hot pixels.")
    warm_pixel_share: float = Field(ge=0, le=1, description="Share of hot pixels that are warm.")
    hot_stuck_level_dn: tuple[float, float] = Field(description="Range of stuck-pixel DN.")
    warm_offset_dn: tuple[float, float] = Field(
        description="Range of warm-pixel extra offset, DN (log-uniform)."
    )
    dead_columns: int = Field(ge=0, description="Number of dead columns.")
    hot_columns: int = Field(ge=0, description="Number of hot columns.")
    dead_rows: int = Field(ge=0, description="Number of dead rows.")
    hot_rows: int = Field(ge=0, description="Number of hot rows.")
    partial_line_share: float = Field(ge=0, le=1, description="Share of partial bad lines.")
    bad_line_response: tuple[float, float] = Field(
        description="Range of a dead line's residual response, fraction of nominal."
    )
    hot_line_offset_dn: tuple[float, float] = Field(description="Range of hot-line offset, DN.")
    saturated_blobs: int = Field(ge=0, description="Number of artefact glints in the frame.")
    saturated_blob_radius_px: tuple[float, float] = Field(description="Glint outer radius range, px.")
    saturated_blob_peak_full_wells: tuple[float, float] = Field(
        description="Glint peak charge range, full wells."
    )
    bloom: bool = Field(description="True: charge above full well spills along columns.")
    bloom_up_share: float = Field(ge=0, le=1, description="Share of spilled charge going up.")
    radiation_hits_per_mpx: float = Field(ge=0, description="Radiation hits per megapixel.")
    radiation_track_share: float = Field(ge=0, le=1, description="Share of hits that are tracks.")
    radiation_track_length_px: tuple[float, float] = Field(description="Track length range, px.")
    radiation_charge_full_wells: tuple[float, float] = Field(
        description="Deposited charge per hit pixel, full wells."
    )

    @property
    def saturation_dn(self) -> float:
        """DN of a full well (what a saturated real feature reads in ``clean``)."""
        return min(float(self.adc_max), self.bias_dn + self.full_well_e / self.gain_e_per_dn)


@dataclass
class BadLine:
    """One bad column or row, affected over ``[start, stop)`` along the line."""

    axis: Literal["column", "row"]
    index: int
    start: int
    stop: int
    kind: Literal["dead", "hot"]
    #: dead: residual photo-response (fraction); hot: extra offset, DN.
    value: float

    def region(self) -> tuple[slice | int, slice | int]:
        """Index into a (H, W) array."""
        if self.axis == "column":
            return slice(self.start, self.stop), self.index
        return self.index, slice(self.start, self.stop)


@dataclass
class DefectLayout:
    """Where one camera's permanent damage and fixed patterns are: reuse it frame after frame.

    Coordinates are (row, col) integer arrays of shape (N, 2).
    """

    height: int
    width: int
    dead_pixels: np.ndarray
    dead_response: np.ndarray  #: (N,) float32, residual photo-response fraction
    stuck_pixels: np.ndarray
    stuck_dn: np.ndarray  #: (N,) float32, the DN a stuck pixel always reads
    warm_pixels: np.ndarray
    warm_offset_dn: np.ndarray  #: (N,) float32, extra offset
    bad_lines: list[BadLine] = field(default_factory=list)
    prnu_map: np.ndarray | None = None  #: (H, W) float32 gain factor, mean 1; None = uniform
    dsnu_map: np.ndarray | None = None  #: (H, W) float32 offset in DN, mean 0; None = none

    def static_mask(self) -> np.ndarray:
        """uint8 (H, W) mask of the permanent defects: DEAD, HOT, BAD_LINE bits."""
        mask = np.zeros((self.height, self.width), np.uint8)
        for line in self.bad_lines:
            mask[line.region()] |= BAD_LINE
        mask[self.dead_pixels[:, 0], self.dead_pixels[:, 1]] |= DEAD
        mask[self.stuck_pixels[:, 0], self.stuck_pixels[:, 1]] |= HOT
        mask[self.warm_pixels[:, 0], self.warm_pixels[:, 1]] |= HOT
        return mask

    def crop(self, top: int, left: int, height: int, width: int) -> DefectLayout:
        """The same camera seen through a (height, width) window at (top, left): a training patch."""
        if not (0 <= top and 0 <= left and top + height <= self.height and left + width <= self.width):
            raise ValueError(f"window {height}x{width} at ({top}, {left}) is outside the {self.height}x{self.width} layout")

        def inside(px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            keep = (px[:, 0] >= top) & (px[:, 0] < top + height) & (px[:, 1] >= left) & (px[:, 1] < left + width)
            return (px[keep] - np.array([top, left], dtype=px.dtype)).reshape(-1, 2), keep

        dead, k_dead = inside(self.dead_pixels)
        stuck, k_stuck = inside(self.stuck_pixels)
        warm, k_warm = inside(self.warm_pixels)
        lines = []
        for ln in self.bad_lines:
            across, along, n_across, n_along = (left, top, width, height) if ln.axis == "column" else (top, left, height, width)
            start, stop = max(ln.start - along, 0), min(ln.stop - along, n_along)
            if across <= ln.index < across + n_across and start < stop:
                lines.append(BadLine(ln.axis, ln.index - across, start, stop, ln.kind, ln.value))
        window = (slice(top, top + height), slice(left, left + width))
        return DefectLayout(
            height=height,
            width=width,
            dead_pixels=dead,
            dead_response=self.dead_response[k_dead],
            stuck_pixels=stuck,
            stuck_dn=self.stuck_dn[k_stuck],
            warm_pixels=warm,
            warm_offset_dn=self.warm_offset_dn[k_warm],
            bad_lines=lines,
            prnu_map=None if self.prnu_map is None else self.prnu_map[window].copy(),
            dsnu_map=None if self.dsnu_map is None else self.dsnu_map[window].copy(),
        )


@dataclass
class DetectorFrame:
    """One simulated frame with its ground truth.

    ``noisy``: float32 DN, integer-valued, in [0, adc_max] (what the camera sends).
    ``clean``: float32 DN, the expected value without noise, fixed pattern or defects,
    ``min(signal * exposure, 1) * full_well_e / gain + bias`` clipped to [0, adc_max]; not
    quantised. ``defect_mask``: uint8 bit mask (module docstring).
    """

    noisy: np.ndarray
    clean: np.ndarray
    defect_mask: np.ndarray
    adc_max: int
    bit_depth: int
    params: DefectParams
    layout: DefectLayout


def detector_rng(seed: int, index: int) -> np.random.Generator:
    """Generator for the detector of frame ``index`` of dataset ``seed``: a stream separate
    from ``scene_rng(seed, index)``, so changing the detector config leaves scenes unchanged."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, index, 1])


def sample_defect_params(
    rng: np.random.Generator, config: DefectConfig | None = None, bit_depth: int = 12
) -> DefectParams:
    """Draw one frame's detector from ``config``.

    Every value is drawn whether or not its class is switched on, so changing one
    probability leaves the other draws unchanged.
    """
    cfg = config if config is not None else DefectConfig()
    if bit_depth not in BIT_DEPTHS:
        raise ValueError(f"bit_depth must be one of {BIT_DEPTHS}, got {bit_depth}")
    adc_max = 2**bit_depth - 1
    full_well = float(loguniform(rng, *cfg.full_well_e))
    fraction = float(rng.uniform(*cfg.full_scale_fraction))
    bias = float(rng.uniform(*cfg.bias_frac)) * adc_max
    span = adc_max - bias
    gain = full_well / (fraction * span)
    read = float(loguniform(rng, *cfg.read_noise_e))
    prnu = float(rng.uniform(*cfg.prnu_frac))
    dsnu = float(rng.uniform(*cfg.dsnu_frac)) * adc_max
    exposure = float(rng.uniform(*cfg.exposure_scale))

    on = rng.random(6)
    dead_frac = float(rng.uniform(*cfg.dead_pixel_frac))
    hot_frac = float(rng.uniform(*cfg.hot_pixel_frac))
    ranges = (cfg.dead_columns, cfg.hot_columns, cfg.dead_rows, cfg.hot_rows)
    lines = [int(rng.integers(lo, hi + 1)) for lo, hi in ranges]
    forced = int(rng.integers(0, 4))
    blobs = int(rng.integers(cfg.saturated_blobs[0], cfg.saturated_blobs[1] + 1))
    up_share = float(rng.uniform(*cfg.bloom_up_share))
    hits = float(rng.uniform(*cfg.radiation_hits_per_mpx))

    if on[2] < cfg.bad_line_probability:
        if sum(lines) == 0:  # "present" means at least one line where the ranges allow it
            allowed = [i for i, (_, hi) in enumerate(ranges) if hi > 0]
            if allowed:
                lines[allowed[forced % len(allowed)]] = 1
    else:
        lines = [0, 0, 0, 0]
    return DefectParams(
        bit_depth=bit_depth,
        adc_max=adc_max,
        full_well_e=full_well,
        full_scale_fraction=fraction,
        gain_e_per_dn=gain,
        read_noise_e=read,
        bias_dn=bias,
        prnu_frac=prnu,
        dsnu_dn=dsnu,
        exposure_scale=exposure,
        dead_pixel_frac=dead_frac if on[0] < cfg.dead_pixel_probability else 0.0,
        dead_pixel_response=cfg.dead_pixel_response,
        hot_pixel_frac=hot_frac if on[1] < cfg.hot_pixel_probability else 0.0,
        warm_pixel_share=cfg.warm_pixel_share,
        hot_stuck_level_dn=(cfg.hot_stuck_level_frac[0] * adc_max,
                            cfg.hot_stuck_level_frac[1] * adc_max),
        warm_offset_dn=(cfg.warm_offset_frac[0] * span, cfg.warm_offset_frac[1] * span),
        dead_columns=lines[0],
        hot_columns=lines[1],
        dead_rows=lines[2],
        hot_rows=lines[3],
        partial_line_share=cfg.partial_line_share,
        bad_line_response=cfg.bad_line_response,
        hot_line_offset_dn=(cfg.hot_line_offset_frac[0] * span,
                            cfg.hot_line_offset_frac[1] * span),
        saturated_blobs=blobs if on[3] < cfg.saturated_blob_probability else 0,
        saturated_blob_radius_px=cfg.saturated_blob_radius_px,
        saturated_blob_peak_full_wells=cfg.saturated_blob_peak_full_wells,
        bloom=bool(on[4] < cfg.bloom_probability),
        bloom_up_share=up_share,
        radiation_hits_per_mpx=hits if on[5] < cfg.radiation_probability else 0.0,
        radiation_track_share=cfg.radiation_track_share,
        radiation_track_length_px=cfg.radiation_track_length_px,
        radiation_charge_full_wells=cfg.radiation_charge_full_wells,
    )


def _pixels(rng: np.random.Generator, frac: float, height: int, width: int) -> np.ndarray:
    n = int(rng.binomial(height * width, frac)) if frac > 0 else 0
    flat = rng.integers(0, height * width, n)  # rare duplicates are harmless
    return np.stack([flat // width, flat % width], axis=1).astype(np.intp)


def sample_defect_layout(
    rng: np.random.Generator, params: DefectParams, height: int, width: int
) -> DefectLayout:
    """Draw a camera's permanent damage and fixed-pattern maps for frames of (height, width)."""
    dead = _pixels(rng, params.dead_pixel_frac, height, width)
    dead_response = rng.uniform(*params.dead_pixel_response, len(dead)).astype(_F32)
    hot = _pixels(rng, params.hot_pixel_frac, height, width)
    warm = rng.random(len(hot)) < params.warm_pixel_share
    stuck_dn = rng.uniform(*params.hot_stuck_level_dn, len(hot)).astype(_F32)
    warm_dn = np.asarray(loguniform(rng, *params.warm_offset_dn, size=len(hot)), _F32)
    lines: list[BadLine] = []
    for axis, kind, count in (
        ("column", "dead", params.dead_columns),
        ("column", "hot", params.hot_columns),
        ("row", "dead", params.dead_rows),
        ("row", "hot", params.hot_rows),
    ):
        across, along = (width, height) if axis == "column" else (height, width)
        for _ in range(count):
            index = int(rng.integers(0, across))
            start, stop = 0, along
            if rng.random() < params.partial_line_share:  # from a charge trap to one edge
                trap = int(rng.integers(0, along))
                start, stop = (trap, along) if rng.random() < 0.5 else (0, trap + 1)
            rng_range = params.bad_line_response if kind == "dead" else params.hot_line_offset_dn
            value = float(rng.uniform(*rng_range))
            lines.append(BadLine(axis, index, start, stop, kind, value))  # type: ignore[arg-type]
    prnu_map = None
    if params.prnu_frac > 0:
        prnu_map = rng.standard_normal((height, width), dtype=_F32)
        prnu_map *= _F32(params.prnu_frac)
        prnu_map += _F32(1.0)
    dsnu_map = None
    if params.dsnu_dn > 0:
        dsnu_map = rng.standard_normal((height, width), dtype=_F32)
        dsnu_map *= _F32(params.dsnu_dn)
    return DefectLayout(
        height=height,
        width=width,
        dead_pixels=dead,
        dead_response=dead_response,
        stuck_pixels=hot[~warm],
        stuck_dn=stuck_dn[~warm],
        warm_pixels=hot[warm],
        warm_offset_dn=warm_dn[warm],
        bad_lines=lines,
        prnu_map=prnu_map,
        dsnu_map=dsnu_map,
    )


# --------------------------------------------------------------------------- physics


def _shot_noise(rng: np.random.Generator, mean_e: np.ndarray) -> np.ndarray:
    """Photo-electron counts (float32, integer-valued) for expected counts ``mean_e`` (>= 0)."""
    low = mean_e < SHOT_NOISE_GAUSSIAN_ABOVE_E
    n_low = int(np.count_nonzero(low))
    if n_low == mean_e.size:
        return rng.poisson(mean_e).astype(_F32)
    # Cornish-Fisher: mean + sqrt(mean) z + (z^2 - 1)/6 has the Poisson mean, variance and
    # skewness; rounding keeps electrons discrete (visible in DN when gain < 1 e-/DN).
    z = rng.standard_normal(mean_e.shape, dtype=_F32)
    out = z * z
    out -= _F32(1.0)
    out *= _F32(1.0 / 6.0)
    z *= np.sqrt(mean_e)
    out += z
    out += mean_e
    np.rint(out, out=out)
    np.maximum(out, 0.0, out=out)
    if n_low:
        out[low] = rng.poisson(mean_e[low])
    return out


def _bloom(e: np.ndarray, full_well: float, up_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``e`` (in place) at the full well, spilling the excess along columns.

    Spilled charge fills the next pixels of the column up to the full well and runs on
    (charge leaving the frame is lost). The fill is the queue recursion
    ``carry[i] = max(0, carry[i-1] + excess[i] - room[i])``, whose closed form
    ``S[i] - min(0, min_{j<=i} S[j])`` (S = cumulative sum) vectorises over rows.
    Returns (columns touched, charge absorbed per pixel of those columns).
    """
    cols = np.flatnonzero((e > full_well).any(axis=0))
    if cols.size == 0:
        return cols, np.zeros((e.shape[0], 0))
    sub = e[:, cols].astype(np.float64)
    excess = np.maximum(sub - full_well, 0.0)
    np.minimum(sub, full_well, out=sub)
    absorbed_total = np.zeros_like(sub)
    for share, flip in ((1.0 - up_share, False), (up_share, True)):
        s = sub[::-1] if flip else sub
        x = excess[::-1] * share if flip else excess * share
        x = x - (full_well - s)
        cum = np.cumsum(x, axis=0)
        carry = cum - np.minimum(np.minimum.accumulate(cum, axis=0), 0.0)
        incoming = np.vstack([np.zeros((1, carry.shape[1])), carry[:-1]])
        absorbed = incoming + x + (full_well - s) - carry
        absorbed = absorbed[::-1] if flip else absorbed
        absorbed = np.maximum(absorbed, 0.0)  # round-off
        sub += absorbed
        absorbed_total += absorbed
    np.minimum(sub, full_well, out=sub)
    e[:, cols] = sub
    return cols, absorbed_total


def _radiation(
    rng: np.random.Generator, params: DefectParams, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flat pixel indices (unique) and deposited electrons of this frame's radiation hits."""
    n = int(rng.poisson(params.radiation_hits_per_mpx * height * width / 1e6))
    if n == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.float64)
    fw = params.full_well_e
    track = rng.random(n) < params.radiation_track_share
    charge = np.asarray(loguniform(rng, *params.radiation_charge_full_wells, size=n)) * fw
    ys = rng.uniform(-0.5, height - 0.5, n)
    xs = rng.uniform(-0.5, width - 0.5, n)
    spot = ~track
    sigma = rng.uniform(0.3, 0.8, n)  # 1-3 px clusters
    idx_s, val_s = deposit_gaussians(
        (height, width), ys[spot], xs[spot], charge[spot], sigma[spot], radius=2
    )
    n_track = int(track.sum())
    length = np.asarray(loguniform(rng, *params.radiation_track_length_px, size=n_track))
    angle = rng.uniform(0.0, 2 * math.pi, n_track)
    idx_t, val_t = np.zeros(0, np.intp), np.zeros(0, _F32)
    if n_track:
        m = int(math.ceil(float(length.max()) / 0.5)) + 1
        t = np.linspace(-0.5, 0.5, m)[None, :] * length[:, None]
        ty = ys[track][:, None] + t * np.sin(angle)[:, None]
        tx = xs[track][:, None] + t * np.cos(angle)[:, None]
        weight = np.broadcast_to((charge[track] * length / (m - 1))[:, None], ty.shape)
        idx_t, val_t = deposit_bilinear((height, width), ty.ravel(), tx.ravel(), weight.ravel())
    idx = np.concatenate([idx_s, idx_t])
    val = np.concatenate([val_s, val_t]).astype(np.float64)
    uniq, inverse = np.unique(idx, return_inverse=True)
    return uniq, np.bincount(inverse.ravel(), val, minlength=uniq.size)


def _glints(
    rng: np.random.Generator, params: DefectParams, height: int, width: int
) -> list[tuple[slice, slice, np.ndarray]]:
    """Artefact glints: (row slice, column slice, expected electrons) per blob.

    A glint is a ghost reflection: a defocused image of the optics' pupil, so a uniformly filled
    disc, or an annulus where the pupil has a central obstruction, with an edge only 0.5-1.5 px
    soft. That sharp edge without a halo is what tells it apart from a real saturating spot,
    whose profile falls off smoothly around its saturated core.
    """
    out = []
    for _ in range(params.saturated_blobs):
        radius = float(loguniform(rng, *params.saturated_blob_radius_px))
        inner = radius * rng.uniform(0.35, 0.7) if rng.random() < 0.4 else 0.0
        edge = rng.uniform(0.5, 1.5)
        peak = float(loguniform(rng, *params.saturated_blob_peak_full_wells)) * params.full_well_e
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = int(math.ceil(radius + 2 * edge)) + 1
        ya, yb = max(0, int(cy) - r), min(height, int(cy) + r + 1)
        xa, xb = max(0, int(cx) - r), min(width, int(cx) + r + 1)
        yy = np.arange(ya, yb, dtype=_F32)[:, None] - _F32(cy)
        xx = np.arange(xa, xb, dtype=_F32)[None, :] - _F32(cx)
        d = np.sqrt(yy * yy + xx * xx)
        profile = np.clip((_F32(radius) - d) / _F32(edge) + _F32(0.5), 0, 1)
        if inner > 0:
            profile *= np.clip((d - _F32(inner)) / _F32(edge) + _F32(0.5), 0, 1)
        out.append((slice(ya, yb), slice(xa, xb), _F32(peak) * profile))
    return out


def apply_detector(
    signal: np.ndarray,
    rng: np.random.Generator,
    params: DefectParams,
    layout: DefectLayout | None = None,
) -> DetectorFrame:
    """Record ``signal`` (relative intensity, >= 0) with the detector ``params``.

    ``layout`` None draws a fresh one for this frame; pass a fixed layout to keep the same
    camera damage frame after frame. Dead pixels and dead lines keep only their residual
    response, so they read about ``bias_dn`` (0 DN when the bias is 0) plus read noise.
    """
    sig = np.asarray(signal, dtype=_F32)
    if sig.ndim != 2:
        raise ValueError(f"signal must be 2-D (H, W), got shape {sig.shape}")
    if not (float(sig.min()) >= 0.0 and math.isfinite(float(sig.max()))):
        raise ValueError("signal must be finite and >= 0")
    height, width = sig.shape
    if layout is None:
        layout = sample_defect_layout(rng, params, height, width)
    elif (layout.height, layout.width) != (height, width):
        raise ValueError(
            f"layout is for {layout.height}x{layout.width} frames, signal is {height}x{width}"
        )
    fw = params.full_well_e
    inv_gain = _F32(1.0 / params.gain_e_per_dn)
    bias = _F32(params.bias_dn)
    adc_max = params.adc_max

    e_exp = sig * _F32(params.exposure_scale * fw)
    clean = np.minimum(e_exp, _F32(fw))
    clean *= inv_gain
    clean += bias
    np.clip(clean, 0.0, adc_max, out=clean)
    mask = layout.static_mask()
    # Noise floor (e^2) for the event masks: read noise and ADC quantisation.
    floor_e2 = params.read_noise_e**2 + params.gain_e_per_dn**2 / 12.0
    k2 = SIGNIFICANCE_SIGMA**2

    light = e_exp * layout.prnu_map if layout.prnu_map is not None else e_exp.copy()
    glints = _glints(rng, params, height, width)
    for rows, cols, blob in glints:
        light[rows, cols] += blob
    np.maximum(light, 0.0, out=light)
    e = _shot_noise(rng, light)
    del light

    dead = layout.dead_pixels
    e[dead[:, 0], dead[:, 1]] *= layout.dead_response
    for line in layout.bad_lines:
        if line.kind == "dead":
            e[line.region()] *= _F32(line.value)

    rad_idx, rad_e = _radiation(rng, params, height, width)
    e_flat = e.reshape(-1)
    e_flat[rad_idx] += rad_e.astype(_F32)

    if params.bloom:
        bloom_cols, bloom_e = _bloom(e, fw, params.bloom_up_share)
    else:
        np.minimum(e, _F32(fw), out=e)
        bloom_cols, bloom_e = np.zeros(0, np.intp), np.zeros((height, 0))

    read = rng.standard_normal((height, width), dtype=_F32)
    read *= _F32(params.read_noise_e)
    e += read
    del read
    e *= inv_gain
    e += bias
    noisy = e
    if layout.dsnu_map is not None:
        noisy += layout.dsnu_map
    for line in layout.bad_lines:
        if line.kind == "hot":
            noisy[line.region()] += _F32(line.value)
    warm = layout.warm_pixels
    noisy[warm[:, 0], warm[:, 1]] += layout.warm_offset_dn
    stuck = layout.stuck_pixels
    noisy[stuck[:, 0], stuck[:, 1]] = layout.stuck_dn
    np.rint(noisy, out=noisy)
    np.clip(noisy, 0.0, adc_max, out=noisy)

    # Event masks: changed significantly, and not already saturated by the real scene.
    for rows, cols, blob in glints:
        local = e_exp[rows, cols]
        hit = (blob.astype(np.float64) ** 2 > k2 * (local + floor_e2)) & (local < fw)
        mask[rows, cols] |= (hit * SATURATED_BLOB).astype(np.uint8)
    if rad_idx.size:
        local = e_exp.reshape(-1)[rad_idx]
        hit = (rad_e**2 > k2 * (local + floor_e2)) & (local < fw)
        mask.reshape(-1)[rad_idx[hit]] |= RADIATION
    if bloom_cols.size:
        local = e_exp[:, bloom_cols]
        hit = (bloom_e**2 > k2 * (local + floor_e2)) & (local < fw)
        mask[:, bloom_cols] |= (hit * BLOOM).astype(np.uint8)

    return DetectorFrame(
        noisy=noisy,
        clean=clean,
        defect_mask=mask,
        adc_max=adc_max,
        bit_depth=params.bit_depth,
        params=params,
        layout=layout,
    )


def simulate_frame(
    seed: int,
    index: int,
    height: int,
    width: int,
    bit_depth: int,
    scene_config: SceneConfig | None = None,
    defect_config: DefectConfig | None = None,
    kind: str | None = None,
) -> tuple[Scene, DetectorFrame]:
    """Frame ``index`` of dataset ``seed``: the same arguments give the same arrays.

    The scene comes from ``scene_rng(seed, index)`` and the detector from
    ``detector_rng(seed, index)``, so a different ``defect_config`` keeps the same scene.
    """
    scene = generate_scene(scene_rng(seed, index), height, width, scene_config, kind)
    rng, params, layout = frame_camera(seed, index, height, width, bit_depth, defect_config)
    return scene, apply_detector(scene.signal, rng, params, layout)


def frame_camera(
    seed: int, index: int, height: int, width: int, bit_depth: int, defect_config: DefectConfig | None = None
) -> tuple[np.random.Generator, DefectParams, DefectLayout]:
    """The camera that records frame ``index`` of dataset ``seed``: its detector generator (with the
    parameters and the layout of permanent damage drawn from it, in that order) for
    :func:`apply_detector` to go on with, as :func:`simulate_frame` does; the same camera again
    for its dark frames and flat fields (``training.dataset.calibration_frames``)."""
    rng = detector_rng(seed, index)
    params = sample_defect_params(rng, defect_config, bit_depth)
    return rng, params, sample_defect_layout(rng, params, height, width)


def has_saturation_artefacts(mask: np.ndarray) -> bool:
    """Whether a frame's defect mask holds glint or bloom pixels: the defects saturation leaves."""
    return bool(np.any(np.asarray(mask) & (BLOOM | SATURATED_BLOB)))


def radiation_tracks(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask``'s radiation hits that are tracks (straight streaks), not 1-3 px spots.

    A hit (8-connected RADIATION pixels) is a track when it has at least :data:`TRACK_MIN_PIXELS`
    pixels and its second moments make it at least :data:`TRACK_MIN_ELONGATION` times longer than
    wide (how well that separates them: docs/results.md). Tracks are the hits a network can tell from
    real light by shape (straight, uniform, hard-ended; filaments curve and taper); spots look like
    point sources.
    """
    rad = (np.asarray(mask) & RADIATION) != 0
    if not rad.any():
        return rad
    labels, n = ndimage.label(rad, structure=np.ones((3, 3), bool))
    index = np.arange(1, n + 1)
    yy, xx = np.indices(rad.shape, dtype=np.float64)
    count = ndimage.sum_labels(rad, labels, index)
    my, mx = ndimage.mean(yy, labels, index), ndimage.mean(xx, labels, index)
    syy = ndimage.mean(yy * yy, labels, index) - my * my
    sxx = ndimage.mean(xx * xx, labels, index) - mx * mx
    sxy = ndimage.mean(yy * xx, labels, index) - my * mx
    half_trace = 0.5 * (syy + sxx)
    root = np.sqrt(np.maximum(half_trace**2 - (syy * sxx - sxy * sxy), 0.0))
    major, minor = half_trace + root, np.maximum(half_trace - root, 1e-6)
    track = (count >= TRACK_MIN_PIXELS) & (major >= TRACK_MIN_ELONGATION**2 * minor)
    return np.concatenate([[False], track])[labels] & rad


def mask_subclass(mask: np.ndarray, name: str) -> np.ndarray:
    """Pixels of a named defect class (:data:`MASK_BITS`) or sub-class (:data:`MASK_SUBCLASSES`)."""
    if name == "radiation_track":
        return radiation_tracks(mask)
    return (np.asarray(mask) & MASK_BITS[name]) != 0
