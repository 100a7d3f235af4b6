"""Engine addresses: the one parser of ``tcp://HOST:PORT`` (cdae's ZeroMQ engine) and of
``triton://HOST:PORT/MODEL`` (a Triton server's gRPC port and the frame-path model), and the one rule
for the engine's control port.

Standard library only: the engine, its clients, the IOC and the site configuration all import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TCP = re.compile(r"^tcp://(?P<host>.+):(?P<port>\d+|\*)$")
_TRITON = re.compile(r"^triton://(?P<host>\[[0-9A-Fa-f:.]+\]|[^/:\[\]]+):(?P<port>\d{1,5})/(?P<model>[A-Za-z0-9_.-]{1,64})/?$")
TRITON_SCHEME = "triton://"
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


@dataclass(frozen=True)
class TritonEndpoint:
    """``triton://HOST:PORT/MODEL``: Triton's gRPC address and the frame-path model's name there."""

    host: str
    port: int
    model: str

    @property
    def grpc_url(self) -> str:
        """What tritonclient's gRPC client connects to (``HOST:PORT``)."""
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{TRITON_SCHEME}{self.host}:{self.port}/{self.model}"


#: Hosts that mean every interface of this machine, in a bind.
WILDCARD = ("*", "0.0.0.0", "::", "[::]")


def _same_host(host: str) -> str:
    return "127.0.0.1" if host in ("localhost",) else "::1" if host == "[::1]" else host


def ports_clash(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two listeners on this machine, ``(host, port)``, would fight for one port: the same port, and the
    same host (``localhost`` is ``127.0.0.1``) or either bound to every interface (``*``, ``0.0.0.0``)."""
    (ha, pa), (hb, pb) = a, b
    if pa != pb:
        return False
    return ha in WILDCARD or hb in WILDCARD or _same_host(ha) == _same_host(hb)


def is_triton(endpoint: str) -> bool:
    return endpoint.startswith(TRITON_SCHEME)


def parse_triton(endpoint: str) -> TritonEndpoint:
    """``triton://HOST:PORT/MODEL`` → its parts; ValueError saying what is wrong otherwise."""
    m = _TRITON.match(endpoint)
    if not m:
        raise ValueError(f"expected triton://HOST:PORT/MODEL (Triton's gRPC port, e.g. triton://127.0.0.1:8001/"
                         f"cdae-default), got {endpoint!r}")
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"{endpoint!r}: port {port} is not in 1..65535")
    return TritonEndpoint(m["host"], port, m["model"])


def is_loopback(endpoint: str) -> bool:
    """Whether only this machine can reach the endpoint (a loopback host, or not TCP at all)."""
    if is_triton(endpoint):
        try:
            return parse_triton(endpoint).host in LOOPBACK
        except ValueError:
            return False
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
