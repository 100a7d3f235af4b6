"""The operator's Phoebus display and the Archiver Appliance's PV list: well formed, and every PV
they name is served by a real filter IOC and simulated camera."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

from cdae.children import free_port
from cdae.deploy.archiver import ArchiverSpec, archiver_plan
from cdae.deploy.display import UNSIGNED_TYPES, DisplaySpec, build_display, write_display

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ioc"))
from ioc_helpers import IOC_PORT, Stack, cdae  # noqa: E402

P, S = "13SIM1:CDAE1:", "13SIM1:image1:"
MACRO = re.compile(r"\$\((\w+)\)")


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A simulated camera and a filter IOC on it. No engine: every PV is served without one (the
    engine's absence is itself what the display shows), and the names are what is checked here."""
    stack = Stack(tmp_path_factory.mktemp("no-store"))
    try:
        stack.camera(size="64x48", rate=5)
        nowhere = f"tcp://127.0.0.1:{free_port()}"
        stack.start("ioc", cdae("ioc", "--source", stack.camera_prefix, "--prefix", stack.ioc_prefix,
                                "--engine", nowhere, "--engine-timeout-s", "3"), "ioc", IOC_PORT)
        yield stack
    finally:
        stack.stop_all()
        if request.session.testsfailed:
            print(stack.output())


def _unreachable(names: list[str], timeout_s: float = 10.0) -> list[str]:
    """The names among ``names`` that do not connect and answer a read over CA."""
    from caproto.threading.client import Context

    ctx = Context(timeout=timeout_s)
    missing = []
    try:
        for pv in ctx.get_pvs(*names, timeout=timeout_s):
            try:
                pv.wait_for_connection(timeout=timeout_s)
                pv.read(data_type="native", timeout=timeout_s)
            except TimeoutError:
                missing.append(pv.name)
    finally:
        ctx.disconnect()
    return missing


def _bob(root: ElementTree.Element) -> tuple[list[ElementTree.Element], dict[str, str]]:
    found = root.find("macros")
    macros = {m.tag: m.text or "" for m in (found if found is not None else [])}
    return root.findall(".//widget"), macros


def _referenced(root: ElementTree.Element) -> list[str]:
    """Every PV a Phoebus display refers to (widgets, rules, scripts, actions), macros expanded."""
    _, macros = _bob(root)
    names = set()
    for el in root.iter():
        if el.tag == "pv_name" or (el.tag.endswith("_pv") and not el.tag.endswith("_from_pv")):  # x_pv, ...
            text = (el.text or "").strip()
            if text:
                assert text.startswith("ca://"), f"{text}: the outputs are CA only; say so, whatever Phoebus defaults to"
                names.add(MACRO.sub(lambda m: macros[m[1]], text[len("ca://"):]))
    assert not [n for n in names if "$(" in n]
    return sorted(names)


def _rect(w: ElementTree.Element) -> tuple[int, int, int, int]:
    return tuple(int(w.findtext(k) or "x") for k in ("x", "y", "width", "height"))  # type: ignore[return-value]


# --- the display, offline -----------------------------------------------------------------------

def test_display_is_a_phoebus_display_with_the_expected_widgets(tmp_path: Path) -> None:
    path = write_display(DisplaySpec(prefix=P, source=S, title="cam1"), tmp_path / "cam1.bob")
    root = ElementTree.parse(path).getroot()
    assert root.tag == "display" and re.fullmatch(r"\d+\.\d+\.\d+", root.get("version", ""))
    assert root.findtext("name") == "cam1"
    widgets, macros = _bob(root)
    assert macros == {"P": P, "S": S}
    types = [w.get("type") for w in widgets]
    # three frames and the health map; model, callbacks and HealthMapUse; engine, source and camera health
    assert types.count("image") == 4 and types.count("combo") == 1 and types.count("choice") == 2
    assert types.count("led") == 3 and "textentry" in types and types.count("action_button") == 3
    assert types.count("textupdate") > 20
    width, height = int(root.findtext("width") or 0), int(root.findtext("height") or 0)
    rects = []
    for w in widgets:
        assert re.fullmatch(r"\d+\.\d+\.\d+", w.get("version", "")) and w.findtext("name")
        x, y, ww, hh = _rect(w)
        assert ww > 0 and hh > 0 and x + ww <= width and y + hh <= height, w.findtext("name")
        rects.append((w.findtext("name"), x, y, ww, hh))
    overlaps = [(a[0], b[0]) for i, a in enumerate(rects) for b in rects[i + 1:]
                if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]]
    assert not overlaps


def test_images_take_shape_and_signedness_from_their_own_pvs() -> None:
    widgets, _ = _bob(build_display(DisplaySpec(prefix=P, source=S, residual_limit=50)))
    images = {w.findtext("pv_name"): w for w in widgets if w.get("type") == "image"}
    assert set(images) == {"ca://$(S)ArrayData", "ca://$(P)ArrayData", "ca://$(P)Residual:ArrayData",
                           "ca://$(P)HealthMap:ArrayData"}
    health = images.pop("ca://$(P)HealthMap:ArrayData")  # the live bad-pixel map's codes: UInt8, fixed scale
    assert health.findtext("unsigned") == "true" and health.findtext("autoscale") == "false"
    assert {r.get("prop_id") for r in health.iter("rule")} == {"data_width", "data_height"}
    for pv, img in images.items():
        meta = pv[: -len("ArrayData")]
        rules = {r.get("prop_id"): r for r in img.iter("rule")}
        assert rules["data_width"].findtext("pv_name") == meta + "ArraySize0_RBV"
        assert rules["data_height"].findtext("pv_name") == meta + "ArraySize1_RBV"
        assert rules["data_width"].get("out_exp") == "true"
        assert img.findtext("interpolation") == "0"  # one-pixel defects stay one pixel
        if "Residual" in pv:  # float32, signed, fixed ±limit so that white is zero
            assert "unsigned" not in rules and img.findtext("unsigned") == "false"
            assert float(img.findtext("minimum") or 0) == -50 and float(img.findtext("maximum") or 0) == 50
            assert img.findtext("autoscale") == "false"
            assert [s.get("value") for s in img.iter("section")] == ["0", "128", "255"]
        else:  # UInt8/UInt16 arrive signed over CA: the rule reinterprets them from DataType_RBV
            rule = rules["unsigned"]
            assert rule.findtext("pv_name") == meta + "DataType_RBV"
            unsigned = [int(i) for i in re.findall(r"pv0 == (\d+)", rule.find("exp").get("bool_exp", ""))]
            assert unsigned == list(UNSIGNED_TYPES) == [1, 3, 5, 7]


def test_model_selector_writes_model_and_lists_models() -> None:
    widgets, _ = _bob(build_display(DisplaySpec(prefix=P, source=S)))
    (combo,) = [w for w in widgets if w.get("type") == "combo"]
    assert combo.findtext("pv_name") == "ca://$(P)Model" and combo.findtext("editable") == "true"
    assert combo.findtext("items_from_pv") == "false"
    script = combo.find("scripts/script")
    assert script is not None and script.findtext("pv_name") == "ca://$(P)Models_RBV.VAL$"
    assert "setItems" in (script.findtext("text") or "")
    compile(script.findtext("text") or "", "EmbeddedPy", "exec")  # Jython 2.7 accepts what this parses
    pvs = {w.findtext("pv_name") for w in widgets}
    assert {"ca://$(P)Model_RBV", "ca://$(P)EngineConnected_RBV", "ca://$(P)LastError_RBV.VAL$",
            "ca://$(P)DroppedArrays_RBV", "ca://$(P)EnableCallbacks", "ca://$(P)Latency_RBV"} <= pvs


def test_display_of_a_configured_camera() -> None:
    from cdae.ioc.filter import IocConfig

    spec = DisplaySpec.from_ioc_config(IocConfig(source="BL1:wave", prefix="BL1:CDAE1:", width=64, height=48),
                                       title="wave")
    assert (spec.source_is_waveform, spec.window_title) == (True, "wave")
    spec = DisplaySpec.from_ioc_config(IocConfig(source=S, prefix=P, array_suffix="ArrayDataB"))
    root = build_display(spec)
    assert root.findtext("name") == f"cdae: {S} → {P}"
    assert "ca://$(S)ArrayDataB" in {w.findtext("pv_name") for w in root.iter("widget")}


def test_display_spec_refuses_bad_input(tmp_path: Path) -> None:
    r = subprocess.run(cdae("display", "--prefix", P, "--source", S, "-o", str(tmp_path / "x.bob"),
                            "--image-size", "10x10"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "image_width" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.bob").exists()


# --- the archiver list, offline -----------------------------------------------------------------

def test_archiver_requests_are_in_the_appliance_format() -> None:
    plan = archiver_plan(ArchiverSpec(prefix=P, source=S, frame_rate_hz=5, policy="cameras"))
    names = [r["pv"] for r in plan.requests]
    assert len(names) == len(set(names)) and not plan.warnings
    for r in plan.requests:
        assert set(r) == {"pv", "samplingmethod", "samplingperiod", "policy"} and r["policy"] == "cameras"
        assert r["samplingmethod"] == "MONITOR" and isinstance(r["samplingperiod"], str)
    by_name = {r["pv"]: float(r["samplingperiod"]) for r in plan.requests}
    assert by_name[P + "UniqueId_RBV"] == by_name[S + "UniqueId_RBV"] == by_name[P + "Latency_RBV"] == 0.2
    assert by_name[P + "Model_RBV"] == by_name[P + "EngineConnected_RBV"] == by_name[P + "LastError_RBV"] == 1.0
    assert not [n for n in names if n.endswith("ArrayData")]


def test_archiver_images_are_scanned_slowly_with_a_warning() -> None:
    plan = archiver_plan(ArchiverSpec(prefix=P, source=S, frame_rate_hz=100, images=True, image_period_s=30,
                                      image_size=(1024, 1024)))
    images = {r["pv"]: r for r in plan.requests if r["pv"].endswith("ArrayData")}
    assert set(images) == {P + "ArrayData", P + "Residual:ArrayData", S + "ArrayData"}
    assert {(r["samplingmethod"], r["samplingperiod"]) for r in images.values()} == {("SCAN", "30")}
    assert {P + "Residual:ArraySize0_RBV", S + "DataType_RBV"} <= {r["pv"] for r in plan.requests}
    # 100 Hz is faster than the appliance's 0.1 s minimum: clamped, and said
    assert {r["samplingperiod"] for r in plan.requests if r["pv"].endswith("UniqueId_RBV")} == {"0.1"}
    text = " ".join(plan.warnings)
    assert "minimumSamplingPeriod" in text and "GB" in text and "EPICS_CA_MAX_ARRAY_BYTES" in text


def test_archiver_refuses_names_the_appliance_refuses() -> None:
    with pytest.raises(ValueError, match="PV name check"):
        archiver_plan(ArchiverSpec(prefix="BL 1:CDAE1:"))


# --- against a running filter IOC and camera ----------------------------------------------------

def test_every_display_pv_is_served(served: Stack, tmp_path: Path) -> None:
    out = tmp_path / "cam.bob"
    r = subprocess.run(cdae("display", "--prefix", served.ioc_prefix, "--source", served.camera_prefix,
                            "-o", str(out)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = _referenced(ElementTree.parse(out).getroot())
    assert len(names) > 30 and served.camera_prefix + "ArrayData" in names
    assert _unreachable(names) == []
    # the check itself can fail: a name the IOC does not serve is reported
    assert _unreachable([served.ioc_prefix + "NoSuchPV_RBV"], timeout_s=2.0) == [served.ioc_prefix + "NoSuchPV_RBV"]


def test_every_display_pv_is_served_for_a_plain_waveform_source(served: Stack) -> None:
    waveform = served.camera_prefix + "ArrayData"
    root = build_display(DisplaySpec(prefix=served.ioc_prefix, source=waveform, source_is_waveform=True))
    images = [w for w in root.iter("widget") if w.get("type") == "image"]
    assert images[0].findtext("pv_name") == "ca://$(S)"  # the raw image is the waveform, its shape the filter's
    assert images[0].find("rules/rule/pv_name").text == "ca://$(P)ArraySize0_RBV"  # type: ignore[union-attr]
    names = _referenced(root)
    assert waveform in names and not [n for n in names if n.startswith(served.camera_prefix) and n != waveform]
    assert _unreachable(names) == []


def test_every_archiver_pv_is_served(served: Stack, tmp_path: Path) -> None:
    out = tmp_path / "pvs.json"
    r = subprocess.run(cdae("archiver-pvs", "--prefix", served.ioc_prefix, "--source", served.camera_prefix,
                            "--images", "--image-size", "64x48", "-o", str(out)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "GB" in r.stderr
    requests = json.loads(out.read_text())
    assert isinstance(requests, list) and all(isinstance(q["samplingperiod"], str) for q in requests)
    names = [q["pv"] for q in requests]
    assert served.ioc_prefix + "Residual:ArrayData" in names and served.camera_prefix + "UniqueId_RBV" in names
    assert _unreachable(names) == []
