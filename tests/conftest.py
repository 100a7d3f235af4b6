"""Shared fixtures: tiny configurations and packages that train in seconds on a CPU."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

#: Seconds each test file took (setup, call and teardown of its tests) in a recorded run: the order in which
#: files are handed to the workers, longest first. ``make test-durations`` records it again.
DURATIONS = Path(__file__).with_name("durations.json")

TINY_OVERRIDES = [
    "architecture.base_width=4",
    "architecture.depth=1",
    "architecture.convs_per_level=1",
    "data.patch_size=32",
    "data.frames_per_epoch=16",
    "data.val_frames=4",
    "data.val_size=32",
    "optim.batch_size=4",
    "optim.epochs=2",
    "optim.warmup_steps=2",
    "threads=1",
]


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    return list(TINY_OVERRIDES)


@pytest.fixture
def tiny_config():
    from cdae.training.config import load_train_config

    return load_train_config(None, [*TINY_OVERRIDES, "name=tiny", "version=1"])


@pytest.fixture
def tiny_package(tmp_path: Path, tiny_config) -> Path:
    from cdae.training.train import train

    return train(tiny_config, tmp_path / "models", tmp_path / "run", progress=False, log=lambda s: None).package


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest test files first, each file's tests in their own order. ``--dist loadfile`` hands whole files
    to the workers in this order, so no long file is left for the end while the other worker idles; a file
    not in the record (new) goes after the recorded ones, in collection order."""
    try:
        seconds = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return
    items.sort(key=lambda item: -float(seconds.get(item.nodeid.split("::")[0], 0.0)))  # stable: files stay whole


_SPENT: Counter[str] = Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if os.environ.get("CDAE_RECORD_DURATIONS"):
        _SPENT[report.nodeid.split("::")[0]] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """``CDAE_RECORD_DURATIONS=1``: write the files' seconds (in the controller, which gets every worker's reports;
    a worker writes nothing)."""
    if os.environ.get("CDAE_RECORD_DURATIONS") and _SPENT and not hasattr(session.config, "workerinput"):
        record = {f: round(s, 1) for f, s in sorted(_SPENT.items(), key=lambda kv: -kv[1]) if s >= 0.5}
        DURATIONS.write_text(json.dumps(record, indent=0) + "\n")
