"""The PV contract (DESIGN.md), top to bottom: what every client of the filter IOC and the simulated camera sees.

The denoised output looks like an areaDetector NDPluginStdArrays plugin (ADCore's
NDArrayBase.template + NDPluginBase.template + NDStdArrays.template), so viewers, the archiver,
ophyd and ophyd-async use it unchanged. ``ArrayData``'s CA element type and length are fixed
when the IOC starts (the source's, like a waveform's FTVL/NELM); :func:`filter_pvs` and
:func:`camera_pvs` make the classes for them. Behaviour lives elsewhere: the groups call their
``controller`` (the filter IOC or the camera) from the putters, and the controller writes the
read-backs.
"""

from __future__ import annotations

import unicodedata
from typing import Protocol

import numpy as np
from caproto import AlarmSeverity, AlarmStatus, CAStatus, ChannelType
from caproto._data import Forbidden
from caproto.server import PVGroup, SubGroup
from caproto.server import pvproperty as _pvproperty
from caproto.server.server import (PvpropertyByteRO, PvpropertyChar, PvpropertyCharRO, PvpropertyFloatRO,
                                   PvpropertyString, PvpropertyStringRO, pvspec_type_map)

from cdae import __version__
from cdae.ioc.frames import COLOR_MODE_NAMES, DATA_TYPE_NAMES
from cdae.lines import log

#: The ADCore release whose PV set this emulates (reported, so clients know what to expect).
AD_CORE_VERSION = "3.12.1"
ENABLE_STRINGS = ("Disable", "Enable")  # exactly these: ophyd-async compares the strings
YES_NO = ("No", "Yes")
CONNECTION_STRINGS = ("Disconnected", "Connected")
ACQUIRE_STRINGS = ("Done", "Acquire")
SHUTTER_CONTROL_STRINGS = ("Close", "Open")  # ADBase.template's ShutterControl (bo ZNAM/ONAM)
SHUTTER_STATUS_STRINGS = ("Closed", "Open")  # ADBase.template's ShutterStatus_RBV
STRING_MAX = 40  # DBR_STRING holds 39 characters and a NUL
QUEUE_SIZE_MIN, QUEUE_SIZE_MAX = 1, 64  # QueueSize: frames in flight to the engine (the PV and IocConfig)

_CA_TYPES: dict[str, ChannelType] = {
    "uint8": ChannelType.CHAR,
    "int16": ChannelType.INT,  # caproto's name for DBR_SHORT
    "int32": ChannelType.LONG,
    "float32": ChannelType.FLOAT,
    "float64": ChannelType.DOUBLE,
}


def pvproperty(**kwargs: object) -> _pvproperty:
    """caproto's pvproperty with an alarm of its own: caproto's default shares one alarm across a
    whole group, so an INVALID image would drag every status PV into the same alarm."""
    kwargs.setdefault("alarm_group", kwargs["name"])
    return _pvproperty(**kwargs)


def _refusing(base: type) -> type:
    """A writable PV class whose refusals reach the client, and whose next good write clears them.

    caproto answers a putter's exception with a CA_PROTO_ERROR message, which a put-notify does not
    match: caproto's client times out and pyepics reports success. Here the exception (after caproto
    has put the PV in a WRITE/MAJOR alarm) becomes the put-notify's status, ECA_PUTFAIL; a write the
    putter accepts clears that alarm (caproto would keep it until the next refusal's opposite, never).
    """

    async def auth_write(self, hostname, username, data, data_type, metadata, **kwargs):  # noqa: ANN001, ANN202
        try:
            return await base.auth_write(self, hostname, username, data, data_type, metadata, **kwargs)
        except Forbidden:  # read-only or access rights: caproto's own answer
            raise
        except Exception as e:  # noqa: BLE001 - any refusal of the putter: the client is told
            log("cdae-ioc", f"write to {self.pvname} by {username}@{hostname} refused: {e}")
            return CAStatus.ECA_PUTFAIL

    async def verify_value(self, value):  # noqa: ANN001, ANN202
        value = await base.verify_value(self, value)  # raises when the putter refuses
        if self.alarm.status == AlarmStatus.WRITE:
            await self.alarm.write(status=AlarmStatus.NO_ALARM, severity=AlarmSeverity.NO_ALARM)
        return value

    return type(base.__name__, (base,), {"auth_write": auth_write, "verify_value": verify_value})


#: pvproperty classes of every group here: refused writes answer ECA_PUTFAIL (see :func:`_refusing`)
_TYPE_MAP = {dtype: _refusing(cls) for dtype, cls in pvspec_type_map.items()}


def ca_channel_type(element: np.dtype | str) -> ChannelType:
    """The CA channel type of an array element dtype (what ``ArrayData`` is served as)."""
    name = np.dtype(element).newbyteorder("=").name
    if name not in _CA_TYPES:
        raise ValueError(f"no CA channel type for {name}; expected one of {', '.join(_CA_TYPES)}")
    return _CA_TYPES[name]


def _array(element: np.dtype | str, max_elements: int, doc: str, dtype: type | None = None) -> _pvproperty:
    """An image's ``ArrayData``. A uint8 image is caproto's byte channel (DBR_CHAR, kept as the array), not
    its default for CHAR, the string channel: that one decodes every frame written into a Python str and
    serves each read of it element by element (76 ms per 1024² frame read, against 0.16 ms)."""
    if dtype is None and np.dtype(element) == np.uint8:
        dtype = PvpropertyByteRO
    return pvproperty(name="ArrayData", value=np.zeros(1, dtype=np.dtype(element)),
                      dtype=dtype or ca_channel_type(element), max_length=max_elements, read_only=True, doc=doc)


def has_subscribers(channel: object) -> bool:
    """Whether any client monitors this PV now (caproto keeps them by queue, sync filter and data type; an
    unsubscribed client leaves an empty set behind). This reads caproto's ``ChannelData._queues`` (the
    version in constraints.txt); where a caproto has no such record, True: the value is made every frame."""
    queues = getattr(channel, "_queues", None)
    if not isinstance(queues, dict):
        return True
    return any(specs for syncs in queues.values() for by_type in syncs.values() for specs in by_type.values())


class DeferredArray(PvpropertyFloatRO):
    """A read-only float32 array whose value may be handed over as a computation, run on the first read.

    :meth:`defer` sets the timestamp and alarm now and keeps ``compute``; a read (``caget``) or a new
    subscription runs it, stores the result as the value and serves it, so a reader always gets the value
    of the frame the timestamp names. With monitors on the PV nothing is deferred (the publisher checks
    :func:`has_subscribers` and writes the value itself, a monitor per frame)."""

    element = np.dtype(np.float32)
    _deferred = None  # Callable[[], np.ndarray] | None: the value not computed yet

    async def defer(self, compute: object, **metadata: object) -> None:
        if not (isinstance(getattr(self, "_content", None), dict) and isinstance(getattr(self, "_data", None), dict)):
            metadata = {"status": AlarmStatus.NO_ALARM, "severity": AlarmSeverity.NO_ALARM, **metadata}
            await self.write(compute(), **metadata)  # type: ignore[operator]  # a caproto without these: at once
            return
        self._deferred = compute
        self._content.clear()  # caproto's per-data-type cache of the last value
        await self.write_metadata(publish=False, **metadata)

    def _materialise(self) -> None:
        compute, self._deferred = self._deferred, None
        if compute is not None:
            self._data["value"] = compute()  # type: ignore[operator]
            self._content.clear()

    async def write(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        self._deferred = None  # a value written replaces one not computed yet
        await super().write(*args, **kwargs)

    async def read(self, data_type: object) -> object:  # type: ignore[override]
        self._materialise()
        return await super().read(data_type)

    async def subscribe(self, queue: object, sub_spec: object, sub: object) -> None:  # type: ignore[override]
        self._materialise()  # the first update of a monitor is the current value
        await super().subscribe(queue, sub_spec, sub)

    @property
    def value(self) -> object:  # type: ignore[override]
        self._materialise()
        return super().value


def ca_text(text: str, limit: int) -> str:
    """``text`` as CA strings can carry it: ASCII ("…" becomes "...", other characters "?"), at most ``limit``."""
    if text.isascii():
        return text[:limit]
    flat = unicodedata.normalize("NFKD", text).encode("ascii", "replace").decode("ascii")
    return flat[:limit]


def _ascii(base: type, limit: int | None) -> type:
    """A string PV class that stores what it can serve: caproto encodes with latin-1 at *read* time, so a
    message with "…" in it was stored and every later read of the PV failed (a client timeout)."""

    def preprocess_value(self, value):  # noqa: ANN001, ANN202
        if isinstance(value, str):
            value = ca_text(value, self._max_length - 1 if limit is None else limit)  # room for the NUL
        return base.preprocess_value(self, value)

    return type(base.__name__, (base,), {"preprocess_value": preprocess_value})


_ASCII_CHAR = _ascii(_refusing(PvpropertyChar), None)
_ASCII_CHAR_RO = _ascii(PvpropertyCharRO, None)
_ASCII_STRING = _ascii(_refusing(PvpropertyString), 39)  # DBR_STRING: 39 characters and a NUL
_ASCII_STRING_RO = _ascii(PvpropertyStringRO, 39)


def _long_string(name: str, value: str = "", length: int = 256, read_only: bool = True, doc: str = "") -> _pvproperty:
    return pvproperty(name=name, value=value, dtype=_ASCII_CHAR_RO if read_only else _ASCII_CHAR, max_length=length,
                      report_as_string=True, read_only=read_only, doc=doc)


def _string(name: str, value: str = "", read_only: bool = True, doc: str = "") -> _pvproperty:
    return pvproperty(name=name, value=value, dtype=_ASCII_STRING_RO if read_only else _ASCII_STRING,
                      read_only=read_only, doc=doc)


class FilterController(Protocol):
    """What the filter IOC's putters call."""

    async def request_model(self, ref: str) -> None: ...
    async def set_enabled(self, enabled: bool) -> None: ...
    async def set_queue_size(self, size: int) -> None: ...
    async def set_bad_pixel_file(self, path: str) -> None: ...
    async def reset_dropped(self) -> None: ...


# --- NDArrayBase: one image ---------------------------------------------------------------------

class NDArrayPVs(PVGroup):
    """An image and what a client needs to decode it (ADCore NDArrayBase.template + NDStdArrays.template)."""

    type_map = _TYPE_MAP

    array_data = _array(np.int16, 1, "the pixels, C order (ArraySize0 fastest)")
    ndimensions = pvproperty(name="NDimensions_RBV", value=2, read_only=True)
    dimensions = pvproperty(name="Dimensions_RBV", value=[0] * 10, dtype=ChannelType.LONG, max_length=10,
                            read_only=True, doc="ND_ARRAY_MAX_DIMS sizes, fastest first")
    array_size0 = pvproperty(name="ArraySize0_RBV", value=0, read_only=True, doc="width")
    array_size1 = pvproperty(name="ArraySize1_RBV", value=0, read_only=True, doc="height")
    array_size2 = pvproperty(name="ArraySize2_RBV", value=0, read_only=True, doc="0 for a 2-D frame")
    array_size_x = pvproperty(name="ArraySizeX_RBV", value=0, read_only=True)
    array_size_y = pvproperty(name="ArraySizeY_RBV", value=0, read_only=True)
    array_size_z = pvproperty(name="ArraySizeZ_RBV", value=0, read_only=True)
    array_size = pvproperty(name="ArraySize_RBV", value=0, read_only=True, doc="bytes")
    data_type = pvproperty(name="DataType_RBV", value="UInt16", dtype=ChannelType.ENUM, enum_strings=DATA_TYPE_NAMES,
                           read_only=True, doc="ADCore R3-8 order; clients reinterpret ArrayData with it")
    color_mode = pvproperty(name="ColorMode_RBV", value="Mono", dtype=ChannelType.ENUM, enum_strings=COLOR_MODE_NAMES,
                            read_only=True)
    unique_id = pvproperty(name="UniqueId_RBV", value=0, read_only=True, doc="the raw frame's")
    time_stamp = pvproperty(name="TimeStamp_RBV", value=0.0, precision=6, read_only=True,
                            doc="the raw frame's, seconds past the EPICS epoch")
    epics_ts_sec = pvproperty(name="EpicsTSSec_RBV", value=0, read_only=True)
    epics_ts_nsec = pvproperty(name="EpicsTSNsec_RBV", value=0, read_only=True)
    array_counter = pvproperty(name="ArrayCounter", value=0, doc="frames published; write to reset")
    array_counter_rbv = pvproperty(name="ArrayCounter_RBV", value=0, read_only=True)
    array_rate = pvproperty(name="ArrayRate_RBV", value=0.0, precision=2, units="Hz", read_only=True)

    # ArrayCounter_RBV is the frames published (the counter :func:`~cdae.ioc.publish.write_image` is given)
    # plus what a write to ArrayCounter added: a write sets the count the next frames go on from, as areaDetector's
    _counted = 0  # the last counter this image was published with
    _counter_shift = 0

    def array_count(self, counter: int) -> int:
        """What ArrayCounter_RBV says for a frame published as the ``counter``-th."""
        self._counted = counter
        return counter + self._counter_shift

    @array_counter.putter
    async def array_counter(self, instance: object, value: int) -> int:
        if value < 0:
            raise ValueError(f"ArrayCounter: expected >= 0, got {value}")
        self._counter_shift = value - self._counted
        await self.array_counter_rbv.write(value)
        return value


# --- the filter IOC -----------------------------------------------------------------------------

class ResidualPVs(NDArrayPVs):
    """``P Residual:``: raw − denoised, signed (what the filter removed)."""

    array_data = _array(np.float32, 1, "raw − denoised, float32")


class DefectMapPVs(NDArrayPVs):
    """``P DefectMap:``: each pixel's flag class from a guarding engine (the default: 0 none, 1 bad-pixel map,
    2 saturated, 3 impulse, 4 learned); from an unguarded one the defect probability, UInt8 = round(255 p)."""

    array_data = _array(np.uint8, 1, "flag class (guarded) or defect probability x 255")


class FilterPVs(NDArrayPVs):
    """The filter IOC under ``P``: the denoised image, plugin identity and controls, engine state."""

    controller: FilterController | None = None

    # identity (ophyd's ImagePlugin will not connect without PluginType_RBV starting NDPluginStdArrays)
    plugin_type = _string("PluginType_RBV", "NDPluginStdArrays (cdae filter)")
    port_name = _string("PortName_RBV", "CDAE1")
    nd_array_port = _string("NDArrayPort", "", read_only=False, doc="the source prefix")
    nd_array_port_rbv = _string("NDArrayPort_RBV", "")
    nd_array_address = pvproperty(name="NDArrayAddress", value=0)
    nd_array_address_rbv = pvproperty(name="NDArrayAddress_RBV", value=0, read_only=True)
    ad_core_version = _string("ADCoreVersion_RBV", AD_CORE_VERSION)
    driver_version = _string("DriverVersion_RBV", f"cdae {__version__}")
    nd_attributes_file = _long_string("NDAttributesFile", read_only=False, doc="accepted, unused")

    # plugin-style controls
    enable_callbacks = pvproperty(name="EnableCallbacks", value="Enable", dtype=ChannelType.ENUM,
                                  enum_strings=ENABLE_STRINGS)
    enable_callbacks_rbv = pvproperty(name="EnableCallbacks_RBV", value="Enable", dtype=ChannelType.ENUM,
                                      enum_strings=ENABLE_STRINGS, read_only=True)
    blocking_callbacks = pvproperty(name="BlockingCallbacks", value="No", dtype=ChannelType.ENUM, enum_strings=YES_NO)
    blocking_callbacks_rbv = pvproperty(name="BlockingCallbacks_RBV", value="No", dtype=ChannelType.ENUM,
                                        enum_strings=YES_NO, read_only=True)
    queue_size = pvproperty(name="QueueSize", value=2, lower_ctrl_limit=QUEUE_SIZE_MIN, upper_ctrl_limit=QUEUE_SIZE_MAX,
                            doc="frames in flight to the engine")
    queue_size_rbv = pvproperty(name="QueueSize_RBV", value=2, read_only=True)
    queue_free = pvproperty(name="QueueFree", value=2, read_only=True)
    dropped_arrays = pvproperty(name="DroppedArrays", value=0, doc="write 0 to reset")
    dropped_arrays_rbv = pvproperty(name="DroppedArrays_RBV", value=0, read_only=True,
                                    doc="frames replaced by a newer one before the engine took them")
    execution_time = pvproperty(name="ExecutionTime_RBV", value=0.0, precision=3, units="ms", read_only=True,
                                doc="time in the engine (queue + inference)")
    latency = pvproperty(name="Latency_RBV", value=0.0, precision=3, units="ms", read_only=True,
                         doc="raw frame timestamp → denoised frame published")

    # what the filter removed
    residual = SubGroup(ResidualPVs, prefix="Residual:")
    defect_map = SubGroup(DefectMapPVs, prefix="DefectMap:")

    # model control and engine state
    model = _string("Model", "", read_only=False, doc="NAME:VERSION to activate")
    model_rbv = _string("Model_RBV", "", doc="the model that produced the last published frame")
    models = _long_string("Models_RBV", length=4096, doc="available NAME:VERSION, comma-separated")
    backend = _string("Backend_RBV", "")
    engine_address = _long_string("EngineAddress_RBV")
    engine_connected = pvproperty(name="EngineConnected_RBV", value="Disconnected", dtype=ChannelType.ENUM,
                                  enum_strings=CONNECTION_STRINGS, read_only=True, doc="MAJOR alarm when down")
    source_connected = pvproperty(name="SourceConnected_RBV", value="Disconnected", dtype=ChannelType.ENUM,
                                  enum_strings=CONNECTION_STRINGS, read_only=True)
    # the camera's bad-pixel map (areaDetector NDPluginBadPixel file), filled in the denoised frame
    bad_pixel_file = _long_string("BadPixelFile", read_only=False,
                                  doc="path of the camera's bad-pixel JSON file; empty: none. A file that "
                                  "cannot be used is refused and the map in use is kept")
    bad_pixel_count = pvproperty(name="BadPixelCount_RBV", value=0, read_only=True,
                                 doc="pixels listed in the bad-pixel map in use")
    status = _long_string("Status_RBV", "starting")
    last_error = _long_string("LastError_RBV")
    frames_received = pvproperty(name="FramesReceived_RBV", value=0, read_only=True, doc="source frames seen")
    frame_errors = pvproperty(name="FrameErrors_RBV", value=0, read_only=True,
                              doc="frames refused (size/data mismatch, unsupported type, engine error)")
    source_gaps = pvproperty(name="SourceGaps_RBV", value=0, read_only=True,
                             doc="frames the camera made that never reached the IOC (UniqueId jumps; a UniqueId "
                             "that goes back, a camera restart, starts counting again from there)")
    # the engine's guard (when it runs one): per frame, the pixels moved beyond the camera's noise, by reason
    flagged_pixels = pvproperty(name="FlaggedPixels_RBV", value=0, read_only=True,
                                doc="pixels of the last frame the filter moved beyond the noise bound (all reasons)")
    saturated_pixels = pvproperty(name="SaturatedPixels_RBV", value=0, read_only=True,
                                  doc="pixels of the last frame at the ADC maximum or the full well: kept raw")
    impulse_pixels = pvproperty(name="ImpulsePixels_RBV", value=0, read_only=True,
                                doc="pixels of the last frame sharper than the optics allow (hot, dead, radiation)")
    drop_causes = _long_string("DropCauses_RBV", doc="DroppedArrays_RBV by cause: replaced (a newer frame came "
                               "first), engine_queue, overtaken, engine_lost, disabled")

    @nd_array_port.putter
    async def nd_array_port(self, instance: object, value: str) -> str:
        raise ValueError("NDArrayPort is set by --source; restart the IOC to change the source")

    @nd_array_address.putter
    async def nd_array_address(self, instance: object, value: int) -> int:
        if value != 0:
            raise ValueError(f"NDArrayAddress: only address 0 exists, got {value}")
        return value

    @enable_callbacks.putter
    async def enable_callbacks(self, instance: object, value: str) -> str:
        if self.controller is not None:
            await self.controller.set_enabled(value == "Enable")
        await self.enable_callbacks_rbv.write(value)
        return value

    @blocking_callbacks.putter
    async def blocking_callbacks(self, instance: object, value: str) -> str:
        await self.blocking_callbacks_rbv.write(value)
        return value

    @queue_size.putter
    async def queue_size(self, instance: object, value: int) -> int:
        if not QUEUE_SIZE_MIN <= value <= QUEUE_SIZE_MAX:
            raise ValueError(f"QueueSize: expected {QUEUE_SIZE_MIN}..{QUEUE_SIZE_MAX} frames in flight, got {value}")
        if self.controller is not None:
            await self.controller.set_queue_size(value)
        await self.queue_size_rbv.write(value)
        return value

    @dropped_arrays.putter
    async def dropped_arrays(self, instance: object, value: int) -> int:
        if value != 0:
            raise ValueError(f"DroppedArrays: only 0 (reset) may be written, got {value}")
        if self.controller is not None:  # the count itself (and DropCauses_RBV) starts again from 0
            await self.controller.reset_dropped()
        else:
            await self.dropped_arrays_rbv.write(0)
        return value

    @bad_pixel_file.putter
    async def bad_pixel_file(self, instance: object, value: str) -> str:
        if self.controller is None:
            raise ValueError("the IOC is not running a filter")
        await self.controller.set_bad_pixel_file(value)  # raises (refused, WRITE alarm) when unusable
        return value

    @model.putter
    async def model(self, instance: object, value: str) -> str:
        if self.controller is None:
            raise ValueError("the IOC is not running a filter")
        await self.controller.request_model(value)  # raises (refused, WRITE alarm) when the engine says no
        return value


def filter_pvs(element: np.dtype | str, max_elements: int) -> type[FilterPVs]:
    """The filter IOC's PV group with ``ArrayData`` served as ``element`` (the source's CA type), ``max_elements`` long."""
    doc = "the denoised frame, same element type as the source"
    residual = type("ResidualPVs", (ResidualPVs,), {"array_data": _array(np.float32, max_elements, "raw − denoised",
                                                                          dtype=DeferredArray)})
    defect = type("DefectMapPVs", (DefectMapPVs,), {"array_data": _array(np.uint8, max_elements, "defect p x 255")})
    return type("FilterPVs", (FilterPVs,), {
        "array_data": _array(element, max_elements, doc),
        "residual": SubGroup(residual, prefix="Residual:"),
        "defect_map": SubGroup(defect, prefix="DefectMap:"),
    })


# --- the simulated camera ----------------------------------------------------------------------

class CameraController(Protocol):
    async def set_acquire(self, on: bool) -> None: ...
    async def set_rate(self, rate_hz: float) -> None: ...
    async def set_size(self, width: int, height: int) -> None: ...
    async def set_data_type(self, name: str) -> None: ...
    async def set_shutter(self, open_: bool) -> None: ...


class CleanPVs(NDArrayPVs):
    """``<camera prefix>Clean:``: the noiseless scene of the frame with the same UniqueId (tests only)."""

    array_data = _array(np.float32, 1, "clean frame, float32 DN")


class CameraPVs(NDArrayPVs):
    """An areaDetector-like camera + NDStdArrays plugin under one prefix (e.g. ``13SIM1:image1:``)."""

    controller: CameraController | None = None

    plugin_type = _string("PluginType_RBV", "NDPluginStdArrays (cdae sim)")
    port_name = _string("PortName_RBV", "SIM1")
    ad_core_version = _string("ADCoreVersion_RBV", AD_CORE_VERSION)
    driver_version = _string("DriverVersion_RBV", f"cdae {__version__}")
    manufacturer = _string("Manufacturer_RBV", "cdae")
    camera_model = _string("Model_RBV", "simulated camera")
    acquire = pvproperty(name="Acquire", value="Acquire", dtype=ChannelType.ENUM, enum_strings=ACQUIRE_STRINGS)
    acquire_rbv = pvproperty(name="Acquire_RBV", value="Acquire", dtype=ChannelType.ENUM,
                             enum_strings=ACQUIRE_STRINGS, read_only=True)
    rate = pvproperty(name="FrameRate", value=10.0, units="Hz", precision=2, lower_ctrl_limit=0.01,
                      upper_ctrl_limit=10000.0)
    rate_rbv = pvproperty(name="FrameRate_RBV", value=10.0, units="Hz", precision=2, read_only=True)
    size_x = pvproperty(name="SizeX", value=0, doc="width (frames re-simulated on change)")
    size_y = pvproperty(name="SizeY", value=0, doc="height")
    set_data_type = pvproperty(name="DataType", value="UInt16", dtype=ChannelType.ENUM, enum_strings=DATA_TYPE_NAMES,
                               doc="only types that fit the served CA element type")
    shutter_control = pvproperty(name="ShutterControl", value="Open", dtype=ChannelType.ENUM,
                                 enum_strings=SHUTTER_CONTROL_STRINGS, doc="Close: dark frames (bias, read noise, hot pixels)")
    shutter_control_rbv = pvproperty(name="ShutterControl_RBV", value="Open", dtype=ChannelType.ENUM,
                                     enum_strings=SHUTTER_CONTROL_STRINGS, read_only=True)
    shutter_status = pvproperty(name="ShutterStatus_RBV", value="Open", dtype=ChannelType.ENUM,
                                enum_strings=SHUTTER_STATUS_STRINGS, read_only=True)
    clean = SubGroup(CleanPVs, prefix="Clean:")

    @shutter_control.putter
    async def shutter_control(self, instance: object, value: str) -> str:
        if self.controller is not None:
            await self.controller.set_shutter(value == "Open")
        await self.shutter_control_rbv.write(value)
        await self.shutter_status.write("Open" if value == "Open" else "Closed")
        return value

    @acquire.putter
    async def acquire(self, instance: object, value: str) -> str:
        if self.controller is not None:
            await self.controller.set_acquire(value == "Acquire")
        await self.acquire_rbv.write(value)
        return value

    @rate.putter
    async def rate(self, instance: object, value: float) -> float:
        if not 0.01 <= value <= 10000.0:
            raise ValueError(f"FrameRate: expected 0.01..10000 Hz, got {value}")
        if self.controller is not None:
            await self.controller.set_rate(value)
        await self.rate_rbv.write(value)
        return value

    @size_x.putter
    async def size_x(self, instance: object, value: int) -> int:
        if self.controller is not None:
            await self.controller.set_size(value, self.size_y.value)
        return value

    @size_y.putter
    async def size_y(self, instance: object, value: int) -> int:
        if self.controller is not None:
            await self.controller.set_size(self.size_x.value, value)
        return value

    @set_data_type.putter
    async def set_data_type(self, instance: object, value: str) -> str:
        if self.controller is not None:
            await self.controller.set_data_type(value)
        return value


def camera_pvs(element: np.dtype | str, max_elements: int) -> type[CameraPVs]:
    """The camera's PV group with ``ArrayData`` served as ``element``, ``max_elements`` long."""
    clean = type("CleanPVs", (CleanPVs,), {"array_data": _array(np.float32, max_elements, "clean frame")})
    return type("CameraPVs", (CameraPVs,), {
        "array_data": _array(element, max_elements, "the raw frame"),
        "clean": SubGroup(clean, prefix="Clean:"),
    })
