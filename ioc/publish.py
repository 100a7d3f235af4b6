"""Writing one image into an :class:`~cdae.ioc.pvs.NDArrayPVs` group, the way areaDetector does.

Every PV of the image gets the frame's own timestamp as its CA record timestamp (areaDetector's
TSE=-2), and the size/type/id PVs are written *before* ``ArrayData``: a client that reacts to
``ArrayData`` reads the matching sizes, and the filter IOC matches a source's ids to its
pixels by that order and that timestamp.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from caproto import AlarmSeverity, AlarmStatus

from cdae.ioc.frames import COLOR_MODE_NAMES, FrameInfo, NDDataType, nd_timestamp
from cdae.ioc.pvs import DeferredArray, NDArrayPVs, has_subscribers

_OK = {"status": AlarmStatus.NO_ALARM, "severity": AlarmSeverity.NO_ALARM}


def wants_pixels(group: NDArrayPVs) -> bool:
    """Whether a frame's pixels for ``group`` are needed now: a :class:`DeferredArray` nobody monitors, not in
    alarm, takes them as a computation run on its first read instead (:func:`write_image` with a callable)."""
    arr = group.array_data
    return (not isinstance(arr, DeferredArray) or has_subscribers(arr)
            or arr.alarm.status != AlarmStatus.NO_ALARM or arr.alarm.severity != AlarmSeverity.NO_ALARM)


async def write_image(group: NDArrayPVs, pixels: np.ndarray | Callable[[], np.ndarray], height: int, width: int,
                      data_type: NDDataType, info: FrameInfo, counter: int, rate_hz: float,
                      itemsize: int | None = None) -> None:
    """Publish one frame: ``pixels`` are already flat in the group's CA element type, or a function that makes
    them (called now unless the group's ``ArrayData`` defers it to its first read: :func:`wants_pixels`)."""
    ts = info.stamp  # caproto takes the raw (sec, nsec) pair: passed along exactly, no float rounding
    sec, nsec = ts
    if callable(pixels) and wants_pixels(group):
        pixels = pixels()
    if itemsize is None:
        itemsize = (DeferredArray.element if callable(pixels) else np.dtype(pixels.dtype)).itemsize
    nbytes = width * height * itemsize
    for pv, value in (
        (group.ndimensions, 2),
        (group.dimensions, [width, height] + [0] * 8),
        (group.array_size0, width),
        (group.array_size1, height),
        (group.array_size2, 0),
        (group.array_size_x, width),
        (group.array_size_y, height),
        (group.array_size_z, 0),
        (group.array_size, nbytes),
        (group.data_type, data_type.name),
        (group.color_mode, COLOR_MODE_NAMES[int(info.color_mode)]),
        (group.unique_id, int(info.unique_id)),
        (group.time_stamp, nd_timestamp(ts)),
        (group.epics_ts_sec, sec),
        (group.epics_ts_nsec, nsec),
        (group.array_counter_rbv, group.array_count(counter)),
        (group.array_rate, round(rate_hz, 3)),
    ):
        if _same(pv.value, value):  # no monitor for an unchanged value, but a get sees the frame's time
            await pv.write_metadata(timestamp=ts, publish=False)
        else:
            await pv.write(value, timestamp=ts)
    if callable(pixels):
        await group.array_data.defer(pixels, timestamp=ts)  # type: ignore[attr-defined]
    else:
        await group.array_data.write(pixels, timestamp=ts, **_OK)


def _same(current: object, new: object) -> bool:
    if isinstance(new, list):
        return np.array_equal(np.asarray(current), np.asarray(new))
    return current == new


async def set_alarm(group: NDArrayPVs, status: AlarmStatus, severity: AlarmSeverity) -> None:
    """Put the image PV in (or out of) alarm; subscribers get the new status at once."""
    alarm = group.array_data.alarm
    if alarm.status != status or alarm.severity != severity:
        await alarm.write(status=status, severity=severity)
