"""Faults with real processes: engine killed and restarted, camera IOC restarted, sizes and types changing
mid-stream, size/data disagreement, bad writes to control PVs, model swap while frames stream."""

from __future__ import annotations

import threading

from caproto import AlarmSeverity, AlarmStatus

from ioc_helpers import READY, Stack, free_port, ca_read, ca_write, cdae, long_string_of, pause_and_settle, string_of, value_of, wait_for  # type: ignore[import-not-found]


def _counter(name: str) -> int:
    return int(value_of(name))  # type: ignore[arg-type]


def _advances(name: str, by: int = 3, timeout_s: float = 60.0) -> None:
    start = _counter(name)
    wait_for(lambda: _counter(name) >= start + by, timeout_s, f"{name} to advance by {by}")


def test_engine_killed_then_restarted(stack: Stack) -> None:
    data, control = free_port(), free_port()
    args = ("--control", f"tcp://127.0.0.1:{control}")
    eng = stack.engine(*args, bind=f"tcp://127.0.0.1:{data}")
    stack.camera(size="32x24", rate=10)
    stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") > 2, 60, "frames before the fault")
    eng.kill()
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 0, 30, "EngineConnected_RBV = Disconnected")
    md = ca_read(out + "ArrayData").metadata  # type: ignore[attr-defined]
    assert md.severity == AlarmSeverity.INVALID_ALARM and md.status == AlarmStatus.COMM
    assert ca_read(out + "EngineConnected_RBV").metadata.severity == AlarmSeverity.MAJOR_ALARM  # type: ignore[attr-defined]
    assert "engine down" in long_string_of(out + "Status_RBV")
    stuck = _counter(out + "ArrayCounter_RBV")
    eng.start(READY["engine"])  # the same command: the same ports
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 1, 60, "EngineConnected_RBV = Connected again")
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= stuck + 3, 60, "frames after recovery")
    assert ca_read(out + "ArrayData").metadata.severity == AlarmSeverity.NO_ALARM  # type: ignore[attr-defined]
    assert long_string_of(out + "Status_RBV") == "running"


def test_camera_ioc_restart_reconnects(stack: Stack) -> None:
    eng = stack.engine()
    cam = stack.camera(size="32x24", rate=10)
    stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") > 2, 60, "frames before the restart")
    cam.stop()
    wait_for(lambda: value_of(out + "SourceConnected_RBV") == 0, 60, "SourceConnected_RBV = Disconnected")
    before = _counter(out + "ArrayCounter_RBV")
    cam.start(READY["camera"])
    wait_for(lambda: value_of(out + "SourceConnected_RBV") == 1, 60, "SourceConnected_RBV = Connected again")
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= before + 3, 60, "frames from the restarted camera")
    # the restarted camera counts from 1 again, and the filter follows its ids
    assert _counter(out + "UniqueId_RBV") < before + 100


def test_size_and_type_change_mid_stream(stack: Stack) -> None:
    eng = stack.engine()
    stack.camera("--max-size", "64x48", size="32x24", rate=10)
    stack.ioc(eng)
    out, cam = stack.ioc_prefix, stack.camera_prefix
    wait_for(lambda: value_of(out + "ArraySize0_RBV") == 32, 60, "first size")
    ca_write(cam + "SizeX", 48)
    ca_write(cam + "SizeY", 40)
    wait_for(lambda: (value_of(out + "ArraySize0_RBV"), value_of(out + "ArraySize1_RBV")) == (48, 40), 60,
             "the filter to follow the new size")
    assert value_of(out + "ArraySize_RBV") == 48 * 40 * 2
    ca_write(cam + "DataType", 2)  # Int16: same DBR_SHORT element, another interpretation
    wait_for(lambda: value_of(out + "DataType_RBV") == 2, 60, "the filter to follow the new data type")
    _advances(out + "ArrayCounter_RBV")
    assert ca_read(out + "ArrayData").metadata.severity == AlarmSeverity.NO_ALARM  # type: ignore[attr-defined]


def test_plain_waveform_source_and_size_disagreement(stack: Stack) -> None:
    eng = stack.engine()
    stack.camera(size="32x24", rate=10)
    saved = stack.camera_prefix
    stack.camera_prefix = saved + "ArrayData"  # --source is the waveform's full name
    out = stack.ioc_prefix
    try:
        # a plain waveform with a size that does not fit its data: every frame is an error, nothing crashes
        bad = stack.ioc(eng, "--width", "64", "--height", "64", "--data-type", "UInt16")
        wait_for(lambda: _counter(out + "FrameErrors_RBV") >= 3, 60, "frame errors")
        assert "4096 pixels" in long_string_of(out + "LastError_RBV")
        assert _counter(out + "ArrayCounter_RBV") == 0 and bad.proc is not None and bad.proc.poll() is None
        bad.stop()
        stack.children.remove(bad)
        stack.ioc(eng, "--width", "32", "--height", "24", "--data-type", "UInt16")
    finally:
        stack.camera_prefix = saved
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= 3, 60, "frames from a plain waveform")
    assert value_of(out + "DataType_RBV") == 3 and value_of(out + "ArraySize0_RBV") == 32


def _write_refused(name: str, value: object) -> None:
    """Put without waiting (as a plain caput does; a put-notify gets ECA_PUTFAIL back, see
    test_hardening.py), then see the refusal: the value is unchanged and the PV carries a WRITE alarm."""
    from ioc_helpers import _pv  # type: ignore[import-not-found]

    before = ca_read(name).data  # type: ignore[attr-defined]
    _pv(name).write(value if isinstance(value, (list, tuple)) else [value], wait=False)  # type: ignore[attr-defined]
    wait_for(lambda: ca_read(name).metadata.status == AlarmStatus.WRITE, 30, f"a WRITE alarm on {name}")  # type: ignore[attr-defined]
    assert list(ca_read(name).data) == list(before), name  # type: ignore[attr-defined]


def test_bad_writes_are_refused_with_an_alarm(stack: Stack) -> None:
    eng = stack.engine()
    stack.camera(size="32x24", rate=5)
    stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 1, 60, "engine connected")
    wait_for(lambda: "tiny:2" in long_string_of(out + "Models_RBV"), 30, "the model list")
    for pv, value in (("Model", "no colon"), ("Model", "tiny:9"), ("QueueSize", 0), ("QueueSize", 1000),
                      ("DroppedArrays", 5), ("NDArrayAddress", 3)):
        _write_refused(out + pv, value)
        assert ca_read(out + pv).metadata.severity >= AlarmSeverity.MINOR_ALARM, pv  # type: ignore[attr-defined]
        assert value_of(out + "EngineConnected_RBV") == 1  # the IOC is still serving
    assert string_of(out + "Model") == ""
    assert "tiny:9" in long_string_of(out + "LastError_RBV")
    ca_write(out + "QueueSize", 3)
    assert value_of(out + "QueueSize_RBV") == 3
    ca_write(out + "EnableCallbacks", 0)
    assert value_of(out + "EnableCallbacks_RBV") == 0
    frozen = _counter(out + "ArrayCounter_RBV")
    wait_for(lambda: _counter(stack.camera_prefix + "ArrayCounter_RBV") > frozen + 5, 30, "camera frames")
    assert _counter(out + "ArrayCounter_RBV") <= frozen + 2  # at most what was in flight
    ca_write(out + "EnableCallbacks", 1)
    _advances(out + "ArrayCounter_RBV")


def test_model_swap_while_streaming(stack: Stack) -> None:
    from caproto.threading.client import Context

    eng = stack.engine(model="tiny:1")
    stack.camera(size="32x24", rate=8)
    stack.ioc(eng)
    out, cam = stack.ioc_prefix, stack.camera_prefix
    wait_for(lambda: string_of(out + "Model_RBV") == "tiny:1", 60, "frames from tiny:1")
    dropped = _counter(out + "DroppedArrays_RBV")  # frames that came before the engine was connected
    ctx = Context()
    seen: list[int] = []
    models: list[tuple[str, float]] = []
    lock = threading.Lock()
    try:
        uid_pv, model_pv = ctx.get_pvs(out + "UniqueId_RBV", out + "Model_RBV", timeout=10)
        uid_pv.wait_for_connection(timeout=10)
        model_pv.wait_for_connection(timeout=10)

        def on_uid(sub: object, r: object) -> None:
            with lock:
                seen.append(int(r.data[0]))  # type: ignore[attr-defined]

        def on_model(sub: object, r: object) -> None:
            models.append((bytes(r.data[0]).decode(), r.metadata.timestamp))  # type: ignore[attr-defined]

        s1 = uid_pv.subscribe(data_type="time")
        s1.add_callback(on_uid)
        s2 = model_pv.subscribe(data_type="time")
        s2.add_callback(on_model)
        wait_for(lambda: len(seen) >= 4, 30, "ids before the swap")
        ca_write(out + "Model", "tiny:2", timeout=120)
        wait_for(lambda: string_of(out + "Model_RBV") == "tiny:2", 60, "frames from tiny:2")
        wait_for(lambda: len(seen) >= 12, 60, "ids after the swap")
        last = pause_and_settle(stack)
        s1.clear()
        s2.clear()
    finally:
        ctx.disconnect()
    with lock:
        ids = sorted(set(seen))
    assert ids == list(range(ids[0], ids[-1] + 1)), f"lost frames around the swap: {ids}"
    assert _counter(out + "DroppedArrays_RBV") == dropped
    assert [m for m, _ in models][-2:] == ["tiny:1", "tiny:2"]
    assert string_of(out + "Model") == "tiny:2"


def test_ioc_bad_config_file_is_a_one_line_error(tmp_path) -> None:  # noqa: ANN001
    import subprocess

    cfg = tmp_path / "ioc.toml"
    cfg.write_text('source = "X:"\nprefix = "Y:"\nqueue_size = 0\n')
    r = subprocess.run(cdae("ioc", "--config", str(cfg)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "queue_size" in r.stderr and "Traceback" not in r.stderr


def test_model_given_at_start_is_activated(stack: Stack) -> None:
    eng = stack.engine(model="tiny:1")
    stack.camera(size="32x24", rate=5)
    stack.ioc(eng, "--model", "tiny:2")
    out = stack.ioc_prefix
    wait_for(lambda: string_of(out + "Model_RBV") == "tiny:2", 60, "frames from the model asked for at start")
    assert string_of(out + "Model") == "tiny:2"


def test_bad_pixel_map_is_filled_live_and_changed_at_run_time(stack: Stack, tmp_path) -> None:  # noqa: ANN001
    """The camera's NDPluginBadPixel file at start; BadPixelFile swaps or drops it while frames stream;
    a broken file is refused with an alarm and the map in use is kept."""
    w = 32
    first = tmp_path / "cam-badpixels.json"
    first.write_text('{"Bad pixels": [{"Pixel": [3, 2], "Set": 7}, {"Pixel": [10, 5], "Set": 9}]}')
    second = tmp_path / "cam-badpixels-2.json"
    second.write_text('{"Bad pixels": [{"Pixel": [4, 4], "Set": 11}, {"Pixel": [500, 4], "Set": 11}]}')  # one off-frame
    broken = tmp_path / "broken.json"
    broken.write_text('{"Bad pixels": [{"Pixel": [4]}]}')
    cfg = tmp_path / "ioc.toml"
    cfg.write_text(f'bad_pixel_dir = "{tmp_path}"\n')  # BadPixelFile may name files here only
    eng = stack.engine()
    stack.camera(size="32x24", rate=5)
    stack.ioc(eng, "--bad-pixel-file", str(first), "--config", str(cfg))
    out = stack.ioc_prefix

    def pixel(pv: str, x: int, y: int) -> int:
        return int(value_of(out + pv)[y * w + x])  # type: ignore[index]

    def put_path(text: str, wait: bool = True) -> None:
        """A path longer than DBR_STRING's 40 characters goes whole as CHAR through ``.VAL$``."""
        from caproto import ChannelType
        from ioc_helpers import _pv  # type: ignore[import-not-found]

        _pv(out + "BadPixelFile.VAL$").write(list(text.encode()) + [0], wait=wait, timeout=10,  # type: ignore[attr-defined]
                                             data_type=ChannelType.CHAR)

    wait_for(lambda: value_of(out + "BadPixelCount_RBV") == 2, 60, "the map loaded at start")
    assert long_string_of(out + "BadPixelFile") == str(first)
    _advances(out + "ArrayCounter_RBV")
    assert pixel("ArrayData", 3, 2) == 7 and pixel("ArrayData", 10, 5) == 9
    assert pixel("DefectMap:ArrayData", 3, 2) == 1  # the guard's flag class: the camera's bad-pixel map

    put_path(str(broken), wait=False)  # refused (a put-notify would get ECA_PUTFAIL back)
    wait_for(lambda: ca_read(out + "BadPixelFile").metadata.status == AlarmStatus.WRITE, 30, "a WRITE alarm")  # type: ignore[attr-defined]
    assert long_string_of(out + "BadPixelFile") == str(first)
    assert "entry 0: Pixel" in long_string_of(out + "LastError_RBV")
    assert value_of(out + "BadPixelCount_RBV") == 2
    _advances(out + "ArrayCounter_RBV")
    assert pixel("ArrayData", 3, 2) == 7  # the map in use is kept

    put_path(str(second))
    assert value_of(out + "BadPixelCount_RBV") == 2
    _advances(out + "ArrayCounter_RBV")
    assert pixel("ArrayData", 4, 4) == 11
    wait_for(lambda: "1 of 2 listed pixels lie outside the 32x24 frame" in long_string_of(out + "LastError_RBV"),
             30, "the off-frame pixel reported")
    put_path("")
    assert value_of(out + "BadPixelCount_RBV") == 0
    _advances(out + "ArrayCounter_RBV")
    assert pixel("ArrayData", 4, 4) != 11 or pixel("DefectMap:ArrayData", 4, 4) != 1


def test_bad_pixel_map_survives_an_engine_restart(stack: Stack, tmp_path) -> None:  # noqa: ANN001
    """The engine fills the map (ExecutionTime_RBV includes it); a restarted engine holds no map, and
    the IOC sends it again before frames flow, so the fill never silently stops."""
    w = 32
    path = tmp_path / "cam-badpixels.json"
    path.write_text('{"Bad pixels": [{"Pixel": [3, 2], "Set": 7}, {"Pixel": [10, 5], "Set": 9}]}')
    data, control = free_port(), free_port()
    eng = stack.engine("--control", f"tcp://127.0.0.1:{control}", bind=f"tcp://127.0.0.1:{data}")
    stack.camera(size="32x24", rate=10)
    stack.ioc(eng, "--bad-pixel-file", str(path))
    out = stack.ioc_prefix

    def pixel(x: int, y: int) -> int:
        return int(value_of(out + "ArrayData")[y * w + x])  # type: ignore[index]

    wait_for(lambda: value_of(out + "BadPixelCount_RBV") == 2, 60, "the map loaded at start")
    _advances(out + "ArrayCounter_RBV")
    assert pixel(3, 2) == 7 and pixel(10, 5) == 9
    eng.kill()
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 0, 30, "EngineConnected_RBV = Disconnected")
    eng.start(READY["engine"])
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 1, 60, "EngineConnected_RBV = Connected again")
    _advances(out + "ArrayCounter_RBV")
    assert pixel(3, 2) == 7 and pixel(10, 5) == 9
    assert "bad-pixel map" in eng.output()  # the engine logged the map it was given


def test_guarding_engine_publishes_flag_classes_and_counts(stack: Stack) -> None:
    """With the guard (the engine's default), DefectMap:ArrayData carries each pixel's flag class (0 none, 1 bad-pixel
    map, 2 saturated, 3 impulse, 4 learned) and the per-frame counts are PVs; the simulated camera's hot
    pixels and radiation hits are impulses."""
    eng = stack.engine("--guard")
    stack.camera("--seed", "1", size="128x96", rate=5)  # camera 1: hot pixels and radiation hits
    stack.ioc(eng)
    out = stack.ioc_prefix
    _advances(out + "ArrayCounter_RBV")
    wait_for(lambda: _counter(out + "ImpulsePixels_RBV") > 0, 30, "impulses flagged")
    flags = value_of(out + "DefectMap:ArrayData")[: 128 * 96]  # type: ignore[index]
    assert set(int(v) for v in flags) <= {0, 1, 2, 3, 4} and 3 in set(int(v) for v in flags)
    wait_for(lambda: _counter(out + "FlaggedPixels_RBV") >= _counter(out + "ImpulsePixels_RBV")
             + _counter(out + "SaturatedPixels_RBV"), 30, "the classes' counts within the total (one frame's PVs)")
    assert 0 < _counter(out + "FlaggedPixels_RBV") < 128 * 96 // 10
