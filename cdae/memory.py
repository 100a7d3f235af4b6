"""Frame-sized memory kept by the process between frames (glibc's malloc), not handed back to the kernel.

Every frame allocates a few arrays of megabytes (the float32 frame, the network's input and output, the
denoised frame, the wire buffers). glibc serves blocks above its mmap threshold with a fresh ``mmap`` and
unmaps them on ``free``, and gives the top of its heap back past its trim threshold, so the next frame's
arrays are new pages again: the kernel zeroes and maps each one on first touch, and those page faults cost
as much as the arithmetic of the cheap steps (measured in docs/results.md, "Memory the process keeps"). A
service that handles one frame shape after another is better off keeping that memory: with both thresholds
raised, freed frames stay in the heap and the next frame reuses them.

Only the services' entry points call :func:`retain_frame_memory` (a library should not change its
process's allocator); elsewhere than glibc it does nothing and says so. Standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit hosts (``DEFAULT_MMAP_THRESHOLD_MAX``): blocks up to it come from the
#: heap; larger ones (a 2048² network input, 32 MB) are mapped as before.
MMAP_THRESHOLD = 32 << 20
#: Freed memory at the top of the heap kept up to this much (a few frames of the largest shape).
TRIM_THRESHOLD = 1 << 30
#: Set to 0 to leave glibc's defaults (``CDAE_RETAIN_MEMORY=0``).
ENV = "CDAE_RETAIN_MEMORY"


def retain_frame_memory() -> str:
    """Raise glibc's mmap and trim thresholds for this process; returns a line saying what was done."""
    if os.environ.get(ENV, "1") == "0":
        return f"malloc: glibc defaults kept ({ENV}=0)"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        version = libc.gnu_get_libc_version
    except (OSError, TypeError, AttributeError):
        return "malloc: not glibc, its defaults kept"
    version.restype = ctypes.c_char_p
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        return f"malloc: glibc {version().decode()} refused the thresholds, its defaults kept"
    return (f"malloc: freed frame memory kept (glibc {version().decode()}: mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
            f"trim threshold {TRIM_THRESHOLD >> 20} MiB)")
