"""Camera characterisation on recordings of the simulated camera, against the simulator's truth."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cdae.engine.badpixels import BadPixelError
from cdae.simcamera import CameraConfig
from cdae.training.characterise import (
    CameraProfile,
    CharacteriseError,
    characterise,
    default_profile_path,
    find_bad_lines,
    find_bad_pixels,
    is_static_pair,
    load_profile,
    save_profile_png,
)
from cdae.training.defects import detector_rng, sample_defect_layout, sample_defect_params

SIZE = 96
WriteRecording = Callable[[Path, CameraConfig, int, int], None]


def _truth(seed: int) -> tuple[object, object]:
    rng = detector_rng(seed, 0)
    params = sample_defect_params(rng, None, 12)
    return params, sample_defect_layout(rng, params, SIZE, SIZE)


CAMERA = CameraConfig(seed=33, width=SIZE, height=SIZE, static_scene=True, hot_columns=[37], read_noise_e=40.0,
                      hot_column_offset_frac=0.02)


def test_darks_and_a_static_scene_measure_the_camera(tmp_path: Path, write_recording: WriteRecording) -> None:
    path = tmp_path / "run.h5"
    write_recording(path, CAMERA, light=24, dark=8)
    profile = characterise(path)
    params, layout = _truth(33)
    gain = params.gain_e_per_dn
    assert profile.bias_dn == pytest.approx(params.bias_dn, abs=2.0)
    assert profile.read_noise_dn == pytest.approx(40.0 / gain, rel=0.1)
    assert profile.gain_e_per_dn == pytest.approx(gain, rel=0.15)
    assert profile.static_pairs == 23 and profile.frames_dark == 8 and not profile.notes
    (line,) = profile.bad_lines
    offset = 0.02 * (params.adc_max - params.bias_dn)
    assert (line.axis, line.index, line.start, line.stop, line.kind) == ("column", 37, 0, SIZE, "hot")
    assert line.value == pytest.approx(offset, rel=0.15)
    assert sorted((r, c) for r, c, _ in profile.stuck_pixels) == sorted(map(tuple, layout.stuck_pixels.tolist()))
    assert sorted((r, c) for r, c, _ in profile.hot_pixels) == sorted(map(tuple, layout.warm_pixels.tolist()))
    truth = layout.static_mask() != 0
    truth[:, 37] = True
    np.testing.assert_array_equal(profile.defect_mask() != 0, truth)


def test_ordinary_frames_alone_still_find_the_damage(tmp_path: Path, write_recording: WriteRecording) -> None:
    path = tmp_path / "run.h5"
    write_recording(path, CAMERA.model_copy(update={"static_scene": False}), light=24, dark=0)
    profile = characterise(path)
    # scenes change frame to frame (two smooth backgrounds in a row may pass as one): no photon transfer
    assert profile.frames_dark == 0 and profile.static_pairs <= 2
    assert any("no dark frames" in n for n in profile.notes)
    assert "no darks" in profile.bias_method
    assert [(b.axis, b.index, b.kind) for b in profile.bad_lines] == [("column", 37, "hot")]
    _, layout = _truth(33)
    stuck = {(r, c) for r, c, _ in profile.stuck_pixels}
    assert stuck == set(map(tuple, layout.stuck_pixels.tolist()))  # no temporal noise at all


def test_profile_round_trip_layout_and_picture(tmp_path: Path, write_recording: WriteRecording) -> None:
    path = tmp_path / "run.h5"
    write_recording(path, CAMERA, light=6, dark=4)
    profile = characterise(path)
    saved = profile.save(default_profile_path(path))
    assert saved.name == "run.profile.json"
    again = load_profile(saved)
    assert again == profile
    layout = again.layout()
    np.testing.assert_array_equal(layout.static_mask(), profile.defect_mask())
    assert profile.noise_variance_dn2(np.array([profile.bias_dn]))[0] == pytest.approx(profile.read_noise_dn**2)
    png = save_profile_png(profile, path, tmp_path / "map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text('{"format": 1}')
    with pytest.raises(CharacteriseError, match="not a camera profile"):
        load_profile(tmp_path / "bad.json")


def test_static_pairs_and_partial_lines() -> None:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:64, :64]
    scene = 500 + 300 * np.exp(-((yy - 30) ** 2 + (xx - 20) ** 2) / 50.0)
    a, b = scene + rng.normal(0, 5, scene.shape), scene + rng.normal(0, 5, scene.shape)
    moved = np.roll(scene, 6, axis=1) + rng.normal(0, 5, scene.shape)
    assert is_static_pair(a, b) and not is_static_pair(a, moved)
    excess = rng.normal(0, 1, (64, 64))
    excess[20:, 11] += 4.0  # from a charge trap at row 20 to the bottom edge
    excess[:, 40] += 30.0 * (np.arange(64) == 5)  # one hot pixel is not a line
    found = find_bad_lines(excess, "column", 1.0, 10.0, 8)
    assert [(i, start, stop, sign) for i, start, stop, sign, _ in found] == [(11, 20, 64, 1)]


def test_cli_characterise(tmp_path: Path, write_recording: WriteRecording) -> None:
    path = tmp_path / "cam.h5"
    write_recording(path, CAMERA, light=6, dark=4)
    exe = Path(sys.executable).with_name("cdae")
    r = subprocess.run([str(exe), "characterise", str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 bad lines" in r.stdout and "bias" in r.stdout
    profile = CameraProfile.model_validate_json((tmp_path / "cam.profile.json").read_text())
    assert profile.recording == "cam.h5" and (tmp_path / "cam.profile.png").stat().st_size > 10_000
    # the profile's defect map as the camera's bad-pixel file, for the IOC and `cdae denoise`
    r = subprocess.run([str(exe), "badpixels", "--profile", str(tmp_path / "cam.profile.json"), "-o",
                        str(tmp_path / "cam-badpixels.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from cdae.engine.badpixels import BadPixelMap

    listed = BadPixelMap.load(tmp_path / "cam-badpixels.json").mask((SIZE, SIZE))
    assert np.array_equal(listed, profile.defect_mask() != 0) and listed[:, 37].all()
    bad = subprocess.run([str(exe), "characterise", str(tmp_path / "none.h5")], capture_output=True, text=True)
    assert bad.returncode == 2 and "no such recording" in bad.stderr and "Traceback" not in bad.stderr


# --- find_bad_pixels: darks and flat fields (cdae badpixels) ----------------------------------

def test_darks_and_flats_find_hot_and_dead_pixels_not_radiation_hits_or_vignetting() -> None:
    rng = np.random.default_rng(1)
    n, h, w = 16, 64, 80
    bias, read = 100.0, 3.0
    darks = rng.normal(bias, read, (n, h, w))
    darks[:, 10, 20] += 400  # stuck
    darks[:, 30, 40] += 40  # warm: a faint hot pixel, still > 8 sigma of the per-pixel medians
    darks[:, :, 70] += 60  # hot column
    darks[3, 50, 50] += 3000  # a radiation hit in one dark only
    yy, xx = np.mgrid[0:h, 0:w]
    vignette = 1.0 - 0.5 * ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (h * h / 4 + w * w / 4)
    flats = bias + 5000 * vignette + rng.normal(0, 30, (n, h, w))
    flats[:, 5, 5] = bias + rng.normal(0, read, n)  # dead
    flats[:, 40:, 12] *= 0.3  # a column dead from a charge trap down
    mask, counts = find_bad_pixels(darks.round(), flats.round())
    assert mask[10, 20] and mask[30, 40] and mask[:, 70].all() and mask[5, 5] and mask[40:, 12].all()
    assert not mask[50, 50]
    assert counts["hot"] == 2 + h and counts["dead"] == 1 + (h - 40)
    assert mask.sum() == counts["hot"] + counts["dead"]
    with pytest.raises(BadPixelError, match="darks, flat|dark frames"):
        find_bad_pixels()
    with pytest.raises(BadPixelError, match="differ in size"):
        find_bad_pixels(darks, flats[:, :10])


def test_a_dark_clipped_at_zero_does_not_make_the_offset_pattern_hot() -> None:
    """Bias near 0 DN: half the dark is clipped, a two-sided spread estimate shrinks and the upper
    tail of the fixed offset pattern would all look hot (2000 of 49152 pixels on a held-out camera)."""
    rng = np.random.default_rng(2)
    n, h, w = 16, 96, 128
    dsnu = rng.normal(0, 6.0, (h, w))  # fixed per-pixel offsets, DN
    darks = np.clip(np.rint(1.0 + dsnu + rng.normal(0, 5.0, (n, h, w))), 0, None)
    darks[:, 40, 60] = 900  # stuck
    mask, counts = find_bad_pixels(darks)
    assert mask[40, 60] and counts["hot"] <= 3
