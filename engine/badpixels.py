"""A camera's bad-pixel map: the pixels that are bad in every frame, and how to fill them.

Hot, stuck, dead pixels and bad columns belong to the sensor, not to the scene: sites measure
them once (dark frames for hot ones, flat fields for dead ones) and list them. One frame alone
cannot tell a stuck pixel from a sharp point source, and the CDAE, which must not eat point
sources, keeps some; the list removes that doubt. The map is applied to the *denoised* frame
(the network sees the raw frame it was trained on; measured on 192 validation frames, filling
the listed pixels in the raw frame first cost a glint frame dearly, filling them afterwards did
not: ``experiments/bad_pixel_map.py``).

The file format is areaDetector's (ADCore ``NDPluginBadPixel``), so a site's existing lists work::

    {"Bad pixels": [
        {"Pixel": [x, y], "Median": [mx, my]},   # median of the (2mx+1) x (2my+1) box around it
        {"Pixel": [x, y], "Set": value},         # a fixed value (DN)
        {"Pixel": [x, y], "Replace": [dx, dy]}   # the value of the pixel at offset (dx, dy)
    ]}

``x`` is the column, ``y`` the row, from the frame's top-left pixel. As in ADCore, an entry with
several keys takes the last of Median, Set, Replace, and one with none is set to 0. Medians leave
out the other listed pixels (a bad column is filled from its neighbours, not from itself); a box
with no good pixel grows until it has one, up to half-widths of ``MAX_HALF_WIDTH``: a pixel with
nothing good that near (the middle of a large dead block) keeps its value, is still marked in the
defect map, and is counted (:meth:`BadPixelMap.unfilled`), as are the largest grown boxes beyond
``MAX_MEDIAN_WORK``. Listed pixels outside a frame (a region
of interest) are skipped.

The cost is bounded when a map is read: at most ``MAX_PIXELS`` entries, Median half-widths at most
``MAX_HALF_WIDTH``, and the Median boxes together at most ``MAX_MEDIAN_WORK`` pixels; a frame's fill
reads each listed pixel's final box once, in chunks of bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cdae.engine.errors import EngineError

__all__ = ["BadPixelError", "BadPixelMap", "BadPixelMaps"]

MODES = ("median", "set", "replace")
#: ADCore's key precedence: a later key overrides an earlier one.
_KEYS = (("Median", "median"), ("Set", "set"), ("Replace", "replace"))
MAX_PIXELS = 262_144  # 6 % of a 2048 x 2048 sensor: a camera with more bad pixels needs repair, not a map
MAX_HALF_WIDTH = 16  # Median boxes (given or grown) up to 33 x 33
MAX_MEDIAN_WORK = 16_000_000  # pixels read per frame by all given Median boxes together (~0.1 s)
_MAX_COORD = 2**31  # Pixel, Median and Replace values at most this (exclusive) in magnitude
_CHUNK_ELEMENTS = 1 << 22  # box values held at once by one fill step (16 MiB of float32)


class BadPixelError(EngineError):
    """A bad-pixel file that cannot be read or used; the message says which entry and why."""


@dataclass(frozen=True)
class BadPixelMap:
    """Listed pixels (columns ``x``, rows ``y``), each with its fill mode and two parameters.

    ``a``/``b``: Median -> half-widths (mx, my); Set -> (value, 0); Replace -> offset (dx, dy).
    """

    x: np.ndarray
    y: np.ndarray
    mode: np.ndarray  #: index into MODES
    a: np.ndarray
    b: np.ndarray
    source: str = ""
    #: frame size -> (mask, fill plan): which pixels to fill and from where, worked out once per size
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.x.size)

    # --- reading and writing -------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path | str) -> BadPixelMap:
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadPixelError(f"cannot read bad-pixel file {path}: {exc}") from exc
        return cls.from_json(text, source=str(path))

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> BadPixelMap:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadPixelError(f"{source}: not JSON ({exc})") from exc
        entries = doc.get("Bad pixels") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise BadPixelError(f'{source}: expected {{"Bad pixels": [...]}} (areaDetector NDPluginBadPixel format)')
        if len(entries) > MAX_PIXELS:
            raise BadPixelError(f"{source}: {len(entries)} entries, more than {MAX_PIXELS}")
        x, y, mode, a, b = (np.zeros(len(entries), t) for t in (np.int64, np.int64, np.int8, np.float64, np.float64))
        for i, e in enumerate(entries):
            where = f"{source}: entry {i}"
            if not isinstance(e, dict):
                raise BadPixelError(f"{where}: expected an object, got {_kind(e)}")
            x[i], y[i] = _pair(e.get("Pixel"), f"{where}: Pixel", integer=True, minimum=0)
            mode[i], a[i], b[i] = MODES.index("set"), 0.0, 0.0  # ADCore: no key -> set to 0
            for key, name in _KEYS:
                if key in e:
                    mode[i] = MODES.index(name)
                    if name == "set":
                        a[i], b[i] = _number(e[key], f"{where}: Set"), 0.0
                    else:
                        a[i], b[i] = _pair(e[key], f"{where}: {key}", integer=True,
                                           minimum=0 if name == "median" else None)
            if mode[i] == MODES.index("median") and max(a[i], b[i]) > MAX_HALF_WIDTH:
                raise BadPixelError(f"{where}: Median half-widths at most {MAX_HALF_WIDTH} "
                                    f"(a {2 * MAX_HALF_WIDTH + 1} x {2 * MAX_HALF_WIDTH + 1} box)")
        med = mode == MODES.index("median")
        work = int(((2 * a[med] + 1) * (2 * b[med] + 1)).sum())
        if work > MAX_MEDIAN_WORK:
            raise BadPixelError(f"{source}: the Median boxes read {work} pixels per frame, more than {MAX_MEDIAN_WORK}: "
                                "smaller boxes or fewer entries")
        return cls(x, y, mode, a, b, source)

    def check_frame_size(self, pixels: int) -> None:
        """Refuse a map with more entries than a frame of ``pixels`` has pixels (a map of another camera)."""
        if len(self) > pixels:
            raise BadPixelError(f"{self.source}: {len(self)} entries, more than the {pixels} pixels of a frame")

    @classmethod
    def from_mask(cls, mask: np.ndarray, half: int = 1, source: str = "<mask>") -> BadPixelMap:
        """Every True pixel of a 2-D mask, filled with the median of its (2 half + 1)² box."""
        m = np.asarray(mask, dtype=bool)
        if m.ndim != 2:
            raise BadPixelError(f"a bad-pixel mask must be 2-D, got shape {m.shape}")
        y, x = np.nonzero(m)
        n = x.size
        return cls(x.astype(np.int64), y.astype(np.int64), np.zeros(n, np.int8), np.full(n, float(half)),
                   np.full(n, float(half)), source)

    def to_json(self) -> str:
        out = []
        for x, y, mode, a, b in zip(self.x.tolist(), self.y.tolist(), self.mode.tolist(), self.a.tolist(),
                                    self.b.tolist()):
            name = MODES[mode]
            if name == "set":
                out.append({"Pixel": [x, y], "Set": a})
            else:
                out.append({"Pixel": [x, y], name.capitalize(): [int(a), int(b)]})
        # one entry a line: diffable, and readable by ADCore's reader
        return '{"Bad pixels": [\n' + ",\n".join("  " + json.dumps(e) for e in out) + "\n]}\n"

    def save(self, path: Path | str) -> None:
        Path(path).write_text(self.to_json())

    def merged(self, other: BadPixelMap, source: str | None = None) -> BadPixelMap:
        """This map's entries and, after them, ``other``'s at the pixels this one does not list (a site's
        file and a live map: the file's fill wins where both list a pixel)."""
        if len(other) == 0:
            return self
        span = int(max(self.x.max(initial=0), other.x.max(initial=0))) + 1
        mine = self.y * span + self.x
        extra = ~np.isin(other.y * span + other.x, mine)
        return BadPixelMap(np.concatenate([self.x, other.x[extra]]), np.concatenate([self.y, other.y[extra]]),
                           np.concatenate([self.mode, other.mode[extra]]), np.concatenate([self.a, other.a[extra]]),
                           np.concatenate([self.b, other.b[extra]]),
                           source if source is not None else f"{self.source} + {other.source}")

    # --- use -----------------------------------------------------------------------------------
    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Boolean (H, W) map of the listed pixels inside a frame of ``shape``."""
        h, w = shape
        m = np.zeros((h, w), dtype=bool)
        inside = (self.x < w) & (self.y < h)
        m[self.y[inside], self.x[inside]] = True
        return m

    def outside(self, shape: tuple[int, int]) -> int:
        """How many listed pixels a frame of ``shape`` does not contain."""
        h, w = shape
        return int(np.count_nonzero((self.x >= w) | (self.y >= h)))

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """A float32 copy of the 2-D ``frame`` with every listed pixel filled; the rest unchanged.

        All fills read the frame as it came (a listed pixel never fills another).
        """
        ys, xs, vals = self.fills(frame)
        out = np.asarray(frame).astype(np.float32)
        out[ys, xs] = vals
        return out

    def fills(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, columns and float32 fill values of the listed pixels inside the 2-D ``frame``.

        Only the listed pixels and their boxes are read, and which pixels those are is worked out once
        per frame size: a 2048 x 2048 frame with thousands of listed pixels costs a few milliseconds.
        """
        src = np.asarray(frame)
        if src.ndim != 2:
            raise BadPixelError(f"bad pixels apply to 2-D frames, got shape {src.shape}")
        h, w = src.shape
        bad, plan, _ = self._plan((h, w))
        ys_all, xs_all, vals_all = [], [], []
        for name, ys, xs, a, b, groups in plan:
            if name == "set":
                vals = a.astype(np.float32)
            elif name == "replace":
                vals = src[ys + b.astype(np.int64), xs + a.astype(np.int64)].astype(np.float32)
            else:
                vals = np.empty(xs.size, np.float32)
                for (mx, my), idx in groups:
                    if mx < 0:  # nothing good within MAX_HALF_WIDTH: left as it is
                        vals[idx] = src[ys[idx], xs[idx]]
                    else:
                        vals[idx] = _box_median(src, bad, ys[idx], xs[idx], int(mx), int(my))
            ys_all.append(ys)
            xs_all.append(xs)
            vals_all.append(vals)
        if not ys_all:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(ys_all), np.concatenate(xs_all), np.concatenate(vals_all)

    def fill_output(self, denoised: np.ndarray, residual: np.ndarray | None = None,
                    defect_map: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """A filter's outputs with the listed pixels filled: the denoised frame (its dtype kept, integers
        rounded and clipped), the residual (raw - denoised) moved by the same amount, and the defect map
        at certainty there (1.0, or 255 for a uint8 map). Inputs are not modified."""
        d = np.asarray(denoised)
        ys, xs, vals = self.fills(d)
        if d.dtype.kind in "iu":
            info = np.iinfo(d.dtype)
            vals = np.clip(np.rint(vals), info.min, info.max)
        filled = d.copy()
        filled[ys, xs] = vals.astype(d.dtype)
        if residual is not None:
            residual = np.array(residual, dtype=np.float32, copy=True)
            residual[ys, xs] += d[ys, xs].astype(np.float32) - filled[ys, xs].astype(np.float32)
        if defect_map is not None:
            defect_map = np.array(defect_map, copy=True)
            defect_map[ys, xs] = 255 if defect_map.dtype == np.uint8 else 1.0
        return filled, residual, defect_map

    def unfilled(self, shape: tuple[int, int]) -> int:
        """Median pixels of a frame of ``shape`` with no good pixel within ``MAX_HALF_WIDTH``: left as they are."""
        return self._plan(shape)[2]

    def _plan(self, shape: tuple[int, int]) -> tuple[np.ndarray, list[tuple], int]:
        """For a frame size: the mask of listed pixels and, per fill mode, the pixels inside the frame
        with their parameters (Replace sources inside it too) and Median's groups by box size. Cached:
        frames come one size at a time."""
        cache = self._plans
        if shape in cache:
            return cache[shape]
        h, w = shape
        inside = (self.x < w) & (self.y < h)
        bad = self.mask(shape)
        plan = []
        unfilled = 0
        for k, name in enumerate(MODES):
            sel = inside & (self.mode == k)
            if name == "replace":
                sx, sy = self.x + self.a.astype(np.int64), self.y + self.b.astype(np.int64)
                sel &= (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
            if sel.any():
                a, b = self.a[sel], self.b[sel]
                groups = []
                if name == "median":
                    fa, fb = _grown_boxes(bad, self.y[sel], self.x[sel], a.astype(np.int64), b.astype(np.int64))
                    unfilled += int(np.count_nonzero(fa < 0))
                    groups = _groups(fa.astype(np.float64), fb.astype(np.float64))
                plan.append((name, self.y[sel], self.x[sel], a, b, groups))
        cache.clear()
        cache[shape] = (bad, plan, unfilled)
        return cache[shape]


class BadPixelMaps:
    """The maps an engine holds for its clients, by id (the first 16 hex digits of the sha256 of the map's
    canonical JSON): a client sends its camera's map once over the control channel and names it in
    each frame request. Bounded: the least recently used map goes first. Thread-safe."""

    def __init__(self, keep: int = 16) -> None:
        self._maps: OrderedDict[str, BadPixelMap] = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()

    @staticmethod
    def id_of(bad: BadPixelMap) -> str:
        return hashlib.sha256(bad.to_json().encode()).hexdigest()[:16]

    def add(self, bad: BadPixelMap) -> str:
        key = self.id_of(bad)
        with self._lock:
            self._maps[key] = bad
            self._maps.move_to_end(key)
            while len(self._maps) > self._keep:
                self._maps.popitem(last=False)
        return key

    def get(self, key: str) -> BadPixelMap | None:
        with self._lock:
            bad = self._maps.get(key)
            if bad is not None:
                self._maps.move_to_end(key)
            return bad

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)


def _pair(v: object, where: str, integer: bool, minimum: int | None) -> tuple[int, int]:
    if not (isinstance(v, (list, tuple)) and len(v) == 2):
        raise BadPixelError(f"{where}: expected [x, y], got {_kind(v)}")
    out = []
    for c in v:
        # an int is checked as an int: math.isfinite(10**400) would raise OverflowError itself
        if isinstance(c, bool) or not isinstance(c, (int, float)) or (
                isinstance(c, float) and not math.isfinite(c)) or (integer and c != int(c)):
            raise BadPixelError(f"{where}: expected integers")
        if minimum is not None and c < minimum:
            raise BadPixelError(f"{where}: expected values >= {minimum}")
        if abs(c) >= _MAX_COORD:  # no sensor is that large; int64 arrays and C longs downstream would overflow
            raise BadPixelError(f"{where}: expected values below 2**31 in magnitude")
        out.append(int(c))
    return out[0], out[1]


def _kind(v: object) -> str:
    """What a JSON value is, never what it holds: errors end up on PVs any client can read."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _number(v: object, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadPixelError(f"{where}: expected a finite number, got {_kind(v)}")
    return float(v)


def _groups(a: np.ndarray, b: np.ndarray) -> list[tuple[tuple[float, float], np.ndarray]]:
    keys = np.stack([a, b], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    return [((float(u[0]), float(u[1])), np.nonzero(inverse.ravel() == i)[0]) for i, u in enumerate(uniq)]


def _grown_boxes(bad: np.ndarray, ys: np.ndarray, xs: np.ndarray, mx: np.ndarray,
                 my: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's Median half-widths once grown (both by one at a time) until the box holds a good pixel
    of the frame; (-1, -1) where none does within ``MAX_HALF_WIDTH``. Depends on the mask only: worked
    out once per frame size, with an integral image (four lookups per pixel and step)."""
    h, w = bad.shape
    good = np.zeros((h + 1, w + 1), np.int64)
    good[1:, 1:] = np.cumsum(np.cumsum(~bad, axis=0), axis=1)
    fa, fb = np.full(ys.size, -1, np.int64), np.full(ys.size, -1, np.int64)
    todo = np.arange(ys.size)
    grow = 0
    while todo.size:
        ax, ay = mx[todo] + grow, my[todo] + grow
        fits = (ax <= MAX_HALF_WIDTH) & (ay <= MAX_HALF_WIDTH)
        todo, ax, ay = todo[fits], ax[fits], ay[fits]
        if not todo.size:
            break
        y0, y1 = np.clip(ys[todo] - ay, 0, h), np.clip(ys[todo] + ay + 1, 0, h)
        x0, x1 = np.clip(xs[todo] - ax, 0, w), np.clip(xs[todo] + ax + 1, 0, w)
        count = good[y1, x1] - good[y0, x1] - good[y1, x0] + good[y0, x0]
        found = count > 0
        fa[todo[found]], fb[todo[found]] = ax[found], ay[found]
        todo = todo[~found]
        grow += 1
    filled = np.nonzero(fa >= 0)[0]
    area = (2 * fa[filled] + 1) * (2 * fb[filled] + 1)
    if area.sum() > MAX_MEDIAN_WORK:  # grown boxes too: the largest are left as they are, counted as unfilled
        order = np.argsort(area, kind="stable")
        over = filled[order[np.cumsum(area[order]) > MAX_MEDIAN_WORK]]
        fa[over], fb[over] = -1, -1
    return fa, fb


def _box_median(src: np.ndarray, bad: np.ndarray, ys: np.ndarray, xs: np.ndarray, mx: int, my: int) -> np.ndarray:
    """Median of the good pixels in the (2mx+1) x (2my+1) box around each (y, x); every box holds at least
    one (:func:`_grown_boxes` chose the sizes). In chunks: at most ``_CHUNK_ELEMENTS`` values at once."""
    h, w = src.shape
    vals = np.empty(ys.size, dtype=np.float32)
    dy, dx = np.mgrid[-my:my + 1, -mx:mx + 1]
    dy, dx = dy.ravel()[None, :], dx.ravel()[None, :]
    step = max(1, _CHUNK_ELEMENTS // dy.size)
    for start in range(0, ys.size, step):
        sl = slice(start, start + step)
        py, px = ys[sl, None] + dy, xs[sl, None] + dx
        valid = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        pyc, pxc = np.clip(py, 0, h - 1), np.clip(px, 0, w - 1)
        valid &= ~bad[pyc, pxc]
        # median of the good values per row: sorted, NaNs go last (np.nanmedian is several times slower)
        rows = np.sort(np.where(valid, src[pyc, pxc].astype(np.float32), np.float32(np.nan)), axis=1)
        k = np.maximum(valid.sum(axis=1), 1)
        r = np.arange(rows.shape[0])
        vals[sl] = 0.5 * (rows[r, (k - 1) // 2] + rows[r, k // 2])
    return vals
