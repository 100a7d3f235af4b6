"""Ensembles: members from seeds, weight averaging only from a common parent, output averaging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cdae.engine.inference import Denoiser
from cdae.engine.package import ModelRegistry, load_package
from cdae.training.config import load_train_config
from cdae.training.fuse import FuseError, fuse
from cdae.training.train import train


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    """A parent, two members fine-tuned from it (seeds 1, 2), and an independent member (seed 3)."""
    root = tmp_path_factory.mktemp("models")
    runs = tmp_path_factory.mktemp("runs")
    base = [*tiny_overrides, "name=m", "optim.epochs=1"]
    train(load_train_config(None, [*base, "version=parent"]), root, runs / "p", progress=False, log=_quiet)
    for seed in (1, 2):
        cfg = load_train_config(None, [*base, f"version=ft{seed}", f"seed={seed}", "init_from=m:parent"])
        train(cfg, root, runs / f"ft{seed}", progress=False, log=_quiet)
    train(load_train_config(None, [*base, "version=indep", "seed=3"]), root, runs / "i", progress=False, log=_quiet)
    return root


def _pkgs(root: Path, *versions: str) -> list[Path]:
    reg = ModelRegistry(root)
    return [reg.resolve(f"m:{v}") for v in versions]


def test_members_record_their_parent(store: Path) -> None:
    m, _ = load_package(store / "m" / "ft1")
    assert m.parent == "m:parent" and m.seed == 1


def test_param_average_of_fine_tuned_members(store: Path) -> None:
    pkg = fuse(_pkgs(store, "ft1", "ft2"), "params", store, "m", "soup", val_frames=4, val_size=32, log=_quiet)
    fused, state = load_package(pkg)
    a = load_package(store / "m" / "ft1")[1]
    b = load_package(store / "m" / "ft2")[1]
    for k in state:
        torch.testing.assert_close(state[k], (a[k] + b[k]) / 2)
    assert fused.ensemble.mode == "parameter_average" and fused.ensemble.members == 2
    report = json.loads((pkg / "fuse_report.json").read_text())
    assert set(report["members"]) == {"m:ft1", "m:ft2"}
    assert (pkg / "fuse_report.md").read_text().count("|") > 10


def test_param_average_refused_without_common_parent(store: Path) -> None:
    with pytest.raises(FuseError, match="different basins"):
        fuse(_pkgs(store, "ft1", "indep"), "params", store, "m", "bad", val_frames=4, val_size=32, log=_quiet)


def test_greedy_soup_never_worse_than_best_member(store: Path) -> None:
    pkg = fuse(_pkgs(store, "ft1", "ft2"), "greedy", store, "m", "greedy", val_frames=4, val_size=32, log=_quiet)
    report = json.loads((pkg / "fuse_report.json").read_text())
    assert report["fused_val_psnr_db"] >= report["best_member_val_psnr_db"] - 1e-9
    assert report["used"][0] == max(report["members"], key=report["members"].get)


def test_output_average_of_independent_members(store: Path) -> None:
    pkg = fuse(_pkgs(store, "ft1", "indep"), "outputs", store, "m", "ens", val_frames=4, val_size=32, log=_quiet)
    ens = Denoiser.from_package(pkg)
    members = [Denoiser.from_package(p) for p in _pkgs(store, "ft1", "indep")]
    frame = np.random.default_rng(0).integers(0, 4000, (40, 56)).astype(np.float32)
    out, _ = ens.denoise_dn(frame, 4095.0)
    mean = np.mean([m.denoise_dn(frame, 4095.0)[0] for m in members], axis=0)
    np.testing.assert_allclose(out, mean, rtol=1e-5, atol=1e-2)
    assert ens.manifest.ensemble.member_refs == ["m:ft1", "m:indep"]


def test_fuse_needs_two_members(store: Path) -> None:
    with pytest.raises(FuseError, match="at least 2"):
        fuse(_pkgs(store, "ft1"), "params", store, "m", "x", log=_quiet)
