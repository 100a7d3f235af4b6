"""Tests of cdae.training.fileio: exact round trips and one-line errors naming the file."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from cdae.training.fileio import FileFormatError, output_spec_for, read_image, write_image

DTYPES = ["uint8", "uint16", "int16", "int32", "float32"]


def _frame(dtype: str, shape: tuple[int, ...] = (13, 21)) -> np.ndarray:
    """A non-square frame using the dtype's range, so truncation or rescaling shows."""
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    ramp = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    if info is None:
        return (ramp * 0.37 - 11.5).astype(dtype)
    values = info.min + (ramp * 7919) % (float(info.max) - info.min + 1)
    arr = values.astype(dtype)
    arr.flat[0], arr.flat[-1] = info.min, info.max
    return arr


def _assert_same(back: np.ndarray, arr: np.ndarray) -> None:
    assert back.dtype == arr.dtype
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ext", ["npy", "tif", "tiff", "h5", "hdf5", "nxs"])
def test_round_trip_2d(tmp_path: Path, ext: str, dtype: str) -> None:
    arr = _frame(dtype)
    spec = f"{tmp_path}/frame.{ext}" + (":/entry/data/data" if ext in ("h5", "hdf5", "nxs") else "")
    write_image(spec, arr)
    _assert_same(read_image(spec), arr)


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_round_trip_png(tmp_path: Path, dtype: str) -> None:
    arr = _frame(dtype)
    spec = tmp_path / "frame.png"
    write_image(spec, arr)
    _assert_same(read_image(spec), arr)


def test_png_keeps_16_bits_from_a_big_endian_array(tmp_path: Path) -> None:
    arr = _frame("uint16").astype(">u2")
    write_image(tmp_path / "be.png", arr)
    back = read_image(tmp_path / "be.png")
    assert back.dtype == np.dtype("uint16")
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("ext", ["npy", "tif", "h5"])
@pytest.mark.parametrize("shape", [(3, 11, 17), (5, 7, 3), (4, 9, 4)])
def test_round_trip_stack(tmp_path: Path, ext: str, shape: tuple[int, int, int]) -> None:
    # (N, H, 3) and (N, H, 4) must not be mistaken for colour images.
    arr = _frame("uint16", shape)
    spec = f"{tmp_path}/stack.{ext}" + (":/data" if ext == "h5" else "")
    write_image(spec, arr)
    _assert_same(read_image(spec), arr)


def test_hdf5_overwrites_a_dataset_and_keeps_its_neighbours(tmp_path: Path) -> None:
    path = tmp_path / "scan.h5"
    write_image(f"{path}:/entry/raw", _frame("uint16"))
    write_image(f"{path}:/entry/denoised", _frame("uint16"))
    new = _frame("float32", (5, 6))
    write_image(f"{path}:/entry/denoised", new)
    _assert_same(read_image(f"{path}:/entry/denoised"), new)
    _assert_same(read_image(f"{path}:/entry/raw"), _frame("uint16"))


def test_write_creates_parent_folders(tmp_path: Path) -> None:
    spec = tmp_path / "a" / "b" / "frame.tif"
    write_image(spec, _frame("int16"))
    assert spec.is_file()


def test_output_spec_keeps_name_and_dataset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert output_spec_for("/data/run1/frame_0001.tif", out) == str(out / "frame_0001.tif")
    assert output_spec_for("/data/scan.nxs:/entry/data/data", out) == f"{out / 'scan.nxs'}:/entry/data/data"
    assert output_spec_for("scan.h5", out) == str(out / "scan.h5")
    with pytest.raises(FileFormatError, match="overwritten"):
        output_spec_for(str(tmp_path / "frame.npy"), tmp_path)


# --- errors: each names the file -------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    for name in ("nothere.npy", "nothere.tif", "nothere.png", "nothere.h5:/data"):
        with pytest.raises(FileFormatError, match="nothere") as info:
            read_image(tmp_path / name)
        assert "no such file" in str(info.value)


def test_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "frame.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(FileFormatError, match=r"frame\.jpg.*'\.jpg'"):
        read_image(tmp_path / "frame.jpg")
    with pytest.raises(FileFormatError, match=r"frame\.bmp"):
        write_image(tmp_path / "frame.bmp", _frame("uint8"))
    with pytest.raises(FileFormatError, match=r"(none)"):
        read_image(tmp_path / "frame")


def test_hdf5_dataset_errors(tmp_path: Path) -> None:
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/data", data=_frame("uint16"))
    with pytest.raises(FileFormatError, match=r"scan\.h5.*no dataset path.*/entry/data"):
        read_image(path)
    with pytest.raises(FileFormatError, match=r"scan\.h5.*'/entry/missing'"):
        read_image(f"{path}:/entry/missing")
    with pytest.raises(FileFormatError, match=r"scan\.h5.*'/entry'.*Group"):
        read_image(f"{path}:/entry")
    with pytest.raises(FileFormatError, match=r"scan\.h5.*group"):
        write_image(f"{path}:/entry", _frame("uint16"))
    with pytest.raises(FileFormatError, match=r"scan\.h5.*no dataset path"):
        write_image(path, _frame("uint16"))


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4, 5), (0, 4)])
def test_wrong_dimensions(tmp_path: Path, shape: tuple[int, ...]) -> None:
    np.save(tmp_path / "odd.npy", np.zeros(shape, np.uint16))
    with pytest.raises(FileFormatError, match=r"odd\.npy.*" + str(shape).replace("(", r"\(").replace(")", r"\)")):
        read_image(tmp_path / "odd.npy")
    with pytest.raises(FileFormatError, match=r"odd\.tif"):
        write_image(tmp_path / "odd.tif", np.zeros(shape, np.uint16))


@pytest.mark.parametrize("dtype", ["complex64", "bool", "U3", "object"])
def test_non_numeric_dtypes(tmp_path: Path, dtype: str) -> None:
    arr = np.zeros((4, 5), dtype=dtype)
    with pytest.raises(FileFormatError, match=r"bad\.h5"):
        write_image(f"{tmp_path}/bad.h5:/d", arr)
    if dtype != "object":
        np.save(tmp_path / "bad.npy", arr)
        with pytest.raises(FileFormatError, match=r"bad\.npy.*dtype"):
            read_image(tmp_path / "bad.npy")


def test_complex_hdf5_dataset_is_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("d", data=np.zeros((4, 4), np.complex64))
    with pytest.raises(FileFormatError, match=r"c\.h5.*complex"):
        read_image(f"{tmp_path}/c.h5:/d")


def test_pickled_npy_is_never_loaded(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    with pytest.raises(FileFormatError, match=r"obj\.npy.*cannot read"):
        read_image(tmp_path / "obj.npy")


@pytest.mark.parametrize("name", ["junk.npy", "junk.tif", "junk.png", "junk.h5:/d"])
def test_corrupt_files(tmp_path: Path, name: str) -> None:
    (tmp_path / name.split(":")[0]).write_bytes(b"this is not an image file at all")
    with pytest.raises(FileFormatError, match=r"junk\.") as info:
        read_image(f"{tmp_path}/{name}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("arr", [np.zeros((4, 5), np.int16), np.zeros((4, 5), np.float32),
                                 np.zeros((2, 4, 5), np.uint8)])
def test_png_refuses_what_it_cannot_hold(tmp_path: Path, arr: np.ndarray) -> None:
    with pytest.raises(FileFormatError, match=r"frame\.png.*uint8 or uint16"):
        write_image(tmp_path / "frame.png", arr)


def test_colour_images_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(FileFormatError, match=r"rgb\.png.*'RGB'"):
        read_image(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 5, 3), np.uint8), photometric="rgb")
    with pytest.raises(FileFormatError, match=r"rgb\.tif.*colour"):
        read_image(tmp_path / "rgb.tif")


def test_spec_path_splits_only_hdf5_specs(tmp_path: Path) -> None:
    from cdae.training.fileio import spec_path

    assert spec_path("t_12:30.npy") == Path("t_12:30.npy")
    assert spec_path("col:on/o/f.tif") == Path("col:on/o/f.tif")
    assert spec_path(f"{tmp_path / 'scan.h5'}:/entry/data") == tmp_path / "scan.h5"
    assert spec_path("run:3/scan.NXS:/entry/data") == Path("run:3/scan.NXS")
    out = output_spec_for(tmp_path / "in" / "t_12:30.npy", tmp_path / "out")
    assert spec_path(out) == tmp_path / "out" / "t_12:30.npy"
