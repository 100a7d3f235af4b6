"""PV Access beside Channel Access: the filter's images as NTNDArray, and an NTNDArray camera as a source.

Both sides follow areaDetector's NDPluginPva (ADCore's NTNDArrayConverter), so a PVA client
(p4p, pvapy, c2dataviewer, ImageJ's EPICS_NTNDA_Viewer, Phoebus) reads cdae's output as it reads a
camera's ``Pva1:Image``, and cdae reads a camera's ``Pva1:Image`` as such a client does:

- ``value``: the union member of the frame's own element type (``ushortValue`` for UInt16: no
  signed-CA reinterpretation), C order, x fastest;
- ``dimension[]``: x first, then y; offset 0, binning 1, reverse false, fullSize = size;
- ``uniqueId``: the raw frame's; ``timeStamp``: the raw frame's (the camera's ``epicsTS``, POSIX
  epoch); ``dataTimeStamp``: the raw frame's NDArray ``timeStamp`` (a CA source has only its CA
  timestamp: the same);
- ``codec``: name "" (not compressed), ``parameters`` the NDDataType index of the pixels (as ADCore
  writes it); ``compressedSize`` = ``uncompressedSize`` = bytes;
- ``attribute[]``: ``ColorMode``, ``CdaeModel`` (NAME:VERSION that made the frame) and, from a
  guarding engine, ``FlaggedPixels``, ``SaturatedPixels``, ``ImpulsePixels``.

p4p is an optional dependency (``pip install 'cdae[pva]'``), imported only when PVA is asked for:
the IOC without it, or with PVA off, is Channel Access only, as before. p4p's server and client run
their own threads; posting to a ``SharedPV`` is thread-safe, so the filter posts from its event
loop, in the same step that writes the CA image, and the subscription's callbacks run in the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from caproto import AlarmSeverity, AlarmStatus

from cdae.ioc.frames import (
    EPICS_EPOCH_OFFSET_S,
    FrameError,
    FrameInfo,
    IocError,
    NDColorMode,
    NDDataType,
    ca_element_dtype,
    nd_data_type,
)
from cdae.ioc.source import OnConnection, OnError, OnFrame, SourceNames
from cdae.lines import log

PVA_HINT = "pip install 'cdae[pva]'"
SCHEME = "pva://"
#: The filter's NTNDArray channels under its prefix, named after areaDetector's NDPluginPva ``Pva1:Image``.
IMAGE, RESIDUAL, DEFECT_MAP = "Pva1:Image", "Pva1:Residual", "Pva1:DefectMap"

#: NTNDArray ``value`` union member of each data type (ADCore's NTNDArrayConverter::fromValue).
UNION_MEMBER: dict[NDDataType, str] = {
    NDDataType.Int8: "byteValue", NDDataType.UInt8: "ubyteValue",
    NDDataType.Int16: "shortValue", NDDataType.UInt16: "ushortValue",
    NDDataType.Int32: "intValue", NDDataType.UInt32: "uintValue",
    NDDataType.Int64: "longValue", NDDataType.UInt64: "ulongValue",
    NDDataType.Float32: "floatValue", NDDataType.Float64: "doubleValue",
}
#: NT alarm status (``alarm_t.status``: NO_STATUS, DEVICE, DRIVER, RECORD, ...) for the CA alarm the image PVs carry.
_NT_STATUS = {AlarmStatus.NO_ALARM: 0, AlarmStatus.READ: 1, AlarmStatus.HWLIMIT: 1, AlarmStatus.COMM: 2,
              AlarmStatus.SOFT: 3}
_ATTRIBUTE_DESCRIPTIONS = {
    "ColorMode": "Color mode",
    "CdaeModel": "cdae model NAME:VERSION that made the frame",
    "FlaggedPixels": "pixels moved beyond the noise bound (all reasons)",
    "SaturatedPixels": "pixels at the ADC maximum or the full well (kept raw)",
    "ImpulsePixels": "pixels sharper than the optics allow",
}


def p4p_missing() -> str | None:
    """None when p4p can be imported; else one line saying what to install."""
    try:
        import p4p.client.asyncio  # noqa: F401
        import p4p.server  # noqa: F401
    except ImportError as e:
        return f"PV Access needs p4p, which is not installed ({e}); {PVA_HINT}"
    return None


def is_pva_source(source: str) -> bool:
    return source.startswith(SCHEME)


def pva_channel(source: str) -> str:
    """The NTNDArray channel of a ``pva://`` source: a plugin prefix ending in ':' gets NDPluginPva's
    ``Image`` (``pva://13SIM1:Pva1:`` → ``13SIM1:Pva1:Image``); anything else is the channel itself."""
    name = source[len(SCHEME):] if is_pva_source(source) else source
    if not name or any(c.isspace() for c in name):
        raise IocError(f"source {source!r}: expected pva://CHANNEL or pva://PLUGIN_PREFIX: (e.g. pva://13SIM1:Pva1:)")
    return name + "Image" if name.endswith(":") else name


def _posix(stamp: tuple[int, int]) -> dict[str, int]:
    return {"secondsPastEpoch": int(stamp[0]) + EPICS_EPOCH_OFFSET_S, "nanoseconds": int(stamp[1])}


def _epics(ts: Any) -> tuple[int, int]:
    return int(ts["secondsPastEpoch"]) - EPICS_EPOCH_OFFSET_S, int(ts["nanoseconds"])


def _int32(n: int) -> int:
    """``uniqueId`` is an int32, as NDArray's: a larger camera counter wraps, as it does in ADCore."""
    return (int(n) + 2**31) % 2**32 - 2**31


def ntndarray_fields(pixels: np.ndarray, data_type: NDDataType, info: FrameInfo,
                     attributes: Mapping[str, int | float | str] | None = None) -> dict[str, object]:
    """The fields of one NTNDArray, as NDPluginPva fills them, for a (height, width) frame already in
    ``data_type``'s own dtype; p4p copies the pixels once, into its own array (``reshape`` is a view)."""
    h, w = pixels.shape
    flat = np.ascontiguousarray(pixels).reshape(-1)
    attrs = {"ColorMode": int(info.color_mode), **(attributes or {})}
    return {
        "value": (UNION_MEMBER[data_type], flat),
        "codec": {"name": "", "parameters": int(data_type)},
        "compressedSize": flat.nbytes,
        "uncompressedSize": flat.nbytes,
        "uniqueId": _int32(info.unique_id),
        "timeStamp": _posix(info.stamp),
        "dataTimeStamp": _posix(info.data_stamp or info.stamp),
        "alarm": {"severity": 0, "status": 0, "message": ""},
        "dimension": [{"size": n, "offset": 0, "fullSize": n, "binning": 1, "reverse": False} for n in (w, h)],
        "attribute": [{"name": k, "value": v, "descriptor": _ATTRIBUTE_DESCRIPTIONS.get(k, ""), "sourceType": 0,
                       "source": ""} for k, v in attrs.items()],
    }


def frame_from_ntndarray(value: Any) -> tuple[np.ndarray, FrameInfo]:
    """A (height, width) frame and its ids from an NTNDArray (a p4p ``Value``, or the same as nested mappings).

    The pixels are a view of the received array, not a copy. Refused with :class:`FrameError`:
    compressed arrays, colour frames, anything but two dimensions, sizes that disagree with the
    data, element types areaDetector has no data type for.
    """
    uid = int(value["uniqueId"])
    codec = str(value["codec"]["name"])
    if codec:
        raise FrameError(f"codec {codec!r}: compressed NTNDArrays are not taken; have the camera's NDPluginPva "
                         "serve uncompressed arrays (no NDPluginCodec before it)")
    attrs = {str(a["name"]): a["value"] for a in value["attribute"]}
    try:
        color = int(attrs.get("ColorMode", 0))
    except (TypeError, ValueError):
        raise FrameError(f"ColorMode attribute {attrs['ColorMode']!r} is not a number") from None
    if color not in (NDColorMode.Mono, NDColorMode.Bayer):
        name = NDColorMode(color).name if color in NDColorMode._value2member_map_ else str(color)
        raise FrameError(f"ColorMode {name}: colour frames are not taken (Mono or Bayer only)")
    dims = [int(d["size"]) for d in value["dimension"]]
    data = value["value"]
    if data is None:
        raise FrameError("empty NTNDArray (no value)")
    flat = np.asarray(data).reshape(-1)
    data_type = nd_data_type(flat.dtype)
    if len(dims) != 2:
        raise FrameError(f"{len(dims)} dimensions {dims}: expected 2 (x, y)")
    w, h = dims
    if w <= 0 or h <= 0 or flat.size != w * h:
        raise FrameError(f"dimension {w} x {h} = {w * h} pixels, but value has {flat.size} elements")
    info = FrameInfo(unique_id=uid, stamp=_epics(value["timeStamp"]), data_type=data_type, color_mode=color,
                     data_stamp=_epics(value["dataTimeStamp"]))
    return flat.reshape(h, w), info


class NTNDArrayServer:
    """One p4p server with NTNDArray channels; ``post`` may be called from any thread (the event loop's here)."""

    def __init__(self, names: Sequence[str], interfaces: Sequence[str] | None = None) -> None:
        from p4p import Value
        from p4p.nt import NTNDArray
        from p4p.server import Server
        from p4p.server.thread import SharedPV

        self._type = NTNDArray.buildType()
        self._value = Value
        self._alarm: tuple[int, int, str] = (int(AlarmSeverity.INVALID_ALARM), _NT_STATUS[AlarmStatus.COMM],
                                             "no frame yet")
        empty = {"alarm": dict(zip(("severity", "status", "message"), self._alarm))}
        self.pvs = {n: SharedPV(initial=Value(self._type, empty)) for n in names}
        conf = {"EPICS_PVAS_INTF_ADDR_LIST": " ".join(interfaces)} if interfaces else None
        self.server = Server(providers=[dict(self.pvs)], conf=conf, useenv=True)

    @property
    def port(self) -> int:
        return int(self.server.conf()["EPICS_PVAS_SERVER_PORT"])

    @property
    def interfaces(self) -> str:
        return self.server.conf()["EPICS_PVAS_INTF_ADDR_LIST"]

    def post(self, name: str, pixels: np.ndarray, data_type: NDDataType, info: FrameInfo,
             attributes: Mapping[str, int | float | str] | None = None) -> None:
        self.pvs[name].post(self._value(self._type, ntndarray_fields(pixels, data_type, info, attributes)))
        self._alarm = (0, 0, "")  # a frame carries no alarm

    def set_alarm(self, status: AlarmStatus, severity: AlarmSeverity, message: str = "") -> None:
        """Every channel's ``alarm``, posted only when it changes (each post is a monitor update a client may take
        for a frame); only that field changes, and the next frame clears it."""
        alarm = (int(severity), _NT_STATUS.get(status, 1), f"{status.name}: {message}" if message else "")
        if alarm[:2] == self._alarm[:2]:
            return
        self._alarm = alarm
        for pv in self.pvs.values():
            pv.post(self._value(self._type, {"alarm": dict(zip(("severity", "status", "message"), alarm))}))

    def close(self) -> None:
        self.server.stop()
        for pv in self.pvs.values():
            pv.close()


OnBadFrame = Callable[..., None]


class PvaFrameSource:
    """Subscribes to a camera's NTNDArray (NDPluginPva) and calls ``on_frame(frame, info)`` in the event loop.

    The same interface as :class:`~cdae.ioc.source.FrameSource`. ``connect`` returns once a frame
    the IOC can serve has arrived (its type fixes ``ArrayData``'s CA element type, its size the
    length); p4p's client finds the camera again by itself when it restarts.
    """

    def __init__(self, source: str, on_frame: OnFrame, on_error: OnError, on_connection: OnConnection, *,
                 on_bad_frame: OnBadFrame) -> None:
        self.channel = pva_channel(source)
        self.names = SourceNames(array=self.channel)
        self.on_frame, self.on_error, self.on_connection, self.on_bad_frame = on_frame, on_error, on_connection, on_bad_frame
        self.element: np.dtype | None = None
        self.native_count = 0
        self.connected: bool | None = None
        self._ctx: Any = None
        self._sub: Any = None
        self._first: asyncio.Future[None] | None = None

    async def connect(self, ctx: object = None, timeout_s: float = 2.0) -> None:
        """``ctx`` (the CA client context the CA source uses) is not needed here."""
        if self._ctx is None:
            from p4p.client.asyncio import Context

            self._first = asyncio.get_running_loop().create_future()
            self._ctx = Context("pva", nt=False)
            self._sub = self._ctx.monitor(self.channel, self._on_update, notify_disconnect=True)
        assert self._first is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._first), timeout_s)
        except asyncio.TimeoutError:  # the builtin TimeoutError the CA source raises (distinct before Python 3.11)
            raise TimeoutError(f"no frame from {self.channel} within {timeout_s:g} s") from None

    async def close(self) -> None:
        if self._sub is not None:
            self._sub.close()
            await self._sub.wait_closed()
            self._sub = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    async def _on_update(self, value: Any) -> None:
        if isinstance(value, Exception):  # Disconnected (also before the first connection), RemoteError, ...
            if self.connected:
                log("cdae-ioc", f"source {self.channel}: {type(value).__name__} {value}".rstrip())
                self.on_connection(False)
            self.connected = False
            return
        if not self.connected:
            self.connected = True
            self.on_connection(True)
        try:
            frame, info = frame_from_ntndarray(value)
            element = ca_element_dtype(info.data_type)
            if self.element is not None and element != self.element:
                raise FrameError(f"{info.data_type.name} travels as {element} over Channel Access, but ArrayData "
                                 f"was made for {self.element} when the IOC started (restart it for the new type)")
        # any malformed array is a refused frame: an exception escaping here would end p4p's subscription
        # (its handler logs and stops), and the IOC would hear no more from the camera
        except Exception as e:  # noqa: BLE001
            uid = _unique_id(value)
            if self.element is None:  # before the PVs exist only the log can say it
                log("cdae-ioc", f"source {self.channel}: frame {uid} refused: {e}")
            self.on_bad_frame(uid, f"frame {uid}: {e}", alarm=(AlarmStatus.READ, AlarmSeverity.MAJOR_ALARM))
            return
        if self.element is None:
            self.element, self.native_count = element, frame.size
            assert self._first is not None
            self._first.set_result(None)
        self.on_frame(frame, info)


def _unique_id(value: Any) -> int:
    try:
        return int(value["uniqueId"])
    except (KeyError, TypeError, ValueError):
        return 0
