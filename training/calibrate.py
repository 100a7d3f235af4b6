"""Calibrate a model's defect head for the guard: the threshold above which the head may release a pixel
from the noise bound ("learned" flags), chosen so that real bright structure is rarely released.

Conformal risk control (Angelopoulos, Bates, Fisch, Lei, Schuster, 2022): for frames exchangeable
with the calibration frames and a loss ``L_i(t)`` in [0, 1] that does not grow with the threshold
``t``, the smallest ``t`` with ``n / (n + 1) * mean_i L_i(t) + 1 / (n + 1) <= alpha`` keeps the
expected loss of a new frame at most ``alpha``. The loss here is the share of a frame's real
bright-feature pixels (the brightest 1 % of real light, not defects, not saturated) that the head
would flag: what the issue calls painting real structure over. The frames are the simulator's
validation frames (the held-out set stays for evaluation), so the guarantee holds for scenes like
those; the real-scene evaluation says how far it carries.

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

from cdae import __version__
from cdae.engine.guard import CALIBRATION_FILE
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
    risk_bound: float  # n / (n + 1) * mean loss + 1 / (n + 1) at the threshold
    mean_loss: float  # mean share of a frame's real bright pixels flagged
    worst_frame_loss: float
    real_pixels_flagged: float  # share of all real pixels flagged, pooled
    defect_pixels_flagged: float  # recall of the head on true defect pixels, pooled


def _losses(probabilities: Sequence[np.ndarray], brights: Sequence[np.ndarray], t: float) -> np.ndarray:
    return np.array([float((p[b] > t).mean()) if b.any() else 0.0 for p, b in zip(probabilities, brights)])


def calibrate(denoiser: Denoiser, frames: Sequence[EvalFrame], alpha: float = 0.01) -> Calibration:
    """The smallest threshold whose conformal risk bound on ``frames`` is at most ``alpha``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    probs, brights, reals, defects = [], [], [], []
    for fr in frames:
        r = denoise_frame(np.asarray(fr.noisy, np.float32), denoiser.backend, adc_max=float(fr.adc_max),
                          want_residual=False)
        lost = ((fr.defect_mask & (BLOOM | SATURATED_BLOB)) != 0) | (fr.clean >= fr.adc_max - 0.5)
        probs.append(r.defect_probability)
        brights.append(bright_feature_mask(fr.clean, fr.defect_mask) & ~lost)
        reals.append((fr.defect_mask == 0) & ~lost)
        defects.append((fr.defect_mask != 0) & ~lost)
    n = len(frames)
    candidates = np.unique(np.concatenate([np.linspace(0.5, 0.999, 500)] +
                                          [p[b] for p, b in zip(probs, brights) if b.any()]))
    candidates = candidates[(candidates >= 0.5) & (candidates < 1.0)]
    chosen = None
    for t in candidates:  # losses fall as t grows: the first that meets the bound is the smallest
        bound = n / (n + 1) * float(_losses(probs, brights, float(t)).mean()) + 1.0 / (n + 1)
        if bound <= alpha:
            chosen = float(t)
            break
    t_eval = chosen if chosen is not None else 1.0
    losses = _losses(probs, brights, t_eval)
    real_flagged = sum(int((p[m] > t_eval).sum()) for p, m in zip(probs, reals)) / max(sum(int(m.sum()) for m in reals), 1)
    defect_flagged = sum(int((p[m] > t_eval).sum()) for p, m in zip(probs, defects)) / max(
        sum(int(m.sum()) for m in defects), 1)
    return Calibration(
        defect_threshold=chosen, alpha=alpha, frames=n, frames_with_bright=sum(int(b.any()) for b in brights),
        risk_bound=n / (n + 1) * float(losses.mean()) + 1.0 / (n + 1), mean_loss=float(losses.mean()),
        worst_frame_loss=float(losses.max()) if losses.size else math.nan, real_pixels_flagged=real_flagged,
        defect_pixels_flagged=defect_flagged,
    )


def calibrate_package(pkg: Path, frames: int = 192, alpha: float = 0.01, data: DataConfig | None = None) -> Calibration:
    """Calibrate the package's head on ``frames`` validation frames; write ``CALIBRATION_FILE`` beside it."""
    data = data or DataConfig()
    den = Denoiser.from_package(pkg)
    result = calibrate(den, simulated_frames(data, data.val_seed, 0, frames, DEFAULT_SIZES), alpha)
    record = {
        **asdict(result),
        "method": "conformal risk control (Angelopoulos et al. 2022): E[share of a new frame's real bright-feature "
                  "pixels flagged] <= alpha for frames like the calibration frames",
        "calibration_frames": {"generator": GENERATOR_VERSION, "seed": data.val_seed, "frames": frames,
                               "sizes": [list(s) for s in DEFAULT_SIZES]},
        "model": den.manifest.ref, "cdae_version": __version__,
        "made_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (Path(pkg) / CALIBRATION_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return result
