"""systemd's service notification protocol (sd_notify) in pure Python: READY, STATUS, STOPPING, WATCHDOG.

A ``Type=notify`` service finds the manager's socket in ``$NOTIFY_SOCKET`` (a path, or ``@name``
in the abstract namespace) and sends it datagrams of ``KEY=VALUE`` lines. Outside systemd the
variable is unset and every call here does nothing, so the services need no special mode for
tests or a terminal.

The watchdog is the part that matters in operation: with ``WatchdogSec=`` systemd kills and
restarts a service that stops sending ``WATCHDOG=1``. A ping is worth something only if it
proves the service still works, so this module never pings by itself: the service's own
serving loop calls :meth:`Notifier.watchdog_due` and pings from there (the engine when its
frame threads have gone round their loops, the IOC from its asyncio loop). A timer thread would
keep pinging while the service is wedged.

The protocol codec (:func:`format_message`, :func:`parse_message`, :func:`socket_address`,
:func:`watchdog_timeout_s`) is pure; :class:`Notifier` is the thin socket shell around it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from cdae.lines import log as log_line

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    log_line("sd_notify", msg)


def socket_address(value: str) -> str | None:
    """The AF_UNIX address ``$NOTIFY_SOCKET`` names: a path, or ``@name`` → abstract ``\\0name``.

    None for anything else (systemd 254's ``vsock:`` addresses are for virtual machines, not
    for services on this host).
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def watchdog_timeout_s(env: Mapping[str, str], pid: int) -> float | None:
    """``$WATCHDOG_USEC`` in seconds, when the watchdog is asked of process ``pid``; else None.

    ``$WATCHDOG_PID``, when set, names the one process the watchdog is for (a child that
    inherited the environment must not ping in its parent's name); as sd_watchdog_enabled does.
    """
    raw = env.get("WATCHDOG_USEC", "").strip()
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = env.get("WATCHDOG_PID", "").strip()
    if wpid:
        try:
            if int(wpid) != pid:
                return None
        except ValueError:
            return None
    return usec / 1e6


def format_message(fields: Mapping[str, object]) -> bytes:
    """One notification datagram: ``KEY=VALUE`` lines; a value's newlines would start new keys, so they become spaces."""
    lines = []
    for key, value in fields.items():
        if not key or "=" in key or "\n" in key:
            raise ValueError(f"not a notification key: {key!r}")
        text = " ".join(str(value).splitlines())
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


def parse_message(data: bytes) -> dict[str, str]:
    """The fields of one notification datagram (what the service manager reads)."""
    fields: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


class Notifier:
    """Sends notifications to the service manager named by the environment; a no-op outside systemd.

    Sending never raises: a service must not stop serving frames because the manager's socket
    went away. The first failure is logged, later ones only counted.
    """

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None, log: Log = _stderr) -> None:
        env = os.environ if env is None else env
        self.log = log
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = socket_address(raw) if raw else None
        if raw and self.address is None:
            log(f"NOTIFY_SOCKET={raw!r} is neither a path nor @abstract; not notifying")
        timeout = watchdog_timeout_s(env, os.getpid() if pid is None else pid)
        #: the watchdog limit systemd enforces, and the ping period: half of it, as sd_watchdog_enabled(3) advises
        self.watchdog_timeout_s = timeout if self.address else None
        self.watchdog_interval_s = self.watchdog_timeout_s / 2 if self.watchdog_timeout_s else None
        self.failures = 0
        self._last_ping: float | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, fields: Mapping[str, object]) -> bool:
        """Send one datagram of ``fields``; True when the manager got it (False outside systemd)."""
        if self.address is None:
            return False
        data = format_message(fields)
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
            except OSError as e:
                self.failures += 1
                if self.failures == 1:
                    self.log(f"cannot notify the service manager at {self.address!r}: {e}")
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """The service is up (``systemctl start`` returns, units ordered after it start)."""
        self._last_ping = time.monotonic()  # the watchdog starts counting now
        return self.notify({"READY": 1, **({"STATUS": status} if status else {})})

    def status(self, text: str) -> bool:
        """A one-line state for ``systemctl status``."""
        return self.notify({"STATUS": text})

    def extend_start_timeout(self, seconds: float, status: str | None = None) -> bool:
        """Before READY: "still starting, and alive" — the start timeout is pushed ``seconds`` from now.

        Like the watchdog, send it only from the loop whose progress it vouches for.
        """
        fields: dict[str, object] = {"EXTEND_TIMEOUT_USEC": max(1, round(seconds * 1e6))}
        return self.notify({**fields, **({"STATUS": status} if status else {})})

    def stopping(self, status: str | None = None) -> bool:
        """The service is shutting down on purpose (not a crash, not a hang)."""
        return self.notify({"STOPPING": 1, **({"STATUS": status} if status else {})})

    def watchdog_due(self, now: float | None = None) -> bool:
        """True when a watchdog ping is expected (half the watchdog period since the last one)."""
        if self.watchdog_interval_s is None:
            return False
        now = time.monotonic() if now is None else now
        return self._last_ping is None or now - self._last_ping >= self.watchdog_interval_s

    def watchdog(self, status: str | None = None) -> bool:
        """Ping: call it only from the loop whose liveness it proves."""
        self._last_ping = time.monotonic()
        return self.notify({"WATCHDOG": 1, **({"STATUS": status} if status else {})})

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
