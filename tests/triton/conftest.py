"""Triton fixtures: a real tritonserver (nvidia-pytriton's bundled binary) on loopback ports, one per module.

Skipped only where that server cannot run here: not installed (``make venv`` installs it into
.venv/tritonserver), glibc older than 2.35, or no Python-backend stub for this Python.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ioc"))
from ioc_helpers import Stack, write_tiny_store  # noqa: E402

from cdae.children import free_port  # noqa: E402


def bundled_server_missing() -> str | None:
    """Why the bundled server cannot run here, or None."""
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError:
        return "tritonclient[grpc] is not installed (pip install 'cdae[triton]')"
    from cdae.deploy.triton import TritonError, find_bundled_server

    try:
        server = find_bundled_server()
    except TritonError as e:
        return str(e)
    libc, version = platform.libc_ver()
    if libc == "glibc" and tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
        return f"the bundled tritonserver needs glibc >= 2.35, this machine has {version}"
    if not server.stub().is_file():
        return f"the bundled server has no Python-backend stub for Python {sys.version_info[0]}.{sys.version_info[1]}"
    return None


@pytest.fixture(scope="session")
def triton_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_store(tmp_path_factory.mktemp("triton-store") / "models")


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory: pytest.TempPathFactory, triton_store: Path) -> Path:
    """tiny:1 and tiny:2 exported (frame path on torch-cpu; the ONNX network model beside it)."""
    pytest.importorskip("tritonclient.grpc")
    from cdae.deploy.triton import export_repository
    from cdae.engine.config import FramePathSettings

    repo = tmp_path_factory.mktemp("triton-repo")
    export_repository([triton_store / "tiny" / "1", triton_store / "tiny" / "2"], repo,
                      settings=FramePathSettings(backend="torch-cpu", threads=1, warmup_shape=(48, 64)),
                      onnx=True, tensorrt=False, frames=2)
    return repo


class Server:
    """A started bundled tritonserver and what a test needs of it (its URL); restartable on the same ports."""

    def __init__(self, repo: Path, workdir: Path) -> None:
        from cdae.deploy.triton import TritonServer

        self.ports = dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
        self.repo, self.workdir = repo, workdir
        self.server = TritonServer(repo, load=["tiny"], workdir=workdir, **self.ports)

    @property
    def url(self) -> str:
        return f"triton://127.0.0.1:{self.ports['grpc_port']}/tiny"

    def start(self) -> Server:
        self.server.start(timeout_s=120)
        return self

    def restart(self) -> Server:
        from cdae.deploy.triton import TritonServer

        self.server.stop()
        self.server = TritonServer(self.repo, load=["tiny"], workdir=self.workdir, **self.ports)
        return self.start()


@pytest.fixture(scope="module")
def triton(triton_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    why = bundled_server_missing()
    if why:
        pytest.skip(why)
    s = Server(triton_repo, tmp_path_factory.mktemp("tritonserver")).start()
    yield s
    s.server.close()
    if os.environ.get("CDAE_TRITON_LOG"):
        print(s.server.log_tail(200))


@pytest.fixture
def stack(triton_store: Path) -> Iterator[Stack]:
    s = Stack(triton_store)
    yield s
    s.stop_all()
