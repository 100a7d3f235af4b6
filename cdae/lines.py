"""One line, one write: what the services print is read line by line by whoever started them.

A child's stdout and stderr usually share one pipe (``stderr=STDOUT``, systemd's journal), and
``print(text)`` writes the text and its newline in two calls: unbuffered, another thread's line can
land between them, and a ready line glued to the end of a log line is never seen as ready.
:func:`say` writes the text with its newline in one call and flushes, so a line (under the pipe's
4096 bytes) reaches the reader whole.
"""

from __future__ import annotations

import sys
from typing import TextIO


def say(text: str, stream: TextIO | None = None) -> None:
    """``text`` and a newline in one write to ``stream`` (default: stdout), flushed."""
    out = sys.stdout if stream is None else stream
    out.write(text + "\n")
    out.flush()


def log(who: str, msg: str) -> None:
    """A service's log line, ``who: msg``, on stderr (:func:`say`)."""
    say(f"{who}: {msg}", sys.stderr)
