"""The inference service: a ZeroMQ ROUTER for frames, a REP socket for control, one model at a time.

Threads, each owning its sockets (ZeroMQ sockets are not thread-safe):

- **I/O thread**: owns the ROUTER. Decodes each request (cheap: header + a view of the bytes),
  answers bad ones at once, and puts good ones in a bounded per-client slot where the newest
  frame wins; a frame pushed out of its slot is answered with error code ``dropped``. Forwards
  the worker's replies (inproc PUSH/PULL) to the ROUTER.
- **worker thread**: takes frames round-robin across clients, runs the pipeline on the active
  model, and hands the reply back to the I/O thread. It reads the active model once per frame,
  so a swap takes effect between two frames.
- **control thread**: owns the control socket (a ROUTER that REQ clients see as a REP): ``status``,
  ``list_models``, ``activate``, ``metrics``. It never blocks: an ``activate`` that waits is
  answered when its swap ends, and status keeps answering meanwhile.
- **activation thread** (per swap): loads the new package, warms it up on the live frame shape,
  then replaces the active model in one assignment; on any failure the old model keeps serving.

Nothing queues without bound: at most ``queue`` frames per client wait and at most
``max_queued_bytes`` of them in all, a message part over ``max_message_bytes`` drops its sender
before libzmq buffers it, the ROUTER's receive high-water mark bounds what sits in ZeroMQ, and
latency cannot grow with the backlog. With ``curve`` set, both sockets run CURVE and only the
clients whose public keys are allowed get any answer (:mod:`cdae.engine.curve`).
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from pydantic import JsonValue

from cdae import __version__
from cdae.endpoints import is_loopback, parse_tcp
from cdae.engine.answer import answer_frame
from cdae.engine.backends import Backend, load_backend, set_cpu_threads
from cdae.engine.badpixels import BadPixelMap, BadPixelMaps
from cdae.engine.config import EngineConfig
from cdae.engine.curve import CurveServer
from cdae.engine.errors import EngineError
from cdae.engine.frame_queue import FrameQueue
from cdae.engine.guard import GuardConfig, for_package
from cdae.engine.package import ModelRegistry, read_manifest
from cdae.engine.pipeline import warm_up
from cdae.engine.protocol import (
    MAX_CONTROL_BYTES,
    ControlReply,
    ControlRequest,
    ErrorCode,
    FrameRequest,
    ProtocolError,
    decode_control_request,
    decode_request,
    encode_control_reply,
    error_reply,
    error_reply_for,
)
from cdae.engine.stats import EngineStats
from cdae.lines import log as log_line, say
from cdae.notify import Notifier

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    log_line("cdae-engine", msg)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    ep = parse_tcp(endpoint)
    if ep and ep.port == "0":
        endpoint = f"tcp://{ep.host}:*"  # libzmq's spelling of "any free port"
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        raise EngineError(f"cannot bind {endpoint}: {e}") from e
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


# --- the server --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActiveModel:
    """The model serving frames; replaced as a whole by a swap."""

    ref: str
    package: Path
    backend: Backend
    since_utc: str = field(default_factory=_utc_now)
    guard: GuardConfig | None = None  # the engine's guard with this package's calibrated threshold


@dataclass
class _WaitingActivation:
    """An ``activate`` with ``wait``: answered by the control thread once the swap ends or times out."""

    envelope: list[bytes]
    thread: threading.Thread
    deadline: float  # monotonic


@dataclass
class _Pending:
    client: bytes
    request: FrameRequest
    received: float  # perf_counter
    message: list[zmq.Frame]  # keeps the received buffers alive while the frame is a view of them


class EngineServer:
    """One engine: load a model, bind, serve until stopped. See the module docstring for the threads."""

    POLL_MS = 100

    def __init__(self, config: EngineConfig, log: Log = _stderr) -> None:
        self.config = config
        self.log = log
        self.registry = ModelRegistry(config.models_dir)
        self.stats = EngineStats(config.timing_window)
        # this life of the engine: a client that sees another one knows it restarted, however briefly either lived
        self.instance = uuid.uuid4().hex
        self.queue: FrameQueue[_Pending] = FrameQueue(config.queue, config.max_clients, config.queued_bytes_limit())
        self._active: ActiveModel | None = None
        self._retired: deque[ActiveModel] = deque()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._swap_lock = threading.Lock()
        self._swap_thread: threading.Thread | None = None
        self._beats: dict[str, float] = {}  # thread → when it last went round its loop (monotonic)
        self._live: tuple[tuple[int, int], str] | None = None  # (shape, dtype) of the last frame served
        self.activation: dict[str, JsonValue] = {"state": "idle"}
        self.last_error: str | None = None
        self.last_request_error: str | None = None
        self.data_endpoint = ""
        self.control_endpoint = ""
        self._ctx: zmq.Context | None = None
        self.bad_pixel_maps = BadPixelMaps()
        self._curve: CurveServer | None = None

    # lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Load and warm up the model, bind both sockets, start the threads. Raises on any failure."""
        set_cpu_threads(self.config.threads)
        self._active = self._load(self.config.model, self.config.warmup_shape, "uint16")
        ctx = self._ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        # Memory per message and per queue is bounded: a part over the limit drops the connection at
        # its length prefix, before libzmq allocates it; RCVHWM keeps what sits in ZeroMQ per peer
        # (while the I/O thread is busy) to about max_queued_bytes; the FrameQueue bounds the rest.
        router.setsockopt(zmq.MAXMSGSIZE, self.config.message_limit())
        router.setsockopt(zmq.RCVHWM, self.config.receive_hwm_for_bytes())
        rep = ctx.socket(zmq.ROUTER)  # REQ clients talk to it as to a REP (see _control_loop)
        rep.setsockopt(zmq.LINGER, 0)
        rep.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)  # one JSON object; set_bad_pixels carries a map
        rep.setsockopt(zmq.RCVHWM, 64)
        pull = ctx.socket(zmq.PULL)
        push = ctx.socket(zmq.PUSH)
        pull.bind(f"inproc://cdae-replies-{id(self)}")
        push.connect(f"inproc://cdae-replies-{id(self)}")
        try:
            if self.config.curve is not None:  # both sockets: control can swap models, frames cost GPU time
                self._curve = CurveServer(ctx, self.config.curve, self.log)
                self._curve.secure(router)
                self._curve.secure(rep)
            self.data_endpoint = _bind(router, self.config.bind)
            self.control_endpoint = _bind(rep, self.config.control_endpoint())
        except EngineError:
            for s in (router, rep, pull, push):
                s.close(0)
            if self._curve is not None:
                self._curve.stop()
                self._curve = None
            ctx.term()
            self._ctx = None
            self._active.backend.close()
            raise
        for ep in (self.data_endpoint, self.control_endpoint):
            if not is_loopback(ep) and self._curve is None:
                self.log(f"warning: {ep} is reachable from the network and has no CURVE authentication: "
                         "anyone who reaches it can send frames and swap models (set curve keys: `cdae keys`)")
        if self._curve is not None:
            self.log(f"CURVE on {self.data_endpoint} and {self.control_endpoint}: clients allowed by the keys in "
                     f"{self.config.curve.allowed_clients_dir}")  # type: ignore[union-attr]
        now = time.monotonic()
        self._beats = {"io": now, "worker": now, "control": now}
        self._threads = [
            threading.Thread(target=self._io_loop, args=(router, pull), name="cdae-io", daemon=True),
            threading.Thread(target=self._worker_loop, args=(push,), name="cdae-worker", daemon=True),
            threading.Thread(target=self._control_loop, args=(rep,), name="cdae-control", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def ready_line(self) -> str:
        a = self._require_active()
        return (f"cdae-engine ready data={self.data_endpoint} control={self.control_endpoint} "
                f"backend={a.backend.name} device={a.backend.device} model={a.ref}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads, answer waiting frames "shutting_down" where possible, close the sockets."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        if self._swap_thread is not None:
            self._swap_thread.join(timeout)
        if self._curve is not None:
            self._curve.stop()  # its ZAP socket belongs to the context too
            self._curve = None
        if self._ctx is not None and not any(t.is_alive() for t in self._threads):
            self._ctx.term()  # every socket is closed by its own thread; a stuck thread leaves it to exit
        self._ctx = None
        for model in [self._active, *self._retired]:
            if model is not None:
                model.backend.close()
        self._retired.clear()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stalled(self, max_age_s: float) -> list[str]:
        """The service's threads (``io``, ``worker``, ``control``) dead or not round their loop within ``max_age_s``.

        What the systemd watchdog is gated on. The control thread never waits for an activation
        (a TensorRT plan build can take minutes: that runs in its own thread), so it is covered too.
        """
        now = time.monotonic()
        alive = {t.name for t in self._threads if t.is_alive()}
        return [name for name, beat in self._beats.items() if f"cdae-{name}" not in alive or now - beat > max_age_s]

    def status_line(self) -> str:
        """One line for ``systemctl status``: what serves, where, and how much."""
        a = self._require_active()
        c = self.stats.counters()
        return (f"{a.ref} on {a.backend.name} ({a.backend.device}) at {self.data_endpoint}: "
                f"frames served {c['processed']}, dropped {c['dropped']}, errors {c['errors']}")

    def _require_active(self) -> ActiveModel:
        if self._active is None:
            raise EngineError("the engine has no active model (not started)")
        return self._active

    # models --------------------------------------------------------------------------------

    def _load(self, ref: str, shape: tuple[int, int], dtype: str) -> ActiveModel:
        pkg = self.registry.resolve(ref)
        t0 = time.perf_counter()
        backend = load_backend(self.config.backend, pkg, self.config.backend_options, self.log)
        try:
            ms = warm_up(backend, shape, dtype, max_pixels=self.config.max_pixels, margin=self.config.tile_margin)
        except BaseException:
            backend.close()
            raise
        self.log(f"loaded {backend.ref} on {backend.name} ({backend.device}) in {time.perf_counter() - t0:.2f} s; "
                 f"warm-up {shape[0]}x{shape[1]} {dtype}: {ms:.1f} ms")
        guard = for_package(self.config.guard, pkg) if self.config.guard is not None else None
        return ActiveModel(ref=backend.ref, package=pkg, backend=backend, guard=guard)

    def activate(self, ref: str, wait: bool = True, timeout_s: float = 600.0) -> ControlReply:
        """Load ``ref`` in the background, warm it up on the live shape, switch between two frames."""
        thread = self._begin_activation(ref)
        if isinstance(thread, ControlReply):
            return thread
        if wait:
            deadline = time.monotonic() + timeout_s
            while thread.is_alive() and time.monotonic() < deadline and not self.stopping:
                thread.join(0.1)
        return self._activation_reply()

    def _begin_activation(self, ref: str) -> threading.Thread | ControlReply:
        """Start the swap thread, or the refusal when a swap is already running."""
        with self._swap_lock:
            if self._swap_thread is not None and self._swap_thread.is_alive():
                return ControlReply(ok=False, command="activate",
                                    error=f"activation of {self.activation.get('model')} is still in progress")
            self.activation = {"model": ref, "state": "loading", "started_utc": _utc_now(), "error": None}
            self._swap_thread = threading.Thread(target=self._swap, args=(ref,), name="cdae-activate", daemon=True)
            self._swap_thread.start()
            return self._swap_thread

    def _activation_reply(self) -> ControlReply:
        state = dict(self.activation)
        if state.get("state") == "failed":
            return ControlReply(ok=False, command="activate", error=str(state.get("error")), result={"activation": state})
        return ControlReply(ok=True, command="activate", result={"activation": state, "model": self._require_active().ref})

    def _swap(self, ref: str) -> None:
        t0 = time.perf_counter()
        shape, dtype = self._live or (self.config.warmup_shape, "uint16")
        try:
            new = self._load(ref, shape, dtype)
        except Exception as e:  # any failure: the old model keeps serving
            msg = f"activate {ref}: {e}"
            self.last_error = msg
            self.activation = {**self.activation, "state": "failed", "error": msg,
                               "seconds": round(time.perf_counter() - t0, 3)}
            self.log(f"{msg}; still serving {self._require_active().ref}")
            return
        old = self._active
        self._active = new  # one assignment: the worker reads it once per frame
        if old is not None:
            self._retired.append(old)  # closed by the worker between frames, never under its feet
        self.activation = {**self.activation, "state": "active", "model": new.ref, "error": None,
                           "seconds": round(time.perf_counter() - t0, 3)}
        self.log(f"switched {old.ref if old else None} → {new.ref} on {new.backend.name}")

    def list_models(self) -> dict[str, JsonValue]:
        active = self._require_active().ref
        models: list[JsonValue] = []
        for ref in self.registry.refs():
            name, version = ref.split(":", 1)
            entry: dict[str, JsonValue] = {"ref": ref, "active": ref == active}
            try:
                m = read_manifest(self.registry.root / name / version)
                entry.update(parameters=m.parameters, created_utc=m.created_utc, parent=m.parent,
                             ensemble=m.ensemble.mode, notes=m.notes)
            except Exception as e:  # a broken package is listed with its error, not hidden
                entry["error"] = str(e)
            models.append(entry)
        return {"models_dir": str(self.registry.root), "active": active, "models": models}

    def status(self) -> dict[str, JsonValue]:
        a = self._require_active()
        return {
            "version": __version__, "backend": a.backend.name, "device": a.backend.device, "model": a.ref,
            "model_since_utc": a.since_utc, "package": str(a.package),
            "queue_depth": len(self.queue), "queue_bound": self.config.queue,
            "queue_high_water": self.queue.high_water, "counters": self.stats.counters(),  # type: ignore[dict-item]
            "queue_bytes": self.queue.bytes, "queue_bytes_high_water": self.queue.bytes_high_water,
            "queue_bytes_bound": self.config.queued_bytes_limit(), "max_message_bytes": self.config.message_limit(),
            "timings_ms": self.stats.timings(),  # type: ignore[dict-item]
            "last_error": self.last_error, "last_request_error": self.last_request_error,
            "activation": dict(self.activation), "backend_info": a.backend.describe(),  # type: ignore[dict-item]
            "data": self.data_endpoint, "control": self.control_endpoint,
            "max_pixels": self.config.max_pixels, "bad_pixel_maps": len(self.bad_pixel_maps),
            "guard": a.guard.model_dump() if a.guard else None,  # type: ignore[dict-item]
            "curve": self._curve is not None,
            "uptime_s": round(time.monotonic() - self.stats.started, 3), "instance": self.instance,
        }

    def metrics(self) -> dict[str, JsonValue]:
        return {**self.stats.metrics(), "queue_depth": len(self.queue), "queue_high_water": self.queue.high_water,
                "model": self._require_active().ref}

    # threads -------------------------------------------------------------------------------

    def _io_loop(self, router: zmq.Socket, pull: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        try:
            while not self.stopping:
                self._beats["io"] = time.monotonic()
                events = dict(poller.poll(self.POLL_MS))
                if pull in events:
                    for _ in range(256):  # replies first: they free the clients' windows
                        try:
                            router.send_multipart(pull.recv_multipart(zmq.NOBLOCK, copy=False), copy=False)
                        except zmq.Again:
                            break
                if router in events:
                    for _ in range(256):
                        try:
                            msg = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_request(router, msg)
            for item in self.queue.drain():
                self._send_error(router, item.client, "shutting_down", "the engine is stopping", item)
        except Exception:  # the I/O thread must not die silently
            self.last_error = "I/O thread: " + traceback.format_exc(limit=3)
            self.log(self.last_error)
            self._stop.set()
        finally:
            router.close(0)
            pull.close(0)

    def _send_error(self, router: zmq.Socket, client: bytes, code: ErrorCode, message: str,
                    item: _Pending | None = None) -> None:
        h = item.request.header if item else None
        a = self._active
        parts = error_reply(code, message, frame_id=h.frame_id if h else None, unique_id=h.unique_id if h else None,
                            timestamp=h.timestamp if h else None, model=a.ref if a else None,
                            backend=a.backend.name if a else None)
        router.send_multipart([client, *parts], copy=False)

    def _on_request(self, router: zmq.Socket, msg: list[zmq.Frame]) -> None:
        received = time.perf_counter()
        client = msg[0].bytes
        self.stats.count_received()
        try:
            request = decode_request(msg[1:], self.config.max_frame_pixels)
        except ProtocolError as e:
            self.stats.count_error(e.code)
            self.last_request_error = f"{e.code}: {e}"
            router.send_multipart([client, *error_reply_for(e)], copy=False)
            return
        pending = _Pending(client, request, received, msg)
        nbytes = sum(len(f) for f in msg)
        for old in self.queue.put(client, pending, nbytes):
            self.stats.count_dropped()
            if old is pending and self.queue.refused_for == "bytes":
                why = (f"frames of other clients fill this engine's {self.config.queued_bytes_limit()} bytes of waiting "
                       f"frames (this one: {nbytes} bytes); try again")
            elif old is pending:
                why = f"{self.config.max_clients} other clients have frames waiting; try again"
            else:
                why = (f"frame {old.request.header.frame_id} was replaced by a newer frame before it was processed "
                       f"(at most {self.config.queue} waiting per client: the newest frame wins)")
            self._send_error(router, old.client, "dropped", why, old)

    def _worker_loop(self, push: zmq.Socket) -> None:
        try:
            while not self.stopping:
                self._beats["worker"] = time.monotonic()
                while self._retired:
                    self._retired.popleft().backend.close()
                item = self.queue.get(timeout=self.POLL_MS / 1000)
                if item is None:
                    continue
                try:
                    parts = self._process(item)
                except Exception as e:  # a bug must cost one frame, not the worker
                    self.last_error = f"worker: {type(e).__name__}: {e}"
                    self.log(self.last_error + "\n" + traceback.format_exc(limit=5))
                    self.stats.count_error("inference_failed")
                    h = item.request.header
                    parts = error_reply("inference_failed", self.last_error, frame_id=h.frame_id,
                                        unique_id=h.unique_id)
                push.send_multipart([item.client, *parts], copy=False)
        finally:
            push.close(0)

    def _process(self, item: _Pending) -> list[bytes | memoryview]:
        active = self._require_active()  # read once: a swap lands between frames, never inside one
        h = item.request.header
        answer = answer_frame(item.request, ref=active.ref, backend=active.backend, guard=active.guard,
                              bad_pixels=self.bad_pixel_maps.get, received=item.received,
                              max_pixels=self.config.max_pixels, margin=self.config.tile_margin)
        if answer.error is not None:
            self.stats.count_error(answer.error)
            if answer.error == "inference_failed":  # said in status and the log too: the service keeps serving
                self.last_error = f"inference on {active.ref} ({active.backend.name}) failed: {answer.message}"
                self.log(self.last_error)
            return answer.parts
        assert answer.result is not None
        self._live = (h.shape, h.dtype)
        self.stats.count_processed(answer.timings, active.ref, answer.result.tiles)
        return answer.parts

    def _control_loop(self, sock: zmq.Socket) -> None:
        # A ROUTER, not a REP: a reply can wait (activate with wait) while other requests are answered,
        # and a malformed message cannot leave a REP state machine stuck with a part pending.
        waiting: list[_WaitingActivation] = []
        try:
            while not self.stopping:
                self._beats["control"] = time.monotonic()
                try:
                    waiting = self._answer_finished_activations(sock, waiting)
                    # while a swap is awaited, look often: its reply should leave as soon as it ends
                    if not sock.poll(10 if waiting else self.POLL_MS):
                        continue
                    for _ in range(64):
                        try:
                            msg = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_control(sock, msg, waiting)
                except Exception:  # whatever a peer sent, the control thread keeps serving
                    self.last_request_error = "control: " + traceback.format_exc(limit=3)
                    self.log(self.last_request_error)
        finally:
            sock.close(0)

    def _on_control(self, sock: zmq.Socket, msg: list[bytes], waiting: list[_WaitingActivation]) -> None:
        # REQ sends [route..., b"", body]; what precedes the empty delimiter goes back unchanged
        try:
            cut = msg.index(b"", 1)
        except ValueError:  # not a REQ peer (a raw DEALER): answer its identity anyway
            envelope, body = [msg[0], b""], msg[1:]
        else:
            envelope, body = msg[: cut + 1], msg[cut + 1 :]
        if len(body) != 1:
            reply = ControlReply(ok=False, error=f"expected 1 message part (a JSON control request), "
                                                 f"got {len(body)} message parts")
        else:
            try:
                req = decode_control_request(body[0])
            except ProtocolError:
                req = None
            if req is not None and req.command == "activate" and req.wait and req.model:
                started = self._begin_activation(req.model)
                if isinstance(started, threading.Thread):
                    waiting.append(_WaitingActivation(envelope, started, time.monotonic() + req.timeout_s))
                    return
                reply = started
            else:
                reply = self.handle_control(body[0])
        sock.send_multipart([*envelope, encode_control_reply(reply)])

    def _answer_finished_activations(self, sock: zmq.Socket,
                                     waiting: list[_WaitingActivation]) -> list[_WaitingActivation]:
        now = time.monotonic()
        still = []
        for w in waiting:
            if w.thread.is_alive() and now < w.deadline and not self.stopping:
                still.append(w)
            else:
                sock.send_multipart([*w.envelope, encode_control_reply(self._activation_reply())])
        return still

    def handle_control(self, raw: object) -> ControlReply:
        """One control request → its reply; never raises."""
        try:
            req: ControlRequest = decode_control_request(raw)
        except ProtocolError as e:
            return ControlReply(ok=False, error=str(e))
        try:
            if req.command == "status":
                return ControlReply(ok=True, command=req.command, result=self.status())
            if req.command == "list_models":
                return ControlReply(ok=True, command=req.command, result=self.list_models())
            if req.command == "metrics":
                return ControlReply(ok=True, command=req.command, result=self.metrics())
            if req.command == "activate":
                assert req.model is not None
                return self.activate(req.model, req.wait, req.timeout_s)
            if req.command == "set_bad_pixels":
                assert req.bad_pixels is not None
                bad = BadPixelMap.from_json(req.bad_pixels, source="set_bad_pixels")
                key = self.bad_pixel_maps.add(bad)
                self.log(f"bad-pixel map {key}: {len(bad)} pixels")
                return ControlReply(ok=True, command=req.command, result={"id": key, "pixels": len(bad)})
        except Exception as e:  # a control request never takes the engine down
            return ControlReply(ok=False, command=req.command, error=f"{type(e).__name__}: {e}")
        return ControlReply(ok=False, command=req.command, error=f"unknown command {req.command!r}")


STATUS_PERIOD_S = 5.0  # how often ``systemctl status`` gets fresh counters between watchdog pings


def supervise(server: EngineServer, stop: threading.Event, notifier: Notifier, log: Log = _stderr,
              poll_s: float = 0.2) -> None:
    """Until ``stop`` (or the server stops itself): watchdog pings while every service thread is alive, STATUS.

    The ping is withheld while the I/O, worker or control thread has not gone round its loop within the
    watchdog limit, so systemd restarts an engine wedged in, say, a hung CUDA call.
    """
    last_status = time.monotonic()
    reported: list[str] = []
    while not stop.wait(poll_s) and not server.stopping:
        now = time.monotonic()
        if notifier.watchdog_due(now):
            assert notifier.watchdog_timeout_s is not None
            stalled = server.stalled(notifier.watchdog_timeout_s)
            if not stalled:
                notifier.watchdog(server.status_line())
                last_status = now
            elif stalled != reported:
                log(f"not pinging the systemd watchdog: thread(s) {', '.join(stalled)} stalled")
                notifier.status(f"stalled: {', '.join(stalled)} thread(s) not responding")
            reported = stalled
        elif notifier.enabled and now - last_status >= STATUS_PERIOD_S:
            notifier.status(server.status_line())
            last_status = now


def run_engine(config: EngineConfig, stop: threading.Event, out: Callable[[str], None] | None = None,
               log: Log = _stderr, notifier: Notifier | None = None) -> int:
    """Start an engine, print its ready line, serve until ``stop`` is set; returns an exit status.

    Under systemd (``Type=notify``) it sends READY=1 once the model is loaded, warmed up and both
    sockets are bound, STATUS lines with the counters, watchdog pings (see :func:`supervise`),
    and STOPPING=1 on the way out.
    """
    out = out or say
    notifier = notifier or Notifier(log=log)
    log("effective config: " + config.model_dump_json())
    server = EngineServer(config, log)
    notifier.status(f"loading {config.model} ({config.backend})")
    try:
        server.start()
    except BaseException as e:
        notifier.status(f"failed to start: {e}")
        raise
    out(server.ready_line())
    notifier.ready(server.status_line())
    try:
        supervise(server, stop, notifier, log)
    finally:
        notifier.stopping("stopping")
        server.stop()
        c = server.stats.counters()
        log(f"stopped: received {c['received']}, processed {c['processed']}, dropped {c['dropped']}, "
            f"errors {c['errors']}")
        notifier.close()
    return 0
