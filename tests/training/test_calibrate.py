"""The defect head's threshold for the guard, by conformal risk control (training/calibrate.py)."""

from __future__ import annotations

import json
from pathlib import Path


from cdae.engine.guard import CALIBRATION_FILE, GuardConfig, for_package
from cdae.engine.inference import Denoiser
from cdae.training.calibrate import calibrate, calibrate_package
from cdae.training.config import DataConfig
from cdae.training.dataset import simulated_frames


def test_threshold_meets_the_conformal_bound_and_is_written_beside_the_package(tiny_package: Path) -> None:
    c = calibrate_package(tiny_package, frames=24, alpha=0.2)
    record = json.loads((tiny_package / CALIBRATION_FILE).read_text())
    assert record["defect_threshold"] == c.defect_threshold and record["alpha"] == 0.2
    if c.defect_threshold is not None:
        assert 0.5 <= c.defect_threshold < 1
        assert c.risk_bound <= 0.2 + 1e-12
        assert abs(c.risk_bound - (24 / 25 * c.mean_loss + 1 / 25)) < 1e-12
        # the guard of this package takes it; an explicit threshold or None is kept
        assert for_package(GuardConfig(), tiny_package).defect_threshold == c.defect_threshold
    assert for_package(GuardConfig(defect_threshold=0.9), tiny_package).defect_threshold == 0.9
    assert for_package(GuardConfig(defect_threshold=None), tiny_package).defect_threshold is None


def test_too_few_frames_for_alpha_give_no_threshold(tiny_package: Path) -> None:
    """With n frames the bound is at least 1 / (n + 1): below that no threshold is claimed."""
    data = DataConfig()
    frames = simulated_frames(data, data.val_seed, 0, 4, ((64, 64),))
    c = calibrate(Denoiser.from_package(tiny_package), frames, alpha=0.1)
    assert c.defect_threshold is None and c.risk_bound >= 1 / 5


def test_a_package_without_calibration_flags_nothing_learned(tmp_path: Path) -> None:
    assert for_package(GuardConfig(), tmp_path).defect_threshold is None
    (tmp_path / CALIBRATION_FILE).write_text("not json")
    assert for_package(GuardConfig(), tmp_path).defect_threshold is None
