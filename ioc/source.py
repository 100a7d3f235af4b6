"""The camera side of the filter IOC: subscribe to a source's image PVs and assemble frames.

Works with any areaDetector NDStdArrays plugin (``ArrayData`` + ``ArraySize0/1/2_RBV``,
``NDimensions_RBV``, ``DataType_RBV``, ``UniqueId_RBV``, ``ColorMode_RBV``) and with a plain
waveform PV given an explicit width and height. Colour frames (a ColorMode other than Mono or
Bayer) and frames that are not 2-D (``NDimensions_RBV``) are refused, as the PVA source refuses
them; a source without ``NDimensions_RBV`` is taken to serve 2-D frames. The caproto asyncio client re-searches and re-subscribes by itself
when the camera IOC restarts.

Which UniqueId goes with which pixels: areaDetector posts the ids before the array and CA
delivers one circuit's monitors in order, so the latest id seen when ``ArrayData`` arrives is
the frame's. A source without a UniqueId PV gets a local counter.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import caproto
import numpy as np
from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.asyncio.client import PV, Context

from cdae.ioc.frames import FrameError, FrameInfo, NDColorMode, NDDataType, frame_from_ca

log = logging.getLogger(__name__)

#: The numpy element type of each native CA channel type an image can come in.
CA_ELEMENTS: dict[ChannelType, np.dtype] = {
    ChannelType.CHAR: np.dtype(np.uint8),
    ChannelType.INT: np.dtype(np.int16),
    ChannelType.LONG: np.dtype(np.int32),
    ChannelType.FLOAT: np.dtype(np.float32),
    ChannelType.DOUBLE: np.dtype(np.float64),
}
#: The data type a frame has when the source says nothing (a plain waveform, no DataType_RBV).
DEFAULT_DATA_TYPE: dict[str, NDDataType] = {
    "uint8": NDDataType.UInt8, "int16": NDDataType.Int16, "int32": NDDataType.Int32,
    "float32": NDDataType.Float32, "float64": NDDataType.Float64,
}

#: Bytes asked of a CA circuit per read. caproto's asyncio client asks 4096 (``_TransportWrapper.recv``), so a
#: 1024² UInt16 frame took 512 reads, each a turn of the event loop and a look at the pending bytes: 4 ms of
#: CPU per frame in a client that did nothing else, 1.6 ms reading what the socket holds at once (asyncio's
#: transport hands over up to 256 KiB per turn). Requests to the IOC's own server go through the same reads.
CA_RECV_BYTES = 1 << 22


def large_ca_reads() -> bool:
    """Make caproto's asyncio circuits read up to :data:`CA_RECV_BYTES` at a time (once per process). This
    reaches into caproto (``caproto.asyncio.utils._TransportWrapper``, the version in constraints.txt): a
    caproto without it keeps its own reads, with one log line saying so. Returns whether reads are large."""
    from caproto.asyncio import utils

    wrapper = getattr(utils, "_TransportWrapper", None)
    small = getattr(wrapper, "recv", None)
    if small is None:
        if not getattr(large_ca_reads, "warned", False):
            large_ca_reads.warned = True  # type: ignore[attr-defined]
            log.warning("caproto %s has no _TransportWrapper.recv: CA frames are read in caproto's own sizes",
                        getattr(caproto, "__version__", "?"))
        return False
    if getattr(small, "cdae_large_reads", False):
        return True

    async def recv(self: object, nbytes: int = CA_RECV_BYTES) -> bytes:
        return await small(self, max(nbytes, CA_RECV_BYTES))

    recv.cdae_large_reads = True  # type: ignore[attr-defined]
    wrapper.recv = recv  # type: ignore[method-assign,union-attr]
    return True


OnFrame = Callable[[np.ndarray, FrameInfo], None]
OnError = Callable[[str], None]
OnConnection = Callable[[bool], None]


@dataclass
class SourceNames:
    """The PV names a source is read from; None where the source has no such PV."""

    array: str
    size0: str | None = None
    size1: str | None = None
    data_type: str | None = None
    unique_id: str | None = None
    color_mode: str | None = None
    ndimensions: str | None = None
    size2: str | None = None

    @classmethod
    def nd_std_arrays(cls, prefix: str, array: str = "ArrayData") -> SourceNames:
        return cls(array=prefix + array, size0=prefix + "ArraySize0_RBV", size1=prefix + "ArraySize1_RBV",
                   data_type=prefix + "DataType_RBV", unique_id=prefix + "UniqueId_RBV",
                   color_mode=prefix + "ColorMode_RBV", ndimensions=prefix + "NDimensions_RBV",
                   size2=prefix + "ArraySize2_RBV")


#: The alarm the image PVs go to when a source frame is refused (until the next good frame), as the PVA source's.
REFUSED_ALARM = (AlarmStatus.READ, AlarmSeverity.MAJOR_ALARM)
#: The colour modes a frame may have: one value per pixel (Bayer is a mono image of a mosaic sensor).
MONO_MODES = (NDColorMode.Mono, NDColorMode.Bayer)


class FrameSource:
    """Monitors a source and calls ``on_frame(frame, info)`` for every complete frame (in the event loop)."""

    def __init__(self, names: SourceNames, on_frame: OnFrame, on_error: OnError, on_connection: OnConnection, *,
                 width: int | None = None, height: int | None = None, data_type: NDDataType | None = None,
                 on_bad_frame: Callable[..., None] | None = None) -> None:
        self.names = names
        self.on_frame = on_frame
        self.on_error = on_error
        # (UniqueId, message, alarm=...) of a frame that cannot be assembled or is refused; else on_error
        self.on_bad_frame = on_bad_frame
        self.on_connection = on_connection
        self.width = width or 0
        self.height = height or 0
        self.fixed_size = width is not None and height is not None
        self.data_type: NDDataType | None = data_type
        self.fixed_type = data_type is not None
        self.unique_id: tuple[int, float] | None = None  # (value, CA timestamp)
        self.color_mode = 0
        self.ndimensions = 2  # a source without NDimensions_RBV (plain waveform, older plugin): 2-D
        self.size2 = 0
        self._ids = itertools.count(1)
        # the first ArrayData update after each connection is the camera's current array, which an idle camera
        # holds empty (NORD 0, or caproto's one-element start): no frame, not a frame error
        self._initial = True
        self._pvs: dict[str, PV] = {}
        self._subs: list[object] = []
        self.element: np.dtype | None = None
        self.native_count = 0

    async def connect(self, ctx: Context, timeout_s: float = 2.0) -> None:
        """Wait for ``ArrayData`` to connect (learning its CA type and length), then subscribe to everything."""
        large_ca_reads()
        (array,) = await ctx.get_pvs(self.names.array, connection_state_callback=self._array_connection)
        await array.wait_for_connection(timeout=timeout_s)
        native = ChannelType(array.channel.native_data_type)
        if native not in CA_ELEMENTS:
            raise FrameError(f"{self.names.array} is {native.name}; expected an image waveform "
                             f"({', '.join(t.name for t in CA_ELEMENTS)})")
        self.element = CA_ELEMENTS[native]
        self.native_count = int(array.channel.native_data_count)
        self._pvs["array"] = array
        sizes = ("size0", "size1", "size2", "ndimensions")
        meta = {k: name for k in (*sizes, "data_type", "unique_id", "color_mode")
                if (name := getattr(self.names, k)) is not None
                and not (k in sizes and self.fixed_size) and not (k == "data_type" and self.fixed_type)}
        pvs = await ctx.get_pvs(*meta.values()) if meta else []

        async def current(key: str, pv: PV) -> None:
            try:  # start from the current sizes and type, so the first array is not refused
                await pv.wait_for_connection(timeout=timeout_s)
                await getattr(self, f"_on_{key}")(None, await pv.read(data_type="time", timeout=timeout_s))
            except TimeoutError:
                pass  # an optional PV this source lacks; its monitor fills it in if it appears

        # side by side: a source lacking several optional PVs waits timeout_s once, not once per PV
        await asyncio.gather(*(current(key, pv) for key, pv in zip(meta, pvs)))
        for key, pv in zip(meta, pvs):
            self._pvs[key] = pv
            sub = pv.subscribe(data_type="time")
            sub.add_callback(getattr(self, f"_on_{key}"))
            self._subs.append(sub)
        # data_count=0: the server sends the current length (NORD), not the waveform's NELM
        sub = array.subscribe(data_type="time", data_count=0)
        sub.add_callback(self._on_array)
        self._subs.append(sub)

    async def close(self) -> None:
        for sub in self._subs:
            await sub.clear()  # type: ignore[attr-defined]
        self._subs.clear()

    async def _array_connection(self, pv: PV, state: str) -> None:
        if state == "connected":
            self._initial = True
        self.on_connection(state == "connected")

    # callbacks: coroutine functions, so caproto runs them in the event loop, in arrival order

    async def _on_size0(self, sub: object, response: object) -> None:
        self.width = int(response.data[0])  # type: ignore[attr-defined]

    async def _on_size1(self, sub: object, response: object) -> None:
        self.height = int(response.data[0])  # type: ignore[attr-defined]

    async def _on_size2(self, sub: object, response: object) -> None:
        self.size2 = int(response.data[0])  # type: ignore[attr-defined]

    async def _on_ndimensions(self, sub: object, response: object) -> None:
        self.ndimensions = int(response.data[0])  # type: ignore[attr-defined]

    async def _on_data_type(self, sub: object, response: object) -> None:
        try:
            self.data_type = NDDataType(int(response.data[0]))  # type: ignore[attr-defined]
        except ValueError:
            self.on_error(f"{self.names.data_type}: unknown data type index {response.data[0]}")  # type: ignore[attr-defined]

    async def _on_unique_id(self, sub: object, response: object) -> None:
        self.unique_id = (int(response.data[0]), float(response.metadata.timestamp))  # type: ignore[attr-defined]

    async def _on_color_mode(self, sub: object, response: object) -> None:
        self.color_mode = int(response.data[0])  # type: ignore[attr-defined]

    async def _on_array(self, sub: object, response: object) -> None:
        data = response.data  # type: ignore[attr-defined]
        initial, self._initial = self._initial, False
        if initial and len(data) <= 1 < self.width * self.height:  # an idle camera's empty array: no frame yet
            log.info("%s: the camera's current array holds %d element(s): no frame yet, waiting for its first",
                     self.names.array, len(data))
            return
        stamp = response.metadata.stamp  # type: ignore[attr-defined]
        ts = (int(stamp.secondsSinceEpoch), int(stamp.nanoSeconds))
        uid = self.unique_id[0] if self.unique_id is not None else next(self._ids)
        assert self.element is not None
        # not ``or``: Int8 is data type index 0
        data_type = self.data_type if self.data_type is not None else DEFAULT_DATA_TYPE[self.element.name]
        try:
            self._check_mono_2d()
            frame = frame_from_ca(data, self.width, self.height, data_type)
        except FrameError as e:
            if self.on_bad_frame is not None:
                self.on_bad_frame(uid, f"frame {uid}: {e}", alarm=REFUSED_ALARM)
            else:
                self.on_error(f"frame {uid}: {e}")
            return
        self.on_frame(frame, FrameInfo(unique_id=uid, stamp=ts, data_type=data_type, color_mode=self.color_mode))

    def _check_mono_2d(self) -> None:
        """Refuse (FrameError) what is not one value per pixel in two dimensions: colour frames (RGB1 is
        [3, x, y], RGB2 [x, 3, y], ...) would otherwise go out as a mono image of a part of the array."""
        if self.color_mode not in MONO_MODES:
            cm = self.color_mode
            name = NDColorMode(cm).name if cm in NDColorMode._value2member_map_ else str(cm)
            raise FrameError(f"ColorMode {name}: colour frames are not taken (Mono or Bayer only)")
        n = self.ndimensions
        if n != 2 and not (n == 3 and self.size2 == 1):  # [x, y, 1] is a 2-D frame too
            sizes = [self.width, self.height, self.size2][:max(n, 0)] if n <= 3 else f"{n} sizes"
            raise FrameError(f"NDimensions {n} (ArraySize {sizes}): expected a 2-D frame (x, y)")
