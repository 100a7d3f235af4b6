"""cdae.notify: the sd_notify codec, the environment it reads, and real datagrams on real sockets."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from cdae.notify import (
    Notifier,
    format_message,
    parse_message,
    socket_address,
    watchdog_timeout_s,
)


def test_socket_address_path_abstract_and_unsupported() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@cdae/notify") == "\0cdae/notify"
    for bad in ("relative/notify", "@", "vsock:2:1234", ""):
        assert socket_address(bad) is None


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, 10, None),
        ({"WATCHDOG_USEC": "1000000"}, 10, 1.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"}, 10, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "11"}, 10, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, 10, None),
        ({"WATCHDOG_USEC": "-5"}, 10, None),
        ({"WATCHDOG_USEC": "soon"}, 10, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}, 10, None),
    ],
)
def test_watchdog_timeout_from_environment(env: dict[str, str], pid: int, expected: float | None) -> None:
    assert watchdog_timeout_s(env, pid) == expected


def test_message_round_trip_keeps_one_line_per_key() -> None:
    data = format_message({"READY": 1, "STATUS": "model cdae-default:8\nserving"})
    assert data == b"READY=1\nSTATUS=model cdae-default:8 serving\n"
    assert parse_message(data) == {"READY": "1", "STATUS": "model cdae-default:8 serving"}
    with pytest.raises(ValueError, match="notification key"):
        format_message({"BAD=KEY": 1})


def test_unset_socket_is_a_silent_no_op() -> None:
    n = Notifier(env={"WATCHDOG_USEC": "1000000"}, log=pytest.fail)
    assert not n.enabled
    assert n.watchdog_interval_s is None  # no socket: nobody to ping
    assert not n.ready("up") and not n.status("x") and not n.watchdog() and not n.stopping()
    assert not n.watchdog_due()
    n.close()


def test_abstract_socket_receives_ready_status_watchdog_stopping() -> None:
    name = f"cdae-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        manager.settimeout(10)
        n = Notifier(env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())},
                     log=pytest.fail)
        assert n.enabled and n.watchdog_timeout_s == 2.0 and n.watchdog_interval_s == 1.0
        before = time.monotonic()
        assert n.ready("loaded")
        assert parse_message(manager.recv(4096)) == {"READY": "1", "STATUS": "loaded"}
        # the first ping is due half a watchdog period after READY, not before
        assert not n.watchdog_due(before)
        assert n.watchdog_due(time.monotonic() + 1.0)
        assert n.watchdog("3 frames served")
        assert parse_message(manager.recv(4096)) == {"WATCHDOG": "1", "STATUS": "3 frames served"}
        assert n.extend_start_timeout(1.5)
        assert parse_message(manager.recv(4096)) == {"EXTEND_TIMEOUT_USEC": "1500000"}
        assert n.stopping()
        assert parse_message(manager.recv(4096)) == {"STOPPING": "1"}
        n.close()


def test_path_socket_and_a_manager_that_went_away(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    logged: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        manager.settimeout(10)
        n = Notifier(env={"NOTIFY_SOCKET": str(path)}, log=logged.append)
        assert n.status("hello")
        assert parse_message(manager.recv(4096)) == {"STATUS": "hello"}
    path.unlink()
    # the manager is gone: sending fails, the service carries on, the failure is logged once
    assert not n.status("again") and not n.status("and again")
    assert n.failures == 2 and len(logged) == 1 and str(path) in logged[0]
    n.close()


def test_bad_socket_value_is_reported_and_ignored() -> None:
    logged: list[str] = []
    n = Notifier(env={"NOTIFY_SOCKET": "vsock:2:999", "WATCHDOG_USEC": "1000000"}, log=logged.append)
    assert not n.enabled and n.watchdog_interval_s is None
    assert len(logged) == 1 and "vsock:2:999" in logged[0]
