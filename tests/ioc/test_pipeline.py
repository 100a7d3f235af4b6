"""Camera → engine → filter IOC, read by the clients that must work unchanged: pyepics, caproto, ophyd, ophyd-async."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ioc_helpers import CA_ENV, Stack, ca_read, ca_write, pause_and_settle, string_of, value_of, wait_for  # type: ignore[import-not-found]

UINT16 = 3  # DataType_RBV index (ADCore order)


def test_pyepics_monitor_ids_times_shapes(stack: Stack) -> None:
    import epics

    eng = stack.engine()
    stack.camera(size="64x48", rate=10)
    stack.ioc(eng)
    out, cam = stack.ioc_prefix, stack.camera_prefix
    got: list[tuple[float, np.ndarray]] = []
    ids: dict[float, int] = {}
    raw_ids: dict[float, int] = {}
    lock = threading.Lock()

    def on_data(value: np.ndarray, timestamp: float, **kw: object) -> None:
        with lock:
            got.append((round(timestamp, 6), np.array(value)))

    def on_uid(value: int, timestamp: float, **kw: object) -> None:
        ids[round(timestamp, 6)] = int(value)

    def on_raw_uid(value: int, timestamp: float, **kw: object) -> None:
        raw_ids[round(timestamp, 6)] = int(value)

    pvs = [epics.PV(out + "ArrayData", auto_monitor=True, form="time", callback=on_data),
           epics.PV(out + "UniqueId_RBV", auto_monitor=True, form="time", callback=on_uid),
           epics.PV(cam + "UniqueId_RBV", auto_monitor=True, form="time", callback=on_raw_uid)]
    try:
        for pv in pvs:
            assert pv.wait_for_connection(timeout=30), pv.pvname
        wait_for(lambda: len(got) >= 8, 60, "8 denoised frames over pyepics")
        assert pvs[0].type == "time_short"  # UInt16 served as DBR_SHORT, like the camera's
        assert epics.caget(out + "DataType_RBV") == UINT16 and epics.caget(out + "NDimensions_RBV") == 2
        w, h = epics.caget(out + "ArraySize0_RBV"), epics.caget(out + "ArraySize1_RBV")
        assert (w, h) == (64, 48) and epics.caget(out + "ArraySize2_RBV") == 0
        assert epics.caget(out + "ArraySize_RBV") == 64 * 48 * 2
        with lock:
            frames = list(got)
        matched = 0
        for ts, data in frames[1:]:
            frame = data[: w * h].astype(np.uint16).reshape(h, w)  # reinterpret DBR_SHORT by DataType_RBV
            assert frame.shape == (48, 64) and frame.dtype == np.uint16
            if ts in ids and ts in raw_ids:  # the denoised frame carries the raw frame's id and time
                assert ids[ts] == raw_ids[ts]
                matched += 1
        assert matched >= 5, (matched, len(frames))
    finally:
        for pv in pvs:
            pv.clear_callbacks()
            pv.disconnect()
    last = pause_and_settle(stack)
    for name in ("UniqueId_RBV", "TimeStamp_RBV", "EpicsTSSec_RBV", "EpicsTSNsec_RBV"):
        assert value_of(out + name) == value_of(cam + name), name
    raw, den = ca_read(cam + "ArrayData"), ca_read(out + "ArrayData")
    assert den.metadata.timestamp == pytest.approx(raw.metadata.timestamp, abs=1e-6)  # type: ignore[attr-defined]
    for name in ("ArraySize0_RBV", "UniqueId_RBV", "TimeStamp_RBV", "Residual:ArrayData", "Residual:UniqueId_RBV"):
        assert ca_read(out + name).metadata.timestamp == pytest.approx(raw.metadata.timestamp, abs=1e-6), name  # type: ignore[attr-defined]
    assert int(value_of(out + "Residual:UniqueId_RBV")) == last  # type: ignore[arg-type]
    # the residual is raw - denoised, float32, with its own size and type PVs
    assert value_of(out + "Residual:DataType_RBV") == 8 and value_of(out + "Residual:ArraySize0_RBV") == 64
    res = np.asarray(ca_read(out + "Residual:ArrayData").data[: 64 * 48], np.float64)  # type: ignore[attr-defined]
    rawf = np.asarray(raw.data[: 64 * 48]).astype(np.uint16).astype(np.float64)  # type: ignore[attr-defined]
    denf = np.asarray(den.data[: 64 * 48]).astype(np.uint16).astype(np.float64)  # type: ignore[attr-defined]
    np.testing.assert_allclose(res, rawf - denf, atol=1e-3)
    assert string_of(out + "Model_RBV") == "tiny:1" and value_of(out + "EngineConnected_RBV") == 1
    assert value_of(out + "ArrayRate_RBV") > 0 and value_of(out + "Latency_RBV") > 0
    assert int(value_of(out + "FrameErrors_RBV")) == 0  # type: ignore[arg-type]


def test_caproto_client_monitor(stack: Stack) -> None:
    from caproto.threading.client import Context

    eng = stack.engine()
    stack.camera(size="40x32", rate=10, *("--data-type", "UInt8"))
    stack.ioc(eng)
    out = stack.ioc_prefix
    ctx = Context()
    try:
        arr, uid = ctx.get_pvs(out + "ArrayData", out + "UniqueId_RBV", timeout=10)
        arr.wait_for_connection(timeout=30)
        seen: list[tuple[np.ndarray, float]] = []

        def cb(sub: object, response: object) -> None:
            seen.append((np.array(response.data), response.metadata.timestamp))  # type: ignore[attr-defined]

        sub = arr.subscribe(data_type="time", data_count=0)
        sub.add_callback(cb)
        wait_for(lambda: len(seen) >= 5, 60, "5 frames over a caproto subscription")
        assert arr.channel.native_data_type == 4  # DBR_CHAR: UInt8 in, UInt8 out
        assert value_of(out + "DataType_RBV") == 1
        data, ts = seen[-1]
        assert data.dtype == np.uint8 and data.size == 40 * 32
        assert ts > time.time() - 60
        sub.clear()
    finally:
        ctx.disconnect()


def test_ophyd_image_plugin(stack: Stack) -> None:
    pytest.importorskip("ophyd")
    from ophyd.areadetector.plugins import ImagePlugin

    eng = stack.engine()
    stack.camera(size="32x24", rate=10)
    stack.ioc(eng)
    wait_for(lambda: int(value_of(stack.ioc_prefix + "ArrayCounter_RBV")) > 2, 60, "frames")  # type: ignore[arg-type]
    ip = ImagePlugin(stack.ioc_prefix, name="cdae")
    for sig in (ip.array_data, ip.unique_id, ip.plugin_type, ip.array_size.width, ip.array_size.height):
        sig.wait_for_connection(timeout=30)
    assert ip.plugin_type.get().startswith("NDPluginStdArrays")
    assert ip.array_size.get() == (0, 24, 32)  # (depth, height, width)
    assert ip.unique_id.get() > 0
    data = np.asarray(ip.array_data.get())
    assert data.size >= 32 * 24
    ip.destroy()


OPHYD_ASYNC_CHECK = """
import asyncio
from ophyd_async.core import init_devices
from ophyd_async.epics.adcore import NDPluginBaseIO

async def main(prefix):
    async with init_devices(connect=True, timeout=30):
        plugin = NDPluginBaseIO(prefix)
    print("enable", (await plugin.enable_callbacks.get_value()).value)
    print("uid", await plugin.unique_id.get_value())
    print("dtype", (await plugin.data_type.get_value()).value)
    print("port", await plugin.nd_array_port.get_value())
    print("size", await plugin.array_size0.get_value(), await plugin.array_size1.get_value())

import sys
asyncio.run(main(sys.argv[1]))
"""


def test_ophyd_async_nd_plugin_base_connects(stack: Stack) -> None:
    pytest.importorskip("ophyd_async")
    pytest.importorskip("aioca")
    eng = stack.engine()
    stack.camera(size="32x24", rate=10)
    stack.ioc(eng)
    wait_for(lambda: int(value_of(stack.ioc_prefix + "ArrayCounter_RBV")) > 1, 60, "frames")  # type: ignore[arg-type]
    # its own process: aioca brings its own libca, which should not share a process with pyepics'
    r = subprocess.run([sys.executable, "-c", OPHYD_ASYNC_CHECK, stack.ioc_prefix], capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, **CA_ENV})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "enable Enable" in r.stdout and "dtype UInt16" in r.stdout and "size 32 24" in r.stdout
    assert f"port {stack.camera_prefix}" in r.stdout


def _default_model_store() -> Path | None:
    root = Path(__file__).resolve().parents[2] / "models"
    return root if (root / "cdae-default").is_dir() else None


def test_denoised_frames_are_closer_to_the_truth(stack: Stack) -> None:
    store = _default_model_store()
    if store is None:
        pytest.skip("no shipped model models/cdae-default (an untrained network cannot denoise)")
    stack.store = store
    eng = stack.engine(model="cdae-default")
    stack.camera(size="128x96", rate=4)
    stack.ioc(eng, "--bit-depth", "12")
    out, cam = stack.ioc_prefix, stack.camera_prefix
    wait_for(lambda: int(value_of(out + "ArrayCounter_RBV")) >= 2, 90, "denoised frames")  # type: ignore[arg-type]
    last = pause_and_settle(stack)
    assert int(value_of(cam + "Clean:UniqueId_RBV")) == last  # type: ignore[arg-type]
    n = 128 * 96
    clean = np.asarray(ca_read(cam + "Clean:ArrayData").data[:n], np.float64)  # type: ignore[attr-defined]
    raw = np.asarray(ca_read(cam + "ArrayData").data[:n]).astype(np.uint16).astype(np.float64)  # type: ignore[attr-defined]
    den = np.asarray(ca_read(out + "ArrayData").data[:n]).astype(np.uint16).astype(np.float64)  # type: ignore[attr-defined]
    rmse_raw = float(np.sqrt(np.mean((raw - clean) ** 2)))
    rmse_den = float(np.sqrt(np.mean((den - clean) ** 2)))
    assert rmse_den < rmse_raw, (rmse_den, rmse_raw)
