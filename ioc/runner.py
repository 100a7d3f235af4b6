"""Process shell shared by ``cdae sim-camera`` and ``cdae ioc``: one asyncio loop, a caproto server, clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from caproto.asyncio.server import Context as ServerContext
from caproto.server import PVSpec

from cdae.lines import log

T = TypeVar("T")


def ca_server_port() -> int:
    """The CA server port this process serves on (EPICS_CAS_SERVER_PORT, else EPICS_CA_SERVER_PORT, else 5064)."""
    for key in ("EPICS_CAS_SERVER_PORT", "EPICS_CA_SERVER_PORT"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 5064


async def serve_pvdb(pvdb: Mapping[str, PVSpec], interfaces: list[str] | None,
                     listening: asyncio.Event | None = None) -> None:
    """Serve ``pvdb`` over Channel Access until cancelled, on :func:`ca_server_port`.

    ``listening`` is set once the TCP and UDP sockets are bound (clients can connect from then on).
    """
    ctx = ServerContext(dict(pvdb), interfaces or None)
    # caproto's server takes its UDP/TCP port from EPICS_CA_SERVER_PORT; EPICS base servers honour
    # EPICS_CAS_SERVER_PORT first, and a process that is also a CA client (the filter IOC) needs
    # the two to differ, so apply the server variable here.
    ctx.ca_server_port = ca_server_port()

    async def bound(_async_lib: object) -> None:  # caproto calls its startup hook after binding
        if listening is not None:
            listening.set()

    await ctx.run(startup_hook=bound)


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run ``main(stop)`` in a fresh loop; SIGINT/SIGTERM set ``stop`` so it can shut down cleanly."""

    async def wrapper() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    return asyncio.run(wrapper())


async def cancel_all(tasks: list[asyncio.Task[T]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
