"""Image-quality metrics for denoised detector frames, in detector units (DN).

Every function is a pure function of arrays. ``data_range`` is the ADC's full scale
(``2**bits - 1``), so that a frame's scores do not depend on what it happens to contain.

Per-region RMSEs are reported normalised by ``data_range`` and carry their squared-error
sums and pixel counts, so that :func:`aggregate` pools them over frames
(``sqrt(total SE / total count)``) instead of averaging RMSEs of unequal regions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import ndimage

from cdae.engine.robust import mad_sigma

__all__ = [
    "EvalFrame",
    "FrameMetrics",
    "MetricsError",
    "aggregate",
    "bright_feature_mask",
    "defects_frame_by_frame",
    "frame_metrics",
    "psnr",
    "rmse",
    "rmse_normalised",
    "ssim",
]

# Wang, Bovik, Sheikh & Simoncelli 2004 (IEEE TIP 13:600): constants and an 11x11 Gaussian
# window (sigma 1.5); truncate 3.5 gives radius 5, as scikit-image's ``gaussian_weights``.
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)


class MetricsError(ValueError):
    """Inputs a metric cannot be computed on (shape mismatch, bad data range, tiny frame)."""


@dataclass(frozen=True)
class EvalFrame:
    """One evaluation frame: the noisy input, its clean truth and where the defects are.

    ``noisy``/``clean`` are float32 DN; ``defect_mask`` is non-zero on defective pixels
    (hot/dead pixels, cosmic rays...); ``kind`` names the scene generator or source.
    ``saturation_dn``: what real light at the camera's full well reads in ``clean`` (None: the ADC maximum),
    where the scene is gone for any filter.
    """

    noisy: np.ndarray
    clean: np.ndarray
    defect_mask: np.ndarray
    adc_max: int
    bit_depth: int
    kind: str
    saturation_dn: float | None = None


def _pair(estimate: np.ndarray, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    est = np.asarray(estimate, dtype=np.float64)
    ref = np.asarray(clean, dtype=np.float64)
    if est.shape != ref.shape:
        raise MetricsError(
            f"estimate and clean must have the same shape; got {est.shape} and {ref.shape}"
        )
    if est.size == 0:
        raise MetricsError(f"expected non-empty frames; got shape {est.shape}")
    return est, ref


def _check_range(data_range: float) -> float:
    value = float(data_range)
    if not math.isfinite(value) or value <= 0:
        raise MetricsError(f"data_range must be a finite positive number (ADC max); got {data_range!r}")
    return value


def _mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != shape:
        raise MetricsError(f"mask must have the frame's shape {shape}; got {m.shape}")
    return m.astype(bool, copy=False)


def psnr(estimate: np.ndarray, clean: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``; inf when exact."""
    est, ref = _pair(estimate, clean)
    rng = _check_range(data_range)
    mse = float(np.mean((est - ref) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(rng * rng / mse)


def ssim(estimate: np.ndarray, clean: np.ndarray, data_range: float) -> float:
    """Mean structural similarity (Wang et al. 2004), Gaussian window sigma 1.5.

    Matches scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range)``: population (co)variances,
    reflect borders, and the mean taken over pixels whose window lies inside the frame.
    """
    est, ref = _pair(estimate, clean)
    rng = _check_range(data_range)
    if est.ndim != 2:
        raise MetricsError(f"ssim expects a 2-D frame; got shape {est.shape}")
    win = 2 * SSIM_RADIUS + 1
    if min(est.shape) < win:
        raise MetricsError(f"ssim needs frames of at least {win}x{win} pixels; got {est.shape}")

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, SSIM_SIGMA, mode="reflect", truncate=SSIM_TRUNCATE)

    mu_x, mu_y = blur(est), blur(ref)
    var_x = blur(est * est) - mu_x * mu_x
    var_y = blur(ref * ref) - mu_y * mu_y
    cov_xy = blur(est * ref) - mu_x * mu_y
    c1 = (SSIM_K1 * rng) ** 2
    c2 = (SSIM_K2 * rng) ** 2
    s_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    r = SSIM_RADIUS
    return float(s_map[r:-r, r:-r].mean())


def _se_sum_count(est: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> tuple[float, int]:
    diff = est - ref if mask is None else est[mask] - ref[mask]
    return float(np.sum(diff * diff)), int(diff.size)


def rmse(estimate: np.ndarray, clean: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Root-mean-square error in DN over ``mask`` (all pixels if None); NaN if it is empty."""
    est, ref = _pair(estimate, clean)
    se, n = _se_sum_count(est, ref, None if mask is None else _mask(mask, est.shape))
    return math.sqrt(se / n) if n else math.nan


def rmse_normalised(
    estimate: np.ndarray, clean: np.ndarray, data_range: float, mask: np.ndarray | None = None
) -> float:
    """:func:`rmse` divided by ``data_range`` (a fraction of the ADC's full scale)."""
    return rmse(estimate, clean, mask) / _check_range(data_range)


def bright_feature_mask(
    clean: np.ndarray,
    defect_mask: np.ndarray,
    quantile: float = 0.99,
    margin_dn: float | None = None,
) -> np.ndarray:
    """The brightest real features: the pixels a smoothing filter is most likely to erase.

    True where ``clean >= quantile(clean)`` and ``clean > median + margin`` (so a flat
    frame has no bright features) and the pixel is not a defect. ``margin_dn`` defaults to
    one robust standard deviation of the clean frame (1.4826 MAD), at least 1e-6 of its
    median's magnitude (and of 1 DN) so that a flat background never counts as a feature.
    """
    ref = np.asarray(clean, dtype=np.float64)
    defects = _mask(defect_mask, ref.shape)
    if not 0.0 <= quantile <= 1.0:
        raise MetricsError(f"quantile must lie in [0, 1]; got {quantile}")
    if ref.size == 0:
        return np.zeros(ref.shape, dtype=bool)
    median = float(np.median(ref))
    if margin_dn is None:
        margin_dn = max(mad_sigma(ref, median), 1e-6 * max(abs(median), 1.0))
    threshold = float(np.quantile(ref, quantile))
    return (ref >= threshold) & (ref > median + margin_dn) & ~defects


class FrameMetrics(BaseModel):
    """Scores of one denoised frame; RMSEs are fractions of ``data_range``.

    The ``se_*``/``n_*`` fields carry normalised squared-error sums and pixel counts so
    that :func:`aggregate` can pool RMSEs over frames. An RMSE over an empty region is NaN
    and an exact estimate has infinite PSNR; JSON carries them as the strings "NaN" and
    "Infinity" (strict JSON has neither, and pydantic's default ``null`` would not load back).
    """

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="strings")

    psnr_db: float
    ssim: float
    rmse_defect: float
    rmse_bright: float
    rmse_all: float
    se_defect: float
    n_defect: int
    se_bright: float
    n_bright: int
    se_all: float
    n_all: int


def frame_metrics(
    estimate: np.ndarray, clean: np.ndarray, defect_mask: np.ndarray, data_range: float
) -> FrameMetrics:
    """All scores of one frame: PSNR, SSIM and RMSEs on defects, bright features and all."""
    est, ref = _pair(estimate, clean)
    rng = _check_range(data_range)
    defects = _mask(defect_mask, est.shape)
    bright = bright_feature_mask(ref, defects)
    est_n, ref_n = est / rng, ref / rng

    def region(mask: np.ndarray | None) -> tuple[float, float, int]:
        se, n = _se_sum_count(est_n, ref_n, mask)
        return (math.sqrt(se / n) if n else math.nan), se, n

    r_def, se_def, n_def = region(defects)
    r_bri, se_bri, n_bri = region(bright)
    r_all, se_all, n_all = region(None)
    return FrameMetrics(
        psnr_db=psnr(est, ref, rng),
        ssim=ssim(est, ref, rng),
        rmse_defect=r_def,
        rmse_bright=r_bri,
        rmse_all=r_all,
        se_defect=se_def,
        n_defect=n_def,
        se_bright=se_bri,
        n_bright=n_bri,
        se_all=se_all,
        n_all=n_all,
    )


def aggregate(metrics: Sequence[FrameMetrics]) -> dict[str, float]:
    """Summary over frames: mean PSNR and SSIM, pooled RMSEs ``sqrt(sum SE / sum count)``.

    Also reports ``n_frames`` and the pooled pixel counts ``n_defect``/``n_bright``/``n_all``.
    """
    if len(metrics) == 0:
        raise MetricsError("aggregate expects at least one FrameMetrics; got none")

    def pooled(se: float, n: int) -> float:
        return math.sqrt(se / n) if n else math.nan

    out: dict[str, float] = {
        "psnr_db": float(np.mean([m.psnr_db for m in metrics])),
        "ssim": float(np.mean([m.ssim for m in metrics])),
    }
    for region in ("defect", "bright", "all"):
        se = sum(getattr(m, f"se_{region}") for m in metrics)
        n = sum(getattr(m, f"n_{region}") for m in metrics)
        out[f"rmse_{region}"] = pooled(se, n)
        out[f"n_{region}"] = float(n)
    out["n_frames"] = float(len(metrics))
    return out


def per_class_rmse(
    estimates: Sequence[np.ndarray], frames: Sequence[EvalFrame], classes: dict[str, int]
) -> dict[str, dict[str, float]]:
    """RMSE (fraction of full scale) pooled over frames on the pixels of each defect class.

    ``classes`` maps a class name to its bit in ``defect_mask``; a pixel with several bits counts
    in each of its classes. Tells which defects a method repairs and which it leaves (or makes).
    """
    if len(estimates) != len(frames):
        raise MetricsError(f"{len(estimates)} estimates for {len(frames)} frames")
    se = dict.fromkeys(classes, 0.0)
    n = dict.fromkeys(classes, 0)
    for est, fr in zip(estimates, frames):
        bits = np.asarray(fr.defect_mask).astype(np.int64)
        diff = (np.asarray(est, dtype=np.float64) - np.asarray(fr.clean, dtype=np.float64)) / float(fr.adc_max)
        for name, bit in classes.items():
            sel = (bits & bit) != 0
            se[name] += float(np.sum(diff[sel] ** 2))
            n[name] += int(sel.sum())
    return {name: {"rmse": math.sqrt(se[name] / n[name]) if n[name] else math.nan, "pixels": float(n[name])}
            for name in classes}


def bright_error_concentration(metrics: Sequence[FrameMetrics]) -> dict[str, float]:
    """Which frame holds the largest share of the pooled bright-feature squared error, and how much.

    A method that fails badly on one scene (eats one real blob) shows a share near 1.
    """
    total = sum(m.se_bright for m in metrics)
    if not metrics or total <= 0:
        return {"worst_frame": -1.0, "worst_frame_share": 0.0}
    worst = max(range(len(metrics)), key=lambda i: metrics[i].se_bright)
    return {"worst_frame": float(worst), "worst_frame_share": metrics[worst].se_bright / total}


#: A frame where a method painted a real bright feature over: its bright-feature squared error is
#: over this many times the noisy input's in the same frame ...
PAINTED_OVER_FACTOR = 4.0
#: ... and over this share of the method's pooled bright-feature squared error.
PAINTED_OVER_SHARE = 0.01


def painted_over_frames(method_se: Sequence[float], noisy_se: Sequence[float]) -> list[int]:
    """Indices of the frames where a method painted a real bright feature over (per-frame bright squared
    errors of the method and of the noisy input, same frames).

    The pooled bright RMSE is decided by the worst scene of a set; this counts scenes, so it says
    "how often" where the pooled number says "how badly at worst".
    """
    total = float(sum(method_se))
    return [i for i, (m, n) in enumerate(zip(method_se, noisy_se, strict=True))
            if m > PAINTED_OVER_FACTOR * n and m > PAINTED_OVER_SHARE * total]


#: Issue 2's targets: PSNR gain over the best tuned baseline (dB, at least), defect-pixel RMSE
#: ratio baseline / model (at least), bright-feature RMSE model / noisy input (at most).
TARGET_PSNR_GAIN_DB = 4.0
TARGET_DEFECT_RATIO = 3.0
TARGET_BRIGHT_RATIO = 1.0


def target_quantities(model: Sequence[FrameMetrics], baseline: Sequence[FrameMetrics],
                      noisy: Sequence[FrameMetrics]) -> dict[str, float]:
    """The three target quantities on one set of frames (the same frames for all three methods)."""
    m, b, n = aggregate(model), aggregate(baseline), aggregate(noisy)
    return {"psnr_gain_db": m["psnr_db"] - b["psnr_db"],
            "defect_ratio": b["rmse_defect"] / m["rmse_defect"],
            "bright_ratio": m["rmse_bright"] / n["rmse_bright"]}


def bootstrap_targets(model: Sequence[FrameMetrics], baseline: Sequence[FrameMetrics],
                      noisy: Sequence[FrameMetrics], resamples: int = 2000, seed: int = 0) -> dict:
    """How far to trust the targets measured on a finite set of frames: a paired bootstrap.

    Frames are drawn with replacement (the same draw for model, baseline and noisy input) and the
    three quantities are recomputed as :func:`aggregate` pools them (mean PSNR, pooled RMSEs).
    Returns their 5/50/95th percentiles and the share of resamples meeting each target and all
    three. A pooled RMSE is dominated by its worst frames, so a rare scene the model gets badly
    wrong shows here as a wide interval long before it shows in the point estimate.
    """
    k = len(model)
    if k == 0 or not (len(baseline) == len(noisy) == k):
        raise MetricsError(f"bootstrap needs the same non-empty frames for all methods, got {k}/{len(baseline)}/{len(noisy)}")

    def arr(ms: Sequence[FrameMetrics], field: str) -> np.ndarray:
        return np.array([getattr(x, field) for x in ms], dtype=np.float64)

    idx = np.random.default_rng(seed).integers(0, k, size=(resamples, k))
    gain = arr(model, "psnr_db")[idx].mean(axis=1) - arr(baseline, "psnr_db")[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        defect = np.sqrt(arr(baseline, "se_defect")[idx].sum(axis=1) / arr(model, "se_defect")[idx].sum(axis=1))
        bright = np.sqrt(arr(model, "se_bright")[idx].sum(axis=1) / arr(noisy, "se_bright")[idx].sum(axis=1))
    meets = {"psnr_gain_db": gain >= TARGET_PSNR_GAIN_DB, "defect_ratio": defect >= TARGET_DEFECT_RATIO,
             "bright_ratio": bright <= TARGET_BRIGHT_RATIO}
    out: dict = {"resamples": resamples, "seed": seed, "frames": k}
    for name, v in (("psnr_gain_db", gain), ("defect_ratio", defect), ("bright_ratio", bright)):
        out[name] = [float(q) for q in np.nanpercentile(v, [5, 50, 95])]
        out[f"share_meeting_{name}"] = float(np.mean(meets[name]))
    out["share_meeting_all"] = float(np.mean(meets["psnr_gain_db"] & meets["defect_ratio"] & meets["bright_ratio"]))
    return out


def defects_frame_by_frame(model: Sequence[FrameMetrics], baseline: Sequence[FrameMetrics],
                           saturation_artefacts: Sequence[bool]) -> dict:
    """The defect-pixel comparison of a model with a baseline frame by frame, and in two groups of frames.

    The pooled defect RMSE (:func:`target_quantities`) is decided by the frames with the most and
    the worst defect pixels: those where saturation left glints and blooming, thousands of pixels
    far off, which no 3x3 window can repair. This says how the model does elsewhere: in the frames
    whose defects are only dead, hot, line and radiation pixels (``saturation_artefacts[i]`` False:
    frame i has no bloom or glint pixel), and frame by frame (per-frame ratio baseline / model of
    the defect RMSEs, over the frames that have defect pixels).
    """
    k = len(model)
    if not (len(baseline) == len(saturation_artefacts) == k):
        raise MetricsError(f"need the same frames for both methods, got {k}/{len(baseline)}/{len(saturation_artefacts)}")

    def pooled(group: list[int]) -> float:
        se_m = sum(model[i].se_defect for i in group)
        se_b = sum(baseline[i].se_defect for i in group)
        return math.sqrt(se_b / se_m) if se_m > 0 else math.nan

    with_defects = [i for i in range(k) if model[i].n_defect > 0]
    ratios = [math.sqrt(baseline[i].se_defect / model[i].se_defect) if model[i].se_defect > 0 else math.inf
              for i in with_defects]
    sat = [i for i in with_defects if saturation_artefacts[i]]
    rest = [i for i in with_defects if not saturation_artefacts[i]]
    return {
        "frames_with_defects": len(with_defects),
        "frames_model_better": int(sum(r > 1.0 for r in ratios)),
        "median_frame_ratio": float(np.median(ratios)) if ratios else math.nan,
        "frames_with_saturation_artefacts": len(sat),
        "pooled_ratio_with_saturation_artefacts": pooled(sat),
        "frames_without": len(rest),
        "pooled_ratio_without": pooled(rest),
    }
