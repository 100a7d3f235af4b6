"""The services keep freed frame memory (cdae.memory): glibc's thresholds raised, or a line saying why not."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CALL = "from cdae.memory import retain_frame_memory; print(retain_frame_memory())"


def _run(**env: str) -> str:
    return subprocess.run([sys.executable, "-c", CALL], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_thresholds_are_raised_on_glibc() -> None:
    line = _run()
    assert line.startswith("malloc: freed frame memory kept (glibc ") and "mmap threshold 32 MiB" in line


def test_defaults_kept_when_asked() -> None:
    assert _run(CDAE_RETAIN_MEMORY="0") == "malloc: glibc defaults kept (CDAE_RETAIN_MEMORY=0)"
