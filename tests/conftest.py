"""Shared fixtures: tiny configurations and packages that train in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

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
