"""Sans-I/O frame logic of the IOC side: areaDetector data types, CA element types, reshaping.

Nothing here touches a socket or an event loop: the filter IOC and the simulated camera call
these pure functions, and tests drive them directly.

Channel Access has no unsigned integer types: areaDetector serves UInt8 as DBR_CHAR (which CA
treats as unsigned already), UInt16 as DBR_SHORT and UInt32 as DBR_LONG, and clients reinterpret
the bits using ``DataType_RBV``. caproto's client hands arrays over in network byte order
(``>i2``), so the reinterpretation is an ``astype`` (a value conversion that wraps), never a
``view`` (which would read the big-endian bytes as little-endian).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

#: Seconds between the POSIX epoch (1970) and the EPICS epoch (1990).
EPICS_EPOCH_OFFSET_S = 631152000


class IocError(Exception):
    """Base of the IOC side's errors."""


class FrameError(IocError):
    """A frame that cannot be assembled (size and data disagree, unsupported type, ...)."""


class NDDataType(enum.IntEnum):
    """ADCore's NDDataType_t, in the order of the ``DataType_RBV`` mbbi (R3-8 and later)."""

    Int8 = 0
    UInt8 = 1
    Int16 = 2
    UInt16 = 3
    Int32 = 4
    UInt32 = 5
    Int64 = 6
    UInt64 = 7
    Float32 = 8
    Float64 = 9


class NDColorMode(enum.IntEnum):
    """ADCore's NDColorMode_t, in the order of the ``ColorMode_RBV`` mbbi."""

    Mono = 0
    Bayer = 1
    RGB1 = 2
    RGB2 = 3
    RGB3 = 4
    YUV444 = 5
    YUV422 = 6
    YUV421 = 7


DATA_TYPE_NAMES: tuple[str, ...] = tuple(t.name for t in NDDataType)
COLOR_MODE_NAMES: tuple[str, ...] = tuple(m.name for m in NDColorMode)

_NUMPY: dict[NDDataType, np.dtype] = {
    NDDataType.Int8: np.dtype(np.int8),
    NDDataType.UInt8: np.dtype(np.uint8),
    NDDataType.Int16: np.dtype(np.int16),
    NDDataType.UInt16: np.dtype(np.uint16),
    NDDataType.Int32: np.dtype(np.int32),
    NDDataType.UInt32: np.dtype(np.uint32),
    NDDataType.Int64: np.dtype(np.int64),
    NDDataType.UInt64: np.dtype(np.uint64),
    NDDataType.Float32: np.dtype(np.float32),
    NDDataType.Float64: np.dtype(np.float64),
}

#: The CA element type areaDetector serves each data type as (numpy dtype of the wire element).
#: CA's DBR_CHAR is unsigned on the wire, so Int8 goes out as its bit pattern, like UInt16 in DBR_SHORT.
_CA_ELEMENT: dict[NDDataType, np.dtype] = {
    NDDataType.Int8: np.dtype(np.uint8),
    NDDataType.UInt8: np.dtype(np.uint8),
    NDDataType.Int16: np.dtype(np.int16),
    NDDataType.UInt16: np.dtype(np.int16),
    NDDataType.Int32: np.dtype(np.int32),
    NDDataType.UInt32: np.dtype(np.int32),
    NDDataType.Float32: np.dtype(np.float32),
    NDDataType.Float64: np.dtype(np.float64),
}

#: What the engine accepts (cdae.engine.protocol.WIRE_DTYPES) for each camera data type: the
#: values are preserved (Int8 widens to Int16, Float64 narrows to Float32).
_ENGINE_DTYPE: dict[NDDataType, np.dtype] = {
    NDDataType.Int8: np.dtype(np.int16),
    NDDataType.UInt8: np.dtype(np.uint8),
    NDDataType.Int16: np.dtype(np.int16),
    NDDataType.UInt16: np.dtype(np.uint16),
    NDDataType.Int32: np.dtype(np.int32),
    NDDataType.Float32: np.dtype(np.float32),
    NDDataType.Float64: np.dtype(np.float32),
}


def numpy_dtype(data_type: NDDataType | int) -> np.dtype:
    """The numpy dtype of an areaDetector data type."""
    return _NUMPY[NDDataType(data_type)]


def nd_data_type(dtype: np.dtype | str | type) -> NDDataType:
    """The areaDetector data type of a numpy dtype (byte order ignored)."""
    dt = np.dtype(dtype).newbyteorder("=")
    for k, v in _NUMPY.items():
        if v == dt:
            return k
    raise FrameError(f"no areaDetector data type for numpy dtype {np.dtype(dtype)}")


def ca_element_dtype(data_type: NDDataType | int) -> np.dtype:
    """The element type a frame of ``data_type`` travels in over Channel Access (areaDetector's choice)."""
    t = NDDataType(data_type)
    if t not in _CA_ELEMENT:
        raise FrameError(f"{t.name} has no Channel Access element type (CA has no 64-bit integers)")
    return _CA_ELEMENT[t]


def engine_dtype(data_type: NDDataType | int) -> np.dtype:
    """The dtype a frame of ``data_type`` is sent to the engine as."""
    t = NDDataType(data_type)
    if t not in _ENGINE_DTYPE:
        raise FrameError(f"the engine does not take {t.name} frames; expected one of "
                         f"{', '.join(k.name for k in _ENGINE_DTYPE)}")
    return _ENGINE_DTYPE[t]


def frame_from_ca(data: np.ndarray, width: int, height: int, data_type: NDDataType | int) -> np.ndarray:
    """A (height, width) frame of ``data_type`` from the elements a CA client received.

    ``data`` may be longer than the frame (a waveform's NELM beyond NORD, padding); it must
    not be shorter. Signed CA elements of an unsigned type are reinterpreted with ``astype``
    (wrapping: -1 in DBR_SHORT is 65535 in UInt16), which also turns big-endian arrays native.
    """
    t = NDDataType(data_type)
    if width <= 0 or height <= 0:
        raise FrameError(f"frame size {width}x{height}: expected both ArraySize0 and ArraySize1 >= 1")
    n = width * height
    flat = np.asarray(data).reshape(-1)
    if flat.size < n:
        raise FrameError(f"ArraySize0 x ArraySize1 = {width} x {height} = {n} pixels, "
                         f"but ArrayData has {flat.size} elements")
    target = numpy_dtype(t)
    return flat[:n].astype(target, copy=True).reshape(height, width)


def to_engine(frame: np.ndarray, data_type: NDDataType | int) -> np.ndarray:
    """The frame as the engine takes it (contiguous, native order, values preserved)."""
    return np.ascontiguousarray(frame, dtype=engine_dtype(data_type))


def from_engine(frame: np.ndarray, data_type: NDDataType | int) -> np.ndarray:
    """A frame from the engine in its data type's own dtype (what an NTNDArray carries): the same array when
    the engine's dtype is that already (UInt8, UInt16, Int16, Int32, Float32), else converted, clipped into range."""
    target = numpy_dtype(data_type)
    a = np.asarray(frame)
    if a.dtype == target:
        return a
    if target.kind in "iu":
        info = np.iinfo(target)
        a = np.clip(np.rint(a) if a.dtype.kind == "f" else a, info.min, info.max)
    return a.astype(target)


def to_ca(frame: np.ndarray, element: np.dtype | str) -> np.ndarray:
    """Flatten a frame into the CA element type it is served as (UInt16 → int16 wraps, as areaDetector)."""
    el = np.dtype(element)
    a = np.asarray(frame)
    if el.kind in "iu" and a.dtype.kind == "f":
        info = np.iinfo(el)
        a = np.clip(np.rint(a), info.min, info.max)
    if (el.kind in "iu" and a.dtype.kind in "iu" and a.dtype.itemsize == el.itemsize and a.dtype.isnative
            and el.isnative and a.flags.c_contiguous):
        return a.view(el).reshape(-1)  # the same bits (UInt16 as CA short wraps): no copy of the frame
    return a.astype(el, copy=False).reshape(-1)


def posix_to_epics(timestamp: float) -> tuple[int, int]:
    """(seconds past the EPICS epoch, nanoseconds) of a POSIX timestamp: ``EpicsTSSec/Nsec_RBV``."""
    sec = int(np.floor(timestamp))
    nsec = int(round((timestamp - sec) * 1e9))
    if nsec >= 1_000_000_000:
        sec, nsec = sec + 1, nsec - 1_000_000_000
    return sec - EPICS_EPOCH_OFFSET_S, nsec


def nd_timestamp(stamp: tuple[int, int]) -> float:
    """areaDetector's NDArray ``timeStamp`` (``TimeStamp_RBV``): seconds past the EPICS epoch.

    Computed from the integer (sec, nsec) pair, so two processes that pass the same CA timestamp
    along get the same double.
    """
    return stamp[0] + stamp[1] * 1e-9


@dataclass(frozen=True)
class FrameInfo:
    """What a source delivered beside the pixels."""

    unique_id: int
    stamp: tuple[int, int]  # the CA timestamp of the source's ArrayData: (sec past the EPICS epoch, nsec)
    data_type: NDDataType
    color_mode: int = 0
    #: an NTNDArray source's ``dataTimeStamp`` (the NDArray's own ``timeStamp``), EPICS epoch like ``stamp``;
    #: None from a CA source, whose ``TimeStamp_RBV`` is ``stamp`` itself
    data_stamp: tuple[int, int] | None = None

    @property
    def timestamp(self) -> float:
        """POSIX seconds."""
        return self.stamp[0] + EPICS_EPOCH_OFFSET_S + self.stamp[1] * 1e-9


T = TypeVar("T")


class LatestSlot(Generic[T]):
    """A one-item mailbox where the newest item wins: ``put`` returns the item it replaced (a drop)."""

    def __init__(self) -> None:
        self._item: T | None = None

    def put(self, item: T) -> T | None:
        old, self._item = self._item, item
        return old

    def take(self) -> T | None:
        item, self._item = self._item, None
        return item

    def __bool__(self) -> bool:
        return self._item is not None


class RateMeter:
    """Events per second over a sliding window of recent event times."""

    def __init__(self, window_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._times: deque[float] = deque()

    def tick(self) -> None:
        self._times.append(self._clock())

    def rate_hz(self) -> float:
        now = self._clock()
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else 0.0


def parse_model_ref(text: str) -> str:
    """A model reference as written to the ``Model`` PV: NAME:VERSION, nothing else."""
    ref = text.strip()
    name, sep, version = ref.partition(":")
    ok_chars = all(c.isalnum() or c in "-_." for c in name + version)
    if not sep or not name or not version or not ok_chars:
        raise IocError(f"expected a model reference NAME:VERSION (letters, digits, - _ .), got {text!r}")
    return ref


#: Why a frame the IOC received was not published (``DropCauses_RBV``).
DROP_CAUSES: tuple[str, ...] = ("replaced", "engine_queue", "overtaken", "engine_lost", "disabled")


class FrameBooks:
    """Where every frame went, sans-I/O: ``received == published + dropped + errors + pending``, always.

    ``pending`` is what waits in the newest-wins slot or is in flight to the engine; once the camera
    stops and the IOC is idle it is 0. Source gaps are frames the camera made that never reached the
    IOC (UniqueId jumps, as areaDetector plugins count dropped arrays); the camera's own count is
    ``received + source_gaps`` while the IOC listens. A UniqueId that goes back (the camera restarted,
    or its counter was reset) starts the reference again without counting anything.
    """

    def __init__(self) -> None:
        self.received = 0
        self.published = 0
        self.errors = 0
        self.drops: dict[str, int] = dict.fromkeys(DROP_CAUSES, 0)
        self.source_gaps = 0
        self.last_unique_id: int | None = None

    def see(self, unique_id: int) -> int:
        """A source frame's UniqueId (received or not: a disabled IOC still follows the ids); the gap it ends."""
        last, self.last_unique_id = self.last_unique_id, unique_id
        if last is None or unique_id <= last:
            return 0
        gap = unique_id - last - 1
        self.source_gaps += gap
        return gap

    def drop(self, cause: str, n: int = 1) -> None:
        if cause not in self.drops:
            raise ValueError(f"unknown drop cause {cause!r}; expected one of {', '.join(DROP_CAUSES)}")
        self.drops[cause] += n

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    @property
    def pending(self) -> int:
        return self.received - self.published - self.dropped - self.errors

    def causes_text(self) -> str:
        """``DropCauses_RBV``: ``replaced=3 engine_queue=0 ...``, every cause, in a fixed order."""
        return " ".join(f"{k}={v}" for k, v in self.drops.items())
