"""``cdae demo --seconds N``: the live pipeline as users start it, from the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ioc_helpers import CA_ENV  # type: ignore[import-not-found]  # noqa: F401 - this process's CA isolation


def test_live_demo_runs_and_summarises(tmp_path: Path, ioc_store: Path) -> None:
    exe = Path(sys.executable).with_name("cdae")
    r = subprocess.run([str(exe), "demo", "--seconds", "6", "--size", "64x48", "--rate", "5", "--model", "tiny:1",
                        "--models-dir", str(ioc_store), "--prefix", "TDEMO1:", "-o", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TDEMO1:CDAE1:ArrayData" in r.stdout and "summary:" in r.stdout
    summary = next(line for line in r.stdout.splitlines() if line.startswith("summary:"))
    frames_out = int(summary.split("frames in, ")[1].split(" frames out")[0])
    assert frames_out > 0 and "model tiny:1" in summary
    png = tmp_path / "d" / "demo-live.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "stopped the filter IOC" in r.stdout
