"""``cdae health``: the report from a recording, and counts over time from an Archiver Appliance (a stand-in)."""

from __future__ import annotations

import csv
import datetime as dt
import http.server
import json
import threading
from pathlib import Path

import numpy as np

from cdae.cli import main
from cdae.engine.badpixels import BadPixelMap
from cdae.healthreport import archiver_history
from cdae.recording import RunInfo, RunWriter
from cdae.simcamera import CameraConfig, DamageEvent, camera_frame, camera_model, damage_pixels

W, H, ONSET = 64, 48, 60


def test_a_report_from_a_recording_lists_each_defect_with_its_first_frame(tmp_path: Path) -> None:
    events = [DamageEvent.parse(f"hot_pixels@{ONSET},count=3,level=0.2")]
    cam = CameraConfig(width=W, height=H, seed=7, bank=4, fresh_noise=True, damage=events)
    model = camera_model(cam, H, W)
    where = damage_pixels(events, H, W)
    rec = tmp_path / "cam.h5"
    info = RunInfo(source="T:image1:", data_type="UInt16", bit_depth=12, height=H, width=W, frames_requested=160)
    with RunWriter(rec, info, np.uint16) as w:
        for i in range(160):
            w.append(camera_frame(model, cam, i, where).astype(np.uint16), i + 1, (1_000_000_000 + i, 0), 1.6e9 + i)
        w.close("recorded all frames", complete=True)
    out = tmp_path / "report"
    assert main(["health", str(rec), "-o", str(out), "--window", "8"]) == 0
    for name in ("map.png", "counts.png", "pixels.csv", "badpixels.json", "report.json"):
        assert (out / name).is_file(), name
    with (out / "pixels.csv").open() as f:
        rows = list(csv.DictReader(f))
    ys, xs = where[0]
    assert {(int(r["x"]), int(r["y"])) for r in rows} == set(zip(xs.tolist(), ys.tolist()))
    assert all(ONSET + 1 <= int(r["first_unique_id"]) <= ONSET + 8 and r["kind"] == "hot" for r in rows)
    assert all(r["first_time"].startswith("2021-09-") for r in rows)  # 1e9 s past the EPICS epoch
    assert len(BadPixelMap.load(out / "badpixels.json")) == 3
    report = json.loads((out / "report.json").read_text())
    assert report["kinds"]["hot"] == 3 and "windows" in report["history_source"]


class _Archiver(http.server.BaseHTTPRequestHandler):
    """The retrieval service's getData.json for two of the health PVs."""

    def do_GET(self) -> None:  # noqa: N802
        if "HotPixels_RBV" in self.path:
            body = [{"meta": {"name": "P:HotPixels_RBV"}, "data": [{"secs": 1_700_000_000, "nanos": 0, "val": 2},
                                                                   {"secs": 1_700_000_600, "nanos": 5, "val": 5}]}]
        elif "NewBadPixels_RBV" in self.path:
            body = [{"meta": {}, "data": [{"secs": 1_700_000_600, "val": 3}]}]
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_counts_over_time_come_from_the_archiver_where_it_has_them() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Archiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        now = dt.datetime.now(dt.timezone.utc)
        got = archiver_history(f"http://127.0.0.1:{server.server_address[1]}", "P:", now - dt.timedelta(hours=1), now)
    finally:
        server.shutdown()
        server.server_close()
    assert got == {"hot": [(1_700_000_000.0, 2.0), (1_700_000_600.000000005, 5.0)], "new_bad_pixels": [(1_700_000_600.0, 3.0)]}
