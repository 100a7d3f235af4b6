"""Robust statistics the engine and training share: the standard deviation of a Gaussian from its MAD, and
order statistics without NumPy's generic machinery.

numpy only. One formula, so the frame path (normalisation, the guard's noise model) and the
training side (camera characterisation, metrics) estimate noise alike, to the bit. The order statistics
(:func:`median`, :func:`sorted_values`, :func:`percentile_of_sorted`) give ``np.median``'s and
``np.percentile``'s numbers bit for bit (tests compare them on random data); they exist because a frame's
percentiles are a fixed cost of every frame, and a camera's pixels are integers that sort by counting.
"""

from __future__ import annotations

import math

import numpy as np

#: 1 / Φ⁻¹(3/4): a Gaussian's standard deviation over its median absolute deviation.
MAD_TO_SIGMA = 1.4826


def mad_sigma(a: np.ndarray, median: float | None = None) -> float:
    """``MAD_TO_SIGMA`` × median |a − median| (``a``'s own median unless given), in ``a``'s precision; 0.0 if empty."""
    if not a.size:
        return 0.0
    med = _median if a.ndim == 1 and a.dtype.char in "fd" else np.median  # the same numbers either way
    return MAD_TO_SIGMA * float(med(np.abs(a - (med(a) if median is None else median))))


#: :func:`sorted_values` sorts by counting the integers below this (a 20-bit camera's range).
COUNTING_SPAN = 1 << 20


def median(a: np.ndarray, ordered: bool = False) -> np.floating:
    """``np.median`` of a 1-D float array without its generic machinery: the same order statistics and the
    same mean of the middle two (``(x + y) / 2``, rounded once), NaN if ``a`` has one. ``ordered``: ``a`` is
    sorted already (NaNs last), nothing to partition."""
    n = a.size
    if n == 0:
        return np.median(a)
    half = n // 2
    part = a if ordered else np.partition(a, [half - 1, half, -1] if n % 2 == 0 else [half, -1])
    if np.isnan(part[-1]):
        return a.dtype.type(np.nan)
    zero = a.dtype.type(0)  # np.median's mean sums from +0: a middle -0.0 comes out +0.0
    return part[half] + zero if n % 2 else (part[half - 1] + zero + part[half]) / a.dtype.type(2)


_median = median  # for mad_sigma, whose argument of that name is older


def sorted_values(a: np.ndarray) -> np.ndarray:
    """``np.sort`` of a 1-D float array. Non-negative integers below ``COUNTING_SPAN`` (an integer camera's
    pixels) sort by counting, in one pass; anything else (fractions, negatives, -0.0,
    NaN, infinities) by ``np.sort``. Either way the same values in the same order: equal values are
    indistinguishable, and -0.0 never takes the counting path."""
    if a.size:
        lo, hi = a.min(), a.max()  # NaN if a holds one
        if 0 <= lo and hi < COUNTING_SPAN and not np.signbit(a).any() and np.array_equal(a, np.rint(a)):
            start = int(lo)
            counts = np.bincount((a - lo).astype(np.intp))
            return np.repeat(np.arange(start, start + counts.size).astype(a.dtype), counts)
    return np.sort(a)


def percentile_of_sorted(s: np.ndarray, q: float | list[float]) -> np.floating | np.ndarray:
    """``np.percentile(a, q)`` (method ``linear``) of any ``a`` whose sorted values are ``s`` (NaN-free),
    without partitioning: NumPy's virtual index, neighbours and two-sided interpolation, in its dtypes (a
    Python-number ``q`` gives ``s``'s dtype, a list float64). One exception, of sign only: where ``a`` holds both
    -0.0 and +0.0 and the percentile is zero, its sign may differ from NumPy's, whose own depends on how its
    partition happened to leave the two zeros (a camera's integer pixels never take the sorted path with -0.0)."""
    n = s.size
    qs = np.true_divide(q, 100)
    if n == 0 or np.isnan(s[-1]) or not np.all((qs >= 0) & (qs <= 1)):
        return np.percentile(s, q)  # NumPy's error, or its NaN
    weak = type(q) in (int, float)
    virtual = np.asanyarray((n - 1) * qs)
    prev = np.floor(virtual, out=...)
    nxt = np.add(prev, 1, out=...)
    above = virtual >= n - 1
    prev[above] = -1  # as NumPy: past the end, both neighbours are the last value
    nxt[above] = -1
    below = virtual < 0
    prev[below] = 0
    nxt[below] = 0
    gamma = np.asanyarray(virtual - prev, dtype=virtual.dtype)
    prev_i, next_i = prev.astype(np.intp), nxt.astype(np.intp)
    a, b = s[prev_i], s[next_i]
    t = float(gamma) if weak else gamma  # a Python float keeps s's dtype (NumPy's weak promotion)
    diff = b - a
    out = np.add(a, diff * t, out=...)
    np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5, casting="unsafe", dtype=type(out.dtype))
    return out[()] if out.ndim == 0 else out  # a scalar q: a scalar, as NumPy's


def percentile(a: np.ndarray, q: float) -> np.floating:
    """``np.percentile(a, q)`` (method ``linear``) for one ``q`` of a float array (flattened), from a partition at
    the two order statistics it reads (and the last, for NaN) instead of NumPy's generic machinery: the same number."""
    flat = np.asarray(a).reshape(-1)
    if flat.dtype.kind in "iu" and flat.dtype.itemsize <= 4:  # NumPy interpolates in float64: exact for these
        flat = flat.astype(np.float64)
    n = flat.size
    if n == 0 or flat.dtype.kind != "f" or not 0 <= q <= 100:
        return np.percentile(flat, q)  # NumPy's own (64-bit integers, bool, complex), its error, or its NaN
    i = min(int(math.floor((n - 1) * (q / 100))), n - 1)
    return percentile_of_sorted(np.partition(flat, sorted({i, min(i + 1, n - 1), n - 1})), q)
