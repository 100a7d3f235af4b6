"""The engine's wire protocol, shared by the server and every client: pure functions, no sockets.

Data channel (client DEALER ↔ engine ROUTER), ZeroMQ multipart messages both ways::

    request: [header JSON (FrameRequestHeader), frame bytes]
    reply:   [header JSON (ReplyHeader), denoised bytes, (residual float32 bytes), (defect map bytes)]

Frame bytes are the C-ordered pixels, little-endian, of ``header.shape`` and ``header.dtype``;
a reply lists its parts (name, shape, dtype) in ``header.parts`` in the order they follow.
Nothing is pickled: headers are JSON validated by pydantic, pixels are raw buffers that the
receiver wraps with ``np.frombuffer`` without copying.

Control channel (REQ ↔ engine REP): one JSON ``ControlRequest`` in, one ``ControlReply`` out.

Everything here is sans-I/O (as caproto's core is): ``encode_*`` return the list of parts to hand
to ``send_multipart(..., copy=False)``; ``decode_*`` take the parts as received (``bytes``,
``memoryview`` or ``zmq.Frame``) and raise :class:`ProtocolError`, and nothing else, on any input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, Union

import numpy as np
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from cdae.engine import frame_kernels
from cdae.engine.errors import EngineError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 65536
#: A control request may carry a bad-pixel map (NDPluginBadPixel JSON, ~35 bytes an entry).
MAX_CONTROL_BYTES = 16 * 1024 * 1024
BAD_PIXEL_MAP_ID = r"^[0-9a-f]{16}$"
#: Declared frames larger than this are refused unless the decoder is given another limit.
DEFAULT_MAX_FRAME_PIXELS = 8192 * 8192

WireDtype = Literal["uint8", "uint16", "int16", "int32", "float32"]
WIRE_DTYPES: tuple[str, ...] = ("uint8", "uint16", "int16", "int32", "float32")
ErrorCode = Literal[
    "bad_message",  # not a [header, frame] multipart message, or not JSON
    "bad_header",  # header JSON fails validation
    "unsupported_version",
    "bad_frame",  # frame bytes do not match the header, zero size, NaN/Inf pixels
    "too_large",  # declared frame larger than the engine's limit
    "dropped",  # a newer frame from the same client replaced this one before it was processed
    "model_mismatch",  # the request asked for a model that is not the active one
    "unknown_bad_pixels",  # the request names a bad-pixel map this engine does not hold (restarted?)
    "inference_failed",
    "shutting_down",
]
PartName = Literal["denoised", "residual", "defect_map", "flags"]

# One buffer-like message part: what zmq's recv_multipart(copy=False) gives, or plain bytes.
Part = Union[bytes, bytearray, memoryview, object]


class ProtocolError(EngineError):
    """A message does not follow the protocol; ``code`` is the reply's error code.

    ``frame_id`` and ``unique_id`` are set when they could be read from the broken message, so the
    error reply can still be matched to its request.
    """

    def __init__(self, code: ErrorCode, message: str, frame_id: int | None = None, unique_id: int | None = None):
        super().__init__(message)
        self.code: ErrorCode = code
        self.frame_id = frame_id
        self.unique_id = unique_id


# --- headers -----------------------------------------------------------------------------------

class RequestFlags(BaseModel):
    """What the client wants back beside the denoised frame."""

    model_config = ConfigDict(extra="forbid")

    want_residual: bool = False
    want_defect_map: bool = False
    want_flags: bool = Field(False, description="the guard's flag class per pixel (uint8, cdae.engine.guard "
                                                "FLAG_NAMES), when the engine guards its output")
    defect_map_dtype: Literal["float32", "uint8"] = Field(
        "float32", description="float32 probability in [0, 1], or uint8 = round(255 * probability)"
    )


class FrameRequestHeader(BaseModel):
    """Header of one frame sent to the engine."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    protocol: int = PROTOCOL_VERSION
    frame_id: int = Field(ge=0, lt=2**63, description="the client's id; echoed in the reply")
    unique_id: int = Field(0, ge=-(2**63), lt=2**63, description="the camera's UniqueId; echoed")
    shape: tuple[int, int] = Field(description="(height, width) = (ArraySize1, ArraySize0)")
    dtype: WireDtype
    timestamp: float | None = Field(None, allow_inf_nan=False, description="source timestamp, s since the epoch")
    model: str | None = Field(None, max_length=200, description="NAME or NAME:VERSION the client requires")
    bit_depth: int | None = Field(None, ge=1, le=32, description="camera bit depth when the container is wider")
    bad_pixels: str | None = Field(None, pattern=BAD_PIXEL_MAP_ID,
                                   description="id of a bad-pixel map sent with set_bad_pixels: filled in the output")
    flags: RequestFlags = Field(default_factory=RequestFlags)


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    message: str


class Timings(BaseModel):
    """Where the time went, measured in the engine (transfer time is the client's to measure)."""

    model_config = ConfigDict(extra="forbid")

    queue_ms: float = 0.0  # received → taken by the worker
    inference_ms: float = 0.0  # normalise → (tiles →) network → denormalise
    total_ms: float = 0.0  # received → reply encoded


class PartInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PartName
    shape: tuple[int, int]
    dtype: WireDtype


class ReplyHeader(BaseModel):
    """Header of one reply: status, the model that produced it, timings, and the parts that follow."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    protocol: int = PROTOCOL_VERSION
    status: Literal["ok", "error"]
    error: ErrorInfo | None = None
    frame_id: int | None = None
    unique_id: int | None = None
    timestamp: float | None = Field(None, allow_inf_nan=False)
    model: str | None = Field(None, description="NAME:VERSION that produced this reply")
    backend: str | None = None
    tiles: int = Field(1, ge=1)
    timings: Timings = Field(default_factory=Timings)
    parts: list[PartInfo] = Field(default_factory=list)
    flag_counts: dict[str, int] | None = Field(None, description="pixels per flag class, when the output is guarded")

    @model_validator(mode="after")
    def _status_consistent(self) -> ReplyHeader:
        if self.status == "error" and self.error is None:
            raise ValueError("an error reply needs 'error'")
        if self.status == "ok" and (self.error is not None or not self.parts or self.parts[0].name != "denoised"):
            raise ValueError("an ok reply has no 'error' and its first part is 'denoised'")
        return self


@dataclass(frozen=True)
class FrameRequest:
    """A decoded request; ``frame`` is a read-only view of the received buffer."""

    header: FrameRequestHeader
    frame: np.ndarray


@dataclass(frozen=True)
class FrameReply:
    """A decoded reply; arrays are read-only views of the received buffers (None when not sent)."""

    header: ReplyHeader
    denoised: np.ndarray | None = None
    residual: np.ndarray | None = None
    defect_map: np.ndarray | None = None
    flags: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.header.status == "ok"

    @property
    def frame_id(self) -> int | None:
        return self.header.frame_id

    @property
    def model(self) -> str | None:
        return self.header.model

    @property
    def error_code(self) -> str | None:
        return self.header.error.code if self.header.error else None


# --- helpers -----------------------------------------------------------------------------------

def wire_dtype(name: str) -> np.dtype:
    """The numpy dtype of a wire dtype name: always little-endian."""
    return np.dtype(name).newbyteorder("<")


def _buffer(part: Part, what: str) -> memoryview:
    obj = getattr(part, "buffer", part)  # zmq.Frame exposes its bytes as .buffer
    try:
        mv = memoryview(obj)  # type: ignore[arg-type]
    except TypeError as e:
        raise ProtocolError("bad_message", f"{what}: expected a bytes-like message part, got {type(part).__name__}") from e
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        try:
            mv = mv.cast("B")
        except TypeError as e:
            raise ProtocolError("bad_message", f"{what}: message part is not a contiguous buffer") from e
    return mv


def _first_error(e: ValidationError) -> str:
    err = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "header"
    got = err.get("input")
    got_s = repr(got)
    if len(got_s) > 60:
        got_s = got_s[:57] + "..."
    return f"'{where}': {err['msg']} (got {got_s})" if err["type"] not in ("missing",) else f"'{where}': missing"


def _parse_json(raw: memoryview, what: str, limit: int = MAX_HEADER_BYTES) -> object:
    if raw.nbytes > limit:
        raise ProtocolError("bad_message", f"{what}: expected at most {limit} bytes of JSON, got {raw.nbytes}")
    try:
        return pydantic_core.from_json(bytes(raw), allow_inf_nan=False)
    except (ValueError, RecursionError) as e:
        head = bytes(raw[:40])
        raise ProtocolError("bad_message", f"{what}: expected a JSON object, got {head!r}... ({e})") from e


def _ids(data: object) -> tuple[int | None, int | None]:
    """Best-effort frame_id / unique_id from a header that failed validation, to label the error reply."""
    if not isinstance(data, dict):
        return None, None
    fid, uid = data.get("frame_id"), data.get("unique_id")
    fid = fid if isinstance(fid, int) and not isinstance(fid, bool) and 0 <= fid < 2**63 else None
    uid = uid if isinstance(uid, int) and not isinstance(uid, bool) and -(2**63) <= uid < 2**63 else None
    return fid, uid


def _as_wire_array(a: np.ndarray, dtype: str) -> memoryview:
    arr = np.ascontiguousarray(a, dtype=wire_dtype(dtype))
    return memoryview(arr).cast("B") if arr.size else memoryview(b"")


# --- requests ----------------------------------------------------------------------------------

def request_header_for(frame: np.ndarray, frame_id: int, **fields: object) -> FrameRequestHeader:
    """A request header describing ``frame`` (shape and dtype taken from the array)."""
    if frame.ndim != 2:
        raise ProtocolError("bad_frame", f"expected a 2-D frame, got shape {frame.shape}")
    name = np.dtype(frame.dtype).name
    if name not in WIRE_DTYPES:
        raise ProtocolError("bad_frame", f"frame dtype {name} is not one of {', '.join(WIRE_DTYPES)}")
    flags = fields.pop("flags", None)
    flag_fields = {k: fields.pop(k) for k in list(fields) if k in RequestFlags.model_fields}
    if flags is None:
        flags = RequestFlags(**flag_fields)  # type: ignore[arg-type]
    try:
        return FrameRequestHeader(frame_id=frame_id, shape=frame.shape, dtype=name, flags=flags, **fields)  # type: ignore[arg-type]
    except ValidationError as e:
        raise ProtocolError("bad_header", f"invalid request header {_first_error(e)}", frame_id) from e


def encode_request(header: FrameRequestHeader, frame: np.ndarray) -> list[bytes | memoryview]:
    """``[header JSON, frame bytes]``; the frame part is a view of the array (no copy when contiguous)."""
    if tuple(frame.shape) != tuple(header.shape) or np.dtype(frame.dtype).name != header.dtype:
        raise ProtocolError(
            "bad_frame",
            f"header says {header.shape} {header.dtype}, frame is {frame.shape} {np.dtype(frame.dtype).name}",
            header.frame_id, header.unique_id,
        )
    return [header.model_dump_json(exclude_defaults=False).encode(), _as_wire_array(frame, header.dtype)]


def decode_request(parts: Sequence[Part], max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> FrameRequest:
    """Validate a received request and wrap its pixels without copying; raises ProtocolError only."""
    try:
        n = len(parts)
    except TypeError as e:
        raise ProtocolError("bad_message", "expected a list of message parts") from e
    if n != 2:
        fid = uid = None
        if n >= 1:
            try:
                fid, uid = _ids(_parse_json(_buffer(parts[0], "header"), "header"))
            except ProtocolError:
                pass
        raise ProtocolError("bad_message", f"expected 2 message parts [header JSON, frame bytes], got {n}", fid, uid)
    data = _parse_json(_buffer(parts[0], "header"), "header")
    fid, uid = _ids(data)
    if not isinstance(data, dict):
        raise ProtocolError("bad_header", f"header: expected a JSON object, got {type(data).__name__}")
    version = data.get("protocol", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version", f"protocol version {version!r}; this engine speaks {PROTOCOL_VERSION}", fid, uid
        )
    try:
        header = FrameRequestHeader.model_validate(data)
    except ValidationError as e:
        raise ProtocolError("bad_header", f"invalid request header {_first_error(e)}", fid, uid) from e
    fid, uid = header.frame_id, header.unique_id
    h, w = header.shape
    if h <= 0 or w <= 0:
        raise ProtocolError("bad_frame", f"zero-size frame: shape {header.shape}; expected both sides >= 1", fid, uid)
    if h * w > max_frame_pixels:
        raise ProtocolError(
            "too_large", f"frame {h}x{w} = {h * w} pixels exceeds this engine's limit of {max_frame_pixels}", fid, uid
        )
    dt = wire_dtype(header.dtype)
    buf = _buffer(parts[1], "frame")
    expected = h * w * dt.itemsize
    if buf.nbytes != expected:
        raise ProtocolError(
            "bad_frame",
            f"frame bytes: expected {expected} ({h}x{w} {header.dtype}), got {buf.nbytes}",
            fid, uid,
        )
    frame = np.frombuffer(buf, dtype=dt, count=h * w).reshape(h, w)
    if dt.kind == "f":
        finite = np.isfinite(frame)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise ProtocolError("bad_frame", f"frame contains {bad} NaN/Inf pixels; expected finite values", fid, uid)
    return FrameRequest(header=header, frame=frame)


# --- replies -----------------------------------------------------------------------------------

def defect_map_to_wire(probability: np.ndarray, dtype: Literal["float32", "uint8"]) -> np.ndarray:
    """The defect probability map as sent: float32, or uint8 = round(255 * p)."""
    if dtype == "uint8":
        compiled = frame_kernels.probability_to_uint8(probability)  # one pass, the same bits (None: NumPy's turn)
        if compiled is not None:
            return compiled
        return np.rint(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.asarray(probability, dtype=np.float32)


def encode_reply(header: ReplyHeader, arrays: Sequence[np.ndarray] = ()) -> list[bytes | memoryview]:
    """``[header JSON, *part bytes]``; ``arrays`` follow ``header.parts`` one to one."""
    if len(arrays) != len(header.parts):
        raise ProtocolError("bad_message", f"reply header lists {len(header.parts)} parts, got {len(arrays)} arrays")
    out: list[bytes | memoryview] = [header.model_dump_json().encode()]
    for info, a in zip(header.parts, arrays):
        if tuple(a.shape) != tuple(info.shape):
            raise ProtocolError("bad_message", f"reply part {info.name}: header says {info.shape}, array is {a.shape}")
        out.append(_as_wire_array(a, info.dtype))
    return out


def ok_reply(
    request: FrameRequestHeader,
    *,
    model: str,
    backend: str,
    denoised: np.ndarray,
    residual: np.ndarray | None = None,
    defect_map: np.ndarray | None = None,
    flags: np.ndarray | None = None,
    flag_counts: dict[str, int] | None = None,
    timings: Timings | None = None,
    tiles: int = 1,
) -> list[bytes | memoryview]:
    """Encode a successful reply to ``request``; parts the client did not ask for are not sent."""
    parts = [PartInfo(name="denoised", shape=request.shape, dtype=request.dtype)]
    arrays = [denoised]
    if request.flags.want_residual and residual is not None:
        parts.append(PartInfo(name="residual", shape=request.shape, dtype="float32"))
        arrays.append(residual)
    if request.flags.want_defect_map and defect_map is not None:
        dm = defect_map_to_wire(defect_map, request.flags.defect_map_dtype)
        parts.append(PartInfo(name="defect_map", shape=request.shape, dtype=request.flags.defect_map_dtype))
        arrays.append(dm)
    if request.flags.want_flags and flags is not None:
        parts.append(PartInfo(name="flags", shape=request.shape, dtype="uint8"))
        arrays.append(flags)
    header = ReplyHeader(
        status="ok", frame_id=request.frame_id, unique_id=request.unique_id, timestamp=request.timestamp,
        model=model, backend=backend, timings=timings or Timings(), parts=parts, tiles=tiles, flag_counts=flag_counts,
    )
    return encode_reply(header, arrays)


def error_reply(
    code: ErrorCode,
    message: str,
    *,
    frame_id: int | None = None,
    unique_id: int | None = None,
    timestamp: float | None = None,
    model: str | None = None,
    backend: str | None = None,
    timings: Timings | None = None,
) -> list[bytes | memoryview]:
    """Encode an error reply (a single header part)."""
    if timestamp is not None and not math.isfinite(timestamp):
        timestamp = None
    header = ReplyHeader(
        status="error", error=ErrorInfo(code=code, message=message), frame_id=frame_id, unique_id=unique_id,
        timestamp=timestamp, model=model, backend=backend, timings=timings or Timings(),
    )
    return encode_reply(header)


def error_reply_for(err: ProtocolError, **fields: object) -> list[bytes | memoryview]:
    """The error reply that answers a request which failed to decode."""
    return error_reply(err.code, str(err), frame_id=err.frame_id, unique_id=err.unique_id, **fields)  # type: ignore[arg-type]


def decode_reply(parts: Sequence[Part]) -> FrameReply:
    """Validate a received reply and wrap its parts without copying; raises ProtocolError only."""
    try:
        n = len(parts)
    except TypeError as e:
        raise ProtocolError("bad_message", "expected a list of message parts") from e
    if n < 1:
        raise ProtocolError("bad_message", "expected at least 1 message part (the reply header), got 0")
    data = _parse_json(_buffer(parts[0], "reply header"), "reply header")
    fid, uid = _ids(data)
    try:
        header = ReplyHeader.model_validate(data)
    except ValidationError as e:
        raise ProtocolError("bad_header", f"invalid reply header {_first_error(e)}", fid, uid) from e
    if n != 1 + len(header.parts):
        names = ", ".join(p.name for p in header.parts)
        raise ProtocolError(
            "bad_message", f"reply header lists {len(header.parts)} parts [{names}], got {n - 1}", fid, uid
        )
    arrays: dict[str, np.ndarray] = {}
    for info, part in zip(header.parts, parts[1:]):
        if info.name in arrays:
            raise ProtocolError("bad_message", f"reply part {info.name!r} appears twice", fid, uid)
        h, w = info.shape
        if h < 0 or w < 0:
            raise ProtocolError("bad_header", f"reply part {info.name}: negative shape {info.shape}", fid, uid)
        dt = wire_dtype(info.dtype)
        buf = _buffer(part, info.name)
        if buf.nbytes != h * w * dt.itemsize:
            raise ProtocolError(
                "bad_frame",
                f"reply part {info.name}: expected {h * w * dt.itemsize} bytes ({h}x{w} {info.dtype}), got {buf.nbytes}",
                fid, uid,
            )
        arrays[info.name] = np.frombuffer(buf, dtype=dt, count=h * w).reshape(h, w)
    return FrameReply(header=header, **arrays)


# --- control channel ---------------------------------------------------------------------------

ControlCommand = Literal["status", "list_models", "activate", "metrics", "set_bad_pixels"]


class ControlRequest(BaseModel):
    """One control request: ``{"command": "activate", "model": "NAME:VERSION"}``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    command: ControlCommand
    model: str | None = Field(None, max_length=200, description="activate: NAME[:VERSION]")
    wait: bool = Field(True, description="activate: reply when the swap is done (else at once; poll status)")
    timeout_s: float = Field(600.0, gt=0, le=86400, description="activate with wait: longest wait")
    bad_pixels: str | None = Field(None, description="set_bad_pixels: the camera's map as NDPluginBadPixel JSON; "
                                                     "the reply's result holds its id for frame requests")

    @model_validator(mode="after")
    def _command_needs_its_field(self) -> ControlRequest:
        if self.command == "activate" and not self.model:
            raise ValueError("'activate' needs 'model': NAME:VERSION")
        if self.command == "set_bad_pixels" and self.bad_pixels is None:
            raise ValueError("'set_bad_pixels' needs 'bad_pixels': the map as NDPluginBadPixel JSON")
        return self


class ControlReply(BaseModel):
    """``ok`` with the command's ``result``, or not ok with an ``error`` message."""

    model_config = ConfigDict(extra="forbid")

    ok: bool
    command: str | None = None
    error: str | None = None
    result: dict[str, JsonValue] = Field(default_factory=dict)


def encode_control_request(request: ControlRequest) -> bytes:
    return request.model_dump_json(exclude_none=True).encode()


_Control = TypeVar("_Control", ControlRequest, ControlReply)


def _decode_control(raw: Part, model: type[_Control], what: str) -> _Control:
    data = _parse_json(_buffer(raw, what), what, MAX_CONTROL_BYTES)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ProtocolError("bad_header", f"invalid {what} {_first_error(e)}") from e


def decode_control_request(raw: Part) -> ControlRequest:
    return _decode_control(raw, ControlRequest, "control request")


def encode_control_reply(reply: ControlReply) -> bytes:
    return reply.model_dump_json().encode()


def decode_control_reply(raw: Part) -> ControlReply:
    return _decode_control(raw, ControlReply, "control reply")
