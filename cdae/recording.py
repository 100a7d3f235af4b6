"""The camera recording file: raw frames from a live PV, as ``cdae record`` writes them (HDF5).

One module owns the format; the recorder (``cdae.ioc.record``, EPICS side) writes it and
characterisation and fine-tuning (``cdae.training``) read it, so it needs nothing but h5py,
numpy and pydantic. Layout::

    /                      attrs: format = "cdae-recording", format_version
    /runs/0000/frames      (N, H, W) in the camera's data type, one chunk per frame
    /runs/0000/unique_id   (N,) int64    the camera's UniqueId_RBV
    /runs/0000/epics_ts    (N, 2) int64  the frame's CA timestamp: seconds past the EPICS epoch, ns
    /runs/0000/received    (N,) float64  POSIX time the recorder got the frame (host clock)
    /runs/0000             attrs: the :class:`RunInfo` fields (source, dark, data type, bit depth,
                           camera metadata, start/stop, why it stopped, ...)

A file holds several runs (e.g. one dark, then one with light), appended one after the other.
Frames are written in SWMR mode and flushed one by one: a recorder that dies leaves every frame
it received readable, and a run's ``complete`` flag stays false.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue

if TYPE_CHECKING:
    from types import TracebackType

FORMAT = "cdae-recording"
FORMAT_VERSION = 1
#: Seconds between the POSIX epoch (1970) and the EPICS epoch (1990).
EPICS_EPOCH_OFFSET_S = 631152000


class RecordingError(Exception):
    """A recording file that cannot be written or read as asked; the message names the file."""


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunInfo(BaseModel):
    """What is known about one run of frames (stored as the run group's attributes)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", description="the run's group name under /runs")
    source: str = Field(description="PV prefix (or waveform PV) the frames came from")
    camera_prefix: str = Field("", description="prefix the camera metadata PVs were read from")
    dark: bool = Field(False, description="recorded with the shutter closed: no light on the sensor")
    data_type: str = Field(description="areaDetector data type of the frames (UInt16, ...)")
    bit_depth: int = Field(ge=1, le=64, description="ADC bits: values lie in [0, 2**bit_depth - 1]")
    bit_depth_source: str = Field("data type", description="where bit_depth came from: 'user' or 'data type'")
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    frames: int = Field(0, ge=0, description="frames stored (the datasets' length)")
    frames_requested: int = Field(0, ge=0)
    camera: dict[str, JsonValue] = Field(default_factory=dict, description="camera PVs read at the start")
    started_utc: str = Field(default_factory=utc_now)
    finished_utc: str | None = None
    complete: bool = Field(False, description="all requested frames were recorded")
    stop_reason: str = Field("", description="why the run ended (empty while recording or after a crash)")
    skipped_ids: int = Field(0, ge=0, description="UniqueIds missing between recorded frames (camera frames not received)")
    command: str = ""
    note: str = ""

    @property
    def adc_max(self) -> int:
        return 2**self.bit_depth - 1


def _open(path: Path, mode: str) -> h5py.File:
    try:
        if mode == "r":
            try:  # SWMR: readable while a recorder is still appending frames
                return h5py.File(path, "r", libver="latest", swmr=True)
            except OSError:
                return h5py.File(path, "r")
        return h5py.File(path, mode, libver="latest")
    except OSError as e:
        raise RecordingError(f"{path}: cannot open as HDF5 ({e})") from e


def _check_format(f: h5py.File, path: Path) -> None:
    if f.attrs.get("format") != FORMAT:
        raise RecordingError(f"{path}: not a cdae recording (attribute format={f.attrs.get('format')!r}, "
                             f"expected {FORMAT!r}); record one with `cdae record`")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise RecordingError(f"{path}: recording format {version} is newer than this cdae reads ({FORMAT_VERSION})")


def _info(group: h5py.Group) -> RunInfo:
    raw = dict(group.attrs)
    data = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in raw.items()}
    data["camera"] = json.loads(data.get("camera", "{}"))
    data["name"] = group.name.rsplit("/", 1)[-1]
    data["frames"] = int(group["frames"].shape[0])
    return RunInfo.model_validate(data)


def _write_attrs(group: h5py.Group, info: RunInfo) -> None:
    for key, value in info.model_dump(exclude={"name", "frames"}).items():
        if key == "camera":
            value = json.dumps(value)
        if value is None:
            if key in group.attrs:
                del group.attrs[key]
            continue
        group.attrs[key] = value


class RunWriter:
    """Appends frames to a new run of a recording; every frame is on disk when :meth:`append` returns."""

    def __init__(self, path: Path | str, info: RunInfo, dtype: np.dtype | str) -> None:
        self.path = Path(path)
        self.info = info
        exists = self.path.exists()
        self._file = _open(self.path, "a")
        try:
            if exists and len(self._file.keys()) + len(self._file.attrs.keys()) > 0:
                _check_format(self._file, self.path)
            else:
                self._file.attrs["format"] = FORMAT
                self._file.attrs["format_version"] = FORMAT_VERSION
            runs = self._file.require_group("runs")
            info.name = f"{len(runs):04d}"
            g = runs.create_group(info.name)
            shape = (info.height, info.width)
            self._frames = g.create_dataset("frames", (0, *shape), dtype=np.dtype(dtype), maxshape=(None, *shape),
                                            chunks=(1, *shape))
            self._ids = g.create_dataset("unique_id", (0,), dtype=np.int64, maxshape=(None,), chunks=(1024,))
            self._ts = g.create_dataset("epics_ts", (0, 2), dtype=np.int64, maxshape=(None, 2), chunks=(1024, 2))
            self._received = g.create_dataset("received", (0,), dtype=np.float64, maxshape=(None,), chunks=(1024,))
            _write_attrs(g, info)
            self._group = g
            self._file.swmr_mode = True  # from here on, the file stays readable whatever happens to us
        except (OSError, ValueError, KeyError) as e:
            self._file.close()
            raise RecordingError(f"{self.path}: cannot add a run ({e})") from e
        except BaseException:
            self._file.close()
            raise
        self.count = 0
        self.last_id: int | None = None

    def append(self, frame: np.ndarray, unique_id: int, epics_ts: tuple[int, int], received: float) -> None:
        if frame.dtype != self._frames.dtype:
            raise RecordingError(f"frame {unique_id} is {frame.dtype}, this run records {self._frames.dtype}")
        if frame.shape != (self.info.height, self.info.width):
            raise RecordingError(f"frame {unique_id} is {frame.shape[1]}x{frame.shape[0]}, this run records "
                                 f"{self.info.width}x{self.info.height}")
        n = self.count + 1
        try:
            for ds in (self._frames, self._ids, self._ts, self._received):
                ds.resize(n, axis=0)
            self._frames[n - 1] = frame
            self._ids[n - 1] = unique_id
            self._ts[n - 1] = epics_ts
            self._received[n - 1] = received
            self._file.flush()
        except (OSError, ValueError) as e:  # disk full, file removed under us
            raise RecordingError(f"{self.path}: cannot write frame {unique_id} ({e})") from e
        if self.last_id is not None and unique_id > self.last_id + 1:
            self.info.skipped_ids += unique_id - self.last_id - 1
        self.last_id = unique_id
        self.count = n

    def close(self, stop_reason: str, complete: bool) -> RunInfo:
        """Finish the run: its attributes say how many frames, whether complete and why it stopped."""
        self._file.close()
        self.info.frames = self.count
        self.info.complete = complete
        self.info.stop_reason = stop_reason
        self.info.finished_utc = utc_now()
        # SWMR writers cannot change attributes: reopen normally for the final word
        with _open(self.path, "a") as f:
            _write_attrs(f["runs"][self.info.name], self.info)
        return self.info

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._file.id.valid:
            self.close(f"error: {exc}" if exc else "closed", complete=False)


@dataclass(frozen=True)
class Run:
    """One run of a recording: its description and its frames (read on demand)."""

    path: Path
    info: RunInfo

    def frames(self, indices: slice | list[int] | None = None) -> np.ndarray:
        """Frames as stored (camera dtype), (N, H, W); ``indices`` selects some of them."""
        with _open(self.path, "r") as f:
            ds = f["runs"][self.info.name]["frames"]
            if indices is None:
                return ds[: self.info.frames]
            if isinstance(indices, slice):
                return ds[indices]
            return np.stack([ds[i] for i in indices]) if indices else np.zeros((0, *ds.shape[1:]), ds.dtype)

    def unique_ids(self) -> np.ndarray:
        with _open(self.path, "r") as f:
            return f["runs"][self.info.name]["unique_id"][: self.info.frames]

    def epics_ts(self) -> np.ndarray:
        with _open(self.path, "r") as f:
            return f["runs"][self.info.name]["epics_ts"][: self.info.frames]

    def posix_times(self) -> np.ndarray:
        """Camera timestamps as POSIX seconds (float64)."""
        ts = self.epics_ts().astype(np.float64)
        return ts[:, 0] + EPICS_EPOCH_OFFSET_S + ts[:, 1] * 1e-9


def read_runs(path: Path | str) -> list[Run]:
    """Every run in a recording, in recording order."""
    path = Path(path)
    if not path.is_file():
        raise RecordingError(f"{path}: no such recording")
    with _open(path, "r") as f:
        _check_format(f, path)
        runs = f.get("runs")
        return [Run(path, _info(runs[name])) for name in sorted(runs)] if runs is not None else []
