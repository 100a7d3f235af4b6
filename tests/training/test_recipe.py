"""The staged from-scratch recipe and its reproducibility rule (training/environment.py)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from cdae.cli import main
from cdae.engine.package import read_manifest, sha256_file
from cdae.training.config import ConfigError, load_train_config
from cdae.training.environment import compare_run, environment_differences, training_environment
from cdae.training.train import train

DATA = Path(__file__).parent / "data"
RECIPE = DATA / "tiny-recipe.toml"
RECORD = DATA / "tiny-recipe.json"
SHIPPED_RECIPE = Path(__file__).parents[2] / "training" / "configs" / "cdae-default.toml"


def _quiet(_: str) -> None:
    pass


def _record(pkg: Path) -> dict:
    m = read_manifest(pkg).model_dump(mode="json")
    return {k: m[k] for k in ("weights_sha256", "metrics", "environment")}


def test_stages_are_the_config_with_their_sections_changed() -> None:
    cfg = load_train_config(RECIPE)
    base, bright = cfg.stage_configs()
    assert (base.optim.epochs, base.data.patch_size, base.loss.bright_weight) == (2, 32, 16.0)
    assert (bright.optim.epochs, bright.data.patch_size, bright.loss.bright_weight) == (1, 48, 64.0)
    assert bright.data.scene.saturating_fraction == 0.45 and bright.data.val_size == 32  # the rest is inherited
    assert bright.loss.class_weights == {"radiation_track": 32.0} and not bright.stages


def test_bad_stages_are_refused_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match="stage 'b'.*bright_weight"):
        load_train_config(RECIPE, ["stages=[{name: b, loss: {bright_weight: -1}}]"])
    with pytest.raises(ConfigError, match="names must differ"):
        load_train_config(RECIPE, ["stages=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="nonsense"):
        load_train_config(RECIPE, ["stages=[{name: a, nonsense: {}}]"])


def test_the_shipped_recipe_is_staged_from_scratch() -> None:
    cfg = load_train_config(SHIPPED_RECIPE)
    assert cfg.init_from is None and len(cfg.stages) >= 2 and cfg.device == "cpu"


def test_a_staged_run_resumed_mid_recipe_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    cfg = load_train_config(RECIPE)
    full = train(cfg, tmp_path / "full", tmp_path / "rf", progress=False, log=_quiet).package
    train(cfg, tmp_path / "part", tmp_path / "rp", progress=False, log=_quiet, stop_after_epochs=2)
    resumed = train(cfg, tmp_path / "part", tmp_path / "rp", resume=True, progress=False, log=_quiet).package
    assert sha256_file(full / "weights.safetensors") == sha256_file(resumed / "weights.safetensors")
    m = read_manifest(full)
    assert [s["name"] for s in m.metrics["stages"]] == ["base", "bright"]
    assert m.metrics["epochs"] == 3 and m.metrics["cpu_seconds"] >= 0
    assert m.environment["torch"] and m.environment["threads"] == 1 and m.environment["cpu_model"]
    assert m.environment["cpu_id"] and "cpu_isa" in m.environment  # what tells two "AMD EPYC"s apart
    assert (full / "loss.png").is_file()


def test_the_recorded_tiny_recipe_is_reproduced(tmp_path: Path) -> None:
    pkg = train(load_train_config(RECIPE), tmp_path / "m", tmp_path / "r", progress=False, log=_quiet).package
    rerun = _record(pkg)
    if os.environ.get("CDAE_RECORD"):
        RECORD.write_text(json.dumps(rerun, indent=1) + "\n")
    recorded = json.loads(RECORD.read_text())
    verdict = compare_run(recorded, rerun)
    assert verdict.ok, str(verdict)
    if not environment_differences(recorded["environment"], training_environment(1)):
        assert verdict.kind == "bit-for-bit"


def test_the_rule_tells_bit_for_bit_tolerance_and_difference() -> None:
    env = training_environment(2)
    rec = {"weights_sha256": "a" * 64, "metrics": {"val_psnr_db": 40.0, "val_loss": 0.1}, "environment": env}
    assert compare_run(rec, dict(rec)).kind == "bit-for-bit"
    assert compare_run(rec, {**rec, "weights_sha256": "b" * 64}).kind == "different"  # same env, other weights
    other = {**env, "torch": "0.0.1"}
    near = {"weights_sha256": "b" * 64, "metrics": {"val_psnr_db": 40.2, "val_loss": 0.103}, "environment": other}
    assert compare_run(rec, near).kind == "within-tolerance"
    far = {**near, "metrics": {"val_psnr_db": 39.0, "val_loss": 0.103}}
    verdict = compare_run(rec, far)
    assert verdict.kind == "different" and "val_psnr_db" in str(verdict) and "torch" in str(verdict)


def test_cdae_train_compare_says_which_and_fails_on_a_difference(tmp_path: Path, capsys) -> None:
    args = ["train", "--config", str(RECIPE), "--out", str(tmp_path / "a"), "--run-dir", str(tmp_path / "r"),
            "--no-progress", "--set", "stages=[{name: only, optim: {epochs: 1}}]"]
    assert main(args) == 0
    ref = tmp_path / "a" / "tiny-recipe" / "1"
    assert main([*args[:4], str(tmp_path / "b"), *args[5:], "--compare", str(ref)]) == 0
    assert "bit for bit" in capsys.readouterr().out
    assert main([*args[:4], str(tmp_path / "c"), *args[5:], "--set", "seed=1", "--compare", str(ref)]) == 1
    assert "NOT reproduced" in capsys.readouterr().out
    record = tmp_path / "run.json"  # a run's record (sha256, metrics, environment) stands in for its package
    record.write_text(json.dumps(_record(ref)))
    assert main([*args[:4], str(tmp_path / "d"), *args[5:], "--compare", str(record)]) == 0
    assert "bit for bit" in capsys.readouterr().out
    assert main([*args[:4], str(tmp_path / "e"), *args[5:], "--compare", str(tmp_path / "none" / "x")]) == 0
    assert "no package or run record there" in capsys.readouterr().out


def test_a_weight_averaged_recipe_ships_the_average_and_resumes_to_the_bit(tmp_path: Path) -> None:
    """``optim.ema_decay``: each stage hands on (and the package holds) the average of its weights, not the last
    step's; the average is checkpointed, so a run stopped mid-recipe and resumed gives the same bits."""
    plain_cfg = load_train_config(RECIPE)
    cfg = load_train_config(RECIPE, ["optim.ema_decay=0.9"])
    assert all(s.optim.ema_decay == 0.9 for s in cfg.stage_configs())
    plain = train(plain_cfg, tmp_path / "plain", tmp_path / "r0", progress=False, log=_quiet).package
    full = train(cfg, tmp_path / "full", tmp_path / "rf", progress=False, log=_quiet).package
    train(cfg, tmp_path / "part", tmp_path / "rp", progress=False, log=_quiet, stop_after_epochs=2)
    resumed = train(cfg, tmp_path / "part", tmp_path / "rp", resume=True, progress=False, log=_quiet).package
    assert sha256_file(full / "weights.safetensors") == sha256_file(resumed / "weights.safetensors")
    assert sha256_file(full / "weights.safetensors") != sha256_file(plain / "weights.safetensors")
    m = read_manifest(full)
    assert [s.get("ema_decay") for s in m.metrics["stages"]] == [0.9, 0.9]
    assert m.training_config["optim"]["ema_decay"] == 0.9
    with open(full / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["base", "base", "bright"]
    # the logged validation is the average's, beside the optimiser's own: two different weight sets
    assert all(r["val_psnr_raw_db"] and r["val_psnr_db"] != r["val_psnr_raw_db"] for r in rows)
    assert float(rows[-1]["val_psnr_db"]) == pytest.approx(m.metrics["val_psnr_db"])


def test_a_near_zero_decay_averages_nothing_away(tmp_path: Path) -> None:
    """The average with decay ~0 is the optimiser's weights at every step: the same bits as no average, so the
    averaging adds nothing of its own (no other arithmetic, no random numbers drawn)."""
    one = ["stages=[{name: only, optim: {epochs: 1}}]"]
    plain = train(load_train_config(RECIPE, one), tmp_path / "a", tmp_path / "ra", progress=False, log=_quiet).package
    avg = train(load_train_config(RECIPE, [*one, "optim.ema_decay=1e-12"]), tmp_path / "b", tmp_path / "rb",
                progress=False, log=_quiet).package
    assert sha256_file(plain / "weights.safetensors") == sha256_file(avg / "weights.safetensors")


def test_resuming_with_another_averaging_is_refused(tmp_path: Path) -> None:
    from cdae.training.train import TrainingError

    one = ["stages=[{name: only, optim: {epochs: 2}}]"]
    plain, averaged = load_train_config(RECIPE, one), load_train_config(RECIPE, [*one, "optim.ema_decay=0.9"])
    for first, then, says in ((plain, averaged, "no weight average"), (averaged, plain, "has a weight average")):
        run = tmp_path / says.replace(" ", "-")
        train(first, run / "m", run / "r", progress=False, log=_quiet, stop_after_epochs=1)
        with pytest.raises(TrainingError, match="its columns"):  # the log first: its columns are the config's
            train(then, run / "m", run / "r", resume=True, progress=False, log=_quiet)
        (run / "r" / "loss.csv").unlink()
        with pytest.raises(TrainingError, match=says):  # then the checkpoint
            train(then, run / "m", run / "r", resume=True, progress=False, log=_quiet)


def test_a_run_stopped_mid_stage_ships_the_average_its_metrics_describe(tmp_path: Path) -> None:
    from cdae.engine.architecture import CDAE
    from cdae.engine.package import load_package
    from cdae.training.dataset import simulated_frames
    from cdae.training.train import validate

    cfg = load_train_config(RECIPE, ["stages=[{name: only, optim: {epochs: 2}}]", "optim.ema_decay=0.9"])
    pkg = train(cfg, tmp_path / "m", tmp_path / "r", progress=False, log=_quiet, stop_after_epochs=1).package
    _, state = load_package(pkg)
    model = CDAE(cfg.architecture)
    model.load_state_dict(state)
    s = cfg.stage_configs()[0]
    val = simulated_frames(s.data, s.data.val_seed, 0, s.data.val_frames, [(s.data.val_size,) * 2])
    assert validate(model, val, s)[1] == read_manifest(pkg).metrics["val_psnr_db"]
