"""`cdae record` against the simulated areaDetector camera: real IOC, real CA, real HDF5 file."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np

from cdae.recording import read_runs
from ioc_helpers import Stack, ca_write, cdae, value_of, wait_for


def _record(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cdae("record", "--no-progress", *args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_dark_and_light_runs_in_one_file(stack: Stack, tmp_path: Path) -> None:
    p = stack.camera_prefix
    stack.camera("--shutter-closed", "--static-scene", "--bank", "8", size="40x24", rate=20)
    out = tmp_path / "run.h5"
    dark = _record("--source", p, "--frames", "5", "-o", str(out), "--dark", "--bit-depth", "12", "--note", "cap on")
    assert dark.returncode == 0, dark.stderr
    ca_write(p + "ShutterControl", 1)  # Open
    wait_for(lambda: value_of(p + "ShutterStatus_RBV") == 1, what="shutter open")
    light = _record("--source", p, "--frames", "6", "-o", str(out), "--bit-depth", "12")
    assert light.returncode == 0, light.stderr
    assert "run 0001" in light.stdout and "6 frames 40x24 UInt16 (12-bit)" in light.stdout

    runs = read_runs(out)
    assert [(r.info.dark, r.info.frames, r.info.complete) for r in runs] == [(True, 5, True), (False, 6, True)]
    for run in runs:
        info = run.info
        assert (info.width, info.height, info.data_type, info.bit_depth, info.bit_depth_source) == (40, 24, "UInt16", 12, "user")
        assert info.camera["Model_RBV"].startswith("simulated camera") and info.camera["FrameRate_RBV"] == 20.0
        ids = run.unique_ids()
        assert np.all(np.diff(ids) > 0) and info.skipped_ids == int(ids[-1] - ids[0] - (len(ids) - 1))
        stamps = run.posix_times()
        assert np.all(np.diff(stamps) > 0) and abs(stamps[-1] - time.time()) < 600  # EPICS epoch converted
    assert runs[0].info.camera["ShutterStatus_RBV"] == "Closed" and runs[0].info.note == "cap on"
    assert runs[1].info.camera["ShutterStatus_RBV"] == "Open"
    assert runs[1].unique_ids()[0] > runs[0].unique_ids()[-1]
    assert runs[0].frames().mean() < runs[1].frames().mean()  # no light on the sensor in the darks
    assert runs[0].frames().dtype == np.uint16


def test_no_camera_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    r = _record("--source", "TNOSUCH:image1:", "--frames", "3", "-o", str(out), "--timeout", "1")
    assert r.returncode == 2
    assert "no camera" in r.stderr and "TNOSUCH:image1:ArrayData" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def _wait_frames(path: Path, n: int) -> None:
    wait_for(lambda: read_runs(path)[-1].info.frames >= n, timeout_s=60, what=f"{n} recorded frames")


def test_camera_that_dies_keeps_what_was_recorded(stack: Stack, tmp_path: Path) -> None:
    camera = stack.camera(size="32x24", rate=20)
    out = tmp_path / "run.h5"
    rec = subprocess.Popen(cdae("record", "--no-progress", "--source", stack.camera_prefix, "--frames", "100000",
                                "-o", str(out), "--timeout", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        _wait_frames(out, 3)
        camera.kill()
        _, err = rec.communicate(timeout=60)
    finally:
        if rec.poll() is None:
            rec.kill()
    assert rec.returncode == 1
    assert "camera disconnected" in err and "recorded frames are kept" in err and "Traceback" not in err
    (run,) = read_runs(out)
    assert run.info.frames >= 3 and not run.info.complete and "disconnected" in run.info.stop_reason
    assert len(run.unique_ids()) == run.info.frames


def test_camera_that_stops_acquiring_ends_the_run(stack: Stack, tmp_path: Path) -> None:
    p = stack.camera_prefix
    stack.camera(size="32x24", rate=20)
    out = tmp_path / "run.h5"
    rec = subprocess.Popen(cdae("record", "--no-progress", "--source", p, "--frames", "100000", "-o", str(out),
                                "--timeout", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_frames(out, 2)
        ca_write(p + "Acquire", 0)  # Done
        _, err = rec.communicate(timeout=60)
    finally:
        if rec.poll() is None:
            rec.kill()
    assert rec.returncode == 1 and "is the camera acquiring?" in err
    (run,) = read_runs(out)
    assert run.info.frames >= 2 and not run.info.complete
