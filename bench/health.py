"""Camera-health benchmark: the live bad-pixel map (``cdae/health.py``) on the simulator's frames.

It drives :class:`cdae.health.HealthTracker` directly (no IOC, no CA: the same class the filter
IOC runs in its worker thread) with the simulated camera's frames (``cdae.simcamera``: fresh
noise and radiation every frame, the training simulator's moving scenes cycled from a bank of 16,
the camera's run-time damage), at the tracker's default settings (32-frame windows, 2 to enter,
8 to leave).

1. **Healthy cameras, 10,000 frames each** (256 x 256): a camera with its own damage from the
   start (dead, stuck, warm pixels, bad columns and rows, radiation; the simulator's layout is
   the truth) and a clean one with glints; each with a bright static point source in the scene
   and a 500-frame radiation burst (5,000 hits per megapixel and frame). *False entries*: pixels
   (and lines) that entered the map at any time and are not the camera's defects.
2. **An ageing camera**: new hot pixels of three strengths, stuck and dead pixels, a hot column,
   a faint hot column and a dead column, all from frame 1013 (mid-window), then a burst.
   *Detection delay*: frames from the damage to the window that puts it in the map.
3. **Cost per frame** of ``HealthTracker.update`` at 256² and 1024² (uint16; median of single
   frames, and the mean, which carries the window's work every 32 frames).

    python bench/health.py                 # ~5 minutes on 2 cores
    python bench/health.py --frames 2000   # a quick look

Writes ``bench/results/health-<device>.json`` and ``health-<device>.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SIZE = 256
ONSET = 1013
POINT = (64.0, 192.0, 0.8)  # x, y, peak (relative intensity)
BURST = "radiation@{at},frames=500,level=5000"
DAMAGE = {  # kind: the sim-camera damage spec (all from ONSET)
    "hot (0.2 of span)": f"hot_pixels@{ONSET},count=10,level=0.2,seed=1",
    "hot (0.02)": f"hot_pixels@{ONSET},count=10,level=0.02,seed=2",
    "hot (0.005)": f"hot_pixels@{ONSET},count=10,level=0.005,seed=3",
    "stuck": f"stuck_pixels@{ONSET},count=10,level=0.3,seed=4",
    "dead": f"dead_pixels@{ONSET},count=10,level=0,seed=5",
    "hot column (0.02)": f"hot_column@{ONSET},x=100,level=0.02",
    "hot column (0.005)": f"hot_column@{ONSET},x=150,level=0.005",
    "dead column": f"dead_column@{ONSET},x=200",
}


def _bench_module(name: str):  # noqa: ANN202 - a sibling benchmark script, for its helpers
    spec = importlib.util.spec_from_file_location(f"cdae_bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _camera(seed: int, damage: list[str]):  # noqa: ANN202
    from cdae.simcamera import CameraConfig, DamageEvent, camera_model, damage_pixels

    events = [DamageEvent.parse(d) for d in damage]
    cam = CameraConfig(width=SIZE, height=SIZE, seed=seed, bank=16, fresh_noise=True, damage=events,
                       point_sources=[POINT])
    return cam, camera_model(cam, SIZE, SIZE), damage_pixels(events, SIZE, SIZE), events


def _truth(model) -> tuple[np.ndarray, set[int], set[int]]:  # noqa: ANN001
    """The camera's own defects: pixel mask, bad columns, bad rows (the simulator's layout)."""
    layout = model.layout
    mask = layout.static_mask() != 0
    cols = {ln.index for ln in layout.bad_lines if ln.axis == "column"}
    rows = {ln.index for ln in layout.bad_lines if ln.axis == "row"}
    return mask, cols, rows


def healthy_run(seed: int, frames: int, burst_at: int) -> dict[str, object]:
    from cdae.health import HealthConfig, HealthTracker
    from cdae.simcamera import camera_frame

    cam, model, where, _ = _camera(seed, [BURST.format(at=burst_at)])
    truth, cols, rows = _truth(model)
    t = HealthTracker((SIZE, SIZE), HealthConfig())
    ever = np.zeros((SIZE, SIZE), bool)
    ever_cols: set[int] = set()
    ever_rows: set[int] = set()
    history, hits, costs = [], [], []
    entries = leaves = 0
    x, y = int(POINT[0]), int(POINT[1])
    point_entered = False
    for i in range(frames):
        f = camera_frame(model, cam, i, where).astype(np.uint16)
        t0 = time.perf_counter()
        r = t.update(f, unique_id=i + 1, timestamp=1000.0 + i / 10)
        costs.append(time.perf_counter() - t0)
        hits.append(r.hits)
        if r.window is not None:
            ever |= t.map & ~t.on_line()
            ever_cols |= set(np.flatnonzero(t.columns.bad).tolist())
            ever_rows |= set(np.flatnonzero(t.rows.bad).tolist())
            point_entered |= bool(t.map[y - 2:y + 3, x - 2:x + 3].any())
            entries += r.window.entered
            leaves += r.window.left
            c = r.window.counts
            false_now = int(np.count_nonzero(t.map & ~t.on_line() & ~truth))
            history.append([i + 1, c.hot, c.dead, c.stuck, c.bad_columns + c.bad_rows, false_now,
                            r.window.count_threshold])
    false_px = ever & ~truth
    near = false_px & _dilate(truth)
    found = t.map | t.on_line()
    return {
        "camera_seed": seed, "frames": frames, "burst_frames": [burst_at, burst_at + 500],
        "camera_defect_pixels": int(truth.sum()), "camera_bad_lines": len(cols) + len(rows),
        "false_entries_pixels": int(false_px.sum()),
        "false_entries_pixels_next_to_a_camera_defect": int(near.sum()),
        "false_entries_lines": len(ever_cols - cols) + len(ever_rows - rows),
        "false_entry_rate_per_pixel_per_frame": float(false_px.sum()) / (SIZE * SIZE * frames),
        "point_source_entered": point_entered,
        "camera_defects_found": int((found & truth).sum()),
        "camera_lines_found": len(ever_cols & cols) + len(ever_rows & rows),
        "entries": entries, "leaves": leaves,
        "final_counts": t.counts().__dict__,
        "radiation_hits_per_frame": {"calm": float(np.mean(hits[:burst_at])),
                                     "burst": float(np.mean(hits[burst_at + 1:burst_at + 501]))},
        "cost_ms_median": 1e3 * float(np.median(costs)), "cost_ms_mean": 1e3 * float(np.mean(costs)),
        "history": history,
    }


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def ageing_run(seed: int, frames: int) -> tuple[dict[str, object], np.ndarray, dict[str, list[tuple[int, int]]]]:
    from cdae.health import HealthConfig, HealthTracker
    from cdae.simcamera import camera_frame

    specs = list(DAMAGE.values()) + [BURST.format(at=ONSET + 1000)]
    cam, model, where, events = _camera(seed, specs)
    truth, _, _ = _truth(model)
    t = HealthTracker((SIZE, SIZE), HealthConfig())
    first: dict[str, dict[int, int]] = {k: {} for k in DAMAGE}
    targets = {}
    for name, (ys, xs) in zip(DAMAGE, where):
        if "column" in name:
            targets[name] = [("column", int(xs[0]))]
        else:
            targets[name] = list(zip(ys.tolist(), xs.tolist()))
    false_max = 0
    damage_mask = np.zeros((SIZE, SIZE), bool)
    for (ys, xs) in where:
        damage_mask[ys, xs] = True
    for i in range(frames):
        r = t.update(camera_frame(model, cam, i, where).astype(np.uint16), unique_id=i + 1, timestamp=1000.0 + i / 10)
        if r.window is None:
            continue
        for name, items in targets.items():
            for k, item in enumerate(items):
                if k in first[name]:
                    continue
                if item[0] == "column":
                    inside = bool(t.columns.bad[item[1]])
                else:
                    inside = bool(t.map[item] or t.on_line()[item])
                if inside and i >= ONSET:
                    first[name][k] = i + 1 - ONSET
        false_max = max(false_max, int(np.count_nonzero(t.map & ~t.on_line() & ~truth & ~damage_mask)))
    kinds = {}
    for name, items in targets.items():
        delays = sorted(first[name].values())
        kinds[name] = {"defects": len(items), "detected": len(delays),
                       "delay_frames_median": float(np.median(delays)) if delays else None,
                       "delay_frames_max": int(max(delays)) if delays else None,
                       "delays": delays}
    result = {"camera_seed": seed, "frames": frames, "onset_frame": ONSET, "kinds": kinds,
              "false_entries_pixels_max": false_max, "final_counts": t.counts().__dict__}
    return result, t.map_image(), {k: [it for it in v if it[0] != "column"] for k, v in targets.items()}


def cost(size: int, frames: int) -> dict[str, float]:
    """Median and mean time of ``update`` on simulated uint16 frames of ``size``² (fresh noise in every frame,
    made outside the timing; wall time and the thread's CPU time)."""
    from cdae.health import HealthConfig, HealthTracker
    from cdae.simcamera import CameraConfig, camera_frame, camera_model

    cam = CameraConfig(width=size, height=size, seed=27, bank=4, fresh_noise=True)
    model = camera_model(cam, size, size)
    t = HealthTracker((size, size), HealthConfig())
    times, cpu = [], []
    for i in range(64 + frames):  # two windows to settle, then timed
        f = camera_frame(model, cam, i).astype(np.uint16)
        t0, c0 = time.perf_counter(), time.thread_time()
        t.update(f, i + 1, 1000 + i / 10)
        if i >= 64:
            times.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    # wall time on a shared machine includes waiting for a core; the thread's CPU time is what it costs
    return {"size": size, "frames": frames, "median_ms": 1e3 * float(np.median(times)),
            "mean_ms": 1e3 * float(np.mean(times)), "p90_ms": 1e3 * float(np.percentile(times, 90)),
            "cpu_median_ms": 1e3 * float(np.median(cpu)), "cpu_mean_ms": 1e3 * float(np.mean(cpu))}


def _plot(path: Path, healthy: list[dict[str, object]], ageing: dict[str, object], image: np.ndarray,
          targets: dict[str, list[tuple[int, int]]], costs: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax = axes[0]
    for run, style in zip(healthy, ("-", "--")):
        h = np.asarray(run["history"], float)
        label = f"seed {run['camera_seed']}"
        ax.plot(h[:, 0], h[:, 1] + h[:, 2] + h[:, 3], style, color="C0", label=f"{label}: bad pixels")
        ax.plot(h[:, 0], h[:, 4], style, color="C1", label=f"{label}: bad lines")
        ax.plot(h[:, 0], h[:, 5], style, color="C3", label=f"{label}: false entries in the map")
        b0, b1 = run["burst_frames"]  # type: ignore[misc]
        ax.axvspan(b0, b1, color="0.9")
    ax.set_xlabel("frame")
    ax.set_ylabel("count")
    ax.set_title("Healthy cameras, 10,000 frames (grey: radiation burst)")
    ax.legend(fontsize=7)
    ax = axes[1]
    codes = image & 0x7F
    shown = np.zeros((*codes.shape, 3))
    shown[codes == 1] = (1, 0.2, 0.2)
    shown[codes == 2] = (0.2, 0.4, 1)
    shown[codes == 3] = (1, 0.8, 0)
    shown[codes == 4] = (0.6, 0.2, 0.8)
    shown[codes == 5] = (0.5, 0.5, 0.5)
    ax.imshow(shown, interpolation="nearest")
    for k, (name, pts) in enumerate(targets.items()):
        if pts:
            ys, xs = zip(*pts)
            ax.scatter(xs, ys, s=40, facecolors="none", edgecolors=f"C{k % 10}", linewidths=0.8, label=name)
    ax.set_title("Ageing camera: the live map at the end (circles: the damage)\nred hot, blue dead, "
                 "yellow stuck, purple lines")
    ax.legend(fontsize=6, loc="lower right")
    ax = axes[2]
    names = list(ageing["kinds"])  # type: ignore[arg-type]
    med = [ageing["kinds"][n]["delay_frames_median"] or 0 for n in names]  # type: ignore[index]
    mx = [ageing["kinds"][n]["delay_frames_max"] or 0 for n in names]  # type: ignore[index]
    found = [f"{ageing['kinds'][n]['detected']}/{ageing['kinds'][n]['defects']}" for n in names]  # type: ignore[index]
    ypos = np.arange(len(names))
    ax.barh(ypos, mx, color="0.8", label="max")
    ax.barh(ypos, med, color="C0", label="median")
    for yy, text in zip(ypos, found):
        ax.text(1, yy, text, va="center", fontsize=7)
    ax.set_yticks(ypos, names, fontsize=7)
    ax.set_xlabel("frames from the damage to the map (32-frame windows, 2 to enter)")
    c = ", ".join(f"{r['size']}²: {r.get('cpu_median_ms', r['median_ms']):.2f} ms (mean "
                  f"{r.get('cpu_mean_ms', r['mean_ms']):.2f})" for r in costs) + " CPU"
    ax.set_title(f"Detection delay (found/total)\ncost per frame {c}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=10_000, help="frames of each healthy camera")
    p.add_argument("--ageing-frames", type=int, default=3000)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--cost-only", action="store_true", help="measure the cost again (on a quiet machine) into the "
                   "existing JSON and picture")
    args = p.parse_args(argv)
    device = _bench_module("badpixels")._device_name()
    slug = device.lower().replace(" ", "-")
    out = Path(args.out)
    if args.cost_only:
        path = out / f"health-{slug}.json"
        record = json.loads(path.read_text())
        record["cost"] = [cost(256, 320), cost(1024, 128)]
        record["cost_load_average"] = list(os.getloadavg())
        path.write_text(json.dumps(record, indent=1) + "\n")
        _, image, targets = ageing_run(7, record["ageing"]["frames"])
        _plot(out / f"health-{slug}.png", record["healthy"], record["ageing"], image, targets, record["cost"])
        for c in record["cost"]:
            print(f"cost {c['size']}²: median {c['median_ms']:.2f} ms, mean {c['mean_ms']:.2f} ms, p90 {c['p90_ms']:.2f} ms;"
                  f" CPU median {c['cpu_median_ms']:.2f} ms, mean {c['cpu_mean_ms']:.2f} ms")
        return 0
    t0 = time.time()
    burst = min(3000, args.frames // 2)
    healthy = [healthy_run(27, args.frames, burst), healthy_run(7, args.frames, burst)]
    ageing, image, targets = ageing_run(7, args.ageing_frames)
    costs = [cost(256, 320), cost(1024, 128)]
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "health", "device": device, "date": _dt.date.today().isoformat(),
              "seconds": round(time.time() - t0, 1), "size": SIZE, "config": "HealthConfig() defaults",
              "driven": "HealthTracker directly with cdae.simcamera frames (fresh noise, 16 scenes cycled)",
              "healthy": healthy, "ageing": ageing, "cost": costs,
              "cost_load_average": list(os.getloadavg())}
    (out / f"health-{slug}.json").write_text(json.dumps(record, indent=1) + "\n")
    _plot(out / f"health-{slug}.png", healthy, ageing, image, targets, costs)
    for run in healthy:
        print(f"healthy camera seed {run['camera_seed']}, {run['frames']} frames: false entries "
              f"{run['false_entries_pixels']} pixels ({run['false_entries_pixels_next_to_a_camera_defect']} next to a "
              f"camera defect), {run['false_entries_lines']} lines; camera defects found "
              f"{run['camera_defects_found']}/{run['camera_defect_pixels']} pixels, "
              f"{run['camera_lines_found']}/{run['camera_bad_lines']} lines; point source entered: "
              f"{run['point_source_entered']}; hits/frame calm {run['radiation_hits_per_frame']['calm']:.2f}, "  # type: ignore[index]
              f"burst {run['radiation_hits_per_frame']['burst']:.1f}")  # type: ignore[index]
    for name, k in ageing["kinds"].items():  # type: ignore[union-attr]
        print(f"{name}: {k['detected']}/{k['defects']} detected, delay median {k['delay_frames_median']}, "
              f"max {k['delay_frames_max']} frames")
    for c in costs:
        print(f"cost {c['size']}²: median {c['median_ms']:.2f} ms, mean {c['mean_ms']:.2f} ms, p90 {c['p90_ms']:.2f} ms; "
              f"CPU median {c['cpu_median_ms']:.2f} ms, mean {c['cpu_mean_ms']:.2f} ms")
    print(f"wrote {out / f'health-{slug}.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
