"""Pictures and tables for evaluation reports (matplotlib's Agg canvas, no pyplot state).

:func:`save_panels` shows what a filter did, frame by frame; :func:`save_loss_curves` how
training went; :func:`write_markdown_table` renders metric rows for a README or report.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = [
    "LOSS_CSV_COLUMNS",
    "ReportError",
    "robust_limits",
    "save_loss_curves",
    "save_panels",
    "write_markdown_table",
]

LOSS_CSV_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_psnr_db")
# Robust display range: a handful of hot pixels or cosmic rays must not flatten the frame.
ROBUST_PERCENTILES = (0.5, 99.5)


class ReportError(ValueError):
    """Report inputs that cannot be drawn or tabulated (bad shapes, missing CSV columns)."""


def robust_limits(images: Sequence[np.ndarray]) -> tuple[float, float]:
    """Shared display range of ``images``: their pooled 0.5 and 99.5 percentiles (NaN-safe)."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in images])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, ROBUST_PERCENTILES))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _is_residual(column: str) -> bool:
    return column.lower().startswith("residual")


def _is_probability(column: str) -> bool:
    return column.lower().startswith("defect")


def _own_scale(column: str) -> bool:
    """Panels not drawn on the row's shared intensity scale."""
    return _is_residual(column) or _is_probability(column)


def _with_residual(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The row's panels with ``residual = noisy - model`` after ``model`` when it can be made."""
    panels = {k: np.asarray(v) for k, v in row.items()}
    if "noisy" not in panels or "model" not in panels or any(_is_residual(k) for k in panels):
        return panels
    residual = panels["noisy"].astype(np.float64) - panels["model"].astype(np.float64)
    out: dict[str, np.ndarray] = {}
    for key, value in panels.items():
        out[key] = value
        if key == "model":
            out["residual"] = residual
    return out


def _zoom_centre(panels: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """Where to zoom: the largest absolute residual (what the filter changed most), else the centre."""
    for key, value in panels.items():
        if _is_residual(key):
            mag = np.abs(np.nan_to_num(np.asarray(value, dtype=np.float64)))
            iy, ix = np.unravel_index(int(np.argmax(mag)), mag.shape)
            return int(iy), int(ix)
    shape = next(iter(panels.values())).shape
    return shape[0] // 2, shape[1] // 2


def _crop_box(shape: tuple[int, ...], centre: tuple[int, int], size: int) -> tuple[slice, slice]:
    boxes = []
    for n, c in zip(shape[:2], centre):
        half = min(size, n) // 2
        start = min(max(c - half, 0), max(n - min(size, n), 0))
        boxes.append(slice(start, start + min(size, n)))
    return boxes[0], boxes[1]


def _draw(ax: Axes, image: np.ndarray, key: str, limits: tuple[float, float], fig: Figure) -> None:
    if _is_probability(key):
        im = ax.imshow(image, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    elif _is_residual(key):
        mag = np.abs(np.asarray(image, dtype=np.float64))
        finite = mag[np.isfinite(mag)]
        lim = float(np.percentile(finite, ROBUST_PERCENTILES[1])) if finite.size else 1.0
        lim = lim if lim > 0 else 1.0
        im = ax.imshow(image, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    else:
        im = ax.imshow(image, cmap="gray", vmin=limits[0], vmax=limits[1], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def save_panels(
    path: str | Path,
    rows: Sequence[Mapping[str, np.ndarray]],
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
    zoom_size: int | None = 64,
    add_residual: bool = True,
    panel_inches: float = 2.6,
    dpi: int = 120,
) -> Path:
    """A PNG grid: one row per frame, one column per named 2-D image (e.g. noisy/model/clean).

    Columns follow each row's dict order. With ``add_residual`` a ``residual`` panel
    (noisy - model, diverging colours centred on 0) is inserted after ``model`` when the
    row has both. Intensity panels of a row share one robust scale (0.5-99.5 percentiles);
    residual panels (any key starting with "residual") get their own symmetric scale, and
    probability panels (keys starting with "defect", e.g. a defect map) a fixed 0-1 scale.
    With ``zoom_size``, each frame gets a second row: ``zoom_size`` pixel crops around the
    largest residual, marked by a box on the full view, with their own shared scale.
    Returns the written path.
    """
    if len(rows) == 0:
        raise ReportError("save_panels expects at least one row of images; got none")
    if row_titles is not None and len(row_titles) != len(rows):
        raise ReportError(f"expected one row title per row ({len(rows)}); got {len(row_titles)}")
    for i, row in enumerate(rows):
        if not row:
            raise ReportError(f"row {i} has no images")
        shapes = {k: np.shape(v) for k, v in row.items()}
        if any(len(s) != 2 for s in shapes.values()) or len(set(shapes.values())) != 1:
            raise ReportError(f"row {i}: expected 2-D images of one shape; got {shapes}")
    frames = [_with_residual(r) if add_residual else {k: np.asarray(v) for k, v in r.items()} for r in rows]

    n_cols = max(len(p) for p in frames)
    per_frame = 2 if zoom_size else 1
    n_rows = per_frame * len(frames)
    fig = Figure(figsize=(panel_inches * n_cols, panel_inches * n_rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()

    for i, panels in enumerate(frames):
        intensity = [v for k, v in panels.items() if not _own_scale(k)]
        limits = robust_limits(intensity) if intensity else (0.0, 1.0)
        box = None
        if zoom_size:
            box = _crop_box(next(iter(panels.values())).shape, _zoom_centre(panels), zoom_size)
        zoom_limits = limits
        if box is not None:
            crops = [v[box] for k, v in panels.items() if not _own_scale(k)]
            # The zoom row gets its own shared scale: faint structure near the box is the point.
            zoom_limits = robust_limits(crops) if crops else limits
        for j, (key, image) in enumerate(panels.items()):
            ax = axes[i * per_frame, j]
            ax.set_axis_on()
            _draw(ax, image, key, limits, fig)
            label = key if row_titles is None or j else f"{row_titles[i]}\n{key}"
            ax.set_title(label, fontsize=9)
            if box is not None:
                ys, xs = box
                ax.add_patch(
                    Rectangle((xs.start - 0.5, ys.start - 0.5), xs.stop - xs.start, ys.stop - ys.start,
                              fill=False, edgecolor="lime", linewidth=0.8)
                )
                zax = axes[i * per_frame + 1, j]
                zax.set_axis_on()
                _draw(zax, image[ys, xs], key, zoom_limits, fig)
                zax.set_title(f"{key} (zoom y{ys.start}:{ys.stop} x{xs.start}:{xs.stop})", fontsize=7)
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _read_loss_csv(csv_path: Path) -> dict[str, np.ndarray]:
    try:
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in LOSS_CSV_COLUMNS if c not in header]
            if missing:
                raise ReportError(
                    f"{csv_path}: missing columns {missing}; "
                    f"expected {','.join(LOSS_CSV_COLUMNS)}, got {header}"
                )
            records = list(reader)
    except OSError as exc:
        raise ReportError(f"{csv_path}: cannot read training log: {exc}") from exc

    def number(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else math.nan
        except ValueError:
            return math.nan

    if not records:
        raise ReportError(f"{csv_path}: no rows; expected one row per logged step or epoch")
    return {c: np.array([number(r.get(c)) for r in records]) for c in LOSS_CSV_COLUMNS}


def _train_x(epoch: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Fractional epochs: rows of epoch e, ordered by step, spread over (e-1, e]."""
    x = epoch.astype(np.float64).copy()
    for e in np.unique(epoch[np.isfinite(epoch)]):
        idx = np.flatnonzero(epoch == e)
        if idx.size > 1:
            order = idx[np.argsort(step[idx], kind="stable")]
            x[order] = e - 1 + np.arange(1, idx.size + 1) / idx.size
    return x


def save_loss_curves(path: str | Path, csv_path: str | Path) -> Path:
    """Plot train/validation loss (log y) and validation PSNR against epoch from a training log.

    The CSV has columns ``epoch,step,train_loss,val_loss,val_psnr_db``; empty cells are
    skipped (validation is usually logged less often than training). Non-positive losses
    cannot sit on a log axis and are left out. Returns the written path.
    """
    data = _read_loss_csv(Path(csv_path))
    epoch, step = data["epoch"], data["step"]
    fig = Figure(figsize=(10, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_psnr = fig.subplots(1, 2)

    x_train = _train_x(epoch, step)
    train = data["train_loss"]
    ok = np.isfinite(x_train) & np.isfinite(train) & (train > 0)
    if ok.any():
        ax_loss.plot(x_train[ok], train[ok], label="train loss", linewidth=1, alpha=0.8)
    val = data["val_loss"]
    ok = np.isfinite(epoch) & np.isfinite(val) & (val > 0)
    if ok.any():
        ax_loss.plot(epoch[ok], val[ok], "o-", label="validation loss", markersize=3)
    if ax_loss.lines:
        ax_loss.set_yscale("log")
        ax_loss.legend()
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(True, which="both", alpha=0.3)

    val_psnr = data["val_psnr_db"]
    ok = np.isfinite(epoch) & np.isfinite(val_psnr)
    if ok.any():
        ax_psnr.plot(epoch[ok], val_psnr[ok], "o-", color="tab:green", markersize=3)
    ax_psnr.set_xlabel("epoch")
    ax_psnr.set_ylabel("validation PSNR (dB)")
    ax_psnr.grid(True, alpha=0.3)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _cell(value: object, float_format: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        text = str(value)
    elif isinstance(value, (float, np.floating)):
        text = format(float(value), float_format)
    else:
        text = str(value)
    # A pipe would end the cell early; a newline would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown_table(
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str],
    headers: Sequence[str] | None = None,
    float_format: str = ".4g",
) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns``.

    Floats use ``float_format``; a missing key leaves the cell empty; columns whose values
    are all numbers are right-aligned. Ends with a newline.
    """
    if len(columns) == 0:
        raise ReportError("write_markdown_table expects at least one column; got none")
    if headers is not None and len(headers) != len(columns):
        raise ReportError(f"expected one header per column ({len(columns)}); got {len(headers)}")
    names = list(headers) if headers is not None else list(columns)

    def numeric(column: str) -> bool:
        values = [r[column] for r in rows if r.get(column) is not None]
        return bool(values) and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values
        )

    align = ["---:" if numeric(c) else "---" for c in columns]
    lines = [
        "| " + " | ".join(_cell(n, float_format) for n in names) + " |",
        "| " + " | ".join(align) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), float_format) for c in columns) + " |")
    return "\n".join(lines) + "\n"
