"""Which training change stops the shipped model eating bright real features? A config sweep.

Issue 2's last open target: RMSE on the brightest real (non-defect) pixels no worse than the
noisy input's own. ``cdae-default:3`` is at 1.73x. This fine-tunes ``:3`` once per variant
(loss weights, scene mix, patch size), all from the same weights and the same data stream,
then scores every variant on the *validation* frames (seed ``val_seed``; the choice is made
there) and, for the record, on the held-out frames (seed ``test_seed``), with the metrics of
``cdae evaluate``: PSNR, RMSE on defect pixels, RMSE on bright real features, also split into
pixels the defect head calls defects (p > 0.5) and the rest.

Variants run in parallel processes (``--parallel``); on a GPU (``--device cuda``) a sweep of
eight 4-epoch fine-tunes takes minutes, on 2 CPU cores hours. GPU weights are not bit-identical
to CPU ones: the chosen variant is re-trained on the CPU for shipping.

    python experiments/bright_sweep.py --device cuda --epochs 4 --out runs/sweep
    python experiments/bright_sweep.py --device cpu --epochs 1 --frames 64 --variants ctrl,bw96  # smoke

Writes ``<out>/sweep.json`` and ``<out>/sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "training" / "configs" / "cdae-default-3.toml"

# name -> dotted overrides on top of the base config (--base; rounds 1-3: cdae-default-3.toml,
# round 4 "g12_*": cdae-default-6.toml, fine-tunes of :5 on generator 1.2 scenes)
VARIANTS: dict[str, list[str]] = {
    "ctrl": [],
    "bw96": ["loss.bright_weight=96"],
    "bw96_bce03": ["loss.bright_weight=96", "loss.defect_bce_weight=0.3"],
    "bw200": ["loss.bright_weight=200"],
    "bw64_dw2": ["loss.bright_weight=64", "loss.defect_weight=2"],
    "sat60_bw64": ["data.scene.saturating_fraction=0.6", "loss.bright_weight=64"],
    "blob06_bw64": ["data.defects.saturated_blob_probability=0.06", "loss.bright_weight=64"],
    "p192_bw64": ["data.patch_size=192", "loss.bright_weight=64"],
    # second round (after the first: bright weight trades PSNR for bright error, none met both)
    "ctrl_e6": ["optim.epochs=6"],
    "bw64_e6": ["loss.bright_weight=64", "optim.epochs=6"],
    "lin1": ["loss.linear_weight=1.0"],
    "lin3": ["loss.linear_weight=3.0"],
    "lin1_bw64": ["loss.linear_weight=1.0", "loss.bright_weight=64"],
    "lin1_e6": ["loss.linear_weight=1.0", "optim.epochs=6"],
    "lin3_bw64_e6": ["loss.linear_weight=3.0", "loss.bright_weight=64", "optim.epochs=6"],
    "lin1_dbce03_e6": ["loss.linear_weight=1.0", "loss.defect_bce_weight=0.3", "optim.epochs=6"],
    # third round (the linear term helped PSNR, defects and bright at once; lin3_bw64_e6 led on validation)
    "lin3_bw64_e8": ["loss.linear_weight=3.0", "loss.bright_weight=64", "optim.epochs=8"],
    "lin5_bw64_e6": ["loss.linear_weight=5.0", "loss.bright_weight=64", "optim.epochs=6"],
    "lin10_bw64_e6": ["loss.linear_weight=10.0", "loss.bright_weight=64", "optim.epochs=6"],
    "lin3_bw96_e6": ["loss.linear_weight=3.0", "loss.bright_weight=96", "optim.epochs=6"],
    "lin5_bw96_e6": ["loss.linear_weight=5.0", "loss.bright_weight=96", "optim.epochs=6"],
    "lin3_bw128_e6": ["loss.linear_weight=3.0", "loss.bright_weight=128", "optim.epochs=6"],
    "lin5_bw64_sat60_e6": ["loss.linear_weight=5.0", "loss.bright_weight=64", "data.scene.saturating_fraction=0.6",
                           "optim.epochs=6"],
    "lin5_bw64_lr5_e6": ["loss.linear_weight=5.0", "loss.bright_weight=64", "optim.lr=5e-4", "optim.epochs=6"],
    # fourth round: generator 1.2 (plasma through the optics' PSF); base cdae-default-6.toml, init :5
    "g12_ctrl": [],
    "g12_e8": ["optim.epochs=8"],
    "g12_lr3_e8": ["optim.lr=3e-4", "optim.epochs=8"],
    "g12_bw96": ["loss.bright_weight=96"],
    "g12_bw128_e8": ["loss.bright_weight=128", "optim.epochs=8"],
    "g12_lin5": ["loss.linear_weight=5.0"],
    "g12_dbce03": ["loss.defect_bce_weight=0.3"],
    "g12_sat60": ["data.scene.saturating_fraction=0.6"],
    # fifth round (all variants were <= 1x on 24 validation frames; on the held-out frames a hot row
    # and column crossing a saturated spot made most of them erase the spot as a glint; only the
    # heaviest bright weight did not): bright weight x length x rate, chosen on 96 validation frames
    "g12_bw128_e8_b": ["loss.bright_weight=128", "optim.epochs=8"],
    "g12_bw96_e8": ["loss.bright_weight=96", "optim.epochs=8"],
    "g12_bw160_e8": ["loss.bright_weight=160", "optim.epochs=8"],
    "g12_bw192_e8": ["loss.bright_weight=192", "optim.epochs=8"],
    "g12_bw128_lr3_e8": ["loss.bright_weight=128", "optim.lr=3e-4", "optim.epochs=8"],
    "g12_bw128_lin5_e8": ["loss.bright_weight=128", "loss.linear_weight=5.0", "optim.epochs=8"],
    "g12_bw128_e12": ["loss.bright_weight=128", "optim.epochs=12"],
    "g12_lr3_e8_b": ["optim.lr=3e-4", "optim.epochs=8"],
}


def variant_config(name: str, args: argparse.Namespace):  # noqa: ANN201
    from cdae.training.config import load_train_config

    common = [f"version=sweep-{name}", f"init_from={args.init}", f"device={args.device}", "threads=2",
              f"data.train_seed={args.train_seed}", f"data.frames_per_epoch={args.frames}",
              f"optim.epochs={args.epochs}", f"optim.lr={args.lr}", "optim.min_lr=2e-5", "optim.warmup_steps=20"]
    return load_train_config(args.base, common + VARIANTS[name])


def score(pkg: Path, device: str, which: str, n: int) -> dict[str, float]:
    import numpy as np
    from cdae.engine.inference import Denoiser
    from cdae.training.config import DataConfig
    from cdae.training.dataset import simulated_frames
    from cdae.training.evaluate import DEFAULT_SIZES, ModelRunner
    from cdae.training.metrics import aggregate, bright_feature_mask, frame_metrics

    data = DataConfig()
    seed = data.val_seed if which == "val" else data.test_seed
    frames = simulated_frames(data, seed, 0, n, DEFAULT_SIZES)
    runner = ModelRunner(Denoiser.from_package(pkg, device=device))
    ms, se = [], {"called": [0.0, 0, 0.0], "rest": [0.0, 0, 0.0]}
    for fr in frames:
        cam, prob = runner.full(fr.noisy, fr.adc_max), runner.outputs(fr.noisy, fr.adc_max)[1]
        ms.append(frame_metrics(cam, fr.clean, fr.defect_mask, float(fr.adc_max)))
        b = bright_feature_mask(fr.clean, fr.defect_mask != 0)
        em = ((cam - fr.clean) / fr.adc_max) ** 2
        en = ((fr.noisy - fr.clean) / fr.adc_max) ** 2
        for key, m in (("called", b & (prob > 0.5)), ("rest", b & (prob <= 0.5))):
            se[key][0] += float(em[m].sum())
            se[key][1] += int(m.sum())
            se[key][2] += float(en[m].sum())
    s = aggregate(ms)
    out = {k: float(s[k]) for k in ("psnr_db", "rmse_defect", "rmse_bright")}
    for key, (sm, cnt, sn) in se.items():
        out[f"bright_{key}_pixels"] = cnt
        out[f"bright_{key}_rmse"] = float(np.sqrt(sm / cnt)) if cnt else float("nan")
        out[f"bright_{key}_rmse_noisy"] = float(np.sqrt(sn / cnt)) if cnt else float("nan")
    return out


def run_variant(name: str, args: argparse.Namespace) -> dict:
    import torch
    from cdae.training.train import train

    torch.set_num_threads(2)
    cfg = variant_config(name, args)
    out = Path(args.out)
    t0 = time.perf_counter()
    logs: list[str] = []
    res = train(cfg, models_root=out / "models", run_dir=out / "runs" / name, progress=False, log=logs.append,
                command=f"python experiments/bright_sweep.py --variants {name}")
    seconds = time.perf_counter() - t0
    row = {"variant": name, "overrides": VARIANTS[name], "train_seconds": round(seconds, 1),
           "val_psnr_train_set_db": res.val_psnr_db, "log_tail": logs[-3:]}
    row["val"] = score(res.package, args.device, "val", args.val_frames)
    row["test"] = score(res.package, args.device, "test", args.test_frames)
    return row


def baseline_rows(args: argparse.Namespace) -> list[dict]:
    from cdae.engine.package import ModelRegistry

    rows = []
    for ref in args.references.split(","):
        pkg = ModelRegistry(Path(args.models)).resolve(ref)
        rows.append({"variant": ref, "overrides": [], "val": score(pkg, args.device, "val", args.val_frames),
                     "test": score(pkg, args.device, "test", args.test_frames)})
    return rows


def plot(rows: list[dict], path: Path, title: str = "fine-tunes of cdae-default:3") -> None:
    """PSNR against bright-feature RMSE (as a multiple of the noisy input's), validation and held-out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next(r for r in rows if "noisy_rmse_bright" in r.get("val", {}))
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, which in zip(axes, ("val", "test")):
        noisy = ref[which]["noisy_rmse_bright"]
        for r in rows:
            v = r[which]
            x, y = v["rmse_bright"] / noisy, v["psnr_db"]
            is_ref = r is ref
            ax.scatter([x], [y], s=60 if is_ref else 30, c="tab:red" if is_ref else "tab:blue", zorder=3)
            ax.annotate(r["variant"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(1.0, color="k", ls="--", lw=1, label="bright RMSE of the noisy input (target: at or left of it)")
        ax.set_xlabel("bright-feature RMSE / noisy input's")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title({"val": "validation frames (seed 2): the choice is made here",
                      "test": "held-out frames (seed 3): for the record"}[which], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Bright-feature sweep: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths: list[Path], out: Path) -> None:
    """One figure from several sweep.json files (the reference row once)."""
    rows: list[dict] = []
    for i, p in enumerate(paths):
        doc = json.loads(p.read_text())
        rows += [r for j, r in enumerate(doc["rows"]) if "val" in r and (i == 0 or j > 0)]
    plot(rows, out, f"{len(rows) - 1} fine-tunes of cdae-default:3 ({len(paths)} rounds)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--frames", type=int, default=4096, help="frames per epoch")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--train-seed", type=int, default=3000, help="data stream (fresh: :3 used 2000)")
    p.add_argument("--init", default="cdae-default:3")
    p.add_argument("--base", default=str(BASE_CONFIG), help="training config the variants override")
    p.add_argument("--models", default=str(ROOT / "models"))
    p.add_argument("--references", default="cdae-default:3")
    p.add_argument("--val-frames", type=int, default=24)
    p.add_argument("--test-frames", type=int, default=48)
    p.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--out", default=str(ROOT / "runs" / "sweep"))
    p.add_argument("--merge", nargs="+", type=Path, metavar="SWEEP_JSON",
                   help="only draw one figure from these sweep.json files, to --out (a .png path)")
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, Path(args.out))
        print(f"wrote {args.out}")
        return 0
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CDAE_MODELS", args.models)
    # init_from NAME:VERSION resolves in the sweep's own store: link the reference package there
    from cdae.engine.package import ModelRegistry

    src = ModelRegistry(Path(args.models)).resolve(args.init)
    dst = out / "models" / src.parent.name / src.name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src.resolve(), target_is_directory=True)

    t0 = time.perf_counter()
    rows = baseline_rows(args)
    from cdae.training.baselines import median_filter
    from cdae.training.config import DataConfig
    from cdae.training.dataset import simulated_frames
    from cdae.training.evaluate import DEFAULT_SIZES
    from cdae.training.metrics import aggregate, frame_metrics

    for which, n in (("val", args.val_frames), ("test", args.test_frames)):
        d = DataConfig()
        frames = simulated_frames(d, d.val_seed if which == "val" else d.test_seed, 0, n, DEFAULT_SIZES)
        s = aggregate([frame_metrics(f.noisy, f.clean, f.defect_mask, float(f.adc_max)) for f in frames])
        rows[0][which]["noisy_rmse_bright"] = float(s["rmse_bright"])
        rows[0][which]["noisy_psnr_db"] = float(s["psnr_db"])
        # the best tuned baseline of the held-out sets so far, for the +4 dB and 3x targets
        m3 = aggregate([frame_metrics(median_filter(f.noisy, 3), f.clean, f.defect_mask,
                                      float(f.adc_max)) for f in frames])
        rows[0][which]["median3_psnr_db"] = float(m3["psnr_db"])
        rows[0][which]["median3_rmse_defect"] = float(m3["rmse_defect"])
    ctx = get_context("spawn")
    doc = {"device": args.device, "torch_device_name": _device_name(args.device), "args": vars(args), "rows": rows}
    with ProcessPoolExecutor(max_workers=min(args.parallel, len(names)), mp_context=ctx) as pool:
        futures = {pool.submit(run_variant, n, args): n for n in names}
        for fut in as_completed(futures):
            n = futures[fut]
            try:
                rows.append(fut.result())
            except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others
                rows.append({"variant": n, "error": f"{type(e).__name__}: {e}"})
            r = rows[-1]
            if "val" in r:
                v = r["val"]
                print(f"{n:14s} val PSNR {v['psnr_db']:.2f} defect {v['rmse_defect']:.4f} bright {v['rmse_bright']:.5f}"
                      f" (train {r['train_seconds']:.0f} s)", flush=True)
            else:
                print(f"{n:14s} FAILED {r['error']}", flush=True)
            doc["seconds"] = round(time.perf_counter() - t0, 1)
            (out / "sweep.json").write_text(json.dumps(doc, indent=1))  # after each variant: a cut run keeps its rows
    plot([r for r in rows if "val" in r], out / "sweep.png", f"fine-tunes of {args.init} ({Path(args.base).name})")
    print(f"wrote {out / 'sweep.json'} and sweep.png ({doc['seconds']:.0f} s)")
    return 0


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
