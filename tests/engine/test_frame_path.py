"""One frame path: offline use is the live filter's pipeline, and the refactor moved no output.

``data/frame_path_reference.npz`` holds the shipped default's outputs on fixed frames, made by the
code before offline use was routed through ``engine.pipeline.denoise_frame`` (when it had its own
normalise/residual/bad-pixel code); the same model must give the same bits now on a CPU whose
convolution kernels are the reference's (an AMD EPYC with AVX-512), and the same numbers to their
float rounding on another (an Intel Xeon with AMX picks other oneDNN kernels: a few ulp apart, so an
output rounded to whole DN may land on the other side of a half: 1 DN on 11 of 7680 pixels at 16 bits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cdae.engine.badpixels import BadPixelMap

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).parent / "data" / "frame_path_reference.npz"


#: Runs the shipped default on the reference's raw frames in a fresh process with one thread (as the
#: reference was made): the bits of a float convolution depend on the thread count.
_RUN = """
import sys, numpy as np
from pathlib import Path
from cdae.engine.badpixels import BadPixelMap
from cdae.engine.inference import Denoiser
den = Denoiser.from_package(Path(sys.argv[1]))
with np.load(sys.argv[2]) as z:
    ref = dict(z)
out = {}
for name, bits in [("u16_12bit", 12), ("u16", None), ("u8", None), ("f32", None)]:
    r = den(ref[name + "_raw"], bits)
    out[name + "_denoised"], out[name + "_residual"], out[name + "_prob"] = r.denoised, r.residual, r.defect_probability
mask = np.zeros(ref["u16_12bit_raw"].shape, bool)
mask[:, 60] = True
r = den(ref["u16_12bit_raw"], 12, BadPixelMap.from_mask(mask))
out["map_denoised"], out["map_residual"], out["map_prob"] = r.denoised, r.residual, r.defect_probability
out["dn_denoised"], out["dn_prob"] = den.denoise_dn(ref["f32_raw"], 4095.0)
np.savez(sys.argv[3], **out)
"""


@pytest.fixture(scope="module")
def now(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("frame-path") / "now.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _RUN, str(ROOT / "models" / "cdae-default" / "7"), str(REFERENCE), str(out)],
                   check=True, env=env, timeout=300)
    with np.load(out) as z:
        return dict(z)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as z:
        return dict(z)


@pytest.mark.parametrize("name", ["u16_12bit", "u16", "u8", "f32", "map", "dn"])
def test_offline_output_unchanged_by_the_one_frame_path(now: dict, ref: dict, name: str) -> None:
    keys = [k for k in ref if k.startswith(name + "_") and not k.endswith("_raw")]
    assert keys
    for k in keys:
        assert_same_to_rounding(now[k], ref[k], k)


def assert_same_to_rounding(now: np.ndarray, ref: np.ndarray, what: str) -> None:
    """The reference's bits; where the CPU's kernels round otherwise, float outputs within 2e-6 of the array's
    range, and outputs rounded to whole DN at most 1 DN off on at most 2 % of the pixels (a change of the path
    moves far more: a different normalisation or fill is tens of DN on most pixels)."""
    assert now.dtype == ref.dtype and now.shape == ref.shape, what
    if np.array_equal(now, ref, equal_nan=True):
        return
    d = np.abs(now.astype(np.float64) - ref.astype(np.float64))
    if np.issubdtype(ref.dtype, np.integer) or np.array_equal(ref, np.rint(ref)):  # whole DN (a residual too)
        off = d > 0
        assert d.max() <= 1.0 and np.count_nonzero(off) <= ref.size // 50, (
            f"{what}: {np.count_nonzero(off)} of {ref.size} values off by up to {d.max()} DN")
    else:
        tol = 2e-6 * float(np.abs(ref.astype(np.float64)).max())
        assert d.max() <= tol, f"{what}: off by up to {d.max()} (allowed {tol})"


def test_the_bad_pixel_fill_is_certain_in_the_defect_map(now: dict) -> None:
    assert (now["map_prob"][:, 60] == 1.0).all()
    assert not np.array_equal(now["map_denoised"], now["u16_12bit_denoised"])


# --- the live filter and `cdae denoise` are one path -----------------------------------------------

def _cdae_denoise(tmp: Path, frame: np.ndarray, store: Path, *extra: str) -> np.ndarray:
    import os
    import subprocess
    import sys

    import tifffile

    src, out = tmp / "frame.tif", tmp / "out"
    tifffile.imwrite(src, frame)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the engine under test runs (--threads 1)
    r = subprocess.run([sys.executable, "-m", "cdae.cli", "denoise", str(src), "-o", str(out), "--model", "tiny:1",
                        "--models-dir", str(store), *extra], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return tifffile.imread(out / "frame.tif")


def test_cdae_denoise_and_the_live_engine_give_identical_bits(engine_launcher, engine_store: Path,
                                                             tmp_path: Path) -> None:
    """Same frame, same model, same bad-pixel map: the file `cdae denoise` writes equals, bit for bit,
    the frame a real engine (torch-cpu) sends back, with the map's pixels filled in both."""
    from cdae.engine.client import ControlClient, EngineClient
    from cdae.engine.pipeline import synthetic_frame

    frame = synthetic_frame((72, 88), "uint16", seed=11)
    frame[20, 30] = 65535
    frame[:, 40] = 0
    mask = np.zeros(frame.shape, bool)
    mask[:, 40] = True
    mask[20, 30] = True
    bad = BadPixelMap.from_mask(mask)
    (tmp_path / "map.json").write_text(bad.to_json())
    offline = _cdae_denoise(tmp_path, frame, engine_store, "--bad-pixels", str(tmp_path / "map.json"))
    plain = _cdae_denoise(tmp_path, frame, engine_store)

    eng = engine_launcher.start("--models", str(engine_store), "--model", "tiny:1", "--backend", "torch-cpu",
                                name="one-path")
    try:
        with ControlClient(eng.control, timeout_s=30) as ctl:
            reg = ctl.set_bad_pixels(bad.to_json())
            assert reg.ok, reg.error
            assert reg.result["pixels"] == int(mask.sum())
            assert ctl.status().result["bad_pixel_maps"] == 1
        with EngineClient(eng.data, timeout_s=60) as c:
            live = c.denoise(frame, bad_pixels=str(reg.result["id"]), want_residual=True, want_defect_map=True)
            live_plain = c.denoise(frame)
            unknown = c.denoise(frame, bad_pixels="0123456789abcdef")
    finally:
        engine_launcher.stop(eng)
    assert live.ok, live.header.error
    np.testing.assert_array_equal(live.denoised, offline)
    np.testing.assert_array_equal(live_plain.denoised, plain)
    assert not np.array_equal(offline, plain)  # the map did something, in both
    assert (live.defect_map[mask] == 1.0).all()
    np.testing.assert_array_equal(live.residual, frame.astype(np.float32) - live.denoised.astype(np.float32))
    assert not unknown.ok and unknown.error_code == "unknown_bad_pixels"


def test_engine_refuses_a_broken_map_and_keeps_serving(engine_launcher, engine_store: Path) -> None:
    from cdae.engine.client import ControlClient

    eng = engine_launcher.start("--models", str(engine_store), "--model", "tiny:1", "--backend", "passthrough",
                                name="bad-map")
    try:
        with ControlClient(eng.control, timeout_s=30) as ctl:
            r = ctl.set_bad_pixels('{"Bad pixels": [{"Pixel": [4]}]}')
            assert not r.ok and "entry 0" in (r.error or "")
            assert ctl.status().ok
    finally:
        engine_launcher.stop(eng)


def test_guarded_output_and_flags_are_the_same_live_and_offline(engine_launcher, engine_store: Path,
                                                               tmp_path: Path) -> None:
    """`cdae engine --guard` and `cdae denoise --guard --defect-map`: the same bits and the same flag
    classes; a lone full-scale pixel is flagged an impulse, and the reply counts the flags."""
    import tifffile

    from cdae.engine.client import EngineClient
    from cdae.engine.guard import IMPULSE

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:72, 0:88]
    frame = np.rint(600 + 8 * yy + 4 * xx + rng.normal(0, 6, (72, 88))).astype(np.uint16)  # 12-bit in uint16
    frame[30, 40] = 4095
    offline = _cdae_denoise(tmp_path, frame, engine_store, "--guard", "--defect-map")
    flags_file = tifffile.imread(tmp_path / "out" / "frame.flags.tif")
    assert (tmp_path / "out" / "frame.flags.png").is_file()
    eng = engine_launcher.start("--models", str(engine_store), "--model", "tiny:1", "--backend", "torch-cpu",
                                "--guard", name="guarded")
    try:
        with EngineClient(eng.data, timeout_s=60) as c:
            live = c.denoise(frame, bit_depth=12, want_flags=True)
    finally:
        engine_launcher.stop(eng)
    assert live.ok, live.header.error
    np.testing.assert_array_equal(live.denoised, offline)
    np.testing.assert_array_equal(live.flags, flags_file)
    assert live.flags[30, 40] == IMPULSE
    assert live.header.flag_counts is not None and live.header.flag_counts["impulse"] == int((live.flags == IMPULSE).sum())


@pytest.mark.parametrize("guarded", [False, True])
def test_the_frame_path_never_writes_into_the_networks_output(guarded: bool) -> None:
    """The pass-through backend hands back its input plane itself (no copy): the frame path, tiled or whole, guarded or
    not, with a bad-pixel map, only reads what a backend returns. Read-only outputs prove it."""
    from cdae.engine.backends.passthrough import PassthroughBackend
    from cdae.engine.guard import GuardConfig
    from cdae.engine.package import read_manifest
    from cdae.engine.pipeline import denoise_frame

    class ReadOnly(PassthroughBackend):
        def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            outs = super()._run(x)
            for a in outs:
                a.setflags(write=False)
            return outs

    runner = ReadOnly(read_manifest(ROOT / "models" / "cdae-default" / "11"))
    rng = np.random.default_rng(3)
    frame = rng.poisson(400.0, (256, 300)).astype(np.uint16)
    frame[40, 50] = 4095
    mask = np.zeros(frame.shape, bool)
    mask[:, 7] = True
    for max_pixels in (256 * 300, 176 * 176):  # whole, then tiled
        r = denoise_frame(frame, runner, bit_depth=12, max_pixels=max_pixels, bad_pixels=BadPixelMap.from_mask(mask),
                          guard_config=GuardConfig() if guarded else None)
        assert r.denoised.shape == frame.shape and (r.flags is not None) == guarded
        keep = ~mask if not guarded else (r.flags == 0)
        assert np.array_equal(r.denoised[keep], frame[keep])  # identity where nothing is flagged or filled
