"""Issue 21: the engine survives hostile or extreme input and keeps answering while it works.

Real engines (``cdae engine`` children on 127.0.0.1) and real ZeroMQ sockets, as in test_server.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import zmq

from cdae.engine.client import ControlClient, EngineClient
from cdae.engine.config import EngineConfig
from cdae.engine.pipeline import synthetic_frame
from cdae.engine.server import EngineServer

if TYPE_CHECKING:
    from conftest import EngineLauncher, EngineProcess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine(engine_launcher: EngineLauncher, engine_store: Path) -> Iterator[EngineProcess]:
    eng = engine_launcher.start("--models", str(engine_store), "--model", "tiny:1", "--backend", "torch-cpu",
                                name="hardening")
    yield eng
    engine_launcher.stop(eng)


def _req(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


# --- 1: the control thread survives any input ----------------------------------------------------

def test_multipart_control_message_gets_an_error_and_control_keeps_serving(engine: EngineProcess) -> None:
    sock = _req(engine.control)
    try:
        sock.send_multipart([b'{"command":"status"}', b"x"])
        assert sock.poll(5_000), "no reply to a 2-part control message"
        reply = json.loads(sock.recv())
        assert reply["ok"] is False and "2 message parts" in reply["error"]
    finally:
        sock.close(0)
    # a raw DEALER (no REQ envelope) and an empty message: answered or ignored, never fatal
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(engine.control)
    try:
        dealer.send_multipart([b"no envelope", b"two"])
        dealer.send(b"")
        dealer.poll(500)
    finally:
        dealer.close(0)
    with ControlClient(engine.control, timeout_s=5) as ctl:
        assert ctl.status().ok
        assert ctl.request("status").result["model"] == "tiny:1"


def test_watchdog_covers_the_control_thread() -> None:
    config = EngineConfig(bind="tcp://127.0.0.1:0", backend="passthrough", models_dir=REPO / "models")
    server = EngineServer(config, log=lambda s: None)
    server.start()
    try:
        assert server.stalled(60.0) == []
        with ControlClient(server.control_endpoint, timeout_s=5) as ctl:
            assert ctl.status().ok
            # a real wedge: the control thread blocks on the counters' lock while answering status
            with server.stats._lock:
                ctl._sock.send(b'{"command": "status"}')
                deadline = time.monotonic() + 10
                while "control" not in server.stalled(0.5) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert server.stalled(0.5) == ["control"]
            assert ctl._sock.poll(5_000)
            ctl._sock.recv()
        deadline = time.monotonic() + 5
        while server.stalled(0.5) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stalled(0.5) == []
    finally:
        server.stop()


# --- 2: status answers while a swap loads ------------------------------------------------------

def test_status_answers_during_a_slow_swap(engine_launcher: EngineLauncher, engine_store: Path) -> None:
    eng = engine_launcher.start("--models", str(engine_store), "--model", "tiny:1", "--backend", "torch-cpu",
                                name="slow-swap")
    try:
        with EngineClient(eng.data, timeout_s=60) as c:  # the swap warms up on the live shape: make it slow
            assert c.denoise(synthetic_frame((2048, 2048), "uint16")).ok
        result: dict[str, object] = {}

        def activate() -> None:
            with ControlClient(eng.control, timeout_s=120) as ctl:
                result["reply"] = ctl.activate("tiny:2", wait=True)

        t = threading.Thread(target=activate)
        t0 = time.monotonic()
        t.start()
        latencies, states = [], []
        with ControlClient(eng.control, timeout_s=5) as status:
            while t.is_alive():
                s0 = time.monotonic()
                r = status.status()
                latencies.append(time.monotonic() - s0)
                states.append(r.result["activation"]["state"])  # type: ignore[index]
                time.sleep(0.05)
        t.join()
        swap_s = time.monotonic() - t0
        reply = result["reply"]
        assert reply.ok and reply.result["model"] == "tiny:2", reply  # type: ignore[attr-defined]
        assert swap_s > 0.5, f"the swap took {swap_s:.2f} s: too fast to show anything"
        assert "loading" in states  # status reports the swap in progress
        assert max(latencies) < 0.3, (max(latencies), swap_s)
    finally:
        engine_launcher.stop(eng)


# --- 9: memory per message and per queue is bounded --------------------------------------------

def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _site_engine(engine_launcher: EngineLauncher, engine_store: Path, tmp_path: Path, name: str,
                 **fields: object) -> EngineProcess:
    lines = [f"models_dir = {json.dumps(str(engine_store))}", "[engines.e]", 'model = "tiny:1"',
             'backend = "torch-cpu"', *(f"{k} = {json.dumps(v)}" for k, v in fields.items())]
    site = tmp_path / "site.toml"
    site.write_text("\n".join(lines) + "\n")
    return engine_launcher.start("--config", str(site), "--name", "e", name=name)


def test_oversized_part_is_refused_before_it_is_buffered(engine_launcher: EngineLauncher, engine_store: Path,
                                                         tmp_path: Path) -> None:
    eng = _site_engine(engine_launcher, engine_store, tmp_path, "maxmsg", max_frame_pixels=1024 * 1024)
    try:
        with EngineClient(eng.data, timeout_s=30) as c:
            assert c.denoise(synthetic_frame((64, 64), "uint16")).ok
        before = _peak_rss_mib(eng.proc.pid)
        garbage = bytearray(128 << 20)  # 128 MiB: 32x the largest frame this engine accepts (4 MiB)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(eng.data)
        try:
            sock.send_multipart([b"{}", garbage], copy=False)
            replied = sock.poll(3_000)
        finally:
            sock.close(0)
        del garbage
        grown = _peak_rss_mib(eng.proc.pid) - before
        assert not replied  # the connection is dropped at the part's length, its bytes never read
        assert grown < 32, f"peak RSS grew {grown:.0f} MiB for one 128 MiB part"
        with EngineClient(eng.data, timeout_s=30) as c:  # and the engine keeps serving
            frame = synthetic_frame((1024, 1024), "float32")  # the largest allowed still fits
            r = c.denoise(frame)
            assert r.ok, r.header.error
    finally:
        engine_launcher.stop(eng)


def test_waiting_frames_are_bounded_in_bytes(engine_launcher: EngineLauncher, engine_store: Path,
                                             tmp_path: Path) -> None:
    bound = 16 << 20
    eng = _site_engine(engine_launcher, engine_store, tmp_path, "queued-bytes", max_frame_pixels=1024 * 1024,
                       max_queued_bytes=bound)
    try:
        frame = synthetic_frame((1024, 1024), "int32")  # 4 MiB a frame
        clients = [EngineClient(eng.data, window=3, timeout_s=120) for _ in range(8)]
        try:
            ids = [[c.submit(frame) for _ in range(3)] for c in clients]  # 96 MiB offered at once
            replies = [[c.receive() for _ in range(3)] for c in clients]
        finally:
            for c in clients:
                c.close()
        with ControlClient(eng.control, timeout_s=5) as ctl:
            status = ctl.status().result
    finally:
        engine_launcher.stop(eng)
    for sent, got in zip(ids, replies):
        assert sorted(r.frame_id for r in got) == sent  # every frame answered, once
    flat = [r for got in replies for r in got]
    assert any(r.ok for r in flat)
    refused = [r for r in flat if r.error_code == "dropped" and "bytes" in r.header.error.message]  # type: ignore[union-attr]
    assert refused, [r.header.error for r in flat if not r.ok]
    assert status["queue_bytes_bound"] == bound
    assert 0 < status["queue_bytes_high_water"] <= bound  # type: ignore[operator]


# --- 8: exported artefacts are verified at load ------------------------------------------------

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs onnx, onnxscript and onnxruntime (the onnx extra)")


@pytest.fixture(scope="module")
def onnx_store(tmp_path_factory: pytest.TempPathFactory, engine_store: Path) -> Path:
    """tiny:1 and tiny:2, each with a verified ONNX export recorded in its manifest (as `cdae export` leaves it)."""
    from cdae.deploy.export import export_package

    store = tmp_path_factory.mktemp("onnx-store") / "models"
    for v in ("1", "2"):
        shutil.copytree(engine_store / "tiny" / v, store / "tiny" / v)
    for v in ("1", "2"):
        export_package(store / "tiny" / v, "onnx", frames=1)
    shutil.copytree(store, store.parent / "pristine")  # for tests that need untampered exports
    return store


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _engine_cmd(store: Path, model: str) -> list[str]:
    return [sys.executable, "-m", "cdae.cli", "engine", "--bind", "tcp://127.0.0.1:0", "--models", str(store),
            "--model", model, "--backend", "onnxruntime", "--threads", "1"]


@needs_onnx
def test_tampered_onnx_export_is_refused_at_start_and_at_swap(engine_launcher: EngineLauncher,
                                                              onnx_store: Path) -> None:
    eng = engine_launcher.start("--models", str(onnx_store), "--model", "tiny:1", "--backend", "onnxruntime",
                                name="onnx")
    try:
        with ControlClient(eng.control, timeout_s=60) as ctl:
            assert str(ctl.status().result["backend_info"]["onnx"]).endswith("artefacts/tiny-1.onnx")  # type: ignore[index]
            _tamper(onnx_store / "tiny" / "2" / "artefacts" / "tiny-2.onnx")
            r = ctl.activate("tiny:2")
            assert not r.ok and "sha256" in (r.error or "") and "refusing to load" in (r.error or ""), r
            s = ctl.status().result
            assert s["model"] == "tiny:1" and s["activation"]["state"] == "failed"  # type: ignore[index]
        with EngineClient(eng.data) as c:
            assert c.denoise(synthetic_frame((32, 32), "uint16")).ok  # the old model keeps serving
    finally:
        engine_launcher.stop(eng)
    _tamper(onnx_store / "tiny" / "1" / "artefacts" / "tiny-1.onnx")
    out = subprocess.run(_engine_cmd(onnx_store, "tiny:1"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "cdae engine: error:" in out.stderr and "sha256" in out.stderr and "refusing to load" in out.stderr
    assert "tiny-1.onnx" in out.stderr and "ready" not in out.stdout and "Traceback" not in out.stderr


@needs_onnx
def test_unrecorded_or_failed_artefacts_are_refused(onnx_store: Path, tmp_path: Path) -> None:
    from cdae.engine.backends import ArtefactIntegrityError, read_verified_artefact
    from cdae.engine.package import read_manifest, write_manifest

    pkg = tmp_path / "tiny" / "1"
    shutil.copytree(onnx_store.parent / "pristine" / "tiny" / "2", pkg)
    manifest = read_manifest(pkg)
    onnx_file = pkg / "artefacts" / "tiny-2.onnx"
    assert read_verified_artefact(pkg, manifest, onnx_file, "onnx") == onnx_file.read_bytes()
    plan = pkg / "artefacts" / "some.plan"  # a TensorRT plan nobody recorded
    plan.write_bytes(b"plan")
    with pytest.raises(ArtefactIntegrityError, match="not recorded"):
        read_verified_artefact(pkg, manifest, plan, "tensorrt")
    failed = manifest.artefacts[0].model_copy(update={"parity": {"passed": False}})
    write_manifest(pkg, manifest.model_copy(update={"artefacts": [failed]}))
    with pytest.raises(ArtefactIntegrityError, match="parity"):
        read_verified_artefact(pkg, read_manifest(pkg), onnx_file, "onnx")


@needs_onnx
def test_tampered_cached_onnx_is_made_again(onnx_store: Path, tmp_path: Path) -> None:
    from cdae.engine.backends import load_backend
    from cdae.engine.config import BackendOptions

    pkg = tmp_path / "pkg"
    shutil.copytree(onnx_store.parent / "pristine" / "tiny" / "1", pkg, ignore=shutil.ignore_patterns("artefacts"))
    options = BackendOptions(artefact_dir=tmp_path / "cache")
    first = load_backend("onnxruntime", pkg, options).onnx_path
    good = first.read_bytes()
    _tamper(first)
    logged: list[str] = []
    again = load_backend("onnxruntime", pkg, options, log=logged.append).onnx_path
    assert again == first and again.read_bytes() == good  # exported afresh, not the changed file
    assert any("sha256" in m for m in logged), logged


# --- 11: extreme pixel values round-trip -------------------------------------------------------

def _extreme_frames() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(21)
    frames = []
    for dt in ("uint8", "uint16", "int16", "int32"):
        i = np.iinfo(dt)
        frames += [(f"{dt} max", np.full((48, 64), i.max, dt)), (f"{dt} min", np.full((48, 64), i.min, dt)),
                   (f"{dt} min/max", rng.choice([i.min, i.max], (48, 64)).astype(dt))]
        mixed = rng.integers(i.min, i.max, (48, 64), dtype=dt, endpoint=True)
        mixed[0, 0], mixed[1, 1] = i.max, i.min
        frames.append((f"{dt} full range", mixed))
    big = np.finfo(np.float32).max
    frames += [("float32 +3e38", np.full((48, 64), 3e38, np.float32)),
               ("float32 -3e38", np.full((48, 64), -3e38, np.float32)),
               ("float32 +-3e38", rng.choice([-3e38, 3e38], (48, 64)).astype(np.float32)),
               ("float32 +-max", rng.choice([-big, big], (48, 64)).astype(np.float32)),
               ("float32 uniform", rng.uniform(-3e38, 3e38, (48, 64)).astype(np.float32))]
    return frames


@pytest.mark.parametrize("guarded", [False, True])
def test_extreme_values_round_trip_through_a_real_engine(engine_launcher: EngineLauncher, guarded: bool) -> None:
    # passthrough (restored = network input) on the shipped model, whose normalisation looks for a
    # full well (the histogram that said "Too many bins"): unguarded, what comes back must be what went
    # in; guarded (the default), every frame is answered, finite, in its own dtype and range (a frame of
    # random extremes is all impulses to the guard, which replaces them)
    eng = engine_launcher.start("--models", str(REPO / "models"), "--model", "cdae-default:7",
                                "--backend", "passthrough", *([] if guarded else ["--no-guard"]), name="extremes")
    try:
        with EngineClient(eng.data, timeout_s=30) as c:
            for name, frame in _extreme_frames():
                r = c.denoise(frame)
                assert r.ok, (name, r.header.error)
                got = r.denoised
                assert got is not None and got.dtype == frame.dtype
                if guarded:
                    if frame.dtype.kind == "f":
                        assert np.isfinite(got).all(), name
                    lo, hi = float(frame.min()), float(frame.max())
                    # float32 inside, as below: int32 to 1024 DN, floats to 1e-6 of their span
                    slack = 1024 if frame.dtype == np.int32 else 1e-6 * (hi - lo) if frame.dtype.kind == "f" else 0
                    assert float(got.min()) >= lo - slack and float(got.max()) <= hi + slack, name
                    continue
                if frame.dtype.kind == "f":
                    assert np.isfinite(got).all(), name
                    # float32 steps of the frame's span (the network sees the frame scaled to it)
                    span = float(frame.max()) - float(frame.min())
                    np.testing.assert_allclose(got, frame, rtol=1e-6, atol=1e-6 * span, err_msg=name)
                else:  # float32 arithmetic inside: int32 to a few steps of its 24-bit mantissa (256 DN at 2^31)
                    tol = 1024 if frame.dtype == np.int32 else 0
                    d = np.abs(got.astype(np.int64) - frame.astype(np.int64))
                    assert d.max() <= tol, (name, d.max(), got.min(), got.max())
    finally:
        engine_launcher.stop(eng)


def test_to_dtype_clips_below_the_largest_value_float32_can_hold() -> None:
    from cdae.engine.normalise import to_dtype

    for dt in ("uint8", "uint16", "int16", "int32"):
        i = np.iinfo(dt)
        dn = np.array([-1e30, float(i.min), float(i.max), 1e30, np.inf, -np.inf], np.float32)
        got = to_dtype(dn, dt, float(i.max)).astype(np.int64)
        assert got[0] == got[1] == i.min or (dt.startswith("u") and got[0] == 0), (dt, got)
        assert got[2] >= i.max - 128 and got[3] == got[2] and got[4] == got[2] and got[5] == got[1], (dt, got)
    f = to_dtype(np.array([np.inf, -np.inf, 1.0], np.float32), "float32", np.inf)
    assert f.tolist() == [float(np.finfo(np.float32).max), float(np.finfo(np.float32).min), 1.0]


def test_activate_with_wait_is_answered_as_soon_as_the_swap_ends(engine: EngineProcess) -> None:
    # the IOC writes its Model PV on this reply: it must not trail the new model's first frames
    late = []
    with ControlClient(engine.control, timeout_s=60) as ctl:
        for ref in ("tiny:2", "tiny:1", "tiny:2", "tiny:1"):
            t0 = time.perf_counter()
            r = ctl.activate(ref, wait=True)
            elapsed = time.perf_counter() - t0
            assert r.ok, r.error
            late.append(elapsed - float(r.result["activation"]["seconds"]))  # type: ignore[index, arg-type]
    assert max(late) < 0.06, late


def test_a_residual_beyond_float32_saturates_instead_of_overflowing() -> None:
    from cdae.engine.normalise import F32_MAX
    from cdae.engine.residual import residual_of

    raw = np.array([[3e38, -3e38, 1.5, 1e30]], np.float32)
    den = np.array([[-3e38, 3e38, 0.25, -1e30]], np.float32)
    r = residual_of(raw, den)  # pytest turns numpy's overflow warning into an error: none may be raised
    assert r.dtype == np.float32 and np.isfinite(r).all()
    assert r[0, 0] == F32_MAX and r[0, 1] == -F32_MAX
    np.testing.assert_array_equal(r[0, 2:], np.subtract(raw[0, 2:], den[0, 2:], dtype=np.float32))
    ints = np.array([[0, 65535]], np.uint16)
    np.testing.assert_array_equal(residual_of(ints, ints[:, ::-1]), [[-65535.0, 65535.0]])
