"""``cdae record``: raw frames from a live camera PV into a recording file (:mod:`cdae.recording`).

Subscribes to the camera's NDStdArrays plugin (or a plain waveform PV) exactly as the filter IOC
does (:class:`~cdae.ioc.source.FrameSource`), and writes every new frame with its UniqueId and
EPICS timestamp, flushed frame by frame. The frame already on the PV when recording starts is
not recorded (it may predate a shutter change). Camera metadata PVs (exposure, gain,
temperature, shutter, ...) are read once at the start, where the camera has them.

A camera that is missing is an error before anything is written; one that disconnects or stops
sending ends the run with a clear message and keeps every frame recorded so far.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from caproto import ChannelType
from caproto.asyncio.client import PV, Context
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator
from tqdm import tqdm

from cdae.ioc.frames import FrameInfo, IocError, NDDataType
from cdae.ioc.source import FrameSource, SourceNames
from cdae.recording import RecordingError, RunInfo, RunWriter

#: ADBase / NDPluginBase PVs worth keeping with the frames, read where the camera has them.
CAMERA_METADATA_PVS: tuple[str, ...] = (
    "Manufacturer_RBV", "Model_RBV", "SerialNumber_RBV", "FirmwareVersion_RBV", "DriverVersion_RBV",
    "ADCoreVersion_RBV", "AcquireTime_RBV", "AcquirePeriod_RBV", "FrameRate_RBV", "Gain_RBV",
    "Temperature_RBV", "TemperatureActual", "BinX_RBV", "BinY_RBV", "ReverseX_RBV", "ReverseY_RBV",
    "MinX_RBV", "MinY_RBV", "MaxSizeX_RBV", "MaxSizeY_RBV", "ImageMode_RBV", "TriggerMode_RBV",
    "NumExposures_RBV", "ShutterControl_RBV", "ShutterStatus_RBV", "ShutterMode_RBV",
)
_SHUTTER_OPEN = ("Open",)


class RecordError(IocError):
    """Recording cannot start (no camera, bad output file): nothing was written."""


class RecordConfig(BaseModel):
    """One ``cdae record`` call; the CLI flags are a thin layer over it."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, description="camera image prefix (13SIM1:image1:) or, with width/height, a waveform PV")
    frames: int = Field(ge=1, description="frames to record")
    output: Path = Field(description="recording file (HDF5); a new run is appended if it exists")
    dark: bool = Field(False, description="frames taken with the shutter closed")
    camera_prefix: str | None = Field(None, description="where the camera's ADBase PVs live (13SIM1:cam1:); default: source")
    bit_depth: int | None = Field(None, ge=1, le=32, description="ADC bits when the data type is wider (12 in UInt16)")
    width: int | None = Field(None, ge=1, description="plain waveform source: width")
    height: int | None = Field(None, ge=1, description="plain waveform source: height")
    data_type: str | None = Field(None, description="plain waveform source: data type name (UInt16, ...)")
    connect_timeout_s: float = Field(5.0, gt=0, description="the camera must connect within this")
    frame_timeout_s: float = Field(10.0, gt=0, description="no new frame for this long ends the run")
    note: str = Field("", description="free text kept with the run (what the camera looked at)")

    @field_validator("data_type")
    @classmethod
    def _known_type(cls, value: str | None) -> str | None:
        if value is not None and value not in NDDataType.__members__:
            raise ValueError(f"data type {value!r}: expected one of {', '.join(NDDataType.__members__)}")
        return value

    def source_names(self) -> SourceNames:
        if (self.width is None) != (self.height is None):
            raise RecordError("a plain waveform source needs both --width and --height")
        if self.width is not None:
            return SourceNames(array=self.source)
        return SourceNames.nd_std_arrays(self.source)


@dataclass
class RecordResult:
    """How a recording ended: the run written (None when no frame came), and an error if it ended early."""

    run: RunInfo | None
    error: str | None

    @property
    def complete(self) -> bool:
        return self.run is not None and self.run.complete


async def _read_metadata_pv(pv: PV, timeout_s: float) -> JsonValue:
    await pv.wait_for_connection(timeout=timeout_s)
    native = ChannelType(pv.channel.native_data_type)
    if native in (ChannelType.ENUM, ChannelType.STRING):
        value = (await pv.read(data_type=ChannelType.STRING, timeout=timeout_s)).data[0]
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    data = (await pv.read(timeout=timeout_s)).data
    if native == ChannelType.CHAR and len(data) > 1:  # a long string
        return bytes(bytearray(int(x) for x in data)).split(b"\0")[0].decode(errors="replace")
    values = [v.item() if isinstance(v, np.generic) else v for v in np.asarray(data).tolist()]
    return values[0] if len(values) == 1 else values


async def read_camera_metadata(ctx: Context, prefix: str, timeout_s: float = 1.0) -> dict[str, JsonValue]:
    """The :data:`CAMERA_METADATA_PVS` that ``prefix`` serves, by suffix; the others are left out."""
    pvs = await ctx.get_pvs(*(prefix + s for s in CAMERA_METADATA_PVS))
    values = await asyncio.gather(*(_read_metadata_pv(pv, timeout_s) for pv in pvs), return_exceptions=True)
    return {s: v for s, v in zip(CAMERA_METADATA_PVS, values) if not isinstance(v, BaseException)}


def _shutter_warning(camera: dict[str, JsonValue], dark: bool) -> str | None:
    state = camera.get("ShutterStatus_RBV", camera.get("ShutterControl_RBV"))
    if state is None:
        return None
    is_open = state in _SHUTTER_OPEN
    if dark and is_open:
        return f"recording dark frames, but the camera's shutter reads {state!r}"
    if not dark and not is_open:
        return f"the camera's shutter reads {state!r}: pass --dark if these are dark frames"
    return None


class Recorder:
    """Receives frames from a :class:`FrameSource` and appends them to one run."""

    def __init__(self, config: RecordConfig, progress: bool) -> None:
        self.config = config
        self.queue: asyncio.Queue[tuple[np.ndarray, FrameInfo, float]] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.errors: list[str] = []
        self.writer: RunWriter | None = None
        self.camera: dict[str, JsonValue] = {}
        self.initial_id: int | None = None
        self.first = True
        self.bar = tqdm(total=config.frames, unit="frame", desc=f"recording {config.source}",
                        disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def on_frame(self, frame: np.ndarray, info: FrameInfo) -> None:
        if self.first:
            self.first = False
            # the value already on the PV when we subscribed: taken before we started, so not ours
            if self.initial_id is None or info.unique_id == self.initial_id:
                return
        self.queue.put_nowait((frame, info, time.time()))

    def on_error(self, message: str) -> None:
        self.errors.append(message)

    def on_connection(self, up: bool) -> None:
        (self.connected.set if up else self.connected.clear)()

    def _open_run(self, frame: np.ndarray, info: FrameInfo) -> RunWriter:
        c = self.config
        bit_depth = c.bit_depth or 8 * frame.dtype.itemsize
        run = RunInfo(source=c.source, camera_prefix=c.camera_prefix or c.source, dark=c.dark,
                      data_type=info.data_type.name, bit_depth=bit_depth,
                      bit_depth_source="user" if c.bit_depth else "data type", height=frame.shape[0],
                      width=frame.shape[1], frames_requested=c.frames, camera=self.camera,
                      command=shlex.join(["cdae", *sys.argv[1:]]), note=c.note)
        return RunWriter(c.output, run, frame.dtype)

    def _check_same(self, frame: np.ndarray, info: FrameInfo) -> str | None:
        assert self.writer is not None
        run = self.writer.info
        if frame.shape != (run.height, run.width) or info.data_type.name != run.data_type:
            return (f"the camera changed to {frame.shape[1]}x{frame.shape[0]} {info.data_type.name} from "
                    f"{run.width}x{run.height} {run.data_type}; a run keeps one size and type: record a new run")
        return None

    async def _next(self, stop: asyncio.Event) -> tuple[np.ndarray, FrameInfo, float] | str:
        """The next frame, or why there is none."""
        getter = asyncio.ensure_future(self.queue.get())
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({getter, stopper}, timeout=self.config.frame_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        for t in (getter, stopper):
            if t not in done:
                t.cancel()
        if getter in done:
            return getter.result()
        if stopper in done:
            return "interrupted"
        t = self.config.frame_timeout_s
        if not self.connected.is_set():
            return f"camera disconnected ({self.config.source_names().array}) and did not come back within {t:g} s"
        last = f" (last problem: {self.errors[-1]})" if self.errors else ""
        return f"no new frame for {t:g} s: is the camera acquiring?{last}"

    async def run(self, stop: asyncio.Event) -> RecordResult:
        reason = "recorded all frames"
        try:
            while self.writer is None or self.writer.count < self.config.frames:
                item = await self._next(stop)
                if isinstance(item, str):
                    reason = item
                    break
                frame, info, received = item
                if self.writer is None:
                    self.writer = self._open_run(frame, info)
                elif (changed := self._check_same(frame, info)) is not None:
                    reason = changed
                    break
                self.writer.append(frame, info.unique_id, info.stamp, received)
                self.bar.update(1)
        finally:
            self.bar.close()
            if self.writer is not None:
                done = self.writer.count >= self.config.frames
                info = self.writer.close(reason if done else f"stopped early: {reason}", complete=done)
        if self.writer is None:
            return RecordResult(None, f"no frame recorded: {reason}")
        return RecordResult(info, None if info.complete else reason)


async def record(config: RecordConfig, stop: asyncio.Event, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> RecordResult:
    """Record ``config.frames`` new frames into ``config.output`` (a new run); see the module docstring."""
    names = config.source_names()
    recorder = Recorder(config, progress)
    source = FrameSource(names, recorder.on_frame, recorder.on_error, recorder.on_connection,
                         width=config.width, height=config.height,
                         data_type=NDDataType[config.data_type] if config.data_type else None)
    ctx = Context()
    try:
        try:
            await source.connect(ctx, timeout_s=config.connect_timeout_s)
        except TimeoutError:
            addr = os.environ.get("EPICS_CA_ADDR_LIST", "(unset)")
            raise RecordError(f"no camera: {names.array} did not connect within {config.connect_timeout_s:g} s "
                              f"(is the camera IOC running, is the prefix right? EPICS_CA_ADDR_LIST={addr})") from None
        recorder.initial_id = source.unique_id[0] if source.unique_id is not None else None
        recorder.camera = await read_camera_metadata(ctx, config.camera_prefix or config.source)
        if (warning := _shutter_warning(recorder.camera, config.dark)) is not None:
            log(f"warning: {warning}")
        log(f"recording {config.frames} {'dark ' if config.dark else ''}frames from {names.array} → {config.output}")
        return await recorder.run(stop)
    except RecordingError as e:
        raise RecordError(str(e)) from e
    finally:
        await source.close()
        await ctx.disconnect()

