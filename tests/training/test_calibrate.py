"""The defect head's threshold for the guard, by conformal risk control (training/calibrate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


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


def test_the_confidence_bound_is_valid_and_tighter_than_hoeffding() -> None:
    import math

    from cdae.training.calibrate import hoeffding_bentkus_ucb

    for n, mean in ((200, 0.0), (1000, 0.001), (500, 0.05)):
        ucb = hoeffding_bentkus_ucb(mean, n, 0.1)
        assert mean <= ucb <= mean + math.sqrt(math.log(10) / (2 * n))  # never looser than Hoeffding's
    assert abs(hoeffding_bentkus_ucb(0.0, 1000, 0.1) - math.log(1 / 0.1) / 1000) < 5e-5  # no loss: (1 - R)^n = delta
    # coverage: over many calibration sets of Bernoulli(p) losses, the bound falls below p at most delta of the time
    rng = np.random.default_rng(0)
    p, n = 0.02, 300
    below = sum(hoeffding_bentkus_ucb(float(rng.binomial(n, p)) / n, n, 0.1) < p for _ in range(200))
    assert below / 200 <= 0.1


def test_with_confidence_the_threshold_is_higher_and_needs_more_frames() -> None:
    from cdae.training.calibrate import choose_threshold

    rng = np.random.default_rng(1)
    probs, brights = [], []
    for _ in range(200):  # a head that gives real bright pixels low probabilities, with a tail
        probs.append(rng.beta(1, 12, size=(16, 16)).astype(np.float32))
        brights.append(rng.random((16, 16)) < 0.3)
    t_exp, b_exp = choose_threshold(probs, brights, alpha=0.02)
    t_conf, b_conf = choose_threshold(probs, brights, alpha=0.02, delta=0.1)
    assert t_exp is not None and t_conf is not None and t_conf >= t_exp and b_conf <= 0.02 and b_exp <= 0.02
    # 40 frames cannot give 90 % confidence at alpha 0.02 (log(1 / 0.1) / 0.02 = 116 frames at least)
    assert choose_threshold(probs[:40], brights[:40], alpha=0.02, delta=0.1)[0] is None


def test_the_command_holds_alpha_with_confidence_by_default_and_in_expectation_with_delta_0(tiny_package: Path) -> None:
    """`cdae calibrate` states the issue's guarantee by default (alpha with 90 % confidence); --delta 0 asks for
    conformal risk control in expectation; a delta outside [0, 1) is a one-line error."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("cdae")
    where = ["--model", "tiny:1", "--models-dir", str(tiny_package.parent.parent)]
    r = subprocess.run([str(exe), "calibrate", *where, "--frames", "24", "--alpha", "0.3"], capture_output=True,
                       text=True, timeout=300)
    record = json.loads((tiny_package / CALIBRATION_FILE).read_text())
    assert record["delta"] == 0.1 and record["alpha"] == 0.3 and record["frames"] == 24, r.stderr
    assert "Bates" in record["method"]
    r = subprocess.run([str(exe), "calibrate", *where, "--frames", "24", "--alpha", "0.3", "--delta", "0"],
                       capture_output=True, text=True, timeout=300)
    record = json.loads((tiny_package / CALIBRATION_FILE).read_text())
    assert record["delta"] is None and "conformal risk control" in record["method"], r.stderr
    r = subprocess.run([str(exe), "calibrate", *where, "--delta", "1.5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--delta" in r.stderr and "Traceback" not in r.stderr
