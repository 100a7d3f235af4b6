"""How much a weight average (``optim.ema_decay``) steadies the end of the recipe: two seeds of
``experiments/recipe-ema.toml``, each logging its averaged weights' validation (``val_psnr_db``) beside the
optimiser's own (``val_psnr_raw_db``) at every epoch.

Two questions, for issue 16's tolerance (a re-run on another CPU kind must end within 0.3 dB of the record):
- within a run: how far the validation PSNR moves from one epoch to the next over the last stage, raw and averaged;
- across runs (seed 1 stands in for another CPU's rounding, which parts a run from its record from the first epoch):
  how far apart the two runs end, raw and averaged.

    cdae train --config experiments/recipe-ema.toml --out runs/ema/store --run-dir runs/ema/s0 --set seed=0
    cdae train --config experiments/recipe-ema.toml --out runs/ema/store --run-dir runs/ema/s1 --set seed=1 \\
        --set version=ema-s1
    python experiments/ema_variance.py runs/ema/s0/loss.csv runs/ema/s1/loss.csv

Writes ``experiments/results/ema-variance.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results"


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary(rows: list[dict[str, str]], stage: str) -> dict[str, object]:
    last = [r for r in rows if r.get("stage") == stage]
    out: dict[str, object] = {"epochs": len(rows), f"{stage}_epochs": len(last)}
    for key, name in (("val_psnr_db", "averaged"), ("val_psnr_raw_db", "raw")):
        v = np.array([float(r[key]) for r in last])
        steps = np.abs(np.diff(v))
        out[name] = {"final_db": round(float(v[-1]), 3), "epoch_to_epoch_mean_db": round(float(steps.mean()), 3),
                     "epoch_to_epoch_max_db": round(float(steps.max()), 3),
                     "last_half_std_db": round(float(v[len(v) // 2:].std()), 3)}
    out["final_val_loss"] = {"averaged": float(last[-1]["val_loss"]), "raw": float(last[-1]["val_loss_raw"])}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", type=Path, help="loss.csv of each run")
    p.add_argument("--stage", default="bright", help="the stage whose end is judged")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    runs = {str(c.parent.name): read(c) for c in a.csv}
    result: dict[str, object] = {"runs": {k: summary(v, a.stage) for k, v in runs.items()}}
    if len(runs) >= 2:
        finals = {name: [s[name]["final_db"] for s in result["runs"].values()] for name in ("averaged", "raw")}
        losses = {name: [s["final_val_loss"][name] for s in result["runs"].values()] for name in ("averaged", "raw")}
        result["across_runs"] = {
            name: {"final_spread_db": round(max(v) - min(v), 3),
                   "final_loss_spread_relative": round((max(losses[name]) - min(losses[name])) / min(losses[name]), 4)}
            for name, v in finals.items()}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ema-variance.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, rows), colour in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        ep = [int(r["epoch"]) for r in rows]
        ax.plot(ep, [float(r["val_psnr_raw_db"]) for r in rows], "--", color=colour, alpha=0.6,
                label=f"{name}: the optimiser's weights")
        ax.plot(ep, [float(r["val_psnr_db"]) for r in rows], "-", color=colour, lw=2, label=f"{name}: their average")
        starts = [int(r["epoch"]) for r in rows if r.get("stage") == a.stage]
        if starts:
            ax.axvline(starts[0] - 0.5, color="grey", lw=0.8)
    ax.set_xlabel("epoch (the line: the bright stage starts)")
    ax.set_ylabel("validation PSNR (dB)")
    ax.set_title("A weight average at the end of each stage (optim.ema_decay)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "ema-variance.png", dpi=110)
    print(f"wrote {a.out / 'ema-variance.json'} and .png")


if __name__ == "__main__":
    main()
