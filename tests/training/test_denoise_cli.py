"""`cdae denoise` on real files, through the installed command: formats, dtypes, bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import tifffile
from PIL import Image

from cdae.training.fileio import read_image


def _cdae(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("cdae")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, env={**os.environ})


def test_denoise_files_keep_name_dtype_shape_and_survive_bad_ones(tmp_path: Path, tiny_package: Path) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "in"
    src.mkdir()
    frames = {
        "a.npy": rng.integers(0, 4096, (48, 64)).astype(np.uint16),
        "b.tif": rng.integers(0, 256, (33, 40)).astype(np.uint8),
        "c.png": rng.integers(0, 65536, (32, 32)).astype(np.uint16),
        "stack.npy": rng.integers(0, 1000, (3, 24, 20)).astype(np.int32),
    }
    np.save(src / "a.npy", frames["a.npy"])
    tifffile.imwrite(src / "b.tif", frames["b.tif"])
    Image.fromarray(frames["c.png"]).save(src / "c.png")
    np.save(src / "stack.npy", frames["stack.npy"])
    h5_frame = (rng.random((40, 30)) * 100).astype(np.float32)
    with h5py.File(src / "d.h5", "w") as f:
        f.create_dataset("entry/data", data=h5_frame)
    (src / "broken.npy").write_bytes(b"not an array")
    (src / "e.jpg").write_bytes(b"\xff\xd8")
    inputs = [str(src / n) for n in frames] + [f"{src / 'd.h5'}:/entry/data", str(src / "broken.npy"),
                                                str(src / "e.jpg"), str(src / "missing.tif")]
    out = tmp_path / "out"
    r = _cdae("denoise", *inputs, "-o", str(out), "--model", "tiny:1", "--models-dir", str(tiny_package.parent.parent))
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and all(n in r.stderr for n in ("broken.npy", "e.jpg", "missing.tif"))
    assert "5 written, 3 failed" in r.stderr
    for name, arr in frames.items():
        got = read_image(str(out / name))
        assert got.dtype == arr.dtype and got.shape == arr.shape, name
    got = read_image(f"{out / 'd.h5'}:/entry/data")
    assert got.dtype == np.float32 and got.shape == h5_frame.shape


def test_unknown_model_is_one_line_error(tmp_path: Path, tiny_package: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((8, 8), np.uint16))
    r = _cdae("denoise", str(tmp_path / "a.npy"), "-o", str(tmp_path / "o"), "--model", "nope:1",
              "--models-dir", str(tiny_package.parent.parent))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("cdae denoise: error: no model named 'nope'")
    assert "Traceback" not in r.stderr


def test_badpixels_from_darks_and_flats_then_denoise_fills_them(tmp_path: Path, tiny_package: Path) -> None:
    """The site's routine: darks and flats -> `cdae badpixels` -> an NDPluginBadPixel file -> `cdae denoise
    --bad-pixels`: each listed pixel of the output is the median of its unlisted 3x3 neighbours."""
    import json

    rng = np.random.default_rng(3)
    n, h, w = 8, 40, 48
    darks = rng.normal(100, 3, (n, h, w))
    darks[:, 7, 9] = 4095  # stuck
    darks[:, :, 30] += 80  # hot column
    flats = 100 + rng.normal(2000, 20, (n, h, w))
    flats[:, 20, 5] = 100 + rng.normal(0, 3, n)  # dead
    np.save(tmp_path / "darks.npy", darks.round().astype(np.uint16))
    with h5py.File(tmp_path / "flats.h5", "w") as f:
        f.create_dataset("entry/data", data=flats.round().astype(np.uint16))
    bad_file = tmp_path / "cam1-badpixels.json"
    r = _cdae("badpixels", "--darks", str(tmp_path / "darks.npy"), "--flats", f"{tmp_path / 'flats.h5'}:/entry/data",
              "-o", str(bad_file))
    assert r.returncode == 0, r.stderr
    listed = {tuple(e["Pixel"]) for e in json.loads(bad_file.read_text())["Bad pixels"]}
    assert listed == {(9, 7), (5, 20)} | {(30, y) for y in range(h)}, sorted(listed)[:5]
    assert f"{len(listed)} bad pixels" in r.stdout

    frame = rng.normal(1000, 10, (h, w)).round().astype(np.uint16)
    frame[7, 9] = 4095
    frame[:, 30] += 80
    np.save(tmp_path / "f.npy", frame)
    store = str(tiny_package.parent.parent)
    r = _cdae("denoise", str(tmp_path / "f.npy"), "-o", str(tmp_path / "out"), "--model", "tiny:1",
              "--models-dir", store, "--bad-pixels", str(bad_file), "--bit-depth", "12")
    assert r.returncode == 0, r.stderr
    assert f"{len(listed)} listed bad pixels" in r.stderr
    out = np.load(tmp_path / "out" / "f.npy").astype(np.float64)
    box = out[6:9, 8:11].ravel().tolist()
    box.pop(4)  # the stuck pixel itself
    assert out[7, 9] == np.rint(np.median(box))
    for y in range(1, h - 1):  # the hot column: from the columns beside it, never from itself
        assert out[y, 30] == np.rint(np.median(np.concatenate([out[y - 1:y + 2, 29], out[y - 1:y + 2, 31]]))), y

    # a broken map is refused before any file is touched; no darks or flats is an error too
    (tmp_path / "bad.json").write_text('{"Bad pixels": [{"Pixel": [1]}]}')
    r = _cdae("denoise", str(tmp_path / "f.npy"), "-o", str(tmp_path / "out2"), "--model", "tiny:1",
              "--models-dir", store, "--bad-pixels", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "entry 0: Pixel" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out2").exists()
    r = _cdae("badpixels", "-o", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "cdae badpixels: error:" in r.stderr


def test_defect_maps_of_names_with_colons_land_beside_their_outputs(tmp_path: Path, tiny_package: Path) -> None:
    """A ':' splits only an HDF5 spec (file.h5:/dataset): 't_12:30.npy' is a file name, and so is a folder
    'col:on'; each output's flag maps are NAME.flags.* beside it, never one shared 't_12.flags.tif'."""
    rng = np.random.default_rng(5)
    names = ["t_12:30.npy", "t_12:31.npy"]
    for n in names:
        np.save(tmp_path / n, rng.integers(900, 1100, (24, 32)).astype(np.uint16))
    store = str(tiny_package.parent.parent)
    for out in (tmp_path / "out", tmp_path / "col:on" / "o"):
        r = _cdae("denoise", *(str(tmp_path / n) for n in names), "-o", str(out), "--model", "tiny:1",
                  "--models-dir", store, "--defect-map")
        assert r.returncode == 0, r.stderr
        for n in names:
            stem = n.removesuffix(".npy")
            assert (out / n).is_file() and (out / f"{stem}.flags.png").is_file(), sorted(out.iterdir())
            assert tifffile.imread(out / f"{stem}.flags.tif").shape == (24, 32)
        assert not list(tmp_path.rglob("t_12.flags.*")) and not list(tmp_path.rglob("col.flags.*"))


def test_an_output_folder_that_cannot_be_made_is_one_line_error(tmp_path: Path, tiny_package: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((8, 8), np.uint16))
    (tmp_path / "afile").write_text("a file, not a folder")
    store = str(tiny_package.parent.parent)
    for out, reason in ((tmp_path / "afile", "it exists and is not a folder"),
                        (tmp_path / "afile" / "sub", "Not a directory")):
        r = _cdae("denoise", str(tmp_path / "a.npy"), "-o", str(out), "--model", "tiny:1", "--models-dir", store)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == f"cdae denoise: error: cannot create output folder {str(out)!r}: {reason}"
    assert (tmp_path / "afile").read_text() == "a file, not a folder"


def test_a_bad_pixel_coordinate_too_large_is_refused_before_any_file(tmp_path: Path, tiny_package: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((8, 8), np.uint16))
    (tmp_path / "huge.json").write_text('{"Bad pixels": [{"Pixel": [1e300, 2], "Median": [1, 1]}]}')
    r = _cdae("denoise", str(tmp_path / "a.npy"), "-o", str(tmp_path / "out"), "--model", "tiny:1",
              "--models-dir", str(tiny_package.parent.parent), "--bad-pixels", str(tmp_path / "huge.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "huge.json: entry 0: Pixel: expected values below 2**31" in r.stderr
    assert not (tmp_path / "out").exists()


def test_colour_npy_and_hdf5_are_refused_not_denoised_as_stacks(tmp_path: Path, tiny_package: Path) -> None:
    """TIFF and PNG say they are colour; a bare (H, W, 3|4) array does not, so its shape decides. A stack
    (N, H, W) is still a stack."""
    rng = np.random.default_rng(6)
    np.save(tmp_path / "rgb.npy", rng.integers(0, 256, (40, 48, 3)).astype(np.uint8))
    with h5py.File(tmp_path / "rgba.h5", "w") as f:
        f.create_dataset("entry/data", data=rng.integers(0, 256, (40, 48, 4)).astype(np.uint8))
    np.save(tmp_path / "stack.npy", rng.integers(0, 4096, (3, 40, 48)).astype(np.uint16))
    out = tmp_path / "out"
    r = _cdae("denoise", str(tmp_path / "rgb.npy"), f"{tmp_path / 'rgba.h5'}:/entry/data", str(tmp_path / "stack.npy"),
              "-o", str(out), "--model", "tiny:1", "--models-dir", str(tiny_package.parent.parent))
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("looks like a colour image (H, W, C)" in e for e in errors), r.stderr
    assert "(40, 48, 3)" in errors[0] and "(40, 48, 4)" in errors[1] and "monochrome" in errors[0]
    assert "rgb.npy: bit depth" not in r.stderr  # refused before anything is said about its pixels
    assert "1 written, 2 failed" in r.stderr
    assert not (out / "rgb.npy").exists() and not (out / "rgba.h5").exists()
    assert read_image(str(out / "stack.npy")).shape == (3, 40, 48)


def test_the_denoiser_refuses_an_empty_frame(tiny_package: Path) -> None:
    import pytest

    from cdae.engine.inference import Denoiser
    from cdae.engine.normalise import NormalisationError

    d = Denoiser.from_package(tiny_package)
    for empty in (np.zeros((0, 16), np.uint16), np.zeros((0, 0), np.float32)):
        with pytest.raises(NormalisationError, match=r"empty frame \(shape \(0, "):
            d(empty)
        with pytest.raises(NormalisationError, match="empty frame"):
            d.denoise_dn(empty, 4095.0)
    assert d(np.full((16, 16), 100, np.uint16)).denoised.shape == (16, 16)
