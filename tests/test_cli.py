"""The `cdae` command line, run as users run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _cdae(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("cdae")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_help_lists_subcommands() -> None:
    r = _cdae("--help")
    assert r.returncode == 0
    for sub in ("train", "evaluate", "fuse", "denoise", "simulate", "compare", "demo", "sim-camera", "ioc", "engine",
                "export", "models", "config", "display", "archiver-pvs"):
        assert sub in r.stdout


def test_simulate_gallery(tmp_path: Path) -> None:
    r = _cdae("simulate", "-o", str(tmp_path / "g.png"), "--seed", "1")
    assert r.returncode == 0, r.stderr
    png = tmp_path / "g.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_compare_runs_with_a_model(tmp_path: Path, tiny_package: Path) -> None:
    r = _cdae("compare", "-o", str(tmp_path / "d"), "--model", "tiny:1", "--models-dir", str(tiny_package.parent.parent),
              "--frames", "2", "--size", "96x64")
    assert r.returncode == 0, r.stderr
    assert "mean PSNR" in r.stdout and (tmp_path / "d" / "demo.png").stat().st_size > 10_000


def test_train_bad_override_is_one_line_error(tmp_path: Path) -> None:
    r = _cdae("train", "--set", "optim.epochs=-1", "--out", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2
    assert "optim.epochs" in r.stderr and "Traceback" not in r.stderr


def test_one_list_of_backend_names() -> None:
    """The engine's config, the demo and every --backend flag take the same names (the demo once refused
    onnxruntime the engine serves)."""
    from typing import get_args

    from cdae.cli import build_parser
    from cdae.demo import DemoConfig
    from cdae.engine.config import EngineConfig
    from cdae.engine.kinds import BACKEND_KINDS

    assert get_args(EngineConfig.model_fields["backend"].annotation) == BACKEND_KINDS
    assert get_args(DemoConfig.model_fields["backend"].annotation) == BACKEND_KINDS
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command" or getattr(a, "choices", None) and "engine" in a.choices)
    flags = [a for sp in subs.choices.values() for a in sp._actions if "--backend" in a.option_strings]
    assert len(flags) >= 2 and all(tuple(a.choices) == BACKEND_KINDS for a in flags)


def test_denoise_guards_by_default_and_no_guard_writes_the_network_alone(tmp_path: Path, tiny_package: Path) -> None:
    """`cdae denoise` holds its output to the noise unless told `--no-guard`; flags need the guard."""
    import numpy as np

    rng = np.random.default_rng(3)
    frame = rng.poisson(400, (48, 64)).astype(np.uint16)
    frame[20, 30] = 4095  # a lone hot pixel: flagged as an impulse by the guard
    src = tmp_path / "f.npy"
    np.save(src, frame)
    models = str(tiny_package.parent.parent)
    out = {}
    for name, extra in (("guarded", ["--defect-map"]), ("plain", ["--no-guard"])):
        r = _cdae("denoise", str(src), "-o", str(tmp_path / name), "--model", "tiny:1", "--models-dir", models,
                  "--bit-depth", "12", *extra)
        assert r.returncode == 0, r.stderr
        out[name] = np.load(tmp_path / name / "f.npy").astype(np.int64)
    assert (tmp_path / "guarded" / "f.flags.tif").is_file() and not list((tmp_path / "plain").glob("*.flags.*"))
    moved = np.abs(out["guarded"] - frame.astype(np.int64))
    moved[20, 30] = 0  # the flagged impulse may move as far as it must
    bound = 1.3 * np.sqrt(float(np.median(frame))) + 1  # k = 1 sigma of the shot noise, and the noise fit's slack
    assert moved.max() <= bound
    plain = np.abs(out["plain"] - frame.astype(np.int64))
    plain[20, 30] = 0
    assert plain.max() > bound  # the tiny network alone moves pixels further: the bound is what held them
    r = _cdae("denoise", str(src), "-o", str(tmp_path / "x"), "--no-guard", "--defect-map")
    assert r.returncode == 2 and "drop --no-guard" in r.stderr
