"""The frame path's pre- and post-processing in torch, on the device the frame was uploaded to.

:func:`cdae.engine.pipeline.denoise_frame` runs normalisation, full-well detection, denormalisation,
the guard and the camera-dtype conversion in NumPy on the host around the network. On a GPU that
costs a host pass over every frame and a float32 round trip per tile; here the same steps run on
the frame already on the device, so one frame goes up once (camera dtype, pinned host buffer) and
comes back once (denoised, residual, defect probability, flags, packed into one buffer). What else
crosses are scalars the host decides with: the percentiles' order statistics, the full-well
search's steps, the noise model's per-bin statistics (its line fit is NumPy's own code), the
count of impulse candidates; each such read waits for the work queued before it.

Each function follows its NumPy counterpart op for op, with the same float32 constants, so that on
the CPU the results are the NumPy path's bit for bit. Exceptions, at rounding level only:

- percentiles and medians select the same order statistics (a sort instead of a partition) and
  interpolate with NumPy's own formula, so they are exact; histogram bins use NumPy's algorithm;
- :func:`find_full_well`'s pair variance is a float64 mean summed in torch's order, not NumPy's
  pairwise order (a last-bit difference in float64, before the level and half-width are cast to
  float32);
- the bad-line test's running mean follows SciPy's ``uniform_filter1d`` (its float64 running sum is
  a sequential cumulative sum on the CPU, exact; a CUDA scan adds in another order, last float64 bit);
- float32 square roots go through float64 (torch's CPU float32 sqrt is not correctly rounded).

Float frames beyond 2^60 take the host path (its float64 fallbacks); so do
dtypes torch has no type for and frames in non-native byte order (the host path keeps their dtype).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from cdae.engine.guard import HEADROOM as GUARD_HEADROOM
from cdae.engine.guard import (
    FLAG_NAMES,
    IMPULSE,
    LEARNED,
    PEAK_RIM,
    SATURATED,
    GuardConfig,
    NoiseModel,
    centre_to_neighbour_ratio,
    evidence_config,
    fit_variance,
    frame_quantum,
)
from cdae.engine.guard import noise_model as host_noise_model
from cdae.engine.normalise import (
    F32_MAX,
    MAX_CAMERA_FULL_SCALE,
    FullWell,
    FullWellSearch,
    NormalisationConfig,
    NormalisationError,
    _below,
    _other_peaks,
    adc_max_for,
    frame_statistics,
    lone_pixels,
    sample_step,
    saturation_mask,
)
from cdae.engine.robust import MAD_TO_SIGMA
from cdae.engine.tiling import Tile, plan_tiles

if TYPE_CHECKING:
    from cdae.engine.badpixels import BadPixelMap
    from cdae.engine.pipeline import FrameResult

Tensor = torch.Tensor

#: Camera dtypes the device path takes (others take the host path) and the torch type that carries each: uint16
#: and uint32 travel as the signed type of their width (the same bytes), since torch's unsigned types beyond uint8
#: lack kernels (casts among them) on some devices.
TORCH_DTYPES: dict[np.dtype, torch.dtype] = {
    np.dtype(k): v for k, v in (
        ("uint8", torch.uint8), ("int8", torch.int8), ("int16", torch.int16), ("uint16", torch.int16),
        ("int32", torch.int32), ("uint32", torch.int32), ("float32", torch.float32), ("float64", torch.float64))
}
_UNSIGNED_MASK = {np.dtype("uint16"): (torch.int32, 0xFFFF), np.dtype("uint32"): (torch.int64, 0xFFFFFFFF)}
_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {v: k for k, v in TORCH_DTYPES.items()
                                              if k.kind != "u" or v == torch.uint8}
_NUMPY_DTYPES[torch.int64] = np.dtype(np.int64)
#: Float frames beyond this magnitude take the host path: (f - offset) / scale could overflow float32 there,
#: and the guard's sums of squares beyond its headroom (the host guard scales such frames exactly).
FLOAT_FRAME_LIMIT = min(F32_MAX / 1e3, GUARD_HEADROOM)


def as_float32(raw: Tensor, dtype: np.dtype) -> Tensor:
    """A carried frame (:data:`TORCH_DTYPES`) as float32, as NumPy converts ``dtype``: unsigned carriers widened
    and masked first."""
    if dtype in _UNSIGNED_MASK:
        wide, mask = _UNSIGNED_MASK[dtype]
        return (raw.to(wide) & mask).to(torch.float32)
    return raw.to(torch.float32)


def as_carrier(values: Tensor, dtype: np.dtype) -> Tensor:
    """Camera values (float, already rounded and clipped into ``dtype``) in ``dtype``'s carrier: the same bytes."""
    if dtype in _UNSIGNED_MASK:
        return values.to(_UNSIGNED_MASK[dtype][0]).to(TORCH_DTYPES[dtype])  # wraps to the signed type's bits
    return values.to(TORCH_DTYPES[dtype])


def _sqrt(t: Tensor) -> Tensor:
    """Correctly rounded float32 square root (NumPy's): torch's vectorised CPU float32 sqrt is not always (a last
    bit off on some inputs); float64 then float32 rounds correctly (53 >= 2 x 24 + 2 bits)."""
    return torch.sqrt(t.to(torch.float64)).to(torch.float32)


def _f32(v: float) -> float:
    """``v`` rounded to float32, as NumPy rounds a constant it applies to a float32 array."""
    return float(np.float32(v))


# --- order statistics, as NumPy computes them ---------------------------------------------------

def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """NumPy's own percentile interpolation (``numpy.lib._function_base_impl._lerp``), on the host scalars."""
    diff_b_a = b - a
    out = np.asanyarray(np.add(a, diff_b_a * t))
    np.subtract(b, diff_b_a * (1 - t), out=out, where=np.asarray(t) >= 0.5, casting="unsafe", dtype=out.dtype)
    return out


def percentile(values: Tensor, q: float | Sequence[float], *, sorted_values: Tensor | None = None) -> np.ndarray:
    """``np.percentile(values, q)`` (linear method) of a 1-D tensor: the same two order statistics, the same
    interpolation, so the same value and dtype (a 0-d array for a scalar ``q``)."""
    n = values.numel()
    weak = type(q) in (int, float)
    quantiles = np.true_divide(np.asanyarray(q) if not weak else q, 100)
    virtual = np.asanyarray((n - 1) * quantiles)
    prev = np.floor(virtual)
    nxt = prev + 1
    prev = np.where(virtual >= n - 1, n - 1, np.where(virtual < 0, 0, prev)).astype(np.intp)
    nxt = np.where(virtual >= n - 1, n - 1, np.where(virtual < 0, 0, nxt)).astype(np.intp)
    gamma: np.ndarray | float = np.asanyarray(virtual - np.floor(virtual), dtype=virtual.dtype)
    s = sorted_values if sorted_values is not None else torch.sort(values.reshape(-1)).values
    idx = torch.as_tensor(np.stack([prev.ravel(), nxt.ravel()]), device=s.device)
    ends = s[idx].cpu().numpy()
    a, b = ends[0].reshape(prev.shape), ends[1].reshape(prev.shape)
    if weak:
        gamma = float(gamma)  # type: ignore[arg-type]
        a, b = a[()], b[()]
    return _lerp(a, b, gamma)


def median(values: Tensor) -> Tensor:
    """``np.median`` of a tensor (flattened): the middle value, or the mean of the two middle ones in its dtype."""
    s = torch.sort(values.reshape(-1)).values
    n = s.numel()
    if n % 2:
        return s[n // 2]
    return (s[n // 2 - 1] + s[n // 2]) / 2


def mad_sigma(a: Tensor, med: float | Tensor | None = None) -> float:
    """:func:`cdae.engine.robust.mad_sigma` of a tensor."""
    if not a.numel():
        return 0.0
    m = median(a) if med is None else med
    return MAD_TO_SIGMA * float(median(torch.abs(a - m)))


def _masked_medians(values: Tensor, valid: Tensor) -> Tensor:
    """Per row of ``values``, ``np.median`` of its ``valid`` entries (rows with none give inf): one sort for all."""
    s = torch.sort(torch.where(valid, values, torch.inf), dim=1).values
    n = valid.sum(dim=1)
    lo = s.gather(1, ((n - 1).clamp(min=0) // 2)[:, None])[:, 0]
    hi = s.gather(1, (n // 2).clamp(max=s.shape[1] - 1)[:, None])[:, 0]
    return torch.where(n % 2 == 1, lo, (lo + hi) / 2)


# --- normalisation ------------------------------------------------------------------------------

def frame_offset_scale(f: Tensor, adc_max: float, config: NormalisationConfig) -> tuple[float, float]:
    """:func:`cdae.engine.normalise.frame_offset_scale` of a float32 frame tensor."""
    s = sample_step(f.shape, config.max_samples)
    sample = f[::s, ::s].reshape(-1)
    if math.isfinite(adc_max):
        unsaturated = sample[sample < _f32(adc_max - 0.5)]
        if unsaturated.numel() >= max(16, sample.numel() // 10):
            sample = unsaturated
    lo_hi = percentile(sample, [config.low_percentile, config.high_percentile])
    lo = float(lo_hi[0])
    span = float(lo_hi[1]) - lo
    full_scale = adc_max if math.isfinite(adc_max) and adc_max <= MAX_CAMERA_FULL_SCALE else \
        max(float(torch.max(torch.abs(sample))), 1.0)
    floor = config.min_scale_fraction * full_scale
    return lo, max(span, floor, 1e-6)


def _pairs(f: Tensor, step: int) -> tuple[Tensor, Tensor]:
    rows = f[::step]
    w = rows.shape[-1]
    return rows[:, 0: w - 1: step].reshape(-1), rows[:, 1:w:step].reshape(-1)


def _pair_variance(a: Tensor, b: Tensor, lo: float, hi: float) -> float:
    d = torch.abs(a - b)[(a >= lo) & (a <= hi) & (b >= lo) & (b <= hi)]
    if d.numel() < 32:
        return math.nan
    return float(torch.mean(torch.clamp(d, max=float(percentile(d, 90.0))) ** 2))


def dark_noise(a: Tensor, b: Tensor) -> float:
    """:func:`cdae.engine.normalise.dark_noise` of float64 pair tensors."""
    if a.numel() < 16:
        return 0.0
    dark = torch.maximum(a, b) <= float(percentile(a, 10.0))
    d = (a - b)[dark]
    return mad_sigma(d) / math.sqrt(2.0) if d.numel() >= 16 else 0.0


def _histogram(a: Tensor, bins: int, first: float, last: float) -> tuple[Tensor, Tensor]:
    """``np.histogram(a, bins, range=(first, last))`` of a float64 tensor: NumPy's edges and bin rule."""
    delta = last - first
    step = delta / bins
    edges = torch.arange(bins + 1, dtype=torch.float64, device=a.device)
    edges = edges / bins * delta if step == 0 else edges * step
    edges += first
    edges[-1] = last
    keep = (a >= first) & (a <= last)
    v = a[keep]
    idx = ((v - first) / delta * bins).to(torch.int64)
    idx[idx == bins] -= 1
    idx[v < edges[idx]] -= 1
    idx[(v >= edges[idx + 1]) & (idx != bins - 1)] += 1
    return torch.bincount(idx, minlength=bins), edges


def find_full_well(f: Tensor, adc_max: float, max_samples: int = 65536, dark_reference: bool = False,
                   search: FullWellSearch | None = None, candidates: int = 1) -> FullWell | None:
    """:func:`cdae.engine.normalise.find_full_well` of a float32 frame tensor (same steps; see the module note)."""
    q = search or FullWellSearch()
    step = sample_step(f.shape, max_samples)
    sample = f[::step, ::step].reshape(-1).to(torch.float64)
    if math.isfinite(adc_max):
        sample = sample[sample < adc_max - 0.5]
    if sample.numel() < 1024:
        return None
    a, b = (v.to(torch.float64) for v in _pairs(f, step))
    noise = max(dark_noise(a, b), 0.5)
    ordered = torch.sort(sample).values
    lo, p80, top = (float(v) for v in percentile(sample, [10, q.band_percentile, 100], sorted_values=ordered))
    band = sample[sample >= p80]
    nbins = int(min(4096, max(1, math.ceil((top - p80) / (2.0 * noise)))))
    counts, edges = _histogram(band - p80, nbins, 0.0, (top - p80) + max(1e-3, 1e-12 * abs(top)))
    k = int(torch.argmax(counts))
    host_counts = counts.cpu().numpy() if candidates > 1 else None
    others = _other_peaks(host_counts, k, q.min_share * sample.numel(), candidates - 1) if host_counts is not None else []
    for c in [k, *others]:
        e = edges[c: c + 2].cpu().numpy()
        found = _full_well_at(p80 + 0.5 * (float(e[0]) + float(e[1])), sample, band, a, b, noise, lo, q,
                              dark_reference, step)
        if found is not None and (c == k or _only_impulses_above(f, found, adc_max)):
            return found
    return None


def _full_well_at(centre: float, sample: Tensor, band: Tensor, a: Tensor, b: Tensor, noise: float, lo: float,
                  q: FullWellSearch, dark_reference: bool, step: int) -> FullWell | None:
    level, half = centre, q.window_sigma * noise
    for _ in range(q.iterations):
        near = band[torch.abs(band - level) <= half]
        if near.numel() < 16:
            return None
        med = median(near)
        new_level, new_half = float(med), q.window_sigma * max(mad_sigma(near, med), 0.5)
        if (new_level, new_half) == (level, half):
            break
        level, half = new_level, new_half
    if level - lo < q.min_height_windows * half:
        return None
    dist = torch.abs(sample - level)
    pixels = int(torch.count_nonzero(dist <= half))
    above = int(torch.count_nonzero(sample > level + half))
    if pixels < max(16, q.min_share * sample.numel()) or above > q.max_above * pixels:
        return None
    inside = _pair_variance(a, b, level - half, level + half)
    below = _pair_variance(a, b, lo + q.reference_band[0] * (level - lo), lo + q.reference_band[1] * (level - lo))
    if math.isnan(below) and dark_reference:
        below = 2.0 * noise * noise * q.max_dark_ratio / q.max_variance_ratio
    if not (0.0 < below and inside <= q.max_variance_ratio * below):
        return None
    half = max(q.window_sigma * math.sqrt(inside / 2.0), 1.0)
    core = sample[torch.abs(sample - level) <= half]
    level = float(median(core))
    return FullWell(level, half, int(torch.count_nonzero(torch.abs(sample - level) <= half)) * step * step)


def _only_impulses_above(f: Tensor, fw: FullWell, adc_max: float) -> bool:
    """:func:`cdae.engine.normalise._only_impulses_above` of a frame tensor: the mask made here, tested on the host
    (only for a pile-up past the first candidate that passed every other test)."""
    above = f > fw.level + fw.half_width
    if math.isfinite(adc_max):
        above &= f < adc_max - 0.5
    return lone_pixels(above.cpu().numpy(), fw)


def detect_full_well(f: Tensor, adc_max: float, config: NormalisationConfig, candidates: int = 1) -> FullWell | None:
    if config.full_well == "off":
        return None
    return find_full_well(f, adc_max, config.max_samples, dark_reference=config.full_well == "detect+dark",
                          search=config.full_well_search, candidates=candidates)


def network_input(f: Tensor, adc_max: float, config: NormalisationConfig,
                  full_well_candidates: int = 1) -> tuple[Tensor, float, float]:
    """:func:`cdae.engine.normalise.network_input` of a float32 (H, W) frame tensor whose normalised values fit
    float32 (the caller's range check: no float64 fallback here)."""
    if f.ndim != 2:
        raise NormalisationError(f"expected a 2-D frame, got shape {tuple(f.shape)}")
    finite = torch.isfinite(f)
    if not bool(finite.all()):
        raise NormalisationError(f"frame contains {int((~finite).sum())} NaN/Inf pixels")
    offset, scale = frame_offset_scale(f, adc_max, config)
    fw = detect_full_well(f, adc_max, config, full_well_candidates)
    return network_input_given(f, adc_max, offset, scale, fw), offset, scale


def network_input_given(f: Tensor, adc_max: float, offset: float, scale: float, fw: FullWell | None) -> Tensor:
    """The (2, H, W) network input of a float32 frame tensor whose offset, scale and full well are known (read on the
    host by :func:`cdae.engine.normalise.frame_statistics`, or on the device by :func:`network_input`)."""
    x = torch.empty((2, *f.shape), dtype=torch.float32, device=f.device)
    torch.sub(f, _f32(offset), out=x[0])
    x[0] *= _f32(1.0 / scale)
    if math.isfinite(adc_max):
        x[1] = (f >= _f32(adc_max - 0.5)).to(torch.float32)
    else:
        x[1] = 0.0
    if fw is not None:
        at = torch.abs(f - _f32(fw.level)) <= _f32(fw.half_width)
        x[1].masked_fill_(at, 1.0)
        x[0].masked_fill_(at, _f32((fw.level - offset) / scale))
    return x


def denormalise(y: Tensor, offset: float, scale: float) -> Tensor:
    """:func:`cdae.engine.normalise.denormalise` for an offset and scale inside float32."""
    out = y.to(torch.float32) * _f32(scale)
    out += _f32(offset)
    return out


def camera_values(out: Tensor, dtype: np.dtype, adc_max: float) -> Tensor:
    """:func:`cdae.engine.normalise.to_dtype`'s values, still float32 for integer types (exact there: rounded,
    clipped inside the type)."""
    if dtype.kind == "f":
        fi = np.finfo(dtype)
        return out.clamp(float(fi.min), float(fi.max)) if dtype == np.float32 else out
    info = np.iinfo(dtype)
    hi = _below(min(float(info.max), adc_max), np.dtype(np.float32))
    lo = _below(float(info.min), np.dtype(np.float32)) if dtype.kind == "i" else 0.0
    return torch.round(out).clamp_(lo, hi)


# --- the guard ----------------------------------------------------------------------------------

class NoiseTensors:
    """A noise model's three constants as float32 scalars on the device (each rounded as NumPy rounds the
    constant it applies): the guard reads them there, so a captured CUDA graph replays with each frame's."""

    def __init__(self, values: Tensor) -> None:
        self.values = values  # (3,): offset, DN per electron, read noise squared
        self.offset, self.dn_per_e, self.read2 = values[0], values[1], values[2]

    @staticmethod
    def host_values(noise: NoiseModel) -> list[float]:
        return [_f32(noise.offset_dn), _f32(noise.dn_per_e), _f32(noise.read_dn**2)]


Noise = NoiseModel | NoiseTensors


def variance(noise: Noise, level: Tensor) -> Tensor:
    """``NoiseModel.variance`` of a float32 tensor (the model's constants as host floats or device scalars: the
    same float32 arithmetic)."""
    if isinstance(noise, NoiseModel):
        offset, dn_per_e, read2 = NoiseTensors.host_values(noise)
    else:
        offset, dn_per_e, read2 = noise.offset, noise.dn_per_e, noise.read2  # type: ignore[assignment]
    var = torch.clamp_min(level - offset, 0.0)
    var *= dn_per_e
    var += read2
    return var


def sigma(noise: Noise, level: Tensor) -> Tensor:
    """``NoiseModel.sigma`` of a float32 tensor."""
    return _sqrt(variance(noise, level))


def measure_noise(f: Tensor, exclude: Tensor | None = None, bins: int = 16, max_pairs: int = 1 << 16,
                  quantum: float = 1.0) -> NoiseModel:
    """:func:`cdae.engine.guard.measure_noise` of a float32 frame tensor; the per-bin medians in one batched sort,
    the line fit on the host on the bins' statistics (the same code)."""
    h, w = f.shape
    by, bx = h // 3, w // 3
    if by < 3 or bx < 1:
        return NoiseModel(read_dn=1.0, dn_per_e=0.0, offset_dn=float(f.min()) if f.numel() else 0.0, measured=True)
    stride = max(1, math.ceil((by - 2) * bx / max_pairs))
    rows = torch.arange(1, by - 1, stride, device=f.device)
    near = torch.stack([rows - 1, rows, rows + 1])
    blocks = f[:3 * by, :3 * bx].reshape(by, 3, bx, 3)[near]
    across = blocks[..., 0] - 2 * blocks[..., 1] + blocks[..., 2]
    d_all = (across[:, :, 0] - 2 * across[:, :, 1] + across[:, :, 2]) * _f32(1 / 6)
    diff = d_all[1]
    sums = blocks[1, ..., 0] + blocks[1, ..., 1] + blocks[1, ..., 2]
    level = (sums[:, 0] + sums[:, 1] + sums[:, 2]) * _f32(1 / 9)
    structure = torch.abs(d_all[0]) + torch.abs(d_all[2])
    if exclude is not None:
        ex = exclude[:3 * by, :3 * bx].reshape(by, 3, bx, 3).any(dim=3).any(dim=1)
        keep = ~(ex[rows] | ex[rows - 1] | ex[rows + 1])
        level, diff, structure = level[keep], diff[keep], structure[keep]
    level, diff, structure = level.reshape(-1), diff.reshape(-1), structure.reshape(-1)
    n = level.numel()
    if n < 64:
        return NoiseModel(read_dn=1.0, dn_per_e=0.0, offset_dn=float(level.min()) if n else 0.0, measured=True)
    bins = max(1, min(bins, n // 64))
    level, order = torch.sort(level, stable=True)
    diff, structure = diff[order], structure[order]
    offset = float(level[int(0.001 * (n - 1))])
    # np.array_split's equal-count bins as rows of one (bins, longest) array
    sizes = (torch.arange(bins, device=f.device) < n % bins).to(torch.int64) + n // bins
    starts = torch.cumsum(sizes, 0) - sizes
    col = torch.arange(n // bins + (1 if n % bins else 0), device=f.device)
    valid = col[None, :] < sizes[:, None]
    idx = (starts[:, None] + col[None, :]).clamp_(max=n - 1)
    lv, d, st = level[idx], diff[idx], structure[idx]
    smooth = valid & (st <= _masked_medians(st, valid)[:, None])
    med_d = _masked_medians(d, smooth)
    mad = _masked_medians(torch.abs(d - med_d[:, None]), smooth)
    med_lv = _masked_medians(lv, smooth)
    stats = torch.stack([med_lv.double(), mad.double(), smooth.sum(dim=1).double()]).cpu().numpy()
    xs, vs, ns = [], [], []
    for x_b, mad_b, n_b in stats.T:
        if n_b < 16:
            continue
        xs.append(float(np.float32(x_b)))
        vs.append((MAD_TO_SIGMA * float(np.float32(mad_b))) ** 2)
        ns.append(int(n_b))
    x, v, nn_ = np.array(xs), np.array(vs), np.array(ns, dtype=float)
    floor = quantum * quantum / 12.0  # the rounding's variance, one step of the frame's values (guard.frame_quantum)
    slope, intercept = fit_variance(x - offset, v, nn_, floor)
    intercept = max(float(intercept), floor)
    return NoiseModel(read_dn=math.sqrt(intercept), dn_per_e=float(slope), offset_dn=offset, measured=True)


def noise_model(f: Tensor, config: GuardConfig, exclude: Tensor | None = None, quantum: float = 1.0) -> NoiseModel:
    if config.gain_e_per_dn is not None and config.read_noise_dn is not None:
        offset = config.offset_dn if config.offset_dn is not None else float(percentile(f[::4, ::4].reshape(-1), 0.1))
        return NoiseModel(read_dn=config.read_noise_dn, dn_per_e=1.0 / config.gain_e_per_dn, offset_dn=offset,
                          measured=False)
    return measure_noise(f, exclude, quantum=quantum)


def _median4(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    ab_lo, ab_hi = torch.minimum(a, b), torch.maximum(a, b)
    cd_lo, cd_hi = torch.minimum(c, d), torch.maximum(c, d)
    med = 0.5 * (torch.maximum(ab_lo, cd_lo) + torch.minimum(ab_hi, cd_hi))
    return torch.minimum(ab_lo, cd_lo), med, torch.maximum(ab_hi, cd_hi)


def _excess(f: Tensor, lo: Tensor, hi: Tensor, neighbours: tuple[Tensor, ...], ratio: float, var: Tensor,
            tolerance: float) -> tuple[Tensor, Tensor, Tensor]:
    r = _f32(ratio / len(neighbours))
    m = _f32(len(neighbours))
    total = neighbours[0].clone()
    for n in neighbours[1:]:
        total += n
    up = f - lo
    slack = _f32(tolerance) * torch.maximum(up, hi - f)
    up -= r * (total - m * lo)
    down = hi - f - r * (m * hi - total)
    slack *= slack
    scale = _sqrt(var * _f32(1 + ratio * ratio / len(neighbours)) + slack)
    return up, down, scale


def _sharpness(f: Tensor, lo: Tensor, hi: Tensor, neighbours: tuple[Tensor, ...], ratio: float, var: Tensor,
               tolerance: float) -> Tensor:
    up, down, scale = _excess(f, lo, hi, neighbours, ratio, var, tolerance)
    return (up.clamp_(min=0) - down.clamp_(min=0)) / scale


def _beyond(f: Tensor, lo: Tensor, hi: Tensor, neighbours: tuple[Tensor, ...], ratio: float, var: Tensor,
            tolerance: float, z: float) -> Tensor:
    up, down, scale = _excess(f, lo, hi, neighbours, ratio, var, tolerance)
    return torch.maximum(up, down) > z * scale


def uniform_filter1d(t: Tensor, size: int, dim: int) -> Tensor:
    """``scipy.ndimage.uniform_filter1d(t, size, axis=dim, mode="nearest")`` of a float32 tensor: SciPy's float64
    running sum (the first window summed in order, then ``+= entering - leaving``) over ``size``, cast to float32."""
    t64 = t.to(torch.float64).movedim(dim, -1)
    before, after = size // 2, size - size // 2 - 1
    n = t64.shape[-1]
    ext = torch.cat([t64[..., :1].expand(*t64.shape[:-1], before), t64, t64[..., -1:].expand(*t64.shape[:-1], after)],
                    dim=-1)
    first = ext[..., 0].clone()
    for k in range(1, size):
        first += ext[..., k]
    steps = ext[..., size: size + n - 1] - ext[..., : n - 1]
    out = torch.cumsum(torch.cat([first[..., None], steps], dim=-1), dim=-1) / size
    return out.to(torch.float32).movedim(-1, dim)


def _tests(f: Tensor, at: Callable[[int, int], Tensor], noise: Noise, config: GuardConfig,
           line_axes: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    """:func:`cdae.engine.guard._tests` on tensors."""
    r = centre_to_neighbour_ratio(config.psf_sigma_px)
    z = _f32(config.impulse_sigma)
    z_line = float(np.float32(z) / np.float32(math.sqrt(config.line_length)))
    backgrounds, lows, highs, sides, axis_hits = [], [], [], [], []
    for dy, dx in ((0, 1), (1, 0)):
        n1, p1, n2, p2 = at(-dy, -dx), at(dy, dx), at(-2 * dy, -2 * dx), at(2 * dy, 2 * dx)
        lo, bg, hi = _median4(n1, p1, n2, p2)
        backgrounds.append(bg)
        lows.append(lo)
        highs.append(hi)
        sides.append((n1, p1))
    lo, hi = torch.minimum(*lows), torch.maximum(*highs)
    for k in range(2):
        bg = backgrounds[k]
        var = variance(noise, bg)
        t = _sharpness(f, lo, hi, sides[k], r, var, config.optics_tolerance)
        hit = torch.abs(t) > z
        if line_axes is not None and config.line_length > 1:
            along = uniform_filter1d(t, config.line_length, dim=line_axes[k])
            hit |= (torch.abs(along) > z_line) & (t * along > 0) & (torch.abs(f - bg) > z * _sqrt(var))
        axis_hits.append(hit)
    bg = 0.5 * (backgrounds[0] + backgrounds[1])
    point = _beyond(f, lo, hi, (*sides[0], *sides[1]), r, variance(noise, bg), config.optics_tolerance, z)
    mask = point | axis_hits[0] | axis_hits[1]
    background = torch.where(axis_hits[0] & ~axis_hits[1], backgrounds[0],
                             torch.where(axis_hits[1] & ~axis_hits[0], backgrounds[1], bg))
    return mask, background


def _pad_edge(f: Tensor, p: int) -> Tensor:
    return F.pad(f[None, None], (p, p, p, p), mode="replicate")[0, 0]


def _frame_at(pad: Tensor, p: int, h: int, w: int) -> Callable[[int, int], Tensor]:
    """A padded frame's values at every pixel's ``(dy, dx)`` neighbour: views, no copies."""
    return lambda dy, dx: pad[p + dy: p + dy + h, p + dx: p + dx + w]


def _dilate(mask: Tensor) -> Tensor:
    """Pixels within one step (3x3) of ``mask``: the NumPy pass's clamped neighbour indices name the same pixels."""
    return F.max_pool2d(mask[None, None].to(torch.float32), 3, stride=1, padding=1)[0, 0] > 0


def find_impulses(f: Tensor, noise: Noise, config: GuardConfig,
                  exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`cdae.engine.guard.find_impulses` on a float32 frame tensor. Every pass runs on the whole frame and
    keeps the candidates' results (the first pass's candidates are every pixel; a later pass's, the unclaimed
    neighbours of the claimed): each pixel's arithmetic is the NumPy pass's, so the values are the same, and no
    step waits for the device (no candidate lists, no early exit: a pass that finds nothing changes nothing)."""
    h, w = f.shape
    mask, background = _tests(f, _frame_at(_pad_edge(f, 2), 2, h, w), noise, config, line_axes=(0, 1))
    if exclude is not None:
        mask &= ~exclude
    for _ in range(config.impulse_passes - 1):
        candidates = _dilate(mask) & ~mask
        if exclude is not None:
            candidates &= ~exclude
        work = _pad_edge(torch.where(mask, background, f), 2)
        hit, bg = _tests(work[2: 2 + h, 2: 2 + w], _frame_at(work, 2, h, w), noise, config, line_axes=None)
        hit &= candidates
        mask = mask | hit
        background = torch.where(hit, bg, background)
    return mask, background


def impulse_evidence(f: Tensor, noise: Noise, config: GuardConfig, candidates: Tensor,
                     impulses: Tensor | None = None, background: Tensor | None = None) -> Tensor:
    """:func:`cdae.engine.guard.impulse_evidence` on tensors: the tests on the whole frame, kept at the
    candidates (the same values as testing the candidates alone; nothing waits for the device)."""
    lines = config.learned_peak_sigma is not None and config.learned_line_peaks and config.line_length > 1
    p = max(3, config.line_length) if lines else 2  # the line test reaches half a line along, three across
    h, w = f.shape
    pad = _pad_edge(f if impulses is None or background is None else torch.where(impulses, background, f), p)
    at = _frame_at(pad, p, h, w)
    hit = candidates.clone()
    if config.learned_evidence_sigma is not None:
        hit &= _tests(at(0, 0), at, noise, evidence_config(config), line_axes=None)[0]
    if config.learned_peak_sigma is not None:
        peak = _not_a_real_peak(at, noise, config)
        if lines:
            claimed = candidates if impulses is None else candidates | impulses
            peak = torch.where(hit & ~peak, _line_peak(pad, p, claimed, noise, config), peak)
        hit &= peak
    return hit


def _not_a_real_peak(at: Callable[[int, int], Tensor], noise: Noise, config: GuardConfig) -> Tensor:
    """:func:`cdae.engine.guard._not_a_real_peak` on tensors (the rim's two middle values selected, not the whole
    rim sorted: the same values, without a sorted copy and its int64 indices for 16 planes of the frame)."""
    f = at(0, 0)
    rim = torch.stack([at(dy, dx) for dy, dx in PEAK_RIM])
    middle = len(PEAK_RIM) // 2
    b = (torch.kthvalue(rim, middle, dim=0).values + torch.kthvalue(rim, middle + 1, dim=0).values) * 0.5
    del rim
    var = sigma(noise, b)
    var = var * var
    w, e, n, s = at(0, -1), at(0, 1), at(-1, 0), at(1, 0)
    return _peaks(f, b, torch.maximum(w, e), torch.maximum(n, s), var, config) | \
        _peaks(-f, -b, -torch.minimum(w, e), -torch.minimum(n, s), var, config)


def _peaks(f: Tensor, b: Tensor, one: Tensor, other: Tensor | None, var: Tensor, config: GuardConfig) -> Tensor:
    """:func:`cdae.engine.guard._peaks` on tensors."""
    r = centre_to_neighbour_ratio(config.psf_sigma_px)
    z = _f32(config.learned_peak_sigma)
    excess = f - b
    slack = _f32(config.optics_tolerance) * excess
    slack = slack * slack
    one = one + one
    tests = [(2, one)]
    if other is not None:
        other = other + other
        tests += [(2, other), (4, one + other)]
    sharp = torch.zeros_like(f, dtype=torch.bool)
    for m, total in tests:
        up = excess - _f32(r / m) * (total - float(m) * b)
        sharp |= up > z * _sqrt(var * _f32(1 + r * r / m) + slack)
    return (excess > 0) & sharp


def _line_peak(pad: Tensor, p: int, claimed: Tensor, noise: Noise, config: GuardConfig) -> Tensor:
    """:func:`cdae.engine.guard._line_peak` at every pixel of the frame (``pad``: it padded by ``p``). Its stretches
    are shifts of one sum along the line: that sum over the padded frame (the same terms added in the same order as
    at each candidate, so the same bits), each stretch a view of it; the claimed test a running count."""
    length = config.line_length
    half = length // 2
    inverse = _f32(1 / length)
    h, w = claimed.shape
    out = torch.zeros_like(claimed)
    for dim, (qy, qx) in ((1, (1, 0)), (0, (0, 1))):
        whole = ~out & _claimed_along(claimed, dim, length)
        n = pad.shape[dim] - length + 1
        along = pad.narrow(dim, 0, n).clone()  # along[i] = pad[i] + ... + pad[i + length - 1], in that order
        for k in range(1, length):
            along += pad.narrow(dim, k, n)
        along *= inverse
        r0, c0 = p - (half if dim == 0 else 0), p - (half if dim == 1 else 0)

        def stretch(d: int, along: Tensor = along, r0: int = r0, c0: int = c0, qy: int = qy, qx: int = qx) -> Tensor:
            return along[r0 + d * qy: r0 + d * qy + h, c0 + d * qx: c0 + d * qx + w]

        f, n_, s_ = stretch(0), stretch(-1), stretch(1)
        b = _median4(stretch(-2), stretch(2), stretch(-3), stretch(3))[1]
        var = sigma(noise, b)
        var = var * var
        var *= inverse
        found = _peaks(f, b, torch.maximum(n_, s_), None, var, config) | \
            _peaks(-f, -b, -torch.minimum(n_, s_), None, var, config)
        out = torch.where(whole, found, out)
    return out


def _claimed_along(claimed: Tensor, dim: int, length: int) -> Tensor:
    """Where all ``length`` pixels of the line centred on a pixel along ``dim`` are claimed (positions past the
    frame's edge read its edge pixel, as the NumPy test's clamped indices do)."""
    half = length // 2
    size = claimed.shape[dim]
    pos = torch.arange(-half, size + length - half - 1, device=claimed.device).clamp_(0, size - 1)
    counts = torch.cumsum(claimed.index_select(dim, pos).to(torch.int32), dim)
    counts = F.pad(counts, (1, 0) if dim == 1 else (0, 0, 1, 0))
    return counts.narrow(dim, length, size) - counts.narrow(dim, 0, size) == length


def guard(f: Tensor, denoised_dn: Tensor, saturated: Tensor, config: GuardConfig,
          defect_probability: Tensor | None = None, quantum: float = 1.0,
          graphs: GuardGraphs | None = None, noise: NoiseModel | None = None) -> tuple[Tensor, Tensor, NoiseModel]:
    """:func:`cdae.engine.guard.guard` on float32 tensors: (output, uint8 flags, noise model); ``quantum``: the
    host frame's :func:`cdae.engine.guard.frame_quantum`. The noise model is measured first (its statistics come
    back to the host for the line fit), unless ``noise`` gives it (the host's, from the same frame); the rest
    (:func:`guard_core`) waits for nothing, and on a GPU ``graphs`` replays it as one captured CUDA graph per
    frame shape."""
    if noise is None:
        noise = noise_model(f, config, exclude=saturated, quantum=quantum)
    if graphs is not None:
        out, flags = graphs.run(f, denoised_dn, saturated, defect_probability, config, noise)
    else:  # the model's constants as host floats: nothing to copy up, nothing to wait for
        out, flags = guard_core(f, denoised_dn, saturated, defect_probability, config, noise)
    return out, flags, noise


def guard_core(f: Tensor, denoised_dn: Tensor, saturated: Tensor, defect_probability: Tensor | None,
               config: GuardConfig, noise: Noise) -> tuple[Tensor, Tensor]:
    """The guard given its noise model: impulses, the learned flag's evidence, the bound; (output, flags)."""
    impulses, background = find_impulses(f, noise, config)
    saturated = saturated & ~impulses
    bound = sigma(noise, f)
    bound *= _f32(config.k_sigma)
    den = denoised_dn.to(torch.float32)
    out = torch.clamp(den, f - bound, f + bound)
    flags = torch.zeros(f.shape, dtype=torch.uint8, device=f.device)
    if isinstance(config.defect_threshold, float) and defect_probability is not None:
        learned = (defect_probability > _f32(config.defect_threshold)) & ~impulses & ~saturated
        if config.learned_evidence_sigma is not None or config.learned_peak_sigma is not None:
            learned = impulse_evidence(f, noise, config, learned, impulses, background)
        out = torch.where(learned, den, out)
        flags.masked_fill_(learned, LEARNED)
    out = torch.where(impulses, background, out)
    out = torch.where(saturated, f, out)
    flags.masked_fill_(impulses, IMPULSE)
    flags.masked_fill_(saturated, SATURATED)
    return out, flags


def flag_class_counts(flags: Tensor) -> Tensor:
    """Pixels per flag class (int64, one per :data:`FLAG_NAMES` code) without waiting for the device (a bincount
    sizes its output from the data's maximum, a read back) and without atomics on a few addresses: one comparison
    with every code, summed."""
    codes = torch.arange(len(FLAG_NAMES), dtype=flags.dtype, device=flags.device)
    return (flags.reshape(-1, 1) == codes).sum(dim=0)


@dataclass
class _Captured:
    inputs: dict[str, Tensor | None]
    params: Tensor
    graph: torch.cuda.CUDAGraph
    outputs: tuple[Tensor, Tensor]


class GuardGraphs:
    """:func:`guard_core` captured as CUDA graphs, one per frame shape and guard configuration (captured the
    second time a key is seen, the least recently used dropped beyond ``max_graphs``; a key dropped twice runs
    eager from then on, rather than be captured again and again): hundreds of small kernels launched as one, which
    is what the guard costs on a GPU. Each replay copies the frame's tensors and noise constants into the graph's
    inputs on the current stream (the constants from a pinned buffer of their own, so that no later frame can
    overwrite them before the copy has run); its outputs stay valid until the next replay of that key (the frame
    path copies them into the packed download first). Captured on a side stream, so that a caller on the default
    stream can use it too. A capture that fails turns graphs off for this instance, and says why: torch does not
    reliably recover a failed capture's memory, so it is not tried again."""

    CAPTURE_AFTER = 2
    MAX_EVICTIONS = 2

    def __init__(self, device: torch.device, max_graphs: int = 2, log: Callable[[str], None] | None = None) -> None:
        self.device, self.max_graphs, self.log = device, max_graphs, log or (lambda s: None)
        self._graphs: OrderedDict[tuple[object, ...], _Captured] = OrderedDict()
        self._seen: dict[tuple[object, ...], int] = {}
        self._evicted: dict[tuple[object, ...], int] = {}
        self._lock = threading.Lock()
        self.captures = 0
        self.state = "on"  # "off: <why>" once a capture has failed

    def run(self, f: Tensor, den: Tensor, saturated: Tensor, prob: Tensor | None, config: GuardConfig,
            noise: NoiseModel) -> tuple[Tensor, Tensor]:
        with self._lock:
            return self._run(f, den, saturated, prob, config, noise)

    def _run(self, f: Tensor, den: Tensor, saturated: Tensor, prob: Tensor | None, config: GuardConfig,
             noise: NoiseModel) -> tuple[Tensor, Tensor]:
        key = (tuple(f.shape), str(f.device), f.dtype, den.dtype, saturated.dtype,
               None if prob is None else (prob.dtype, tuple(prob.shape)), config.model_dump_json())
        g = self._graphs.pop(key, None)
        if g is None and self.state == "on" and self._evicted.get(key, 0) < self.MAX_EVICTIONS:
            if len(self._seen) > 1024:
                self._seen.clear()
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] >= self.CAPTURE_AFTER:
                del self._seen[key]
                g = self._capture(f, den, saturated, prob, config)
        if g is None:
            return guard_core(f, den, saturated, prob, config, noise)
        self._graphs[key] = g
        while len(self._graphs) > self.max_graphs:
            old, _ = self._graphs.popitem(last=False)
            self._evicted[old] = self._evicted.get(old, 0) + 1
            if len(self._evicted) > 1024:
                self._evicted.clear()
        for name, t in (("f", f), ("den", den), ("saturated", saturated), ("prob", prob)):
            target = g.inputs[name]
            if target is not None and t is not None:
                target.copy_(t)
        host = torch.tensor(NoiseTensors.host_values(noise), dtype=torch.float32).pin_memory()
        g.params.copy_(host, non_blocking=True)  # the caching host allocator keeps `host` until the copy has run
        g.graph.replay()
        return g.outputs

    def _capture(self, f: Tensor, den: Tensor, saturated: Tensor, prob: Tensor | None,
                 config: GuardConfig) -> _Captured | None:
        current = torch.cuda.current_stream(self.device)
        # the graph's inputs belong to the stream that replays it and copies into them
        inputs: dict[str, Tensor | None] = {"f": f.clone(), "den": den.clone(), "saturated": saturated.clone(),
                                            "prob": None if prob is None else prob.clone()}
        params = torch.zeros(3, dtype=torch.float32, device=self.device)
        noise = NoiseTensors(params)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                def core() -> tuple[Tensor, Tensor]:
                    return guard_core(inputs["f"], inputs["den"], inputs["saturated"],  # type: ignore[arg-type]
                                      inputs["prob"], config, noise)

                core()  # warm up: allocator, kernels
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    outputs = core()
        except Exception as e:  # noqa: BLE001 - graphs off for good, and why; the frame runs eager
            self.state = f"off: capture failed ({type(e).__name__}: {e})"
            self._graphs.clear()
            self.log(f"guard: CUDA graph capture for a {tuple(f.shape)} frame failed ({type(e).__name__}: {e}); "
                     "the guard runs eager from now on")
            current.wait_stream(side)
            return None
        current.wait_stream(side)
        self.captures += 1
        return _Captured(inputs, params, graph, outputs)


# --- staging and the whole frame ----------------------------------------------------------------

class FrameStaging:
    """A frame's way onto its device and the results' way back: on CUDA through pinned host memory (torch's
    caching host allocator: a fresh block per frame costs no page locking once warm, and the arrays handed
    out own theirs, so nothing is copied again on the host), everything back in one packed copy."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def upload(self, frame: np.ndarray) -> Tensor:
        """A 2-D frame in its own dtype on the device (queued on the current stream)."""
        native = np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("="))
        carrier = TORCH_DTYPES[native.dtype]
        if self.device.type != "cuda":
            view = native.view(_NUMPY_DTYPES[carrier])
            return torch.from_numpy(view if view.flags.writeable else view.copy()).to(self.device)
        host = torch.empty(native.shape, dtype=carrier, pin_memory=True)
        host.numpy().view(native.dtype)[...] = native
        return host.to(self.device, non_blocking=True)

    def download(self, tensors: Sequence[Tensor | None]) -> list[np.ndarray | None]:
        """The tensors on the host, as arrays of their dtypes and shapes, in one device-to-host copy."""
        if self.device.type != "cuda":
            return [None if t is None else t.contiguous().cpu().numpy() for t in tensors]
        packed, spans = pack(tensors, self.device)
        host = torch.empty(packed.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return unpack(host.numpy(), spans)


Span = tuple[int, int, torch.dtype, tuple[int, ...]]


def pack(tensors: Sequence[Tensor | None], device: torch.device) -> tuple[Tensor, list[Span | None]]:
    """The tensors' bytes in one uint8 tensor on their device, each part 16-byte aligned, and where each lies."""
    parts, spans, at = [], [], 0
    for t in tensors:
        if t is None:
            spans.append(None)
            continue
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        pad = (-raw.numel()) % 16
        parts.append(raw)
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=raw.device))
        spans.append((at, raw.numel(), t.dtype, tuple(t.shape)))
        at += raw.numel() + pad
    packed = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=device)
    return packed, spans


def unpack(flat: np.ndarray, spans: Sequence[Span | None]) -> list[np.ndarray | None]:
    """Views of a packed host buffer (:func:`pack`) as the original arrays (they keep the buffer alive)."""
    return [None if span is None else flat[span[0]: span[0] + span[1]].view(_NUMPY_DTYPES[span[2]]).reshape(span[3])
            for span in spans]


class DeviceRunner(Protocol):
    """What the device path needs from a backend: its network on device tensors, staging and a device scope."""

    multiple: int
    max_side: int | None
    normalisation: NormalisationConfig
    torch_device: torch.device
    frame_staging: FrameStaging

    def infer_tensor(self, x: Tensor) -> tuple[Tensor, Tensor]:  # (C, h, w) on the device → (restored, probability)
        ...

    def device_scope(self) -> contextlib.AbstractContextManager[object]:
        ...


def fits_device_path(frame: np.ndarray) -> bool:
    """Whether a frame's dtype and shape can take the device path (its values are checked on the device)."""
    return frame.ndim == 2 and frame.dtype.isnative and frame.dtype in TORCH_DTYPES and frame.size > 0


def run_tiled(x: Tensor, fn: Callable[[Tensor], tuple[Tensor, Tensor]], tiles: Sequence[Tile],
              batch_fn: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
              max_batch: int = 1) -> tuple[Tensor, Tensor]:
    """:func:`cdae.engine.tiling.run_tiled` on a device tensor. With ``batch_fn`` ((N, C, h, w) → two (N, h, w)),
    tiles of one shape (a frame's inner tiles, its edge tiles) run up to ``max_batch`` to a call."""
    if len(tiles) == 1 and tiles[0].read_shape == tuple(x.shape[-2:]):
        return fn(x)
    restored = torch.empty(x.shape[-2:], dtype=torch.float32, device=x.device)
    prob = torch.empty_like(restored)
    groups: dict[tuple[int, int], list[Tile]] = {}
    for tile in tiles:
        groups.setdefault(tile.read_shape, []).append(tile)
    step = max(1, max_batch) if batch_fn is not None else 1
    for group in groups.values():
        # equal batches (the last one topped up with a repeat): one input shape per group, one CUDA graph each
        size = -(-len(group) // -(-len(group) // step))
        for i in range(0, len(group), size):
            chunk = group[i: i + size]
            if batch_fn is not None and size > 1:
                batch = chunk + [chunk[-1]] * (size - len(chunk))
                rb, pb = batch_fn(torch.stack([x[(slice(None), *t.read)] for t in batch]))
                results = [(rb[j], pb[j]) for j in range(len(chunk))]
            else:
                results = [fn(x[(slice(None), *t.read)]) for t in chunk]
            for t, (r, p) in zip(chunk, results):
                restored[t.write] = r[t.crop]
                prob[t.write] = p[t.crop]
    return restored, prob


def denoise_frame_on_device(
    frame: np.ndarray, runner: DeviceRunner, *, bit_depth: int | None, max_pixels: int, margin: int,
    want_residual: bool, bad_pixels: BadPixelMap | None, adc_max: float | None, guard_config: GuardConfig | None,
) -> FrameResult | None:
    """:func:`cdae.engine.pipeline.denoise_frame` with everything between upload and download on the runner's
    device; None when the frame needs the host path (float values beyond :data:`FLOAT_FRAME_LIMIT`).
    ``margin``: the tile margin already resolved (``tile_margin``)."""
    from cdae.engine.guard import BAD_PIXEL_MAP, count_flags
    from cdae.engine.pipeline import FrameResult

    t0 = time.perf_counter()
    dt = frame.dtype.newbyteorder("=")
    if adc_max is None:
        adc_max = adc_max_for(dt, bit_depth)
    candidates = guard_config.full_well_candidates if guard_config is not None else 1
    on_host = getattr(runner, "host_statistics", True)
    # no_grad, not inference_mode: a CUDA graph captured here is replayed by the host path too
    with torch.no_grad(), runner.device_scope():
        raw = runner.frame_staging.upload(frame)  # queued: the host reads its statistics meanwhile
        f = as_float32(raw, dt)
        if on_host:
            # the frame is on the host already: its offset, scale and full well by the NumPy path's own code (a
            # strided sample; on a GPU each of the device's steps is a kernel launch and many a read back)
            read = frame
            if dt.kind == "f":
                read = np.asarray(frame, dtype=np.float32)  # what frame_statistics reads (a float32 frame itself)
                if read.size and float(np.max(np.abs(read))) > FLOAT_FRAME_LIMIT:
                    return None  # NaN compares False: frame_statistics refuses the frame as the host path does
            read, offset, scale, fw = frame_statistics(read, adc_max, runner.normalisation, candidates)
            x = network_input_given(f, adc_max, offset, scale, fw)
        else:
            if dt.kind == "f" and float(torch.max(torch.abs(f))) > FLOAT_FRAME_LIMIT:
                return None  # NaN compares False: network_input refuses the frame as the host path does
            x, offset, scale = network_input(f, adc_max, runner.normalisation, candidates)
        tiles = plan_tiles(tuple(frame.shape), max_pixels=max_pixels, margin=margin, multiple=runner.multiple,
                           max_side=runner.max_side)
        restored, prob = run_tiled(x, runner.infer_tensor, tiles, getattr(runner, "infer_batch", None),
                                   getattr(runner, "tile_batch", 1))
        out = denormalise(restored, offset, scale)
        flags = counts = None
        if guard_config is not None:
            noise, quantum = None, frame_quantum(frame)
            if on_host:  # while the network runs: the guard's noise model, the host path's (compiled) own
                f_host = np.asarray(read, dtype=np.float32)
                noise = host_noise_model(f_host, guard_config, exclude=saturation_mask(f_host, adc_max, fw),
                                         quantum=quantum)
            out, flags, _ = guard(f, out, x[1] > 0.5, guard_config, prob, quantum,
                                  getattr(runner, "guard_graphs", None), noise=noise)
            counts = flag_class_counts(flags)
        values = camera_values(out, dt, adc_max)
        denoised = as_carrier(values, dt)
        residual = None
        if want_residual:
            residual = f - values
            if dt.kind == "f":  # beyond float32: ±float32 max, as the host path's _residual
                residual.clamp_(-F32_MAX, F32_MAX)
        host = runner.frame_staging.download([denoised, residual, prob.to(torch.float32), flags, counts])
    den_np, res_np, prob_np, flags_np, counts_np = host
    assert den_np is not None and prob_np is not None
    den_np = den_np.view(dt)
    flag_counts = None
    if flags_np is not None and counts_np is not None:
        flag_counts = {name: int(counts_np[c]) for c, name in FLAG_NAMES.items() if c}
    if bad_pixels is not None:
        den_np, res_np, prob_np = bad_pixels.fill_output(den_np, res_np, prob_np)
        if flags_np is not None:
            flags_np[bad_pixels.mask(frame.shape)] = BAD_PIXEL_MAP
            flag_counts = count_flags(flags_np)
    return FrameResult(
        denoised=den_np, residual=res_np, defect_probability=prob_np, tiles=len(tiles),
        inference_ms=(time.perf_counter() - t0) * 1e3, flags=flags_np, flag_counts=flag_counts,
    )
