"""IOC fixtures: real processes (engine, simulated camera, filter IOC) on loopback, isolated CA ports.

Each test uses a random PV prefix. Readiness: a ready line, then a PV that connects; teardown:
SIGINT, then terminate, then kill; the children's output is printed when a test failed.
See ioc_helpers.py for the CA environment.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ioc_helpers import Stack, write_tiny_store  # noqa: E402


@pytest.fixture(scope="session")
def ioc_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_store(tmp_path_factory.mktemp("ioc-store") / "models")


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # noqa: ANN201
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True


@pytest.fixture
def stack(request: pytest.FixtureRequest, ioc_store: Path) -> Iterator[Stack]:
    s = Stack(ioc_store)
    yield s
    s.stop_all()
    if request.node.stash.get(_FAILED, False):
        print(s.output())


