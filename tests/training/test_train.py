"""Training: reproducibility to the bit, resumption, config loading, the package it writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cdae.engine.package import Manifest, load_package, sha256_file
from cdae.training.config import ConfigError, load_train_config
from cdae.training.train import train


def _quiet(_: str) -> None:
    pass


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_same_config_and_seed_give_identical_weights(tmp_path: Path, tiny_config) -> None:
    a = train(tiny_config, tmp_path / "a", tmp_path / "ra", progress=False, log=_quiet).package
    b = train(tiny_config, tmp_path / "b", tmp_path / "rb", progress=False, log=_quiet).package
    assert sha256_file(a / "weights.safetensors") == sha256_file(b / "weights.safetensors")
    other = tiny_config.model_copy(update={"seed": 1})
    c = train(other, tmp_path / "c", tmp_path / "rc", progress=False, log=_quiet).package
    assert sha256_file(c / "weights.safetensors") != sha256_file(a / "weights.safetensors")


def test_resume_equals_uninterrupted(tmp_path: Path, tiny_config) -> None:
    full = train(tiny_config, tmp_path / "full", tmp_path / "rf", progress=False, log=_quiet).package
    train(tiny_config, tmp_path / "part", tmp_path / "rp", progress=False, log=_quiet, stop_after_epochs=1)
    resumed = train(tiny_config, tmp_path / "part", tmp_path / "rp", resume=True, progress=False, log=_quiet).package
    assert sha256_file(full / "weights.safetensors") == sha256_file(resumed / "weights.safetensors")
    rows = _rows(tmp_path / "rp" / "loss.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_package_manifest_records_how_it_was_made(tiny_package: Path, tiny_config) -> None:
    manifest, state = load_package(tiny_package)
    assert manifest.seed == tiny_config.seed
    assert manifest.data_generator_version and manifest.code_version.startswith("0.")
    assert manifest.training_config["data"]["patch_size"] == 32
    assert manifest.weights_sha256 == sha256_file(tiny_package / "weights.safetensors")
    assert "val_psnr_db" in manifest.metrics and manifest.command
    assert (tiny_package / "loss.png").stat().st_size > 1000
    rows = _rows(tiny_package / "loss.csv")
    assert len(rows) == 2 and float(rows[-1]["val_psnr_db"]) > 0
    # the saved config reproduces the run's config exactly
    assert load_train_config(None, []).model_validate(manifest.training_config) == tiny_config


def test_training_improves_on_the_noisy_input(tmp_path: Path, tiny_overrides: list[str]) -> None:
    cfg = load_train_config(None, [*tiny_overrides, "optim.epochs=6", "data.frames_per_epoch=128",
                                   "optim.batch_size=8", "architecture.base_width=8", "optim.lr=3e-3",
                                   "data.val_frames=8", "data.val_size=48"])
    res = train(cfg, tmp_path / "m", tmp_path / "r", progress=False, log=_quiet)
    manifest, _ = load_package(res.package)
    assert res.val_psnr_db > manifest.metrics["val_noisy_psnr_db"] + 0.3


@pytest.mark.parametrize("suffix,text", [
    (".toml", 'seed = 5\n[optim]\nepochs = 3\n'),
    (".yaml", 'seed: 5\noptim:\n  epochs: 3\n'),
    (".json", json.dumps({"seed": 5, "optim": {"epochs": 3}})),
])
def test_config_formats_and_overrides(tmp_path: Path, suffix: str, text: str) -> None:
    p = tmp_path / f"c{suffix}"
    p.write_text(text)
    cfg = load_train_config(p, ["optim.lr=0.01", "data.bit_depths=[12]"])
    assert cfg.seed == 5 and cfg.optim.epochs == 3 and cfg.optim.lr == 0.01 and cfg.data.bit_depths == [12]


@pytest.mark.parametrize("overrides,match", [
    (["optim.epochs=0"], "optim.epochs"),
    (["data.val_seed=3"], "must differ"),
    (["nonsense=1"], "nonsense"),
    (["data.bit_depths=[10]"], "bit_depths"),
    (["no-equals-sign"], "key.path=value"),
])
def test_bad_config_is_reported(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, overrides)


def test_bad_config_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("seed = = 1")
    with pytest.raises(ConfigError, match="c.toml"):
        load_train_config(p)
    with pytest.raises(ConfigError, match="unknown config format"):
        load_train_config(tmp_path / "c.ini") if (tmp_path / "c.ini").write_text("x") else None


def test_recorded_distribution_of_an_older_generator(tiny_package: Path) -> None:
    # A package records its training config; fields the generator gained later would take their new
    # defaults on reading, so a generator-1.1 package is read back with 1.1's unblurred plasma
    # (what evaluate --model-distribution, fuse and finetune replay), a 1.2 one with the PSF.
    from cdae.engine.package import read_manifest
    from cdae.training.config import recorded_data_config
    from cdae.training.simulate import GENERATOR_VERSION, SceneConfig

    m = read_manifest(tiny_package)
    assert m.data_generator_version == GENERATOR_VERSION
    assert recorded_data_config(m).scene.plasma_psf_sigma_px == SceneConfig().plasma_psf_sigma_px != (0.0, 0.0)
    scene = dict(m.training_config["data"]["scene"])
    del scene["plasma_psf_sigma_px"]
    old = m.model_copy(update={"data_generator_version": "1.1",
                               "training_config": {**m.training_config, "data": {**m.training_config["data"],
                                                                                 "scene": scene}}})
    assert recorded_data_config(old).scene.plasma_psf_sigma_px == (0.0, 0.0)
    assert "plasma_psf_sigma_px" not in old.training_config["data"]["scene"]  # the record itself untouched
    # cdae-default:5's manifest as shipped (generator 1.1; the package itself is in git history)
    shipped = Manifest.model_validate_json((Path(__file__).parent / "data" / "cdae-default-5.manifest.json").read_text())
    assert recorded_data_config(shipped).scene.plasma_psf_sigma_px == (0.0, 0.0)


HAS_CUDA = __import__("torch").cuda.is_available()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU: the refusal is for machines without one")
def test_training_on_a_missing_gpu_is_refused_with_the_reason(tmp_path: Path, tiny_overrides: list[str]) -> None:
    from cdae.training.train import TrainingError

    cfg = load_train_config(None, [*tiny_overrides, "device=cuda"])
    with pytest.raises(TrainingError, match="no CUDA GPU; use device=cpu"):
        train(cfg, tmp_path / "m", tmp_path / "r", progress=False, log=_quiet)
    with pytest.raises(TrainingError, match="'cpu' or 'cuda"):
        train(load_train_config(None, [*tiny_overrides, "device=meta"]), tmp_path / "m", tmp_path / "r",
              progress=False, log=_quiet)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_training_on_a_gpu_writes_a_package_that_loads_on_the_cpu(tmp_path: Path, tiny_overrides: list[str]) -> None:
    import torch

    from cdae.engine.inference import Denoiser
    from cdae.engine.pipeline import synthetic_frame

    cpu_cfg = load_train_config(None, [*tiny_overrides, "name=t", "version=cpu"])
    gpu_cfg = load_train_config(None, [*tiny_overrides, "name=t", "version=gpu", "device=cuda"])
    cpu = train(cpu_cfg, tmp_path / "m", tmp_path / "rc", progress=False, log=_quiet)
    gpu = train(gpu_cfg, tmp_path / "m", tmp_path / "rg", progress=False, log=_quiet)
    _, state = load_package(gpu.package)
    assert all(t.device.type == "cpu" for t in state.values())
    # the same optimisation: the GPU's float reductions differ, the result does not by much
    assert abs(gpu.val_psnr_db - cpu.val_psnr_db) < 0.5, (gpu.val_psnr_db, cpu.val_psnr_db)
    frame = synthetic_frame((64, 48), "uint16")
    a = Denoiser.from_package(cpu.package)(frame).denoised.astype(float)
    b = Denoiser.from_package(gpu.package)(frame).denoised.astype(float)
    assert a.shape == b.shape == frame.shape and torch.isfinite(torch.as_tensor(b)).all()
    # resuming a GPU run from its checkpoint continues on the GPU
    train(gpu_cfg, tmp_path / "m2", tmp_path / "rr", progress=False, log=_quiet, stop_after_epochs=1)
    again = train(gpu_cfg, tmp_path / "m2", tmp_path / "rr", resume=True, progress=False, log=_quiet)
    assert abs(again.val_psnr_db - gpu.val_psnr_db) < 0.5


def test_linear_weight_adds_the_restoration_loss_in_linear_units(tiny_config) -> None:
    import torch

    from cdae.engine.architecture import CDAE
    from cdae.training.dataset import simulated_frames
    from cdae.training.train import make_batch, restoration_loss, total_loss

    torch.manual_seed(0)
    model = CDAE(tiny_config.architecture)
    frames = simulated_frames(tiny_config.data, 7, 0, 2, [(32, 32)])
    batch = make_batch(frames, tiny_config)
    plain = total_loss(model, batch, tiny_config)
    cfg = tiny_config.model_copy(update={"loss": tiny_config.loss.model_copy(update={"linear_weight": 2.0})})
    with_linear = total_loss(model, batch, cfg)
    restored, _ = model.forward_compressed(batch.x)
    linear = restoration_loss(model.expand(restored), batch.target, batch.weight, cfg)
    assert linear > 0
    torch.testing.assert_close(with_linear - plain, 2.0 * linear)


def test_class_weights_add_weight_on_the_named_defect_class_only(tiny_config) -> None:
    import numpy as np

    from cdae.training.dataset import simulated_frames
    from cdae.training.defects import RADIATION
    from cdae.training.train import make_batch

    data = tiny_config.data.model_copy(update={"defects": tiny_config.data.defects.model_copy(
        update={"radiation_probability": 1.0, "radiation_hits_per_mpx": (3000.0, 4000.0)})})
    cfg = tiny_config.model_copy(update={"data": data})
    frames = simulated_frames(cfg.data, 7, 0, 2, [(64, 64)])
    radiation = np.stack([(fr.defect_mask & RADIATION) != 0 for fr in frames])[:, None]
    assert radiation.any()
    plain = make_batch(frames, cfg).weight.numpy()
    weighted_cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"class_weights": {"radiation": 16.0}})})
    weighted = make_batch(frames, weighted_cfg).weight.numpy()
    np.testing.assert_allclose(weighted - plain, 16.0 * radiation)
    # the track sub-class: part of the radiation pixels, found by shape
    tracks_cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"class_weights": {"radiation_track": 8.0}})})
    extra = make_batch(frames, tracks_cfg).weight.numpy() - plain
    assert set(np.unique(extra)) <= {0.0, 8.0} and 0 < (extra > 0).sum() < radiation.sum()
    assert not (extra[~radiation] > 0).any()


def test_unknown_defect_class_in_class_weights_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown defect classes"):
        load_train_config(None, ["loss.class_weights={cosmic: 2}"])
    with pytest.raises(ConfigError, match=">= 0"):
        load_train_config(None, ["loss.class_weights={radiation: -1}"])
