"""Bad-pixel maps: areaDetector's file format, the three fill modes, and what a map may cost (finding
them from darks and flats is tested with the camera characterisation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cdae.engine.badpixels import BadPixelError, BadPixelMap

# as a site writes it for NDPluginBadPixel (ADCore), one entry of each mode
ADCORE_FILE = """{"Bad pixels": [
  {"Pixel": [3, 2], "Median": [1, 1]},
  {"Pixel": [7, 5], "Set": 123},
  {"Pixel": [0, 0], "Replace": [1, 0]}
]}"""


def test_adcore_file_fills_each_pixel_by_its_mode(tmp_path: Path) -> None:
    f = tmp_path / "cam1-badpixels.json"
    f.write_text(ADCORE_FILE)
    bp = BadPixelMap.load(f)
    assert len(bp) == 3
    frame = np.arange(80, dtype=np.uint16).reshape(8, 10) * 10
    frame[2, 3] = 60000  # stuck
    out = bp.apply(frame)
    assert out.dtype == np.float32 and out.shape == frame.shape
    box = frame[1:4, 2:5].astype(np.float32).ravel().tolist()
    box.remove(60000.0)
    assert out[2, 3] == pytest.approx(np.median(box))
    assert out[5, 7] == 123.0
    assert out[0, 0] == frame[0, 1]
    untouched = ~bp.mask(frame.shape)
    assert np.array_equal(out[untouched], frame[untouched].astype(np.float32))
    assert bp.mask(frame.shape).sum() == 3


def test_a_bad_column_is_filled_from_its_neighbours_not_from_itself() -> None:
    frame = np.tile(np.array([100, 200, 300, 60000, 500, 600], np.float32), (6, 1))
    mask = np.zeros(frame.shape, bool)
    mask[:, 3] = True
    out = BadPixelMap.from_mask(mask).apply(frame)
    # box 3x3 without the column: 300 and 500 in each row -> 400, never 60000
    assert np.all(out[:, 3] == 400.0)
    # a box that holds nothing good grows until it does
    wide = np.zeros(frame.shape, bool)
    wide[:, 2:5] = True
    out = BadPixelMap.from_mask(wide).apply(frame)
    assert np.all(out[:, 3] == 400.0) and np.all(out[:, 2] == 200.0) and np.all(out[:, 4] == 600.0)  # 5x5: 200s and 600s


def test_save_load_round_trip_and_adcore_key_rules(tmp_path: Path) -> None:
    mask = np.zeros((16, 20), bool)
    mask[[1, 5, 9], [2, 17, 0]] = True
    bp = BadPixelMap.from_mask(mask)
    bp.save(tmp_path / "m.json")
    again = BadPixelMap.load(tmp_path / "m.json")
    assert np.array_equal(again.mask((16, 20)), mask)
    assert json.loads((tmp_path / "m.json").read_text())["Bad pixels"][0] == {"Pixel": [2, 1], "Median": [1, 1]}
    # ADCore: no key -> set to 0; several keys -> the last of Median, Set, Replace
    odd = BadPixelMap.from_json('{"Bad pixels": [{"Pixel": [1, 1]}, {"Pixel": [2, 2], "Median": [1, 1], "Set": 7}]}')
    out = odd.apply(np.full((4, 4), 50.0))
    assert out[1, 1] == 0.0 and out[2, 2] == 7.0


def test_pixels_outside_a_region_of_interest_are_skipped_and_counted() -> None:
    bp = BadPixelMap.from_json('{"Bad pixels": [{"Pixel": [100, 2], "Set": 0}, {"Pixel": [1, 1], "Set": 9}]}')
    assert bp.outside((8, 8)) == 1
    out = bp.apply(np.ones((8, 8), np.uint8))
    assert out[1, 1] == 9.0 and out.sum() == 63 + 9
    # the frame size changes mid-stream (a new region of interest): the fills follow it
    big = bp.apply(np.ones((8, 128), np.uint8))
    assert big[2, 100] == 0.0 and big[1, 1] == 9.0
    # a Replace whose source lies outside the frame leaves the pixel as it is
    edge = BadPixelMap.from_json('{"Bad pixels": [{"Pixel": [0, 0], "Replace": [-1, 0]}, {"Pixel": [2, 0], "Replace": [0, 1]}]}')
    frame = np.arange(16, dtype=np.float32).reshape(4, 4)
    out = edge.apply(frame)
    assert out[0, 0] == 0.0 and out[0, 2] == frame[1, 2]


@pytest.mark.parametrize(("text", "match"), [
    ("not json", "not JSON"),
    ('{"pixels": []}', "Bad pixels"),
    ('{"Bad pixels": [{"Pixel": [1]}]}', r"entry 0: Pixel"),
    ('{"Bad pixels": [{"Pixel": [1, 1]}, {"Pixel": [-1, 2]}]}', r"entry 1: Pixel: expected values >= 0"),
    ('{"Bad pixels": [{"Pixel": [1.5, 2]}]}', "integers"),
    ('{"Bad pixels": [{"Pixel": [1, 2], "Set": "hot"}]}', "finite number"),
    ('{"Bad pixels": [{"Pixel": [1, 2], "Median": [-1, 1]}]}', "Median"),
    ('{"Bad pixels": [3]}', "expected an object"),
    ('{"Bad pixels": [{"Pixel": [1e300, 2]}]}', r"entry 0: Pixel: expected values below 2\*\*31"),
    ('{"Bad pixels": [{"Pixel": [2, 1%s]}]}' % ("0" * 400), r"entry 0: Pixel: expected values below 2\*\*31"),
    ('{"Bad pixels": [{"Pixel": [2147483648, 0]}]}', r"entry 0: Pixel: expected values below 2\*\*31"),
    ('{"Bad pixels": [{"Pixel": [1e400, 2]}]}', r"entry 0: Pixel: expected integers"),
    ('{"Bad pixels": [{"Pixel": [1, 2], "Replace": [-2147483648, 0]}]}', r"entry 0: Replace: expected values below"),
    ('{"Bad pixels": [{"Pixel": [1, 2]}, {"Pixel": [1, 2], "Median": [1e20, 1]}]}', r"entry 1: Median: expected"),
])
def test_malformed_files_say_which_entry_and_why(text: str, match: str) -> None:
    with pytest.raises(BadPixelError, match=match):
        BadPixelMap.from_json(text)


def test_unreadable_file_and_wrong_frames_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BadPixelError, match="cannot read"):
        BadPixelMap.load(tmp_path / "missing.json")
    with pytest.raises(BadPixelError, match="2-D"):
        BadPixelMap.from_json(ADCORE_FILE).apply(np.zeros((2, 8, 8)))


def test_fill_cost_is_bounded_by_validation_and_by_growth_limits() -> None:
    """Issue 21, defect 7: a 128 x 128 dead block took 10.6 s and 1 GB per frame; huge boxes were accepted."""
    import time

    from cdae.engine.badpixels import MAX_HALF_WIDTH, MAX_PIXELS

    with pytest.raises(BadPixelError, match=f"Median half-widths at most {MAX_HALF_WIDTH}"):
        BadPixelMap.from_json(json.dumps({"Bad pixels": [{"Pixel": [i, 5], "Median": [4000, 4000]} for i in range(200)]}))
    with pytest.raises(BadPixelError, match=f"more than {MAX_PIXELS}"):
        BadPixelMap.from_json('{"Bad pixels": [' + ",".join(['{"Pixel": [1, 1]}'] * (MAX_PIXELS + 1)) + "]}")
    with pytest.raises(BadPixelError, match="Median boxes read"):
        BadPixelMap.from_json(json.dumps({"Bad pixels": [{"Pixel": [i % 2048, i // 2048], "Median": [16, 16]}
                                                         for i in range(20_000)]}))
    small = BadPixelMap.from_json(ADCORE_FILE)
    small.check_frame_size(3)
    with pytest.raises(BadPixelError, match="more than the 2 pixels of a frame"):
        small.check_frame_size(2)
    block = np.zeros((512, 512), bool)
    block[192:320, 192:320] = True
    bp = BadPixelMap.from_mask(block, half=1)
    frame = np.random.default_rng(0).integers(0, 4000, (512, 512)).astype(np.uint16)
    bp.fill_output(frame)  # plans once per size
    t0 = time.perf_counter()
    filled, _, defects = bp.fill_output(frame, None, np.zeros((512, 512), np.uint8))
    took = time.perf_counter() - t0
    core = np.zeros_like(block)
    core[192 + MAX_HALF_WIDTH:320 - MAX_HALF_WIDTH, 192 + MAX_HALF_WIDTH:320 - MAX_HALF_WIDTH] = True
    assert bp.unfilled(frame.shape) == core.sum()  # deeper than MAX_HALF_WIDTH: nothing good near enough
    assert np.array_equal(filled[core], frame[core]) and np.all(defects[block] == 255)
    ring = block & ~core
    assert np.all((filled[ring] >= frame[~block].min()) & (filled[ring] <= frame[~block].max()))
    assert took < 2.0, took  # was 10.6 s (12.2 s on this 2-core host); ~0.15 s now


def test_coordinates_up_to_2_31_are_read_and_skipped_outside_the_frame() -> None:
    bp = BadPixelMap.from_json('{"Bad pixels": [{"Pixel": [2147483647, 1], "Replace": [-2147483647, 0]},'
                               ' {"Pixel": [1, 1], "Set": 7}]}')
    out = bp.apply(np.zeros((4, 4), np.uint16))
    assert out[1, 1] == 7 and int(out.sum()) == 7
