"""Robust statistics the engine and training share: the standard deviation of a Gaussian from its MAD.

numpy only. One formula, so the frame path (normalisation, the guard's noise model) and the
training side (camera characterisation, metrics) estimate noise alike, to the bit.
"""

from __future__ import annotations

import numpy as np

#: 1 / Φ⁻¹(3/4): a Gaussian's standard deviation over its median absolute deviation.
MAD_TO_SIGMA = 1.4826


def mad_sigma(a: np.ndarray, median: float | None = None) -> float:
    """``MAD_TO_SIGMA`` × median |a − median| (``a``'s own median unless given), in ``a``'s precision; 0.0 if empty."""
    if not a.size:
        return 0.0
    return MAD_TO_SIGMA * float(np.median(np.abs(a - (np.median(a) if median is None else median))))
