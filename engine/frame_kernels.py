"""The frame path's whole-frame conversions, compiled (engine/_frame.c), each with the NumPy it replaces.

Three conversions run on every frame whatever the model: an integer frame into the network input
(:func:`cdae.engine.normalise.network_input`), the output back to the camera's integer type
(:func:`cdae.engine.normalise.to_dtype`) and the defect probability into the wire's uint8
(:func:`cdae.engine.protocol.defect_map_to_wire`). In NumPy each is three to five passes over the frame with a
frame-sized temporary each; compiled, one pass, the same bits (tests/engine/test_frame_kernels.py). Each function
here returns None where the compiled pass does not apply (no C compiler at install, another dtype, a NaN to
cast) and the caller runs its NumPy. Standard library and NumPy only.
"""

from __future__ import annotations

import numpy as np

try:  # engine/_frame.c, built at install; without a C compiler every caller runs its NumPy, the same bits
    from cdae.engine import _frame
except ImportError:  # pragma: no cover - an install without the compiled conversions
    _frame = None

_ON = [True]
#: Camera types whose every value a float32 holds exactly (the network input's pass takes these).
EXACT_IN_FLOAT32 = frozenset({np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16)})
#: Integer types the output cast writes.
INTEGER_OUTPUTS = frozenset({np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.int32)})


def compiled() -> bool:
    """Whether the conversions run engine/_frame.c (built at install), not NumPy."""
    return _frame is not None and _ON[0]


def use_compiled(on: bool) -> None:
    """Run the compiled conversions where they are built (the default), or NumPy's (to compare them)."""
    _ON[0] = bool(on)


def _f32(a: np.ndarray) -> bool:
    return a.dtype == np.float32 and a.flags.c_contiguous


def normalise_into(frame: np.ndarray, offset: float, scale: float, adc_max: float, x: np.ndarray) -> bool:
    """x[0] = (float32(frame) - offset) * float32(1 / scale), x[1] = float32(frame) >= adc_max - 0.5 (all 0 for an
    infinite ``adc_max``), as network_input's NumPy computes them; False (x untouched) where it does not apply."""
    if not compiled() or frame.dtype not in EXACT_IN_FLOAT32 or not (x.flags.c_contiguous and x.dtype == np.float32):
        return False
    saturates = bool(np.isfinite(adc_max))
    _frame.normalise(np.ascontiguousarray(frame), frame.dtype.char, float(np.float32(offset)),
                     float(np.float32(1.0 / scale)), float(np.float32(adc_max - 0.5)) if saturates else 0.0, saturates,
                     x[0], x[1])
    return True


def to_integer(frame_dn: np.ndarray, dtype: np.dtype, lo: float, hi: float) -> np.ndarray | None:
    """``dtype(clip(rint(frame_dn), lo, hi))`` (float32 bounds ``dtype`` holds); None where it does not apply or
    ``frame_dn`` holds a NaN (NumPy casts those its own way)."""
    if not compiled() or dtype not in INTEGER_OUTPUTS or not _f32(frame_dn):
        return None
    out = np.empty(frame_dn.shape, dtype)
    return out if _frame.to_integer(frame_dn, lo, hi, dtype.char, out) == 0 else None


def probability_to_uint8(probability: np.ndarray) -> np.ndarray | None:
    """``uint8(rint(clip(p, 0, 1) * 255))``; None where it does not apply or ``p`` holds a NaN."""
    if not compiled() or not _f32(probability):
        return None
    out = np.empty(probability.shape, np.uint8)
    return out if _frame.probability_to_uint8(probability, out) == 0 else None
