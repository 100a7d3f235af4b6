"""Offline denoising of image files: each file keeps its name, dtype and shape.

A file that cannot be read or written gets a one-line error; the others are still processed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cdae.engine.badpixels import BadPixelMap
from cdae.engine.guard import FLAG_NAMES, count_flags
from cdae.engine.inference import Denoiser
from cdae.engine.normalise import NormalisationError, infer_bit_depth
from cdae.training.fileio import FileFormatError, output_spec_for, read_image, spec_path, write_image


def denoise_array(denoiser: Denoiser, array: np.ndarray, bit_depth: int | None = None,
                  bad_pixels: BadPixelMap | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A 2-D frame, or a (N, H, W) stack frame by frame, in its own dtype (``bad_pixels`` filled), and
    the flag classes of its pixels when the denoiser guards its output."""
    if array.ndim == 2:
        r = denoiser(array, bit_depth, bad_pixels)
        return r.denoised, r.flags
    if array.ndim == 3:
        _refuse_colour(array.shape)
        rs = [denoiser(f, bit_depth, bad_pixels) for f in array]
        flags = np.stack([r.flags for r in rs]) if all(r.flags is not None for r in rs) else None
        return np.stack([r.denoised for r in rs]), flags
    raise FileFormatError(f"expected a 2-D frame or a 3-D stack, got shape {array.shape}")


def _refuse_colour(shape: tuple[int, ...]) -> None:
    """A (H, W, 3|4) array is an RGB(A) picture, not a stack of H frames of W x 3 (TIFF and PNG readers
    refuse colour by their metadata; a bare .npy or HDF5 array has none, so its shape decides)."""
    if len(shape) == 3 and shape[2] in (3, 4) and min(shape[0], shape[1]) > shape[2]:
        raise FileFormatError(
            f"shape {shape} looks like a colour image (H, W, C); cdae denoises monochrome frames (H, W) "
            "or stacks (N, H, W)"
        )


def make_output_folder(outdir: Path | str) -> Path:
    """Create ``outdir`` (and its parents); a FileFormatError, one line, when it cannot be made."""
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = ("it exists and is not a folder" if isinstance(e, FileExistsError) and outdir.exists()
                  else e.strerror or str(e) or type(e).__name__)
        raise FileFormatError(f"cannot create output folder {str(outdir)!r}: {reason}") from e
    return outdir


def write_defect_map(flags: np.ndarray, target: Path) -> list[Path]:
    """The flag classes beside an output: ``NAME.flags.tif`` (uint8 codes) and ``NAME.flags.png``, a
    picture of where the filter moved pixels beyond the noise and why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tifffile
    from matplotlib.colors import ListedColormap

    tif = target.with_name(target.stem + ".flags.tif")
    tifffile.imwrite(tif, flags.astype(np.uint8))
    png = target.with_name(target.stem + ".flags.png")
    shown = flags if flags.ndim == 2 else flags.max(axis=0)
    colours = ["#202020", "#1f77b4", "#ff7f0e", "#d62728", "#9467bd"][: max(FLAG_NAMES) + 1]
    fig, ax = plt.subplots(figsize=(6, 6 * shown.shape[0] / max(shown.shape[1], 1) + 0.8))
    ax.imshow(shown, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(colours) - 0.5, interpolation="nearest")
    counts = count_flags(flags)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in FLAG_NAMES if c]
    ax.legend(handles, [f"{n}: {counts[n]}" for n in counts], loc="upper right", fontsize=8, framealpha=0.8)
    ax.set_title(f"{target.name}: pixels moved beyond the noise, by reason", fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [tif, png]


def denoise_files(
    inputs: Sequence[str],
    outdir: Path | str,
    denoiser: Denoiser,
    bit_depth: int | None = None,
    log: Callable[[str], None] = print,
    error: Callable[[str], None] = print,
    bad_pixels: BadPixelMap | None = None,
    defect_map: bool = False,
) -> tuple[list[str], list[str]]:
    """Denoise each input into ``outdir``; returns (written output specs, error messages).

    ``bad_pixels``: the camera's bad-pixel map (all inputs from that camera), filled after the model.
    ``bit_depth`` None: inferred per file from its pixels, and said. ``defect_map``: write each
    output's flag classes beside it (the denoiser must guard its output). An ``outdir`` that cannot
    be created raises FileFormatError before any input is read.
    """
    outdir = make_output_folder(outdir)
    written, errors = [], []
    for spec in inputs:
        try:
            array = read_image(spec)
            _refuse_colour(array.shape)  # before its bit depth is inferred and said
            bits = bit_depth
            if bits is None and (bits := infer_bit_depth(array)) is not None:
                log(f"{spec}: bit depth {bits} inferred (largest pixel {int(array.max())}; --bit-depth overrides)")
            out, flags = denoise_array(denoiser, array, bits, bad_pixels)
            target = output_spec_for(spec, outdir)
            write_image(target, out)
            if defect_map and flags is not None:
                for extra in write_defect_map(flags, spec_path(target)):
                    log(f"{spec} -> {extra}")
        except (FileFormatError, NormalisationError, OSError) as e:
            msg = f"{spec}: {e}"
            errors.append(msg)
            error(f"error: {msg}")
            continue
        written.append(target)
        log(f"{spec} -> {target} ({array.dtype}, {'x'.join(map(str, array.shape))})")
    return written, errors
