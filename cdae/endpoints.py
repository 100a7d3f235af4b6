"""ZeroMQ endpoints: the one parser of ``tcp://HOST:PORT`` and the one rule for the engine's control port.

Standard library only: the engine, its clients, the IOC and the site configuration all import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TCP = re.compile(r"^tcp://(?P<host>.+):(?P<port>\d+|\*)$")
#: Hosts only this machine reaches.
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class TcpEndpoint:
    """``tcp://HOST:PORT``; ``port`` as written: digits, or ``*`` (libzmq's "any free port", as is 0)."""

    host: str
    port: str

    @property
    def any_port(self) -> bool:
        return self.port in ("0", "*")


def parse_tcp(endpoint: str) -> TcpEndpoint | None:
    """The host and port of a ``tcp://`` endpoint; None for any other (ipc://, inproc://, malformed)."""
    m = _TCP.match(endpoint)
    return TcpEndpoint(m["host"], m["port"]) if m else None


def is_loopback(endpoint: str) -> bool:
    """Whether only this machine can reach the endpoint (a loopback host, or not TCP at all)."""
    ep = parse_tcp(endpoint)
    return ep is None or ep.host in LOOPBACK


def control_endpoint_for(data_endpoint: str) -> str:
    """The engine's control endpoint when none is given: the data port + 1 on the same host.

    A free data port (0 or ``*``) gets a free control port too; ipc:// and inproc:// get ``.control``.
    """
    ep = parse_tcp(data_endpoint)
    if ep is not None:
        if ep.any_port:
            return data_endpoint
        return f"tcp://{ep.host}:{int(ep.port) + 1}"
    if data_endpoint.startswith(("ipc://", "inproc://")):
        return data_endpoint + ".control"
    raise ValueError(f"cannot derive a control endpoint from {data_endpoint!r}; give one")
