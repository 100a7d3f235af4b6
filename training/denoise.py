"""Offline denoising of image files: each file keeps its name, dtype and shape.

A file that cannot be read or written gets a one-line error; the others are still processed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cdae.engine.badpixels import BadPixelMap
from cdae.engine.inference import Denoiser
from cdae.engine.normalise import NormalisationError
from cdae.training.fileio import FileFormatError, output_spec_for, read_image, write_image


def denoise_array(denoiser: Denoiser, array: np.ndarray, bit_depth: int | None = None,
                  bad_pixels: BadPixelMap | None = None) -> np.ndarray:
    """A 2-D frame, or a (N, H, W) stack frame by frame, in its own dtype (``bad_pixels`` filled)."""
    if array.ndim == 2:
        return denoiser(array, bit_depth, bad_pixels).denoised
    if array.ndim == 3:
        return np.stack([denoiser(f, bit_depth, bad_pixels).denoised for f in array])
    raise FileFormatError(f"expected a 2-D frame or a 3-D stack, got shape {array.shape}")


def denoise_files(
    inputs: Sequence[str],
    outdir: Path | str,
    denoiser: Denoiser,
    bit_depth: int | None = None,
    log: Callable[[str], None] = print,
    error: Callable[[str], None] = print,
    bad_pixels: BadPixelMap | None = None,
) -> tuple[list[str], list[str]]:
    """Denoise each input into ``outdir``; returns (written output specs, error messages).

    ``bad_pixels``: the camera's bad-pixel map (all inputs from that camera), filled after the model.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written, errors = [], []
    for spec in inputs:
        try:
            array = read_image(spec)
            out = denoise_array(denoiser, array, bit_depth, bad_pixels)
            target = output_spec_for(spec, outdir)
            write_image(target, out)
        except (FileFormatError, NormalisationError, OSError) as e:
            msg = f"{spec}: {e}"
            errors.append(msg)
            error(f"error: {msg}")
            continue
        written.append(target)
        log(f"{spec} -> {target} ({array.dtype}, {'x'.join(map(str, array.shape))})")
    return written, errors
