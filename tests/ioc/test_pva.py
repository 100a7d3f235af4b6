"""PV Access beside CA: the filter's NTNDArray images read by p4p and pvapy, a PVA camera as the source, bad PVA input.

Real processes on loopback (ioc_helpers.PVA_ENV: searches to 127.0.0.1 only, each server on its own port).
p4p and pvapy run in child processes (pva_child.py, and a pvapy script here): this process loads no PVA library.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from caproto import AlarmSeverity, AlarmStatus

from ioc_helpers import (  # type: ignore[import-not-found]
    CAMERA_PVA_PORT,
    IOC_PVA_PORT,
    READY,
    Stack,
    ca_read,
    ca_write,
    long_string_of,
    pva_server_env,
    string_of,
    value_of,
    wait_for,
)

from cdae.ioc.frames import EPICS_EPOCH_OFFSET_S, FrameError, FrameInfo, NDDataType
from cdae.ioc.pva import frame_from_ntndarray, ntndarray_fields, pva_channel
from pva_child import pixels_sha1  # type: ignore[import-not-found]

if importlib.util.find_spec("p4p") is None:  # found, not imported (see the docstring)
    pytest.skip("p4p is not installed (pip install 'cdae[pva]')", allow_module_level=True)
CHILD = str(Path(__file__).with_name("pva_child.py"))

W, H = 64, 48


def _counter(name: str) -> int:
    return int(value_of(name))  # type: ignore[arg-type]


def _mapping(fields: dict) -> dict:
    """NTNDArray fields as the nested mappings frame_from_ntndarray also reads (``value``: the union's array)."""
    return {**fields, "value": fields["value"][1]} if "value" in fields else fields


def _ca_stamp(response: object) -> tuple[int, int]:
    """A CA monitor update's timestamp as NTNDArray's timeStamp: POSIX (seconds, nanoseconds)."""
    st = response.metadata.stamp  # type: ignore[attr-defined]
    return int(st.secondsSinceEpoch) + EPICS_EPOCH_OFFSET_S, int(st.nanoSeconds)


class PvaMonitor:
    """A p4p monitor of one NTNDArray channel in a child: every update's ids, times, attributes, dimensions, pixels' sha1."""

    def __init__(self, name: str) -> None:
        self.frames: list[dict] = []
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, CHILD, "monitor", name], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            f = json.loads(line)
            f["ts"], f["dts"] = tuple(f["ts"]), tuple(f["dts"])
            with self.lock:
                self.frames.append(f)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.frames)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def pva_get(*names: str) -> list[dict]:
    r = subprocess.run([sys.executable, CHILD, "get", *names], capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_ntndarray_fields_round_trip_and_refusals() -> None:
    """NDPluginPva's filling, read back as the source reads a camera's; what a source refuses, and why."""
    info = FrameInfo(unique_id=7, stamp=(1_100_000_000, 123_456_789), data_type=NDDataType.UInt16, color_mode=0)
    for dt, arr in ((NDDataType.UInt8, np.arange(12, dtype=np.uint8)), (NDDataType.Int16, -np.arange(12, dtype=np.int16)),
                    (NDDataType.UInt16, np.arange(12, dtype=np.uint16) * 5000), (NDDataType.Int32, np.arange(12, dtype=np.int32)),
                    (NDDataType.Float32, np.linspace(-1, 1, 12, dtype=np.float32)), (NDDataType.Float64, np.arange(12.0))):
        v = _mapping(ntndarray_fields(arr.reshape(3, 4), dt, info, {"CdaeModel": "tiny:1", "FlaggedPixels": 2}))
        assert [d["size"] for d in v["dimension"]] == [4, 3] and v["codec"]["parameters"] == int(dt)  # type: ignore[index]
        assert v["compressedSize"] == v["uncompressedSize"] == arr.nbytes  # type: ignore[index]
        assert v["timeStamp"]["secondsPastEpoch"] == 1_100_000_000 + EPICS_EPOCH_OFFSET_S  # type: ignore[index]
        frame, back = frame_from_ntndarray(v)
        assert frame.dtype == arr.dtype and frame.shape == (3, 4) and np.array_equal(frame.reshape(-1), arr)
        assert (back.unique_id, back.stamp, back.data_stamp, back.data_type) == (7, info.stamp, info.stamp, dt)
    good = ntndarray_fields(np.zeros((3, 4), np.uint16), NDDataType.UInt16, info)
    bad = {
        "dimension 4 x 3 = 12 pixels, but value has 5": {**good, "value": ("ushortValue", np.zeros(5, np.uint16))},
        "3 dimensions": {**good, "dimension": good["dimension"] + good["dimension"][:1]},  # type: ignore[operator]
        "colour frames": {**good, "attribute": [{"name": "ColorMode", "value": 2}]},
        "compressed": {**good, "codec": {"name": "lz4", "parameters": 3}},
        "empty NTNDArray": {**good, "value": (None, None)},
        "no areaDetector data type": {**good, "value": ("booleanValue", np.zeros(12, bool))},
    }
    for why, fields in bad.items():
        with pytest.raises(FrameError, match=why):
            frame_from_ntndarray(_mapping(fields))
    assert pva_channel("pva://13SIM1:Pva1:") == "13SIM1:Pva1:Image"
    assert pva_channel("pva://13SIM1:Pva1:Image") == "13SIM1:Pva1:Image"
    with pytest.raises(Exception, match="pva://CHANNEL"):
        pva_channel("pva://")


PVAPY_MONITOR = """
import hashlib, sys, time, pvaccess
got = []
ch = pvaccess.Channel(sys.argv[1], pvaccess.PVA)
def on(pv):
    member = pv['value'][0]  # the value union: {member name: array}
    if member:
        (name, arr), = member.items()
        ts = pv['timeStamp']
        sha1 = hashlib.sha1(arr.astype(arr.dtype.newbyteorder('<')).tobytes()).hexdigest()
        got.append((pv['uniqueId'], ts['secondsPastEpoch'], ts['nanoseconds'], name, sha1, len(arr),
                    [d['size'] for d in pv['dimension']]))
ch.monitor(on, 'field()')
deadline = time.time() + float(sys.argv[2])
while len(got) < int(sys.argv[3]) and time.time() < deadline:
    time.sleep(0.05)
ch.stopMonitor()
for g in got:
    print(*g[:6], 'x'.join(map(str, g[6])))
"""


def test_pva_output_matches_ca_for_p4p_and_pvapy_through_a_model_swap(stack: Stack) -> None:
    """NDPluginPva's fields on the filter's Pva1:Image: uniqueId and both timestamps the raw frame's, pixels the
    CA ArrayData's (frame by frame, through a hot swap: the two outputs stay in step), attributes present;
    pvapy's monitor (what c2dataviewer uses) sees the same frames."""
    if importlib.util.find_spec("pvaccess") is None:
        pytest.skip("pvapy is not installed")
    from caproto.threading.client import Context

    eng = stack.engine(model="tiny:1")
    stack.camera(size=f"{W}x{H}", rate=8)
    ioc = stack.ioc(eng, "--pva")
    assert ioc.match is not None and "pva=off" not in ioc.match.string
    out, cam = stack.ioc_prefix, stack.camera_prefix
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= 2, 60, "denoised frames")
    # pvAccessCPP (pvapy) searches only the first of several 127.0.0.1:PORT entries: give it the IOC's alone
    pvapy = subprocess.Popen([sys.executable, "-c", PVAPY_MONITOR, out + "Pva1:Image", "40", "6"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "EPICS_PVA_ADDR_LIST": f"127.0.0.1:{IOC_PVA_PORT}"})
    image = PvaMonitor(out + "Pva1:Image")
    ca_frames: dict[tuple[int, int], np.ndarray] = {}  # by CA timestamp (POSIX sec, nsec), exact
    raw_ids: dict[tuple[int, int], int] = {}
    ctx = Context()
    try:
        arr, raw_uid = ctx.get_pvs(out + "ArrayData", cam + "UniqueId_RBV", timeout=10)
        arr.wait_for_connection(timeout=30)
        raw_uid.wait_for_connection(timeout=30)

        def on_ca(sub: object, r: object) -> None:
            ca_frames[_ca_stamp(r)] = np.array(r.data)  # type: ignore[attr-defined]

        def on_raw_uid(sub: object, r: object) -> None:
            raw_ids[_ca_stamp(r)] = int(r.data[0])  # type: ignore[attr-defined]

        subs = [arr.subscribe(data_type="time", data_count=0), raw_uid.subscribe(data_type="time")]
        subs[0].add_callback(on_ca)  # caproto holds callbacks weakly: these live as long as the test
        subs[1].add_callback(on_raw_uid)
        wait_for(lambda: len(ca_frames) >= 4 and len(image.snapshot()) >= 6, 60, "frames over p4p and CA")
        ca_write(out + "Model", "tiny:2")
        wait_for(lambda: sum(f["attrs"]["CdaeModel"] == "tiny:2" for f in image.snapshot()) >= 5, 60,
                 "5 frames of tiny:2 over PVA")
        ca_write(cam + "Acquire", 0)
        last = _counter(cam + "UniqueId_RBV")
        wait_for(lambda: image.snapshot()[-1]["uid"] == last, 30, f"frame {last} over PVA")
        for s in subs:
            s.clear()
        got, err = pvapy.communicate(timeout=60)
    finally:
        image.close()
        ctx.disconnect()
        if pvapy.poll() is None:
            pvapy.kill()
            pvapy.communicate()
    frames = image.snapshot()[1:]  # the first update is the channel's current value
    matched: list[str] = []
    for f in frames:
        assert f["dims"] == [[W, 0, 1, False], [H, 0, 1, False]]
        assert f["dtype"] == "uint16" and f["n"] == W * H  # ushortValue, not a signed CA short
        assert f["codec"] == ["", int(NDDataType.UInt16)] and f["sizes"] == [W * H * 2, W * H * 2]
        assert f["dts"] == f["ts"] and f["attrs"]["ColorMode"] == 0 and f["severity"] == 0
        ts = f["ts"]
        if ts in raw_ids and ts in ca_frames:  # the same raw frame, the same pixels over both protocols
            assert f["uid"] == raw_ids[ts]
            assert pixels_sha1(ca_frames[ts][: W * H].astype(np.uint16)) == f["sha1"], f["uid"]
            matched.append(f["attrs"]["CdaeModel"])
    assert len(matched) >= 6 and set(matched) == {"tiny:1", "tiny:2"}, (matched, len(frames))
    models = [f["attrs"]["CdaeModel"] for f in frames]
    swap = models.index("tiny:2")
    assert set(models[:swap]) == {"tiny:1"} and set(models[swap:]) == {"tiny:2"}, models  # one switch, in step
    assert string_of(out + "Model_RBV") == "tiny:2"
    # the last frame: ids and times exactly the camera's, residual and defect map beside it
    assert frames[-1]["uid"] == last == _counter(out + "UniqueId_RBV")
    assert frames[-1]["ts"] == (_counter(cam + "EpicsTSSec_RBV") + EPICS_EPOCH_OFFSET_S, _counter(cam + "EpicsTSNsec_RBV"))
    res, dm = pva_get(out + "Pva1:Residual", out + "Pva1:DefectMap")
    assert res["uid"] == dm["uid"] == last and tuple(res["ts"]) == frames[-1]["ts"]
    assert res["dtype"] == "float32" and dm["dtype"] == "uint8"
    ca_res = np.asarray(ca_read(out + "Residual:ArrayData").data[: W * H], np.float32)  # type: ignore[attr-defined]
    assert pixels_sha1(ca_res) == res["sha1"]
    assert set(res["attrs"]) >= {"ColorMode", "CdaeModel"}
    assert pvapy.returncode == 0, err
    by_uid = {f["uid"]: f for f in frames}
    seen = [line.split() for line in got.splitlines()]
    assert len(seen) >= 5, got + err
    for uid, sec, nsec, member, sha1, n, dims in seen[1:]:
        assert member == "ushortValue" and int(n) == W * H and dims == f"{W}x{H}"
        if int(uid) in by_uid:
            f = by_uid[int(uid)]
            assert (int(sec), int(nsec)) == f["ts"] and sha1 == f["sha1"]


def test_pva_camera_source_end_to_end_and_reconnect(stack: Stack) -> None:
    """``--source pva://CAM Pva1:``: the camera's NTNDArray in, its ids and both timestamps out over CA and PVA;
    the camera gone is an alarm, and the IOC finds it again."""
    eng = stack.engine()
    cam = stack.camera("--pva", size="32x24", rate=8)
    stack.ioc(eng, "--pva", source=f"pva://{stack.camera_prefix}Pva1:")
    out = stack.ioc_prefix
    raw = PvaMonitor(stack.camera_prefix + "Pva1:Image")
    den = PvaMonitor(out + "Pva1:Image")
    try:
        wait_for(lambda: len(den.snapshot()) >= 5, 60, "denoised frames from a PVA camera")
        assert value_of(out + "DataType_RBV") == int(NDDataType.UInt16) and value_of(out + "ArraySize0_RBV") == 32
        assert value_of(out + "SourceConnected_RBV") == 1 and string_of(out + "NDArrayPort_RBV").startswith("pva://")
        by_uid = {f["uid"]: f for f in raw.snapshot()}
        matched = [f for f in den.snapshot()[1:] if f["uid"] in by_uid]
        assert len(matched) >= 3
        for f in matched:
            assert (f["ts"], f["dts"]) == (by_uid[f["uid"]]["ts"], by_uid[f["uid"]]["dts"])
        ca_write(stack.camera_prefix + "Acquire", 0)
        last = _counter(stack.camera_prefix + "UniqueId_RBV")
        wait_for(lambda: _counter(out + "UniqueId_RBV") == last, 30, f"frame {last} over CA")
        wait_for(lambda: den.snapshot()[-1]["uid"] == last, 30, f"frame {last} over PVA")
        ca_pixels = np.asarray(ca_read(out + "ArrayData").data[: 32 * 24]).astype(np.uint16)  # type: ignore[attr-defined]
        assert pixels_sha1(ca_pixels) == den.snapshot()[-1]["sha1"]
        assert _counter(out + "FrameErrors_RBV") <= 1  # at most the camera's empty channel before its first frame
        cam.stop()
        wait_for(lambda: value_of(out + "SourceConnected_RBV") == 0, 60, "SourceConnected_RBV = Disconnected")
        assert ca_read(out + "SourceConnected_RBV").metadata.severity == AlarmSeverity.MAJOR_ALARM  # type: ignore[attr-defined]
        before = _counter(out + "ArrayCounter_RBV")
        cam.start(READY["camera"])
        wait_for(lambda: value_of(out + "SourceConnected_RBV") == 1, 60, "SourceConnected_RBV = Connected again")
        wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= before + 3, 60, "frames from the restarted camera")
    finally:
        raw.close()
        den.close()


def test_bad_pva_camera_frames_are_alarmed_counted_and_the_ioc_keeps_serving(stack: Stack) -> None:
    """A PVA camera (a p4p server: pva_child.py camera) sends frames of the wrong size, colour, type and a codec:
    each is an error with a reason and a READ alarm on the images; the next good frame clears it."""
    name = stack.camera_prefix + "Pva1:Image"
    cam = subprocess.Popen([sys.executable, CHILD, "camera", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, env={**os.environ, **pva_server_env(CAMERA_PVA_PORT)})
    assert cam.stdin is not None and cam.stdout is not None

    def say(cmd: str) -> None:
        cam.stdin.write(cmd + "\n")  # type: ignore[union-attr]
        cam.stdin.flush()  # type: ignore[union-attr]
        assert cam.stdout.readline().split() == ["ok", cmd.split()[0]]  # type: ignore[union-attr]

    try:
        assert cam.stdout.readline().strip() == "ready"
        eng = stack.engine()
        ioc = stack.ioc(eng, source=f"pva://{name}")
        out = stack.ioc_prefix
        wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= 2, 60, "frames from the p4p camera")
        say("pause")
        for kind, why in (("size", "but value has 5 elements"), ("colour", "colour frames"),
                          ("type", "travels as float32"), ("codec", "compressed")):
            errors = _counter(out + "FrameErrors_RBV")
            say(f"bad {kind}")
            wait_for(lambda: _counter(out + "FrameErrors_RBV") == errors + 1, 30, f"a frame error: {why}")
            assert why in long_string_of(out + "LastError_RBV")
            md = ca_read(out + "ArrayData").metadata  # type: ignore[attr-defined]
            assert (md.status, md.severity) == (AlarmStatus.READ, AlarmSeverity.MAJOR_ALARM), why
        assert ioc.proc is not None and ioc.proc.poll() is None
        assert any("travels as float32" in line for line in ioc.lines)  # and said in the log
        published = _counter(out + "ArrayCounter_RBV")
        say("resume")
        wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= published + 2, 30, "good frames again")
        assert ca_read(out + "ArrayData").metadata.severity == AlarmSeverity.NO_ALARM  # type: ignore[attr-defined]
    finally:
        cam.stdin.close()
        try:
            cam.wait(10)
        except subprocess.TimeoutExpired:
            cam.kill()
            cam.wait(5)
        cam.stdout.close()


NO_P4P = "import sys; sys.modules['p4p'] = None; from cdae.cli import main; sys.exit(main(sys.argv[1:]))"


def test_without_p4p_the_cli_says_which_extra_to_install() -> None:
    for args in (["ioc", "--source", "S:", "--prefix", "P:", "--pva"], ["ioc", "--source", "pva://S:Pva1:", "--prefix", "P:"],
                 ["sim-camera", "--pva"]):
        r = subprocess.run([sys.executable, "-c", NO_P4P, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "pip install 'cdae[pva]'" in r.stderr, (args, r.stderr)
    # and the tests' own process never loaded a PVA library (p4p and pvapy ran in children)
    assert "p4p" not in sys.modules and "pvaccess" not in sys.modules
