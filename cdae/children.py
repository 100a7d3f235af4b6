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
