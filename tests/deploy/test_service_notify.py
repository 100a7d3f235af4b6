"""The real services under a NOTIFY_SOCKET this test owns, as systemd runs them with Type=notify and WatchdogSec.

The engine (torch-cpu, the shipped model) and the filter IOC (a simulated camera, an engine)
must send READY=1 only once they serve, then WATCHDOG=1 pings carrying a STATUS line, then
STOPPING=1 on SIGTERM and exit cleanly; the IOC, waiting for a camera that is not there yet,
pushes its start timeout on instead of being ready.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from cdae.children import ChildProcess
from cdae.engine.client import ControlClient, EngineClient
from cdae.engine.config import EngineConfig
from cdae.engine.server import EngineServer, supervise
from cdae.notify import Notifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ioc"))
from ioc_helpers import Child, Stack, ca_read  # noqa: E402

MODEL = "tiny:1"  # the conftest's tiny package: these tests are about the services, not the weights
ENGINE_READY = re.compile(r"^cdae-engine ready data=(?P<data>\S+) control=(?P<control>\S+) ")


def _first(messages: list[dict[str, str]], key: str) -> int:
    return next(i for i, m in enumerate(messages) if key in m)


def test_engine_notifies_ready_watchdog_and_stopping(tmp_path: Path, notify_listener, tiny_package: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **notify_listener.env(1_000_000)}
    cmd = [sys.executable, "-m", "cdae.cli", "engine", "--bind", "tcp://127.0.0.1:0", "--threads", "1",
           "--backend", "torch-cpu", "--models", str(tiny_package.parents[1]), "--model", MODEL]
    engine = ChildProcess("engine", cmd, env, ENGINE_READY.pattern, tmp_path / "engine.log")
    try:
        ready = notify_listener.wait_for(lambda m: "READY" in m, "READY=1")
        assert ready["READY"] == "1"
        assert MODEL in ready["STATUS"] and "torch-cpu" in ready["STATUS"] and "frames served 0" in ready["STATUS"]
        engine.wait_ready(60)
        m = ENGINE_READY.match(engine.ready_line)
        assert m is not None and m["data"] in ready["STATUS"]
        # READY came once the model was loaded and both sockets were bound: the engine answers
        with ControlClient(m["control"], timeout_s=30) as ctl:
            assert ctl.status().result["model"] == MODEL
        frame = np.random.default_rng(0).integers(0, 4096, (64, 64), dtype=np.uint16)
        with EngineClient(m["data"], timeout_s=60) as client:
            assert client.denoise(frame, bit_depth=12).ok

        # pings keep coming, and the STATUS they carry counts the frame just served
        notify_listener.wait_for(lambda x: "WATCHDOG" in x and "frames served 1" in x.get("STATUS", ""),
                                 "a watchdog ping whose status counts the frame")
        notify_listener.wait_for(lambda x: "WATCHDOG" in x, "another watchdog ping")
        messages = notify_listener.messages
        assert notify_listener.count("WATCHDOG") >= 2 and _first(messages, "READY") < _first(messages, "WATCHDOG")
        assert all(x["WATCHDOG"] == "1" for x in messages if "WATCHDOG" in x)
        assert "loading" in messages[0].get("STATUS", "")  # before READY, systemctl status says what it does

        engine.proc.send_signal(signal.SIGTERM)  # what `systemctl stop` sends
        notify_listener.wait_for(lambda x: "STOPPING" in x, "STOPPING=1")
        assert engine.proc.wait(30) == 0
    except BaseException:
        engine.stop()
        print(engine.log_path.read_text())
        raise
    finally:
        engine.stop()


def test_ioc_waits_for_its_camera_then_notifies_ready_watchdog_and_stopping(notify_listener, tiny_package: Path) -> None:
    stack = Stack(tiny_package.parents[1])
    try:
        engine = stack.engine("--backend", "passthrough", model=MODEL)
        started: list[Child] = []
        errors: list[BaseException] = []

        def start_ioc() -> None:  # blocks until the IOC's ready line, i.e. until the camera is there
            try:
                started.append(stack.ioc(engine, env=notify_listener.env(1_000_000)))
            except BaseException as e:  # noqa: BLE001 - reported by the test thread
                errors.append(e)

        starter = threading.Thread(target=start_ioc, daemon=True)
        starter.start()
        # no camera yet: alive, not ready — the start timeout is pushed on, with a status saying why
        waiting = notify_listener.wait_for(lambda m: "EXTEND_TIMEOUT_USEC" in m, "EXTEND_TIMEOUT_USEC")
        assert int(waiting["EXTEND_TIMEOUT_USEC"]) > 0 and "waiting for the source" in waiting["STATUS"]
        assert stack.camera_prefix in waiting["STATUS"]
        assert notify_listener.count("READY") == 0

        stack.camera()
        ready = notify_listener.wait_for(lambda m: "READY" in m, "READY=1")
        starter.join(90)
        assert not errors and started, errors
        ioc = started[0]
        assert stack.ioc_prefix in ready["STATUS"]
        # READY came once the CA server was listening: its PVs answer
        assert ca_read(stack.ioc_prefix + "Status_RBV") is not None

        status = notify_listener.wait_for(
            lambda m: "WATCHDOG" in m and "engine connected" in m.get("STATUS", "")
            and re.search(r"frames published [1-9]", m["STATUS"]) is not None,
            "a watchdog ping whose status shows the engine connected and frames published")
        assert MODEL in status["STATUS"] and "source connected" in status["STATUS"]
        notify_listener.wait_for(lambda m: "WATCHDOG" in m, "another watchdog ping")
        messages = notify_listener.messages
        assert notify_listener.count("WATCHDOG") >= 2 and _first(messages, "READY") < _first(messages, "WATCHDOG")
        assert not any("EXTEND_TIMEOUT_USEC" in m for m in messages[_first(messages, "READY"):])

        assert ioc.proc is not None
        ioc.proc.send_signal(signal.SIGTERM)
        notify_listener.wait_for(lambda m: "STOPPING" in m, "STOPPING=1")
        assert ioc.proc.wait(30) == 0
    except BaseException:
        stack.stop_all()
        print(stack.output())
        raise
    finally:
        stack.stop_all()


def test_engine_withholds_the_watchdog_while_its_worker_is_wedged(notify_listener, tiny_package: Path) -> None:
    config = EngineConfig(bind="tcp://127.0.0.1:0", backend="passthrough", models_dir=tiny_package.parents[1],
                          model=MODEL)
    server = EngineServer(config, log=lambda s: None)
    server.start()
    notifier = Notifier(env=notify_listener.env(1_000_000), log=lambda s: None)
    stop = threading.Event()
    supervisor = threading.Thread(target=supervise, args=(server, stop, notifier), kwargs={"poll_s": 0.05})
    try:
        notifier.ready(server.status_line())
        supervisor.start()
        notify_listener.wait_for(lambda m: "WATCHDOG" in m, "a watchdog ping")
        assert server.stalled(60.0) == []
        # A real wedge: the worker blocks on its queue's lock, as it would on a hung device call.
        with server.queue._cond:
            notify_listener.wait_for(lambda m: m.get("STATUS", "").startswith("stalled: worker"),
                                     "the stalled status instead of a ping")
            assert "worker" in server.stalled(notifier.watchdog_timeout_s or 1.0)
            pings = notify_listener.count("WATCHDOG")
        notify_listener.wait_for(lambda m: "WATCHDOG" in m, "pings again once the worker runs")
        assert notify_listener.count("WATCHDOG") == pings + 1
    finally:
        stop.set()
        if supervisor.is_alive():
            supervisor.join(10)
        server.stop()
        notifier.close()
