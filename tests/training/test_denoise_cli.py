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
