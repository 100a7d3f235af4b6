"""The filter IOC's camera health: PVs and a thin I/O wrapper around :class:`cdae.health.HealthTracker`.

Every raw frame the IOC receives is offered to :class:`HealthMonitor`; a worker thread of its own
takes the newest (a frame that arrives while it is busy replaces the one waiting, counted in
``HealthSkipped_RBV``), runs the tracker, and the event loop posts what changed. The tracker (the
evidence and map rules) is sans-I/O and documented in ``cdae/health.py``; this module only moves
its numbers onto PVs, keeps its state file under the service's state directory, and answers the
operator's commands (accept the map as the baseline, use it in the filter, export it, reset).

The PVs (:class:`HealthPVs`) live under the filter's own prefix, beside the image PVs
(``HotPixels_RBV``, ..., ``CameraHealth_RBV``), with the map image under ``HealthMap:``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, SubGroup

from cdae.engine.badpixels import BadPixelMap
from cdae.health import HEALTH_NAMES, FrameResult, HealthConfig, HealthCounts, HealthError, HealthTracker, judge, state_path
from cdae.ioc.frames import FrameInfo, NDDataType
from cdae.ioc.publish import write_image
from cdae.ioc.pvs import YES_NO, FilterPVs, NDArrayPVs, _array, _long_string, pvproperty
from cdae.lines import log

_WHO = "cdae-ioc"
LIST_MAX_BYTES = 1 << 20  # HealthList_RBV: the map's defects with when each was first seen, JSON
_SEVERITY = (AlarmSeverity.NO_ALARM, AlarmSeverity.MINOR_ALARM, AlarmSeverity.MAJOR_ALARM)


class HealthController(Protocol):
    async def accept(self) -> None: ...
    async def reset(self) -> None: ...
    async def export(self) -> str: ...
    async def use_map(self, on: bool) -> None: ...


class HealthMapPVs(NDArrayPVs):
    """``P HealthMap:``: the live bad-pixel map as an image (``cdae.health`` codes: 0 good, 1 hot, 2 dead,
    3 stuck, 4 bad line, 5 suspect; +128 not in the baseline)."""

    array_data = _array(np.uint8, 1, "health map codes")


def _count(name: str, doc: str) -> pvproperty:
    return pvproperty(name=name, value=0, read_only=True, doc=doc)


class HealthPVs(PVGroup):
    """Camera health under the filter's prefix ``P`` (no prefix of its own)."""

    type_map = NDArrayPVs.type_map
    controller: HealthController | None = None

    hot_pixels = _count("HotPixels_RBV", "hot pixels in the live map (off bad lines)")
    dead_pixels = _count("DeadPixels_RBV", "dead pixels in the live map (off bad lines)")
    stuck_pixels = _count("StuckPixels_RBV", "stuck pixels (no change over a window while the neighbours changed)")
    bad_columns = _count("BadColumns_RBV", "bad columns")
    bad_rows = _count("BadRows_RBV", "bad rows")
    new_bad_pixels = _count("NewBadPixels_RBV", "hot, dead and stuck pixels not in the baseline")
    new_bad_lines = _count("NewBadLines_RBV", "bad columns and rows not in the baseline")
    map_pixels = _count("HealthMapPixels_RBV", "pixels the live map lists (lines included)")
    radiation_hits = _count("RadiationHits_RBV", "radiation-hit pixels of one frame (the previous one: a hit is "
                            "a bright flag in one frame alone); timestamped with that frame")
    radiation_rate = pvproperty(name="RadiationRate_RBV", value=0.0, precision=2, units="px/s", read_only=True,
                                doc="radiation-hit pixels per second over the last window")
    read_noise = pvproperty(name="ReadNoise_RBV", value=0.0, precision=2, units="DN", read_only=True,
                            doc="read noise measured on the frames (variance at the darkest level)")
    offset = pvproperty(name="Offset_RBV", value=0.0, precision=1, units="DN", read_only=True,
                        doc="offset (bias) measured on the frames: their 0.1 % darkest level")
    camera_health = pvproperty(name="CameraHealth_RBV", value="OK", dtype=ChannelType.ENUM, enum_strings=HEALTH_NAMES,
                               read_only=True, doc="OK / DEGRADED (MINOR) / BAD (MAJOR) by the site's health limits")
    health_status = _long_string("HealthStatus_RBV", "starting", doc="why CameraHealth_RBV says what it says")
    health_frames = _count("HealthFrames_RBV", "frames the live map has been fed (since it began)")
    health_skipped = _count("HealthSkipped_RBV", "frames not analysed: a newer one came while the worker was busy, "
                            "or within the CPU bound (health.cpu_share) or max_rate_hz")
    baseline = _long_string("HealthBaseline_RBV", doc="the baseline New* count from: accepted (by whom, when) "
                            "or automatic")
    use_map = pvproperty(name="HealthMapUse", value="No", dtype=ChannelType.ENUM, enum_strings=YES_NO,
                         doc="Yes: the live map's pixels are filled by the filter too (needs an accepted baseline)")
    use_map_rbv = pvproperty(name="HealthMapUse_RBV", value="No", dtype=ChannelType.ENUM, enum_strings=YES_NO,
                             read_only=True)
    accept = pvproperty(name="HealthAccept", value=0, doc="write 1: the live map as it is becomes the baseline")
    reset = pvproperty(name="HealthReset", value=0, doc="write 1: forget the live map and its evidence")
    export = pvproperty(name="HealthExport", value=0, doc="write 1: write the live map as an NDPluginBadPixel file "
                        "into the state directory (HealthExportFile_RBV names it)")
    export_file = _long_string("HealthExportFile_RBV", doc="the last file HealthExport wrote")
    pixel_list = _long_string("HealthList_RBV", length=LIST_MAX_BYTES, doc="the live map's defects, JSON, each "
                              "with the first frame (number, UniqueId, time) its evidence was seen")
    health_map = SubGroup(HealthMapPVs, prefix="HealthMap:")

    async def _command(self, value: int, name: str) -> int:
        """A write-1 command PV: the controller does ``name``; the PV reads back 0."""
        if self.controller is None:
            raise ValueError("camera health is not running")
        if value:
            await getattr(self.controller, name)()
        return 0

    @accept.putter
    async def accept(self, instance: object, value: int) -> int:
        return await self._command(value, "accept")

    @reset.putter
    async def reset(self, instance: object, value: int) -> int:
        return await self._command(value, "reset")

    @export.putter
    async def export(self, instance: object, value: int) -> int:
        return await self._command(value, "export")

    @use_map.putter
    async def use_map(self, instance: object, value: str) -> str:
        if self.controller is None:
            raise ValueError("camera health is not running")
        await self.controller.use_map(value == "Yes")
        await self.use_map_rbv.write(value)
        return value


def with_health(cls: type[FilterPVs], max_elements: int) -> type[FilterPVs]:
    """The filter IOC's PV group with the camera-health PVs (``HealthMap:ArrayData`` ``max_elements`` long)."""
    health_map = type("HealthMapPVs", (HealthMapPVs,), {"array_data": _array(np.uint8, max_elements, "health map")})
    group = type("HealthPVs", (HealthPVs,), {"health_map": SubGroup(health_map, prefix="HealthMap:")})
    return type(cls.__name__, (cls,), {"health": SubGroup(group, prefix="")})


@dataclass
class _Posted:
    """What one analysed frame changes on the PVs (made in the worker, posted in the loop)."""

    result: FrameResult
    info: FrameInfo
    counts: HealthCounts | None = None
    image: np.ndarray | None = None
    pixel_list: str | None = None
    level: int = 0
    reason: str = "OK"
    baseline: str = ""
    live_map: BadPixelMap | None = None
    saved: str | None = None


class HealthMonitor:
    """Feeds the tracker with the camera's frames and keeps its PVs, state file and commands.

    ``on_live_map`` (the filter IOC's) is called with the map to add to the camera's bad-pixel file
    whenever ``HealthMapUse`` is Yes and the map changed (at most every ``map_period_s``), and with
    None when it is switched off.
    """

    def __init__(self, config: HealthConfig, camera: str, state_dir: Path | None,
                 on_live_map: Callable[[BadPixelMap | None], Awaitable[None]] | None = None) -> None:
        self.config = config
        self.camera = camera
        self.state_dir = state_dir
        self.on_live_map = on_live_map
        self.pvs: HealthPVs | None = None
        self.tracker: HealthTracker | None = None
        self.use = False
        self.skipped = 0
        self._slot: tuple[np.ndarray, FrameInfo] | None = None
        self._ready = asyncio.Event()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="camera-health")
        self._last_save = 0.0
        self._last_map_sent = 0.0
        self._map_dirty = False
        self._dirty = False
        self._warned_no_state = False
        self._last_failure = ""
        self._last_taken = -1e9
        self._last_cost = 0.0  # CPU seconds the last analysis took (its worker thread's)
        self._last_done = -1e9

    # --- frames in ---------------------------------------------------------------------------

    def offer(self, frame: np.ndarray, info: FrameInfo) -> None:
        """A raw frame (called in the loop): the newest waits for the worker."""
        if not self.config.enabled:
            return
        rate, share = self.config.max_rate_hz, self.config.cpu_share
        now = time.monotonic()
        if (rate is not None and now - self._last_taken < 1.0 / rate) or (
                share is not None and now < self._last_done + self._last_cost * (1.0 / share - 1.0)):
            self.skipped += 1
            return
        self._last_taken = now
        if self._slot is not None:
            self.skipped += 1
        self._slot = (frame, info)
        self._ready.set()

    async def run(self) -> None:
        """Until cancelled: analyse the newest frame, post what changed. Never returns on its own: the IOC
        stops when one of its tasks ends."""
        p = self._require()
        if not self.config.enabled:  # the PVs stay, saying so; the task waits (its end would stop the IOC)
            await p.health_status.write("disabled ([health] enabled = false)")
            await asyncio.Event().wait()
        await self._publish_limits()
        await p.health_status.write("waiting for frames")
        loop = asyncio.get_running_loop()
        while True:
            await self._ready.wait()
            self._ready.clear()
            item, self._slot = self._slot, None
            if item is None:
                continue
            try:
                posted = await loop.run_in_executor(self._worker, self._analyse, *item)
                await self._post(posted)
            except HealthError as e:  # a frame the map cannot take (odd type or size): said, never fatal
                self._dirty = True  # the next frame analysed posts the whole state again, HealthStatus_RBV too
                await p.health_status.write(f"frame {item[1].unique_id} not analysed: {e}"[:255])
            except Exception as e:  # noqa: BLE001 - camera health never takes the filter down
                self._dirty = True
                why = f"camera health: frame {item[1].unique_id}: {type(e).__name__}: {e}"
                if why.split(":", 2)[-1] != self._last_failure:
                    log(_WHO, why)
                    self._last_failure = why.split(":", 2)[-1]
                await p.health_status.write(why[:255])

    def _tracker_for(self, shape: tuple[int, int]) -> HealthTracker:
        """The tracker of this frame size: the one in use, the one saved for it, or a new one."""
        t = self.tracker
        if t is not None and t.shape == shape:
            return t
        if t is not None:
            self._save(t)  # the old size's map is kept in its own file (a region of interest changed)
        path = self._path(shape)
        t = None
        if path is not None and path.is_file():
            try:
                t = HealthTracker.load(path, self.config, camera=self.camera)
                log(_WHO, f"camera health: map of {t.frames} frames loaded from {path}")
            except HealthError as e:
                log(_WHO, f"camera health: {e}; starting a new map")
        if t is None:
            t = HealthTracker(shape, self.config, camera=self.camera)
        self.tracker = t
        self._dirty = True
        return t

    def _path(self, shape: tuple[int, int]) -> Path | None:
        if self.state_dir is None:
            if not self._warned_no_state:
                log(_WHO, "camera health: no state directory (state_dir, or systemd's STATE_DIRECTORY): the map is "
                          "not kept across restarts")
                self._warned_no_state = True
            return None
        return state_path(self.state_dir, self.camera, shape)

    def _save(self, t: HealthTracker) -> str | None:
        path = self._path(t.shape)
        if path is None:
            return None
        try:
            t.save(path)
        except OSError as e:
            log(_WHO, f"camera health: could not save {path}: {e}")
            return None
        self._last_save = time.monotonic()
        return str(path)

    def _analyse(self, frame: np.ndarray, info: FrameInfo) -> _Posted:
        """In the worker: one frame through the tracker, and what the PVs need when something changed."""
        started = time.thread_time()
        try:
            return self._analyse_frame(frame, info)
        finally:
            self._last_cost = time.thread_time() - started
            self._last_done = time.monotonic()

    def _analyse_frame(self, frame: np.ndarray, info: FrameInfo) -> _Posted:
        t = self._tracker_for(tuple(frame.shape))  # type: ignore[arg-type]
        fresh = self._dirty
        r = t.update(frame, info.unique_id, info.timestamp)
        out = _Posted(result=r, info=info)
        changed = fresh or (r.window is not None and r.window.changed)
        if r.window is not None or fresh:
            out.counts = r.window.counts if r.window is not None else t.counts()
            out.level, out.reason = judge(out.counts, self.config.limits, r.radiation_rate_hz, r.read_noise_dn)
            out.baseline = t.baseline_info or "none yet"
        if changed:
            out.image = t.map_image()
            out.pixel_list = _list_text(t)
            self._map_dirty = True
        if self.use and self._map_dirty and time.monotonic() - self._last_map_sent >= self.config.map_period_s:
            out.live_map = t.bad_pixel_map()
            self._map_dirty = False
            self._last_map_sent = time.monotonic()
        if changed or time.monotonic() - self._last_save >= self.config.save_period_s:
            out.saved = self._save(t)
        self._dirty = False
        return out

    async def _post(self, x: _Posted) -> None:
        p = self._require()
        r, stamp = x.result, x.info.stamp
        from cdae.ioc.frames import posix_to_epics

        hit_stamp = posix_to_epics(r.hits_time) if r.hits_time > 0 else stamp
        pairs = [(p.health_frames, r.frame), (p.health_skipped, self.skipped)]
        for pv, value in pairs:
            if pv.value != value:
                await pv.write(value, timestamp=stamp)
        await p.radiation_hits.write(r.hits, timestamp=hit_stamp)
        for pv, value in ((p.read_noise, round(r.read_noise_dn, 3)), (p.offset, round(r.offset_dn, 2)),
                          (p.radiation_rate, round(r.radiation_rate_hz, 3))):
            if pv.value != value:
                await pv.write(value, timestamp=stamp)
        if x.counts is not None:
            c = x.counts
            for pv, value in ((p.hot_pixels, c.hot), (p.dead_pixels, c.dead), (p.stuck_pixels, c.stuck),
                              (p.bad_columns, c.bad_columns), (p.bad_rows, c.bad_rows),
                              (p.new_bad_pixels, c.new_bad_pixels), (p.new_bad_lines, c.new_bad_lines),
                              (p.map_pixels, c.map_pixels)):
                if pv.value != value:
                    await pv.write(value, timestamp=stamp)
            name = HEALTH_NAMES[x.level]
            sev = _SEVERITY[x.level]
            if p.camera_health.value != name or p.camera_health.alarm.severity != sev:
                await p.camera_health.write(name, timestamp=stamp, severity=sev,
                                            status=AlarmStatus.STATE if x.level else AlarmStatus.NO_ALARM)
            text = x.reason[:255]
            if p.health_status.value != text:
                await p.health_status.write(text)
                if x.level:
                    log(_WHO, f"camera health: {text}")
            if p.baseline.value != x.baseline[:255]:
                await p.baseline.write(x.baseline[:255])
        if x.image is not None:
            h, w = x.image.shape
            await write_image(p.health_map, x.image.reshape(-1), h, w, NDDataType.UInt8, x.info, r.frame, 0.0)
        if x.pixel_list is not None:
            await p.pixel_list.write(x.pixel_list)
        if x.live_map is not None and self.on_live_map is not None:
            await self.on_live_map(x.live_map)

    async def _publish_limits(self) -> None:
        """The site's limits as the count PVs' alarm limits (HIGH = minor, HIHI = major): clients see them."""
        p = self._require()
        lim = self.config.limits
        for pv, limit in ((p.new_bad_pixels, lim.new_bad_pixels), (p.new_bad_lines, lim.new_bad_lines),
                          (p.radiation_rate, lim.radiation_rate_hz), (p.read_noise, lim.read_noise_dn)):
            kw: dict[str, float] = {}  # caproto raises HIGH/HIHI at value >= limit, as judge() does
            if limit.minor is not None:
                kw["upper_warning_limit"], kw["lower_warning_limit"] = limit.minor, -1.0
            if limit.major is not None:
                kw["upper_alarm_limit"], kw["lower_alarm_limit"] = limit.major, -1.0
            if kw:
                await pv.write_metadata(**kw)

    # --- commands (HealthController) ----------------------------------------------------------

    async def _in_worker(self, fn: Callable[[HealthTracker], object]) -> object:
        if self.tracker is None:
            raise ValueError("no frame analysed yet: there is no map")
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, self.tracker)

    async def accept(self) -> None:
        def work(t: HealthTracker) -> tuple[str, HealthCounts]:
            info = t.accept_baseline("operator (HealthAccept)")
            self._save(t)
            return info, t.counts()

        info, _ = await self._in_worker(work)  # type: ignore[misc]
        log(_WHO, f"camera health: baseline {info}")
        await self._repost()

    async def reset(self) -> None:
        def work(t: HealthTracker) -> None:
            t.reset()
            self._save(t)

        await self._in_worker(work)
        log(_WHO, "camera health: map reset (HealthReset)")
        if self.use:
            await self.use_map(False)
            await self._require().use_map_rbv.write("No")
            await self._require().use_map.write("No", verify_value=False)
        await self._repost()

    async def export(self) -> str:
        def work(t: HealthTracker) -> str:
            if self.state_dir is None:
                raise ValueError("no state directory to export into (state_dir)")
            path = state_path(self.state_dir, self.camera, t.shape).with_suffix(".badpixels.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            bad = t.bad_pixel_map()
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(bad.to_json())
            tmp.replace(path)
            return str(path)

        try:
            path = str(await self._in_worker(work))
        except (OSError, HealthError) as e:
            raise ValueError(f"HealthExport: {e}") from e
        await self._require().export_file.write(path[:255])
        log(_WHO, f"camera health: map exported to {path}")
        return path

    async def use_map(self, on: bool) -> None:
        if on:
            t = self.tracker
            if t is None or not t.baseline_accepted:
                raise ValueError("HealthMapUse: accept a map first (HealthAccept): the live map feeds the filter only "
                                 "once an operator has looked at it")
            self.use = True
            live = await self._in_worker(lambda tr: tr.bad_pixel_map())
            self._last_map_sent, self._map_dirty = time.monotonic(), False
            if self.on_live_map is not None:
                await self.on_live_map(live)  # type: ignore[arg-type]
            log(_WHO, "camera health: the live map feeds the filter (HealthMapUse Yes)")
        else:
            self.use = False
            if self.on_live_map is not None:
                await self.on_live_map(None)

    async def _repost(self) -> None:
        """After a command: the counts, map image and lists again, from the tracker as it is now."""
        def work(t: HealthTracker) -> _Posted:
            self._dirty = True
            counts = t.counts()
            level, reason = judge(counts, self.config.limits, t.radiation_rate_hz,
                                  t.noise.read_dn if t.noise else 0.0)
            r = FrameResult(frame=t.frames, hits=0, hits_unique_id=0, hits_time=0.0,
                            read_noise_dn=t.noise.read_dn if t.noise else 0.0,
                            offset_dn=t.noise.offset_dn if t.noise else 0.0, radiation_rate_hz=t.radiation_rate_hz)
            self._dirty = False
            self._map_dirty = True
            return _Posted(result=r, info=FrameInfo(unique_id=0, stamp=_now_stamp(), data_type=NDDataType.UInt8),
                           counts=counts, image=t.map_image(), pixel_list=_list_text(t), level=level, reason=reason,
                           baseline=t.baseline_info or "none yet")

        await self._post(await self._in_worker(work))  # type: ignore[arg-type]

    # --- lifecycle ------------------------------------------------------------------------------

    def _require(self) -> HealthPVs:
        if self.pvs is None:
            raise RuntimeError("the health PVs are not built yet")
        return self.pvs

    async def close(self) -> None:
        """Save the map (the window in progress is not kept) and stop the worker."""
        t = self.tracker
        if t is not None:
            saved = await asyncio.get_running_loop().run_in_executor(self._worker, self._save, t)
            if saved:
                log(_WHO, f"camera health: map of {t.frames} frames saved to {saved}")
        self._worker.shutdown(wait=False, cancel_futures=True)


def default_state_dir(configured: Path | None) -> Path | None:
    """``state_dir`` as configured, else systemd's ``$STATE_DIRECTORY`` (its first entry), else None."""
    if configured is not None:
        return configured
    env = os.environ.get("STATE_DIRECTORY", "")
    return Path(env.split(":")[0]) if env else None


def _list_text(t: HealthTracker) -> str:
    """HealthList_RBV: the pixel list as JSON, cut to fit (and saying so)."""
    doc = t.pixel_list()
    text = json.dumps(doc, separators=(",", ":"))
    if len(text) >= LIST_MAX_BYTES:
        pixels = doc["pixels"]
        keep = max(0, int(len(pixels) * (LIST_MAX_BYTES * 0.9) / len(text)))  # type: ignore[arg-type]
        doc["pixels"] = pixels[:keep]  # type: ignore[index]
        doc["truncated"] = f"{keep} of {len(pixels)} pixels listed"  # type: ignore[arg-type]
        text = json.dumps(doc, separators=(",", ":"))
    return text


def _now_stamp() -> tuple[int, int]:
    from cdae.ioc.frames import posix_to_epics

    return posix_to_epics(time.time())


__all__ = ["HealthMonitor", "HealthPVs", "default_state_dir", "with_health"]


def read_from_ioc(prefix: str, timeout_s: float = 5.0) -> tuple[np.ndarray, dict[str, object]]:
    """A running filter IOC's live map (``HealthMap:ArrayData`` as (H, W) codes) and its defect list
    (``HealthList_RBV``), over Channel Access (caproto's synchronous client: the environment's EPICS_CA_*)."""
    from caproto.sync.client import read

    def value(name: str) -> object:  # no CA repeater: a command-line tool must not leave a process behind
        return read(prefix + name, timeout=timeout_s, repeater=False).data

    w = int(value("HealthMap:ArraySize0_RBV")[0])  # type: ignore[index]
    h = int(value("HealthMap:ArraySize1_RBV")[0])  # type: ignore[index]
    if w <= 0 or h <= 0:
        raise HealthError(f"{prefix}HealthMap: no map yet (no frame analysed)")
    pixels = np.asarray(value("HealthMap:ArrayData"))[: w * h].astype(np.uint8).reshape(h, w)
    raw = read(prefix + "HealthList_RBV.VAL$", timeout=timeout_s, data_type=ChannelType.CHAR, repeater=False).data
    text = bytes(bytearray(int(x) & 0xFF for x in raw)).split(b"\0")[0].decode()
    try:
        doc = json.loads(text) if text else {}
    except json.JSONDecodeError:
        doc = {}
    return pixels, doc
