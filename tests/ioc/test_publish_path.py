"""The publish path (issue 18): the denoised frame goes out first, the residual is the IOC's own raw − denoised
(computed while monitored, or on a read), DefectMap asks the engine for one map only, and CA reads are large."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from ioc_helpers import Stack, ca_read, pause_and_settle, value_of, wait_for  # type: ignore[import-not-found]

W, H = 64, 48


def _u16(data: object) -> np.ndarray:
    """DBR_SHORT elements reinterpreted as UInt16 (DataType_RBV), as a (H, W) frame."""
    return np.asarray(data)[: W * H].astype(np.int16).astype(np.uint16).reshape(H, W)


def test_denoised_first_then_residual_raw_minus_denoised_monitored_or_read(stack: Stack, tmp_path: Path) -> None:
    import epics

    bad = tmp_path / "cam-badpixels.json"
    bad.write_text('{"Bad pixels": [{"Pixel": [3, 2], "Set": 7}]}')  # filled: the residual moves there
    eng = stack.engine()
    stack.camera(size=f"{W}x{H}", rate=10)
    stack.ioc(eng, "--bad-pixel-file", str(bad))
    out, cam = stack.ioc_prefix, stack.camera_prefix
    wait_for(lambda: value_of(out + "BadPixelCount_RBV") == 1, 60, "the bad-pixel map loaded")
    order: list[tuple[str, float]] = []  # (PV, timestamp) in arrival order: one client, one circuit to the IOC
    frames: dict[tuple[str, float], np.ndarray] = {}
    lock = threading.Lock()

    def callback(name: str):  # noqa: ANN202
        def cb(value: np.ndarray, timestamp: float, **kw: object) -> None:
            with lock:
                order.append((name, round(timestamp, 6)))
                frames[(name, round(timestamp, 6))] = np.array(value)
        return cb

    names = {"raw": cam + "ArrayData", "den": out + "ArrayData", "res": out + "Residual:ArrayData",
             "map": out + "DefectMap:ArrayData"}
    pvs = [epics.PV(pv, auto_monitor=True, form="time", callback=callback(k)) for k, pv in names.items()]
    try:
        for pv in pvs:
            assert pv.wait_for_connection(timeout=30), pv.pvname
        wait_for(lambda: sum(1 for n, _ in order if n == "res") >= 10, 60, "10 monitored residuals")
    finally:
        for pv in pvs:
            pv.clear_callbacks()
            pv.disconnect()
    with lock:
        seen, got = list(order), dict(frames)
    ioc = [(n, ts) for n, ts in seen[4:] if n != "raw"]  # past the subscriptions' first (current) values
    checked = 0
    for ts in {ts for n, ts in ioc if n == "res"}:
        at = [n for n, t in ioc if t == ts]
        if "den" in at:  # the denoised frame's monitor left before the residual's and the defect map's
            assert at.index("den") < at.index("res"), (ts, at)
            if "map" in at:
                assert at.index("den") < at.index("map"), (ts, at)
        if ("raw", ts) in got and ("den", ts) in got:  # a monitored residual is that frame's raw - denoised
            raw, den = _u16(got[("raw", ts)]), _u16(got[("den", ts)])
            res = np.asarray(got[("res", ts)])[: W * H].reshape(H, W)
            np.testing.assert_array_equal(res, np.subtract(raw, den, dtype=np.float32))
            assert res[2, 3] == float(raw[2, 3]) - 7.0  # the fill moved the residual
            checked += 1
    assert checked >= 5, checked
    # no monitor on the residual any more: frames go on, and a read gets the last frame's residual
    first = int(value_of(out + "ArrayCounter_RBV"))  # type: ignore[arg-type]
    wait_for(lambda: int(value_of(out + "ArrayCounter_RBV")) >= first + 5, 60, "5 frames with no monitor")  # type: ignore[arg-type]
    last = pause_and_settle(stack)
    raw_r, den_r, res_r = ca_read(cam + "ArrayData"), ca_read(out + "ArrayData"), ca_read(out + "Residual:ArrayData")
    assert int(value_of(out + "Residual:UniqueId_RBV")) == last  # type: ignore[arg-type]
    assert res_r.metadata.timestamp == raw_r.metadata.timestamp == den_r.metadata.timestamp  # type: ignore[attr-defined]
    raw, den = _u16(raw_r.data), _u16(den_r.data)  # type: ignore[attr-defined]
    res = np.asarray(res_r.data)[: W * H].reshape(H, W)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(res, np.subtract(raw, den, dtype=np.float32))
    assert res[2, 3] == float(raw[2, 3]) - 7.0
    assert int(value_of(out + "FrameErrors_RBV")) == 0  # type: ignore[arg-type]


def test_unguarded_engine_still_gets_the_defect_map_asked_for(stack: Stack, tmp_path: Path) -> None:
    """The IOC asks a guarding engine for its flags only and an unguarded one for the probability only (from the
    engine's status): unguarded, a listed pixel is 255 in DefectMap; guarded, class 1."""
    bad = tmp_path / "cam-badpixels.json"
    bad.write_text('{"Bad pixels": [{"Pixel": [3, 2], "Set": 7}]}')
    for engine_args, at_listed in ((("--no-guard",), 255), ((), 1)):
        s = Stack(stack.store)
        try:
            eng = s.engine(*engine_args)
            s.camera(size=f"{W}x{H}", rate=10)
            s.ioc(eng, "--bad-pixel-file", str(bad))
            out = s.ioc_prefix
            wait_for(lambda: int(value_of(out + "ArrayCounter_RBV")) >= 5, 60, "5 frames")  # type: ignore[arg-type]
            dm = np.asarray(ca_read(out + "DefectMap:ArrayData").data)[: W * H].reshape(H, W)  # type: ignore[attr-defined]
            assert int(dm[2, 3]) == at_listed, engine_args
            assert int(value_of(out + "FrameErrors_RBV")) == 0  # type: ignore[arg-type]
        finally:
            s.stop_all()


def test_ca_reads_take_what_the_socket_holds() -> None:
    """caproto's asyncio circuits read 4096 bytes at a time; the IOC's source makes them read up to 4 MiB."""
    from caproto.asyncio.utils import _TransportWrapper

    from cdae.ioc.source import CA_RECV_BYTES, large_ca_reads

    large_ca_reads()
    large_ca_reads()  # once per process, however often called
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def main() -> list[int]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(payload)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.2)  # let the bytes arrive
        t = _TransportWrapper(reader, writer)
        sizes, got = [], b""
        while len(got) < len(payload):
            chunk = await t.recv()
            assert chunk
            sizes.append(len(chunk))
            got += chunk
        writer.close()
        server.close()
        assert got == payload
        return sizes

    sizes = asyncio.run(main())
    assert max(sizes) > 4096 and len(sizes) < len(payload) // 4096 // 4, sizes
    assert CA_RECV_BYTES >= 1 << 20


def test_a_caproto_without_the_reads_internal_keeps_its_own_reads(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The large reads reach into caproto; where that internal is gone the source says so and goes on."""
    from caproto.asyncio import utils

    from cdae.ioc import source

    monkeypatch.delattr(utils, "_TransportWrapper")
    monkeypatch.delattr(source.large_ca_reads, "warned", raising=False)
    with caplog.at_level("WARNING", logger="cdae.ioc.source"):
        assert source.large_ca_reads() is False
        assert source.large_ca_reads() is False
    assert sum("_TransportWrapper" in r.getMessage() for r in caplog.records) == 1


def test_without_caprotos_subscription_record_the_residual_is_made_every_frame() -> None:
    """has_subscribers reads caproto's ChannelData._queues; a caproto without it makes the value each frame."""
    from cdae.ioc.pvs import has_subscribers

    class Bare:
        pass

    class Watched:
        _queues = {"q": {None: {"type": {"spec"}}}}

    class Left:
        _queues = {"q": {None: {"type": set()}}}

    assert has_subscribers(Bare()) and has_subscribers(Watched()) and not has_subscribers(Left())
