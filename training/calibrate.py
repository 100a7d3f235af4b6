"""Calibrate a model's defect head for the guard: the threshold above which the head may release a pixel
from the noise bound ("learned" flags), chosen so that real bright structure is rarely released.

Conformal risk control (Angelopoulos, Bates, Fisch, Lei, Schuster, 2022): for frames exchangeable
with the calibration frames and a loss ``L_i(t)`` in [0, 1] that does not grow with the threshold
``t``, the smallest ``t`` with ``n / (n + 1) * mean_i L_i(t) + 1 / (n + 1) <= alpha`` keeps the
expected loss of a new frame at most ``alpha``. The loss here is the share of a frame's real
bright-feature pixels (the brightest 1 % of real light, not defects, not saturated) that the head
would flag, as the guard serves the flag (where the pixel also passes the guard's evidence test,
``engine.guard.impulse_evidence``): what the issue calls painting real structure over. The frames are the simulator's
validation frames (the held-out set stays for evaluation), so the guarantee holds for scenes like
those; the real-scene evaluation says how far it carries.

With a confidence ``1 - delta`` (``delta`` given), the threshold is instead chosen as a risk-
controlling prediction set (Bates, Angelopoulos, Lei, Malik, Jordan, 2021): scanning thresholds from
the top down, the lowest before the first whose Hoeffding-Bentkus upper confidence bound on the mean
loss exceeds ``alpha``; then, with probability at least ``1 - delta`` over the calibration frames,
the expected share of a new frame's real bright pixels flagged is at most ``alpha``. This needs more
frames: even with no loss at all the bound is ``1 - delta^(1/n)``, about ``log(1 / delta) / n``.

Writes ``guard-calibration.json`` beside the package's manifest (the weights and manifest are not
touched), which the guard reads when its threshold is ``"calibrated"`` (the default).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binom

from cdae import __version__
from cdae.engine.guard import CALIBRATION_FILE, LEARNED, GuardConfig
from cdae.engine.inference import Denoiser
from cdae.engine.pipeline import denoise_frame
from cdae.training.config import DataConfig
from cdae.training.dataset import simulated_frames
from cdae.training.defects import BLOOM, SATURATED_BLOB
from cdae.training.evaluate import DEFAULT_SIZES
from cdae.training.metrics import EvalFrame, bright_feature_mask
from cdae.training.simulate import GENERATOR_VERSION


@dataclass(frozen=True)
class Calibration:
    defect_threshold: float | None  # None: no threshold meets alpha on these frames
    alpha: float
    frames: int
    frames_with_bright: int
    risk_bound: float  # :func:`risk_bound` at the threshold (at t = 1 without one)
    mean_loss: float  # mean share of a frame's real bright pixels flagged
    worst_frame_loss: float
    real_pixels_flagged: float  # share of all real pixels flagged, pooled
    defect_pixels_flagged: float  # recall of the head on true defect pixels, pooled
    delta: float | None = None  # None: in expectation over calibration sets; else with confidence 1 - delta


#: The lowest threshold calibration considers (the head's own decision boundary).
THRESHOLD_FLOOR = 0.5


def _losses(probabilities: Sequence[np.ndarray], brights: Sequence[np.ndarray], t: float) -> np.ndarray:
    return np.array([float((p[b] > t).mean()) if b.any() else 0.0 for p, b in zip(probabilities, brights)])


def hoeffding_bentkus_ucb(mean_loss: float, n: int, delta: float) -> float:
    """An upper confidence bound at level ``1 - delta`` on the mean of ``n`` i.i.d. losses in [0, 1] with
    empirical mean ``mean_loss`` (Bates et al. 2021, eq. 9: the smaller of Hoeffding's and Bentkus' tail
    bounds, inverted by bisection)."""
    r_hat = min(max(float(mean_loss), 0.0), 1.0)

    def p_value(r: float) -> float:
        a = min(r_hat, r)
        if r >= 1.0:
            return 0.0
        h1 = (a * math.log(a / r) if a > 0 else 0.0) + ((1 - a) * math.log((1 - a) / (1 - r)) if a < 1 else 0.0)
        hoeffding = math.exp(-n * h1)
        bentkus = math.e * float(binom.cdf(math.ceil(n * r_hat), n, r))
        return min(hoeffding, bentkus)

    lo, hi = r_hat, 1.0
    if p_value(lo) <= delta:
        return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if p_value(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def risk_bound(mean_loss: float, n: int, delta: float | None) -> float:
    """The bound a threshold is held to on ``n`` frames: conformal (``n / (n + 1) * mean + 1 / (n + 1)``) or,
    with ``delta``, the Hoeffding-Bentkus upper confidence bound."""
    return n / (n + 1) * mean_loss + 1.0 / (n + 1) if delta is None else hoeffding_bentkus_ucb(mean_loss, n, delta)


def choose_threshold(probabilities: Sequence[np.ndarray], brights: Sequence[np.ndarray], alpha: float,
                     delta: float | None = None) -> tuple[float | None, float]:
    """The defect threshold and its risk bound: conformal risk control (``delta`` None: the smallest ``t``
    whose bound meets ``alpha``), or with confidence ``1 - delta`` the RCPS choice (thresholds from the top
    down, the lowest before the first whose upper confidence bound exceeds ``alpha``). (None, bound at
    the highest candidate) when no threshold meets ``alpha``."""
    if not 0 < alpha < 1 or (delta is not None and not 0 < delta < 1):
        raise ValueError(f"alpha and delta must lie in (0, 1), got {alpha}, {delta}")
    n = len(probabilities)
    candidates = np.unique(np.concatenate([np.linspace(THRESHOLD_FLOOR, 0.999, 500)] +
                                          [p[b] for p, b in zip(probabilities, brights) if b.any()]))
    candidates = candidates[(candidates >= THRESHOLD_FLOOR) & (candidates < 1.0)]

    def bound(t: float) -> float:
        return risk_bound(float(_losses(probabilities, brights, t).mean()), n, delta)

    # losses fall as t grows, and so does either bound: bisect for the smallest t that meets alpha (for the
    # confidence bound this is the fixed-sequence choice from the top: every t above it meets alpha too)
    top = bound(float(candidates[-1]))
    if top > alpha:
        return None, top
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if bound(float(candidates[mid])) <= alpha:
            hi = mid
        else:
            lo = mid + 1
    chosen = float(candidates[lo])
    return chosen, bound(chosen)


def calibrate(denoiser: Denoiser, frames: Sequence[EvalFrame], alpha: float = 0.01,
              delta: float | None = None, guard_config: GuardConfig | None = None) -> Calibration:
    """The threshold of :func:`choose_threshold` on ``frames``, with what it flags there (with no threshold:
    what flagging nothing, ``t = 1``, gives). The head's probability counts where the guard (``guard_config``,
    the default one if None) would let a learned flag stand at the floor threshold: its evidence test passed,
    not an impulse or saturated pixel (those are other classes' flags)."""
    g = (guard_config or GuardConfig()).model_copy(update={"defect_threshold": THRESHOLD_FLOOR})
    probs, brights, reals, defects = [], [], [], []
    for fr in frames:
        r = denoise_frame(np.asarray(fr.noisy, np.float32), denoiser.backend, adc_max=float(fr.adc_max),
                          want_residual=False, guard_config=g)
        lost = ((fr.defect_mask & (BLOOM | SATURATED_BLOB)) != 0) | (fr.clean >= fr.adc_max - 0.5)
        assert r.flags is not None
        probs.append(np.where(r.flags == LEARNED, r.defect_probability, np.float32(0)))
        brights.append(bright_feature_mask(fr.clean, fr.defect_mask) & ~lost)
        reals.append((fr.defect_mask == 0) & ~lost)
        defects.append((fr.defect_mask != 0) & ~lost)
    n = len(frames)
    chosen, _ = choose_threshold(probs, brights, alpha, delta)
    t_eval = chosen if chosen is not None else 1.0
    losses = _losses(probs, brights, t_eval)
    real_flagged = sum(int((p[m] > t_eval).sum()) for p, m in zip(probs, reals)) / max(sum(int(m.sum()) for m in reals), 1)
    defect_flagged = sum(int((p[m] > t_eval).sum()) for p, m in zip(probs, defects)) / max(
        sum(int(m.sum()) for m in defects), 1)
    return Calibration(
        defect_threshold=chosen, alpha=alpha, frames=n, frames_with_bright=sum(int(b.any()) for b in brights),
        risk_bound=risk_bound(float(losses.mean()), n, delta),
        mean_loss=float(losses.mean()),
        worst_frame_loss=float(losses.max()) if losses.size else math.nan, real_pixels_flagged=real_flagged,
        defect_pixels_flagged=defect_flagged, delta=delta,
    )


def calibrate_package(pkg: Path, frames: int = 192, alpha: float = 0.01, data: DataConfig | None = None,
                      delta: float | None = None) -> Calibration:
    """Calibrate the package's head on ``frames`` validation frames; write ``CALIBRATION_FILE`` beside it."""
    data = data or DataConfig()
    den = Denoiser.from_package(pkg)
    g = GuardConfig()
    result = calibrate(den, simulated_frames(data, data.val_seed, 0, frames, DEFAULT_SIZES), alpha, delta, g)
    method = ("conformal risk control (Angelopoulos et al. 2022): E[share of a new frame's real bright-feature "
              "pixels flagged] <= alpha for frames like the calibration frames") if delta is None else (
              "risk-controlling threshold (Bates et al. 2021, Hoeffding-Bentkus bound): with probability >= 1 - "
              "delta over the calibration frames, E[share of a new frame's real bright-feature pixels flagged] "
              "<= alpha for frames like them")
    record = {
        **asdict(result),
        "method": method,
        "calibration_frames": {"generator": GENERATOR_VERSION, "seed": data.val_seed, "frames": frames,
                               "sizes": [list(s) for s in DEFAULT_SIZES]},
        "evidence": {"learned_evidence_sigma": g.learned_evidence_sigma, "learned_evidence_psf_px":
                     g.learned_evidence_psf_px, "learned_peak_sigma": g.learned_peak_sigma,
                     "learned_line_peaks": g.learned_line_peaks, "line_length": g.line_length,
                     "psf_sigma_px": g.psf_sigma_px, "k_sigma": g.k_sigma,
                     "noise_model": "measured per frame (engine.guard.measure_noise: 3x3 blocks)"},
        "model": den.manifest.ref, "cdae_version": __version__,
        "made_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (Path(pkg) / CALIBRATION_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return result
