"""Clients of the engine: synchronous and asyncio, spreading frames over engines with a bounded window.

Each engine address gets its own DEALER socket; frames go to the addresses round-robin, and at
most ``window`` frames are in flight at once over all of them (a submit waits for a reply when
the window is full). Replies come back in completion order and carry the client's ``frame_id``.
The wire format is entirely :mod:`cdae.engine.protocol`; these classes only move its parts.

Each class takes ``curve`` (:class:`~cdae.engine.config.CurveClientKeys`: the client's key pair
and the engine's public key) for an engine that runs CURVE; without it the sockets are plain.

Frames are sent without copying (ZeroMQ reads the array's own buffer from its I/O thread):
do not modify a frame in place until its reply has arrived. Reply arrays are read-only views
of the received message.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Sequence
from typing import Generic, Literal, TypeVar

import numpy as np
import zmq
import zmq.asyncio

from cdae.engine.config import CurveClientKeys
from cdae.engine.curve import apply_client
from cdae.engine.errors import EngineError, EngineTimeout
from cdae.engine.protocol import (
    ControlReply,
    ControlRequest,
    FrameReply,
    decode_control_reply,
    decode_reply,
    encode_control_request,
    encode_request,
    request_header_for,
)


def _secure(sock: zmq.Socket, curve: CurveClientKeys | None) -> None:
    """CURVE keys on a socket before it connects: an engine with CURVE answers no one else."""
    if curve is not None:
        apply_client(sock, curve)


def _endpoints(endpoints: str | Sequence[str]) -> list[str]:
    eps = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    if not eps:
        raise EngineError("no engine endpoint given")
    return eps


def _connect(ctx: zmq.Context, kind: int, endpoint: str, curve: CurveClientKeys | None) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if kind == zmq.REQ:  # a timed-out request must not wedge the REQ state machine
        s.setsockopt(zmq.REQ_RELAXED, 1)
        s.setsockopt(zmq.REQ_CORRELATE, 1)
    _secure(s, curve)
    s.connect(endpoint)
    return s


def _control_timeout(req: ControlRequest, timeout_s: float) -> float:
    """How long a control request waits: an ``activate`` that waits gets its own timeout and 5 s more."""
    if req.command == "activate" and req.wait:
        return max(timeout_s, req.timeout_s + 5.0)
    return timeout_s


W = TypeVar("W")


class FrameClientCore(Generic[W]):
    """What the synchronous and asyncio frame clients share, without any I/O (sans-I/O).

    The endpoints, the window, frame ids, which engine the next frame goes to, and the frames in
    flight: ``waiting`` maps each one's frame_id to what its client waits on it with (the socket
    index, or an asyncio future). Replies are matched to them here, and a timeout says the same
    thing from either client. The subclasses own the sockets and the waiting.
    """

    def __init__(self, endpoints: str | Sequence[str], window: int, timeout_s: float) -> None:
        if window < 1:
            raise EngineError(f"window must be >= 1, got {window}")
        self.endpoints = _endpoints(endpoints)
        self.window = window
        self.timeout_s = timeout_s
        self._next = itertools.cycle(range(len(self.endpoints)))
        self._ids = itertools.count()
        self.waiting: dict[int, W] = {}
        self.unmatched = 0  # replies to frames this client did not send (or sent before a reset)

    @property
    def in_flight(self) -> int:
        return len(self.waiting)

    def _request(self, frame: np.ndarray, frame_id: int | None, fields: dict[str, object]) -> tuple[int, list, int]:
        """The frame's id (the next one unless given), its message parts, and the engine (index) it goes to."""
        fid = next(self._ids) if frame_id is None else frame_id
        parts = encode_request(request_header_for(frame, fid, **fields), frame)
        return fid, parts, next(self._next)

    def _match(self, parts: list) -> tuple[FrameReply, W | None]:
        """A received reply (raises on a broken one) and what waits for it; None, counted, if nothing does."""
        reply = decode_reply(parts)
        waiter = self.waiting.pop(reply.frame_id, None) if reply.frame_id is not None else None
        if waiter is None:
            self.unmatched += 1
        return reply, waiter

    def _timeout(self, timeout_s: float, frame_id: int | None = None) -> EngineTimeout:
        if frame_id is None:
            return EngineTimeout(f"no reply from {', '.join(self.endpoints)} within {timeout_s:g} s "
                                 f"({len(self.waiting)} frames in flight)")
        return EngineTimeout(f"no reply to frame {frame_id} from {', '.join(self.endpoints)} within {timeout_s:g} s")


class EngineClient(FrameClientCore[int]):
    """Synchronous client: ``denoise(frame)`` for one frame, or ``submit``/``receive`` to pipeline frames."""

    def __init__(self, endpoints: str | Sequence[str], *, window: int = 4, timeout_s: float = 30.0,
                 context: zmq.Context | None = None, curve: CurveClientKeys | None = None) -> None:
        super().__init__(endpoints, window, timeout_s)
        self._ctx = context or zmq.Context.instance()
        self._sockets = [_connect(self._ctx, zmq.DEALER, ep, curve) for ep in self.endpoints]
        self._poller = zmq.Poller()
        for s in self._sockets:
            self._poller.register(s, zmq.POLLIN)
        self._ready: deque[FrameReply] = deque()

    def submit(self, frame: np.ndarray, *, frame_id: int | None = None, unique_id: int = 0,
               timestamp: float | None = None, model: str | None = None, bit_depth: int | None = None,
               want_residual: bool = False, want_defect_map: bool = False, want_flags: bool = False,
               defect_map_dtype: Literal["float32", "uint8"] = "float32", bad_pixels: str | None = None) -> int:
        """Send one frame (waiting for a reply first if the window is full); returns its frame_id."""
        while self.in_flight >= self.window:
            self._ready.append(self._receive_one(self.timeout_s))
        fid, parts, i = self._request(frame, frame_id, dict(
            unique_id=unique_id, timestamp=timestamp, model=model, bit_depth=bit_depth, bad_pixels=bad_pixels,
            want_residual=want_residual, want_defect_map=want_defect_map, want_flags=want_flags,
            defect_map_dtype=defect_map_dtype,
        ))
        self._sockets[i].send_multipart(parts, copy=False)
        self.waiting[fid] = i
        return fid

    def receive(self, timeout_s: float | None = None) -> FrameReply:
        """The next reply, in completion order."""
        if self._ready:
            return self._ready.popleft()
        return self._receive_one(self.timeout_s if timeout_s is None else timeout_s)

    def denoise(self, frame: np.ndarray, **fields: object) -> FrameReply:
        """Send one frame and wait for its own reply (replies to other frames are kept for ``receive``)."""
        fid = self.submit(frame, **fields)  # type: ignore[arg-type]
        for i, r in enumerate(self._ready):
            if r.frame_id == fid:
                del self._ready[i]
                return r
        while True:
            r = self._receive_one(self.timeout_s)
            if r.frame_id == fid:
                return r
            self._ready.append(r)

    def _receive_one(self, timeout_s: float) -> FrameReply:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            events = dict(self._poller.poll(max(0, int(left * 1000)))) if left > 0 else {}
            if not events:
                raise self._timeout(timeout_s)
            for s in self._sockets:
                if s in events:
                    return self._match(s.recv_multipart(copy=False))[0]

    def close(self) -> None:
        for s in self._sockets:
            s.close(0)
        self._sockets.clear()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEngineClient(FrameClientCore["asyncio.Future[FrameReply]"]):
    """asyncio client (zmq.asyncio): ``await denoise(frame)``; run many concurrently to pipeline.

    At most ``window`` frames are in flight; further calls wait for a free slot.
    """

    def __init__(self, endpoints: str | Sequence[str], *, window: int = 4, timeout_s: float = 30.0,
                 context: zmq.asyncio.Context | None = None, curve: CurveClientKeys | None = None) -> None:
        super().__init__(endpoints, window, timeout_s)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sockets: list[zmq.asyncio.Socket] = [_connect(self._ctx, zmq.DEALER, ep, curve)  # type: ignore[misc]
                                                   for ep in self.endpoints]
        self._slots: asyncio.Semaphore | None = None
        self._readers: list[asyncio.Task[None]] = []

    def _start(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.window)
            self._readers = [asyncio.create_task(self._read(s)) for s in self._sockets]
        return self._slots

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            parts = await sock.recv_multipart(copy=False)
            try:
                reply, fut = self._match(parts)
            except EngineError as e:  # a broken reply fails every frame waiting on this engine
                for f in self.waiting.values():
                    if not f.done():
                        f.set_exception(e)
                continue
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def denoise(self, frame: np.ndarray, *, frame_id: int | None = None, unique_id: int = 0,
                      timestamp: float | None = None, model: str | None = None, bit_depth: int | None = None,
                      want_residual: bool = False, want_defect_map: bool = False, want_flags: bool = False,
                      defect_map_dtype: Literal["float32", "uint8"] = "float32",
                      bad_pixels: str | None = None) -> FrameReply:
        """Send one frame and wait for its reply (an error reply, e.g. "dropped", is returned, not raised)."""
        slots = self._start()
        async with slots:
            fid, parts, i = self._request(frame, frame_id, dict(
                unique_id=unique_id, timestamp=timestamp, model=model, bit_depth=bit_depth, bad_pixels=bad_pixels,
                want_residual=want_residual, want_defect_map=want_defect_map, want_flags=want_flags,
                defect_map_dtype=defect_map_dtype,
            ))
            fut: asyncio.Future[FrameReply] = asyncio.get_running_loop().create_future()
            self.waiting[fid] = fut
            try:
                await self._sockets[i].send_multipart(parts, copy=False)
                return await asyncio.wait_for(fut, self.timeout_s)
            except asyncio.TimeoutError as e:
                raise self._timeout(self.timeout_s, fid) from e
            finally:
                self.waiting.pop(fid, None)

    async def close(self) -> None:
        for t in self._readers:
            t.cancel()
        for t in self._readers:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._readers.clear()
        for s in self._sockets:
            s.close(0)
        self._sockets.clear()

    async def __aenter__(self) -> AsyncEngineClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ControlClient:
    """The engine's control channel (REQ): ``status()``, ``list_models()``, ``activate(ref)``, ``metrics()``."""

    def __init__(self, endpoint: str, *, timeout_s: float = 30.0, context: zmq.Context | None = None,
                 curve: CurveClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._sock = _connect(context or zmq.Context.instance(), zmq.REQ, endpoint, curve)

    def request(self, command: str, *, reply_timeout_s: float | None = None, **fields: object) -> ControlReply:
        """``fields`` are the request's (an activate's ``timeout_s`` among them); ``reply_timeout_s``: how long to
        wait for the reply (default the client's; an activate that waits, its own timeout and 5 s more)."""
        req = ControlRequest(command=command, **fields)  # type: ignore[arg-type]
        timeout = _control_timeout(req, self.timeout_s if reply_timeout_s is None else reply_timeout_s)
        # a REQ socket's send waits for a connected peer: bounded, so an engine that is down or that refuses
        # this client's CURVE key (the handshake fails and is retried) is a timeout, not a hang
        if not self._sock.poll(int(timeout * 1000), zmq.POLLOUT):
            raise EngineTimeout(f"no connection to {self.endpoint} within {timeout:g} s (the engine is down, or it "
                                "requires CURVE and refused this client's key)")
        self._sock.send(encode_control_request(req), zmq.NOBLOCK)
        if not self._sock.poll(int(timeout * 1000)):
            raise EngineTimeout(f"no control reply from {self.endpoint} within {timeout:g} s (the engine is down or "
                                "busy, or it requires CURVE and refused this client's key)")
        return decode_control_reply(self._sock.recv())

    def status(self) -> ControlReply:
        return self.request("status")

    def metrics(self) -> ControlReply:
        return self.request("metrics")

    def list_models(self) -> ControlReply:
        return self.request("list_models")

    def set_bad_pixels(self, bad_pixels: str) -> ControlReply:
        """Send a camera's bad-pixel map (NDPluginBadPixel JSON); ``result["id"]`` names it in frame requests."""
        return self.request("set_bad_pixels", bad_pixels=bad_pixels)

    def activate(self, model: str, *, wait: bool = True, timeout_s: float = 600.0) -> ControlReply:
        return self.request("activate", model=model, wait=wait, timeout_s=timeout_s)

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncControlClient:
    """The control channel for asyncio code (the IOC)."""

    def __init__(self, endpoint: str, *, timeout_s: float = 30.0, context: zmq.asyncio.Context | None = None,
                 curve: CurveClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._sock: zmq.asyncio.Socket = _connect(context or zmq.asyncio.Context.instance(), zmq.REQ,  # type: ignore[assignment]
                                                  endpoint, curve)

    async def request(self, command: str, *, reply_timeout_s: float | None = None, **fields: object) -> ControlReply:
        """As :meth:`ControlClient.request`."""
        req = ControlRequest(command=command, **fields)  # type: ignore[arg-type]
        await self._sock.send(encode_control_request(req))
        timeout = _control_timeout(req, self.timeout_s if reply_timeout_s is None else reply_timeout_s)
        try:
            raw = await asyncio.wait_for(self._sock.recv(), timeout)
        except asyncio.TimeoutError as e:
            raise EngineTimeout(f"no control reply from {self.endpoint} within {timeout:g} s") from e
        return decode_control_reply(raw)

    def close(self) -> None:
        self._sock.close(0)
