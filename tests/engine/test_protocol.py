"""Wire protocol: pure encode/decode round trips, every error it must name, and fuzzing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdae.engine.protocol import (
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    ControlReply,
    ControlRequest,
    FrameRequestHeader,
    ProtocolError,
    decode_control_reply,
    decode_control_request,
    decode_reply,
    decode_request,
    encode_control_reply,
    encode_control_request,
    encode_request,
    error_reply,
    error_reply_for,
    ok_reply,
    request_header_for,
)


def _frame(dtype: str, shape: tuple[int, int] = (5, 7)) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype == "float32":
        return rng.normal(100, 10, size=shape).astype(np.float32)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _bytes(parts: list) -> list[bytes]:
    return [bytes(p) for p in parts]


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_request_round_trip(dtype: str) -> None:
    frame = _frame(dtype)
    header = request_header_for(frame, 41, unique_id=-7, timestamp=1700000000.25, model="m:2", bit_depth=12,
                                want_residual=True, want_defect_map=True, defect_map_dtype="uint8")
    parts = encode_request(header, frame)
    assert len(parts) == 2
    req = decode_request(_bytes(parts))
    assert req.header == header
    assert req.frame.dtype == np.dtype(dtype) and req.frame.shape == (5, 7)
    np.testing.assert_array_equal(req.frame, frame)


def test_decode_is_zero_copy() -> None:
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4)
    header, payload = encode_request(request_header_for(frame, 0), frame)
    buf = bytearray(bytes(payload))
    req = decode_request([bytes(header), buf])
    buf[0] = 0xFF  # the decoded frame is a view of the received buffer, not a copy
    assert req.frame[0, 0] == 0xFF
    assert np.shares_memory(np.asarray(memoryview(payload)), frame)  # and encoding does not copy either


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_reply_round_trip_with_every_part(dtype: str) -> None:
    frame = _frame(dtype, (4, 9))
    header = request_header_for(frame, 3, unique_id=99, timestamp=12.5, want_residual=True, want_defect_map=True)
    residual = np.linspace(-1, 1, 36, dtype=np.float32).reshape(4, 9)
    prob = np.linspace(0, 1, 36, dtype=np.float32).reshape(4, 9)
    parts = ok_reply(header, model="tiny:1", backend="torch-cpu", denoised=frame, residual=residual, defect_map=prob)
    reply = decode_reply(_bytes(parts))
    assert reply.ok and reply.model == "tiny:1" and reply.frame_id == 3 and reply.header.unique_id == 99
    assert reply.header.timestamp == 12.5 and reply.header.backend == "torch-cpu"
    assert [p.name for p in reply.header.parts] == ["denoised", "residual", "defect_map"]
    np.testing.assert_array_equal(reply.denoised, frame)
    assert reply.denoised is not None and reply.denoised.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(reply.residual, residual)
    np.testing.assert_array_equal(reply.defect_map, prob)


def test_reply_sends_only_what_was_asked_and_uint8_defect_map() -> None:
    frame = _frame("uint16", (2, 3))
    prob = np.array([[0, 0.5, 1], [0.25, 0.75, 0.1]], np.float32)
    plain = decode_reply(_bytes(ok_reply(request_header_for(frame, 1), model="m:1", backend="b", denoised=frame,
                                         residual=np.zeros((2, 3), np.float32), defect_map=prob)))
    assert plain.residual is None and plain.defect_map is None
    q = decode_reply(_bytes(ok_reply(request_header_for(frame, 1, want_defect_map=True, defect_map_dtype="uint8"),
                                     model="m:1", backend="b", denoised=frame, defect_map=prob)))
    assert q.defect_map is not None and q.defect_map.dtype == np.uint8
    np.testing.assert_array_equal(q.defect_map, [[0, 128, 255], [64, 191, 26]])


def test_error_reply_round_trip() -> None:
    reply = decode_reply(_bytes(error_reply("dropped", "replaced by a newer frame", frame_id=5, unique_id=6,
                                            model="m:1")))
    assert not reply.ok and reply.error_code == "dropped" and reply.frame_id == 5 and reply.denoised is None
    assert reply.header.error is not None and "newer" in reply.header.error.message


def _good() -> tuple[dict, bytes]:
    frame = np.zeros((4, 6), np.uint16)
    header, payload = encode_request(request_header_for(frame, 17, unique_id=3), frame)
    return json.loads(bytes(header)), bytes(payload)


def _dec(header: dict | bytes, payload: bytes = b"", *more: bytes) -> ProtocolError:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with pytest.raises(ProtocolError) as info:
        decode_request([raw, payload, *more])
    return info.value


def test_errors_say_what_was_expected_and_what_arrived() -> None:
    h, payload = _good()
    with pytest.raises(ProtocolError, match="expected 2 message parts .* got 3") as info:
        decode_request([json.dumps(h).encode(), payload, b"extra"])
    assert info.value.code == "bad_message" and info.value.frame_id == 17  # ids survive to label the reply
    with pytest.raises(ProtocolError, match="got 1"):
        decode_request([b"only one part"])
    e = _dec(b"\xff\xfenot json", payload)
    assert e.code == "bad_message" and "expected a JSON object" in str(e)
    e = _dec(b"[1, 2, 3]", payload)
    assert e.code == "bad_header" and "got list" in str(e)
    e = _dec({**h, "dtype": "complex64"}, payload)
    assert e.code == "bad_header" and "'dtype'" in str(e) and "complex64" in str(e) and e.frame_id == 17
    e = _dec({k: v for k, v in h.items() if k != "frame_id"}, payload)
    assert e.code == "bad_header" and "'frame_id': missing" in str(e)
    e = _dec({**h, "surprise": 1}, payload)
    assert e.code == "bad_header" and "surprise" in str(e)
    e = _dec({**h, "protocol": PROTOCOL_VERSION + 1}, payload)
    assert e.code == "unsupported_version" and str(PROTOCOL_VERSION) in str(e)
    e = _dec(h, payload[:-2])
    assert e.code == "bad_frame" and "expected 48 (4x6 uint16), got 46" in str(e) and e.unique_id == 3
    e = _dec({**h, "shape": [0, 6]}, b"")
    assert e.code == "bad_frame" and "zero-size" in str(e)
    e = _dec({**h, "shape": [100000, 100000]}, payload)
    assert e.code == "too_large" and "10000000000 pixels" in str(e)
    with pytest.raises(ProtocolError, match="exceeds this engine's limit of 20"):
        decode_request([json.dumps(h).encode(), payload], max_frame_pixels=20)


def test_non_finite_float_frames_are_refused() -> None:
    frame = np.ones((3, 3), np.float32)
    frame[1, 1] = np.nan
    frame[0, 2] = np.inf
    header, payload = encode_request(request_header_for(frame, 2), frame)
    with pytest.raises(ProtocolError, match="2 NaN/Inf pixels") as info:
        decode_request([bytes(header), bytes(payload)])
    assert info.value.code == "bad_frame" and info.value.frame_id == 2
    err = decode_reply(_bytes(error_reply_for(info.value)))
    assert err.error_code == "bad_frame" and err.frame_id == 2


def test_encode_refuses_frames_the_header_does_not_describe() -> None:
    frame = np.zeros((3, 4), np.uint8)
    header = FrameRequestHeader(frame_id=1, shape=(4, 3), dtype="uint8")
    with pytest.raises(ProtocolError, match=r"header says \(4, 3\) uint8, frame is \(3, 4\) uint8"):
        encode_request(header, frame)
    with pytest.raises(ProtocolError, match="float64 is not one of"):
        request_header_for(np.zeros((2, 2)), 1)
    with pytest.raises(ProtocolError, match="2-D"):
        request_header_for(np.zeros((2, 2, 2), np.uint8), 1)


def test_reply_decoder_checks_parts() -> None:
    frame = np.zeros((2, 2), np.uint8)
    parts = _bytes(ok_reply(request_header_for(frame, 1), model="m:1", backend="b", denoised=frame))
    with pytest.raises(ProtocolError, match=r"lists 1 parts \[denoised\], got 0"):
        decode_reply(parts[:1])
    with pytest.raises(ProtocolError, match="expected 4 bytes"):
        decode_reply([parts[0], b"abc"])


def test_control_messages() -> None:
    req = decode_control_request(encode_control_request(ControlRequest(command="activate", model="tiny:2")))
    assert req.command == "activate" and req.model == "tiny:2" and req.wait
    with pytest.raises(ProtocolError, match="'activate' needs 'model'"):
        decode_control_request(b'{"command": "activate"}')
    with pytest.raises(ProtocolError, match="'command'"):
        decode_control_request(b'{"command": "reboot"}')
    with pytest.raises(ProtocolError, match="expected a JSON object"):
        decode_control_request(b"status")
    rep = decode_control_reply(encode_control_reply(ControlReply(ok=True, command="status", result={"a": [1, 2]})))
    assert rep.ok and rep.result == {"a": [1, 2]}


# --- fuzzing: nothing but ProtocolError, whatever arrives ---------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
header_keys = st.sampled_from(["protocol", "frame_id", "unique_id", "shape", "dtype", "timestamp", "model",
                               "bit_depth", "flags", "other"])
plausible_values = st.one_of(
    json_values, st.sampled_from(list(WIRE_DTYPES) + ["float64", ""]),
    st.lists(st.integers(-3, 70000), min_size=0, max_size=3), st.integers(-(2**70), 2**70),
    st.fixed_dictionaries({"want_residual": st.booleans()}),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_fuzz_random_bytes(parts: list[bytes]) -> None:
    for decode in (decode_request, decode_reply):
        try:
            decode(parts)
        except ProtocolError:
            pass
    try:
        decode_control_request(parts[0] if parts else b"")
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(header_keys, plausible_values, max_size=9), st.binary(max_size=96),
       st.integers(0, 2))
def test_fuzz_headers(header: dict, payload: bytes, extra: int) -> None:
    raw = json.dumps(header).encode()
    try:
        req = decode_request([raw, payload, *([b""] * extra)])
    except ProtocolError:
        return
    # whatever got through is a consistent frame
    assert req.frame.shape == req.header.shape and req.frame.nbytes == len(payload)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["protocol", "status", "error", "frame_id", "parts", "model", "timings"]),
                       json_values, max_size=7), st.lists(st.binary(max_size=16), max_size=3))
def test_fuzz_reply_headers(header: dict, payload: list[bytes]) -> None:
    try:
        decode_reply([json.dumps(header).encode(), *payload])
    except ProtocolError:
        pass


def test_odd_part_types_are_protocol_errors() -> None:
    for parts in ([1, 2], ["text", b""], None, [memoryview(np.zeros((2, 2), np.float32))], [b"{}", 3.5]):
        with pytest.raises(ProtocolError):
            decode_request(parts)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="at most 65536 bytes"):
        decode_request([b" " * 70000, b""])
    with pytest.raises(ProtocolError):
        decode_request([b"[" * 5000 + b"]" * 5000, b""])  # deep nesting is not a RecursionError
