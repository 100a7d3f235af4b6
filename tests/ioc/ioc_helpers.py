"""Helpers of the IOC tests: isolated CA environment, child processes, CA reads (imported by conftest and tests).

The CA environment is fixed once per session *before* any CA client library starts (libca,
which pyepics wraps, reads it once per process): every search goes to 127.0.0.1 only, on ports
of this session's own, and the camera and the filter IOC each serve on their own port (listed
in EPICS_CA_ADDR_LIST as ``127.0.0.1:PORT``), so two servers never share one UDP port.
"""

from __future__ import annotations

import os
import random
import re
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cdae.children import free_port, pva_loopback_env, pva_server_env, stop_process


CAMERA_PORT = free_port()
IOC_PORT = free_port()
REPEATER_PORT = free_port()
CA_ENV = {
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CA_ADDR_LIST": f"127.0.0.1:{CAMERA_PORT} 127.0.0.1:{IOC_PORT}",
    "EPICS_CA_SERVER_PORT": str(CAMERA_PORT),
    "EPICS_CA_REPEATER_PORT": str(REPEATER_PORT),
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_MAX_ARRAY_BYTES": str(64 * 1024 * 1024),
    "EPICS_CA_CONN_TMO": "2.0",
}
os.environ.update(CA_ENV)  # before pyepics/caproto clients are created in this process
# PV Access the same way: searches to 127.0.0.1 only, each server (camera, filter IOC) on a UDP+TCP port of its own,
# beacons to loopback only; the clients here (p4p, pvapy) read it from the environment
CAMERA_PVA_PORT = free_port()
IOC_PVA_PORT = free_port()
PVA_ENV = pva_loopback_env([CAMERA_PVA_PORT, IOC_PVA_PORT])
os.environ.update(PVA_ENV)

READY = {
    "engine": re.compile(r"^cdae-engine ready data=(?P<data>\S+) control=(?P<control>\S+) .*model=(?P<model>\S+)"),
    "camera": re.compile(r"^cdae-sim-camera ready "),
    "ioc": re.compile(r"^cdae-ioc ready "),
    "ndsource": re.compile(r"^cdae-test-ndsource ready "),
}


def write_tiny_store(root: Path) -> Path:
    """tiny:1 and tiny:2: untrained tiny networks (different weights) — enough to test the plumbing."""
    import torch

    from cdae.engine.architecture import ArchitectureConfig, build_model
    from cdae.engine.package import write_package

    arch = ArchitectureConfig(base_width=4, depth=1, convs_per_level=1)
    for version, seed in (("1", 0), ("2", 1)):
        torch.manual_seed(seed)
        write_package(root, name="tiny", version=version, state_dict=build_model(arch).state_dict(),
                      architecture=arch, seed=seed)
    return root


def random_prefix(stem: str) -> str:
    return f"T{''.join(random.choices(string.ascii_uppercase, k=6))}:{stem}:"


@dataclass
class Child:
    """A child process, its output, and how to stop it."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    match: re.Match[str] | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    def start(self, ready: re.Pattern[str], timeout_s: float = 90.0) -> Child:
        self.lines, self.match = [], None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env)

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if self.match is None and (m := ready.match(line)):
                    self.match = m
                    self._ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not become ready (exit {self.proc.returncode})\n{self.output()}")
        return self

    def output(self) -> str:
        return f"--- {self.name}: {' '.join(self.cmd)} ---\n{''.join(self.lines)}"

    def stop(self) -> int | None:
        p = self.proc
        if p is None:
            return None
        stop_process(p)
        if self._reader is not None:
            self._reader.join(5)
        if p.stdout is not None:
            p.stdout.close()
        return p.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean stop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def cdae(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdae.cli", *args]


class Stack:
    """Starts engine / camera / filter IOC children for one test and stops them all afterwards."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.children: list[Child] = []
        self.camera_prefix = random_prefix("image1")
        self.ioc_prefix = self.camera_prefix.split(":")[0] + ":CDAE1:"

    def _env(self, server_port: int | None = None) -> dict[str, str]:
        env = {**os.environ, **CA_ENV, **PVA_ENV, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        if server_port is not None:
            env["EPICS_CAS_SERVER_PORT"] = str(server_port)
        return env

    def start(self, name: str, cmd: list[str], kind: str, server_port: int | None = None,
              env: dict[str, str] | None = None) -> Child:
        child = Child(name, cmd, {**self._env(server_port), **(env or {})})
        self.children.append(child)
        return child.start(READY[kind])

    def engine(self, *args: str, model: str = "tiny:1", bind: str = "tcp://127.0.0.1:0") -> Child:
        return self.start("engine", cdae("engine", "--bind", bind, "--threads", "1", "--models", str(self.store),
                                          "--model", model, *args), "engine")

    def camera(self, *args: str, size: str = "64x48", rate: float = 10.0) -> Child:
        return self.start("camera", cdae("sim-camera", "--prefix", self.camera_prefix, "--size", size,
                                          "--rate", str(rate), "--bank", "2", *args), "camera", CAMERA_PORT,
                          env=pva_server_env(CAMERA_PVA_PORT))

    def nd_source(self, element: str = "int16", max_elements: int = 64 * 48 * 3, *args: str) -> Child:
        """A scripted NDStdArrays source (nd_source_child.py) under the camera prefix; frames on demand
        (:func:`push_frames`)."""
        script = str(Path(__file__).resolve().parent / "nd_source_child.py")
        return self.start("ndsource", [sys.executable, script, self.camera_prefix, element, str(max_elements), *args],
                          "ndsource", CAMERA_PORT)

    def ioc(self, engine: Child, *args: str, env: dict[str, str] | None = None, source: str | None = None) -> Child:
        assert engine.match is not None
        return self.start("ioc", cdae("ioc", "--source", source or self.camera_prefix, "--prefix", self.ioc_prefix,
                                       "--engine", engine.match["data"], "--control", engine.match["control"],
                                       "--engine-timeout-s", "3", *args), "ioc", IOC_PORT,
                          env={**pva_server_env(IOC_PVA_PORT), **(env or {})})

    def stop_all(self) -> None:
        """SIGINT to every child at once, then each waited for (and terminated if it must be): the children stop
        side by side, not one after another."""
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGINT)
        for c in reversed(self.children):
            c.stop()

    def output(self) -> str:
        return "\n".join(c.output() for c in self.children)


# --- CA helpers (caproto's sync client: fresh sockets per call, reads this process's env) -----

_CTX: object | None = None
_CTX_LOCK = threading.Lock()


def _context() -> object:
    """One caproto threading client for the whole session: it caches channels and reconnects by itself."""
    global _CTX
    with _CTX_LOCK:
        if _CTX is None:
            from caproto.threading.client import Context

            _CTX = Context(timeout=5.0)
        return _CTX


def _pv(name: str) -> object:
    (pv,) = _context().get_pvs(name, timeout=5.0)  # type: ignore[attr-defined]
    return pv


def ca_read(name: str, timeout: float = 5.0, data_type: str = "time") -> object:
    return _pv(name).read(data_type=data_type, timeout=timeout)  # type: ignore[attr-defined]


def ca_write(name: str, value: object, timeout: float = 10.0) -> None:
    _pv(name).write(value if isinstance(value, (list, tuple)) else [value], wait=True, timeout=timeout)  # type: ignore[attr-defined]


def wait_for(predicate: Callable[[], object], timeout_s: float = 30.0, what: str = "condition",
             poll_s: float = 0.1) -> object:
    """Poll ``predicate`` until it returns something truthy; CA errors while waiting count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            v = predicate()
            if v:
                return v
        except Exception as e:  # not connected yet, timeout: keep polling
            last = e
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}" + (f" (last error: {last!r})" if last else ""))


def value_of(name: str) -> object:
    r = ca_read(name)
    data = r.data  # type: ignore[attr-defined]
    if len(data) == 1:
        v = data[0]
        return v.decode() if isinstance(v, bytes) else v
    return data


def pause_and_settle(stack: Stack) -> int:
    """Stop the camera and wait until the filter has published the camera's last frame; returns its UniqueId."""
    cam, out = stack.camera_prefix, stack.ioc_prefix
    ca_write(cam + "Acquire", 0)
    last = int(value_of(cam + "UniqueId_RBV"))  # type: ignore[arg-type]
    wait_for(lambda: int(value_of(out + "UniqueId_RBV")) == last, 30, f"the filter to publish frame {last}")  # type: ignore[arg-type]
    return last


def push_frames(stack: Stack, **command: object) -> None:
    """Frames from :meth:`Stack.nd_source`: the put returns once they are all posted (fields: nd_source_child.py)."""
    import json

    from caproto import ChannelType

    _pv(stack.camera_prefix + "Cmd").write(list(json.dumps(command).encode()) + [0], wait=True, timeout=30,  # type: ignore[attr-defined]
                                           data_type=ChannelType.CHAR)


def string_of(name: str) -> str:
    r = ca_read(name, data_type="native")
    data = r.data  # type: ignore[attr-defined]
    if isinstance(data[0], bytes) and len(data) == 1:
        return data[0].decode()
    return bytes(bytearray(int(x) for x in data)).split(b"\0")[0].decode()


def long_string_of(name: str) -> str:
    """A long string PV (served as DBR_STRING, first 40 characters) read whole, as CHAR, through ``NAME.VAL$``."""
    data = ca_read(name + ".VAL$", data_type="native").data  # type: ignore[attr-defined]
    return bytes(bytearray(int(x) for x in data)).split(b"\0")[0].decode()
