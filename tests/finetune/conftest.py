"""Fixtures of the learn-from-the-camera tests: the simulated camera IOC on loopback (see tests/ioc)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ioc"))
from ioc_helpers import Stack  # noqa: E402


@pytest.fixture
def camera_stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path / "models")
    yield s
    s.stop_all()
    print(s.output())  # shown only when the test fails
