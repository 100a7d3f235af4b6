"""The recording file (cdae.recording): runs appended, read back exactly, readable after a crash."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from cdae.recording import RecordingError, RunInfo, RunWriter, read_runs


def _info(**kw: object) -> RunInfo:
    fields: dict[str, object] = {"source": "T:image1:", "data_type": "UInt16", "bit_depth": 12, "height": 6,
                                 "width": 5, "frames_requested": 3}
    fields.update(kw)
    return RunInfo.model_validate(fields)


def test_runs_append_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 4096, (3, 6, 5)).astype(np.uint16)
    with RunWriter(path, _info(dark=True, camera={"AcquireTime_RBV": 0.1}), np.uint16) as w:
        for i, f in enumerate(frames):
            w.append(f, 10 + i, (1000 + i, 500), 1.5e9 + i)
        w.close("recorded all frames", complete=True)
    with RunWriter(path, _info(), np.uint16) as w:
        w.append(frames[0], 20, (2000, 0), 1.6e9)
        w.append(frames[1], 23, (2001, 0), 1.6e9)  # 21 and 22 never arrived
        w.close("stopped early: camera disconnected", complete=False)

    dark, light = read_runs(path)
    assert (dark.info.name, light.info.name) == ("0000", "0001")
    assert dark.info.dark and not light.info.dark
    assert dark.info.camera == {"AcquireTime_RBV": 0.1}
    assert dark.info.frames == 3 and dark.info.complete and dark.info.finished_utc
    np.testing.assert_array_equal(dark.frames(), frames)
    assert dark.frames().dtype == np.uint16
    np.testing.assert_array_equal(dark.unique_ids(), [10, 11, 12])
    np.testing.assert_array_equal(dark.epics_ts(), [[1000, 500], [1001, 500], [1002, 500]])
    assert dark.posix_times()[0] == pytest.approx(1000 + 631152000 + 5e-7)
    np.testing.assert_array_equal(dark.frames([2, 0]), frames[[2, 0]])
    assert light.info.frames == 2 and not light.info.complete
    assert light.info.skipped_ids == 2 and "disconnected" in light.info.stop_reason


def test_a_killed_recorder_leaves_its_frames_readable(tmp_path: Path) -> None:
    path = tmp_path / "crash.h5"
    code = textwrap.dedent(f"""
        import os, numpy as np
        from cdae.recording import RunInfo, RunWriter
        w = RunWriter({str(path)!r}, RunInfo(source="T:", data_type="UInt8", bit_depth=8, height=4, width=4,
                                               frames_requested=10), np.uint8)
        for i in range(3):
            w.append(np.full((4, 4), i, np.uint8), i + 1, (i, 0), 0.0)
        os._exit(1)  # no close, no flush at exit: a crash
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 1
    (run,) = read_runs(path)
    assert run.info.frames == 3 and not run.info.complete and run.info.stop_reason == ""
    np.testing.assert_array_equal(run.frames()[:, 0, 0], [0, 1, 2])


def test_wrong_frames_and_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with RunWriter(path, _info(), np.uint16) as w:
        with pytest.raises(RecordingError, match="5x6"):
            w.append(np.zeros((5, 6), np.uint16), 1, (0, 0), 0.0)
        with pytest.raises(RecordingError, match="uint8"):
            w.append(np.zeros((6, 5), np.uint8), 1, (0, 0), 0.0)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(RecordingError, match="not a cdae recording"):
        read_runs(other)
    with pytest.raises(RecordingError, match="not a cdae recording"):
        RunWriter(other, _info(), np.uint16)
    with pytest.raises(RecordingError, match="no such recording"):
        read_runs(tmp_path / "missing.h5")
