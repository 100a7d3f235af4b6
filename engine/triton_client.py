"""Clients of cdae's frame path behind NVIDIA Triton (``triton://HOST:PORT/MODEL``): gRPC via tritonclient, asyncio.

:class:`AsyncTritonClient` is :class:`~cdae.engine.client.AsyncEngineClient`'s twin (``await denoise(frame,
...)`` → :class:`~cdae.engine.protocol.FrameReply`, at most ``window`` frames in flight, ids and timeouts from
:class:`~cdae.engine.client.FrameClientCore`), and :class:`AsyncTritonControl` answers the engine's control
requests (``status``, ``list_models``, ``activate``, ``metrics``, ``set_bad_pixels``) from Triton's own APIs,
so the filter IOC drives either engine with the same code:

- ``status``: server live and the served version ready (else an error: the IOC raises its COMM alarm);
- ``list_models``: the versions the repository holds (the frame model's ``cdae_versions`` parameter);
- ``activate NAME:VERSION``: Triton's model-control API: load the new version beside the old one (a
  ``specific`` version policy), switch the next frame to it, wait for the old version's frames in
  flight, then load with the new version alone (Triton unloads the old). No frame is refused on the way;
- ``set_bad_pixels``: the map is kept here and sent with every frame naming it (Triton instances hold
  no client state), under the id the engine would give it.

What clients of one URL share (the version frames go to, frames in flight per version, the maps) is
one :class:`TritonLink` per URL in this process. A server that does not answer raises
:class:`~cdae.engine.errors.EngineError` (:class:`~cdae.engine.errors.EngineTimeout` past the timeout),
as the ZeroMQ clients do.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from typing import Any, Literal

import numpy as np

from cdae.endpoints import TritonEndpoint, parse_triton
from cdae.engine.badpixels import BadPixelMap, BadPixelMaps
from cdae.engine.client import FrameClientCore
from cdae.engine.errors import EngineError, EngineTimeout
from cdae.engine.protocol import ControlReply, ControlRequest, FrameReply, ProtocolError, decode_reply
from cdae.engine.triton_wire import (IN_BAD_PIXELS, IN_FRAME, IN_HEADER, OUT_DATA, OUT_HEADER, VERSIONS_PARAMETER,
                                     request_tensors,
                                     text_tensor, unpack_reply)

_UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN")


def _grpc() -> Any:  # noqa: ANN401
    try:
        import tritonclient.grpc.aio as aio
        from tritonclient.utils import InferenceServerException
    except ImportError as e:
        raise EngineError("a triton:// engine needs tritonclient[grpc]: pip install 'cdae[triton]'") from e
    return aio, InferenceServerException


def _status_of(e: BaseException) -> str:
    status = getattr(e, "status", None)
    s = status() if callable(status) else status
    return str(s or "")


def _trouble(endpoint: TritonEndpoint, what: str, e: BaseException, timeout_s: float) -> EngineError:
    """A tritonclient error as the engine clients' own: a timeout, or the server not answering."""
    status = _status_of(e)
    if "DEADLINE_EXCEEDED" in status:
        return EngineTimeout(f"no reply from Triton at {endpoint} to {what} within {timeout_s:g} s")
    return EngineError(f"Triton at {endpoint}: {what}: {e}")


class TritonLink:
    """What every client of one ``triton://`` URL in this process shares (see the module docstring)."""

    def __init__(self, endpoint: TritonEndpoint) -> None:
        self.endpoint = endpoint
        self.version: int | None = None  # the version frames go to; None: Triton's choice (the latest loaded)
        self.in_flight: dict[int | None, int] = {}
        self.maps: OrderedDict[str, str] = OrderedDict()  # bad-pixel map id → its JSON
        self.since = time.monotonic()  # reset when the server was lost or the served version vanished
        self.lost = False
        self.cleanup: asyncio.Task[None] | None = None  # a swap's unload of the old version, in the background

    def enter(self, version: int | None) -> None:
        self.in_flight[version] = self.in_flight.get(version, 0) + 1

    def leave(self, version: int | None) -> None:
        self.in_flight[version] = max(0, self.in_flight.get(version, 0) - 1)

    async def drained(self, version: int | None, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.in_flight.get(version, 0) > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def add_map(self, bad: BadPixelMap, keep: int = 16) -> str:
        key = BadPixelMaps.id_of(bad)
        self.maps[key] = bad.to_json()
        self.maps.move_to_end(key)
        while len(self.maps) > keep:
            self.maps.popitem(last=False)
        return key


_LINKS: dict[str, TritonLink] = {}


def link_for(url: str) -> TritonLink:
    endpoint = parse_triton(url)
    key = str(endpoint)
    if key not in _LINKS:
        _LINKS[key] = TritonLink(endpoint)
    return _LINKS[key]


class AsyncTritonClient(FrameClientCore[None]):
    """Frames to the frame-path model behind Triton; ``await denoise(frame)`` as with the engine's client."""

    def __init__(self, url: str, *, window: int = 4, timeout_s: float = 30.0) -> None:
        super().__init__(url, window, timeout_s)
        self.link = link_for(url)
        self._client: Any = None
        self._slots: asyncio.Semaphore | None = None

    def _connect(self) -> Any:  # noqa: ANN401
        if self._client is None:
            aio, _ = _grpc()
            self._client = aio.InferenceServerClient(self.link.endpoint.grpc_url)
        return self._client

    async def denoise(self, frame: np.ndarray, *, frame_id: int | None = None, unique_id: int = 0,
                      timestamp: float | None = None, model: str | None = None, bit_depth: int | None = None,
                      want_residual: bool = False, want_defect_map: bool = False, want_flags: bool = False,
                      defect_map_dtype: Literal["float32", "uint8"] = "float32",
                      bad_pixels: str | None = None) -> FrameReply:
        """Send one frame and wait for its reply (an error reply is returned, not raised)."""
        aio, TritonException = _grpc()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.window)
        async with self._slots:
            fid, parts, _ = self._request(frame, frame_id, dict(
                unique_id=unique_id, timestamp=timestamp, model=model, bit_depth=bit_depth, bad_pixels=bad_pixels,
                want_residual=want_residual, want_defect_map=want_defect_map, want_flags=want_flags,
                defect_map_dtype=defect_map_dtype))
            header, data = request_tensors(parts)
            inputs = [_input(aio, IN_HEADER, header), _input(aio, IN_FRAME, data)]
            if bad_pixels is not None:
                text = self.link.maps.get(bad_pixels)
                if text is None:
                    raise EngineError(f"bad-pixel map {bad_pixels} was not given to this client (set_bad_pixels)")
                inputs.append(_input(aio, IN_BAD_PIXELS, text_tensor(text)))
            version = self.link.version  # read once: a swap lands between frames
            self.waiting[fid] = None
            self.link.enter(version)
            ep = self.link.endpoint
            try:
                result = await asyncio.wait_for(self._connect().infer(
                    ep.model, inputs, model_version="" if version is None else str(version),
                    outputs=[aio.InferRequestedOutput(OUT_HEADER), aio.InferRequestedOutput(OUT_DATA)],
                    client_timeout=self.timeout_s), self.timeout_s + 1.0)
            except asyncio.TimeoutError as e:
                raise self._timeout(self.timeout_s, fid) from e
            except TritonException as e:
                raise _trouble(ep, f"frame {fid}", e, self.timeout_s) from e
            finally:
                self.link.leave(version)
                self.waiting.pop(fid, None)
            try:
                reply = decode_reply(unpack_reply(result.as_numpy(OUT_HEADER), result.as_numpy(OUT_DATA)))
            except ProtocolError:
                raise
            except (TypeError, ValueError) as e:
                raise ProtocolError("bad_message", f"Triton at {ep}: reply to frame {fid} is not cdae's: {e}") from e
            if reply.frame_id != fid:
                self.unmatched += 1
                raise EngineError(f"Triton at {ep}: the reply to frame {fid} is for frame {reply.frame_id}")
            return reply

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def __aenter__(self) -> AsyncTritonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _input(aio: Any, name: str, array: np.ndarray) -> Any:  # noqa: ANN401
    i = aio.InferInput(name, [int(array.size)], "UINT8")
    i.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.uint8).reshape(-1))
    return i


async def _load_alone(endpoint: TritonEndpoint, config: dict[str, Any], timeout_s: float) -> None:
    """Load a model with one version (its config names it): Triton unloads the others. On its own channel."""
    aio, TritonException = _grpc()
    client = aio.InferenceServerClient(endpoint.grpc_url)
    try:
        await client.load_model(endpoint.model, config=json.dumps(config), client_timeout=timeout_s)
    except TritonException:  # the old version stays loaded beside the new one; the next swap tries again
        pass
    finally:
        await client.close()


class AsyncTritonControl:
    """The engine's control requests, answered from Triton's APIs (see the module docstring)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        self.link = link_for(url)
        self.endpoint = str(self.link.endpoint)
        self.timeout_s = timeout_s
        self._client: Any = None

    def _connect(self) -> Any:  # noqa: ANN401
        if self._client is None:
            aio, _ = _grpc()
            self._client = aio.InferenceServerClient(self.link.endpoint.grpc_url)
        return self._client

    async def request(self, command: str, timeout_s: float | None = None, **fields: object) -> ControlReply:
        req = ControlRequest(command=command, **fields)  # type: ignore[arg-type]
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if req.command == "activate" and req.wait:
            timeout = max(timeout, req.timeout_s + 5.0)
        _, TritonException = _grpc()
        try:
            return await asyncio.wait_for(self._handle(req, timeout), timeout)
        except asyncio.TimeoutError as e:
            self.link.lost = True
            raise EngineTimeout(f"no answer from Triton at {self.endpoint} to {command} within {timeout:g} s") from e
        except TritonException as e:
            if any(s in _status_of(e) for s in _UNREACHABLE):
                self.link.lost = True
                raise _trouble(self.link.endpoint, command, e, timeout) from e
            return ControlReply(ok=False, command=command, error=f"Triton at {self.endpoint}: {e}")

    async def _served_version(self, c: Any) -> int | None:  # noqa: ANN401
        """The version frames go to: the link's if ready, else the highest version Triton has ready."""
        ep, link = self.link.endpoint, self.link
        if link.version is not None and await c.is_model_ready(ep.model, str(link.version)):
            return link.version
        index = await c.get_model_repository_index(as_json=True)
        ready = sorted(int(m["version"]) for m in index.get("models", [])
                       if m.get("name") == ep.model and m.get("state") == "READY" and str(m.get("version", "")).isdigit())
        if not ready:
            return None
        if link.version is not None and link.version not in ready:
            link.since = time.monotonic()  # the server restarted (or someone unloaded it): a new life
        link.version = ready[-1]
        return link.version

    async def _versions(self, c: Any) -> list[int]:  # noqa: ANN401
        cfg = (await c.get_model_config(self.link.endpoint.model, as_json=True))["config"]
        raw = (cfg.get("parameters") or {}).get(VERSIONS_PARAMETER, {}).get("string_value", "")
        return sorted(int(v) for v in raw.split(",") if v.strip().isdigit())

    async def _handle(self, req: ControlRequest, timeout_s: float) -> ControlReply:
        c, ep, link = self._connect(), self.link.endpoint, self.link
        cmd = req.command
        if cmd == "status":
            live = await c.is_server_live()
            if link.lost:  # it did not answer before: what serves now is a new life of the server
                link.lost, link.since = False, time.monotonic()
            version = await self._served_version(c) if live else None
            if version is None:
                return ControlReply(ok=False, command=cmd, error=f"Triton at {self.endpoint} is live but model "
                                                                 f"{ep.model} has no version ready (load it)")
            meta = await c.get_server_metadata(as_json=True)
            return ControlReply(ok=True, command=cmd, result={
                "model": f"{ep.model}:{version}", "backend": "triton", "uptime_s": round(time.monotonic() - link.since, 3),
                "triton_version": str(meta.get("version", "")), "endpoint": self.endpoint})
        if cmd == "list_models":
            return ControlReply(ok=True, command=cmd, result={
                "models": [{"ref": f"{ep.model}:{v}"} for v in await self._versions(c)]})
        if cmd == "metrics":
            stats = await c.get_inference_statistics(ep.model, as_json=True)
            return ControlReply(ok=True, command=cmd, result={"triton": stats})
        if cmd == "set_bad_pixels":
            assert req.bad_pixels is not None
            try:
                bad = BadPixelMap.from_json(req.bad_pixels, source="set_bad_pixels")
            except EngineError as e:
                return ControlReply(ok=False, command=cmd, error=str(e))
            return ControlReply(ok=True, command=cmd, result={"id": link.add_map(bad), "pixels": len(bad)})
        if cmd == "activate":
            assert req.model is not None
            return await self._activate(c, req.model, timeout_s)
        return ControlReply(ok=False, command=cmd, error=f"unknown command {cmd!r}")

    async def _activate(self, c: Any, ref: str, timeout_s: float) -> ControlReply:  # noqa: ANN401
        ep, link = self.link.endpoint, self.link
        name, _, raw = ref.partition(":")

        def refuse(why: str) -> ControlReply:
            return ControlReply(ok=False, command="activate", error=f"activate {ref}: {why}",
                                result={"activation": {"model": ref, "state": "failed", "error": why}})

        if name != ep.model:
            return refuse(f"this Triton endpoint serves model {ep.model} ({self.endpoint})")
        versions = await self._versions(c)
        if raw and not raw.isdigit():
            return refuse("Triton's versions are positive integers")
        new = int(raw) if raw else (versions[-1] if versions else None)
        if new is None or new not in versions:
            return refuse(f"the repository has no version {raw} (available: {', '.join(map(str, versions)) or 'none'})")
        t0 = time.monotonic()
        if link.cleanup is not None and not link.cleanup.done():
            await asyncio.wait_for(asyncio.shield(link.cleanup), timeout_s)  # the last swap's unload first
        old = await self._served_version(c)
        config = (await c.get_model_config(ep.model, as_json=True))["config"]
        if old != new:
            both = sorted({v for v in (old, new) if v is not None})
            await c.load_model(ep.model, config=json.dumps({**config, "version_policy": {"specific": {"versions": both}}}),
                               client_timeout=timeout_s)
            if not await c.is_model_ready(ep.model, str(new)):
                return refuse(f"Triton loaded it but version {new} is not ready (see the server's log)")
            link.version = new  # the next frame goes to the new version
            if not await link.drained(old, max(1.0, timeout_s - (time.monotonic() - t0))):
                return refuse(f"frames on version {old} did not finish; both versions stay loaded")
        # the old version is unloaded in the background: Triton reloads a model whose configuration changed
        # (the new version serving all the while), which costs a stub start per instance; the next activate waits
        link.cleanup = asyncio.get_running_loop().create_task(
            _load_alone(ep, {**config, "version_policy": {"specific": {"versions": [new]}}}, timeout_s))
        state = {"model": f"{ep.model}:{new}", "state": "active", "error": None,
                 "seconds": round(time.monotonic() - t0, 3), "previous": None if old is None else f"{ep.model}:{old}"}
        return ControlReply(ok=True, command="activate", result={"activation": state, "model": f"{ep.model}:{new}"})

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                asyncio.get_running_loop().create_task(client.close())
            except RuntimeError:  # no loop: nothing to close it in (the channel is dropped with the object)
                pass
