"""Child processes of the demo and the benchmarks: started, awaited by their ready line, stopped cleanly.

One place for the pattern every tool here needs: start ``cdae <subcommand>``, copy its output to a
log file, wait for its ready line (never a fixed sleep), stop with SIGINT, then terminate, then kill.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (Channel Access uses both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise OSError("no free port on 127.0.0.1")


def pva_loopback_env(server_ports: list[int]) -> dict[str, str]:
    """PV Access on loopback only, for the tests and benchmarks: clients search ``127.0.0.1:PORT`` of each
    server (each serves searches and connections on its own port: :func:`pva_server_env`), servers listen
    and send beacons on 127.0.0.1 only, and this process's client has a broadcast port of its own."""
    return {
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_ADDR_LIST": " ".join(f"127.0.0.1:{p}" for p in server_ports),
        "EPICS_PVA_BROADCAST_PORT": str(free_port()),
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    }


def pva_server_env(port: int) -> dict[str, str]:
    """The environment of a child serving PV Access on ``port`` (UDP searches and TCP connections)."""
    return {"EPICS_PVAS_SERVER_PORT": str(port), "EPICS_PVAS_BROADCAST_PORT": str(port)}


def stop_process(proc: subprocess.Popen, sigint_wait_s: float = 10.0) -> int:
    """SIGINT (a clean stop), then terminate, then kill; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(sigint_wait_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    return proc.returncode


class ChildProcess:
    """One child process: waits for its ready line, keeps its output, stops with SIGINT then terminate."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], ready: str, log: Path) -> None:
        self.name, self.cmd, self.log_path = name, cmd, log
        self.ready_line = ""
        self._ready = threading.Event()
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        pattern = re.compile(ready)

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._log.write(line)
                self._log.flush()
                if not self._ready.is_set() and pattern.match(line):
                    self.ready_line = line.strip()
                    self._ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
                raise RuntimeError(f"{self.name} did not start (exit {self.proc.returncode}); its output:\n{tail}")

    def stop(self) -> None:
        stop_process(self.proc)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
