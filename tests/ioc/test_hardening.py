"""Issue 21, the IOC half: untrusted PV writes, frames that do not fit, stale alarms, books that balance.

Real processes on loopback (engine, simulated camera, filter IOC), driven with the clients users run.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from caproto import AlarmSeverity, AlarmStatus, ChannelType

from cdae.ioc.files import FileRefused, read_named_file, read_regular_file, resolve_under
from ioc_helpers import Stack, _pv, ca_read, long_string_of, value_of, wait_for  # type: ignore[import-not-found]

GOOD_MAP = '{"Bad pixels": [{"Pixel": [3, 2], "Set": 7}]}'


def _counter(name: str) -> int:
    return int(value_of(name))  # type: ignore[arg-type]


def _put_long(name: str, text: str, wait: bool = True, timeout: float = 10.0) -> object:
    """A long string goes whole as CHAR through ``.VAL$``; with ``wait`` the put-notify reply comes back."""
    return _pv(name + ".VAL$").write(list(text.encode()) + [0], wait=wait, timeout=timeout,  # type: ignore[attr-defined]
                                     data_type=ChannelType.CHAR)


# --- the file rules, no processes -----------------------------------------------------------------

def test_named_files_must_be_regular_files_under_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "maps"
    folder.mkdir()
    (folder / "cam.json").write_text(GOOD_MAP)
    (folder / "escape").symlink_to("/etc/passwd")
    (folder / "sub").mkdir()
    os.mkfifo(folder / "fifo")
    real, data = read_named_file(folder, "cam.json")
    assert data == GOOD_MAP.encode() and real == (folder / "cam.json").resolve()
    assert read_named_file(folder, str(folder / "cam.json"))[1] == GOOD_MAP.encode()
    outside = {"/etc/passwd", "/etc/no-such-file", "../maps/../../etc/passwd", "escape", "/dev/zero", str(folder)}
    messages = set()
    for name in outside:
        with pytest.raises(FileRefused, match="is not a file under bad_pixel_dir") as e:
            resolve_under(folder, name)
        messages.add(str(e.value).replace(repr(name), "NAME"))
    assert len(messages) == 1  # exists or not: the same words
    t0 = time.monotonic()
    with pytest.raises(FileRefused, match="not a regular file"):
        read_named_file(folder, "fifo")  # no writer: a blocking open would hang here
    with pytest.raises(FileRefused, match="not a regular file"):
        read_named_file(folder, "sub")
    assert time.monotonic() - t0 < 1.0
    big = folder / "big.json"
    with big.open("wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB that costs no disk
    with pytest.raises(FileRefused, match="more than the 1024 bytes allowed"):
        read_regular_file(big, max_bytes=1024)
    with pytest.raises(FileRefused, match="no bad_pixel_dir"):
        resolve_under(None, "cam.json")


# --- defect 6: BadPixelFile over CA -------------------------------------------------------------

def test_bad_pixel_file_reads_only_regular_files_under_its_folder(stack: Stack, tmp_path: Path) -> None:
    folder = tmp_path / "maps"
    folder.mkdir()
    (folder / "cam.json").write_text(GOOD_MAP)
    (folder / "secret.json").write_text('{"Bad pixels": ["s3cr3t-token"]}')
    (folder / "escape.json").symlink_to("/etc/passwd")
    os.mkfifo(folder / "fifo.json")
    with (folder / "huge.json").open("wb") as f:
        f.truncate(1 << 30)
    cfg = tmp_path / "ioc.toml"
    cfg.write_text(f'bad_pixel_dir = "{folder}"\n')
    eng = stack.engine()
    stack.camera(size="32x24", rate=5)
    stack.ioc(eng, "--config", str(cfg))
    out = stack.ioc_prefix
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 1, 60, "engine connected")
    refused = {
        "/etc/passwd": "is not a file under bad_pixel_dir",
        "/etc/no-such-file": "is not a file under bad_pixel_dir",
        str(folder / "escape.json"): "is not a file under bad_pixel_dir",
        "/dev/zero": "is not a file under bad_pixel_dir",
        "huge.json": "bytes allowed",
        "secret.json": "entry 0: expected an object, got a string",
    }
    for _ in range(8):  # more FIFOs than the old executor had threads
        refused_fifo = _put_long(out + "BadPixelFile", "fifo.json", timeout=5)
        assert refused_fifo.status.name == "ECA_PUTFAIL"  # type: ignore[attr-defined]
        assert "not a regular file" in long_string_of(out + "LastError_RBV")
    for name, why in refused.items():
        reply = _put_long(out + "BadPixelFile", name, timeout=5)
        assert reply.status.name == "ECA_PUTFAIL", name  # type: ignore[attr-defined]
        error = long_string_of(out + "LastError_RBV")
        assert why in error, (name, error)
        assert "s3cr3t" not in error and "root:" not in error
        assert ca_read(out + "BadPixelFile").metadata.status == AlarmStatus.WRITE  # type: ignore[attr-defined]
        assert value_of(out + "BadPixelCount_RBV") == 0
    reply = _put_long(out + "BadPixelFile", "cam.json", timeout=5)
    assert reply.status.name == "ECA_NORMAL"  # type: ignore[attr-defined]
    assert value_of(out + "BadPixelCount_RBV") == 1
    md = ca_read(out + "BadPixelFile").metadata  # type: ignore[attr-defined]
    assert (md.status, md.severity) == (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)  # a good write clears the alarm
    ioc = stack.children[-1]
    assert ioc.stop() == 0  # SIGINT still stops it, promptly


# --- defects 12 and 5: refusals reach the client; a later good write clears the alarm -----------

def test_refused_writes_answer_putfail_and_a_good_write_clears_the_alarm(stack: Stack) -> None:
    eng = stack.engine()
    stack.camera(size="32x24", rate=5)
    stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: "tiny:2" in long_string_of(out + "Models_RBV"), 60, "the model list")
    for pv, bad, good in (("QueueSize", 0, 3), ("Model", "tiny:9", "tiny:2"), ("DroppedArrays", 5, 0)):
        reply = _pv(out + pv).write([bad], wait=True, timeout=10)  # type: ignore[attr-defined]
        assert reply.status.name == "ECA_PUTFAIL", pv  # type: ignore[attr-defined]
        md = ca_read(out + pv).metadata  # type: ignore[attr-defined]
        assert (md.status, md.severity) == (AlarmStatus.WRITE, AlarmSeverity.MAJOR_ALARM), pv
        reply = _pv(out + pv).write([good], wait=True, timeout=120)  # type: ignore[attr-defined]
        assert reply.status.name == "ECA_NORMAL", pv  # type: ignore[attr-defined]
        md = ca_read(out + pv).metadata  # type: ignore[attr-defined]
        assert (md.status, md.severity) == (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM), pv
    wait_for(lambda: value_of(out + "Model_RBV") == "tiny:2", 60, "frames from the model written")


# --- defect 4: a frame larger than ArrayData ---------------------------------------------------

def test_a_frame_larger_than_array_data_is_refused_counted_and_alarmed(stack: Stack) -> None:
    eng = stack.engine()
    cam = stack.camera_prefix
    stack.camera("--max-size", "64x48", size="32x24", rate=10)
    stack.ioc(eng, "--max-elements", "1000")  # 32x24 = 768 fits, 48x40 = 1920 does not
    out = stack.ioc_prefix
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= 3, 60, "frames that fit")
    _pv(cam + "SizeX").write([48], wait=True, timeout=30)  # type: ignore[attr-defined]
    _pv(cam + "SizeY").write([40], wait=True, timeout=30)  # type: ignore[attr-defined]
    wait_for(lambda: _counter(out + "FrameErrors_RBV") >= 5, 60, "oversized frames counted")
    assert "48x40 = 1920 pixels, more than the 1000 elements of ArrayData" in long_string_of(out + "LastError_RBV")
    md = ca_read(out + "ArrayData").metadata  # type: ignore[attr-defined]
    assert (md.status, md.severity) == (AlarmStatus.HWLIMIT, AlarmSeverity.MAJOR_ALARM)
    _pv(cam + "SizeX").write([32], wait=True, timeout=30)  # type: ignore[attr-defined]
    _pv(cam + "SizeY").write([24], wait=True, timeout=30)  # type: ignore[attr-defined]
    published = _counter(out + "ArrayCounter_RBV")
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= published + 5, 60, "frames again, the IOC still serving")
    md = ca_read(out + "ArrayData").metadata  # type: ignore[attr-defined]
    assert (md.status, md.severity) == (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)
    assert value_of(out + "ArraySize0_RBV") == 32


# --- defect 5: status and errors that stay readable and true -----------------------------------

def test_last_error_with_non_ascii_stays_readable_and_status_follows_the_camera(stack: Stack, tmp_path: Path) -> None:
    import shutil

    from ioc_helpers import READY  # type: ignore[import-not-found]

    store = tmp_path / "models"
    shutil.copytree(stack.store, store)
    weights = store / "tiny" / "2" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")  # the engine's refusal quotes its sha256 with "…"
    stack.store = store
    eng = stack.engine()
    cam = stack.camera(size="32x24", rate=5)
    stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: "tiny:2" in long_string_of(out + "Models_RBV"), 60, "the model list")
    reply = _pv(out + "Model").write([b"tiny:2"], wait=True, timeout=60)  # type: ignore[attr-defined]
    assert reply.status.name == "ECA_PUTFAIL"  # type: ignore[attr-defined]
    error = long_string_of(out + "LastError_RBV")  # timed out before: "…" could not be encoded
    assert "does not match the manifest" in error and "..." in error, error
    assert ca_read(out + "LastError_RBV").data[0].startswith(b"Model: the engine refused")  # type: ignore[attr-defined]
    cam.stop()
    wait_for(lambda: "disconnected" in long_string_of(out + "Status_RBV"), 60, "Status_RBV: source disconnected")
    cam.start(READY["camera"])
    wait_for(lambda: value_of(out + "SourceConnected_RBV") == 1, 60, "the camera back")
    wait_for(lambda: long_string_of(out + "Status_RBV") == "running", 30, "Status_RBV: running again")


# --- defects 2 and 3: every frame accounted for ----------------------------------------------------

def test_books_balance_by_cause_and_source_gaps_follow_unique_ids() -> None:
    from cdae.ioc.frames import FrameBooks

    b = FrameBooks()
    for uid in (5, 6, 9, 10, 10, 2, 3, 7):  # 7, 8 missed; a repeat; the camera restarted at 2; 4..6 missed
        b.see(uid)
        b.received += 1
    assert b.source_gaps == 2 + 3
    b.published += 4
    b.drop("replaced")
    b.drop("engine_lost", 2)
    b.errors += 1
    assert (b.dropped, b.pending) == (3, 0)
    assert b.causes_text() == "replaced=1 engine_queue=0 overtaken=0 engine_lost=2 disabled=0"
    with pytest.raises(ValueError, match="unknown drop cause"):
        b.drop("lost")


def _quiet_books(out: str) -> dict[str, int]:
    """The IOC's counters once they stop moving (the camera stopped, nothing in flight)."""
    names = ("FramesReceived_RBV", "ArrayCounter_RBV", "DroppedArrays_RBV", "FrameErrors_RBV", "SourceGaps_RBV")
    last: list[dict[str, int]] = []

    def settled() -> dict[str, int] | None:
        now = {n: _counter(out + n) for n in names}
        ok = bool(last) and last[-1] == now
        last.append(now)
        return now if ok else None

    return wait_for(settled, 30, "the counters to settle", poll_s=1.0)  # type: ignore[return-value]


def test_frames_cancelled_by_an_engine_kill_are_counted(stack: Stack) -> None:
    from ioc_helpers import READY, free_port  # type: ignore[import-not-found]

    data, control = free_port(), free_port()
    eng = stack.engine("--control", f"tcp://127.0.0.1:{control}", bind=f"tcp://127.0.0.1:{data}")
    cam = stack.camera_prefix
    stack.camera(size="32x24", rate=20)
    stack.ioc(eng, "--queue-size", "4")
    out = stack.ioc_prefix
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") > 10, 60, "frames before the kill")
    eng.kill()
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 0, 30, "the engine declared lost")
    eng.start(READY["engine"])
    published = _counter(out + "ArrayCounter_RBV")
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") > published + 10, 60, "frames after the restart")
    _pv(cam + "Acquire").write([0], wait=True, timeout=10)  # type: ignore[attr-defined]
    books = _quiet_books(out)
    lost = books["FramesReceived_RBV"] - books["ArrayCounter_RBV"] - books["DroppedArrays_RBV"] - books["FrameErrors_RBV"]
    causes = long_string_of(out + "DropCauses_RBV")
    print(f"engine kill: {books} {causes}")
    assert lost == 0, (books, causes)
    assert "engine_lost=0" not in causes, causes  # the frames out when it died are among the drops


def test_frames_the_camera_made_but_the_ioc_never_saw_are_source_gaps(stack: Stack) -> None:
    import signal

    eng = stack.engine("--backend", "passthrough")
    cam = stack.camera_prefix
    stack.camera("--stopped", size="512x512", rate=40)
    ioc = stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 1, 60, "engine connected")
    _pv(cam + "Acquire").write([1], wait=True, timeout=10)  # type: ignore[attr-defined]
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") > 5, 60, "frames")
    assert ioc.proc is not None
    ioc.proc.send_signal(signal.SIGSTOP)  # an IOC that cannot keep up: the camera's server drops its updates
    time.sleep(3)
    ioc.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: _counter(out + "SourceGaps_RBV") > 0, 30, "source gaps counted")
    _pv(cam + "Acquire").write([0], wait=True, timeout=10)  # type: ignore[attr-defined]
    books = _quiet_books(out)
    made = _counter(cam + "UniqueId_RBV") + 1  # + the empty frame on the PV when the IOC connected (UniqueId 0)
    print(f"source gaps: camera made {made}, {books}")
    assert _counter(out + "UniqueId_RBV") == made - 1
    assert books["FramesReceived_RBV"] + books["SourceGaps_RBV"] == made, books
    assert (books["FramesReceived_RBV"] == books["ArrayCounter_RBV"] + books["DroppedArrays_RBV"]
            + books["FrameErrors_RBV"]), books


def test_counters_post_a_monitor_only_when_they_change(stack: Stack) -> None:
    from caproto.threading.client import Context

    eng = stack.engine()
    stack.camera(size="32x24", rate=20)
    stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") > 5, 60, "frames")
    ctx = Context()
    updates: dict[str, int] = {}
    try:
        pvs = ctx.get_pvs(out + "FrameErrors_RBV", out + "SourceGaps_RBV", out + "FramesReceived_RBV", timeout=10)
        subs, callbacks = [], []  # caproto holds callbacks weakly: keep them
        for pv in pvs:
            pv.wait_for_connection(timeout=10)
            updates[pv.name] = 0

            def count(sub: object, r: object, name: str = pv.name) -> None:
                updates[name] += 1

            callbacks.append(count)
            sub = pv.subscribe(data_type="time")
            sub.add_callback(count)
            subs.append(sub)
        start = _counter(out + "FramesReceived_RBV")
        time.sleep(3)
        received = _counter(out + "FramesReceived_RBV") - start
        for sub in subs:
            sub.clear()
    finally:
        ctx.disconnect()
    print(f"monitors in 3 s: {updates}, frames received {received}")
    assert received >= 30
    assert updates[out + "FrameErrors_RBV"] == 1 and updates[out + "SourceGaps_RBV"] == 1  # the first value only
    assert updates[out + "FramesReceived_RBV"] <= received + 2  # one per frame, not two


def test_books_balance_over_three_swaps(stack: Stack) -> None:
    eng = stack.engine(model="tiny:1")
    cam = stack.camera_prefix
    stack.camera(size="64x48", rate=20)
    stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: value_of(out + "Model_RBV") == "tiny:1", 60, "frames from tiny:1")
    for ref in ("tiny:2", "tiny:1", "tiny:2"):
        reply = _pv(out + "Model").write([ref.encode()], wait=True, timeout=120)  # type: ignore[attr-defined]
        assert reply.status.name == "ECA_NORMAL"  # type: ignore[attr-defined]
        wait_for(lambda: value_of(out + "Model_RBV") == ref, 60, f"frames from {ref}")  # noqa: B023
        published = _counter(out + "ArrayCounter_RBV")
        wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= published + 20, 60, "frames streaming")  # noqa: B023
    _pv(cam + "Acquire").write([0], wait=True, timeout=10)  # type: ignore[attr-defined]
    books = _quiet_books(out)
    causes = long_string_of(out + "DropCauses_RBV")
    print(f"three swaps: {books} {causes}")
    assert (books["FramesReceived_RBV"] == books["ArrayCounter_RBV"] + books["DroppedArrays_RBV"]
            + books["FrameErrors_RBV"]), (books, causes)
    assert value_of(out + "EngineConnected_RBV") == 1


# --- defect 10: an engine restart does not undo the operator's model choice -------------------

def test_a_restart_after_a_short_life_is_seen() -> None:
    """The IOC knows the engine restarted by its instance id, not only by an uptime that went back: an engine
    killed after 3 s and seen again at 5 s of its new life has restarted (the uptime rule alone missed it, and
    the operator's model was not activated again). An engine without an instance (Triton) keeps the uptime rule."""
    from cdae.ioc.filter import EngineLife

    old = EngineLife.of({"instance": "a" * 32, "uptime_s": 3.0})
    assert EngineLife.of({"instance": "b" * 32, "uptime_s": 5.0}).follows_a_restart(old)
    assert not EngineLife.of({"instance": "a" * 32, "uptime_s": 5.0}).follows_a_restart(old)
    assert not EngineLife.of({"instance": "b" * 32, "uptime_s": 5.0}).follows_a_restart(None)
    triton = EngineLife.of({"uptime_s": 9.0})
    assert EngineLife.of({"uptime_s": 1.0}).follows_a_restart(triton)
    assert not EngineLife.of({"uptime_s": 10.0}).follows_a_restart(triton)
    assert EngineLife.of({"instance": 7, "uptime_s": "x"}) == EngineLife(None, None)


def test_engine_restart_gets_the_operators_model_again(stack: Stack, tmp_path: Path) -> None:
    import shutil

    from ioc_helpers import READY, free_port  # type: ignore[import-not-found]

    shutil.copytree(stack.store, tmp_path / "models")
    stack.store = tmp_path / "models"
    data, control = free_port(), free_port()
    eng = stack.engine("--control", f"tcp://127.0.0.1:{control}", bind=f"tcp://127.0.0.1:{data}", model="tiny:1")
    stack.camera(size="32x24", rate=10)
    stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: "tiny:2" in long_string_of(out + "Models_RBV"), 60, "the model list")
    reply = _pv(out + "Model").write([b"tiny:2"], wait=True, timeout=120)  # type: ignore[attr-defined]
    assert reply.status.name == "ECA_NORMAL"  # type: ignore[attr-defined]
    wait_for(lambda: value_of(out + "Model_RBV") == "tiny:2", 60, "frames from tiny:2")
    for stop in (eng.kill, eng.stop):  # a crash, seen as engine down; then a clean restart
        stop()
        eng.start(READY["engine"])  # serves its default, tiny:1, again
        wait_for(lambda: value_of(out + "EngineConnected_RBV") == 1, 60, "the engine back")
        published = _counter(out + "ArrayCounter_RBV")
        wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= published + 5, 60, "frames again")  # noqa: B023
        wait_for(lambda: value_of(out + "Model_RBV") == "tiny:2", 60, "the operator's tiny:2 again")
        assert value_of(out + "Model") == "tiny:2"
        assert ca_read(out + "Model").metadata.severity == AlarmSeverity.NO_ALARM  # type: ignore[attr-defined]
    shutil.rmtree(stack.store / "tiny" / "2")  # the engine comes back without the operator's model: an alarm
    eng.stop()
    eng.start(READY["engine"])
    wait_for(lambda: ca_read(out + "Model").metadata.severity == AlarmSeverity.MAJOR_ALARM, 60, "Model in alarm")  # type: ignore[attr-defined]
    assert ca_read(out + "Model").metadata.status == AlarmStatus.STATE  # type: ignore[attr-defined]
    assert "could not activate tiny:2" in long_string_of(out + "LastError_RBV")
    # Model_RBV names the model of the last published frame: the first frame from tiny:1 may follow the alarm
    wait_for(lambda: value_of(out + "Model_RBV") == "tiny:1", 60, "frames from tiny:1")


# --- defect 7: maps whose fill would cost without bound are refused; dead blocks are bounded ---------

def test_bad_pixel_maps_too_costly_or_too_large_are_refused_and_dead_blocks_bounded(stack: Stack,
                                                                                      tmp_path: Path) -> None:
    import json

    folder = tmp_path / "maps"
    folder.mkdir()
    (folder / "huge-box.json").write_text(json.dumps(
        {"Bad pixels": [{"Pixel": [i, 5], "Median": [4000, 4000]} for i in range(200)]}))
    (folder / "other-camera.json").write_text(json.dumps(
        {"Bad pixels": [{"Pixel": [i % 64, i // 64], "Set": 1} for i in range(2000)]}))  # > 32x24 = 768 pixels
    (folder / "dead-block.json").write_text(json.dumps(
        {"Bad pixels": [{"Pixel": [x, y], "Median": [1, 1]} for y in range(24) for x in range(20)]}))
    cfg = tmp_path / "ioc.toml"
    cfg.write_text(f'bad_pixel_dir = "{folder}"\n')
    eng = stack.engine()
    stack.camera(size="32x24", rate=10)
    stack.ioc(eng, "--config", str(cfg))
    out = stack.ioc_prefix
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= 3, 60, "frames")
    for name, why in (("huge-box.json", "Median half-widths at most 16"),
                      ("other-camera.json", "2000 entries, more than the 768 pixels of a frame")):
        reply = _put_long(out + "BadPixelFile", name)
        assert reply.status.name == "ECA_PUTFAIL", name  # type: ignore[attr-defined]
        assert why in long_string_of(out + "LastError_RBV")
    reply = _put_long(out + "BadPixelFile", "dead-block.json")  # columns 0..19 dead, the first good one is x = 20
    assert reply.status.name == "ECA_NORMAL"  # type: ignore[attr-defined]
    wait_for(lambda: "have no good pixel within 16 px" in long_string_of(out + "LastError_RBV"), 30,
             "the unfilled pixels reported")
    assert "96 listed pixels" in long_string_of(out + "LastError_RBV")  # x = 0..3 (17..20 px away) x 24 rows
    published = _counter(out + "ArrayCounter_RBV")
    wait_for(lambda: _counter(out + "ArrayCounter_RBV") >= published + 5, 30, "frames keep coming")
    assert _counter(out + "FrameErrors_RBV") == 0


# --- the interfaces the IOC serves on ------------------------------------------------------------

def test_the_ioc_says_which_interfaces_it_serves_and_the_site_example_sets_them(stack: Stack) -> None:
    from cdae.deploy.site import load_site

    example = Path(__file__).resolve().parents[2] / "deploy" / "site.example.toml"
    assert load_site(example).epics.environment().get("EPICS_CAS_INTF_ADDR_LIST") == "127.0.0.1"
    eng = stack.engine()
    stack.camera(size="32x24", rate=5)
    ioc = stack.ioc(eng)
    assert any("serving Channel Access on 127.0.0.1" in line for line in ioc.lines), ioc.output()
    ioc.stop()
    stack.children.remove(ioc)
    ioc = stack.ioc(eng, env={"EPICS_CAS_INTF_ADDR_LIST": ""})
    assert any("warning: serving Channel Access on every interface" in line for line in ioc.lines), ioc.output()


# --- defect 2 (IOC half): a control channel busy during a swap is not an engine lost ----------------

class _ControlRelay:
    """A ZeroMQ relay between the IOC and the engine's control channel (REQ <-> ROUTER | DEALER <-> REP)
    that can stop answering, as a control channel does while the engine swaps models: frames flow on."""

    def __init__(self, target: str) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.back = self.ctx.socket(zmq.DEALER)
        self.back.connect(target)
        self.paused = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        while not self.stopped.is_set():
            for sock, _ in poller.poll(100):
                msg = sock.recv_multipart()
                if sock is self.front and not self.paused.is_set():
                    self.back.send_multipart(msg)
                elif sock is self.back:
                    self.front.send_multipart(msg)
        self.front.close(0)
        self.back.close(0)
        self.ctx.term()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)


def test_a_silent_control_channel_while_frames_flow_is_not_an_engine_loss(stack: Stack) -> None:
    eng = stack.engine()
    stack.camera(size="32x24", rate=10)
    assert eng.match is not None
    relay = _ControlRelay(eng.match["control"])
    try:
        stack.ioc(eng, "--control", relay.endpoint)  # the later --control wins
        out = stack.ioc_prefix
        wait_for(lambda: _counter(out + "ArrayCounter_RBV") > 5, 60, "frames")
        relay.paused.set()  # status polls now go unanswered (they gave up after 1 s and declared the engine lost)
        published = _counter(out + "ArrayCounter_RBV")
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert value_of(out + "EngineConnected_RBV") == 1, "engine declared lost while frames were answered"
            time.sleep(0.2)
        assert _counter(out + "ArrayCounter_RBV") >= published + 20
        relay.paused.clear()
        _pv(stack.camera_prefix + "Acquire").write([0], wait=True, timeout=10)  # type: ignore[attr-defined]
        books = _quiet_books(out)
        assert "engine_lost=0" in long_string_of(out + "DropCauses_RBV")
        assert (books["FramesReceived_RBV"] == books["ArrayCounter_RBV"] + books["DroppedArrays_RBV"]
                + books["FrameErrors_RBV"]), books
    finally:
        relay.close()


def test_ioc_and_engine_over_curve_and_a_wrong_key_is_refused(stack: Stack, tmp_path: Path) -> None:
    """CURVE between a real filter IOC and a real engine: keys from `cdae keys`; the IOC whose key the
    engine allows gets denoised frames, an IOC with another key never connects."""
    import json
    import subprocess

    from ioc_helpers import cdae, free_port  # type: ignore[import-not-found]

    keys = tmp_path / "keys"
    for name, extra in (("engine", []), ("ioc", ["--allow", str(keys / "allowed")]), ("stranger", [])):
        r = subprocess.run(cdae("keys", name, "--dir", str(keys), *extra), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    site = tmp_path / "site.toml"
    control = f"tcp://127.0.0.1:{free_port()}"
    site.write_text("\n".join([
        f"models_dir = {json.dumps(str(stack.store))}", "[engines.e]",
        f'bind = "tcp://127.0.0.1:{free_port()}"', f'control = "{control}"',
        'model = "tiny:1"', 'backend = "torch-cpu"', "threads = 1", "[engines.e.curve]",
        f"secret_key_file = {json.dumps(str(keys / 'engine.key_secret'))}",
        f"allowed_clients_dir = {json.dumps(str(keys / 'allowed'))}"]) + "\n")
    eng = stack.start("engine", cdae("engine", "--config", str(site), "--name", "e"), "engine")

    def ioc_config(who: str) -> Path:
        cfg = tmp_path / f"{who}.toml"
        cfg.write_text("[curve]\n" f"secret_key_file = {json.dumps(str(keys / f'{who}.key_secret'))}\n"
                       f"server_public_key_file = {json.dumps(str(keys / 'engine.key'))}\n")
        return cfg

    stack.camera(size="32x24", rate=5)
    stranger = stack.ioc(eng, "--config", str(ioc_config("stranger")))
    out = stack.ioc_prefix
    time.sleep(3.0)  # several status polls: none is answered
    assert value_of(out + "EngineConnected_RBV") == 0
    assert int(value_of(out + "ArrayCounter_RBV")) == 0  # type: ignore[arg-type]
    stranger.stop()
    stack.ioc(eng, "--config", str(ioc_config("ioc")))
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 1, 60, "the allowed IOC connected")
    wait_for(lambda: int(value_of(out + "ArrayCounter_RBV")) >= 3, 60, "denoised frames over CURVE")  # type: ignore[arg-type]
    stranger_key = (keys / "stranger.key").read_text().split('public-key = "')[1].split('"')[0]
    assert f"CURVE: refused a client with public key {stranger_key}" in eng.output()
    # an operator's model swap over the same CURVE: with the allowed key it is served, with another it is not
    def activate(who: str, timeout: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cdae("models", "activate", "tiny:1", "--engine", control, "--timeout", timeout,
                                   "--secret-key", str(keys / f"{who}.key_secret"),
                                   "--server-key", str(keys / "engine.key")),
                              capture_output=True, text=True, timeout=120)

    ok = activate("ioc", "60")
    assert ok.returncode == 0 and "now serving tiny:1" in ok.stdout, ok.stderr
    refused = activate("stranger", "1")
    assert refused.returncode == 1 and "no control reply" in refused.stderr, refused.stderr
