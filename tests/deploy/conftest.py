"""Deploy fixtures: the service manager's end of sd_notify, owned by the test."""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cdae.notify import parse_message


class NotifyListener:
    """What systemd does with ``NOTIFY_SOCKET``: a bound AF_UNIX datagram socket; keeps every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def env(self, watchdog_usec: int | None = 1_000_000) -> dict[str, str]:
        """The variables systemd sets for a Type=notify service with WatchdogSec."""
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], what: str, timeout_s: float = 90.0) -> dict[str, str]:
        """The next message that satisfies ``predicate`` (earlier ones are kept in ``messages``)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            message = parse_message(data)
            self.messages.append(message)
            if predicate(message):
                return message
        raise AssertionError(f"no {what} within {timeout_s:g} s; messages so far: {self.messages}")

    def count(self, key: str) -> int:
        return sum(1 for m in self.messages if key in m)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_listener() -> Iterator[NotifyListener]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="cdae-notify-") as d:
        listener = NotifyListener(Path(d) / "notify.sock")
        yield listener
        listener.close()
