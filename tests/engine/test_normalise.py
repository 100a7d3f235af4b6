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


def test_bit_depth_inferred_from_the_data_fits_the_type_and_deep_cameras() -> None:
    """A signed type holds one bit less than its size (int16 above 16383 is 15-bit, not 16: full scale 32767, not
    a level it cannot hold); 18-24-bit cameras in 32-bit containers are told apart from a 32-bit one."""
    from cdae.engine.normalise import infer_bit_depth

    assert infer_bit_depth(np.array([[0, 4095]], np.uint16)) == 12
    assert infer_bit_depth(np.array([[0, 32767]], np.int16)) == 15
    assert infer_bit_depth(np.array([[0, 127]], np.int8)) == 7
    assert infer_bit_depth(np.array([[0, 200]], np.uint8)) == 8
    assert infer_bit_depth(np.array([[0, 453286]], np.uint32)) == 20
    assert infer_bit_depth(np.array([[0, 2**24 - 1]], np.int32)) == 24
    assert infer_bit_depth(np.array([[0, 2**24]], np.int32)) == 31
    assert infer_bit_depth(np.array([[-1, 5]], np.int16)) is None


def test_a_32_bit_frame_without_a_bit_depth_is_scaled_by_its_own_range() -> None:
    """Without a bit depth a 32-bit container's full scale is 2**31 - 1 or 2**32 - 1, no camera's: the scale floor
    (a fraction of full scale, against amplifying a flat dark frame) then flattened every real frame. The same
    16-bit data in int32 or uint32 gets the uint16 frame's offset and scale."""
    from cdae.engine.normalise import frame_offset_scale

    rng = np.random.default_rng(5)
    data = np.rint(rng.normal(8000, 300, (128, 128)))
    cfg = NormalisationConfig()
    ref = frame_offset_scale(data.astype(np.uint16), adc_max_for(np.uint16), cfg)
    for dt in (np.int32, np.uint32):
        offset, scale = frame_offset_scale(data.astype(dt), adc_max_for(dt), cfg)
        assert offset == pytest.approx(ref[0]) and scale == pytest.approx(ref[1], rel=1e-6)
