"""Tiling: the plan covers each pixel once, and tiled results equal untiled ones.

Tolerance: with the margin at the network's receptive radius (the pipeline's default), the tiled
frame equals the untiled one to float rounding: |Δ| <= 1e-5 in normalised units, and the output
in the camera's integer type differs by at most 1 DN (a rounding boundary).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import uniform_filter

from cdae.engine.architecture import ArchitectureConfig, build_model
from cdae.engine.backends import TorchCPUBackend
from cdae.engine.normalise import network_input
from cdae.engine.package import load_model, write_package
from cdae.engine.pipeline import denoise_frame, receptive_radius, synthetic_frame, tile_margin
from cdae.engine.tiling import TilingError, plan_tiles, run_tiled

ARCH = ArchitectureConfig(base_width=4, depth=2, convs_per_level=1)


@settings(max_examples=150, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), side=st.integers(24, 160), margin=st.integers(0, 10),
       multiple=st.sampled_from([1, 2, 4, 8]))
def test_plan_covers_every_pixel_once(h: int, w: int, side: int, margin: int, multiple: int) -> None:
    max_pixels = side * side
    try:
        tiles = plan_tiles((h, w), max_pixels=max_pixels, margin=margin, multiple=multiple)
    except TilingError:
        assert side - 2 * (-(-margin // multiple) * multiple) < multiple
        return
    count = np.zeros((h, w), np.int32)
    for t in tiles:
        count[t.write] += 1
        rh, rw = t.read_shape
        assert rh * rw <= max_pixels or len(tiles) == 1
        assert t.read[0].start % multiple == 0 and t.read[1].start % multiple == 0  # on the downsampling grid
        # the crop is the written region, seen from inside the tile
        assert t.crop[0].start + t.read[0].start == t.write[0].start
        assert t.crop[1].stop + t.read[1].start == t.write[1].stop
    assert (count == 1).all()


def test_small_frames_are_one_tile_and_budget_errors_are_explained() -> None:
    assert len(plan_tiles((64, 64), max_pixels=64 * 64, margin=8)) == 1
    assert len(plan_tiles((65, 64), max_pixels=64 * 64, margin=8)) > 1
    with pytest.raises(TilingError, match="raise max_pixels to at least 1296"):
        plan_tiles((100, 100), max_pixels=900, margin=16, multiple=4)


def test_local_filter_tiled_equals_untiled_exactly() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 97, 131)).astype(np.float32)

    def fn(t: np.ndarray) -> list[np.ndarray]:  # each output pixel sees 5 pixels either side
        return [uniform_filter(t[0], size=11, mode="reflect"), t[1] * 2]

    whole = fn(x)
    tiled = run_tiled(x, fn, plan_tiles(x.shape[1:], max_pixels=40 * 40, margin=5))
    np.testing.assert_array_equal(tiled[0], whole[0])
    np.testing.assert_array_equal(tiled[1], whole[1])
    # the test can fail: a margin short of the filter's reach leaves seams
    short = run_tiled(x, fn, plan_tiles(x.shape[1:], max_pixels=40 * 40, margin=2))
    assert np.abs(short[0] - whole[0]).max() > 1e-3


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> TorchCPUBackend:
    torch.manual_seed(3)
    pkg = write_package(tmp_path_factory.mktemp("m"), name="t", version="1",
                        state_dict=build_model(ARCH).state_dict(), architecture=ARCH)
    return TorchCPUBackend(*load_model(pkg))


def test_receptive_radius_bounds_the_network(backend: TorchCPUBackend) -> None:
    r = receptive_radius(ARCH)
    x = np.zeros((2, 96, 96), np.float32)
    base = backend.infer(x)[0]
    x[0, 48, 48] = 10.0
    changed = np.argwhere(np.abs(backend.infer(x)[0] - base) > 0)
    reach = np.abs(changed - 48).max()
    assert 0 < reach <= r, (reach, r)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_cdae_tiled_equals_untiled(backend: TorchCPUBackend, dtype: str) -> None:
    frame = synthetic_frame((150, 203), dtype, seed=4)
    margin = tile_margin(ARCH)
    whole = denoise_frame(frame, backend, max_pixels=10**8)
    tiled = denoise_frame(frame, backend, max_pixels=(64 + 2 * margin) ** 2)
    assert whole.tiles == 1 and tiled.tiles > 4
    diff = np.abs(tiled.denoised.astype(np.float64) - whole.denoised.astype(np.float64))
    if dtype == "uint16":
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    else:
        assert diff.max() <= 1e-4 * np.abs(whole.denoised).max()
    np.testing.assert_allclose(tiled.defect_probability, whole.defect_probability, atol=1e-5)

    # normalised network output, tile by tile versus whole, and a too-small margin that must show seams
    x, _, _ = network_input(frame.astype(np.float32), np.inf, backend.normalisation)
    ref = backend.infer(x)[0]
    good = run_tiled(x, backend.infer, plan_tiles(frame.shape, max_pixels=(64 + 2 * margin) ** 2,
                                                  margin=margin, multiple=ARCH.multiple))[0]
    assert np.abs(good - ref).max() <= 1e-5
    bad = run_tiled(x, backend.infer, plan_tiles(frame.shape, max_pixels=64 * 64, margin=0, multiple=ARCH.multiple))[0]
    assert np.abs(bad - ref).max() > 1e-3
