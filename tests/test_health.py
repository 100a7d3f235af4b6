"""The live bad-pixel map's rule (cdae.health), without processes: the simulated camera's frames straight in.

The cameras are small (64x48) with fresh noise in every frame and moving scenes (the simulator's,
with its glints and radiation); the damage is the simulated camera's run-time damage
(``cdae.simcamera.DamageEvent``), so these frames are the ones the process test's IOC sees.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cdae.engine.badpixels import BadPixelMap
from cdae.health import (
    DEAD,
    HOT,
    LINE,
    NEW,
    STUCK,
    HealthConfig,
    HealthCounts,
    HealthError,
    HealthLimits,
    HealthTracker,
    Limit,
    binomial_threshold,
    judge,
    map_from_image,
    screen_sigma,
    state_path,
)
from cdae.simcamera import CameraConfig, DamageEvent, camera_frame, camera_model, damage_pixels

W, H = 64, 48
WINDOW, ENTER = 8, 2
CONFIG = HealthConfig(window_frames=WINDOW, enter_windows=ENTER, leave_windows=4, baseline_windows=2)


def _camera(*damage: str, seed: int = 7, **fields: object) -> tuple[CameraConfig, object, list]:
    events = [DamageEvent.parse(d) for d in damage]
    cam = CameraConfig(width=W, height=H, seed=seed, bank=4, fresh_noise=True, damage=events, **fields)  # type: ignore[arg-type]
    model = camera_model(cam, H, W, dark=not cam.shutter_open)
    return cam, model, damage_pixels(events, H, W)


def _run(tracker: HealthTracker, cam: CameraConfig, model: object, where: list, start: int, stop: int,
         on_window=None) -> list:  # noqa: ANN001
    results = []
    for i in range(start, stop):
        r = tracker.update(camera_frame(model, cam, i, where).astype(np.uint16), unique_id=i + 1,  # type: ignore[arg-type]
                           timestamp=1000.0 + i / 10)
        results.append(r)
        if r.window is not None and on_window is not None:
            on_window(i, r)
    return results


def _entered_at(tracker: HealthTracker, cam: CameraConfig, model: object, where: list, start: int, stop: int,
                pixels: list[tuple[int, int]]) -> int | None:
    """The frame index at whose window all of ``pixels`` (y, x) are in the map."""
    found: list[int] = []

    def check(i: int, r: object) -> None:
        if not found and all(tracker.map[y, x] for y, x in pixels):
            found.append(i)

    _run(tracker, cam, model, where, start, stop, check)
    return found[0] if found else None


# --- the statistics -------------------------------------------------------------------------

def test_binomial_threshold_is_the_least_count_the_frame_passes_by_chance_rarely() -> None:
    n, p, pixels, alpha = 32, 1e-3, 1 << 20, 1e-3
    c = binomial_threshold(n, p, pixels, alpha)
    tail = lambda k: sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))  # noqa: E731
    assert pixels * tail(c) <= alpha < pixels * tail(c - 1)
    assert binomial_threshold(n, 0.05, pixels, alpha) > c  # a burst raises the bar
    assert binomial_threshold(8, 1e-9, 100, 0.5) == 2  # never a single frame
    assert binomial_threshold(8, 0.6, pixels, alpha) == 9  # impossible: the count test pauses


def test_screen_lets_through_everything_the_guard_could_flag() -> None:
    from cdae.engine.guard import GuardConfig, NoiseModel, _tests, centre_to_neighbour_ratio

    r = centre_to_neighbour_ratio(0.45)
    assert screen_sigma(5.0, r) == pytest.approx(0.5 * 2 * (1 - 1 / r) * 5 * math.sqrt(1 + r * r / 2))
    # random 5x5 neighbourhoods: wherever the guard's test passes, the screen's bound holds
    rng = np.random.default_rng(1)
    noise = NoiseModel(read_dn=3.0, dn_per_e=0.1, offset_dn=100.0, measured=False)
    patch = rng.normal(400, 20, (20000, 5, 5)).astype(np.float32)
    patch[:, 2, 2] += rng.exponential(300, 20000).astype(np.float32) * rng.choice([-1, 1], 20000)
    patch[::3, 1:4, 2] += 200  # some vertical lines through the centre
    c = patch[:, 2, 2]
    hit, _ = _tests(c, lambda oy, ox: patch[:, 2 + oy, 2 + ox], noise, GuardConfig(), line_axes=None)
    a = 2 * c - patch[:, 2, 1] - patch[:, 2, 3]
    b = 2 * c - patch[:, 1, 2] - patch[:, 3, 2]
    level = 0.25 * (patch[:, 2, 1] + patch[:, 2, 3] + patch[:, 1, 2] + patch[:, 3, 2])
    passed = a * a + b * b > screen_sigma(5.0, r) ** 2 * noise.sigma(level) ** 2
    assert hit.sum() > 100 and (passed | ~hit).all()


def test_judge_takes_the_worst_limit_and_says_why() -> None:
    limits = HealthLimits(new_bad_pixels=Limit(minor=3, major=10), new_bad_lines=Limit(major=1))
    assert judge(HealthCounts(new_bad_pixels=2), limits) == (0, "OK")
    level, why = judge(HealthCounts(new_bad_pixels=3), limits)
    assert level == 1 and why == "DEGRADED: new_bad_pixels 3 >= minor 3"
    level, why = judge(HealthCounts(new_bad_pixels=4, new_bad_lines=1), limits)
    assert level == 2 and why.startswith("BAD: new_bad_lines 1 >= major 1;")
    with pytest.raises(ValueError, match="below minor"):
        Limit(minor=5, major=2)


# --- the rule on a camera ------------------------------------------------------------------

def test_a_healthy_camera_with_glints_and_radiation_enters_nothing() -> None:
    cam, model, where = _camera()
    t = HealthTracker((H, W), CONFIG)
    results = _run(t, cam, model, where, 0, 50 * WINDOW)
    assert not t.map.any() and not t.columns.bad.any() and not t.rows.bad.any()
    assert t.counts() == HealthCounts()
    assert sum(r.hits for r in results) > 0  # the camera's own radiation is seen, and kept out


def test_read_noise_and_offset_from_the_frames_own_darkest_regions() -> None:
    cam, model, where = _camera(shutter_open=False)
    t = HealthTracker((H, W), CONFIG)
    r = _run(t, cam, model, where, 0, 40)[-1]
    p = model.params  # type: ignore[attr-defined]
    # dark frames: read noise, the offset pattern (DSNU) and the rounding, around the bias
    expected = math.sqrt((p.read_noise_e / p.gain_e_per_dn) ** 2 + p.dsnu_dn**2 + 1 / 12)
    assert r.read_noise_dn == pytest.approx(expected, rel=0.15)
    assert r.offset_dn == pytest.approx(p.bias_dn, abs=4 * expected)


def test_new_hot_pixels_enter_within_the_stated_delay_with_their_first_frame() -> None:
    onset = 10 * WINDOW + 3  # mid-window: the worst case
    cam, model, where = _camera(f"hot_pixels@{onset},count=5,level=0.2")
    t = HealthTracker((H, W), CONFIG)
    pixels = list(zip(*(v.tolist() for v in where[0])))
    at = _entered_at(t, cam, model, where, 0, onset + 10 * WINDOW, pixels)
    assert at is not None and at - onset < (ENTER + 1) * WINDOW
    assert t.counts().hot == 5 and t.counts().new_bad_pixels == 5
    for y, x in pixels:
        assert t.kind[y, x] == HOT
        assert onset + 1 <= t.seen[y * W + x].unique_id <= onset + WINDOW  # the first frame it was flagged in
    img = t.map_image()
    assert all(img[y, x] == HOT | NEW for y, x in pixels)


def _flat_frames(n: int, seed: int, dsnu: float = 0.0, faint: dict[tuple[int, int], float] | None = None,
                 start: int = 0):  # noqa: ANN202
    """Dark-ish frames of 100 DN with 3 DN of fresh Gaussian noise, an optional fixed pattern (DSNU, DN RMS)
    and faint hot pixels {(y, x): offset DN} from frame ``start`` on."""
    rng = np.random.default_rng(seed)
    pattern = rng.normal(0, dsnu, (H, W)) if dsnu else 0.0
    for i in range(n):
        f = 100.0 + pattern + rng.normal(0, 3.0, (H, W))
        if i >= start:
            for (y, x), off in (faint or {}).items():
                f[y, x] += off
        yield np.rint(f).astype(np.uint16)


def test_faint_hot_pixels_are_found_by_the_window_mean_not_by_single_frames() -> None:
    # 30 DN = 10 sigma of one frame's noise: never an impulse in one frame (that takes ~35 sigma), but plain in
    # the mean of 32 frames, whose noise is 6 times lower
    faint = {(10, 10): 30.0, (20, 40): 30.0, (37, 22): 30.0}
    t = HealthTracker((H, W), CONFIG.model_copy(update={"window_frames": 32}))
    for i, f in enumerate(_flat_frames(6 * 32, 1, faint=faint, start=64)):
        t.update(f, i + 1)
        assert not any(t._hot_n[y, x] for y, x in faint)
    assert all(t.map[y, x] and t.kind[y, x] == HOT for y, x in faint) and t.counts().bad_pixels == 3


def test_medium_new_hot_pixels_in_a_moving_scene_are_found_by_their_change() -> None:
    # 77 DN (0.02 of the span) in lit, moving scenes: under the camera's own fixed pattern and texture at
    # its level (the excess test's population) and never an impulse in one frame, but a change of its own
    size, onset = 128, 6 * 32 + 3
    events = [DamageEvent.parse(f"hot_pixels@{onset},count=6,level=0.02,seed=3")]
    cam = CameraConfig(width=size, height=size, seed=7, bank=16, fresh_noise=True, damage=events)
    model = camera_model(cam, size, size)
    where = damage_pixels(events, size, size)
    t = HealthTracker((size, size), HealthConfig())
    for i in range(onset + 8 * 32):
        t.update(camera_frame(model, cam, i, where).astype(np.uint16), i + 1, 1000.0 + i / 10)
    ys, xs = where[0]
    assert t.map[ys, xs].sum() >= 3 and not t._hot_n[ys, xs].any()
    assert t.map.sum() == t.map[ys, xs].sum()  # nothing else


def test_the_fixed_pattern_is_the_population_faint_defects_must_stand_out_of() -> None:
    # a strong offset pattern (DSNU 6 DN, twice the noise): its 3-4 sigma pixels are the camera, not defects
    t = HealthTracker((H, W), CONFIG.model_copy(update={"window_frames": 32}))
    for i, f in enumerate(_flat_frames(10 * 32, 2, dsnu=6.0)):
        t.update(f, i + 1)
    assert not t.map.any()


def test_a_radiation_burst_is_counted_and_enters_nothing() -> None:
    cam, model, where = _camera("radiation@40,frames=80,level=20000")
    t = HealthTracker((H, W), CONFIG)
    thresholds: list[int] = []
    results = _run(t, cam, model, where, 0, 200, lambda i, r: thresholds.append(r.window.count_threshold))
    burst = [r.hits for r in results[42:120]]
    calm = [r.hits for r in results[130:200]]
    assert np.mean(burst) > 5 * max(np.mean(calm), 0.1)
    assert max(thresholds) > min(thresholds)  # the count test's bar rose with the measured rate
    assert not t.map.any()


def test_a_bright_static_point_source_is_scene_a_lone_pixel_is_a_defect() -> None:
    point = (20.0, 30.0, 0.6)
    cam, model, where = _camera(point_sources=[point])
    t = HealthTracker((H, W), CONFIG)
    _run(t, cam, model, where, 0, 30 * WINDOW)
    x, y = int(point[0]), int(point[1])
    assert not t.map[y - 2:y + 3, x - 2:x + 3].any()
    # the same light in one pixel (a PSF far narrower than any optics): a hot pixel
    cam, model, where = _camera(point_sources=[point], point_sigma_px=0.21)
    t = HealthTracker((H, W), CONFIG)
    _run(t, cam, model, where, 0, 30 * WINDOW)
    assert t.map[y, x] and t.kind[y, x] == HOT


def test_stuck_and_dead_pixels_enter_with_their_kind() -> None:
    cam, model, where = _camera("stuck_pixels@16,count=2,level=0.3", "dead_pixels@16,count=2,level=0", seed=7,
                                static_scene=True)
    t = HealthTracker((H, W), CONFIG)
    _run(t, cam, model, where, 0, 16 * WINDOW)
    for (ys, xs), kind in ((where[0], STUCK), (where[1], DEAD)):
        for y, x in zip(ys.tolist(), xs.tolist()):
            assert t.map[y, x] and t.kind[y, x] == kind, (y, x, t.kind[y, x])
    c = t.counts()
    assert (c.stuck, c.dead) == (2, 2)


def test_a_healed_pixel_leaves_after_the_stated_windows_and_an_unseen_one_stays() -> None:
    cam, model, where = _camera("hot_pixels@0,count=2,level=0.2,frames=80")
    t = HealthTracker((H, W), CONFIG)
    (ys, xs) = where[0]
    _run(t, cam, model, where, 0, 80)
    assert t.map[ys, xs].all()
    at = []
    _run(t, cam, model, where, 80, 80 + 12 * WINDOW, lambda i, r: at.append(i) if not at and not t.map[ys, xs].any()
         else None)
    assert at and at[0] - 80 < (CONFIG.leave_windows + 1) * WINDOW
    assert not t.map.any() and t.counts().hot == 0
    # a dead pixel in the dark: nothing to see, so it stays in the map
    lit, lit_model, lit_where = _camera("dead_pixels@0,count=1,level=0", static_scene=True)
    t = HealthTracker((H, W), CONFIG)
    _run(t, lit, lit_model, lit_where, 0, 10 * WINDOW)
    (y,), (x,) = (v.tolist() for v in lit_where[0])
    assert t.map[y, x]
    dark, dark_model, _ = _camera("dead_pixels@0,count=1,level=0", static_scene=True, shutter_open=False)
    _run(t, dark, dark_model, lit_where, 0, 20 * WINDOW)
    assert t.map[y, x]


def test_a_hot_column_is_a_line_and_exports_filled_from_its_sides() -> None:
    cam, model, where = _camera("hot_column@24,x=17,level=0.03")
    t = HealthTracker((H, W), CONFIG)
    _run(t, cam, model, where, 0, 10 * WINDOW)
    c = t.counts()
    assert c.bad_columns == 1 and c.bad_rows == 0 and c.hot == 0 and c.new_bad_lines == 1
    assert (t.map_image()[:, 17] == LINE | NEW).all()
    assert t.pixel_list()["lines"][0]["index"] == 17
    bad = t.bad_pixel_map()
    assert len(bad) == H and set(bad.x.tolist()) == {17}
    assert (bad.a == 1).all() and (bad.b == 0).all()  # Median [1, 0]: left and right neighbours
    frame = np.full((H, W), 100.0, np.float32)
    frame[:, 17] = 900
    assert (bad.apply(frame)[:, 17] == 100).all()


def test_the_baseline_is_automatic_until_an_operator_accepts_one() -> None:
    cam, model, where = _camera("hot_pixels@60,count=4,level=0.2")
    t = HealthTracker((H, W), CONFIG)
    _run(t, cam, model, where, 0, CONFIG.baseline_windows * WINDOW)
    assert t.baseline is not None and not t.baseline_accepted and "automatic" in t.baseline_info
    _run(t, cam, model, where, CONFIG.baseline_windows * WINDOW, 120)
    assert t.counts().new_bad_pixels == 4
    assert judge(t.counts(), HealthLimits(new_bad_pixels=Limit(minor=3)))[0] == 1
    info = t.accept_baseline("tester")
    assert t.baseline_accepted and "tester" in info and t.counts().new_bad_pixels == 0
    assert not (t.map_image() & NEW).any()


def test_the_state_survives_save_and_load(tmp_path) -> None:  # noqa: ANN001
    cam, model, where = _camera("hot_pixels@10,count=3,level=0.2", "hot_column@10,x=40,level=0.05")
    t = HealthTracker((H, W), CONFIG, camera="13SIM1:CDAE1:")
    _run(t, cam, model, where, 0, 8 * WINDOW)
    t.accept_baseline()
    path = t.save(state_path(tmp_path, t.camera, t.shape))
    assert path.name == "health-13SIM1_CDAE1-64x48.npz"
    u = HealthTracker.load(path, CONFIG)
    assert u.camera == t.camera and u.frames == t.frames and u.windows == t.windows
    assert (u.map == t.map).all() and (u.kind == t.kind).all() and (u.streak == t.streak).all()
    assert (u.baseline == t.baseline).all() and u.baseline_info == t.baseline_info and u.baseline_accepted
    assert u.seen == t.seen and u.columns.seen == t.columns.seen and (u.columns.bad == t.columns.bad).all()
    assert u.counts() == t.counts() and u.history == t.history
    assert json.dumps(u.pixel_list()) == json.dumps(t.pixel_list())
    _run(u, cam, model, where, 8 * WINDOW, 10 * WINDOW)  # and goes on where it stopped
    assert u.frames == t.frames + 2 * WINDOW and u.counts().bad_columns == 1
    (tmp_path / "junk.npz").write_bytes(b"not a state file")
    with pytest.raises(HealthError, match="not a health state file"):
        HealthTracker.load(tmp_path / "junk.npz")


def test_frames_it_cannot_take_are_refused() -> None:
    t = HealthTracker((H, W), CONFIG)
    with pytest.raises(HealthError, match="shape"):
        t.update(np.zeros((H, W + 1), np.uint16))
    bad = np.zeros((H, W), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(HealthError, match="NaN"):
        t.update(bad)
    with pytest.raises(HealthError, match="at least 5x5"):
        HealthTracker((4, 64))


def test_a_data_type_change_at_the_same_size_goes_on_analysing() -> None:
    """A camera switched from an integer type to Float32 (or back) mid-window: the window's bounds widen to a type
    that holds both, and windows keep closing (UInt16 bounds could not take Float32 frames)."""
    cam, model, where = _camera()
    t = HealthTracker((H, W), CONFIG)
    windows = 0
    for i, dtype in enumerate([np.uint16] * (WINDOW // 2) + [np.float32] * (2 * WINDOW) + [np.uint8] * WINDOW):
        frame = camera_frame(model, cam, i, where)  # type: ignore[arg-type]
        r = t.update((frame if dtype is not np.uint8 else frame / 16).astype(dtype), unique_id=i + 1,
                     timestamp=1000.0 + i / 10)
        windows += r.window is not None
    assert windows == 3 and t.frames == WINDOW // 2 + 3 * WINDOW
    assert t.counts().hot + t.counts().dead + t.counts().stuck < 10  # nothing made up by the switch


def test_maps_from_images_and_merged_maps() -> None:
    img = np.zeros((H, W), np.uint8)
    img[5, 6] = HOT | NEW
    img[7, 8] = DEAD
    img[:, 30] = LINE
    bad = map_from_image(img)
    assert len(bad) == 2 + H
    on_line = bad.x == 30
    assert (bad.a[on_line] == 1).all() and (bad.b[on_line] == 0).all() and (bad.a[~on_line] == 1).all()
    assert (bad.b[~on_line] == 1).all()
    site = BadPixelMap.from_json('{"Bad pixels": [{"Pixel": [6, 5], "Set": 0}, {"Pixel": [1, 1], "Set": 7}]}')
    both = site.merged(bad)
    assert len(both) == len(bad) + 1  # (6, 5) once, with the site's fill
    assert both.mode[0] == site.mode[0] and both.a[0] == 0.0
    assert site.merged(BadPixelMap.from_mask(np.zeros((2, 2), bool))) is site
