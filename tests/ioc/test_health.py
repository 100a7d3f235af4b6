"""Camera health with real processes: a simulated camera that ages while the filter IOC watches it.

The camera starts stopped, so the IOC sees its frame 0; it goes through a radiation burst, then
gets new hot pixels and later a hot column (``cdae sim-camera --damage``), with a bright static
point source in the scene all along. The IOC's map is small and quick (8-frame windows, 2 to
enter); the rule itself is tested without processes in ``tests/test_health.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ioc_helpers import CA_ENV, Stack, _pv, ca_read, ca_write, long_string_of, value_of, wait_for  # type: ignore[import-not-found]

W, H = 64, 48
RATE = 25.0
BURST = (60, 60)  # frames 60..119: 5000 hits per megapixel and frame
HOT_AT, HOT_COUNT = 200, 4
COLUMN_AT, COLUMN = 320, 40
POINT = (20.0, 30.0, 0.6)  # x, y, peak (relative intensity): a bright static point source
WINDOW, ENTER = 8, 2
#: the stated detection delay: the window the damage starts in, then ENTER full windows
DELAY_FRAMES = (ENTER + 1) * WINDOW

DAMAGE = (f"radiation@{BURST[0]},frames={BURST[1]},level=5000", f"hot_pixels@{HOT_AT},count={HOT_COUNT},level=0.2",
          f"hot_column@{COLUMN_AT},x={COLUMN},level=0.05")
CAMERA_ARGS = ("--stopped", "--fresh-noise", "--seed", "7", "--point-source", ",".join(str(v) for v in POINT),
               *(a for spec in DAMAGE for a in ("--damage", spec)))


def _ioc_config(tmp_path: Path) -> Path:
    """The IOC's health config. ``cpu_share = 1``: every frame is analysed however loaded the cores are (at
    the default 0.1, an analysis slowed by a busy machine makes the map sample frames, so its windows
    span more of the burst and the exact map below depends on the load; the bound is tested apart)."""
    path = tmp_path / "ioc.toml"
    path.write_text(f"""\
state_dir = "{tmp_path / 'state'}"
[health]
window_frames = {WINDOW}
enter_windows = {ENTER}
baseline_windows = 4
map_period_s = 0.5
cpu_share = 1.0
[health.limits]
new_bad_pixels = {{minor = 3, major = 1000}}
new_bad_lines = {{major = 1}}
""")
    return path


def _uid(stack: Stack) -> int:
    return int(value_of(stack.camera_prefix + "UniqueId_RBV"))  # type: ignore[arg-type]


def _health_map(prefix: str) -> np.ndarray:
    data = np.asarray(ca_read(prefix + "HealthMap:ArrayData").data[: W * H]).astype(np.uint8)  # type: ignore[attr-defined]
    return data.reshape(H, W)


def test_a_camera_that_ages_raises_minor_then_major_and_keeps_its_map(stack: Stack, tmp_path: Path) -> None:
    from cdae.simcamera import DamageEvent, damage_pixels

    events = [DamageEvent.parse(s) for s in DAMAGE]
    hot_ys, hot_xs = damage_pixels(events, H, W)[1]
    config = _ioc_config(tmp_path)
    eng = stack.engine()
    stack.camera(*CAMERA_ARGS, size=f"{W}x{H}", rate=RATE)
    ioc = stack.ioc(eng, "--config", str(config))
    out, cam = stack.ioc_prefix, stack.camera_prefix
    wait_for(lambda: value_of(out + "EngineConnected_RBV") == 1, 60, "the engine")
    ca_write(cam + "Acquire", 1)
    # the automatic baseline (4 windows), a healthy camera: nothing new, OK
    wait_for(lambda: int(value_of(out + "HealthFrames_RBV")) >= 5 * WINDOW, 60, "the baseline")  # type: ignore[arg-type]
    assert "automatic" in long_string_of(out + "HealthBaseline_RBV")
    assert value_of(out + "CameraHealth_RBV") == 0 and int(value_of(out + "NewBadPixels_RBV")) == 0  # type: ignore[arg-type]
    base_pixels = int(value_of(out + "HealthMapPixels_RBV"))  # type: ignore[arg-type]
    # the radiation burst: hits counted, none enters the map
    hits = []
    while _uid(stack) < HOT_AT - WINDOW:
        hits.append(int(value_of(out + "RadiationHits_RBV")))  # type: ignore[arg-type]
        time.sleep(0.1)
    assert max(hits) >= 5, hits
    assert int(value_of(out + "NewBadPixels_RBV")) == 0  # type: ignore[arg-type]
    assert int(value_of(out + "HealthMapPixels_RBV")) == base_pixels  # type: ignore[arg-type]
    assert value_of(out + "CameraHealth_RBV") == 0
    # new hot pixels: MINOR within the stated delay
    wait_for(lambda: value_of(out + "CameraHealth_RBV") == 1, 30, "CameraHealth_RBV DEGRADED")
    delay = _uid(stack) - (HOT_AT + 1)  # UniqueId = frame index + 1
    r = ca_read(out + "CameraHealth_RBV")
    assert r.metadata.severity == 1, r.metadata  # type: ignore[attr-defined]  # MINOR
    assert int(value_of(out + "NewBadPixels_RBV")) >= 3 and int(value_of(out + "HotPixels_RBV")) >= HOT_COUNT  # type: ignore[arg-type]
    assert delay <= DELAY_FRAMES + 10, delay  # +10: CA and polling latency at 25 Hz
    # the hot column: MAJOR
    wait_for(lambda: value_of(out + "CameraHealth_RBV") == 2, 40, "CameraHealth_RBV BAD")
    assert ca_read(out + "CameraHealth_RBV").metadata.severity == 2  # type: ignore[attr-defined]
    assert int(value_of(out + "BadColumns_RBV")) == 1 and int(value_of(out + "NewBadLines_RBV")) == 1  # type: ignore[arg-type]
    img = _health_map(out)
    assert (img[hot_ys, hot_xs] & 0x7F == 1).all() and (img[hot_ys, hot_xs] & 0x80).all(), img[hot_ys, hot_xs]
    assert (img[:, COLUMN] & 0x7F == 4).all()
    x, y = int(POINT[0]), int(POINT[1])
    assert (img[y - 1:y + 2, x - 1:x + 2] == 0).all(), img[y - 1:y + 2, x - 1:x + 2]  # the point source is scene
    listed = json.loads(long_string_of(out + "HealthList_RBV"))
    firsts = {(p["x"], p["y"]): p["first_unique_id"] for p in listed["pixels"]}
    for yy, xx in zip(hot_ys.tolist(), hot_xs.tolist()):
        assert HOT_AT + 1 <= firsts[(xx, yy)] <= HOT_AT + 1 + DELAY_FRAMES, firsts
    assert [ln["index"] for ln in listed["lines"]] == [COLUMN]
    # the live map feeds the filter only after an operator accepts it
    reply = _pv(out + "HealthMapUse").write([1], wait=True, timeout=10)  # type: ignore[attr-defined]
    assert reply.status.name == "ECA_PUTFAIL"  # type: ignore[attr-defined]
    ca_write(out + "HealthAccept", 1)
    wait_for(lambda: "accepted" in long_string_of(out + "HealthBaseline_RBV"), 10, "the accepted baseline")
    wait_for(lambda: value_of(out + "CameraHealth_RBV") == 0, 10, "OK against the accepted baseline")
    ca_write(out + "HealthMapUse", 1)
    listed_n = int(value_of(out + "HealthMapPixels_RBV"))  # type: ignore[arg-type]
    wait_for(lambda: int(value_of(out + "BadPixelCount_RBV")) == listed_n, 10, "the live map in the filter")
    wait_for(lambda: (np.asarray(ca_read(out + "DefectMap:ArrayData").data[: W * H]).astype(np.uint8)  # type: ignore[attr-defined]
                      .reshape(H, W)[hot_ys, hot_xs] == 1).all(), 10, "the new hot pixels filled by the engine")  # class 1: map
    # export (PV command) and from the IOC (cdae badpixels --from-ioc), of a map that no longer changes
    ca_write(cam + "Acquire", 0)
    last = _uid(stack)
    wait_for(lambda: int(value_of(out + "UniqueId_RBV")) == last, 30, "the last frame")  # type: ignore[arg-type]
    time.sleep(0.5)
    listed = json.loads(long_string_of(out + "HealthList_RBV"))
    assert {(p["x"], p["y"]) for p in listed["pixels"]} == set(zip(hot_xs.tolist(), hot_ys.tolist()))  # nothing else
    ca_write(out + "HealthExport", 1)
    exported = Path(wait_for(lambda: long_string_of(out + "HealthExportFile_RBV"), 10, "the export"))  # type: ignore[arg-type]
    from_ioc = tmp_path / "from-ioc.json"
    env = {**__import__("os").environ, **CA_ENV}
    r2 = subprocess.run([sys.executable, "-m", "cdae.cli", "badpixels", "--from-ioc", out, "-o", str(from_ioc)],
                        capture_output=True, text=True, timeout=60, env=env)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    report = tmp_path / "report"
    r4 = subprocess.run([sys.executable, "-m", "cdae.cli", "health", "--from-ioc", out, "-o", str(report)],
                        capture_output=True, text=True, timeout=120, env=env)
    assert r4.returncode == 0, r4.stdout + r4.stderr
    assert (report / "map.png").is_file() and (report / "counts.png").is_file()
    assert f"{HOT_COUNT} pixels, 1 lines" in r4.stdout
    from cdae.engine.badpixels import BadPixelMap

    a, b = BadPixelMap.load(exported), BadPixelMap.load(from_ioc)
    assert len(a) == listed_n and set(zip(a.x.tolist(), a.y.tolist())) == set(zip(b.x.tolist(), b.y.tolist()))
    frame = tmp_path / "frame.npy"
    np.save(frame, np.full((H, W), 300, np.uint16))
    r3 = subprocess.run([sys.executable, "-m", "cdae.cli", "denoise", str(frame), "-o", str(tmp_path / "denoised"),
                         "--models-dir", str(stack.store), "--model", "tiny:1", "--bad-pixels", str(exported)],
                        capture_output=True, text=True, timeout=120, env=env)
    assert r3.returncode == 0 and f"{listed_n} listed bad pixels" in r3.stderr, r3.stdout + r3.stderr
    # the map survives a restart of the IOC
    frames_before = int(value_of(out + "HealthFrames_RBV"))  # type: ignore[arg-type]
    ioc.stop()
    ca_write(cam + "Acquire", 1)
    assert list((tmp_path / "state").glob(f"health-*-{W}x{H}.npz"))
    stack.ioc(eng, "--config", str(config))
    wait_for(lambda: int(value_of(out + "HealthFrames_RBV")) > frames_before, 60, "the map again")  # type: ignore[arg-type]
    assert int(value_of(out + "HotPixels_RBV")) >= HOT_COUNT and int(value_of(out + "BadColumns_RBV")) == 1  # type: ignore[arg-type]
    assert "accepted" in long_string_of(out + "HealthBaseline_RBV")
    assert int(value_of(out + "NewBadPixels_RBV")) == 0  # type: ignore[arg-type]
    print(f"detection delay (new hot pixels -> CameraHealth MINOR): {delay} frames")


def test_the_map_takes_at_most_its_cpu_share() -> None:
    """After a frame that cost t of the worker's CPU, frames are skipped (and counted) for t/cpu_share - t."""
    import asyncio

    from cdae.health import HealthConfig
    from cdae.ioc.frames import FrameInfo, NDDataType
    from cdae.ioc.health import HealthMonitor

    async def offers(share: float | None) -> tuple[int, int]:
        mon = HealthMonitor(HealthConfig(cpu_share=share), "cam", None)
        frame = np.random.default_rng(0).normal(100, 5, (256, 256)).astype(np.float32)
        info = FrameInfo(1, (1, 0), NDDataType.Float32)
        mon._analyse(frame, info)  # the worker's first frame: its CPU time is measured
        taken = 0
        for _ in range(5):  # at once: within the bound when there is one
            before = mon.skipped
            mon.offer(frame, info)
            taken += mon.skipped == before
            mon._slot = None  # the worker took it
        mon._worker.shutdown()
        return taken, mon.skipped

    assert asyncio.run(offers(None)) == (5, 0)
    assert asyncio.run(offers(1e-6)) == (0, 5)
