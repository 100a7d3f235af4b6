"""The engine as a process: round trips, tiling, control, hot swap, bad input, overload.

Each engine is a real ``cdae engine`` child on 127.0.0.1, port 0, torch-cpu with one thread.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from cdae.engine.client import AsyncEngineClient, ControlClient, EngineClient
from cdae.engine.inference import Denoiser
from cdae.engine.pipeline import synthetic_frame
from cdae.engine.protocol import FrameReply, decode_reply, encode_request, request_header_for

if TYPE_CHECKING:  # fixtures' types; conftest is not importable under --import-mode=importlib
    from conftest import EngineLauncher, EngineProcess

DTYPES = ["uint8", "uint16", "int16", "int32", "float32"]


# The ordinary engines run torch-cpu on every machine: these tests compare replies with the CPU
# reference to one DN. What `auto` picks on a GPU machine is tested at the end of this file.
@pytest.fixture(scope="module")
def engine_a(engine_launcher: EngineLauncher, engine_store: Path) -> Iterator[EngineProcess]:
    eng = engine_launcher.start("--models", str(engine_store), "--model", "tiny:1", "--backend", "torch-cpu",
                                "--no-guard", name="a")  # the transport against the network alone
    yield eng
    engine_launcher.stop(eng)


@pytest.fixture(scope="module")
def engine_b(engine_launcher: EngineLauncher, engine_store: Path) -> Iterator[EngineProcess]:
    """A second ordinary engine, for clients that spread frames over several."""
    eng = engine_launcher.start("--models", str(engine_store), "--model", "tiny:1", "--backend", "torch-cpu",
                                name="b")
    yield eng
    engine_launcher.stop(eng)


@pytest.fixture(scope="module")
def engine_tiled(engine_launcher: EngineLauncher, engine_store: Path) -> Iterator[EngineProcess]:
    """Tiles anything over 32x32 and keeps one frame waiting per client: slow on purpose for big frames."""
    eng = engine_launcher.start("--models", str(engine_store), "--model", "tiny:1", "--backend", "torch-cpu",
                                "--max-pixels", "1024",
                                "--queue", "1", "--no-guard", name="tiled")
    yield eng
    engine_launcher.stop(eng)


@pytest.fixture(scope="module")
def reference(engine_store: Path) -> Denoiser:
    torch.set_num_threads(1)
    return Denoiser.from_package(engine_store / "tiny" / "1")


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.kind == "f":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    else:  # one thread in the engine, maybe more here: float rounding may cross one integer boundary
        assert np.abs(got.astype(np.int64) - want.astype(np.int64)).max() <= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype(engine_a: EngineProcess, reference: Denoiser, dtype: str) -> None:
    frame = synthetic_frame((48, 80), dtype, seed=7)  # not square, not a multiple of anything
    with EngineClient(engine_a.data, timeout_s=30) as c:
        r = c.denoise(frame, unique_id=1234, timestamp=1.7e9, want_residual=True, want_defect_map=True)
    assert r.ok, r.header.error
    assert r.model == "tiny:1" and r.header.backend == "torch-cpu"
    assert r.header.unique_id == 1234 and r.header.timestamp == 1.7e9 and r.header.tiles == 1
    t = r.header.timings
    assert 0 <= t.queue_ms <= t.total_ms and 0 < t.inference_ms <= t.total_ms
    want = reference(frame)
    assert r.denoised is not None and r.residual is not None and r.defect_map is not None
    _assert_close(r.denoised, want.denoised)
    np.testing.assert_allclose(r.residual, frame.astype(np.float32) - r.denoised.astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(r.defect_map, want.defect_probability, atol=1e-4)
    assert not np.array_equal(r.denoised, frame)  # the model did something


def test_requested_model_must_be_the_active_one(engine_a: EngineProcess) -> None:
    frame = synthetic_frame((16, 16), "uint8")
    with EngineClient(engine_a.data) as c:
        assert c.denoise(frame, model="tiny").ok
        assert c.denoise(frame, model="tiny:1").ok
        r = c.denoise(frame, model="tiny:2")
    assert r.error_code == "model_mismatch" and "serves tiny:1" in r.header.error.message  # type: ignore[union-attr]


def test_control_status_list_metrics(engine_a: EngineProcess) -> None:
    with ControlClient(engine_a.control) as ctl, EngineClient(engine_a.data) as c:
        before = ctl.status()
        assert c.denoise(synthetic_frame((20, 30), "uint16")).ok
        after = ctl.status()
        models = ctl.list_models()
        metrics = ctl.metrics()
        bad = ctl.request("status", timeout_s=5, wait=False)  # a field status ignores is still valid
    assert before.ok and after.ok
    s = after.result
    assert s["backend"] == "torch-cpu" and s["device"] == "cpu" and s["model"] == "tiny:1"
    assert s["data"] == engine_a.data and s["control"] == engine_a.control
    assert len(str(s["instance"])) == 32 and before.result["instance"] == s["instance"]  # one life, one id
    assert s["counters"]["processed"] == before.result["counters"]["processed"] + 1  # type: ignore[index]
    assert {"received", "processed", "dropped", "errors"} <= set(s["counters"])  # type: ignore[arg-type]
    assert s["timings_ms"]["total_ms"]["p50"] is not None and "p99" in s["timings_ms"]["total_ms"]  # type: ignore[index]
    assert s["queue_depth"] == 0 and s["queue_bound"] == 2
    refs = {m["ref"]: m for m in models.result["models"]}  # type: ignore[index, union-attr]
    assert {"tiny:1", "tiny:2", "tiny:bad"} <= set(refs) and refs["tiny:1"]["active"]
    assert metrics.ok and metrics.result["processed_by_model"]["tiny:1"] >= 1  # type: ignore[index]
    assert bad.ok


def test_control_channel_answers_garbage(engine_a: EngineProcess) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(engine_a.control)
    try:
        for raw, needle in ((b"hello", "expected a JSON object"), (b'{"command": "reboot"}', "'command'"),
                            (b'{"command": "activate"}', "needs 'model'")):
            sock.send(raw)
            assert sock.poll(10_000)
            reply = json.loads(sock.recv())
            assert reply["ok"] is False and needle in reply["error"]
    finally:
        sock.close(0)


def test_failed_swap_keeps_the_old_model(engine_a: EngineProcess) -> None:
    with ControlClient(engine_a.control) as ctl, EngineClient(engine_a.data) as c:
        r = ctl.activate("tiny:bad")
        assert not r.ok and "sha256" in (r.error or "") and "refusing to load" in (r.error or "")
        missing = ctl.activate("tiny:9")
        assert not missing.ok and "no version '9'" in (missing.error or "")
        status = ctl.status().result
        assert "tiny:9" in str(status["last_error"]) and status["activation"]["state"] == "failed"  # type: ignore[index]
        assert status["model"] == "tiny:1"
        reply = c.denoise(synthetic_frame((24, 24), "uint16"))
    assert reply.ok and reply.model == "tiny:1"


def _raw(sock: zmq.Socket, parts: list[bytes]) -> FrameReply:
    sock.send_multipart(parts)
    assert sock.poll(15_000), f"no reply to {parts[:1]!r}"
    return decode_reply(sock.recv_multipart())


def test_bad_input_gets_error_replies_and_the_engine_keeps_serving(engine_a: EngineProcess) -> None:
    good = synthetic_frame((8, 12), "uint16")
    h = json.loads(bytes(encode_request(request_header_for(good, 10), good)[0]))
    payload = good.tobytes()
    nan = np.full((2, 2), np.nan, np.float32)
    cases = [
        ([b"garbage"], "bad_message", None),
        ([b"not json", payload], "bad_message", None),
        ([json.dumps({**h, "frame_id": 11, "dtype": "complex64"}).encode(), payload], "bad_header", 11),
        ([json.dumps({**h, "frame_id": 12}).encode(), payload[:-1]], "bad_frame", 12),
        ([json.dumps({**h, "frame_id": 13, "dtype": "float32", "shape": [2, 2]}).encode(), nan.tobytes()],
         "bad_frame", 13),
        ([json.dumps({**h, "frame_id": 14, "shape": [0, 12]}).encode(), b""], "bad_frame", 14),
        ([json.dumps({**h, "frame_id": 15, "shape": [100000, 100000]}).encode(), b""], "too_large", 15),
        ([json.dumps({**h, "frame_id": 16}).encode(), payload, b"extra"], "bad_message", 16),
        ([json.dumps({**h, "frame_id": 17, "protocol": 99}).encode(), payload], "unsupported_version", 17),
    ]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(engine_a.data)
    try:
        for parts, code, fid in cases:
            r = _raw(sock, parts)
            assert not r.ok and r.error_code == code and r.frame_id == fid, (parts[:1], r.header)
            assert r.header.error and r.header.error.message
        ok = _raw(sock, [json.dumps(h).encode(), payload])
        assert ok.ok and ok.frame_id == 10 and ok.model == "tiny:1"
    finally:
        sock.close(0)
    with ControlClient(engine_a.control) as ctl:
        s = ctl.status().result
    assert s["counters"]["errors"] >= len(cases) and "unsupported_version" not in str(s["last_error"])  # type: ignore[index]
    assert s["last_request_error"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=3))
def test_fuzzed_messages_each_get_an_error_reply(engine_a: EngineProcess, parts: list[bytes]) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(engine_a.data)
    try:
        r = _raw(sock, parts)
        assert not r.ok and r.error_code in ("bad_message", "bad_header", "bad_frame", "unsupported_version")
        good = synthetic_frame((8, 8), "uint8")
        assert _raw(sock, [bytes(p) for p in encode_request(request_header_for(good, 1), good)]).ok
    finally:
        sock.close(0)


def test_tiled_frame_through_the_server_equals_untiled(engine_tiled: EngineProcess, reference: Denoiser) -> None:
    frame = synthetic_frame((96, 80), "uint16", seed=9)
    with EngineClient(engine_tiled.data) as c:
        r = c.denoise(frame, want_defect_map=True)
    assert r.ok and r.header.tiles > 4  # 1024-pixel tiles with an 8-pixel margin
    want = reference(frame)  # the whole frame at once
    assert r.denoised is not None and r.defect_map is not None
    _assert_close(r.denoised, want.denoised)
    np.testing.assert_allclose(r.defect_map, want.defect_probability, atol=1e-4)


def test_overload_drops_stale_frames_and_answers_every_one(engine_tiled: EngineProcess) -> None:
    frame = synthetic_frame((256, 256), "uint16")  # 256 tiles each: slower than the burst arrives
    n = 24
    with ControlClient(engine_tiled.control) as ctl, EngineClient(engine_tiled.data, window=n, timeout_s=120) as c:
        before = ctl.status().result["counters"]
        ids = [c.submit(frame, unique_id=i) for i in range(n)]
        replies = [c.receive() for _ in range(n)]
        status = ctl.status().result
    assert sorted(r.frame_id for r in replies) == ids  # every frame answered, once
    ok = [r for r in replies if r.ok]
    dropped = [r for r in replies if r.error_code == "dropped"]
    assert len(ok) + len(dropped) == n and dropped and ok
    assert ids[-1] in {r.frame_id for r in ok}  # the newest frame wins: the last of the burst is always served
    assert all("newer frame" in r.header.error.message for r in dropped)  # type: ignore[union-attr]
    after = status["counters"]
    assert after["dropped"] - before["dropped"] == len(dropped)  # type: ignore[index]
    assert after["processed"] - before["processed"] == len(ok)  # type: ignore[index]
    assert status["queue_high_water"] <= 1 and status["queue_depth"] == 0
    # latency stays bounded: a served frame waited at most for the one being processed (generous slack)
    slowest = max(r.header.timings.inference_ms for r in ok)
    assert max(r.header.timings.queue_ms for r in ok) <= 3 * slowest + 1000


def test_clients_spread_frames_over_engines(engine_a: EngineProcess, engine_b: EngineProcess) -> None:
    frame = synthetic_frame((30, 30), "uint16")
    ctls = [ControlClient(e.control) for e in (engine_a, engine_b)]
    try:
        before = [c.status().result["counters"]["received"] for c in ctls]  # type: ignore[index]
        with EngineClient([engine_a.data, engine_b.data], window=2) as c:
            ids = [c.submit(frame) for _ in range(6)]
            sync_replies = [c.receive() for _ in ids]

        async def run() -> list[FrameReply]:
            async with AsyncEngineClient([engine_a.data, engine_b.data], window=2) as ac:
                return list(await asyncio.gather(*(ac.denoise(frame, unique_id=i) for i in range(6))))

        async_replies = asyncio.run(run())
        after = [c.status().result["counters"]["received"] for c in ctls]  # type: ignore[index]
    finally:
        for c in ctls:
            c.close()
    failed = [(r.frame_id, r.header.error) for r in sync_replies + async_replies if not r.ok]
    assert not failed
    assert sorted(r.frame_id for r in sync_replies) == ids
    assert [r.header.unique_id for r in async_replies] == list(range(6))
    assert [a - b for a, b in zip(after, before)] == [6, 6]  # round robin: 3 + 3 from each client


def test_hot_swap_under_load(engine_launcher: EngineLauncher, engine_store: Path) -> None:
    eng = engine_launcher.start("--models", str(engine_store), "--model", "tiny:1", name="swap")
    frame = synthetic_frame((64, 64), "uint16")
    replies: list[FrameReply] = []
    sent: list[int] = []
    with EngineClient(eng.data, window=2, timeout_s=60) as c, ControlClient(eng.control) as ctl:
        state = "idle"
        after_switch = 0
        while after_switch < 20 and len(sent) < 3000:
            sent.append(c.submit(frame))
            if c.in_flight >= 2:
                replies.append(c.receive())
            if len(replies) == 20 and state == "idle":
                r = ctl.activate("tiny:2", wait=False)  # returns at once; frames keep streaming
                assert r.ok, r.error
                state = "loading"
            if state == "loading" and len(sent) % 4 == 0:
                state = "loading" if ctl.status().result["activation"]["state"] == "loading" else "done"  # type: ignore[index]
            if state == "done":
                after_switch += 1
        while c.in_flight:
            replies.append(c.receive())
        status = ctl.status().result
    assert state == "done" and status["model"] == "tiny:2" and status["activation"]["state"] == "active"  # type: ignore[index]
    assert sorted(r.frame_id for r in replies) == sent  # no frame lost: every request got a reply
    assert all(r.ok for r in replies), [r.header.error for r in replies if not r.ok][:3]
    labels = [r.model for r in sorted(replies, key=lambda r: r.frame_id)]  # type: ignore[arg-type, return-value]
    switch = labels.index("tiny:2")
    assert switch >= 20 and labels[:switch] == ["tiny:1"] * switch  # switched once, between two frames
    assert labels[switch:] == ["tiny:2"] * (len(labels) - switch)
    # SIGTERM stops it cleanly
    eng.proc.send_signal(signal.SIGTERM)
    assert eng.proc.wait(20) == 0
    assert "stopped: received" in eng.stderr_path.read_text()
    engine_launcher.stop(eng)


def test_tampered_package_at_startup_is_a_clear_error(engine_store: Path) -> None:
    cmd = [sys.executable, "-m", "cdae.cli", "engine", "--bind", "tcp://127.0.0.1:0", "--models", str(engine_store),
           "--model", "tiny:bad", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "cdae engine: error:" in out.stderr and "sha256" in out.stderr and "refusing to load" in out.stderr
    assert "ready" not in out.stdout and "Traceback" not in out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_picks_the_gpu_and_serves_what_the_cpu_serves(engine_launcher: EngineLauncher, engine_store: Path,
                                                           reference: Denoiser) -> None:
    untiled = engine_launcher.start("--models", str(engine_store), "--model", "tiny:1", name="gpu")  # --backend auto
    tiled = engine_launcher.start("--models", str(engine_store), "--model", "tiny:1", "--backend", "torch-cuda",
                                  "--max-pixels", "1024", name="gpu-tiled")
    try:
        with ControlClient(untiled.control) as ctl:
            s = ctl.status().result
        assert s["backend"] == "torch-cuda" and str(s["device"]).startswith("cuda")
        frame = synthetic_frame((96, 80), "uint16", seed=9)
        want = reference(frame).denoised.astype(np.int64)
        with EngineClient(untiled.data, timeout_s=60) as c:
            replies = [c.denoise(frame, unique_id=i) for i in range(3)]  # eager, then the captured CUDA graph
        with EngineClient(tiled.data, timeout_s=60) as c:
            t = c.denoise(frame)
        assert t.ok and t.header.tiles > 4 and t.denoised is not None
        for r in replies:
            assert r.ok and r.header.backend == "torch-cuda" and r.denoised is not None
            d = np.abs(r.denoised.astype(np.int64) - want)
            # mixed precision on the GPU: within 0.5 % of full scale anywhere, 0.05 % on average
            assert d.max() <= 0.005 * 65535 and d.mean() <= 0.0005 * 65535, (d.max(), d.mean())
        # tiling on the GPU gives what the whole frame gives on the GPU
        d = np.abs(t.denoised.astype(np.int64) - replies[-1].denoised.astype(np.int64))
        assert d.max() <= 0.005 * 65535, d.max()
    finally:
        engine_launcher.stop(untiled)
        engine_launcher.stop(tiled)
