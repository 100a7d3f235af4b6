"""cdae's frame protocol carried in Triton tensors: the names, and packing both ways (sans-I/O, numpy only).

The frame-path model that `cdae export --to triton` writes takes a request as cdae's engine does
(:mod:`cdae.engine.protocol`), in tensors instead of ZeroMQ parts:

- inputs: ``HEADER`` (UINT8, [-1]: the request header JSON, UTF-8), ``FRAME`` (UINT8, [-1]: the pixels as
  the header declares them), ``BAD_PIXELS`` (UINT8, [-1], optional: the camera's map as NDPluginBadPixel
  JSON, sent with every frame that names it, since Triton instances hold no client state);
- outputs: ``REPLY`` (UINT8, [-1]: the reply header JSON), ``DATA`` (UINT8, [-1]: the reply's parts one
  after another, as ``header.parts`` lists them).

Text travels as UINT8, not as Triton's BYTES type: a BYTES tensor's length prefixes are parsed by the
Python backend before any cdae code runs, and a malformed one ends the instance's stub (seen with
tritonclient 2.73 against server 2.51); raw bytes leave every check to cdae's decoder.

So the reply decodes with :func:`~cdae.engine.protocol.decode_reply` exactly like the engine's, and every
check of the protocol (shapes, dtypes, sizes, NaN/Inf) runs on the Triton path too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cdae.engine.protocol import Part, ProtocolError, _buffer, _parse_json, wire_dtype

IN_HEADER, IN_FRAME, IN_BAD_PIXELS = "HEADER", "FRAME", "BAD_PIXELS"
OUT_HEADER, OUT_DATA = "REPLY", "DATA"  # not "HEADER": an output named as an input comes back empty
#: The frame-path model's Triton backend and the one input/output layout (config.pbtxt is generated from these).
INPUTS = ((IN_HEADER, "TYPE_UINT8", [-1], False), (IN_FRAME, "TYPE_UINT8", [-1], False),
          (IN_BAD_PIXELS, "TYPE_UINT8", [-1], True))
OUTPUTS = ((OUT_HEADER, "TYPE_UINT8", [-1]), (OUT_DATA, "TYPE_UINT8", [-1]))
#: The frame model's config.pbtxt parameter listing the versions its repository holds (what ``Model`` offers).
VERSIONS_PARAMETER = "cdae_versions"


def text_tensor(raw: bytes | str) -> np.ndarray:
    """Text (JSON) as a UINT8 tensor."""
    return np.frombuffer(raw.encode() if isinstance(raw, str) else bytes(raw), dtype=np.uint8)


def as_u8(part: Part) -> np.ndarray:
    """A message part as a UINT8 tensor (a view where the part is a buffer)."""
    return np.frombuffer(_buffer(part, "part"), dtype=np.uint8)


def request_tensors(parts: Sequence[Part]) -> tuple[np.ndarray, np.ndarray]:
    """``[header JSON, frame bytes]`` (from :func:`~cdae.engine.protocol.encode_request`) → HEADER, FRAME."""
    header, frame = parts
    return as_u8(header), as_u8(frame)


def text_of(tensor: np.ndarray, what: str) -> bytes:
    """The bytes of a UINT8 text tensor (any shape: read flat)."""
    a = np.asarray(tensor)
    if a.dtype != np.uint8:
        raise ProtocolError("bad_message", f"{what}: expected UINT8 bytes, got {a.dtype}")
    return a.tobytes()


def pack_reply(parts: Sequence[Part]) -> tuple[np.ndarray, np.ndarray]:
    """Reply parts (from ``ok_reply``/``error_reply``) → HEADER, DATA (the array parts concatenated)."""
    header = bytes(_buffer(parts[0], "reply header"))
    arrays = [as_u8(p) for p in parts[1:]]
    data = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint8)
    return text_tensor(header), data


def unpack_reply(header: np.ndarray, data: np.ndarray) -> list[bytes | memoryview]:
    """HEADER, DATA → the reply's message parts, for :func:`~cdae.engine.protocol.decode_reply` (which checks them).

    DATA is cut where the header's parts say; a DATA of another length leaves a part short or over,
    and decode_reply refuses it.
    """
    raw = text_of(header, "reply HEADER")
    info = _parse_json(memoryview(raw), "reply header")
    parts: list[bytes | memoryview] = [raw]
    buf = memoryview(np.ascontiguousarray(data, dtype=np.uint8)).cast("B")
    listed = info.get("parts") if isinstance(info, dict) else None
    offset = 0
    for p in listed if isinstance(listed, list) else []:
        try:
            h, w = p["shape"]
            n = int(h) * int(w) * wire_dtype(p["dtype"]).itemsize
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError("bad_header", f"reply part {p!r}: no usable shape and dtype ({e})") from e
        parts.append(buf[offset: offset + max(n, 0)])
        offset += max(n, 0)
    if offset != buf.nbytes:
        raise ProtocolError("bad_frame", f"reply DATA: the header's parts take {offset} bytes, DATA has {buf.nbytes}")
    return parts
