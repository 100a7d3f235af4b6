"""Input normalisation and output denormalisation: pure functions of arrays.

Frames arrive in detector units (DN) of any integer or float type. The network sees
``(frame - offset) / scale`` where offset and scale are robust per-frame statistics (low and high
percentiles): cameras differ in bias, gain and exposure from frame to frame, so fixed constants
recorded at install time would not stay true. The percentiles and the floor on ``scale`` are
recorded in each model's manifest.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cdae.engine import frame_kernels
from cdae.engine.errors import EngineError
from cdae.engine.robust import MAD_TO_SIGMA, mad_sigma, median, percentile, percentile_of_sorted, sorted_values

F32_MAX = float(np.finfo(np.float32).max)
SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "int32", "float32", "float64", "uint32", "int8")


class NormalisationError(EngineError, ValueError):
    """A frame cannot be normalised (wrong type, non-finite values, bad bit depth); a ValueError too, as before."""


class FullWellSearch(BaseModel):
    """How :func:`find_full_well` tells a full-well pile-up from real light; part of the normalisation a
    model sees, so recorded in every manifest (packages made before it was recorded used these defaults)."""

    model_config = ConfigDict(extra="forbid")

    min_share: float = Field(1e-3, gt=0, lt=1, description="a pile-up holds at least this share of the "
                             "unsaturated pixels")
    max_above: float = Field(0.25, ge=0, description="at most this many pixels above it per pixel in it (only hot "
                             "pixels and hits lie above a full well)")
    max_variance_ratio: float = Field(0.05, gt=0, lt=1, description="its neighbouring pixels differ by at most "
                                      "this fraction of the variance of neighbours in the reference band below it")
    reference_band: tuple[float, float] = Field((0.5, 0.85), description="that band, as fractions of the way from "
                                                "the frame's dark tenth up to the pile-up")
    max_dark_ratio: float = Field(2.0, gt=0, description="with nothing just below it (detect+dark): at most this "
                                  "many times the neighbour variance of the frame's darkest tenth")
    band_percentile: float = Field(80.0, gt=50, lt=100, description="the pile-up is looked for above this "
                                   "percentile of the frame")
    window_sigma: float = Field(4.0, gt=0, description="half-width of the window around the pile-up, in its "
                                "pixels' robust sigma")
    iterations: int = Field(6, ge=1, le=50, description="at most this many narrowings of that window")
    min_height_windows: float = Field(10.0, gt=0, description="a full well lies at least this many half-widths "
                                      "above the frame's dark tenth")


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
    full_well: Literal["off", "detect", "detect+dark"] = Field(
        "off",
        description="'detect': pixels clipped at the sensor's full well, below the ADC maximum (a pile-up at "
        "the top of the frame's histogram whose neighbouring pixels differ far less than the shot noise just "
        "below it: see find_full_well), are treated like ADC-saturated pixels: flagged, and read as the "
        "pile-up's level. 'detect+dark': also when nothing in the frame lies just below the pile-up to compare "
        "with (a field-wide region at the full well over a dark scene), by comparing with the darkest tenth: "
        "clipped pixels are no noisier than the dark, real light at that level carries its shot noise",
    )
    full_well_search: FullWellSearch = Field(default_factory=FullWellSearch)


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


#: The largest full scale a camera's ADC has (24 bits); above it (a 32-bit container without a bit depth) the scale
#: floor is taken from the frame.
MAX_CAMERA_FULL_SCALE = float(2**24 - 1)


def sample_step(shape: tuple[int, ...], max_samples: int) -> int:
    """The stride of the grid a frame's statistics are read from: at most about ``max_samples`` pixels."""
    h, w = shape[-2:]
    return max(1, int(math.sqrt(h * w / max_samples)))


def sorted_sample(frame: np.ndarray, max_samples: int) -> np.ndarray:
    """The pixels of the statistics' grid (:func:`sample_step`), float64, sorted: what :func:`frame_offset_scale`
    and :func:`find_full_well` read, sorted once for both (``frame``: NaN-free, as :func:`frame_statistics` has it)."""
    s = sample_step(frame.shape, max_samples)
    return sorted_values(np.asarray(frame[::s, ::s], dtype=np.float64).ravel())


def _prefix_below(s: np.ndarray, level: float) -> np.ndarray:
    """The values of the sorted ``s`` below ``level`` (``s[s < level]``, a prefix)."""
    return s[: int(np.searchsorted(s, level, side="left"))]


def _mixed_zeros(s: np.ndarray) -> bool:
    """Whether the sorted ``s`` holds both -0.0 and +0.0 (whose order a sort leaves to its kind and dtype)."""
    z = np.signbit(s[int(np.searchsorted(s, 0.0, side="left")):int(np.searchsorted(s, 0.0, side="right"))])
    return bool(z.any() and not z.all())


def frame_offset_scale(frame: np.ndarray, adc_max: float, config: NormalisationConfig,
                       ordered: np.ndarray | None = None) -> tuple[float, float]:
    """Robust per-frame (offset, scale) in DN.

    Saturated pixels are left out of the percentiles: a saturated glint or bloom trail covering a
    few percent of the frame would otherwise set the scale and squash the real scene. ``ordered``: the frame's
    :func:`sorted_sample`, when the caller has it (the same numbers, without a second sample and sort).
    """
    cut = adc_max - 0.5
    shared = ordered is not None and (not math.isfinite(adc_max) or float(np.float32(cut)) == cut)
    if shared and not _mixed_zeros(ordered):  # type: ignore[arg-type]
        # float32 values and a cut float32 holds compare alike in float64: the same pixels, in the same order
        unsaturated = _prefix_below(ordered, cut) if math.isfinite(adc_max) else ordered
        sample = (unsaturated if unsaturated.size >= max(16, ordered.size // 10) else ordered).astype(np.float32)
    else:
        s = sample_step(frame.shape, config.max_samples)
        sample = np.asarray(frame[::s, ::s], dtype=np.float32).ravel()
        if math.isfinite(adc_max):
            unsaturated = sample[sample < cut]
            if unsaturated.size >= max(16, sample.size // 10):
                sample = unsaturated
        sample = sorted_values(sample)
    lo, hi = percentile_of_sorted(sample, [config.low_percentile, config.high_percentile])
    lo = float(lo)
    span = float(hi) - lo
    # a 32-bit container's maximum (no bit depth given) is no camera's full scale: the frame's own peak is, as for
    # a float frame; the floor against amplifying a flat dark frame would otherwise flatten every real one
    full_scale = adc_max if math.isfinite(adc_max) and adc_max <= MAX_CAMERA_FULL_SCALE else \
        max(float(np.max(np.abs(sample))), 1.0)
    floor = config.min_scale_fraction * full_scale
    return lo, max(span, floor, 1e-6)


class FullWell(NamedTuple):
    """A full-well pile-up found in a frame: its level and half-width (DN) and how many pixels it holds."""

    level: float
    half_width: float
    pixels: int


def _pairs(frame: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Horizontally adjacent pixel pairs on a ``step`` grid (the scene nearly cancels in a - b)."""
    rows = np.asarray(frame[::step], dtype=np.float32)
    w = rows.shape[-1]
    return rows[:, 0 : w - 1 : step].ravel(), rows[:, 1:w:step].ravel()


def _pair_variance(a: np.ndarray, b: np.ndarray, lo: float, hi: float) -> float:
    """Mean squared difference of pairs with both pixels in [lo, hi], the largest 10 % clipped (edges, hits).

    NaN where fewer than 32 pairs qualify.
    """
    d = np.abs(a - b)[(a >= lo) & (a <= hi) & (b >= lo) & (b <= hi)]
    if d.size < 32:
        return math.nan
    return float(np.mean(np.minimum(d, percentile(d, 90)) ** 2))


def _window(s: np.ndarray, level: float, half: float) -> slice:
    """The slice of the sorted ``s`` that ``np.abs(s - level) <= half`` selects, without a pass over ``s``.

    A slice: ``s - level`` rounds monotonically, so the pixels the test keeps are contiguous in sorted order.
    Its ends come from a binary search and are then moved, a run of equal values at a time, until the test
    itself (the same float64 arithmetic) holds just inside them and fails just outside.
    """
    level, half = float(level), float(half)
    n = s.size

    def inside(i: int) -> bool:
        return bool(abs(s[i] - level) <= half)

    i = int(np.searchsorted(s, level - half, side="left"))
    j = int(np.searchsorted(s, level + half, side="right"))
    while i > 0 and inside(i - 1):
        i = int(np.searchsorted(s, s[i - 1], side="left"))
    while i < min(j, n) and not inside(i):
        i = int(np.searchsorted(s, s[i], side="right"))
    while j < n and inside(j):
        j = int(np.searchsorted(s, s[j], side="right"))
    while j > i and not inside(j - 1):
        j = int(np.searchsorted(s, s[j - 1], side="left"))
    return slice(i, max(i, j))


def dark_noise(a: np.ndarray, b: np.ndarray) -> float:
    """Pixel-to-pixel noise (DN RMS) in the darkest tenth of the frame, from its neighbour pairs (``_pairs``):
    read noise, offset pattern, a little shot noise."""
    if a.size < 16:
        return 0.0
    dark = np.maximum(a, b) <= percentile_of_sorted(sorted_values(a), 10)
    d = (a - b)[dark]
    return mad_sigma(d) / math.sqrt(2.0) if d.size >= 16 else 0.0


def find_full_well(
    frame: np.ndarray, adc_max: float, max_samples: int = 65536, dark_reference: bool = False,
    search: FullWellSearch | None = None, candidates: int = 1, ordered: np.ndarray | None = None,
) -> FullWell | None:
    """The level at which a sensor's full well clipped this frame's brightest real features, if it did.

    Every pixel at full well holds the same charge, so clipped pixels pile up at the top of the
    histogram and differ from their clipped neighbours by the read noise only, while unclipped
    pixels a little darker differ by their shot noise as well. Found when the densest band near the
    top holds at least ``search.min_share`` of the pixels, little lies above it, and neighbouring
    pixels inside it vary at most ``search.max_variance_ratio`` times as much as neighbouring
    pixels at 50-85 % of its height. A sensor whose full well varies from pixel to pixel more than
    that gives no such spike, and nothing is found. ADC-saturated pixels are left out (they are
    flagged anyway). With ``dark_reference``, a frame with too few pixels at 50-85 % (a field-wide
    region at the full well over a dark scene: a small well, read noise of hundreds of DN) is
    judged against its darkest tenth instead: at most ``search.max_dark_ratio`` times its
    neighbour variance, so no shot noise at all.

    ``candidates``: how many pile-ups are tried. The first is the densest band above the percentile (what a
    model's normalisation uses, 1); where it fails the tests, the next are the histogram's other local peaks
    holding at least ``search.min_share`` of the pixels, highest level first: a small full-well plateau over
    a bright background, which the background's own densest band hides. Each is held to the same tests.
    ``ordered``: the frame's :func:`sorted_sample` for ``max_samples``, when the caller has it.
    """
    q = search or FullWellSearch()
    # only sampled pixels are read: an integer frame that float32 holds exactly is converted where sampled
    f = frame if frame.dtype in frame_kernels.EXACT_IN_FLOAT32 else np.asarray(frame, dtype=np.float32)
    step = sample_step(f.shape, max_samples)
    # the sampled pixels in float64 (differences across a float32 frame's range, +-3e38, overflow float32), sorted
    # once (by counting, for an integer camera): the percentiles are look-ups, the band a suffix, each window a
    # sorted slice; every statistic below is of the same values as unsorted, so the same numbers
    sample = sorted_sample(f, max_samples) if ordered is None else ordered
    if math.isfinite(adc_max):
        sample = _prefix_below(sample, adc_max - 0.5)
    if sample.size < 1024:
        return None
    a, b = (v.astype(np.float64) for v in _pairs(f, step))
    noise = max(dark_noise(a, b), 0.5)  # 0.5 DN: quantisation
    lo, p80, top = (float(v) for v in percentile_of_sorted(sample, [10, q.band_percentile, 100]))
    band = sample[np.searchsorted(sample, p80, side="left"):]  # sample >= p80
    nbins = int(min(4096, max(1, math.ceil((top - p80) / (2.0 * noise)))))
    # binned relative to p80: edges near 3e38 one unit apart do not exist ("Too many bins")
    counts, edges = np.histogram(band - p80, bins=nbins, range=(0.0, (top - p80) + max(1e-3, 1e-12 * abs(top))))
    k = int(np.argmax(counts))
    for c in [k, *_other_peaks(counts, k, q.min_share * sample.size, candidates - 1)]:
        found = _full_well_at(p80 + 0.5 * (edges[c] + edges[c + 1]), sample, band, a, b, noise, lo, q, dark_reference,
                              step)
        if found is not None and (c == k or _only_impulses_above(f, found, adc_max)):
            return found
    return None


#: A pile-up found past the first candidate is a full well only if at most this many pixels above it have a
#: neighbour above it too (besides this share of the pile-up's pixels): above a full well lie hot pixels and hits
#: only, alone, where above a flat real region (an 8-bit camera's quiet sky) lies the rest of the scene.
CLUSTERED_ABOVE = (4, 0.02)


def _only_impulses_above(f: np.ndarray, fw: FullWell, adc_max: float) -> bool:
    """Whether the pixels above the pile-up ``fw`` (and below the ADC maximum) stand alone: no 4-neighbour above."""
    above = np.asarray(f > fw.level + fw.half_width)
    if math.isfinite(adc_max):
        above &= np.asarray(f < adc_max - 0.5)
    return lone_pixels(above, fw)


def lone_pixels(above: np.ndarray, fw: FullWell) -> bool:
    """:func:`_only_impulses_above`'s test of the mask of pixels above the pile-up (the device path's too)."""
    if not above.any():
        return True
    joined = np.zeros_like(above)
    joined[1:] |= above[:-1]
    joined[:-1] |= above[1:]
    joined[:, 1:] |= above[:, :-1]
    joined[:, :-1] |= above[:, 1:]
    clustered = int(np.count_nonzero(joined & above))
    return clustered <= max(CLUSTERED_ABOVE[0], CLUSTERED_ABOVE[1] * fw.pixels)


def _other_peaks(counts: np.ndarray, first: int, min_count: float, n: int) -> list[int]:
    """Up to ``n`` bins other than ``first`` that are local peaks of ``counts`` holding at least ``min_count``,
    highest first."""
    if n <= 0 or counts.size < 2:
        return []
    c = counts.astype(np.int64)
    left = np.concatenate(([-1], c[:-1]))
    right = np.concatenate((c[1:], [-1]))
    peaks = np.flatnonzero((c >= left) & (c > right) & (c >= min_count))
    return [int(i) for i in peaks[::-1] if i != first][:n]


def _full_well_at(centre: float, sample: np.ndarray, band: np.ndarray, a: np.ndarray, b: np.ndarray, noise: float,
                  lo: float, q: FullWellSearch, dark_reference: bool, step: int) -> FullWell | None:
    """:func:`find_full_well`'s tests of the pile-up around ``centre``."""
    # narrow the window onto the spike: the dark noise only bounds it (textured dark regions inflate it)
    level, half = centre, q.window_sigma * noise
    for _ in range(q.iterations):
        near = band[_window(band, level, half)]
        if near.size < 16:
            return None
        m = median(near, ordered=True)
        new_level, new_half = float(m), q.window_sigma * max(MAD_TO_SIGMA * float(median(np.abs(near - m))), 0.5)
        if (new_level, new_half) == (level, half):
            break  # converged: the same window again
        level, half = new_level, new_half
    if level - lo < q.min_height_windows * half:  # a full well lies far above the frame's dark tenth
        return None
    window = _window(sample, level, half)
    pixels = window.stop - window.start
    above = sample.size - int(np.searchsorted(sample, level + half, side="right"))  # sample > level + half
    if pixels < max(16, q.min_share * sample.size) or above > q.max_above * pixels:
        return None
    inside = _pair_variance(a, b, level - half, level + half)
    below = _pair_variance(a, b, lo + q.reference_band[0] * (level - lo), lo + q.reference_band[1] * (level - lo))
    if math.isnan(below) and dark_reference:
        # the test below then reads: inside <= max_dark_ratio x the dark tenth's pair variance (2 noise²)
        below = 2.0 * noise * noise * q.max_dark_ratio / q.max_variance_ratio
    if not (0.0 < below and inside <= q.max_variance_ratio * below):  # False for NaN: too few pairs
        return None
    # the clipped pixels themselves: within 4 sigma of the level, sigma from their neighbours' differences
    half = max(q.window_sigma * math.sqrt(inside / 2.0), 1.0)
    core = sample[_window(sample, level, half)]
    level = float(median(core, ordered=True))
    window = _window(sample, level, half)
    return FullWell(level, half, (window.stop - window.start) * step * step)


def detect_full_well(frame: np.ndarray, adc_max: float, config: NormalisationConfig,
                     candidates: int = 1, ordered: np.ndarray | None = None) -> FullWell | None:
    """The full well as ``config.full_well`` asks for it (None when 'off' or not found); ``candidates``: as
    :func:`find_full_well` takes it (1: what the model was trained with); ``ordered``: its ``ordered``."""
    if config.full_well == "off":
        return None
    return find_full_well(frame, adc_max, config.max_samples, dark_reference=config.full_well == "detect+dark",
                          search=config.full_well_search, candidates=candidates, ordered=ordered)


def network_input(frame: np.ndarray, adc_max: float, config: NormalisationConfig,
                  full_well_candidates: int = 1) -> tuple[np.ndarray, float, float]:
    """Build the (2, H, W) float32 network input: normalised frame and saturation mask (with
    ``config.full_well`` set, also pixels at the full well, read as its level).

    ``full_well_candidates``: pile-ups the full-well search tries (:func:`find_full_well`); 1, the default, is
    what training uses; the guarded frame path looks further (``GuardConfig.full_well_candidates``), so that a
    small plateau at the full well is kept raw as saturated rather than moved by a shot noise it does not have.
    Returns the input and the (offset, scale) needed to denormalise the network's output.
    """
    f, offset, scale, fw = frame_statistics(frame, adc_max, config, full_well_candidates)
    x = np.empty((2, *frame.shape), dtype=np.float32)
    if frame.dtype in frame_kernels.EXACT_IN_FLOAT32 and frame_kernels.normalise_into(frame, offset, scale, adc_max, x):
        # an integer camera's frame in one pass, the same bits as below
        mark_full_well(x, frame, fw, offset, scale)
        return x, offset, scale
    f = np.asarray(f, dtype=np.float32)  # an integer camera's frame without the compiled kernel: exact in float32
    with np.errstate(over="ignore"):  # an overflow is caught just below
        np.subtract(f, offset, out=x[0])
        x[0] *= np.float32(1.0 / scale)
    if f.dtype == frame.dtype and frame.dtype.kind == "f" and not np.isfinite(x[0]).all():
        # f - offset overflowed float32 (a frame spanning +-3e38): the same input, computed in float64
        x[0] = (f.astype(np.float64) - offset) / scale
    if math.isfinite(adc_max):
        # a clipped pixel carries no noise: the network is told which ones are
        np.greater_equal(f, np.float32(adc_max - 0.5), out=x[1], casting="unsafe")
    else:
        x[1] = 0.0
    mark_full_well(x, f, fw, offset, scale)
    return x, offset, scale


def frame_statistics(frame: np.ndarray, adc_max: float, config: NormalisationConfig,
                     full_well_candidates: int = 1) -> tuple[np.ndarray, float, float, FullWell | None]:
    """The numbers :func:`network_input` decides with, read from a strided sample of the frame: (the frame they were
    read from, offset, scale, full well). That frame is ``frame`` itself for an integer camera whose values float32
    holds exactly, else its float32 copy (refused if a float frame holds NaN or Inf). A path that builds the input
    elsewhere (the GPU's, :mod:`cdae.engine.device_frame`) reads the same numbers with none of the per-pixel work."""
    if frame.ndim != 2:
        raise NormalisationError(f"expected a 2-D frame, got shape {frame.shape}")
    f = frame
    if frame.dtype not in frame_kernels.EXACT_IN_FLOAT32:
        f = np.asarray(frame, dtype=np.float32)
        if frame.dtype.kind == "f" and not np.isfinite(f).all():  # (an int32 frame's float32 values are finite)
            raise NormalisationError(f"frame contains {int((~np.isfinite(f)).sum())} NaN/Inf pixels")
    ordered = sorted_sample(f, config.max_samples)  # one sample, sorted once, for both
    offset, scale = frame_offset_scale(f, adc_max, config, ordered)
    return f, offset, scale, detect_full_well(f, adc_max, config, full_well_candidates, ordered)


def saturation_mask(f: np.ndarray, adc_max: float, fw: FullWell | None) -> np.ndarray:
    """:func:`network_input`'s saturation channel as a mask (``x[1] > 0.5``) of the float32 frame ``f``: at the ADC
    maximum, or at the full well."""
    sat = f >= np.float32(adc_max - 0.5) if math.isfinite(adc_max) else np.zeros(f.shape, dtype=bool)
    if fw is not None:
        sat |= full_well_mask(f, fw)
    return sat


def full_well_mask(frame: np.ndarray, fw: FullWell) -> np.ndarray:
    """The pixels of ``frame`` at the full well ``fw`` (within its half-width of the level)."""
    return np.abs(np.asarray(frame, dtype=np.float32) - np.float32(fw.level)) <= np.float32(fw.half_width)


def mark_full_well(x: np.ndarray, frame: np.ndarray, fw: FullWell | None, offset: float, scale: float) -> None:
    """In a (2, H, W) network input: pixels at the full well flagged like ADC saturation, read as its level."""
    if fw is None:
        return
    at = full_well_mask(frame, fw)
    x[1][at] = 1.0
    x[0][at] = np.float32((fw.level - offset) / scale)


def denormalise(y: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """Network output back to DN (float32)."""
    if not (abs(scale) < F32_MAX and abs(offset) < F32_MAX):  # a float frame spanning more than float32 holds
        return np.clip(np.asarray(y, dtype=np.float64) * scale + offset, -F32_MAX, F32_MAX).astype(np.float32)
    out = np.asarray(y, dtype=np.float32) * np.float32(scale)
    out += np.float32(offset)
    return out


def _below(bound: float, like: np.dtype) -> float:
    """``bound`` if ``like`` holds it exactly, else the nearest value of ``like`` inside it (toward zero)."""
    v = np.asarray(bound, dtype=like)
    if abs(float(v)) > abs(bound):
        v = np.nextafter(v, like.type(0))
    return float(v)


def to_dtype(frame_dn: np.ndarray, dtype: np.dtype | str, adc_max: float) -> np.ndarray:
    """Cast a float DN frame to the camera's type: round and clip integers to the valid range.

    The bounds are clipped in the frame's own float type: int32's 2^31-1 is 2^31 in float32, which
    casts to -2^31, so the bound is the largest float32 below it. Float frames are clipped to their
    finite range (an output beyond it is an overflow, not a measurement).
    """
    dt = np.dtype(dtype)
    src = frame_dn.dtype if frame_dn.dtype.kind == "f" else np.dtype(np.float64)
    if dt.kind == "f":
        fi = np.finfo(dt)
        return np.clip(frame_dn, fi.min, fi.max).astype(dt, copy=False)
    info = np.iinfo(dt)
    hi = _below(min(float(info.max), adc_max), src)
    lo = _below(float(info.min), src) if dt.kind == "i" else 0.0
    cast = frame_kernels.to_integer(frame_dn, dt, lo, hi)  # one pass, the same bits as below (None: NumPy's turn)
    if cast is not None:
        return cast
    rounded = np.rint(frame_dn)
    return np.clip(rounded, lo, hi, out=rounded).astype(dt)  # in place: one frame-sized temporary, not two


#: Bit depths cameras deliver in wider integer containers, smallest first.
CAMERA_BIT_DEPTHS = (8, 10, 12, 14, 16, 18, 20, 24)  # 18-24: scientific CMOS/CCD ADCs, photon-counting counters


def infer_bit_depth(frame: np.ndarray) -> int | None:
    """The smallest usual camera bit depth whose full scale holds every pixel of an integer frame
    (a 12-bit camera in uint16 never exceeds 4095); None for float frames or negative pixels. A
    guess from the data: callers say it was inferred, and a camera's known depth overrides it."""
    dt = np.asarray(frame).dtype
    if dt.kind not in "ui" or frame.size == 0:
        return None
    lo, hi = int(np.min(frame)), int(np.max(frame))
    if lo < 0:
        return None
    container = 8 * dt.itemsize - (1 if dt.kind == "i" else 0)  # a signed type holds one bit less
    for bits in CAMERA_BIT_DEPTHS:
        if bits <= container and hi <= 2**bits - 1:
            return bits
    return min(container, 32)
