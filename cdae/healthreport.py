"""``cdae health``: a camera-health report, from a recording or from a running filter IOC.

From a recording (``cdae record``), the frames of every run go through :class:`cdae.health.HealthTracker`
(the same rule as the IOC's, the site's ``[cameras.NAME.health]`` with ``--config/--name``); from a
live IOC (``--from-ioc P``) the map comes from ``HealthMap:ArrayData`` and the defect list and
recent counts from ``HealthList_RBV``, and, with ``--archiver URL``, the counts over time from the
Archiver Appliance's retrieval service (``/retrieval/data/getData.json``), the PVs
``cdae archiver-pvs`` lists. The report folder gets:

- ``map.png``: the live map (hot red, dead blue, stuck yellow, bad lines purple, suspects grey;
  defects not in the baseline ringed);
- ``counts.png``: hot, dead, stuck pixels, bad lines, new pixels, radiation rate and read noise over
  time;
- ``pixels.csv``: every defect with the first frame (number, UniqueId, time) its evidence was seen;
- ``badpixels.json``: the map as an NDPluginBadPixel file (``cdae denoise --bad-pixels``);
- ``report.json``: the counts, the baseline and where each part came from.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from cdae.health import HISTORY_COLUMNS, HealthConfig, HealthError, HealthTracker, map_from_image

#: The health PVs whose history the report plots (after the IOC's prefix), and their labels.
ARCHIVED = {"HotPixels_RBV": "hot", "DeadPixels_RBV": "dead", "StuckPixels_RBV": "stuck",
            "BadColumns_RBV": "bad_columns", "BadRows_RBV": "bad_rows", "NewBadPixels_RBV": "new_bad_pixels",
            "NewBadLines_RBV": "new_bad_lines", "RadiationRate_RBV": "radiation_rate_hz",
            "ReadNoise_RBV": "read_noise_dn"}


def from_recording(path: Path | str, config: HealthConfig | None = None) -> HealthTracker:
    """The map a filter IOC would have learnt from a recording's frames (all runs, in order)."""
    from cdae.recording import read_runs

    runs = read_runs(path)
    if not runs:
        raise HealthError(f"{path}: no runs")
    tracker: HealthTracker | None = None
    for run in runs:
        frames, uids, times = run.frames(), run.unique_ids(), run.posix_times()
        for f, uid, t in zip(frames, uids, times):
            if tracker is None:
                tracker = HealthTracker(f.shape, config, camera=Path(path).stem)
            tracker.update(f, int(uid), float(t))
    assert tracker is not None
    return tracker


def report_from_recording(path: Path | str, config: HealthConfig | None = None
                          ) -> tuple[np.ndarray, dict[str, object], dict[str, list[tuple[float, float]]], dict[str, str]]:
    """What :func:`write_report` takes (map image, pixel list, counts over time, summary) from a recording."""
    tracker = from_recording(path, config)
    summary = {"source": str(path), "history_source": f"the recording's {tracker.windows} windows"}
    return tracker.map_image(), tracker.pixel_list(history=0), history_from_rows(tracker.history), summary


def report_from_ioc(prefix: str, archiver: str | None = None, hours: float = 24.0
                    ) -> tuple[np.ndarray, dict[str, object], dict[str, list[tuple[float, float]]], dict[str, str]]:
    """The same from a running filter IOC (prefix ``prefix``, over CA): its counts over time from the Archiver
    Appliance at ``archiver`` (the last ``hours``) where it has them, else the IOC's last windows."""
    from cdae.ioc.health import read_from_ioc

    image, doc = read_from_ioc(prefix)
    history: dict[str, list[tuple[float, float]]] = {}
    where = ""
    if archiver:
        now = _dt.datetime.now(_dt.timezone.utc)
        history = archiver_history(archiver, prefix, now - _dt.timedelta(hours=hours), now)
        where = f"the archiver {archiver}, last {hours:g} h" if history else ""
    if not history:
        rows: list = doc.get("history", [])  # type: ignore[assignment]
        history = history_from_rows(rows)
        where = f"the IOC's last {len(rows)} windows" + (" (the archiver had none)" if archiver else "")
    return image, doc, history, {"source": prefix, "history_source": where}


def archiver_history(url: str, prefix: str, since: _dt.datetime, until: _dt.datetime,
                     timeout_s: float = 10.0) -> dict[str, list[tuple[float, float]]]:
    """Each health count's archived samples (POSIX time, value) from an Archiver Appliance's retrieval
    service (``url`` e.g. ``http://archiver:17665``); a PV it does not have is left out."""
    out: dict[str, list[tuple[float, float]]] = {}
    for pv, name in ARCHIVED.items():
        query = urllib.parse.urlencode({"pv": prefix + pv, "from": _iso(since), "to": _iso(until)})
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/retrieval/data/getData.json?{query}",
                                        timeout=timeout_s) as r:
                doc = json.loads(r.read().decode())
        except (OSError, ValueError):
            continue
        samples = []
        for block in doc if isinstance(doc, list) else []:
            for d in block.get("data", []):
                try:
                    samples.append((float(d["secs"]) + float(d.get("nanos", 0)) * 1e-9, float(d["val"])))
                except (KeyError, TypeError, ValueError):
                    continue
        if samples:
            out[name] = samples
    return out


def _iso(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def history_from_rows(rows: list[list[float]]) -> dict[str, list[tuple[float, float]]]:
    """A tracker's window history (``HISTORY_COLUMNS`` rows) as the same series the archiver gives; time is
    the row's time where known, else its frame number."""
    out: dict[str, list[tuple[float, float]]] = {}
    if not rows:
        return out
    a = np.asarray(rows, float)
    col = {n: i for i, n in enumerate(HISTORY_COLUMNS)}
    x = a[:, col["time"]] if (a[:, col["time"]] > 0).all() else a[:, col["frame"]]
    for name in ARCHIVED.values():
        out[name] = list(zip(x.tolist(), a[:, col[name]].tolist()))
    return out


def write_report(out_dir: Path | str, image: np.ndarray, doc: dict[str, object],
                 history: dict[str, list[tuple[float, float]]], summary: dict[str, object]) -> list[Path]:
    """The report's files (see the module docstring); ``doc`` is :meth:`HealthTracker.pixel_list`'s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    codes = np.asarray(image, np.uint8)
    kinds = codes & 0x7F
    rgb = np.zeros((*codes.shape, 3))
    for code, colour in ((1, (1, 0.2, 0.2)), (2, (0.3, 0.5, 1)), (3, (1, 0.85, 0)), (4, (0.65, 0.3, 0.9)),
                         (5, (0.5, 0.5, 0.5))):
        rgb[kinds == code] = colour
    h, w = codes.shape
    fig, ax = plt.subplots(figsize=(7, 7 * h / max(w, 1) + 0.8))
    ax.imshow(rgb, interpolation="nearest")
    ys, xs = np.nonzero((codes & 0x80) != 0)
    if ys.size and ys.size < 5000:
        ax.scatter(xs, ys, s=30, facecolors="none", edgecolors="white", linewidths=0.6)
    n = {k: int(np.count_nonzero(kinds == v)) for k, v in (("hot", 1), ("dead", 2), ("stuck", 3), ("line", 4))}
    ax.set_title(f"{summary.get('source', '')}: hot {n['hot']}, dead {n['dead']}, stuck {n['stuck']}, "
                 f"line pixels {n['line']}; ringed: not in the baseline", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "map.png", dpi=110)
    plt.close(fig)
    written.append(out / "map.png")
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    timed = any(t > 1e8 for series in history.values() for t, _ in series[:1])
    for name in ("hot", "dead", "stuck", "bad_columns", "bad_rows", "new_bad_pixels", "new_bad_lines"):
        if name in history:
            t, v = zip(*history[name])
            axes[0].step(_times(t, timed), v, where="post", label=name)
    for name in ("radiation_rate_hz", "read_noise_dn"):
        if name in history:
            t, v = zip(*history[name])
            axes[1].plot(_times(t, timed), v, label=name)
    axes[0].set_ylabel("count")
    axes[1].set_ylabel("px/s, DN")
    axes[1].set_xlabel("time" if timed else "frame")
    for a in axes:
        if a.lines:
            a.legend(fontsize=7)
    axes[0].set_title(f"counts over time ({summary.get('history_source', 'none')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "counts.png", dpi=110)
    plt.close(fig)
    written.append(out / "counts.png")
    with open(out / "pixels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["x", "y", "kind", "new", "first_frame", "first_unique_id", "first_time"])
        for p in doc.get("pixels", []):  # type: ignore[union-attr]
            wr.writerow([p["x"], p["y"], p["kind"], p["new"], p["first_frame"], p["first_unique_id"],
                         _when(p["first_time"])])
        for ln in doc.get("lines", []):  # type: ignore[union-attr]
            x, y = (ln["index"], "") if ln["axis"] == "column" else ("", ln["index"])
            wr.writerow([x, y, f"{ln['axis']} ({ln['kind']})", ln["new"], ln["first_frame"], ln["first_unique_id"],
                         _when(ln["first_time"])])
    written.append(out / "pixels.csv")
    bad = map_from_image(codes, source=str(summary.get("source", "cdae health")))
    bad.save(out / "badpixels.json")
    written.append(out / "badpixels.json")
    record = {**summary, "pixels": len(doc.get("pixels", [])), "lines": len(doc.get("lines", [])),  # type: ignore[arg-type]
              "baseline": doc.get("baseline"), "frames": doc.get("frames"), "listed": len(bad), "kinds": n}
    (out / "report.json").write_text(json.dumps(record, indent=1) + "\n")
    written.append(out / "report.json")
    return written


def _times(t: tuple[float, ...], timed: bool) -> list:  # noqa: ANN401
    return [_dt.datetime.fromtimestamp(v) for v in t] if timed else list(t)


def _when(t: object) -> str:
    if not isinstance(t, (int, float)) or t <= 0:
        return ""
    return _dt.datetime.fromtimestamp(float(t), _dt.timezone.utc).isoformat(timespec="seconds")
