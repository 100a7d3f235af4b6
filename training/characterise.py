"""Camera characterisation from a recording: defect map, bias, read noise and gain.

What a physicist measures on a new (or newly damaged) camera, from the frames ``cdae record``
wrote, without a ground truth:

* **bias and read noise** from dark frames (shutter closed): the temporal median level, and the
  spread of the difference of consecutive darks (``var(d) / 2``, robust to radiation hits);
* **gain** (e-/DN) by photon transfer: in consecutive frames of a static scene the difference
  removes the scene and the fixed pattern, and its variance grows with the signal as
  ``read_noise_dn**2 + (mean - bias) / gain``;
* **hot, warm and stuck pixels** from darks (level far above the bias, or no temporal noise), or
  from ordinary frames where a single pixel stands above its 3x3 neighbourhood in every frame
  and, in a static scene, without the shot noise a real feature of that brightness would have;
* **dead pixels** where there is light to see them (response far below the neighbours');
* **bad columns and rows**, whole or from a charge trap to one edge of the frame, by a
  cumulative-sum test on the line's excess over its neighbours.

Without darks the bias is estimated from the faintest part of the scene and marked as such.
The result is a :class:`CameraProfile` (pydantic, JSON beside the recording) that training turns
into a :class:`~cdae.training.defects.DefectLayout` and a noise model, and a PNG defect map.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from scipy import ndimage

from cdae import __version__
from cdae.engine.badpixels import BadPixelError
from cdae.engine.robust import MAD_TO_SIGMA, mad_sigma
from cdae.recording import Run, read_runs
from cdae.training.defects import BAD_LINE, DEAD, HOT, BadLine, DefectLayout

PROFILE_FORMAT = 1
#: var(MAD-based variance of n Gaussian samples) ≈ this × variance² / n (2 for the sample variance;
#: the MAD is 37 % efficient).
_MAD_VARIANCE_FACTOR = 5.4


class CharacteriseError(ValueError):
    """A recording that cannot be characterised (no frames, mixed sizes, unreadable profile)."""


class CharacteriseConfig(BaseModel):
    """Thresholds of the characterisation; saved in the profile."""

    model_config = ConfigDict(extra="forbid")

    max_frames: int = Field(64, ge=2, description="frames used per kind (dark/light), evenly spaced")
    pixel_sigma: float = Field(8.0, gt=0, description="a hot/dead pixel stands this many sigma from its neighbours")
    line_score: float = Field(10.0, gt=0, description="cumulative-sum significance of a bad line (sigma)")
    line_min_length: int = Field(8, ge=2, description="shortest bad line segment, pixels")
    dead_response: float = Field(0.5, gt=0, lt=1, description="below this fraction of its neighbours' signal a pixel is dead")
    static_ratio: float = Field(1.5, gt=1, description="frame pairs whose difference is as structureless as noise "
                                "within this ratio show the same (static) scene")
    ptc_bins: int = Field(24, ge=4, description="signal bins of the photon-transfer curve")


class BadLineSpec(BaseModel):
    """One bad column or row, over ``[start, stop)`` along it."""

    model_config = ConfigDict(extra="forbid")

    axis: Literal["column", "row"]
    index: int = Field(ge=0)
    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    kind: Literal["dead", "hot"]
    value: float = Field(description="hot: extra offset, DN; dead: residual response, fraction of its neighbours'")
    significance: float = Field(description="cumulative-sum score, sigma")


class PtcPoint(BaseModel):
    """One bin of the photon-transfer curve: mean level and temporal variance of single frames."""

    model_config = ConfigDict(extra="forbid")

    mean_dn: float
    variance_dn2: float
    pixels: int


class CameraProfile(BaseModel):
    """One camera as measured from a recording: noise model and fixed defects."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: int = PROFILE_FORMAT
    recording: str = Field(description="file name of the recording")
    recording_sha256: str
    source: str = Field("", description="the camera PV the frames came from")
    camera: dict[str, JsonValue] = Field(default_factory=dict, description="camera metadata PVs at recording time")
    height: int
    width: int
    data_type: str
    bit_depth: int
    frames_dark: int = Field(description="dark frames used")
    frames_light: int = Field(description="ordinary frames used")
    static_pairs: int = Field(description="consecutive ordinary frame pairs found to show the same scene")
    bias_dn: float
    bias_method: str
    read_noise_dn: float = Field(description="temporal noise without light, DN RMS")
    read_noise_method: str
    gain_e_per_dn: float | None = Field(None, description="conversion gain from the photon-transfer curve")
    gain_method: str = ""
    dsnu_dn: float | None = Field(None, description="pixel-to-pixel offset spread of the darks, DN RMS")
    saturation_dn: float = Field(description="highest level seen; the ADC's full scale if it was reached")
    ptc: list[PtcPoint] = Field(default_factory=list)
    dead_pixels: list[tuple[int, int, float]] = Field(default_factory=list, description="(row, col, response)")
    hot_pixels: list[tuple[int, int, float]] = Field(default_factory=list, description="warm: (row, col, excess DN)")
    stuck_pixels: list[tuple[int, int, float]] = Field(default_factory=list, description="(row, col, level DN)")
    bad_lines: list[BadLineSpec] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="what could not be measured, and why")
    settings: CharacteriseConfig = Field(default_factory=CharacteriseConfig)
    code_version: str = __version__
    created_utc: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def adc_max(self) -> int:
        return 2**self.bit_depth - 1

    @property
    def read_noise_e(self) -> float | None:
        return None if self.gain_e_per_dn is None else self.read_noise_dn * self.gain_e_per_dn

    def defect_mask(self) -> np.ndarray:
        """uint8 (H, W): DEAD, HOT and BAD_LINE bits, as the simulator's static mask."""
        return self.layout().static_mask()

    def layout(self) -> DefectLayout:
        """The measured damage as a simulator layout: training injects it as known corruptions."""

        def px(items: Sequence[tuple[int, int, float]]) -> tuple[np.ndarray, np.ndarray]:
            a = np.asarray(items, dtype=np.float64).reshape(-1, 3)
            return a[:, :2].astype(np.intp), a[:, 2].astype(np.float32)

        dead, dead_resp = px(self.dead_pixels)
        warm, warm_dn = px(self.hot_pixels)
        stuck, stuck_dn = px(self.stuck_pixels)
        lines = [BadLine(b.axis, b.index, b.start, b.stop, b.kind, b.value) for b in self.bad_lines]
        return DefectLayout(height=self.height, width=self.width, dead_pixels=dead, dead_response=dead_resp,
                            stuck_pixels=stuck, stuck_dn=stuck_dn, warm_pixels=warm, warm_offset_dn=warm_dn,
                            bad_lines=lines)

    def noise_variance_dn2(self, level_dn: np.ndarray) -> np.ndarray:
        """Expected temporal variance (DN²) of a pixel whose true level is ``level_dn``."""
        var = np.full(np.shape(level_dn), self.read_noise_dn**2, dtype=np.float64)
        if self.gain_e_per_dn:
            var += np.maximum(np.asarray(level_dn, np.float64) - self.bias_dn, 0.0) / self.gain_e_per_dn
        return var

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.write_text(self.model_dump_json(indent=1) + "\n")
        return path


def load_profile(path: Path | str) -> CameraProfile:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CharacteriseError(f"{path}: cannot read camera profile ({e})") from e
    if isinstance(data, dict) and data.get("format", PROFILE_FORMAT) > PROFILE_FORMAT:
        raise CharacteriseError(f"{path}: profile format {data['format']} is newer than this cdae reads")
    try:
        return CameraProfile.model_validate(data)
    except ValueError as e:
        raise CharacteriseError(f"{path}: not a camera profile ({e})") from e


def default_profile_path(recording: Path | str) -> Path:
    """``run.h5`` → ``run.profile.json`` (beside the recording)."""
    p = Path(recording)
    return p.with_name(p.stem + ".profile.json")


# --- robust statistics ----------------------------------------------------------------------------

def robust_sigma(values: np.ndarray) -> float:
    """1.4826 × median absolute deviation: the standard deviation of the Gaussian part."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    return mad_sigma(v) if v.size else math.nan


def clipped_sigma(values: np.ndarray, clip: float = 5.0) -> float:
    """Standard deviation of the values within ``clip`` robust sigmas of the median (outliers out)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    med, rs = float(np.median(v)), robust_sigma(v)
    inside = v[np.abs(v - med) <= clip * rs] if rs > 0 else v
    return float(inside.std()) if inside.size > 1 else math.nan


def find_bad_pixels(darks: np.ndarray | None = None, flats: np.ndarray | None = None, k: float = 8.0,
                    dead_fraction: float = 0.5) -> tuple[np.ndarray, dict[str, int]]:
    """The bad-pixel mask of a camera from a stack of dark frames and/or a stack of flat fields.

    Dark frames (no light, same exposure as in use): a pixel whose median dark exceeds the frame's
    median dark by more than ``k`` robust standard deviations of the per-pixel medians is hot
    (stuck, warm, or part of a hot column). Flat fields (even illumination, well below
    saturation): a pixel whose median response is below ``dead_fraction`` of its neighbourhood's
    median (a 15 px box, so vignetting does not count) is dead. The median over frames beats the
    shot and read noise down, and a radiation hit in one frame does not make a pixel bad.
    Returns the mask and the counts found by each test.
    """
    stacks = [s for s in (darks, flats) if s is not None]
    if not stacks:
        raise BadPixelError("need dark frames, flat fields or both")
    shape = None
    for s in stacks:
        if s.ndim != 3 or s.shape[0] < 1:
            raise BadPixelError(f"expected a stack of frames (N, H, W), got shape {s.shape}")
        if shape is not None and s.shape[1:] != shape:
            raise BadPixelError(f"darks and flats differ in size: {shape} and {s.shape[1:]}")
        shape = s.shape[1:]
    mask = np.zeros(shape, dtype=bool)
    counts = {"hot": 0, "dead": 0}
    if darks is not None:
        # the median, not the mean, over frames: a radiation hit in one dark does not count
        level = np.median(np.asarray(darks, dtype=np.float64), axis=0)
        med = float(np.median(level))
        # the spread from the upper side only (84th percentile - median: one sigma of a normal): a dark
        # whose bias sits near 0 DN is clipped below, which shrinks a two-sided MAD and made every
        # pixel a little above the offset pattern's 2 sigma "hot"
        sigma = float(np.percentile(level, 84.134)) - med
        sigma = max(sigma, 0.5)  # integer DN: a perfectly flat dark still has half a DN of rounding
        hot = level > med + k * sigma
        counts["hot"] = int(hot.sum())
        mask |= hot
    if flats is not None:
        resp = np.median(np.asarray(flats, dtype=np.float64), axis=0)
        if darks is not None:
            resp = resp - level
        local = ndimage.median_filter(resp, size=15, mode="reflect")
        dead = resp < dead_fraction * np.maximum(local, 1e-9)
        dead &= local > 0
        counts["dead"] = int(dead.sum())
        mask |= dead
    return mask, counts


def _highpass(d: np.ndarray) -> np.ndarray:
    # a frame difference may carry a slow flicker of the source; white noise keeps >99 % of its variance
    return d - ndimage.gaussian_filter(d, 4.0, mode="reflect")


def pair_noise_dn(a: np.ndarray, b: np.ndarray) -> float:
    """Temporal noise of single frames (DN RMS) from the difference of two frames of one scene."""
    return robust_sigma(_highpass(np.asarray(b, np.float64) - np.asarray(a, np.float64))) / math.sqrt(2.0)


def spatial_noise_dn(frame: np.ndarray) -> float:
    """Upper bound of a frame's noise from neighbouring-pixel differences (scene edges are outliers)."""
    f = np.asarray(frame, np.float64)
    return robust_sigma(f[:, 1:] - f[:, :-1]) / math.sqrt(2.0)


def _band_pass(d: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(d, 2.0, mode="reflect") - ndimage.gaussian_filter(d, 8.0, mode="reflect")


#: var(band-pass(white noise)) / var(white noise): the band-pass kernel's sum of squares.
_WHITE_BAND_FRACTION = float(np.sum(_band_pass(np.pad(np.ones((1, 1)), 48)) ** 2))


def structure_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """How much more spatially coherent the difference of two frames is than white noise (1 = pure noise).

    Noise, even with a different variance in every pixel, is white: its share of variance in a
    band of spatial frequencies is fixed. A scene that changed leaves coherent structure
    (blobs, edges) in the difference, which fills the band. Radiation hits are clipped out.
    """
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    d -= np.median(d)
    limit = 8 * robust_sigma(d)
    if limit > 0:
        d = np.clip(d, -limit, limit)
    total = float(np.var(d))
    return float(np.var(_band_pass(d))) / (_WHITE_BAND_FRACTION * total) if total > 0 else 1.0


def is_static_pair(a: np.ndarray, b: np.ndarray, ratio: float = 1.5) -> bool:
    """Do two frames show the same scene (their difference as structureless as noise, within ``ratio``)?"""
    return structure_ratio(a, b) <= ratio


# --- bad lines ------------------------------------------------------------------------------------

def _best_edge_segment(z: np.ndarray, min_len: int) -> tuple[float, int, int]:
    """The segment touching an end of ``z`` (or all of it) with the largest ``sum(z) / sqrt(n)``."""
    n = z.size
    if n < min_len:
        return -math.inf, 0, 0
    lengths = np.arange(1, n + 1, dtype=np.float64)
    pre = np.cumsum(z) / np.sqrt(lengths)
    suf = np.cumsum(z[::-1]) / np.sqrt(lengths)
    pre[: min_len - 1] = -np.inf
    suf[: min_len - 1] = -np.inf
    i, j = int(np.argmax(pre)), int(np.argmax(suf))
    if pre[i] >= suf[j]:
        return float(pre[i]), 0, i + 1
    return float(suf[j]), n - (j + 1), n


def find_bad_lines(excess: np.ndarray, axis: Literal["column", "row"], sigma: float, score: float,
                   min_len: int, signs: Sequence[int] = (1, -1)) -> list[tuple[int, int, int, int, float]]:
    """Lines whose ``excess`` over their neighbours is significant: (index, start, stop, sign, score).

    ``excess`` is a map of each pixel minus the median of its neighbours across the line
    direction; ``sigma`` its noise. Each line is tested for a segment from one edge (a charge
    trap) or the whole line; the segment's median must also be well off zero, so that one hot
    pixel cannot make a line.
    """
    e = excess if axis == "column" else excess.T
    found = []
    for idx in range(e.shape[1]):
        z = np.nan_to_num(e[:, idx] / sigma, nan=0.0)
        for sign in signs:
            s, start, stop = _best_edge_segment(sign * np.clip(z, -50, 50), min_len)
            if s >= score and sign * float(np.median(z[start:stop])) >= 2.0:
                found.append((idx, start, stop, sign, s))
                break
    return found


def line_excess(frame: np.ndarray, axis: Literal["column", "row"]) -> np.ndarray:
    """Each pixel's excess over the two pixels on *both* sides across the line direction.

    The smaller excess when both sides agree in sign, else 0: a one-pixel-wide line stands out
    from both sides, while a scene edge (a step) stands out from one side only. The first and
    last line (one side only) get 0: they are not tested.
    """
    f = np.asarray(frame, np.float64)
    ax = 1 if axis == "column" else 0
    pad = [(0, 0), (0, 0)]
    pad[ax] = (2, 2)
    g = np.pad(f, pad, mode="reflect")
    n = f.shape[ax]

    def shifted(k: int) -> np.ndarray:
        return np.take(g, np.arange(2 + k, 2 + k + n), axis=ax)

    left = f - (shifted(-1) + shifted(-2)) / 2
    right = f - (shifted(1) + shifted(2)) / 2
    agree = np.sign(left) == np.sign(right)
    out = np.where(agree, np.sign(left) * np.minimum(np.abs(left), np.abs(right)), 0.0)
    # the outermost lines have neighbours on one side only: a gradient would pass for a bad line
    edge = [slice(None), slice(None)]
    edge[ax] = [0, n - 1]  # type: ignore[call-overload]
    out[tuple(edge)] = 0.0
    return out


# --- the analysis ---------------------------------------------------------------------------------

def _evenly(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / (k - 1))) for i in range(k)})


def _stack(runs: Sequence[Run], max_frames: int) -> tuple[np.ndarray, list[int]]:
    """Frames of ``runs`` (float32, up to ``max_frames``) and the run number of each."""
    counts = [r.info.frames for r in runs]
    total = sum(counts)
    chosen = _evenly(total, max_frames)
    frames, run_of = [], []
    offset = 0
    for k, (run, n) in enumerate(zip(runs, counts)):
        local = [i - offset for i in chosen if offset <= i < offset + n]
        if local:
            frames.append(run.frames(local).astype(np.float32))
            run_of += [k] * len(local)
        offset += n
    if not frames:
        return np.zeros((0, 1, 1), np.float32), []
    return np.concatenate(frames), run_of


def _ptc(light: np.ndarray, run_of: list[int], exclude: np.ndarray, adc_max: float,
         cfg: CharacteriseConfig) -> tuple[list[PtcPoint], int]:
    """Photon-transfer points from the static consecutive pairs of ``light``."""
    means, diffs = [], []
    pairs = 0
    for i in range(len(light) - 1):
        if run_of[i] != run_of[i + 1]:
            continue
        a, b = light[i].astype(np.float64), light[i + 1].astype(np.float64)
        if not is_static_pair(a, b, cfg.static_ratio):
            continue
        pairs += 1
        ok = ~exclude & (a < adc_max - 0.5) & (b < adc_max - 0.5) & (a > 0.5) & (b > 0.5)
        means.append(((a + b) / 2)[ok])
        diffs.append(_highpass(b - a)[ok])
    if not means:
        return [], 0
    m, d = np.concatenate(means), np.concatenate(diffs)
    # bins even in sqrt(level), where shot noise is even: narrow enough at the bright end that one
    # bin does not mix very different variances (the MAD would follow the more numerous, fainter pixels)
    lo, hi = np.sqrt(np.maximum(np.percentile(m, [0.1, 99.9]), 0.0))
    edges = np.unique(np.linspace(lo, hi, cfg.ptc_bins + 1) ** 2)
    points = []
    which = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, len(edges) - 2)
    for k in range(len(edges) - 1):
        sel = (which == k) & (m >= edges[0]) & (m <= edges[-1])
        if sel.sum() < 50:
            continue
        points.append(PtcPoint(mean_dn=float(np.mean(m[sel])), variance_dn2=robust_sigma(d[sel]) ** 2 / 2,
                               pixels=int(sel.sum())))
    return points, pairs


def _fit_ptc(points: Sequence[PtcPoint], bias: float | None, read_dn: float | None) -> tuple[float, float] | None:
    """(slope 1/gain, intercept) of variance against mean; the intercept is fixed by the darks when known.

    None when the curve does not determine the slope to 20 % (too small a range of signal levels).
    """
    if len(points) < 3:
        return None
    m = np.array([p.mean_dn for p in points])
    v = np.array([p.variance_dn2 for p in points])
    w = np.array([p.pixels for p in points], np.float64) / np.maximum(v, 1e-12) ** 2  # var of a variance ∝ var²/n
    if bias is not None and read_dn is not None:
        x, y = m - bias, v - read_dn**2
        sxx = float(np.sum(w * x * x))
        slope = float(np.sum(w * x * y) / sxx)
        intercept = read_dn**2 - slope * bias
        se = math.sqrt(_MAD_VARIANCE_FACTOR / sxx)
    else:
        a = np.vstack([m, np.ones_like(m)]).T
        cov = np.linalg.inv(a.T @ (a * w[:, None]))
        slope, intercept = (float(x) for x in cov @ (a.T @ (w * v)))
        se = math.sqrt(_MAD_VARIANCE_FACTOR * cov[0, 0])
    if not slope > 5 * se:
        return None
    return slope, intercept


def _lines(frame_excess_col: np.ndarray, frame_excess_row: np.ndarray, cfg: CharacteriseConfig,
           signs: Sequence[int]) -> list[tuple[str, int, int, int, int, float]]:
    out = []
    for axis, ex in (("column", frame_excess_col), ("row", frame_excess_row)):
        sigma = clipped_sigma(ex)
        if not sigma > 0:
            continue
        for idx, start, stop, sign, score in find_bad_lines(ex, axis, sigma, cfg.line_score, cfg.line_min_length, signs):  # type: ignore[arg-type]
            out.append((axis, idx, start, stop, sign, score))
    return out


def characterise(recording: Path | str, config: CharacteriseConfig | None = None,
                 bit_depth: int | None = None) -> CameraProfile:
    """Measure the camera of ``recording`` (every run of its first frame size); see the module docstring."""
    from cdae.engine.package import sha256_file

    cfg = config or CharacteriseConfig()
    path = Path(recording)
    runs = [r for r in read_runs(path) if r.info.frames > 0]
    if not runs:
        raise CharacteriseError(f"{path}: no frames recorded")
    first = runs[0].info
    notes: list[str] = []
    same = [r for r in runs if (r.info.height, r.info.width) == (first.height, first.width)]
    if len(same) < len(runs):
        notes.append(f"{len(runs) - len(same)} run(s) of another frame size left out")
    bits = bit_depth or max(r.info.bit_depth for r in same)
    adc_max = float(2**bits - 1)
    dark, dark_runs = _stack([r for r in same if r.info.dark], cfg.max_frames)
    light, light_runs = _stack([r for r in same if not r.info.dark], cfg.max_frames)
    if len(dark) + len(light) < 2:
        raise CharacteriseError(f"{path}: at least 2 frames are needed, found {len(dark) + len(light)}")
    highest = max(float(dark.max()) if len(dark) else 0.0, float(light.max()) if len(light) else 0.0)
    if bit_depth is None and highest < 2 ** (bits - 2) and first.bit_depth_source != "user":
        notes.append(f"no value above {highest:.0f} DN in a {bits}-bit container: if the ADC has fewer bits, "
                     "pass --bit-depth (it sets the saturation level)")
    h, w = first.height, first.width
    mask = np.zeros((h, w), np.uint8)
    dead: list[tuple[int, int, float]] = []
    warm: list[tuple[int, int, float]] = []
    stuck: list[tuple[int, int, float]] = []
    lines: list[BadLineSpec] = []
    bias = read_dn = dsnu = None

    if len(dark) >= 2:
        dark_med = np.median(dark, axis=0).astype(np.float64)
        bias = float(np.median(dark_med))
        read_dn = float(np.median([pair_noise_dn(dark[i], dark[i + 1]) for i in range(len(dark) - 1)
                                   if dark_runs[i] == dark_runs[i + 1]] or [robust_sigma(dark[0]) ]))
        dsnu_var = robust_sigma(dark_med) ** 2 - (1.2533 * read_dn) ** 2 / len(dark)  # var of a median: (π/2)σ²/N
        dsnu = math.sqrt(max(dsnu_var, 0.0))
        for axis, idx, start, stop, sign, score in _lines(line_excess(dark_med, "column"), line_excess(dark_med, "row"),
                                                          cfg, signs=(1,)):
            region = (slice(start, stop), idx) if axis == "column" else (idx, slice(start, stop))
            excess = float(np.median(line_excess(dark_med, axis)[region]))  # type: ignore[arg-type]
            lines.append(BadLineSpec(axis=axis, index=idx, start=start, stop=stop, kind="hot", value=excess,  # type: ignore[arg-type]
                                     significance=score))
        line_mask = _line_mask(lines, h, w)
        sigma_med = math.sqrt((1.2533 * read_dn) ** 2 / len(dark) + dsnu**2)
        limit = cfg.pixel_sigma * max(sigma_med, 0.5)
        temporal_sd = dark.std(axis=0)
        for r, c in zip(*np.nonzero((np.abs(dark_med - bias) > limit) & ~line_mask)):
            level = float(dark_med[r, c])
            if temporal_sd[r, c] < 0.25 * read_dn and level > bias:
                stuck.append((int(r), int(c), level))
            elif level > bias:
                warm.append((int(r), int(c), level - bias))
        mask |= _pixel_mask(warm + stuck, h, w, HOT) | _line_mask_bits(lines, h, w)
    else:
        notes.append("no dark frames: bias and read noise estimated from ordinary frames; "
                     "record some with the shutter closed (cdae record --dark) for a direct measurement")

    points: list[PtcPoint] = []
    pairs = 0
    gain = None
    gain_method = "no static frame pairs: unknown"
    if len(light) >= 2:
        light_med = np.median(light, axis=0).astype(np.float64)
        # lines first: their pixels would otherwise each count as a hot or dead pixel. Darks are
        # the measurement of hot lines; light frames add dead ones (and hot ones without darks).
        signs = (-1,) if len(dark) >= 2 else (1, -1)
        noise_dn = max(read_dn or spatial_noise_dn(light[0]), 0.5)
        consecutive = [i for i in range(len(light) - 1) if light_runs[i] == light_runs[i + 1]]
        static = [is_static_pair(light[i], light[i + 1], cfg.static_ratio) for i in consecutive]
        # partial lines need one scene: the median of changing scenes leaves short ridges of its own
        if static and np.mean(static) >= 0.5:
            for axis, idx, start, stop, sign, score in _lines(
                    np.median([line_excess(f, "column") for f in light], axis=0),
                    np.median([line_excess(f, "row") for f in light], axis=0), cfg, signs=signs):
                _add_light_line(lines, axis, idx, start, stop, sign, score, light_med, bias, noise_dn, cfg)  # type: ignore[arg-type]
        # a scene that changes from frame to frame hides a line in the median map: take each frame's
        # line medians instead (texture is not aligned with the pixel grid; a bad line is)
        for axis in ("column", "row"):
            prof = whole_line_profile(light, axis, adc_max)  # type: ignore[arg-type]
            sigma = max(clipped_sigma(prof), 0.1)  # DN: medians of integer frames can agree exactly
            for idx in np.flatnonzero(np.abs(prof) > cfg.pixel_sigma * sigma):
                sign = 1 if prof[idx] > 0 else -1
                if sign in signs:
                    _add_light_line(lines, axis, int(idx), 0, h if axis == "column" else w, sign,  # type: ignore[arg-type]
                                    float(abs(prof[idx]) / sigma), light_med, bias, noise_dn, cfg, float(prof[idx]))
        mask |= _line_mask_bits(lines, h, w)
        # stuck pixels (no noise) and single-pixel spikes (hot pixels, point-source cores) would bend the curve
        spikes = np.abs(light_med - ndimage.median_filter(light_med, size=3, mode="reflect"))
        unfit = (mask != 0) | (light.var(axis=0) == 0) | (spikes > cfg.pixel_sigma * robust_sigma(spikes))
        points, pairs = _ptc(light, light_runs, unfit, adc_max, cfg)
        fit = _fit_ptc(points, bias, read_dn)
        if fit is not None and fit[0] > 0:
            gain = 1.0 / fit[0]
            gain_method = f"photon transfer, {pairs} static frame pairs, {len(points)} signal bins"
            if bias is None:
                bias = float(np.percentile(light_med, 0.1))
                read_dn = math.sqrt(max(fit[1] + bias * fit[0], 0.0))
        if bias is None:
            bias = float(np.percentile(light_med, 0.1))
        if read_dn is None:
            read_dn = float(np.sqrt(points[0].variance_dn2)) if points else spatial_noise_dn(light[0])
        _light_pixels(light, light_runs, light_med, mask, bias, read_dn, gain, cfg, dead, warm, stuck,
                      hot_from_light=len(dark) < 2)
    else:
        notes.append("no ordinary frames: gain, dead pixels and dead lines need light")
    assert bias is not None and read_dn is not None
    if len(dark) < 2:
        bias_method = "0.1 percentile of the ordinary frames' median (no darks): an upper bound"
        read_method = "photon-transfer intercept (no darks)" if gain else "faintest photon-transfer bin (no darks)"
    else:
        bias_method = f"median of {len(dark)} dark frames"
        read_method = "difference of consecutive dark frames"
    if gain is None and len(light) >= 2 and pairs == 0:
        notes.append("gain unknown: no two consecutive frames showed the same scene")
    elif gain is None and len(light) >= 2 and not any(n.startswith("gain unknown") for n in notes):
        notes.append(f"gain unknown: the photon-transfer curve of {pairs} static frame pairs does not fix its slope")
    return CameraProfile(
        recording=path.name, recording_sha256=sha256_file(path), source=first.source, camera=first.camera,
        height=h, width=w, data_type=first.data_type, bit_depth=bits, frames_dark=len(dark), frames_light=len(light),
        static_pairs=pairs, bias_dn=bias, bias_method=bias_method, read_noise_dn=read_dn, read_noise_method=read_method,
        gain_e_per_dn=gain, gain_method=gain_method, dsnu_dn=dsnu, saturation_dn=min(highest, adc_max), ptc=points,
        dead_pixels=dead, hot_pixels=warm, stuck_pixels=stuck, bad_lines=lines, notes=notes, settings=cfg)


def whole_line_profile(frames: np.ndarray, axis: Literal["column", "row"], adc_max: float) -> np.ndarray:
    """Per line, the median over frames of its median :func:`line_excess` (saturated pixels left out)."""
    out = []
    for f in frames:
        e = line_excess(f, axis)
        e[f >= adc_max - 0.5] = np.nan
        with np.errstate(all="ignore"):
            out.append(np.nanmedian(e, axis=0 if axis == "column" else 1))
    return np.nan_to_num(np.nanmedian(np.asarray(out), axis=0), nan=0.0)


def _add_light_line(lines: list[BadLineSpec], axis: Literal["column", "row"], idx: int, start: int, stop: int,
                    sign: int, score: float, light_med: np.ndarray, bias: float | None, noise_dn: float,
                    cfg: CharacteriseConfig, offset_dn: float | None = None) -> None:
    """Judge a candidate line of the ordinary frames and add it unless it is the scene's (or known).

    ``offset_dn``: a hot line's offset measured frame by frame (it is constant along the line by construction).
    """
    if any(b.axis == axis and b.index == idx for b in lines):
        return
    region = (slice(start, stop), idx) if axis == "column" else (idx, slice(start, stop))
    if sign > 0:
        along = line_excess(light_med, axis)[region]
        ex = float(np.median(along)) if offset_dn is None else offset_dn
        # a hot line adds one offset all along; a bright ridge of the scene varies along its length
        if offset_dn is not None or robust_sigma(along) <= 0.5 * ex:
            lines.append(BadLineSpec(axis=axis, index=idx, start=start, stop=stop, kind="hot", value=ex,
                                     significance=score))
        return
    response, lit_dn = _response(light_med, region, bias)
    # a dark line in the scene (a shadow, a gap) dims a column; a dead one reads almost nothing
    if response < cfg.dead_response and lit_dn > 5 * noise_dn:
        lines.append(BadLineSpec(axis=axis, index=idx, start=start, stop=stop, kind="dead", value=response,
                                 significance=score))


def _response(level: np.ndarray, region: tuple, bias: float | None) -> tuple[float, float]:
    """Signal of ``region`` as a fraction of its neighbours' (above the bias), and their median signal."""
    b = bias if bias is not None else float(np.percentile(level, 0.1))
    neigh = ndimage.median_filter(level, size=5, mode="reflect")
    num, den = level[region] - b, neigh[region] - b
    ok = den > 0
    if not ok.any():
        return 1.0, 0.0
    return float(np.clip(np.median(num[ok] / den[ok]), 0.0, 1.0)), float(np.median(den))


def _light_pixels(light: np.ndarray, run_of: list[int], light_med: np.ndarray, mask: np.ndarray, bias: float,
                  read_dn: float, gain: float | None, cfg: CharacteriseConfig, dead: list, warm: list,
                  stuck: list, hot_from_light: bool) -> None:
    """Dead, stuck and (without darks) hot pixels from ordinary frames; appended to the lists, marked in ``mask``.

    A defect is one pixel: a dead pixel reads far below *each* of its 4 neighbours, a hot one stands
    above all of them, while a real point source spreads into its neighbours (its PSF) and, in a
    static scene, carries the shot noise of its brightness.
    """
    h, w = light_med.shape
    residual = np.median([f - ndimage.median_filter(f, size=3, mode="reflect") for f in light], axis=0)
    sigma = robust_sigma(residual)
    if not sigma > 0:
        return
    known = mask != 0
    pad = np.pad(light_med, 1, mode="reflect")
    four = np.stack([pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]])
    background = ndimage.median_filter(light_med, size=5, mode="reflect")
    temporal_var = light.astype(np.float64).var(axis=0, ddof=1)
    static = len(set(run_of)) == 1 and all(
        is_static_pair(light[i], light[i + 1], cfg.static_ratio) for i in range(min(len(light) - 1, 3)))
    noise_med = 1.2533 * math.sqrt(read_dn**2 + 1.0) / math.sqrt(len(light))  # of a temporal median
    # textured scenes (turbulence, speckle) have pixel-scale bumps of their own: judge against the local texture
    local = MAD_TO_SIGMA * np.sqrt(ndimage.median_filter(residual**2, size=7, mode="reflect") / 0.4549)
    for r, c in zip(*np.nonzero((residual > cfg.pixel_sigma * np.maximum(sigma, local)) & ~known)):
        if temporal_var[r, c] < 0.05 * (read_dn**2 + 1.0):  # no noise at all: stuck
            stuck.append((int(r), int(c), float(light_med[r, c])))
            continue
        if not hot_from_light:
            continue
        excess = float(light_med[r, c] - background[r, c])
        spill = float(four[:, r, c].max() - background[r, c])
        if spill > 0.1 * excess + 3 * noise_med:  # its neighbours share the light: a real point source
            continue
        if static and gain:
            photo_var = read_dn**2 + max(float(background[r, c]) - bias, 0.0) / gain
            if temporal_var[r, c] > photo_var + 0.5 * excess / gain:  # the shot noise of a real feature
                continue
        warm.append((int(r), int(c), excess))
    lowest_neighbour = four.min(axis=0)
    lit = lowest_neighbour - bias > cfg.pixel_sigma * max(read_dn, 0.5)
    for r, c in zip(*np.nonzero((residual < -cfg.pixel_sigma * sigma) & ~known & lit)):
        response = float((light_med[r, c] - bias) / (lowest_neighbour[r, c] - bias))
        if response < cfg.dead_response:
            dead.append((int(r), int(c), max(response, 0.0)))
    mask |= _pixel_mask(warm + stuck, h, w, HOT) | _pixel_mask(dead, h, w, DEAD)


def _pixel_mask(items: Sequence[tuple[int, int, float]], h: int, w: int, bit: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    for r, c, _ in items:
        m[r, c] |= bit
    return m


def _line_mask(lines: Sequence[BadLineSpec], h: int, w: int) -> np.ndarray:
    return _line_mask_bits(lines, h, w) != 0


def _line_mask_bits(lines: Sequence[BadLineSpec], h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    for b in lines:
        m[(slice(b.start, b.stop), b.index) if b.axis == "column" else (b.index, slice(b.start, b.stop))] |= BAD_LINE
    return m


# --- the picture ----------------------------------------------------------------------------------

def save_profile_png(profile: CameraProfile, recording: Path | str, path: Path | str) -> Path:
    """Defect map over the median frame, the photon-transfer curve and the noise numbers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    from cdae.training.report import robust_limits

    runs = [r for r in read_runs(recording) if r.info.frames and (r.info.height, r.info.width) == (profile.height, profile.width)]
    light = [r for r in runs if not r.info.dark] or runs
    frames, _ = _stack(light, 16)
    median = np.median(frames, axis=0)
    fig = Figure(figsize=(13, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_img, ax_map, ax_ptc = fig.subplots(1, 3)
    lo, hi = robust_limits([median])
    ax_img.imshow(median, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax_img.set_title(f"median of {len(frames)} {'ordinary' if light is not runs else ''} frames", fontsize=9)
    mask = profile.defect_mask()
    classes = np.zeros(mask.shape, np.uint8)
    classes[mask & BAD_LINE != 0] = 1
    classes[mask & DEAD != 0] = 2
    classes[mask & HOT != 0] = 3
    ax_map.imshow(median, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", alpha=0.5)
    overlay = np.ma.masked_equal(classes, 0)
    ax_map.imshow(overlay, cmap=ListedColormap(["orange", "deepskyblue", "red"]), vmin=1, vmax=3, interpolation="nearest")
    ax_map.set_title(f"defects: {len(profile.bad_lines)} lines (orange), {len(profile.dead_pixels)} dead (blue), "
                     f"{len(profile.hot_pixels) + len(profile.stuck_pixels)} hot/stuck (red)", fontsize=8)
    for ax in (ax_img, ax_map):
        ax.set_xticks([])
        ax.set_yticks([])
    if profile.ptc:
        m = np.array([p.mean_dn for p in profile.ptc])
        v = np.array([p.variance_dn2 for p in profile.ptc])
        ax_ptc.plot(m, v, "o", ms=4, label="consecutive-frame differences")
        model = profile.noise_variance_dn2(np.sort(m))
        ax_ptc.plot(np.sort(m), model, "-", label="read² + (mean − bias) / gain")
        ax_ptc.legend(fontsize=8)
    else:
        ax_ptc.text(0.5, 0.5, "no static frame pairs:\nno photon-transfer curve", ha="center", va="center",
                    transform=ax_ptc.transAxes)
    gain = f"{profile.gain_e_per_dn:.3g} e-/DN" if profile.gain_e_per_dn else "unknown"
    ax_ptc.set_title(f"bias {profile.bias_dn:.1f} DN, read noise {profile.read_noise_dn:.2f} DN, gain {gain}", fontsize=9)
    ax_ptc.set_xlabel("mean level, DN")
    ax_ptc.set_ylabel("temporal variance, DN²")
    fig.suptitle(f"{profile.recording}: {profile.width}x{profile.height} {profile.data_type} {profile.bit_depth}-bit, "
                 f"{profile.frames_dark} dark + {profile.frames_light} ordinary frames", fontsize=10)
    out = Path(path)
    fig.savefig(out, format="png")
    return out
