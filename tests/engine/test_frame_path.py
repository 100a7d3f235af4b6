"""One frame path: offline use is the live filter's pipeline, and the refactor moved no output.

``data/frame_path_reference.npz`` holds the shipped default's outputs on fixed frames, made by the
code before offline use was routed through ``engine.pipeline.denoise_frame`` (when it had its own
normalise/residual/bad-pixel code); the same model must give the same bits now.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cdae.engine.badpixels import BadPixelMap
from cdae.engine.inference import Denoiser

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).parent / "data" / "frame_path_reference.npz"


@pytest.fixture(scope="module")
def default_model() -> Denoiser:
    return Denoiser.from_package(ROOT / "models" / "cdae-default" / "7")


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as z:
        return dict(z)


@pytest.mark.parametrize("name,bits", [("u16_12bit", 12), ("u16", None), ("u8", None), ("f32", None)])
def test_offline_output_unchanged_by_the_one_frame_path(default_model: Denoiser, ref: dict, name: str,
                                                         bits: int | None) -> None:
    r = default_model(ref[f"{name}_raw"], bits)
    np.testing.assert_array_equal(r.denoised, ref[f"{name}_denoised"])
    np.testing.assert_array_equal(r.residual, ref[f"{name}_residual"])
    np.testing.assert_array_equal(r.defect_probability, ref[f"{name}_prob"])


def test_bad_pixel_fill_and_float_path_unchanged(default_model: Denoiser, ref: dict) -> None:
    mask = np.zeros(ref["u16_12bit_raw"].shape, bool)
    mask[:, 60] = True
    r = default_model(ref["u16_12bit_raw"], 12, BadPixelMap.from_mask(mask))
    np.testing.assert_array_equal(r.denoised, ref["map_denoised"])
    np.testing.assert_array_equal(r.residual, ref["map_residual"])
    np.testing.assert_array_equal(r.defect_probability, ref["map_prob"])
    assert (r.defect_probability[:, 60] == 1.0).all()
    d, p = default_model.denoise_dn(ref["f32_raw"], 4095.0)
    np.testing.assert_array_equal(d, ref["dn_denoised"])
    np.testing.assert_array_equal(p, ref["dn_prob"])
