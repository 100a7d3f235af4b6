"""Evaluation against tuned baselines: the report's numbers are consistent and the files exist."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cdae.engine.inference import Denoiser
from cdae.training.config import DataConfig
from cdae.training.evaluate import evaluate, identity, score
from cdae.training.dataset import simulated_frames


def test_evaluate_writes_report(tmp_path: Path, tiny_package: Path) -> None:
    den = Denoiser.from_package(tiny_package)
    report = evaluate([("tiny:1", den)], tmp_path / "eval", frames=6, val_frames=4, sizes=[(64, 64), (48, 80)],
                      timing=False, log=lambda s: None)
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["best_baseline"] == report["best_baseline"]
    assert set(saved["tuned_baselines"]) == {"median", "gaussian"}
    assert saved["best_baseline"] in saved["tuned_baselines"].values()
    methods = saved["methods"]
    assert {"noisy input", "tiny:1", saved["tuned_baselines"]["median"]} <= set(methods)
    c = saved["comparisons"]["tiny:1"]
    gain = methods["tiny:1"]["summary"]["psnr_db"] - methods[saved["best_baseline"]]["summary"]["psnr_db"]
    assert abs(c["psnr_gain_over_best_baseline_db"] - gain) < 1e-9
    assert isinstance(c["meets_targets"], bool)
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "tiny:1" in md and "Targets met" in md
    assert (tmp_path / "eval" / "panels.png").stat().st_size > 5000


def test_held_out_stream_is_disjoint_and_reproducible() -> None:
    data = DataConfig()
    a = simulated_frames(data, data.test_seed, 0, 3, [(64, 64)])
    b = simulated_frames(data, data.test_seed, 0, 3, [(64, 64)])
    v = simulated_frames(data, data.val_seed, 0, 3, [(64, 64)])
    for x, y, z in zip(a, b, v):
        np.testing.assert_array_equal(x.noisy, y.noisy)
        assert not np.array_equal(x.clean, z.clean)


def test_identity_scores_match_the_noisy_input() -> None:
    frames = simulated_frames(DataConfig(), 3, 0, 4, [(64, 64)])
    s, outputs = score("noisy", identity, frames)
    assert s.summary["n_frames"] == 4 and all(o is f.noisy for o, f in zip(outputs, frames))
