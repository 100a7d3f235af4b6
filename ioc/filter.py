"""``cdae ioc``: the filter IOC. Camera frames in over CA, through the engine, denoised frames out over CA.

One frame's path: :class:`~cdae.ioc.source.FrameSource` assembles it → the newest-wins slot
(a frame still waiting when a newer one arrives is dropped and counted in ``DroppedArrays``) →
at most ``QueueSize`` frames in flight to the engine (:class:`cdae.engine.client.AsyncEngineClient`)
→ :func:`~cdae.ioc.publish.write_image` publishes the reply with the raw frame's UniqueId and
timestamps. The engine's control channel is polled for connection state, backend and the list
of models; when it stops answering the image PVs go to an INVALID/COMM alarm and frames are
dropped until it answers again (ZeroMQ reconnects by itself; the data client is rebuilt so no
stale frame is replayed). The camera's bad-pixel map is read here and handed to the engine, which
fills it in its pipeline (the same code as offline use); frames name it by the id the engine gave.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zmq
from caproto import AlarmSeverity, AlarmStatus
from caproto.asyncio.client import Context as ClientContext

from cdae.engine.badpixels import MAX_HALF_WIDTH, BadPixelError, BadPixelMap
from cdae.engine.client import AsyncControlClient, AsyncEngineClient
from cdae.engine.errors import EngineError
from cdae.engine.residual import residual_of
from cdae.engine.protocol import FrameReply
from cdae.engine.triton_client import AsyncTritonClient, AsyncTritonControl
from cdae.ioc.frames import (
    FrameError,
    FrameInfo,
    IocError,
    NDDataType,
    RateMeter,
    from_engine,
    numpy_dtype,
    parse_model_ref,
    to_ca,
    to_engine,
)
from cdae.ioc.config import IocConfig, load_ioc_config  # noqa: F401 - load_ioc_config re-exported for cdae ioc
from cdae.ioc.files import FileRefused, read_named_file, read_regular_file
from cdae.ioc.flow import FlowControl
from cdae.ioc.health import HealthMonitor, default_state_dir, with_health
from cdae.ioc.publish import set_alarm, write_image
from cdae.ioc.pva import DEFECT_MAP, IMAGE, RESIDUAL, NTNDArrayServer, PvaFrameSource
from cdae.ioc.pvs import STRING_MAX, FilterPVs, filter_pvs
from cdae.ioc.runner import ca_server_port, cancel_all, serve_pvdb
from cdae.ioc.source import FrameSource, SourceNames
from cdae.lines import log, say
from cdae.notify import Notifier

_WHO = "cdae-ioc"
STATUS_PERIOD_S = 5.0  # how often ``systemctl status`` gets fresh counters (and, at most, the watchdog period)
BAD_PIXEL_LOAD_TIMEOUT_S = 10.0  # reading and checking a bad-pixel file; longer: refused


async def _post_changed(pairs: Iterable[tuple[Any, object]], **write: object) -> None:
    """Write each (PV, value) whose value changed: a monitor per change, not per call."""
    for pv, value in pairs:
        if pv.value != value:
            await pv.write(value, **write)


_ENGINE_TROUBLE = (EngineError, asyncio.TimeoutError, zmq.ZMQError)


class EngineLife(NamedTuple):
    """Which life of the engine a status came from: its instance id (cdae's engine, one per start) and uptime."""

    instance: str | None
    uptime_s: float | None

    @classmethod
    def of(cls, status: Mapping[str, object]) -> EngineLife:
        instance, uptime = status.get("instance"), status.get("uptime_s")
        return cls(instance if isinstance(instance, str) else None,
                   float(uptime) if isinstance(uptime, (int, float)) else None)

    def follows_a_restart(self, before: EngineLife | None) -> bool:
        """Whether the engine restarted since the status ``before``: another instance; for an engine that names
        none (Triton), an uptime that went back. Uptimes alone miss a restart after a short life: the new
        engine, first seen later, may already have lived longer than the old one had."""
        if before is None:
            return False
        if self.instance is not None and before.instance is not None:
            return self.instance != before.instance
        return self.uptime_s is not None and before.uptime_s is not None and self.uptime_s < before.uptime_s


class FilterIOC:
    """The filter IOC's behaviour behind :class:`~cdae.ioc.pvs.FilterPVs`."""

    def __init__(self, config: IocConfig) -> None:
        self.config = config
        missing = config.pva_needed()
        if missing:
            raise IocError(missing)
        self.source: FrameSource | PvaFrameSource
        if config.pva_source:
            self.source = PvaFrameSource(config.source, self.on_frame, self.on_frame_error, self.on_source_connection,
                                         on_bad_frame=self.on_bad_frame)
        else:
            names = (SourceNames(array=config.source) if config.plain_waveform
                     else SourceNames.nd_std_arrays(config.source, config.array_suffix))
            self.source = FrameSource(names, self.on_frame, self.on_frame_error, self.on_source_connection,
                                      width=config.width, height=config.height, data_type=config.data_type,
                                      on_bad_frame=self.on_bad_frame)
        self.pvs: FilterPVs | None = None
        self.pva: NTNDArrayServer | None = None  # the NTNDArray images, when config.pva
        self.element: np.dtype | None = None
        # the window, the newest-wins slot, reply order and the books (sans-I/O: cdae.ioc.flow); the
        # asyncio below only waits where it says "not now"
        self.flow: FlowControl[tuple[np.ndarray, FrameInfo]] = FlowControl(config.queue_size)
        self.books = self.flow.books  # where every received frame went (received, published, drops, errors)
        self.frame_ready = asyncio.Event()
        self.engine_up = asyncio.Event()
        self.engine_ok = False
        self._permits = asyncio.Condition()  # notified whenever a place in the window may have come free
        self._tasks: set[asyncio.Task[None]] = set()
        self.client: AsyncEngineClient | AsyncTritonClient | None = None
        self.engine_guards: bool | None = None  # the engine's status says it guards (flags) or not; None: not known
        self.models: list[str] = []
        self.counter = 0  # frames published (ArrayCounter_RBV, plus what writes to ArrayCounter added)
        self._drops_reset: dict[str, int] = {}  # books.drops when DroppedArrays was last reset
        self.last_reply_t = 0.0  # monotonic time of the engine's last frame reply
        self.rate = RateMeter()
        self._pending_writes: set[asyncio.Task[None]] = set()
        self.wanted_model: str | None = config.model  # the operator's choice: re-applied when the engine restarts
        self._applying_model = False
        self._engine_life: EngineLife | None = None  # what the engine's last status said of its life
        # the camera's bad-pixel map: held here, filled by the engine (sent over the control channel once,
        # named by its id in every frame request); None until the engine holds it
        self.bad_pixels: BadPixelMap | None = None
        self._bad_pixels_id: str | None = None
        self._bad_pixels_seen: tuple[BadPixelMap, int, int] | None = None
        # one worker of its own: a slow file never takes the threads other work runs in
        self._file_worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bad-pixel-file")
        self._file_busy = False
        # camera health: the live bad-pixel map, learned from every raw frame (cdae.ioc.health); with
        # HealthMapUse Yes its pixels are added to the camera's file map in what the engine fills
        self.health = HealthMonitor(config.health, config.prefix, default_state_dir(config.state_dir),
                                    on_live_map=self.set_live_bad_pixels)
        self.live_bad_pixels: BadPixelMap | None = None
        self._in_use: tuple[BadPixelMap | None, BadPixelMap | None, BadPixelMap | None] = (None, None, None)

    # --- the source side (called in the event loop by FrameSource) ---------------------------

    @property
    def received(self) -> int:
        return self.books.received

    @property
    def dropped(self) -> int:
        return self.books.dropped

    @property
    def errors(self) -> int:
        return self.books.errors

    def on_frame(self, frame: np.ndarray, info: FrameInfo) -> None:
        if self.pvs is None:  # nothing is served before the PVs exist
            return
        self._see(info.unique_id)
        if not self.flow.enabled:
            return
        capacity = self.pvs.array_data.max_length
        if frame.size > capacity:  # the output PVs' length is fixed at start (like a waveform's NELM)
            h, w = frame.shape
            self.flow.refuse()
            self._say_frame_error(f"frame {info.unique_id}: {w}x{h} = {frame.size} pixels, more than the "
                                  f"{capacity} elements of ArrayData (fixed at start: restart the IOC, or set "
                                  f"max_elements)", alarm=(AlarmStatus.HWLIMIT, AlarmSeverity.MAJOR_ALARM))
            return
        self.health.offer(frame, info)  # only frames the IOC takes: HealthMap's length is ArrayData's
        self.flow.offer((frame, info))  # the frame it replaced is counted there
        self.frame_ready.set()
        self._soon(self._write_counters())

    def on_bad_frame(self, unique_id: int, message: str,
                     alarm: tuple[AlarmStatus, AlarmSeverity] | None = None) -> None:
        """A source frame that could not be assembled: received, and counted as an error."""
        if self.pvs is None:
            return
        self._see(unique_id)
        if not self.flow.enabled:
            return
        self.flow.refuse()
        self._say_frame_error(message, alarm=alarm)

    def _see(self, unique_id: int) -> None:
        last = self.books.last_unique_id
        if last is not None and unique_id < last:
            log(_WHO, f"source UniqueId went back from {last} to {unique_id} (camera restarted?): source gaps "
                      f"are counted from {unique_id} on")
        if self.books.see(unique_id):
            self._soon(self._write_counters())

    def on_frame_error(self, message: str, alarm: tuple[AlarmStatus, AlarmSeverity] | None = None) -> None:
        """An error the source reports outside any frame (an unknown DataType index): counted in the
        errors and said like a frame's."""
        self.flow.fault()
        self._say_frame_error(message, alarm)

    def _say_frame_error(self, message: str, alarm: tuple[AlarmStatus, AlarmSeverity] | None = None) -> None:
        """A frame refused (already counted in the flow's books): said on LastError_RBV and in the log;
        ``alarm`` goes on the image PVs (the next published frame clears it)."""
        self._soon(self._report_error(message, alarm))

    def on_source_connection(self, connected: bool) -> None:
        self._soon(self._write_source_state(connected))

    def _soon(self, coro: object) -> None:
        """Run a PV write from a synchronous callback; keep a reference until it is done."""
        if self.pvs is None:  # before the PVs exist there is nothing to write: run() writes the state
            coro.close()  # type: ignore[attr-defined]
            return
        t = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._pending_writes.add(t)
        t.add_done_callback(self._pending_writes.discard)

    async def _write_counters(self) -> None:
        """The counters, each posted only when it changed (a monitor per change, not per call)."""
        p = self._require_pvs()
        b = self.books
        since = {k: n - self._drops_reset.get(k, 0) for k, n in b.drops.items()}  # since DroppedArrays=0
        await _post_changed(((p.frames_received, b.received), (p.dropped_arrays_rbv, sum(since.values())),
                             (p.frame_errors, b.errors), (p.source_gaps, b.source_gaps),
                             (p.queue_free, self.flow.queue_free),
                             (p.drop_causes, " ".join(f"{k}={v}" for k, v in since.items()))))

    async def reset_dropped(self) -> None:
        """DroppedArrays = 0: ``DroppedArrays_RBV`` and ``DropCauses_RBV`` count again from 0 (the books, which
        balance and go to the log at the end, keep every frame)."""
        self._drops_reset = dict(self.books.drops)
        await self._write_counters()

    async def _report_error(self, message: str, alarm: tuple[AlarmStatus, AlarmSeverity] | None = None) -> None:
        log(_WHO, message)
        p = self._require_pvs()
        await p.last_error.write(message[:255])
        await self._write_counters()
        if alarm is not None and self.engine_ok:  # engine down: the COMM alarm stays, it says more
            await self._image_alarm(*alarm, message)

    async def _write_source_state(self, connected: bool) -> None:
        p = self._require_pvs()
        if connected:
            await p.source_connected.write("Connected", status=AlarmStatus.NO_ALARM,
                                           severity=AlarmSeverity.NO_ALARM)
            if str(p.status.value).startswith("source "):  # the camera is back: say what is true now
                await p.status.write("running" if self.engine_ok else "waiting for the engine")
        else:
            await p.source_connected.write("Disconnected", status=AlarmStatus.COMM,
                                           severity=AlarmSeverity.MAJOR_ALARM)
            await p.status.write(f"source {self.config.source} disconnected; waiting for it")

    # --- putters (FilterController) ---------------------------------------------------------

    async def request_model(self, ref: str) -> None:
        p = self._require_pvs()
        try:
            ref = parse_model_ref(ref)
            if not self.engine_ok:
                raise IocError("the engine is not connected")
            if self.models and ref not in self.models:
                raise IocError(f"model {ref} is not in the engine's store; available: {', '.join(self.models)}")
            ctl = self._control(self.config.engine_timeout_s)
            try:
                reply = await ctl.request("activate", model=ref, wait=True, timeout_s=600.0)
            finally:
                ctl.close()
            if not reply.ok:
                raise IocError(f"the engine refused {ref}: {reply.error}")
        except (IocError, *_ENGINE_TROUBLE) as e:
            await p.last_error.write(f"Model: {e}"[:255])
            raise ValueError(str(e)) from e
        self.wanted_model = ref
        await p.status.write(f"activated {ref}")

    def _keep_model(self, status: Mapping[str, object], why: str) -> None:
        """The engine (new, or restarted) serves something else than the operator chose: activate the choice
        again, in the background (polling goes on)."""
        want = self.wanted_model
        if want and status.get("model") != want and not self._applying_model:
            self._applying_model = True
            self._soon(self._apply_model(want, str(status.get("model")), why))

    async def _apply_model(self, ref: str, serving: str, why: str) -> None:
        p = self._require_pvs()
        try:
            log(_WHO, f"{why}: the engine serves {serving}; activating {ref} (Model)")
            await self.request_model(ref)
            await p.model.write(ref, verify_value=False, status=AlarmStatus.NO_ALARM, severity=AlarmSeverity.NO_ALARM)
        except ValueError as e:  # say so where operators look: Model in alarm, the reason in LastError_RBV
            log(_WHO, f"could not activate {ref}: {e}")
            await p.model.write(ref, verify_value=False, status=AlarmStatus.STATE, severity=AlarmSeverity.MAJOR_ALARM)
            await p.last_error.write(f"Model: {why}, the engine serves {serving}; could not activate {ref}: {e}"[:255])
        finally:
            self._applying_model = False

    async def set_enabled(self, enabled: bool) -> None:
        if self.flow.set_enabled(enabled):  # the frame waiting in the slot was dropped
            await self._write_counters()

    async def set_queue_size(self, size: int) -> None:
        async with self._permits:
            self.flow.set_queue_size(size)
            self._permits.notify_all()

    async def set_bad_pixel_file(self, path: str, configured: bool = False) -> None:
        """Load (or, with an empty path, drop) the camera's bad-pixel map; an unusable file is refused
        with its reason on LastError_RBV and the map in use is kept.

        A path written over CA must name a regular file under ``bad_pixel_dir`` (any CA client can
        write the PV); ``configured`` is the site file's own ``bad_pixel_file``, trusted for where it is
        but read under the same size and file-type rules."""
        p = self._require_pvs()
        path = path.strip()
        if not path:
            self.bad_pixels, self._bad_pixels_id = None, None
            if self.live_bad_pixels is not None and self.engine_ok:
                await self._send_bad_pixels()
            in_use = self.map_in_use()
            await p.bad_pixel_count.write(len(in_use) if in_use is not None else 0)
            await p.status.write("bad-pixel map: none")
            return
        try:
            if self._file_busy:
                raise BadPixelError("another bad-pixel file is still being read; try again")
            self._file_busy = True
            try:
                loop = asyncio.get_running_loop()
                work = loop.run_in_executor(self._file_worker, self._read_bad_pixels, path, configured)
                bad = await asyncio.wait_for(work, BAD_PIXEL_LOAD_TIMEOUT_S)
                bad.check_frame_size(p.array_data.max_length)
            except asyncio.TimeoutError:
                raise BadPixelError(f"{path}: not read and checked within {BAD_PIXEL_LOAD_TIMEOUT_S:g} s") from None
            finally:
                self._file_busy = False
        except (BadPixelError, FileRefused) as e:
            log(_WHO, f"BadPixelFile refused: {e}")
            await p.last_error.write(f"BadPixelFile: {e}"[:255])
            raise ValueError(str(e)) from e
        self.bad_pixels, self._bad_pixels_id = bad, None
        if self.engine_ok:
            await self._send_bad_pixels()
        await p.bad_pixel_count.write(len(self.map_in_use() or bad))
        await p.status.write(f"bad-pixel map: {len(bad)} pixels from {bad.source}"[:255])
        log(_WHO, f"bad-pixel map: {len(bad)} pixels from {bad.source}")

    def map_in_use(self) -> BadPixelMap | None:
        """What the engine fills: the camera's file map, with the live map's pixels added when HealthMapUse is Yes."""
        file, live = self.bad_pixels, self.live_bad_pixels
        if self._in_use[0] is not file or self._in_use[1] is not live:  # merged once per change (both immutable)
            merged = live if file is None else (file if live is None else file.merged(live))
            self._in_use = (file, live, merged)
        return self._in_use[2]

    async def set_live_bad_pixels(self, live: BadPixelMap | None) -> None:
        """The live map to add to the file's (None: the file's alone); sent to the engine at once."""
        p = self._require_pvs()
        self.live_bad_pixels, self._bad_pixels_id = live, None
        if self.engine_ok:
            await self._send_bad_pixels()
        in_use = self.map_in_use()
        await p.bad_pixel_count.write(len(in_use) if in_use is not None else 0)

    def _read_bad_pixels(self, path: str, configured: bool) -> BadPixelMap:
        """In the file worker: read under the rules of :mod:`cdae.ioc.files`, then parse and check."""
        if configured:
            real, data = Path(path), read_regular_file(path)
        else:
            real, data = read_named_file(self.config.bad_pixel_dir, path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadPixelError(f"{real}: not UTF-8 text") from None
        return BadPixelMap.from_json(text, source=str(real))

    async def _initial_bad_pixels(self, path: Path) -> None:
        try:
            await self.set_bad_pixel_file(str(path), configured=True)
            await self._require_pvs().bad_pixel_file.write(str(path)[:255], verify_value=False)
        except ValueError as e:  # serve without it, loudly: LastError_RBV and the log say why
            log(_WHO, f"could not use the bad-pixel file {path}: {e}")

    # --- the engine side ----------------------------------------------------------------------

    async def _send_bad_pixels(self) -> bool:
        """Give the engine the camera's bad-pixel map; frames name it from then on. False (and
        LastError_RBV says why) when the engine does not take it: frames then go unfilled."""
        bad = self.map_in_use()
        if bad is None:
            return True
        ctl = self._control(self.config.engine_timeout_s)
        try:
            reply = await ctl.request("set_bad_pixels", bad_pixels=bad.to_json())
        except _ENGINE_TROUBLE as e:
            reply = None
            why = f"{type(e).__name__}: {e}"
        finally:
            ctl.close()
        if reply is not None and reply.ok and self.map_in_use() is bad:
            self._bad_pixels_id = str(reply.result["id"])
            return True
        if reply is not None:
            why = reply.error or "refused"
        await self._report_error(f"BadPixelFile: the engine did not take the map: {why}")
        return False

    def _new_client(self) -> AsyncEngineClient | AsyncTritonClient:
        # the client's own window never binds: QueueSize permits bound what is in flight
        if self.config.triton:
            return AsyncTritonClient(self.config.engine[0], window=64, timeout_s=self.config.engine_timeout_s)
        return AsyncEngineClient(self.config.engine, window=64, timeout_s=self.config.engine_timeout_s,
                                 curve=self.config.curve)

    def _control(self, timeout_s: float) -> AsyncControlClient | AsyncTritonControl:
        """The engine's control channel: cdae's engine's REQ socket, or Triton's APIs behind the same requests."""
        if self.config.triton:
            return AsyncTritonControl(self.config.engine[0], timeout_s=timeout_s)
        return AsyncControlClient(self.config.control_endpoint(), timeout_s=timeout_s, curve=self.config.curve)

    async def _engine_lost(self, why: str) -> None:
        if not self.engine_ok:
            return
        self.engine_ok = False
        self.engine_up.clear()
        log(_WHO, f"engine down: {why}")
        p = self._require_pvs()
        current = asyncio.current_task()
        for t in list(self._tasks):
            if t is not current:
                t.cancel()
        old, self.client = self.client, None
        if old is not None:
            await old.close()
        await p.engine_connected.write("Disconnected", status=AlarmStatus.COMM, severity=AlarmSeverity.MAJOR_ALARM)
        await p.status.write(f"engine down ({why[:180]}); reconnecting")
        await p.last_error.write(f"engine: {why}"[:255])
        await self._image_alarm(AlarmStatus.COMM, AlarmSeverity.INVALID_ALARM, f"engine down: {why}")

    async def _engine_found(self, status: Mapping[str, object]) -> None:
        p = self._require_pvs()
        if self.client is not None:
            await self.client.close()
        self.client = self._new_client()
        self._bad_pixels_id = None  # a (re)started engine holds no map until it is sent
        await self._send_bad_pixels()
        self.engine_ok = True
        log(_WHO, f"engine connected: {status.get('model')} on {status.get('backend')}")
        await p.engine_connected.write("Connected", status=AlarmStatus.NO_ALARM, severity=AlarmSeverity.NO_ALARM)
        await p.status.write("running")
        await self._image_alarm(AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)
        self.engine_up.set()

    async def _image_alarm(self, status: AlarmStatus, severity: AlarmSeverity, message: str = "") -> None:
        """The images' alarm, on the CA image PVs and the NTNDArray channels alike (the next frame clears it)."""
        p = self._require_pvs()
        for group in (p, p.residual, p.defect_map):
            await set_alarm(group, status, severity)  # type: ignore[arg-type]
        if self.pva is not None:
            self.pva.set_alarm(status, severity, message)

    async def monitor_engine(self) -> None:
        """Poll the control channel: connection state, backend, available models; recover by itself."""
        endpoint = self.config.control_endpoint()
        ctl = self._control(max(1.0, 2 * self.config.status_period_s))
        polls = misses = 0
        p = self._require_pvs()
        while True:
            try:
                st = await ctl.request("status")
                if not st.ok:
                    raise EngineError(st.error or "status refused")
                misses = 0
                life = EngineLife.of(st.result)
                restarted = life.follows_a_restart(self._engine_life)  # between two polls: never seen down
                self._engine_life = life
                if not self.engine_ok:
                    await self._engine_found(st.result)
                    polls = 0
                    self._keep_model(st.result, "engine connected")
                elif restarted:
                    self._keep_model(st.result, "engine restarted")
                if "guard" in st.result:
                    self.engine_guards = st.result["guard"] is not None
                backend = str(st.result.get("backend", ""))[: STRING_MAX - 1]
                if p.backend.value != backend:
                    await p.backend.write(backend)
                if polls % 10 == 0:
                    lm = await ctl.request("list_models")
                    if lm.ok:
                        refs = [str(m["ref"]) for m in lm.result.get("models", []) if isinstance(m, dict)]  # type: ignore[union-attr]
                        self.models = refs
                        text = ",".join(refs)[:4095]
                        if p.models.value != text:
                            await p.models.write(text)
                polls += 1
            except _ENGINE_TROUBLE as e:
                answering = (self.flow.in_engine > 0
                             or time.monotonic() - self.last_reply_t < self.config.engine_timeout_s)
                if self.engine_ok and answering:  # frame replies still come (a swap keeps control busy):
                    misses += 1                   # the frames' own timeout decides, not this poll
                    if misses == 1:
                        log(_WHO, f"no status from {endpoint} ({type(e).__name__}), but frames are answered: "
                                  "not declaring the engine lost")
                else:
                    await self._engine_lost(f"no answer from the control channel {endpoint}: {e}")
                ctl.close()  # a fresh REQ socket: nothing stale waits in the old one
                ctl = self._control(max(1.0, 2 * self.config.status_period_s))
            await asyncio.sleep(self.config.status_period_s)

    async def dispatch(self) -> None:
        """Take the newest frame whenever a place in the window is free and the engine is up; process it in
        its own task. The rules are the flow's; this only waits where it says "not now"."""
        flow = self.flow
        while True:
            async with self._permits:
                await self._permits.wait_for(flow.may_reserve)
                flow.reserve()
            try:
                await self.engine_up.wait()
                await self.frame_ready.wait()
                self.frame_ready.clear()
                taken = flow.take()
            except BaseException:
                await self._release()
                raise
            if taken is None:
                await self._release()
                continue
            seq, (frame, info) = taken
            if self.client is None:  # the engine went away between the wait and now
                flow.settle(seq, "engine_lost")
                await self._release(seq)
                continue
            t = asyncio.create_task(self._process(self.client, seq, frame, info))
            self._tasks.add(t)
            t.add_done_callback(functools.partial(self._frame_task_done, seq))

    def _frame_task_done(self, seq: int, task: asyncio.Task[None]) -> None:
        """A frame's task ended. One cancelled before it ever ran (an engine lost right after dispatch)
        never reached its ``finally``: its frame is settled as ``engine_lost`` and its place given back
        here, or the window would lose that place for good and the filter stop once all are lost."""
        self._tasks.discard(task)
        if self.flow.holds(seq):
            self.flow.settle(seq, "engine_lost")
            r = asyncio.get_running_loop().create_task(self._release(seq))
            self._pending_writes.add(r)
            r.add_done_callback(self._pending_writes.discard)
            self._soon(self._write_counters())

    async def _release(self, seq: int | None = None) -> None:
        """A place back to the window: frame ``seq``'s (settled), or with None the dispatcher's reserved one."""
        async with self._permits:
            if seq is None:
                self.flow.unreserve()
            else:
                self.flow.release(seq)
            self._permits.notify_all()

    async def _process(self, client: AsyncEngineClient | AsyncTritonClient, seq: int, frame: np.ndarray, info: FrameInfo) -> None:
        """One frame to the engine and out; every way out is counted once in the flow (the ``finally`` catches
        cancellation by :meth:`_engine_lost`: a frame not settled by then is ``engine_lost``)."""
        flow = self.flow
        try:
            try:
                wire = to_engine(frame, info.data_type)
            except FrameError as e:
                flow.settle(seq, "error")
                self._say_frame_error(f"frame {info.unique_id}: {e}")
                return
            flow.sent(seq)
            try:
                # the residual is the IOC's own (raw - the denoised frame it publishes, when someone reads it);
                # of the defect map and the guard's flags, only the one DefectMap carries (both until the
                # engine's status says whether it guards)
                guards = self.engine_guards
                want_map = self.config.defect_map
                reply = await asyncio.wait_for(client.denoise(
                    wire, unique_id=info.unique_id, timestamp=info.timestamp, bit_depth=self.config.bit_depth,
                    want_residual=False, want_defect_map=want_map and guards is not True,
                    want_flags=want_map and guards is not False, defect_map_dtype="uint8",
                    bad_pixels=self._bad_pixels_id),
                    self.config.engine_timeout_s)
            except _ENGINE_TROUBLE as e:
                flow.settle(seq, "engine_lost")
                await self._engine_lost(f"frame {info.unique_id}: {type(e).__name__}: {e}")
                return
            finally:
                flow.answered(seq)
            self.last_reply_t = time.monotonic()
            if not reply.ok:
                await self._refused(reply, seq, info)
                return
            if not flow.claim(seq):  # overtaken by a newer frame (several engines): counted there
                return
            try:
                await self.publish(reply, info, frame)
                flow.settle(seq, "published")
            except Exception as e:  # noqa: BLE001 - a frame that cannot be published is refused, never a dead task
                flow.settle(seq, "error")
                self._say_frame_error(f"frame {info.unique_id}: not published: {type(e).__name__}: {e}",
                                      alarm=(AlarmStatus.SOFT, AlarmSeverity.MAJOR_ALARM))
        finally:
            flow.settle(seq, "engine_lost")  # counts only a frame not settled: cancelled while it was out
            await self._release(seq)
            self._soon(self._write_counters())

    async def _refused(self, reply: FrameReply, seq: int, info: FrameInfo) -> None:
        code = reply.error_code
        msg = reply.header.error.message if reply.header.error else ""
        if code == "dropped":  # the engine's own newest-wins queue replaced it
            self.flow.settle(seq, "engine_queue")
            await self._write_counters()
        elif code == "shutting_down":
            self.flow.settle(seq, "engine_lost")
            await self._engine_lost(msg)
        elif code == "unknown_bad_pixels":  # the engine restarted between two status polls
            self.flow.settle(seq, "error")
            self._say_frame_error(f"frame {info.unique_id}: engine error {code}: {msg}")
            self._bad_pixels_id = None
            await self._send_bad_pixels()
        else:
            self.flow.settle(seq, "error")
            self._say_frame_error(f"frame {info.unique_id}: engine error {code}: {msg}")

    async def publish(self, reply: FrameReply, info: FrameInfo, raw: np.ndarray | None = None) -> None:
        """One reply out, the denoised frame first (its monitors go out before the residual's and the defect
        map's, so its latency does not include theirs). The residual is ``raw`` − the denoised frame, float32,
        computed here: at once while someone monitors ``Residual:ArrayData`` (or PVA serves it), otherwise on
        its first read (a ``caget`` gets this frame's, with its UniqueId and timestamps)."""
        p = self._require_pvs()
        assert reply.denoised is not None and self.element is not None
        h, w = reply.denoised.shape
        denoised, defect_map = reply.denoised, reply.defect_map
        in_use = self.map_in_use()
        if in_use is not None:
            seen = self._bad_pixels_seen
            if seen is None or seen[0] is not in_use or seen[1:] != (h, w):  # once per map and frame size
                self._bad_pixels_seen = (in_use, h, w)
                outside = in_use.outside((h, w))
                if outside:  # a map of the full sensor on a region of interest or binned frames
                    await self._report_error(f"BadPixelFile: {outside} of {len(in_use)} listed pixels lie "
                                             f"outside the {w}x{h} frame (region of interest or binning?)")
                unfilled = in_use.unfilled((h, w))
                if unfilled:  # a dead block wider than the fill reaches: left as they are, marked in DefectMap
                    await self._report_error(f"BadPixelFile: {unfilled} listed pixels have no good pixel within "
                                             f"{MAX_HALF_WIDTH} px and are left unfilled")
        self.counter += 1
        self.rate.tick()
        rate = self.rate.rate_hz()
        counts = reply.header.flag_counts
        flagged = None if counts is None else {"FlaggedPixels": sum(counts.values()),
                                               "SaturatedPixels": counts.get("saturated", 0),
                                               "ImpulsePixels": counts.get("impulse", 0)}
        # one published frame, both protocols: each image's CA PVs, then its NTNDArray, from the same arrays
        attributes = {"CdaeModel": reply.model or "", **(flagged or {})}
        pva = self.pva
        model = (reply.model or "")[: STRING_MAX - 1]
        if p.model_rbv.value != model:  # before the frame: a client reacting to it reads the model that made it
            await p.model_rbv.write(model, timestamp=info.stamp)
        await write_image(p, to_ca(denoised, self.element), h, w, info.data_type, info, self.counter, rate,
                          itemsize=numpy_dtype(info.data_type).itemsize)
        want_residual = self.config.residual and raw is not None
        # the frame as published, in its data type's own dtype (the NTNDArray's, and the residual's subtrahend)
        published = from_engine(denoised, info.data_type) if pva is not None or want_residual else None
        if pva is not None:
            pva.post(self.config.prefix + IMAGE, published, info.data_type, info, attributes)
        await p.latency.write(round((time.time() - info.timestamp) * 1e3, 3), timestamp=info.stamp)
        if want_residual:
            residual = functools.partial(residual_of, raw, published)
            if pva is not None:  # PVA has no word of its monitors here: made every frame
                r = residual()
                await write_image(p.residual, r.reshape(-1), h, w, NDDataType.Float32, info, self.counter, rate)
                pva.post(self.config.prefix + RESIDUAL, r, NDDataType.Float32, info, attributes)
            else:
                await write_image(p.residual, lambda: residual().reshape(-1), h, w, NDDataType.Float32, info,
                                  self.counter, rate)
        if reply.flags is not None:  # a guarding engine: the reason each pixel moved beyond the noise, by class
            defect_map = reply.flags
        if self.config.defect_map and reply.flags is None and reply.defect_map is None:
            self.engine_guards = None  # the engine changed (restarted unguarded or guarded): ask for both again
        if defect_map is not None:
            await write_image(p.defect_map, defect_map.reshape(-1), h, w, NDDataType.UInt8, info,  # type: ignore[arg-type]
                              self.counter, rate)
            if pva is not None:
                pva.post(self.config.prefix + DEFECT_MAP, defect_map, NDDataType.UInt8, info, attributes)
        if flagged is not None:
            await _post_changed(((p.flagged_pixels, flagged["FlaggedPixels"]),
                                 (p.saturated_pixels, flagged["SaturatedPixels"]),
                                 (p.impulse_pixels, flagged["ImpulsePixels"])), timestamp=info.stamp)
        await p.execution_time.write(round(reply.header.timings.total_ms, 3), timestamp=info.stamp)
        await self._write_counters()

    # --- lifecycle --------------------------------------------------------------------------

    def _require_pvs(self) -> FilterPVs:
        if self.pvs is None:
            raise IocError("the PVs are not built yet")
        return self.pvs

    async def _connect_source(self, ctx: ClientContext) -> None:
        while True:
            try:
                await self.source.connect(ctx, timeout_s=self.config.source_timeout_s)
                return
            except TimeoutError:
                log(_WHO, f"waiting for the source {self.source.names.array}")

    def status_line(self) -> str:
        """One line for ``systemctl status``: the source, the engine, the counters."""
        c = self.config
        if self.pvs is None:
            return f"waiting for the source {self.source.names.array}"
        p = self.pvs
        engine = (f"engine connected ({p.model_rbv.value or '?'} on {p.backend.value or '?'})" if self.engine_ok
                  else "engine down")
        return (f"{c.prefix} from {c.source}: source {str(p.source_connected.value).lower()}, {engine}; "
                f"frames published {self.counter}, dropped {self.dropped}, errors {self.errors}")

    async def keep_systemd_informed(self, notifier: Notifier, ready: asyncio.Event) -> None:
        """Liveness and STATUS for systemd, sent from the IOC's own event loop: a wedged loop goes silent.

        Before READY the IOC may wait for a camera that is off for days: it is alive, not stuck,
        so it pushes the start timeout on instead of being killed and restarted in a loop.
        """
        period = min(notifier.watchdog_interval_s or STATUS_PERIOD_S, STATUS_PERIOD_S)
        while True:
            status = self.status_line()
            if not ready.is_set():
                notifier.extend_start_timeout(3 * period, status)
            elif notifier.watchdog_interval_s is not None:
                notifier.watchdog(status)
            else:
                notifier.status(status)
            await asyncio.sleep(period)

    async def run(self, stop: asyncio.Event, notifier: Notifier | None = None) -> int:
        c = self.config
        notifier = notifier or Notifier(log=lambda msg: log(_WHO, msg))
        ready = asyncio.Event()
        keepalive = ([asyncio.create_task(self.keep_systemd_informed(notifier, ready), name="systemd-notify")]
                     if notifier.enabled else [])
        ctx = ClientContext()
        waiter = asyncio.create_task(self._connect_source(ctx))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            notifier.stopping("stopped while waiting for the source")
            await cancel_all([waiter, stopper, *keepalive])
            await ctx.disconnect()
            notifier.close()
            return 0
        waiter.result()
        assert self.source.element is not None
        self.element = self.source.element
        max_elements = c.max_elements or self.source.native_count
        self.pvs = with_health(filter_pvs(self.element, max_elements), max_elements)(prefix=c.prefix)
        p = self.pvs
        p.controller = self
        self.health.pvs = p.health  # type: ignore[attr-defined]
        p.health.controller = self.health  # type: ignore[attr-defined]
        await p.port_name.write(c.port_name)
        await p.nd_array_port.write(c.source[: STRING_MAX - 1], verify_value=False)
        await p.nd_array_port_rbv.write(c.source[: STRING_MAX - 1])
        await p.engine_address.write(",".join(c.engine)[:255])
        await p.queue_size.write(c.queue_size, verify_value=False)
        await p.queue_size_rbv.write(c.queue_size)
        await p.queue_free.write(c.queue_size)
        await p.source_connected.write("Connected")
        await p.status.write("waiting for the engine")
        if c.model:  # the choice, shown at once; activated when the engine answers (and again after its restarts)
            await p.model.write(c.model, verify_value=False)
        if c.bad_pixel_file is not None:
            await self._initial_bad_pixels(c.bad_pixel_file)
        await p.engine_connected.write("Disconnected", status=AlarmStatus.COMM, severity=AlarmSeverity.MAJOR_ALARM)
        if c.pva:
            self.pva = NTNDArrayServer([c.prefix + n for n in (IMAGE, RESIDUAL, DEFECT_MAP)], c.interfaces)
            log(_WHO, f"serving PV Access on {self.pva.interfaces}: {c.prefix}{IMAGE}, {c.prefix}{RESIDUAL}, "
                      f"{c.prefix}{DEFECT_MAP}")
        await self._image_alarm(AlarmStatus.COMM, AlarmSeverity.INVALID_ALARM, "waiting for the engine")
        served = c.interfaces or os.environ.get("EPICS_CAS_INTF_ADDR_LIST", "").split()
        if served:
            log(_WHO, f"serving Channel Access on {', '.join(served)}")
        else:
            log(_WHO, "warning: serving Channel Access on every interface (0.0.0.0): EPICS_CAS_INTF_ADDR_LIST is "
                      "not set; set [epics] server_interfaces in the site file")
        listening = asyncio.Event()
        tasks = [asyncio.create_task(serve_pvdb(p.pvdb, c.interfaces, listening), name="ca-server"),
                 asyncio.create_task(self.monitor_engine(), name="engine-monitor"),
                 asyncio.create_task(self.dispatch(), name="dispatch"),
                 asyncio.create_task(self.health.run(), name="camera-health")]
        bound = asyncio.create_task(listening.wait())
        await asyncio.wait([bound, stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if listening.is_set():  # ready means clients can connect: the CA sockets are bound
            say(f"cdae-ioc ready prefix={c.prefix} source={c.source} element={self.element.name} "
                f"max_elements={max_elements} engine={','.join(c.engine)} port={ca_server_port()} "
                f"pva={self.pva.port if self.pva is not None else 'off'}")
            notifier.ready(self.status_line())
            ready.set()
            await asyncio.wait([stopper, *tasks, *keepalive], return_when=asyncio.FIRST_COMPLETED)
        notifier.stopping("stopping")
        failed = [t for t in [*tasks, *keepalive] if t.done() and not t.cancelled() and t.exception()]
        await cancel_all([bound, stopper, *tasks, *keepalive, *self._tasks])
        if self.client is not None:
            await self.client.close()
        await self.source.close()
        await ctx.disconnect()
        if self.pva is not None:
            self.pva.close()
        self._file_worker.shutdown(wait=False, cancel_futures=True)
        await self.health.close()
        for t in failed:
            log(_WHO, f"{t.get_name()} stopped on error: {t.exception()!r}")
        b = self.books
        log(_WHO, f"stopped: received {b.received}, published {b.published}, dropped {b.dropped} "
                  f"({b.causes_text()}), errors {b.errors}, source gaps {b.source_gaps}")
        notifier.close()
        return 1 if failed else 0


async def run_ioc(config: IocConfig, stop: asyncio.Event, notifier: Notifier | None = None) -> int:
    """The filter IOC until ``stop``; under systemd it notifies READY/STATUS/WATCHDOG/STOPPING."""
    log(_WHO, "effective config: " + config.model_dump_json())
    return await FilterIOC(config).run(stop, notifier)
