"""Tests of cdae.training.report: the pictures are real PNGs, the tables are right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdae.training.report import (
    ReportError,
    robust_limits,
    save_loss_curves,
    save_panels,
    write_markdown_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        return img.size


def _row(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    clean = np.full((40, 56), 200.0)
    clean[15:20, 30:36] = 1500.0
    noisy = clean + rng.normal(0, 30, clean.shape)
    noisy[3, 4] = 4095.0  # a hot pixel: the residual's largest value
    model = clean + rng.normal(0, 5, clean.shape)
    return {"noisy": noisy, "model": model, "clean": clean, "median3": model + 1.0}


def test_save_panels_writes_a_grid_with_residual_and_zoom(tmp_path: Path) -> None:
    out = save_panels(tmp_path / "panels.png", [_row(0), _row(1)], row_titles=["frame 0", "frame 1"],
                      title="test", zoom_size=16)
    width, height = _png_size(out)
    # 5 columns (residual inserted) x 4 rows (two frames, each with a zoom row).
    assert width > height * 5 / 4 * 0.8
    no_zoom = save_panels(tmp_path / "nozoom.png", [_row(0)], zoom_size=None, add_residual=False)
    w2, h2 = _png_size(no_zoom)
    assert w2 / h2 == pytest.approx(4.0, rel=0.15)  # one row, four columns


def test_save_panels_refuses_mismatched_images(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="one shape"):
        save_panels(tmp_path / "x.png", [{"noisy": np.zeros((4, 4)), "model": np.zeros((4, 5))}])
    with pytest.raises(ReportError, match="2-D"):
        save_panels(tmp_path / "x.png", [{"noisy": np.zeros((2, 4, 4))}])
    with pytest.raises(ReportError, match="one row title per row"):
        save_panels(tmp_path / "x.png", [_row(0)], row_titles=["a", "b"])
    with pytest.raises(ReportError):
        save_panels(tmp_path / "x.png", [])


def test_robust_limits_ignore_a_few_hot_pixels() -> None:
    frame = np.full((100, 100), 100.0)
    frame[::10, ::10] = np.linspace(100, 200, 100).reshape(10, 10)
    frame[0, :5] = 65535.0  # 5 hot pixels of 10,000: beyond the 99.5 percentile
    lo, hi = robust_limits([frame])
    assert lo == pytest.approx(100.0)
    assert hi < 1000.0
    assert robust_limits([np.full((3, 3), 7.0)]) == (7.0, 8.0)


def test_save_loss_curves(tmp_path: Path) -> None:
    csv_path = tmp_path / "log.csv"
    lines = ["epoch,step,train_loss,val_loss,val_psnr_db"]
    step = 0
    for epoch in range(1, 6):
        for _ in range(3):
            step += 1
            lines.append(f"{epoch},{step},{1.0 / step:.5f},,")
        lines.append(f"{epoch},{step},,{1.2 / epoch:.5f},{30 + epoch:.2f}")
    csv_path.write_text("\n".join(lines) + "\n")
    out = save_loss_curves(tmp_path / "plots" / "loss.png", csv_path)
    width, height = _png_size(out)
    assert width > height


def test_save_loss_curves_names_missing_columns(tmp_path: Path) -> None:
    csv_path = tmp_path / "log.csv"
    csv_path.write_text("epoch,step,train_loss\n1,1,0.5\n")
    with pytest.raises(ReportError, match=r"log\.csv.*\['val_loss', 'val_psnr_db'\]"):
        save_loss_curves(tmp_path / "loss.png", csv_path)
    csv_path.write_text("epoch,step,train_loss,val_loss,val_psnr_db\n")
    with pytest.raises(ReportError, match="no rows"):
        save_loss_curves(tmp_path / "loss.png", csv_path)
    with pytest.raises(ReportError, match="missing.csv"):
        save_loss_curves(tmp_path / "loss.png", tmp_path / "missing.csv")


def test_write_markdown_table() -> None:
    rows = [
        {"method": "cdae", "psnr_db": 41.23456, "ssim": 0.98765, "n": 12},
        {"method": "median|3", "psnr_db": 35.5, "n": 12},
    ]
    table = write_markdown_table(rows, ["method", "psnr_db", "ssim", "n"],
                                 headers=["method", "PSNR (dB)", "SSIM", "frames"])
    assert table == (
        "| method | PSNR (dB) | SSIM | frames |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| cdae | 41.23 | 0.9877 | 12 |\n"
        "| median\\|3 | 35.5 |  | 12 |\n"
    )
    with pytest.raises(ReportError, match="one header per column"):
        write_markdown_table(rows, ["method"], headers=["a", "b"])
