"""Split large frames into overlapping tiles and stitch the results: pure functions of arrays.

Crop-centre stitching: each tile is read with a ``margin`` of context on every side that has
neighbours, run through the network, and only its centre (the "core") is kept. The cores tile
the frame exactly once. When the margin covers the network's receptive field and tile origins
sit on the network's downsampling grid (multiples of ``multiple``), every kept pixel saw exactly
the context it would have seen in the whole frame, so tiled and untiled results agree to float
rounding — no blending window, no seams. Normalisation is per frame: compute the network input
once on the whole frame and tile *that*, never normalise tiles separately.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cdae.engine.errors import EngineError


class TilingError(EngineError, ValueError):
    """The tile budget cannot hold a tile with the required margin; a ValueError too, as before."""


@dataclass(frozen=True)
class Tile:
    """One tile: ``read`` (rows, cols) of the frame go in; ``crop`` of the output goes to ``write``."""

    read: tuple[slice, slice]
    write: tuple[slice, slice]
    crop: tuple[slice, slice]

    @property
    def read_shape(self) -> tuple[int, int]:
        return (self.read[0].stop - self.read[0].start, self.read[1].stop - self.read[1].start)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def core_size(max_pixels: int, margin: int, multiple: int = 1, max_side: int | None = None) -> int:
    """Largest square core (a multiple of ``multiple``) whose tile, margins included, fits the budget."""
    side = math.isqrt(max_pixels)
    if max_side is not None:
        side = min(side, max_side)
    core = (side - 2 * margin) // multiple * multiple
    if core < max(multiple, 1):
        raise TilingError(
            f"a tile of at most {max_pixels} pixels (side {side}) cannot hold a core of {multiple} pixels plus "
            f"a margin of {margin} on each side; raise max_pixels to at least {(2 * margin + multiple) ** 2}"
        )
    return core


def _spans(n: int, core: int, margin: int) -> list[tuple[int, int, int, int]]:
    """(read_start, read_stop, core_start, core_stop) along one axis of length n."""
    out = []
    for c0 in range(0, n, core):
        c1 = min(n, c0 + core)
        out.append((max(0, c0 - margin), min(n, c1 + margin), c0, c1))
    return out


def plan_tiles(
    shape: tuple[int, int],
    *,
    max_pixels: int,
    margin: int,
    multiple: int = 1,
    max_side: int | None = None,
) -> list[Tile]:
    """Tiles covering a (H, W) frame: one whole-frame tile when it fits ``max_pixels`` and ``max_side``.

    ``margin`` is rounded up to a multiple of ``multiple`` so that every tile starts on the
    network's downsampling grid.
    """
    h, w = shape
    if h < 1 or w < 1:
        raise TilingError(f"cannot tile an empty frame of shape {shape}")
    multiple = max(1, multiple)
    # the network pads each input up to a multiple; budget the padded size
    fits = _round_up(h, multiple) * _round_up(w, multiple) <= max_pixels
    if max_side is not None:
        fits = fits and _round_up(h, multiple) <= max_side and _round_up(w, multiple) <= max_side
    whole = (slice(0, h), slice(0, w))
    if fits:
        return [Tile(read=whole, write=whole, crop=whole)]
    margin = _round_up(max(0, margin), multiple)
    core = core_size(max_pixels, margin, multiple, max_side)
    tiles = []
    for r0, r1, cr0, cr1 in _spans(h, core, margin):
        for q0, q1, cq0, cq1 in _spans(w, core, margin):
            tiles.append(Tile(
                read=(slice(r0, r1), slice(q0, q1)),
                write=(slice(cr0, cr1), slice(cq0, cq1)),
                crop=(slice(cr0 - r0, cr1 - r0), slice(cq0 - q0, cq1 - q0)),
            ))
    return tiles


TileFn = Callable[[np.ndarray], Sequence[np.ndarray]]


def run_tiled(x: np.ndarray, fn: TileFn, tiles: Sequence[Tile]) -> tuple[np.ndarray, ...]:
    """Apply ``fn`` ((C, h, w) → k arrays of (h, w)) tile by tile to ``x`` (C, H, W) and stitch the k outputs."""
    if len(tiles) == 1 and tiles[0].read_shape == x.shape[-2:]:
        return tuple(fn(x))
    outputs: list[np.ndarray] | None = None
    for tile in tiles:
        results = fn(x[(slice(None), *tile.read)])
        if outputs is None:
            outputs = [np.empty(x.shape[-2:], dtype=r.dtype) for r in results]
        for out, r in zip(outputs, results):
            out[tile.write] = r[tile.crop]
    assert outputs is not None, "no tiles"
    return tuple(outputs)
