"""Normalisation: pure functions, property-tested round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cdae.engine.normalise import (
    NormalisationConfig,
    NormalisationError,
    adc_max_for,
    denormalise,
    network_input,
    to_dtype,
)

CFG = NormalisationConfig()


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.uint16, st.tuples(st.integers(1, 40), st.integers(1, 40)), elements=st.integers(0, 65535)),
)
def test_round_trip_uint16(frame: np.ndarray) -> None:
    x, offset, scale = network_input(frame, 65535.0, CFG)
    assert x.shape == (2, *frame.shape) and x.dtype == np.float32
    back = to_dtype(denormalise(x[0], offset, scale), np.uint16, 65535.0)
    assert back.dtype == np.uint16
    assert np.abs(back.astype(np.int64) - frame.astype(np.int64)).max() <= 1
    np.testing.assert_array_equal(x[1] == 1.0, frame == 65535)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 30), st.integers(1, 30)),
              elements=st.floats(-1e4, 1e4, allow_nan=False, width=32)))
def test_round_trip_float32(frame: np.ndarray) -> None:
    x, offset, scale = network_input(frame, math.inf, CFG)
    assert scale > 0 and not x[1].any()
    back = denormalise(x[0], offset, scale)
    np.testing.assert_allclose(back, frame, rtol=1e-4, atol=1e-2 * max(1.0, scale))


def test_scale_floor_on_flat_frame() -> None:
    frame = np.full((32, 32), 100, np.uint16)
    x, offset, scale = network_input(frame, 4095.0, CFG)
    assert offset == 100 and scale == pytest.approx(CFG.min_scale_fraction * 4095)
    assert np.all(x[0] == 0)


def test_adc_max() -> None:
    assert adc_max_for(np.uint8) == 255 and adc_max_for(np.uint16) == 65535
    assert adc_max_for(np.uint16, 12) == 4095 and math.isinf(adc_max_for(np.float32))
    with pytest.raises(NormalisationError, match="unsupported frame dtype"):
        adc_max_for(np.complex64)
    with pytest.raises(NormalisationError, match="bit depth"):
        adc_max_for(np.uint16, 40)


def test_to_dtype_clips_to_bit_depth_and_type() -> None:
    out = to_dtype(np.array([-5.0, 1.4, 5000.0]), np.uint16, 4095.0)
    np.testing.assert_array_equal(out, [0, 1, 4095])
    out = to_dtype(np.array([-40000.0, 40000.0]), np.int16, adc_max_for(np.int16))
    np.testing.assert_array_equal(out, [-32768, 32767])


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4), np.uint16), np.zeros(5, np.uint16)])
def test_rejects_non_2d(bad: np.ndarray) -> None:
    with pytest.raises(NormalisationError, match="2-D"):
        network_input(bad, 65535.0, CFG)


def test_rejects_inf() -> None:
    f = np.zeros((8, 8), np.float32)
    f[0, 0] = np.inf
    with pytest.raises(NormalisationError, match="1 NaN/Inf"):
        network_input(f, math.inf, CFG)
