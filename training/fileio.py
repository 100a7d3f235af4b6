"""Offline image files: read and write detector frames keeping dtype and shape exactly.

A *spec* names an image: ``frame.npy``, ``frame.tif``/``.tiff``, ``frame.png`` or an HDF5
dataset ``scan.h5:/entry/data/data`` (also ``.hdf5``, ``.nxs``). Arrays are 2-D frames
``(H, W)`` or 3-D stacks ``(N, H, W)``; callers denoise a stack frame by frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tifffile
from PIL import Image

__all__ = [
    "FileFormatError",
    "HDF5_SUFFIXES",
    "IMAGE_SUFFIXES",
    "output_spec_for",
    "read_image",
    "spec_path",
    "write_image",
]

HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs")
IMAGE_SUFFIXES = (".npy", ".tif", ".tiff", ".png", *HDF5_SUFFIXES)
_NPY_MAGIC = b"\x93NUMPY"
_HDF5_SPEC = re.compile(r"^(?P<file>.*?\.(?:h5|hdf5|nxs))(?::(?P<dataset>.*))?$", re.IGNORECASE)


class FileFormatError(ValueError):
    """An image file that cannot be read or written as asked; the message names the file."""


@dataclass(frozen=True)
class _Spec:
    path: Path
    kind: str  # "npy" | "tiff" | "png" | "hdf5"
    dataset: str | None = None


def _parse(spec: str | Path) -> _Spec:
    text = str(spec)
    m = _HDF5_SPEC.match(text)
    if m is not None:
        dataset = m.group("dataset")
        return _Spec(Path(m.group("file")), "hdf5", dataset or None)
    path = Path(text)
    suffix = path.suffix.lower()
    kinds = {".npy": "npy", ".tif": "tiff", ".tiff": "tiff", ".png": "png"}
    if suffix not in kinds:
        raise FileFormatError(
            f"{text}: unknown image extension {suffix or '(none)'!r}; expected one of "
            f"{', '.join(IMAGE_SUFFIXES)} (HDF5 as 'file.h5:/path/to/dataset')"
        )
    return _Spec(path, kinds[suffix])


def spec_path(spec: str | Path) -> Path:
    """The file a spec names: ``scan.h5:/entry/data`` -> ``scan.h5``; any other spec is a path as it is
    (a ':' in the name of a .npy/.tif/.png file is part of its name)."""
    return _parse(spec).path


def _check_array(name: str, array: np.ndarray) -> np.ndarray:
    arr = np.asarray(array)
    if np.iscomplexobj(arr):
        raise FileFormatError(f"{name}: complex dtype {arr.dtype} is not an image; expected real numbers")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise FileFormatError(
            f"{name}: dtype {arr.dtype} is not a numeric image; expected integers or floats"
        )
    if arr.ndim not in (2, 3):
        raise FileFormatError(
            f"{name}: expected a 2-D frame (H, W) or a 3-D stack (N, H, W); got shape {arr.shape}"
        )
    if arr.size == 0:
        raise FileFormatError(f"{name}: image has no pixels; got shape {arr.shape}")
    return arr


def _hdf5_datasets(group: h5py.Group, limit: int = 5) -> list[str]:
    found: list[str] = []

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and len(found) < limit:
            found.append("/" + name)

    group.visititems(visit)
    return found


def _read_hdf5(spec: _Spec, name: str) -> np.ndarray:
    with h5py.File(spec.path, "r") as f:
        if spec.dataset is None:
            hint = ", ".join(_hdf5_datasets(f)) or "none"
            raise FileFormatError(
                f"{name}: no dataset path given; expected '{spec.path}:/path/to/dataset' (datasets: {hint})"
            )
        if spec.dataset not in f:
            hint = ", ".join(_hdf5_datasets(f)) or "none"
            raise FileFormatError(f"{name}: no dataset {spec.dataset!r} in the file (datasets: {hint})")
        obj = f[spec.dataset]
        if not isinstance(obj, h5py.Dataset):
            raise FileFormatError(f"{name}: {spec.dataset!r} is a {type(obj).__name__}, expected a dataset")
        return np.asarray(obj[()])


def _read_npy(spec: _Spec, name: str) -> np.ndarray:
    with spec.path.open("rb") as f:
        # Without this check numpy reports any non-.npy file as "pickled data".
        if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            raise FileFormatError(f"{name}: not a NumPy .npy file (no \\x93NUMPY header)")
    # allow_pickle=False: an object array in a .npy would be a pickle, never loaded.
    return np.asarray(np.load(spec.path, allow_pickle=False))


def _read_tiff(spec: _Spec, name: str) -> np.ndarray:
    with tifffile.TiffFile(spec.path) as tif:
        series = tif.series[0]
        if "S" in series.axes:
            raise FileFormatError(
                f"{name}: colour TIFF (axes {series.axes}, shape {series.shape}); expected greyscale frames"
            )
        return np.asarray(series.asarray())


def _read_png(spec: _Spec, name: str) -> np.ndarray:
    with Image.open(spec.path) as img:
        # 8-bit greyscale decodes as "L", 16-bit as "I;16" (or "I;16B"); anything else is
        # colour, palette, alpha or bilevel and is not a detector frame.
        if img.mode not in ("L", "I;16", "I;16B", "I;16L"):
            raise FileFormatError(f"{name}: PNG mode {img.mode!r}; expected 8- or 16-bit greyscale")
        arr = np.asarray(img)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def read_image(spec: str | Path) -> np.ndarray:
    """Read a frame ``(H, W)`` or a stack ``(N, H, W)``, keeping its dtype and shape."""
    name = str(spec)
    parsed = _parse(spec)
    if not parsed.path.is_file():
        raise FileFormatError(f"{name}: no such file {str(parsed.path)!r}")
    readers = {"npy": _read_npy, "tiff": _read_tiff, "png": _read_png, "hdf5": _read_hdf5}
    try:
        arr = readers[parsed.kind](parsed, name)
    except FileFormatError:
        raise
    except Exception as exc:  # any library's notion of a corrupt or unreadable file
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileFormatError(f"{name}: cannot read as {parsed.kind}: {detail}") from exc
    return _check_array(name, arr)


def read_stack(specs: list[str] | None) -> np.ndarray | None:
    """Frames from files or stacks (each a frame or a (frames, height, width) stack) as one float32 stack;
    None for none."""
    if not specs:
        return None
    frames = []
    for spec in specs:
        a = read_image(spec)
        frames.extend(a if a.ndim == 3 else [a])
    return np.stack([np.asarray(f, dtype=np.float32) for f in frames])


def _write_hdf5(spec: _Spec, name: str, arr: np.ndarray) -> None:
    if spec.dataset is None or spec.dataset.strip("/") == "":
        raise FileFormatError(f"{name}: no dataset path given; expected '{spec.path}:/path/to/dataset'")
    with h5py.File(spec.path, "a") as f:
        if spec.dataset in f:
            if not isinstance(f[spec.dataset], h5py.Dataset):
                raise FileFormatError(f"{name}: {spec.dataset!r} exists and is a group, not a dataset")
            del f[spec.dataset]
        f.create_dataset(spec.dataset, data=arr)


def _write_png(spec: _Spec, name: str, arr: np.ndarray) -> None:
    if arr.ndim != 2 or arr.dtype.kind != "u" or arr.dtype.itemsize not in (1, 2):
        raise FileFormatError(
            f"{name}: PNG holds 2-D uint8 or uint16 frames only; got {arr.dtype} with shape {arr.shape} "
            "(use .tif, .npy or .h5)"
        )
    native = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    Image.fromarray(native).save(spec.path, format="PNG")


def write_image(spec: str | Path, array: np.ndarray) -> None:
    """Write a frame or stack to ``spec``, keeping dtype and shape; creates parent folders.

    HDF5: creates the file and groups as needed and replaces an existing dataset.
    PNG: 2-D uint8/uint16 only. TIFF and NPY: any real numeric dtype.
    """
    name = str(spec)
    parsed = _parse(spec)
    arr = _check_array(name, array)
    try:
        parsed.path.parent.mkdir(parents=True, exist_ok=True)
        if parsed.kind == "npy":
            np.save(parsed.path, arr, allow_pickle=False)
        elif parsed.kind == "tiff":
                    # Explicit minisblack: a stack whose last axis is 3 or 4 is not an RGB image.
            tifffile.imwrite(parsed.path, arr, photometric="minisblack")
        elif parsed.kind == "png":
            _write_png(parsed, name, arr)
        else:
            _write_hdf5(parsed, name, arr)
    except FileFormatError:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileFormatError(f"{name}: cannot write as {parsed.kind}: {detail}") from exc


def output_spec_for(input_spec: str | Path, outdir: Path) -> str:
    """The spec of ``input_spec``'s output in ``outdir``: same file name, same HDF5 dataset.

    Refuses an ``outdir`` that would make the output overwrite the input file.
    """
    parsed = _parse(input_spec)
    out = Path(outdir) / parsed.path.name
    if out.resolve() == parsed.path.resolve():
        raise FileFormatError(
            f"{input_spec}: output folder {str(outdir)!r} holds the input; it would be overwritten"
        )
    if parsed.kind == "hdf5" and parsed.dataset is not None:
        return f"{out}:{parsed.dataset}"
    return str(out)
