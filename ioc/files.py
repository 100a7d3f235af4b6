"""Reading a file a CA client named (``BadPixelFile``): only regular files under one configured folder.

Any CA client on the network can write the PV, so the path is untrusted: it is resolved (symlinks
too) and must land under the folder the site file names (``bad_pixel_dir``); the file is opened
with ``O_NONBLOCK`` (a FIFO never blocks the reader) and ``O_NOFOLLOW`` and checked with
``fstat`` before anything is read (regular files only, at most ``max_bytes``). Messages name the
path and the rule, never the file's content, and a path outside the folder gets the same message
whether it exists or not. Pure functions, no event loop: the IOC runs them in a worker thread.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cdae.ioc.frames import IocError

#: Largest bad-pixel file read (bytes): ~250,000 entries of ``{"Pixel": [x, y], "Median": [1, 1]}``.
MAX_FILE_BYTES = 16 * 1024 * 1024


class FileRefused(IocError):
    """A named file that may not or cannot be read; the message says why, without its content."""


def resolve_under(directory: Path | str | None, name: str) -> Path:
    """The real path of ``name`` (relative names are relative to ``directory``) if it lies under ``directory``."""
    if directory is None:
        raise FileRefused("run-time changes are off: no bad_pixel_dir is configured for this camera "
                          "(site file); only the configured bad_pixel_file is used")
    if not name or "\0" in name:
        raise FileRefused("expected a file name")
    root = os.path.realpath(directory)
    real = os.path.realpath(os.path.join(root, name))  # an absolute name replaces root in join
    if os.path.commonpath([root, real]) != root or real == root:
        raise FileRefused(f"{name!r} is not a file under bad_pixel_dir {root}")
    return Path(real)


def read_regular_file(path: Path | str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else is refused without blocking."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileRefused(f"{path}: no such file") from None
    except OSError as e:  # a symlink swapped in (ELOOP), no permission, ...
        raise FileRefused(f"{path}: cannot open ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise FileRefused(f"{path}: {st.st_size} bytes, more than the {max_bytes} bytes allowed")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:  # grew while being read
                raise FileRefused(f"{path}: more than the {max_bytes} bytes allowed")
        return b"".join(chunks)
    except OSError as e:
        raise FileRefused(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)


def read_named_file(directory: Path | str | None, name: str, max_bytes: int = MAX_FILE_BYTES) -> tuple[Path, bytes]:
    """:func:`resolve_under` then :func:`read_regular_file`: what a PV write may read."""
    real = resolve_under(directory, name)
    return real, read_regular_file(real, max_bytes)
