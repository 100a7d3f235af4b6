"""Engine fixtures: a model store with two versions and a tampered one, and real engine processes.

Engines run as ``python -m cdae.cli engine`` on 127.0.0.1 with port 0; a fixture waits for the
ready line (never a fixed sleep), stops them with SIGINT then terminate, and prints their output
when a test that used them failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from cdae.engine.architecture import ArchitectureConfig, build_model
from cdae.children import stop_process
from cdae.engine.package import WEIGHTS_FILE, write_package

TINY_ARCH = ArchitectureConfig(base_width=4, depth=1, convs_per_level=1)
READY = re.compile(r"^cdae-engine ready data=(?P<data>\S+) control=(?P<control>\S+) .*model=(?P<model>\S+)")


def write_store(root: Path) -> Path:
    """tiny:1 and tiny:2 (different random weights), tiny:bad (weights altered after hashing)."""
    for version, seed in (("1", 0), ("2", 1), ("bad", 2)):
        torch.manual_seed(seed)
        write_package(root, name="tiny", version=version, state_dict=build_model(TINY_ARCH).state_dict(),
                      architecture=TINY_ARCH, seed=seed)
    weights = root / "tiny" / "bad" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="session")
def engine_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "models")


@dataclass
class EngineProcess:
    """A running ``cdae engine`` child process and its endpoints."""

    name: str
    proc: subprocess.Popen[str]
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list)
    data: str = ""
    control: str = ""
    ready_line: str = ""
    reader: threading.Thread | None = None

    def output(self) -> str:
        err = self.stderr_path.read_text() if self.stderr_path.exists() else ""
        return f"--- engine {self.name} stdout ---\n{''.join(self.stdout_lines)}--- stderr ---\n{err}"

    def stop(self) -> int:
        """SIGINT, then terminate, then kill; returns the exit status."""
        stop_process(self.proc)
        if self.reader is not None:
            self.reader.join(5)  # it ends at EOF, once the child has exited
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def engine_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdae.cli", "engine", *args]


class EngineLauncher:
    """Starts engines and remembers them, so that failures can print their output and teardown stops them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.running: list[EngineProcess] = []

    def start(self, *args: str, name: str = "engine", timeout_s: float = 90.0) -> EngineProcess:
        err = self.tmp / f"{name}-{len(self.running)}.stderr"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = engine_command("--bind", "tcp://127.0.0.1:0", "--threads", "1", *args)
        with open(err, "w") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        eng = EngineProcess(name=name, proc=proc, stderr_path=err)
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                eng.stdout_lines.append(line)
                m = READY.match(line)
                if m:
                    eng.data, eng.control, eng.ready_line = m["data"], m["control"], line.strip()
                    ready.set()

        eng.reader = threading.Thread(target=read, daemon=True)
        eng.reader.start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                eng.stop()
                raise RuntimeError(f"engine {name} did not become ready (exit {proc.returncode})\n{eng.output()}")
        self.running.append(eng)
        return eng

    def stop(self, eng: EngineProcess) -> int:
        rc = eng.stop()
        if eng in self.running:
            self.running.remove(eng)
        return rc


@pytest.fixture(scope="session")
def engine_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineLauncher]:
    launcher = EngineLauncher(tmp_path_factory.mktemp("engines"))
    yield launcher
    for eng in list(launcher.running):
        launcher.stop(eng)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # noqa: ANN201
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_FAILED] = report.failed


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _print_engine_output_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if request.node.stash.get(_FAILED, False) and "engine_launcher" in request.fixturenames:
        launcher: EngineLauncher = request.getfixturevalue("engine_launcher")
        for eng in launcher.running:
            print(eng.output())
