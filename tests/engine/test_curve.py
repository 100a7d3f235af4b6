"""CURVE on both engine sockets (issue 21): keys from `cdae keys`, allowed clients get frames, others nothing.

A real engine (``cdae engine`` child on 127.0.0.1, started from a site file) and real clients.
"""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import zmq

from cdae.engine.client import AsyncEngineClient, ControlClient, EngineClient
from cdae.engine.config import CurveClientKeys
from cdae.engine.errors import EngineTimeout
from cdae.engine.pipeline import synthetic_frame

if TYPE_CHECKING:
    from conftest import EngineLauncher, EngineProcess


def _cdae(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdae.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    out = _cdae("keys", "engine", "--dir", str(d))
    assert out.returncode == 0, out.stderr
    out = _cdae("keys", "ioc", "--dir", str(d), "--allow", str(d / "allowed"))
    assert out.returncode == 0, out.stderr
    out = _cdae("keys", "stranger", "--dir", str(d))  # a valid key pair the engine does not know
    assert out.returncode == 0, out.stderr
    return d


@pytest.fixture(scope="module")
def curve_engine(engine_launcher: EngineLauncher, engine_store: Path, keys: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    site = tmp_path_factory.mktemp("curve-site") / "site.toml"
    site.write_text("\n".join([
        f"models_dir = {json.dumps(str(engine_store))}", "[engines.e]", 'model = "tiny:1"', 'backend = "torch-cpu"',
        "[engines.e.curve]", f"secret_key_file = {json.dumps(str(keys / 'engine.key_secret'))}",
        f"allowed_clients_dir = {json.dumps(str(keys / 'allowed'))}"]) + "\n")
    eng = engine_launcher.start("--config", str(site), "--name", "e", name="curve")
    yield eng
    engine_launcher.stop(eng)


def _client_keys(keys: Path, name: str) -> CurveClientKeys:
    return CurveClientKeys(secret_key_file=keys / f"{name}.key_secret", server_public_key_file=keys / "engine.key")


def test_keys_are_zmq_certificates_with_a_private_secret(keys: Path) -> None:
    public, secret = zmq.auth.load_certificate(str(keys / "ioc.key_secret"))
    assert len(public) == 40 and secret and len(secret) == 40
    assert zmq.auth.load_certificate(str(keys / "ioc.key")) == (public, None)
    assert stat.S_IMODE((keys / "ioc.key_secret").stat().st_mode) == 0o600
    assert (keys / "allowed" / "ioc.key").read_text() == (keys / "ioc.key").read_text()
    again = _cdae("keys", "ioc", "--dir", str(keys))
    assert again.returncode == 1 and "refusing to replace" in again.stderr  # a deployed key is never overwritten


def test_allowed_client_gets_frames_and_control(curve_engine: EngineProcess, keys: Path) -> None:
    frame = synthetic_frame((32, 48), "uint16")
    ioc = _client_keys(keys, "ioc")
    with EngineClient(curve_engine.data, curve=ioc, timeout_s=30) as c:
        r = c.denoise(frame)
    assert r.ok and r.model == "tiny:1" and r.denoised is not None and r.denoised.shape == frame.shape

    async def run() -> bool:
        async with AsyncEngineClient(curve_engine.data, curve=ioc, timeout_s=30) as ac:
            return (await ac.denoise(frame)).ok

    assert asyncio.run(run())
    with ControlClient(curve_engine.control, curve=ioc, timeout_s=10) as ctl:
        s = ctl.status()
    assert s.ok and s.result["curve"] is True


def test_unknown_or_plain_clients_get_nothing_and_the_refusal_is_logged(curve_engine: EngineProcess,
                                                                       keys: Path) -> None:
    frame = synthetic_frame((16, 16), "uint16")
    stranger = _client_keys(keys, "stranger")
    with EngineClient(curve_engine.data, curve=stranger, timeout_s=2) as c, pytest.raises(EngineTimeout):
        c.denoise(frame)
    with ControlClient(curve_engine.control, curve=stranger, timeout_s=2) as ctl, pytest.raises(EngineTimeout):
        ctl.status()
    with EngineClient(curve_engine.data, timeout_s=2) as c, pytest.raises(EngineTimeout):  # no CURVE at all
        c.denoise(frame)
    # the right client key but the wrong engine key: the client refuses the engine
    wrong_server = CurveClientKeys(secret_key_file=keys / "ioc.key_secret", server_public_key_file=keys / "stranger.key")
    with EngineClient(curve_engine.data, curve=wrong_server, timeout_s=2) as c, pytest.raises(EngineTimeout):
        c.denoise(frame)
    stranger_public = zmq.auth.load_certificate(str(keys / "stranger.key"))[0].decode()
    deadline = time.monotonic() + 5
    while stranger_public not in curve_engine.stderr_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = curve_engine.stderr_path.read_text()
    assert f"refused a client with public key {stranger_public}" in log
    assert log.count(stranger_public) <= 2  # once per socket, not once per reconnect
    with EngineClient(curve_engine.data, curve=_client_keys(keys, "ioc"), timeout_s=30) as c:
        assert c.denoise(frame).ok  # and it keeps serving the allowed


def test_a_secret_key_others_can_read_is_refused_at_start(engine_store: Path, keys: Path, tmp_path: Path) -> None:
    leaky = tmp_path / "engine.key_secret"
    leaky.write_text((keys / "engine.key_secret").read_text())
    leaky.chmod(0o644)
    site = tmp_path / "site.toml"
    site.write_text("\n".join([
        f"models_dir = {json.dumps(str(engine_store))}", "[engines.e]", 'model = "tiny:1"', 'backend = "torch-cpu"',
        'bind = "tcp://127.0.0.1:0"', "[engines.e.curve]", f"secret_key_file = {json.dumps(str(leaky))}",
        f"allowed_clients_dir = {json.dumps(str(keys / 'allowed'))}"]) + "\n")
    out = _cdae("engine", "--config", str(site), "--name", "e", "--threads", "1")
    assert out.returncode == 2 and "cdae engine: error:" in out.stderr and "chmod 600" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_config_check_refuses_a_network_engine_without_curve(keys: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text('[engines.gpu0]\nbind = "tcp://0.0.0.0:5555"\nbackend = "torch-cpu"\n')
    out = _cdae("config", "check", "--no-models", str(plain))
    assert out.returncode == 1, out.stdout
    assert "2: engines.gpu0.bind: tcp://0.0.0.0:5555 is reachable from the network without authentication" in out.stdout
    assert "engines.gpu0.control: tcp://0.0.0.0:5556" in out.stdout
    secured = tmp_path / "secured.toml"
    secured.write_text(plain.read_text() + "[engines.gpu0.curve]\n"
                       f"secret_key_file = {json.dumps(str(keys / 'engine.key_secret'))}\n"
                       f"allowed_clients_dir = {json.dumps(str(keys / 'allowed'))}\n")
    out = _cdae("config", "check", "--no-models", str(secured))
    assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text(plain.read_text() + "[engines.gpu0.curve]\n"
                      f"secret_key_file = {json.dumps(str(keys / 'engine.key'))}\n"  # the public file
                      f"allowed_clients_dir = {json.dumps(str(tmp_path / 'none'))}\n")
    out = _cdae("config", "check", "--no-models", str(broken))
    assert out.returncode == 1 and "no secret-key" in out.stdout and "is not a folder" in out.stdout, out.stdout
    loopback = tmp_path / "loopback.toml"
    loopback.write_text('[engines.gpu0]\nbind = "tcp://127.0.0.1:5555"\nbackend = "torch-cpu"\n')
    assert _cdae("config", "check", "--no-models", str(loopback)).returncode == 0


def test_key_paths_are_relative_to_the_site_file(keys: Path, tmp_path: Path) -> None:
    from cdae.deploy.site import check_site, load_site

    site = keys / "site.toml"  # beside the keys, run from elsewhere
    site.write_text('[engines.gpu0]\nbind = "tcp://0.0.0.0:5555"\nbackend = "torch-cpu"\n'
                    '[engines.gpu0.curve]\nsecret_key_file = "engine.key_secret"\nallowed_clients_dir = "allowed"\n')
    assert check_site(site, check_models=False) == []
    curve = load_site(site).engine_config("gpu0").curve
    assert curve is not None and curve.secret_key_file == keys / "engine.key_secret"
    assert curve.allowed_clients_dir == keys / "allowed"
