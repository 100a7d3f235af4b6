"""Camera health, live: the camera's bad pixels learned from its own frames, and when it degrades.

Sans-I/O: :class:`HealthTracker` takes frames (numpy arrays) and keeps per-pixel evidence, the
live bad-pixel map and its history; nothing here touches a socket, a PV or an event loop. The
filter IOC (``cdae.ioc.health``) feeds it every raw frame in a worker thread and publishes what
it says; ``cdae health`` and ``bench/health.py`` drive it directly on recordings and simulated
frames. The rule, stated once (``docs/design.md`` says the same with the measured numbers):

**Per frame** (vectorised, about twenty passes over the frame in blocks of rows, and a few
operations on the handful of pixels the screen lets through):

1. The frame's noise, Poisson-Gaussian, measured on the frame itself (the guard's
   :func:`~cdae.engine.guard.measure_noise_rows`: read noise and offset from its quietest, darkest
   parts) on every ``noise_every``-th frame; the median of the last five is used.
2. A screen: each pixel's excess over its side neighbours along rows and columns
   (``a = 2c - l - r``, ``b = 2c - u - d``) against the noise at its four neighbours' level.
   Below what the guard's impulse test needs at the least (:func:`screen_sigma`, halved) a pixel
   cannot be an impulse; the others get the **guard's impulse test** (sharper than optics of
   PSF sigma ``psf_sigma_px`` allow, at ``frame_sigma`` of its noise: light spills at least
   ``1/R`` of itself into each neighbour, R = 11.8 at 0.45 px; a lone pixel does not). A flag
   adds one to the pixel's ``hot`` or ``dead`` count of the window.
3. Each pixel's excess over its four neighbours' mean, **clipped at** ``excess_clip_sigma`` of its
   noise, is added up (a one-frame transient adds at most that; a defect adds its offset every
   frame), and so are its value, its lowest and highest value (the stuck test, a trimmed mean).
4. A **radiation hit** is a bright flag of one frame alone: flagged in frame t, in neither t-1
   nor t+1, and not in the map; so a frame's hits are known one frame later
   (``FrameResult.hits`` belongs to the previous frame).

**Per window** of ``window_frames`` frames each pixel gets a verdict, BAD, GOOD or unseen:

- BAD by **count** if its hot or dead count ``>= c``, the least count with
  ``pixels * P(Binomial(n, p0) >= c) <= false_entries``: fewer than ``false_entries`` pixels of
  the frame are expected to get there by transients alone, at ``p0`` = twice the window's
  measured radiation-hit rate per pixel and frame (at least ``transient_rate_floor``). A
  radiation burst raises ``p0``, and with it ``c``.
- BAD by **excess** if its mean clipped excess, in robust standard deviations of the pixels of
  its level (the camera's own fixed pattern, DSNU and PRNU, is the population it must stand out
  of), is beyond ``mean_sigma``, *and* the window's trimmed mean (highest and lowest frame left
  out) there is sharper than the optics allow (the guard's test at ``shape_sigma`` of that
  mean's noise, the fixed pattern included). A bright point source of the scene is blurred by
  the optics: it is persistent but not sharp, and passes neither test.
- BAD by **change** (new damage, the fixed pattern and a steady scene cancelled): its clipped
  excess against its own past (an exponential mean over windows, learnt while it is out of the
  map and not on its way in, a window's pull clipped at three of the mean's noise) in robust
  standard deviations of such changes beyond ``mean_sigma``, its excess now the same way beyond
  half of that, its past unremarkable, no known defect next to it; and its change is its own:
  beyond its four neighbours' median change by ``mean_sigma`` of the noise, beyond all eight
  neighbours' changes by ``shape_sigma``, and the neighbours changed, over the pixels beyond them,
  by less than half what the narrowest optics would spill (a scene that brightens changes a
  neighbourhood, new light a blurred spot). The past is not saved: it is learnt again after a
  restart (4 windows).
- BAD as **stuck** if its value did not change once in the window while at least three of its
  four side neighbours changed by two quantisation steps or more, and it is not at the window's
  highest value (saturated light is constant too).
- GOOD if none of that, its flag count is below ``c / 2`` and its excess within half of
  ``mean_sigma`` (hysteresis), and it could have shown its defect: a dead pixel only in light
  (unseen while its neighbours' level over the offset is below what the excess test needs), a
  stuck one only while its neighbours change.

A pixel **enters** the map after ``enter_windows`` consecutive BAD windows and **leaves** it after
``leave_windows`` consecutive GOOD ones (unseen windows do not break that run: a dead pixel in the
dark stays); its kind (stuck, else hot, else dead) is its last BAD verdict's. A **bad line** (column, row) stands above (below)
*both* neighbouring lines all along it (the median of each difference along the line, the
smaller, beyond ``line_sigma`` of that median's own noise), unless both neighbours carry at least
half the light the narrowest optics would spill into them; or has ``line_min_fraction`` of its
pixels (and 8) in the map. Lines enter and leave by the same rule; their pixels count as the
line's, not as hot or dead pixels.

The map is exported as an areaDetector NDPluginBadPixel map (:meth:`HealthTracker.bad_pixel_map`),
survives restarts (:meth:`HealthTracker.save` / :meth:`HealthTracker.load`, one file per camera
and frame size), and is judged against alarm limits (:func:`judge`) relative to a **baseline**:
the map an operator accepted, or, until one does, the map after the first ``baseline_windows``
windows (automatic).
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cdae.engine.badpixels import BadPixelMap
from cdae.engine.guard import GuardConfig, NoiseModel, _tests, centre_to_neighbour_ratio
from cdae.engine.guard import measure_noise_rows as measure_noise
from cdae.engine.robust import MAD_TO_SIGMA, mad_sigma

__all__ = ["HealthConfig", "HealthLimits", "HealthTracker", "HealthError", "Limit", "judge"]

#: Codes of the health map image (``HealthMap:ArrayData``); ``NEW`` is added where a defect is not in the baseline.
GOOD, HOT, DEAD, STUCK, LINE, SUSPECT = 0, 1, 2, 3, 4, 5
NEW = 0x80
KIND_NAMES = {HOT: "hot", DEAD: "dead", STUCK: "stuck", LINE: "line"}
#: Camera health levels (``CameraHealth_RBV``), with their alarm severities 0, 1 (MINOR), 2 (MAJOR).
HEALTH_NAMES = ("OK", "DEGRADED", "BAD")
FORMAT = "cdae-health"
FORMAT_VERSION = 1
HISTORY_MAX = 4096  # window summaries kept; older ones are thinned out (every other) beyond this
#: One history row per window (HealthTracker.history).
HISTORY_COLUMNS = ("frame", "time", "hot", "dead", "stuck", "bad_columns", "bad_rows", "new_bad_pixels",
                   "new_bad_lines", "radiation_rate_hz", "read_noise_dn", "offset_dn", "count_threshold")
_NOISE_KEEP = 5
_NOISE_PAIRS = 1 << 14  # pixel triples per noise measurement (the guard's default is 65536): 16 level bins of 1024
_REF_RATE = 0.25  # the reference's update per window (an exponential mean over about 7 windows)
_REF_WINDOWS = 4  # windows learnt before a pixel's change is judged
_BLOCK_ROWS = 128  # rows per block of the per-frame screen: its temporaries stay in the CPU's cache


class HealthError(ValueError):
    """A frame or state file the tracker cannot use; the message says why."""


class Limit(BaseModel):
    """Alarm limits of one quantity: MINOR at ``minor`` or more, MAJOR at ``major`` or more (None: never)."""

    model_config = ConfigDict(extra="forbid")

    minor: float | None = Field(None, ge=0)
    major: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Limit:
        if self.minor is not None and self.major is not None and self.major < self.minor:
            raise ValueError(f"major ({self.major:g}) is below minor ({self.minor:g})")
        return self


class HealthLimits(BaseModel):
    """What makes ``CameraHealth_RBV`` DEGRADED (MINOR) or BAD (MAJOR); the worst quantity decides."""

    model_config = ConfigDict(extra="forbid")

    new_bad_pixels: Limit = Field(default_factory=lambda: Limit(minor=10, major=100),
                                  description="hot, dead and stuck pixels (off bad lines) not in the baseline")
    new_bad_lines: Limit = Field(default_factory=lambda: Limit(minor=1, major=3),
                                 description="bad columns and rows not in the baseline")
    bad_pixels: Limit = Field(default_factory=Limit, description="all hot, dead and stuck pixels of the map")
    bad_lines: Limit = Field(default_factory=Limit, description="all bad columns and rows")
    radiation_rate_hz: Limit = Field(default_factory=Limit, description="radiation-hit pixels per second")
    read_noise_dn: Limit = Field(default_factory=Limit, description="the frames' read noise, DN RMS")


class HealthConfig(BaseModel):
    """The live bad-pixel map of one camera: the evidence rule's constants and the alarm limits."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="keep the live bad-pixel map and the health PVs")
    window_frames: int = Field(32, ge=4, le=255, description="frames per evidence window")
    enter_windows: int = Field(2, ge=1, le=16, description="consecutive BAD windows before a pixel enters the map")
    leave_windows: int = Field(8, ge=1, le=64, description="consecutive GOOD windows before it leaves")
    baseline_windows: int = Field(64, ge=1, description="until an operator accepts a map, the map after this "
                                                       "many windows is the baseline NewBadPixels counts from")
    false_entries: float = Field(1e-3, gt=0, lt=1, description="expected pixels of a frame passing the count "
                                 "test by chance in one window (the binomial bound)")
    transient_rate_floor: float = Field(1e-4, gt=0, lt=0.5, description="least per-pixel, per-frame rate of "
                                        "transient flags the count test allows for")
    frame_sigma: float = Field(5.0, gt=0, description="per-frame impulse test, in its noise (the guard's default)")
    mean_sigma: float = Field(6.0, gt=0, description="excess test: a pixel's mean clipped excess over its "
                              "neighbours, in robust standard deviations of the frame's pixels")
    excess_clip_sigma: float = Field(10.0, gt=0, description="each frame's excess is clipped at this many of the "
                                     "pixel's noise: what a transient can add to the window's")
    shape_sigma: float = Field(3.0, gt=0, description="the shape test of the excess test's pixels: the guard's "
                               "impulse test on the window's mean, at this many of its noise")
    line_sigma: float = Field(6.0, gt=0, description="bad-line test, in the noise of the line's median")
    line_min_fraction: float = Field(0.25, gt=0, le=1, description="a line with this share of its pixels in the "
                                     "map is bad")
    psf_sigma_px: float = Field(0.45, gt=0.2, le=10, description="the optics' narrowest PSF: a real feature is "
                                "never sharper (the guard's)")
    noise_every: int = Field(32, ge=1, description="measure the frame's noise on every n-th frame")
    limits: HealthLimits = Field(default_factory=HealthLimits)
    max_rate_hz: float | None = Field(None, gt=0, description="IOC: analyse at most this many frames per second "
                                      "(the others are skipped and counted); None: no rate bound")
    cpu_share: float | None = Field(0.1, gt=0, le=1, description="IOC: the map takes at most this share of one "
                                    "core: after a frame that took t s to analyse, none is taken for t/cpu_share - t s "
                                    "(skipped and counted): large frames from a fast camera are sampled, small ones all "
                                    "analysed. None: no bound (with max_rate_hz None: every frame the worker can take)")
    save_period_s: float = Field(60.0, gt=0, description="IOC: save the map at most this often (and at stop)")
    map_period_s: float = Field(5.0, gt=0, description="IOC: send a changed live map to the engine at most "
                                "this often (when HealthMapUse is Yes)")


def screen_sigma(z: float, ratio: float) -> float:
    """How far (in pixel noise) ``max(|2c - l - r|, |2c - u - d|)`` must be, at the least, for the
    guard's impulse test at ``z`` to pass, halved (a factor 2 for the screen's different level).

    A one-axis hit needs ``c - lo > (R/2)(l + r - 2 lo) + z s``, ``s = sqrt(1 + R^2/2)``, so
    ``2c - l - r = 2(c - lo) - (l + r - 2 lo) > 2 (1 - 1/R) z s``; a point hit needs more.
    """
    return 0.5 * 2.0 * (1.0 - 1.0 / ratio) * z * math.sqrt(1.0 + ratio * ratio / 2.0)


def binomial_threshold(n: int, p: float, pixels: int, alpha: float) -> int:
    """The least count ``c`` (at least 2) with ``pixels * P(Binomial(n, p) >= c) <= alpha``; ``n + 1``
    if none (the count test cannot be passed at that transient rate)."""
    p = min(max(p, 1e-12), 1 - 1e-12)
    lp, lq = math.log(p), math.log1p(-p)
    tail = 0.0
    for k in range(n, -1, -1):
        tail += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lp + (n - k) * lq)
        if pixels * tail > alpha:
            return max(2, k + 1)
    return max(2, 0)


class _MeanNoise:
    """The noise of a window's mean image, what the guard's test reads through ``noise.sigma``: the
    spatial noise measured on the mean itself (the fixed pattern, DSNU and PRNU, which averaging
    does not remove, and the temporal noise left), never below the frames' noise over the square
    root of the frames each pixel's mean holds (``scale``)."""

    def __init__(self, spatial: NoiseModel, temporal: NoiseModel, scale: np.ndarray | float) -> None:
        self.spatial, self.temporal, self.scale = spatial, temporal, scale

    def sigma(self, level: np.ndarray) -> np.ndarray:
        return np.maximum(self.spatial.sigma(level), self.temporal.sigma(level) * self.scale)


@dataclass(frozen=True)
class Seen:
    """When a map pixel's (or line's) evidence began: the first flagged frame of its run of BAD windows."""

    frame: int  # the tracker's frame number (frames analysed since the map began)
    unique_id: int  # the camera's UniqueId of that frame
    time: float  # its timestamp (POSIX seconds; 0 when unknown)


@dataclass(frozen=True)
class HealthCounts:
    """The map in numbers (the health PVs)."""

    hot: int = 0
    dead: int = 0
    stuck: int = 0
    bad_columns: int = 0
    bad_rows: int = 0
    new_bad_pixels: int = 0
    new_bad_lines: int = 0
    map_pixels: int = 0  # every pixel the exported map lists (lines included)

    @property
    def bad_pixels(self) -> int:
        return self.hot + self.dead + self.stuck

    @property
    def bad_lines(self) -> int:
        return self.bad_columns + self.bad_rows


@dataclass(frozen=True)
class WindowResult:
    """What one closed window changed."""

    window: int
    frames: int  # frame number of its last frame
    entered: int
    left: int
    lines_entered: int
    lines_left: int
    count_threshold: int  # the binomial bound c of this window
    transient_rate: float  # measured radiation-hit pixels per pixel per frame
    counts: HealthCounts
    baseline_set: bool = False  # the automatic baseline was taken at this window

    @property
    def changed(self) -> bool:
        return bool(self.entered or self.left or self.lines_entered or self.lines_left or self.baseline_set)


@dataclass(frozen=True)
class FrameResult:
    """One frame through the tracker."""

    frame: int
    hits: int  # radiation-hit pixels of the previous frame (known one frame late)
    hits_unique_id: int
    hits_time: float
    read_noise_dn: float
    offset_dn: float
    radiation_rate_hz: float  # hit pixels per second over the last closed window (0 without timestamps)
    window: WindowResult | None = None


@dataclass
class _Lines:
    """The bad lines along one axis (columns: axis 0 of the frame runs along them)."""

    n: int
    state: np.ndarray = field(init=False)
    streak: np.ndarray = field(init=False)
    kind: np.ndarray = field(init=False)  # HOT or DEAD
    baseline: np.ndarray | None = None
    seen: dict[int, Seen] = field(default_factory=dict)
    pending: dict[int, Seen] = field(default_factory=dict)
    by_pixels: np.ndarray = field(init=False)  # lines bad because enough of their pixels are in the map

    def __post_init__(self) -> None:
        self.state = np.zeros(self.n, bool)
        self.streak = np.zeros(self.n, np.uint8)
        self.kind = np.zeros(self.n, np.uint8)
        self.by_pixels = np.zeros(self.n, bool)

    @property
    def bad(self) -> np.ndarray:
        return self.state | self.by_pixels


def judge(counts: HealthCounts, limits: HealthLimits, radiation_rate_hz: float = 0.0,
          read_noise_dn: float = 0.0) -> tuple[int, str]:
    """The camera's health level (0 OK, 1 DEGRADED, 2 BAD) and why: the worst of the limited quantities."""
    values = {"new_bad_pixels": counts.new_bad_pixels, "new_bad_lines": counts.new_bad_lines,
              "bad_pixels": counts.bad_pixels, "bad_lines": counts.bad_lines,
              "radiation_rate_hz": radiation_rate_hz, "read_noise_dn": read_noise_dn}
    level, reasons = 0, []
    for name, value in values.items():
        lim: Limit = getattr(limits, name)
        for lv, bound, word in ((2, lim.major, "major"), (1, lim.minor, "minor")):
            if bound is not None and value >= bound:
                level = max(level, lv)
                reasons.append((lv, f"{name} {value:g} >= {word} {bound:g}"))
                break
    if not reasons:
        return 0, "OK"
    reasons.sort(key=lambda r: -r[0])
    return level, f"{HEALTH_NAMES[level]}: " + "; ".join(text for _, text in reasons)


class HealthTracker:
    """Per-pixel evidence over frames and the live bad-pixel map of one camera at one frame size.

    Memory: about ten arrays of the frame's size (float32 sums and padded frame, the frame's dtype
    for the window's extremes, uint8 counters and states); per frame about a dozen vectorised
    passes, per window a few dozen.
    """

    def __init__(self, shape: tuple[int, int], config: HealthConfig | None = None, camera: str = "") -> None:
        h, w = (int(v) for v in shape)
        if h < 5 or w < 5:
            raise HealthError(f"frames of {w}x{h}: the health map needs at least 5x5 pixels")
        self.config = config or HealthConfig()
        self.shape = (h, w)
        self.camera = camera
        c = self.config
        self._ratio = centre_to_neighbour_ratio(c.psf_sigma_px)
        self._frame_guard = GuardConfig(impulse_sigma=c.frame_sigma, psf_sigma_px=c.psf_sigma_px)
        self._shape_guard = GuardConfig(impulse_sigma=c.shape_sigma, psf_sigma_px=c.psf_sigma_px)
        self._screen_frame = screen_sigma(c.frame_sigma, self._ratio)
        # the window's evidence
        self._pad = np.zeros((h + 4, w + 4), np.float32)
        self._sum = np.zeros((h, w), np.float32)
        self._excess = np.zeros((h, w), np.float32)  # per pixel, the sum over frames of 4 (c - mean4), clipped
        self._hot_n = np.zeros((h, w), np.uint8)
        self._dead_n = np.zeros((h, w), np.uint8)
        self._first = np.full((h, w), 255, np.uint8)  # frame of the window a pixel was first flagged in
        self._lo: np.ndarray | None = None
        self._hi: np.ndarray | None = None
        self._integer = True
        self._n = 0
        self._window_meta: list[tuple[int, float]] = []  # (UniqueId, time) of the window's frames
        self._window_hits = 0
        rows = min(_BLOCK_ROWS, h)
        self._blk = [np.empty((rows, w), np.float32) for _ in range(5)]
        self._blk_mask = np.empty((rows, w), bool)
        # hits are judged one frame late: the flags of the last two frames
        self._prev_hot = np.zeros(0, np.int64)
        self._prev2_hot = np.zeros(0, np.int64)
        self._prev_meta = (0, 0.0)
        # the map (persistent)
        self.frames = 0
        self.windows = 0
        self.map = np.zeros((h, w), bool)
        self.kind = np.zeros((h, w), np.uint8)
        self.streak = np.zeros((h, w), np.uint8)
        self.seen: dict[int, Seen] = {}
        self._pending: dict[int, Seen] = {}
        self.columns = _Lines(w)
        self.rows = _Lines(h)
        self.baseline: np.ndarray | None = None
        self.baseline_info = ""
        self.baseline_accepted = False
        self.history: list[list[float]] = []
        self._noise: deque[NoiseModel] = deque(maxlen=_NOISE_KEEP)
        self.noise: NoiseModel | None = None
        self.radiation_rate_hz = 0.0
        self.last_threshold = 0
        self._on_line_cache: np.ndarray | None = None
        # each pixel's own past (window means and excesses): what "changed" is measured against; not saved
        self._ref_mean: np.ndarray | None = None
        self._ref_z: np.ndarray | None = None
        self._ref_age = np.zeros((h, w), np.uint8)  # windows learnt

    # --- per frame ------------------------------------------------------------------------------

    def update(self, frame: np.ndarray, unique_id: int = 0, timestamp: float = 0.0) -> FrameResult:
        """Take one raw frame (2-D, the camera's values); close the window when it is full."""
        f = np.asarray(frame)
        if f.shape != self.shape:
            raise HealthError(f"frame of shape {f.shape}, the map is for {self.shape}")
        if f.dtype.kind not in "iuf":
            raise HealthError(f"frames of dtype {f.dtype}: expected integers or floats")
        w = self.shape[1]
        pad = self._pad
        centre = pad[2:-2, 2:-2]
        np.copyto(centre, f, casting="unsafe")
        if f.dtype.kind == "f" and not np.isfinite(centre).all():
            raise HealthError("frame with NaN or Inf values")
        _reflect(pad)
        if self.noise is None or self.frames % self.config.noise_every == 0:
            self._noise.append(measure_noise(centre, max_pairs=_NOISE_PAIRS))
            self.noise = _median_noise(self._noise)
        noise = self.noise
        if self._n == 0:
            self._lo, self._hi = f.copy(), f.copy()
            self._integer = f.dtype.kind in "iu"
        else:
            if f.dtype != self._lo.dtype:  # the camera's data type changed mid-window (UInt16 → Float32, ...):
                wide = np.promote_types(self._lo.dtype, f.dtype)  # the bounds in a type that holds both
                if wide != self._lo.dtype:
                    self._lo, self._hi = self._lo.astype(wide), self._hi.astype(wide)
                self._integer = self._integer and f.dtype.kind in "iu"
            np.minimum(self._lo, f, out=self._lo)
            np.maximum(self._hi, f, out=self._hi)
        self._sum += centre
        # 1. the screen (and each pixel's clipped excess over its neighbours), 2. the guard's test on what it passes
        cand = self._frame_pass(pad, noise)
        cy, cx = cand // w, cand % w
        fc = pad[cy + 2, cx + 2]
        hit, bg = _tests(fc, lambda oy, ox: pad[cy + 2 + oy, cx + 2 + ox], noise, self._frame_guard, line_axes=None)
        hot_idx = cand[hit & (fc > bg)]
        dead_idx = cand[hit & (fc < bg)]
        self._hot_n.ravel()[hot_idx] += 1
        self._dead_n.ravel()[dead_idx] += 1
        flagged = cand[hit]
        first = self._first.ravel()
        first[flagged[first[flagged] == 255]] = self._n
        # 3. radiation: bright flags of the previous frame alone
        prev = self._prev_hot
        lone = np.setdiff1d(np.setdiff1d(prev, self._prev2_hot, assume_unique=True), hot_idx, assume_unique=True)
        lone = lone[~self.map.ravel()[lone]]
        hits, (hits_uid, hits_t) = int(lone.size), self._prev_meta
        self._window_hits += hits
        self._prev2_hot, self._prev_hot, self._prev_meta = prev, hot_idx, (int(unique_id), float(timestamp))
        self._window_meta.append((int(unique_id), float(timestamp)))
        self._n += 1
        self.frames += 1
        window = self._close_window() if self._n >= self.config.window_frames else None
        return FrameResult(frame=self.frames, hits=hits, hits_unique_id=hits_uid, hits_time=hits_t,
                           read_noise_dn=noise.read_dn, offset_dn=noise.offset_dn,
                           radiation_rate_hz=self.radiation_rate_hz, window=window)

    def _frame_pass(self, pad: np.ndarray, noise: NoiseModel) -> np.ndarray:
        """One pass over the frame in blocks of rows: the screen's candidates (flat indices) and, into the
        window's excess sum, each pixel's excess over its four neighbours' mean clipped at
        ``excess_clip_sigma`` of its noise (a transient adds at most that; a defect adds its offset every frame).

        Screen: ``a^2 + b^2 > z^2 sigma^2``, ``a = 2c - l - r``, ``b = 2c - u - d``, sigma the noise at the
        four neighbours' mean level (:func:`screen_sigma`: what the guard's test needs at the least)."""
        h, w = self.shape
        x1, x2, x3, x4, c2 = self._blk
        m = self._blk_mask
        var0 = np.float32(noise.read_dn ** 2 - noise.offset_dn * noise.dn_per_e)
        slope = np.float32(noise.dn_per_e / 4.0)  # per unit of the four neighbours' sum
        floor = np.float32(noise.read_dn ** 2)
        z2 = np.float32(self._screen_frame ** 2)
        clip = np.float32(4.0 * self.config.excess_clip_sigma)  # the excess is held as 4 (c - mean4)
        excess = self._excess
        out = []
        rows = x1.shape[0]
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            k = y1 - y0
            c = pad[2 + y0:2 + y1, 2:-2]
            b1, b2, b3, b4, cc, mk = x1[:k], x2[:k], x3[:k], x4[:k], c2[:k], m[:k]
            np.add(c, c, out=cc)
            np.add(pad[2 + y0:2 + y1, 1:-3], pad[2 + y0:2 + y1, 3:-1], out=b1)  # l + r
            np.add(pad[1 + y0:1 + y1, 2:-2], pad[3 + y0:3 + y1, 2:-2], out=b2)  # u + d
            np.subtract(cc, b1, out=b3)  # a
            np.subtract(cc, b2, out=b4)  # b
            np.add(b1, b2, out=b1)  # the four neighbours' sum
            np.add(b3, b4, out=cc)  # 4 (c - mean4)
            np.multiply(b3, b3, out=b3)
            np.multiply(b4, b4, out=b4)
            np.add(b3, b4, out=b3)  # a^2 + b^2
            np.multiply(b1, slope, out=b1)  # sigma^2 at the neighbours' level
            np.add(b1, var0, out=b1)
            np.maximum(b1, floor, out=b1)
            np.multiply(b1, z2, out=b2)
            np.greater(b3, b2, out=mk)
            if mk.any():
                out.append(np.flatnonzero(mk) + y0 * w)
            np.sqrt(b1, out=b1)
            np.multiply(b1, clip, out=b1)
            np.minimum(cc, b1, out=cc)
            np.negative(b1, out=b1)
            np.maximum(cc, b1, out=cc)
            excess[y0:y1] += cc
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    # --- per window -----------------------------------------------------------------------------

    def _close_window(self) -> WindowResult:
        c = self.config
        h, w = self.shape
        n, pixels = self._n, h * w
        noise = self.noise
        assert noise is not None and self._lo is not None and self._hi is not None
        rate = self._window_hits / (n * pixels)
        thr = binomial_threshold(n, max(c.transient_rate_floor, 2.0 * rate), pixels, c.false_entries)
        self.last_threshold = thr
        times = [t for _, t in self._window_meta if t > 0]
        period = (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 2 else 0.0
        self.radiation_rate_hz = self._window_hits / (n * period) if period > 0 else 0.0
        hot_n, dead_n = self._hot_n, self._dead_n
        lo, hi = self._lo, self._hi
        # the window's mean, each pixel's highest and lowest frame left out (a transient in one frame is gone)
        pad, centre = self._pad, self._pad[2:-2, 2:-2]
        np.subtract(self._sum, hi, out=centre, casting="unsafe")
        centre -= lo
        centre *= np.float32(1.0 / (n - 2))
        _reflect(pad)
        spatial = measure_noise(centre, max_pairs=_NOISE_PAIRS)  # the fixed pattern and what is left of the noise
        mean_noise = _MeanNoise(spatial, noise, np.float32(1.0 / math.sqrt(n - 2)))
        line_z = [self._line_z(pad, axis) for axis in (0, 1)]  # columns, rows
        # how far each pixel stood from its neighbours, frame by frame (clipped), in its noise units, against
        # the spread of that over the whole frame (robust): the fixed pattern is part of the population
        level = 0.25 * (pad[2:-2, 1:-3] + pad[2:-2, 3:-1] + pad[1:-3, 2:-2] + pad[3:-1, 2:-2])
        z_raw = self._excess / (np.float32(4 * n) * noise.sigma(level))
        z = z_raw.copy()
        spread = _normalise_by_level(z, level)  # in place: robust standard deviations of pixels of the same level
        far = np.flatnonzero(np.abs(z) > c.mean_sigma)
        sharp_hot, sharp_dead = self._shape_test(pad, far, mean_noise, self._shape_guard)
        zr = z.ravel()
        mean_hot = sharp_hot[zr[sharp_hot] > 0]
        mean_dead = sharp_dead[zr[sharp_dead] < 0]
        # the change: this window against the pixel's own past (the fixed pattern and a steady scene cancel)
        mean_img = centre.copy()
        dz = None
        if self._ref_mean is not None:
            dz = z_raw - self._ref_z
            _normalise_by_level(dz, level)
            # judged only where the past was unremarkable: next to a bright point of the scene the clipped excess
            # follows the light around it, and a defect already there is the other tests' business
            past = self._ref_z.copy()
            _normalise_by_level(past, level)
            valid = (self._ref_age >= _REF_WINDOWS) & (np.abs(past) < c.mean_sigma / 2)
            # and not next to a known defect (or one on its way in): its light is in the neighbours' excess
            known = self.map | self.on_line() | (self.streak > 0) | (hot_n.astype(np.int16) + dead_n >= 2)
            known.ravel()[mean_hot] = True
            known.ravel()[mean_dead] = True
            valid &= ~(_grow(known) & ~known)
            # and it must stand out of its neighbours now, the same way, by half the excess test's bar
            moved = np.flatnonzero((np.abs(dz) > c.mean_sigma) & valid & (dz * z > 0) & (np.abs(z) > c.mean_sigma / 2))
            ref_frames = n * (2.0 - _REF_RATE) / _REF_RATE  # an exponential mean's frames
            change_sigma = noise.sigma(level) * np.float32(math.sqrt(1.0 / (n - 2) + 1.0 / ref_frames))
            ch_hot, ch_dead = self._lone_changes(mean_img - self._ref_mean, moved, change_sigma)
            dzr = dz.ravel()
            mean_hot = np.union1d(mean_hot, ch_hot[dzr[ch_hot] > 0])
            mean_dead = np.union1d(mean_dead, ch_dead[dzr[ch_dead] < 0])
        # the stuck test
        if self._integer:
            rng = hi.astype(np.int64) - lo
            varied = rng >= 2
        else:
            rng = (hi - lo).astype(np.float32)
            varied = rng > 0
        v = np.pad(varied, 1).astype(np.uint8)
        nb_varied = v[:-2, 1:-1] + v[2:, 1:-1] + v[1:-1, :-2] + v[1:-1, 2:]
        observable_stuck = nb_varied >= 3
        stuck = (rng == 0) & observable_stuck & (hi < hi.max())
        # verdicts
        evidence_dead = dead_n >= thr
        evidence_dead.ravel()[mean_dead] = True
        evidence_hot = hot_n >= thr
        evidence_hot.ravel()[mean_hot] = True
        bad = evidence_hot | evidence_dead | stuck
        flags_n = hot_n.astype(np.int16) + dead_n
        good = ~bad & (2 * flags_n < max(thr, 2)) & (np.abs(z) < c.mean_sigma / 2)
        if dz is not None:  # and back to its own normal, where that is known
            good &= (np.abs(dz) < c.mean_sigma / 2) | (self._ref_age < _REF_WINDOWS)
        mi = np.flatnonzero(self.map)
        if mi.size:
            gr = good.ravel()
            kinds = self.kind.ravel()[mi]
            gr[mi[(kinds == STUCK) & ~observable_stuck.ravel()[mi]]] = False
            dead_mi = mi[kinds == DEAD]
            if dead_mi.size:  # a dead pixel is seen only in light
                lv = level.ravel()[dead_mi]
                visible = (lv - noise.offset_dn) > c.mean_sigma * spread.ravel()[dead_mi] * noise.sigma(lv)
                gr[dead_mi[~visible]] = False
        entered, left = self._advance(bad, good, evidence_hot, evidence_dead, stuck)
        self._update_reference(mean_img, z_raw, bad, noise.sigma(level) * np.float32(3.0 / math.sqrt(n - 2)),
                               3.0 * 1.25 / math.sqrt(n))
        lines_entered = lines_left = 0
        for lines, lz in ((self.columns, line_z[0]), (self.rows, line_z[1])):
            e, lft = self._advance_lines(lines, lz)
            lines_entered += e
            lines_left += lft
        need = max(8, int(math.ceil(c.line_min_fraction * h)))
        self.columns.by_pixels = np.count_nonzero(self.map, axis=0) >= need
        need = max(8, int(math.ceil(c.line_min_fraction * w)))
        self.rows.by_pixels = np.count_nonzero(self.map, axis=1) >= need
        self._on_line_cache = None
        self.windows += 1
        baseline_set = False
        if self.baseline is None and self.windows >= c.baseline_windows:
            self._take_baseline(f"automatic, after the first {self.frames} frames", accepted=False)
            baseline_set = True
        counts = self.counts()
        last_t = times[-1] if times else 0.0
        self.history.append([float(v) for v in (self.frames, last_t, counts.hot, counts.dead, counts.stuck,
                                                counts.bad_columns, counts.bad_rows, counts.new_bad_pixels,
                                                counts.new_bad_lines, self.radiation_rate_hz, noise.read_dn,
                                                noise.offset_dn, thr)])
        if len(self.history) > HISTORY_MAX:
            self.history = self.history[::2]
        result = WindowResult(window=self.windows, frames=self.frames, entered=entered, left=left,
                              lines_entered=lines_entered, lines_left=lines_left, count_threshold=thr,
                              transient_rate=rate, counts=counts, baseline_set=baseline_set)
        self._start_window()
        return result

    def _lone_changes(self, change: np.ndarray, idx: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of ``idx``, the pixels whose change (this window's mean less their past's) is their own: it exceeds
        the median change of their four neighbours by ``mean_sigma`` of its noise (``sigma``: the frames' over
        the square root of the frames both means hold), and those neighbours changed, over the four pixels
        beyond them, by less than half the light the narrowest optics would spill into them (``1/2R``): a
        scene that brightens changes a neighbourhood, a new point of light its neighbours too. Medians, so
        that one strong defect next door is not taken for its neighbours' change. Returns the brighter and
        the darker ones; either must also lie beyond the changes of all eight pixels around it, by
        ``shape_sigma`` of its noise (one on the edge of a changed region lies between them)."""
        if idx.size == 0:
            return idx, idx
        h, w = self.shape
        cy, cx = idx // w, idx % w

        def at(dy: int, dx: int) -> np.ndarray:
            return change[np.clip(cy + dy, 0, h - 1), np.clip(cx + dx, 0, w - 1)]

        from cdae.engine.guard import _median4

        ring = [at(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
        near = _median4(ring[3], ring[4], ring[1], ring[6])[1]  # left, right, up, down
        far = _median4(at(0, -2), at(0, 2), at(-2, 0), at(2, 0))[1]
        centre = change[cy, cx]
        own = centre - near
        lone = np.abs(near - far) < np.abs(own) / np.float32(2.0 * self._ratio)
        big = np.abs(own) > np.float32(self.config.mean_sigma) * sigma[cy, cx]
        # beyond all eight around it (by shape_sigma of its noise): a pixel on the edge of a change lies between
        # its neighbours' changes
        margin = np.float32(self.config.shape_sigma) * sigma[cy, cx]
        above = centre > np.max(ring, axis=0) + margin
        below = centre < np.min(ring, axis=0) - margin
        return idx[big & lone & above], idx[big & lone & below]

    def _update_reference(self, mean_img: np.ndarray, z_raw: np.ndarray, bad: np.ndarray, step_dn: np.ndarray,
                          step_z: float) -> None:
        """The pixels' own past, an exponential mean over windows (rate ``_REF_RATE``), learnt only while a pixel
        is out of the map and not on its way in (a new defect is not learnt as normal while it is judged), a
        window's pull on it clipped at three of the mean's noise (``step_dn``, ``step_z``: a glint over two
        frames of one window must not become the pixel's past); a pixel that leaves the map learns its past
        again from scratch."""
        out = ~(bad | self.map | (self.streak > 0))
        if self._ref_mean is None:
            self._ref_mean, self._ref_z = mean_img, z_raw
            self._ref_age = out.astype(np.uint8)
            return
        fresh = out & (self._ref_age == 0)  # (re)starting: the window itself
        self._ref_mean[fresh] = mean_img[fresh]
        self._ref_z[fresh] = z_raw[fresh]
        r = np.float32(_REF_RATE)
        learn = out & ~fresh
        for ref, now, limit in ((self._ref_mean, mean_img, step_dn), (self._ref_z, z_raw, np.float32(step_z))):
            step = now - ref
            np.clip(step, -limit, limit, out=step)
            step *= r
            step[~learn] = 0
            ref += step
        self._ref_age[out] = np.minimum(self._ref_age[out], 254) + 1

    def _forget_reference(self, idx: np.ndarray) -> None:
        if self._ref_mean is not None:
            self._ref_age.ravel()[idx] = 0

    def _start_window(self) -> None:
        for a in (self._sum, self._excess, self._hot_n, self._dead_n):
            a.fill(0)
        self._first.fill(255)
        self._lo = self._hi = None
        self._n = 0
        self._window_meta = []
        self._window_hits = 0

    def _shape_test(self, pad: np.ndarray, idx: np.ndarray, noise: _MeanNoise,
                    config: GuardConfig) -> tuple[np.ndarray, np.ndarray]:
        """The guard's impulse test (sharper than the optics allow) on the window's mean (in ``pad``) at
        ``idx``, against the mean's noise; returns the hot and the dead ones among ``idx``."""
        if idx.size == 0:
            return idx, idx
        w = self.shape[1]
        cy, cx = idx // w, idx % w
        vals = pad[cy + 2, cx + 2]
        hit, bg = _tests(vals, lambda oy, ox: pad[cy + 2 + oy, cx + 2 + ox], noise, config,  # type: ignore[arg-type]
                         line_axes=None)
        return idx[hit & (vals > bg)], idx[hit & (vals < bg)]

    def _line_z(self, pad: np.ndarray, axis: int) -> np.ndarray:
        """Per line (``axis`` 0: columns, 1: rows), how far the window's mean along it stands above (or below)
        *both* neighbouring lines, the median along the line of each difference, the smaller in size, in the
        noise of that median (from the differences' own spread along the line); 0 where its neighbours
        carry the light the optics would spill into them.

        A bad column is brighter (darker) than the columns on either side all along; a real edge is so on one
        side only; a real line, however thin, spills at least ``1/R`` of its excess into each neighbour (the
        guard's optics): a line is the sensor's unless both neighbours, over the ones beyond them, carry at
        least half that (``E / 2R``). Near the noise a thin real line can pass for a bad one: the price of
        seeing faint bad columns (the guard's line test takes the same)."""
        h, w = self.shape
        length = h if axis == 0 else w
        step = max(1, length // 128)  # at most ~128 positions along each line: the median's noise is small anyway
        m = pad[2:2 + h:step, :] if axis == 0 else pad[:, 2:2 + w:step].T  # lines along axis 1 here, padded
        diff = m[:, 1:] - m[:, :-1]  # diff[:, j] = M[j+1] - M[j] over padded line index j
        d = np.median(diff, axis=0)
        # each difference's own spread along the line (the noise left in the mean, the fixed pattern, the scene):
        # the noise of its median, measured rather than modelled
        spread = MAD_TO_SIGMA * np.median(np.abs(diff - d), axis=0) * (1.2533 / math.sqrt(m.shape[0]))
        spread = np.maximum(spread, 1e-3)
        n = m.shape[1] - 4
        e_l, e_r = d[1:n + 1], -d[2:n + 2]  # the line over its left (upper) and right (lower) neighbour
        s_l, s_r = d[0:n], -d[3:n + 3]  # each neighbour over the one beyond it
        sigma_e = np.maximum(spread[1:n + 1], spread[2:n + 2])
        r2 = 2.0 * self._ratio
        hot = np.minimum(e_l, e_r)
        dead = np.maximum(e_l, e_r)
        hot_sensor = (s_l < e_l / r2) | (s_r < e_r / r2)  # not both neighbours lit by it (spill is positive)
        dead_sensor = (s_l > e_l / r2) | (s_r > e_r / r2)  # (a dark line's spill is negative)
        z = np.where((hot > 0) & hot_sensor, hot, np.where((dead < 0) & dead_sensor, dead, 0.0)) / sigma_e
        return z.astype(np.float32)

    def _advance(self, bad: np.ndarray, good: np.ndarray, evidence_hot: np.ndarray, evidence_dead: np.ndarray,
                 stuck: np.ndarray) -> tuple[int, int]:
        """One window's verdicts into the streaks and the map (the enter and leave rule)."""
        c = self.config
        inside, s = self.map, self.streak
        out = ~inside
        start = out & bad & (s == 0)
        self._remember_starts(np.flatnonzero(start))
        s16 = s.astype(np.int16)
        up_out = np.where(bad, s16 + 1, 0)  # out of the map: consecutive BAD windows, any other breaks the run
        up_in = np.where(good, s16 + 1, np.where(bad, 0, s16))
        new = np.where(out, up_out, up_in)
        enter = out & (new >= c.enter_windows)
        leave = inside & (new >= c.leave_windows)
        kind_now = np.zeros(self.shape, np.uint8)
        kind_now[evidence_dead] = DEAD
        kind_now[evidence_hot] = HOT
        kind_now[stuck] = STUCK
        upd = bad & (inside | enter)
        self.kind[upd] = kind_now[upd]
        new[enter | leave] = 0
        np.minimum(new, 255, out=new)
        self.streak = new.astype(np.uint8)
        self.map = (inside | enter) & ~leave
        self.kind[leave] = GOOD
        br, mr = bad.ravel(), self.map.ravel()
        for k in [k for k in self._pending if not br[k] and not mr[k]]:
            del self._pending[k]
        for k in np.flatnonzero(enter).tolist():
            self.seen[k] = self._pending.pop(k, None) or self._window_start_seen()
        for k in np.flatnonzero(leave).tolist():
            self.seen.pop(k, None)
        self._forget_reference(np.flatnonzero(leave))
        return int(np.count_nonzero(enter)), int(np.count_nonzero(leave))

    def _remember_starts(self, idx: np.ndarray) -> None:
        first = self._first.ravel()[idx]
        base = self.frames - self._n + 1
        for k, off in zip(idx.tolist(), first.tolist()):
            off = 0 if off == 255 else off
            uid, t = self._window_meta[off]
            self._pending[k] = Seen(frame=base + off, unique_id=uid, time=t)

    def _window_start_seen(self) -> Seen:
        uid, t = self._window_meta[0] if self._window_meta else (0, 0.0)
        return Seen(frame=self.frames - self._n + 1, unique_id=uid, time=t)

    def _advance_lines(self, lines: _Lines, z: np.ndarray) -> tuple[int, int]:
        c = self.config
        bad = np.abs(z) > c.line_sigma
        good = np.abs(z) < c.line_sigma / 2
        s16 = lines.streak.astype(np.int16)
        out = ~lines.state
        for k in np.flatnonzero(out & bad & (s16 == 0)).tolist():
            lines.pending[k] = self._window_start_seen()
        new = np.where(out, np.where(bad, s16 + 1, 0),
                       np.where(good, s16 + 1, np.where(bad, 0, s16)))
        enter = out & (new >= c.enter_windows)
        leave = lines.state & (new >= c.leave_windows)
        upd = bad & (lines.state | enter)
        lines.kind[upd] = np.where(z[upd] > 0, HOT, DEAD)
        new[enter | leave] = 0
        lines.streak = np.minimum(new, 255).astype(np.uint8)
        lines.state = (lines.state | enter) & ~leave
        for k in [k for k in lines.pending if not bad[k] and not lines.state[k]]:
            del lines.pending[k]
        for k in np.flatnonzero(enter).tolist():
            lines.seen[k] = lines.pending.pop(k, None) or self._window_start_seen()
        for k in np.flatnonzero(leave).tolist():
            lines.seen.pop(k, None)
        return int(np.count_nonzero(enter)), int(np.count_nonzero(leave))

    # --- the map ----------------------------------------------------------------------------------

    def on_line(self) -> np.ndarray:
        """(H, W) bool: the pixels of bad columns and rows."""
        if self._on_line_cache is None:
            self._on_line_cache = np.logical_or.outer(self.rows.bad, self.columns.bad)
        return self._on_line_cache

    def counts(self) -> HealthCounts:
        on_line = self.on_line()
        point = self.map & ~on_line
        kinds = self.kind[point]
        new_px = new_lines = 0
        if self.baseline is not None:
            new_px = int(np.count_nonzero(point & ~self.baseline))
            for lines in (self.columns, self.rows):
                base = lines.baseline if lines.baseline is not None else np.zeros(lines.n, bool)
                new_lines += int(np.count_nonzero(lines.bad & ~base))
        return HealthCounts(hot=int(np.count_nonzero(kinds == HOT)), dead=int(np.count_nonzero(kinds == DEAD)),
                            stuck=int(np.count_nonzero(kinds == STUCK)),
                            bad_columns=int(np.count_nonzero(self.columns.bad)),
                            bad_rows=int(np.count_nonzero(self.rows.bad)),
                            new_bad_pixels=new_px, new_bad_lines=new_lines,
                            map_pixels=int(np.count_nonzero(self.map | on_line)))

    def map_image(self) -> np.ndarray:
        """(H, W) uint8 codes: GOOD, HOT, DEAD, STUCK, LINE, SUSPECT (evidence, not yet in the map); +NEW
        where a defect is not in the baseline."""
        on_line = self.on_line()
        img = np.where(self.map, self.kind, np.uint8(GOOD)).astype(np.uint8)
        img[~self.map & (self.streak > 0)] = SUSPECT
        img[on_line] = LINE
        if self.baseline is not None:
            img[self.map & ~on_line & ~self.baseline] |= NEW
            for lines, axis in ((self.columns, 1), (self.rows, 0)):
                base = lines.baseline if lines.baseline is not None else np.zeros(lines.n, bool)
                fresh = lines.bad & ~base
                if fresh.any():
                    if axis == 1:
                        img[:, fresh] |= NEW
                    else:
                        img[fresh, :] |= NEW
        return img

    def bad_pixel_map(self, source: str = "") -> BadPixelMap:
        """The map as an areaDetector NDPluginBadPixel map: pixels filled with the median of their 3x3 box,
        a bad column's from its left and right neighbours (Median [1, 0]), a bad row's from above and below."""
        return map_from_image(self.map_image(), source=source or f"cdae health {self.camera}".strip())

    def _take_baseline(self, info: str, accepted: bool) -> None:
        self.baseline = self.map & ~self.on_line()
        for lines in (self.columns, self.rows):
            lines.baseline = lines.bad.copy()
        self.baseline_info = info
        self.baseline_accepted = accepted

    def accept_baseline(self, who: str = "operator") -> str:
        """The map as it is now becomes the baseline NewBadPixels and NewBadLines count from."""
        counts = self.counts()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        self._take_baseline(f"accepted by {who} {stamp} at frame {self.frames}: {counts.bad_pixels} pixels, "
                            f"{counts.bad_lines} lines", accepted=True)
        return self.baseline_info

    def reset(self) -> None:
        """Forget the map, its baseline and every piece of evidence (a new camera head)."""
        self.__init__(self.shape, self.config, self.camera)  # type: ignore[misc]

    def pixel_list(self, history: int = 256) -> dict[str, object]:
        """The map's defects with when each was first seen, and the last ``history`` windows' counts (JSON-ready)."""
        w = self.shape[1]
        on_line = self.on_line().ravel()
        base = None if self.baseline is None else self.baseline.ravel()
        pixels = []
        for k in np.flatnonzero(self.map.ravel() & ~on_line).tolist():
            s = self.seen.get(k)
            pixels.append({"x": k % w, "y": k // w, "kind": KIND_NAMES.get(int(self.kind.ravel()[k]), "?"),
                           "new": bool(base is not None and not base[k]),
                           "first_frame": s.frame if s else None, "first_unique_id": s.unique_id if s else None,
                           "first_time": s.time if s else None})
        lines = []
        for axis, ls in (("column", self.columns), ("row", self.rows)):
            base_l = ls.baseline if ls.baseline is not None else None
            for k in np.flatnonzero(ls.bad).tolist():
                s = ls.seen.get(k)
                lines.append({"axis": axis, "index": k, "kind": "by pixels" if not ls.state[k] else
                              KIND_NAMES.get(int(ls.kind[k]), "?"), "new": bool(base_l is not None and not base_l[k]),
                              "first_frame": s.frame if s else None, "first_unique_id": s.unique_id if s else None,
                              "first_time": s.time if s else None})
        return {"camera": self.camera, "shape": list(self.shape), "frames": self.frames, "windows": self.windows,
                "baseline": self.baseline_info, "pixels": pixels, "lines": lines,
                "history_columns": list(HISTORY_COLUMNS), "history": self.history[-history:]}

    # --- persistence ------------------------------------------------------------------------------

    def save(self, path: Path | str) -> Path:
        """Write the map, its evidence streaks, baseline, first-seen records and history (atomically)."""
        path = Path(path)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "shape": list(self.shape), "camera": self.camera,
                "frames": self.frames, "windows": self.windows, "baseline_info": self.baseline_info,
                "baseline_accepted": self.baseline_accepted,
                "noise": None if self.noise is None else [self.noise.read_dn, self.noise.dn_per_e, self.noise.offset_dn],
                "radiation_rate_hz": self.radiation_rate_hz, "saved": time.time()}
        arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
                                         "map": self.map, "kind": self.kind, "streak": self.streak,
                                         "history": np.asarray(self.history, np.float64).reshape(-1, 13)}
        if self.baseline is not None:
            arrays["baseline"] = self.baseline
        arrays.update(_seen_arrays("seen", self.seen))
        arrays.update(_seen_arrays("pending", self._pending))
        for name, ls in (("columns", self.columns), ("rows", self.rows)):
            arrays[f"{name}_state"], arrays[f"{name}_streak"], arrays[f"{name}_kind"] = ls.state, ls.streak, ls.kind
            arrays[f"{name}_by_pixels"] = ls.by_pixels
            if ls.baseline is not None:
                arrays[f"{name}_baseline"] = ls.baseline
            arrays.update(_seen_arrays(f"{name}_seen", ls.seen))
            arrays.update(_seen_arrays(f"{name}_pending", ls.pending))
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str, config: HealthConfig | None = None, camera: str | None = None) -> HealthTracker:
        """A tracker from a file :meth:`save` wrote (the window in progress when it was saved is not kept)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            meta = json.loads(bytes(data["meta"]).decode())
        except (OSError, ValueError, KeyError) as e:
            raise HealthError(f"{path}: not a health state file ({e})") from e
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise HealthError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
                              f"expected {FORMAT!r} version {FORMAT_VERSION}")
        shape = tuple(int(v) for v in meta["shape"])
        t = cls(shape, config, meta.get("camera", "") if camera is None else camera)  # type: ignore[arg-type]
        try:
            for name in ("map", "kind", "streak"):
                if data[name].shape != shape:
                    raise HealthError(f"{path}: {name} has shape {data[name].shape}, expected {shape}")
            t.map, t.kind, t.streak = data["map"].astype(bool), data["kind"].astype(np.uint8), data["streak"].astype(np.uint8)
            t.baseline = data["baseline"].astype(bool) if "baseline" in data else None
            t.seen, t._pending = _seen_dict(data, "seen"), _seen_dict(data, "pending")
            for name, ls in (("columns", t.columns), ("rows", t.rows)):
                ls.state = data[f"{name}_state"].astype(bool)
                ls.streak = data[f"{name}_streak"].astype(np.uint8)
                ls.kind = data[f"{name}_kind"].astype(np.uint8)
                ls.by_pixels = data[f"{name}_by_pixels"].astype(bool)
                if ls.state.shape != (ls.n,):
                    raise HealthError(f"{path}: {name} of length {ls.state.shape}, expected {ls.n}")
                ls.baseline = data[f"{name}_baseline"].astype(bool) if f"{name}_baseline" in data else None
                ls.seen, ls.pending = _seen_dict(data, f"{name}_seen"), _seen_dict(data, f"{name}_pending")
        except KeyError as e:
            raise HealthError(f"{path}: missing {e}") from e
        t.frames, t.windows = int(meta["frames"]), int(meta["windows"])
        t.baseline_info, t.baseline_accepted = str(meta["baseline_info"]), bool(meta["baseline_accepted"])
        t.history = data["history"].tolist()
        t.radiation_rate_hz = float(meta.get("radiation_rate_hz", 0.0))
        if meta.get("noise"):
            r, g, off = meta["noise"]
            t.noise = NoiseModel(read_dn=r, dn_per_e=g, offset_dn=off, measured=True)
            t._noise.append(t.noise)
        return t


def map_from_image(img: np.ndarray, source: str = "<health map>") -> BadPixelMap:
    """An NDPluginBadPixel map from a health map image (:meth:`HealthTracker.map_image` codes; what
    ``HealthMap:ArrayData`` serves): every HOT, DEAD, STUCK and LINE pixel, with its fill."""
    from cdae.engine.badpixels import MAX_PIXELS

    codes = np.asarray(img, np.uint8) & np.uint8(~NEW & 0xFF)
    listed = np.isin(codes, (HOT, DEAD, STUCK, LINE))
    line = codes == LINE
    h, w = codes.shape
    # a line pixel is filled across its line: a column (most of its column is LINE) from left and right
    col_line = line & (np.count_nonzero(line, axis=0) * 2 >= h)[None, :]
    row_line = line & (np.count_nonzero(line, axis=1) * 2 >= w)[:, None]
    y, x = np.nonzero(listed)
    if x.size > MAX_PIXELS:
        raise HealthError(f"the health map lists {x.size} pixels, more than an NDPluginBadPixel map may ({MAX_PIXELS})")
    is_col, is_row = col_line[y, x], row_line[y, x]
    a = np.where(is_col & ~is_row, 1.0, np.where(is_row & ~is_col, 0.0, 1.0))
    b = np.where(is_col & ~is_row, 0.0, 1.0)
    return BadPixelMap(x.astype(np.int64), y.astype(np.int64), np.zeros(x.size, np.int8), a, b, source)


def state_path(state_dir: Path | str, camera: str, shape: tuple[int, int]) -> Path:
    """Where a camera's map at one frame size is kept: ``STATE_DIR/health-CAMERA-WxH.npz``."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in camera).strip("_") or "camera"
    h, w = shape
    return Path(state_dir) / f"health-{safe}-{w}x{h}.npz"


def _reflect(pad: np.ndarray) -> None:
    """Fill the 2-pixel border of a padded frame with the frame's edge mirrored, edge pixels repeated
    (numpy's 'symmetric'): an edge pixel's missing neighbour is itself, so a defect next to the edge
    is never doubled into a false partner (as 'reflect' would)."""
    pad[:2, 2:-2] = pad[3:1:-1, 2:-2]
    pad[-2:, 2:-2] = pad[-3:-5:-1, 2:-2]
    pad[:, :2] = pad[:, 3:1:-1]
    pad[:, -2:] = pad[:, -3:-5:-1]


def _normalise_by_level(z: np.ndarray, level: np.ndarray, bins: int = 8, samples: int = 1 << 14) -> np.ndarray:
    """``z`` (in place) as robust standard scores among the pixels of about its ``level``: the median and MAD
    of a sample of pixels per equal-count level bin, each a straight line in level through the bins (a
    least-squares fit). Returns the spread per pixel.

    The fixed pattern a defect must stand out from grows with the level (PRNU is a share of the light);
    a bright scene region must not make the dark ones look clean, nor the other way."""
    step = max(1, int(math.sqrt(z.size / samples)))
    zs, ls = z[::step, ::step].ravel(), level[::step, ::step].ravel()
    order = np.argsort(ls, kind="stable")
    centres, meds, mads = [], [], []
    for idx in np.array_split(order, bins):
        if idx.size < 16:
            continue
        v = zs[idx]
        m = float(np.median(v))
        centres.append(float(np.median(ls[idx])))
        meds.append(m)
        mads.append(mad_sigma(v, m))
    if len(centres) < 2 or np.ptp(centres) <= 0:
        med, spread = (float(np.median(zs)), max(mad_sigma(zs), 1e-6)) if zs.size else (0.0, 1.0)
        z -= np.float32(med)
        z /= np.float32(spread)
        return np.full(z.shape, spread, np.float32)
    x = np.asarray(centres)
    m1, m0 = np.polyfit(x, meds, 1)
    s1, s0 = np.polyfit(x, mads, 1)
    spread = level * np.float32(s1)
    spread += np.float32(s0)
    np.maximum(spread, np.float32(max(min(mads), 1e-6)), out=spread)  # never below the quietest bin's
    z -= level * np.float32(m1) + np.float32(m0)
    z /= spread
    return spread


def _grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` and its eight-neighbourhood."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    grown = out.copy()
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    return grown


def _median_noise(models: deque[NoiseModel]) -> NoiseModel:
    ms = list(models)
    if len(ms) == 1:
        return ms[0]
    return NoiseModel(read_dn=float(np.median([m.read_dn for m in ms])),
                      dn_per_e=float(np.median([m.dn_per_e for m in ms])),
                      offset_dn=float(np.median([m.offset_dn for m in ms])), measured=True)


def _seen_arrays(name: str, seen: dict[int, Seen]) -> dict[str, np.ndarray]:
    keys = sorted(seen)
    return {f"{name}_idx": np.asarray(keys, np.int64),
            f"{name}_frame": np.asarray([seen[k].frame for k in keys], np.int64),
            f"{name}_uid": np.asarray([seen[k].unique_id for k in keys], np.int64),
            f"{name}_time": np.asarray([seen[k].time for k in keys], np.float64)}


def _seen_dict(data: dict[str, np.ndarray], name: str) -> dict[int, Seen]:
    if f"{name}_idx" not in data:
        return {}
    return {int(k): Seen(frame=int(f), unique_id=int(u), time=float(t))
            for k, f, u, t in zip(data[f"{name}_idx"], data[f"{name}_frame"], data[f"{name}_uid"], data[f"{name}_time"])}
