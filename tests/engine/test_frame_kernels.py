"""engine/_frame.c against the NumPy it replaces: the network input of an integer frame, the cast back to the
camera's type and the defect probability's uint8, bit for bit, on the values where NumPy's own corner cases live
(halves that round to even, out-of-range and signed zeros, NaN, which the compiled casts hand back to NumPy)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from cdae.engine import frame_kernels
from cdae.engine.normalise import NormalisationConfig, adc_max_for, network_input, to_dtype
from cdae.engine.protocol import defect_map_to_wire

pytestmark = pytest.mark.skipif(frame_kernels._frame is None, reason="engine/_frame.c was not built (no C compiler?)")


@pytest.fixture
def both() -> Iterator[None]:
    yield
    frame_kernels.use_compiled(True)


def _numpy_and_compiled(fn):  # noqa: ANN001, ANN202
    frame_kernels.use_compiled(False)
    expected = fn()
    frame_kernels.use_compiled(True)
    return expected, fn()


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint8)


def test_network_input_of_integer_frames_is_numpys(both: None) -> None:
    rng = np.random.default_rng(3)
    full_well = NormalisationConfig(full_well="detect+dark")
    cases = []
    for dtype, bits in ((np.uint16, 12), (np.uint16, None), (np.uint8, None), (np.int16, None)):
        info = np.iinfo(dtype)
        hi = 2**bits - 1 if bits else info.max
        f = rng.integers(max(info.min, -500), hi + 1, (97, 131)).astype(dtype)
        f[10:20, 10:30] = hi  # saturated
        cases.append((f, bits))
    blob = np.clip(rng.normal(800, 20, (256, 256)), 0, 4095).astype(np.uint16)
    blob[60:140, 60:140] = np.clip(rng.normal(3000, 2, (80, 80)), 0, 4095).astype(np.uint16)  # a full well
    cases += [(blob, 12), (np.zeros((8, 8), np.uint16), 12), (np.full((5, 7), 4095, np.uint16), 12)]
    for f, bits in cases:
        for config in (NormalisationConfig(), full_well):
            adc = adc_max_for(f.dtype, bits)
            (x0, o0, s0), (x1, o1, s1) = _numpy_and_compiled(lambda: network_input(f, adc, config))
            assert (o0, s0) == (o1, s1)
            assert np.array_equal(_bits(x0), _bits(x1)), (f.dtype, bits, config.full_well)
    # a strided view (a region of interest) and an infinite full scale (no saturation mask)
    view = cases[0][0][::2, 1:]
    (x0, *_), (x1, *_) = _numpy_and_compiled(lambda: network_input(view, 4095.0, NormalisationConfig()))
    assert np.array_equal(_bits(x0), _bits(x1))
    (x0, *_), (x1, *_) = _numpy_and_compiled(lambda: network_input(blob, np.inf, NormalisationConfig()))
    assert np.array_equal(_bits(x0), _bits(x1)) and not x1[1].any()
    assert frame_kernels.normalise_into(blob, 800.0, 2000.0, 4095.0, np.empty((2, 256, 256), np.float32))  # it ran
    assert not frame_kernels.normalise_into(blob.astype(np.int32), 800.0, 2000.0, 4095.0, x1)  # NumPy's turn


def test_the_cast_to_the_camera_type_is_numpys(both: None) -> None:
    rng = np.random.default_rng(4)
    edges = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -0.0, 0.0, 4094.5, 4095.5, 1e30, -1e30, np.inf, -np.inf, 65535.5,
                      32767.5, -32768.5, 2.0**31, -2.0**31, 254.5, 255.5, 1e-40], np.float32)
    values = np.concatenate([edges, rng.normal(2000, 3000, 5000).astype(np.float32),
                             (rng.integers(-70000, 70000, 2000) + 0.5).astype(np.float32)]).reshape(-1, 7)
    for dtype, adc in ((np.uint16, 4095.0), (np.uint16, 65535.0), (np.uint8, 255.0), (np.int16, 32767.0),
                       (np.int32, float(2**31 - 1)), (np.uint16, np.inf)):
        expected, got = _numpy_and_compiled(lambda: to_dtype(values, dtype, adc))
        assert got.dtype == expected.dtype and np.array_equal(got, expected), (dtype, adc)
    assert frame_kernels.to_integer(values, np.dtype(np.uint16), 0.0, 4095.0) is not None  # it ran
    with_nan = values.copy()
    with_nan[3, 2] = np.nan  # handed back to NumPy: the same (platform's) cast as before
    with np.errstate(invalid="ignore"):
        expected, got = _numpy_and_compiled(lambda: to_dtype(with_nan, np.uint16, 4095.0))
    assert np.array_equal(got, expected)


def test_the_defect_map_bytes_are_numpys(both: None) -> None:
    rng = np.random.default_rng(5)
    p = np.concatenate([rng.random(4000), [0.5 / 255, 1.5 / 255, 2.5 / 255, -0.1, 1.7, -0.0, 1.0, 0.0, np.inf,
                                           -np.inf, 1e-40]]).astype(np.float32)
    p = np.concatenate([p, (np.arange(256) + 0.5).astype(np.float32) / np.float32(255)])
    expected, got = _numpy_and_compiled(lambda: defect_map_to_wire(p, "uint8"))
    assert np.array_equal(got, expected) and frame_kernels.probability_to_uint8(p) is not None
    p[7] = np.nan
    with np.errstate(invalid="ignore"):
        expected, got = _numpy_and_compiled(lambda: defect_map_to_wire(p, "uint8"))
    assert np.array_equal(got, expected)
