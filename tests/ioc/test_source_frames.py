"""Frames from a CA source that the simulated camera never sends: Int8, colour, 3-D, malformed, oversized,
a data type that changes at the same size; and counters reset by the operator.

A scripted NDStdArrays source (``nd_source_child.py``) posts exactly the frames a test asks for; the
engine and the filter IOC are the real processes, on loopback.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from caproto import AlarmSeverity, AlarmStatus

from ioc_helpers import Stack, ca_read, ca_write, long_string_of, push_frames, value_of, wait_for  # type: ignore[import-not-found]

W, H = 64, 48


def _n(name: str) -> int:
    return int(value_of(name))  # type: ignore[arg-type]


def _alarm(name: str) -> tuple[AlarmStatus, AlarmSeverity]:
    md = ca_read(name).metadata  # type: ignore[attr-defined]
    return AlarmStatus(md.status), AlarmSeverity(md.severity)


def _ready(stack: Stack, *ioc_args: str, element: str = "int16", source_args: tuple[str, ...] = (),
           max_elements: int = W * H * 3) -> str:
    """Source, engine and IOC up, one good frame published (UniqueId 1); the IOC's prefix."""
    eng = stack.engine()
    stack.nd_source(element, max_elements, *source_args)
    stack.ioc(eng, *ioc_args)
    out = stack.ioc_prefix
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 1, 60, "the engine")
    dt = "UInt8" if element == "uint8" else "UInt16"

    def first_frame() -> bool:  # pushed again only if not published within 5 s (the IOC not subscribed yet): a
        # second push while the first is on its way is a second frame, published after the books were read
        push_frames(stack, uid=1, dt=dt, val=100)
        return bool(wait_for(lambda: _n(out + "UniqueId_RBV") == 1, 5, "the first frame"))

    wait_for(first_frame, 60, "the first frame", poll_s=0.0)
    _settled(out)
    return out


def _settled(out: str) -> None:
    """Every frame received is accounted for (none waiting or in the engine)."""
    wait_for(lambda: _n(out + "FramesReceived_RBV") == _n(out + "ArrayCounter_RBV") + _n(out + "DroppedArrays_RBV")
             + _n(out + "FrameErrors_RBV"), 30, "the books to settle")


def _published(out: str, uid: int) -> None:
    wait_for(lambda: _n(out + "UniqueId_RBV") == uid, 30, f"frame {uid} published")


# --- Int8 (DataType index 0) -----------------------------------------------------------------------

def test_int8_frames_keep_their_type_from_an_nd_source(stack: Stack) -> None:
    out = _ready(stack, element="uint8")
    push_frames(stack, uid=2, dt="Int8", val=253)  # -3..3 as DBR_CHAR bit patterns: 253 254 255 0 1 2 3
    _published(out, 2)
    assert value_of(out + "DataType_RBV") == 0  # Int8, not UInt8
    residual = np.asarray(ca_read(out + "Residual:ArrayData").data[: W * H])  # type: ignore[attr-defined]
    assert np.abs(residual).max() <= 3  # denoised as -3..3, not as 253..3 (a residual of ±250 at the wrap)


def test_int8_plain_waveform_with_data_type_int8(stack: Stack) -> None:
    eng = stack.engine()
    stack.nd_source("uint8", W * H)
    stack.ioc(eng, "--width", str(W), "--height", str(H), "--data-type", "Int8",
              source=stack.camera_prefix + "ArrayData")
    out = stack.ioc_prefix
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 1, 60, "the engine")
    wait_for(lambda: (push_frames(stack, uid=1, dt="Int8", val=253), _n(out + "ArrayCounter_RBV") >= 1)[1], 60,
             "a frame published", poll_s=1.0)
    assert value_of(out + "DataType_RBV") == 0
    residual = np.asarray(ca_read(out + "Residual:ArrayData").data[: W * H])  # type: ignore[attr-defined]
    assert np.abs(residual).max() <= 3


# --- refused frames: READ/MAJOR on the images until the next good frame ----------------------------

def test_a_refused_ca_frame_puts_the_images_in_read_major_until_the_next_good_one(stack: Stack) -> None:
    out = _ready(stack)
    assert _alarm(out + "ArrayData") == (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)
    errors = _n(out + "FrameErrors_RBV")
    push_frames(stack, uid=2, n=100)  # 64 x 48 said, 100 elements sent
    wait_for(lambda: _n(out + "FrameErrors_RBV") == errors + 1, 30, "the frame refused")
    wait_for(lambda: _alarm(out + "ArrayData") == (AlarmStatus.READ, AlarmSeverity.MAJOR_ALARM), 10, "READ/MAJOR")
    assert _alarm(out + "Residual:ArrayData") == (AlarmStatus.READ, AlarmSeverity.MAJOR_ALARM)
    push_frames(stack, uid=3)
    _published(out, 3)
    wait_for(lambda: _alarm(out + "ArrayData") == (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM), 10, "cleared")


# --- colour and 3-D frames are refused, Bayer is taken, a source without NDimensions_RBV works --------

def test_colour_and_3d_frames_from_a_ca_source_are_refused(stack: Stack) -> None:
    out = _ready(stack)
    published, errors = _n(out + "ArrayCounter_RBV"), _n(out + "FrameErrors_RBV")
    for uid, frame, why in ((2, {"w": 3, "h": 20, "d": 10, "cm": "RGB1"}, "ColorMode RGB1"),
                            (3, {"w": 20, "h": 3, "d": 10, "cm": "RGB2"}, "ColorMode RGB2"),
                            (4, {"w": 20, "h": 10, "d": 3, "cm": "Mono"}, "NDimensions 3")):
        push_frames(stack, uid=uid, **frame)
        wait_for(lambda: _n(out + "FrameErrors_RBV") == errors + 1, 30, f"frame {uid} refused")
        errors += 1
        assert why in long_string_of(out + "LastError_RBV")
        wait_for(lambda: _alarm(out + "ArrayData") == (AlarmStatus.READ, AlarmSeverity.MAJOR_ALARM), 10, "READ")
    assert _n(out + "ArrayCounter_RBV") == published and _n(out + "UniqueId_RBV") == 1
    push_frames(stack, uid=5, cm="Bayer")  # one value per pixel: taken, as the PVA source takes it
    _published(out, 5)
    assert value_of(out + "ColorMode_RBV") == 1 and _n(out + "ArraySize0_RBV") == W


def test_a_source_without_ndimensions_serves_2d_frames(stack: Stack) -> None:
    out = _ready(stack, source_args=("--no-ndimensions",))
    push_frames(stack, uid=2, w=32, h=24)
    _published(out, 2)
    assert (_n(out + "ArraySize0_RBV"), _n(out + "ArraySize1_RBV")) == (32, 24)


# --- camera health: only frames the IOC takes; a data type change at the same size -------------------

def test_a_frame_larger_than_array_data_never_reaches_camera_health(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "ioc.toml"
    config.write_text("[health]\ncpu_share = 1.0\n")
    out = _ready(stack, "--config", str(config), "--max-elements", str(W * H + 100))
    wait_for(lambda: _n(out + "HealthFrames_RBV") >= 1, 30, "the first frame analysed")
    analysed, errors = _n(out + "HealthFrames_RBV"), _n(out + "FrameErrors_RBV")
    push_frames(stack, uid=2, count=3, w=80, h=60)  # 4800 pixels: more than ArrayData holds
    wait_for(lambda: _n(out + "FrameErrors_RBV") == errors + 3, 30, "the frames refused")
    time.sleep(2.0)  # what camera health would have made of them by now (cpu_share 1: every frame at once)
    assert _n(out + "HealthMap:ArraySize0_RBV") == W, "camera health took a frame the IOC refused"
    status = long_string_of(out + "HealthStatus_RBV")
    assert "not analysed" not in status and "Error" not in status, status
    for uid in (5, 6, 7):
        push_frames(stack, uid=uid, noise=5.0)
        _published(out, uid)
    wait_for(lambda: _n(out + "HealthFrames_RBV") > analysed, 30, "good frames analysed")
    status = long_string_of(out + "HealthStatus_RBV")
    assert "80" not in status and "Error" not in status, status  # no map of 80x60, no HealthMap overflow
    assert _n(out + "HealthMap:ArraySize0_RBV") == W


def test_camera_health_goes_on_when_the_data_type_changes_at_the_same_size(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "ioc.toml"
    config.write_text("[health]\nwindow_frames = 8\ncpu_share = 1.0\n")
    out = _ready(stack, "--config", str(config))
    uid = 2
    for dt, frames in (("UInt16", 5), ("Float32", 20)):
        for _ in range(frames):
            push_frames(stack, uid=uid, dt=dt, noise=5.0)
            _published(out, uid)
            uid += 1
    wait_for(lambda: _n(out + "HealthFrames_RBV") >= 20, 30, "frames analysed after the change")
    wait_for(lambda: "not analysed" not in long_string_of(out + "HealthStatus_RBV")
             and "Error" not in long_string_of(out + "HealthStatus_RBV"), 30, "no health error")


# --- DroppedArrays = 0 and ArrayCounter = 0 reset the counts ----------------------------------------

def test_writing_dropped_arrays_and_array_counter_resets_them(stack: Stack) -> None:
    out = _ready(stack, "--queue-size", "1")
    push_frames(stack, uid=2, count=40)  # back to back: most are replaced before the engine takes them
    _published(out, 41)
    dropped = _n(out + "DroppedArrays_RBV")
    assert dropped > 0 and _n(out + "ArrayCounter_RBV") >= 2
    ca_write(out + "DroppedArrays", 0)
    ca_write(out + "ArrayCounter", 0)
    assert _n(out + "DroppedArrays_RBV") == 0 and _n(out + "ArrayCounter_RBV") == 0
    assert "replaced=0 " in long_string_of(out + "DropCauses_RBV")
    push_frames(stack, uid=42)
    _published(out, 42)
    wait_for(lambda: _n(out + "ArrayCounter_RBV") == 1, 10, "ArrayCounter counting from 0")
    assert _n(out + "DroppedArrays_RBV") == 0  # not the old count back
    assert _n(out + "Residual:ArrayCounter_RBV") > 1  # the residual's own counter was not written
    ca_write(out + "ArrayCounter", 100)
    push_frames(stack, uid=43)
    _published(out, 43)
    wait_for(lambda: _n(out + "ArrayCounter_RBV") == 101, 10, "ArrayCounter counting from 100")


def test_an_idle_camera_is_no_frame_error_at_connection(stack: Stack) -> None:
    """The first ArrayData update after connecting is the camera's current array: an idle camera's is empty (or
    caproto's one-element start). It is neither a frame nor a frame error; the first real frame is published."""
    eng = stack.engine()
    stack.nd_source("int16", W * H * 3)
    stack.ioc(eng)
    out = stack.ioc_prefix
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 1 and value_of(out + "SourceConnected_RBV") == 1, 60,
             "the engine and the camera")
    time.sleep(2.0)
    assert _n(out + "FrameErrors_RBV") == 0 and _n(out + "ArrayCounter_RBV") == 0
    wait_for(lambda: (push_frames(stack, uid=1, dt="UInt16", val=100), _n(out + "UniqueId_RBV") == 1)[1], 60,
             "the first frame", poll_s=1.0)
    assert _n(out + "FrameErrors_RBV") == 0
