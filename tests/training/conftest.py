"""Fixtures of the training tests: camera recordings written directly from the simulated camera."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cdae.simcamera import CameraConfig, simulate_bank
from cdae.recording import RunInfo, RunWriter

WriteRecording = Callable[[Path, CameraConfig, int, int], None]


def write_recording(path: Path, camera: CameraConfig, light: int, dark: int) -> None:
    """A recording of the simulated camera written without an IOC: ``dark`` darks, then ``light`` frames."""
    for is_dark, count in ((True, dark), (False, light)):
        if not count:
            continue
        bank = simulate_bank(camera.model_copy(update={"bank": count}), camera.height, camera.width, is_dark)
        info = RunInfo(source="SIM:image1:", dark=is_dark, data_type="UInt16", bit_depth=12, height=camera.height,
                       width=camera.width, frames_requested=count, bit_depth_source="user")
        with RunWriter(path, info, np.uint16) as w:
            for i, f in enumerate(bank):
                w.append(f.noisy.astype(np.uint16), i + 1, (i, 0), float(i))
            w.close("recorded all frames", complete=True)


@pytest.fixture(name="write_recording")
def write_recording_fixture() -> WriteRecording:
    return write_recording
