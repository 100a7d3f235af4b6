"""The operator's Phoebus display (``.bob``) of one filter IOC: raw, denoised and residual images
beside the model selector, engine state and throughput, and the camera's health (its live bad-pixel
map, counts and alarm, and the operator's commands).

Generated with phoebusgen from the PV contract itself (:mod:`cdae.ioc.pvs`): every name is taken
from the pvproperty that serves it, so a display cannot point at a PV the IOC does not have.
The file carries two macros, ``P`` (the filter's output prefix) and ``S`` (the source camera's
NDStdArrays prefix, or the full name of a plain waveform source), with the values it was
generated for; every PV is written ``ca://$(P)...`` because the outputs are Channel Access only,
and a site whose Phoebus defaults to PVA would otherwise look for them there.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree

from pydantic import BaseModel, ConfigDict, Field

from cdae.ioc.frames import NDDataType
from cdae.ioc.health import HealthMapPVs, HealthPVs
from cdae.ioc.pvs import FilterPVs, NDArrayPVs

if TYPE_CHECKING:
    from caproto.server import pvproperty

    from cdae.ioc.config import IocConfig

MARGIN = 10
ROW = 25  # height of one text row, pixels
LABEL_W = 150

#: DataType_RBV indices whose pixels are unsigned: CA has no unsigned 16/32-bit types (and Java no
#: unsigned byte), so UInt8/UInt16/UInt32 arrive signed and the Image widget must reinterpret them.
UNSIGNED_TYPES = tuple(int(t) for t in (NDDataType.UInt8, NDDataType.UInt16, NDDataType.UInt32, NDDataType.UInt64))

# The script runs in Phoebus (Jython): the model list is one comma-separated long string, not an
# enum, so the combo's items cannot come from the PV directly.
_MODELS_SCRIPT = """\
# Offer the engine's models (Models_RBV: comma-separated NAME:VERSION) in the combo box.
from org.csstudio.display.builder.runtime.script import PVUtil
text = PVUtil.getString(pvs[0], True)
widget.setItems([m.strip() for m in text.split(",") if m.strip()])
"""


def pv_suffix(prop: pvproperty) -> str:
    """The PV name a pvproperty of the contract serves, after its group's prefix."""
    return prop.pvspec.name


class DisplaySpec(BaseModel):
    """What one camera's display shows; the CLI flags (and a site file's camera) fill it."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field(min_length=1, description="the filter IOC's output prefix, e.g. 13SIM1:CDAE1:")
    source: str = Field(min_length=1, description="the source's NDStdArrays prefix, or a plain waveform PV")
    source_is_waveform: bool = Field(False, description="source is a plain waveform PV (its sizes come from P)")
    source_array: str = Field("ArrayData", min_length=1, description="the source's image PV after its prefix")
    title: str | None = Field(None, description="window title (default: source → prefix)")
    image_width: int = Field(400, ge=100, le=4000, description="on-screen width of each image, pixels")
    image_height: int = Field(400, ge=100, le=4000, description="on-screen height of each image, pixels")
    residual_limit: float | None = Field(
        None, gt=0, description="fixed residual scale ±limit (blue-white-red, white = 0); default: autoscale"
    )

    @classmethod
    def from_ioc_config(cls, config: IocConfig, **overrides: object) -> DisplaySpec:
        """The display of a configured filter IOC (e.g. a site file's camera)."""
        return cls.model_validate({"prefix": config.prefix, "source": config.source, "source_array": config.array_suffix,
                                   "source_is_waveform": config.plain_waveform, **overrides})

    @property
    def window_title(self) -> str:
        return self.title or f"cdae: {self.source} → {self.prefix}"


@dataclass(frozen=True)
class _Panel:
    """One image column: where its PVs live and how its pixels are to be read."""

    title: str
    array_pv: str  # the image
    meta: str  # prefix (macro form) of its size/type/id PVs
    signed_float: bool
    source_side: bool


def _ca(name: str) -> str:
    return "ca://" + name


class _Builder:
    """Lays the widgets out top to bottom: title, three image columns, then two status columns."""

    def __init__(self, spec: DisplaySpec) -> None:
        import phoebusgen
        import phoebusgen.screen
        import phoebusgen.widget

        self.spec = spec
        self.w = phoebusgen.widget
        self.colors = phoebusgen.colors
        self.fonts = phoebusgen.fonts
        self.width = 3 * spec.image_width + 4 * MARGIN
        self.screen = phoebusgen.screen.Screen(spec.window_title)
        self.screen.macro("P", spec.prefix)
        self.screen.macro("S", spec.source)

    # --- small widgets ------------------------------------------------------------------------

    def label(self, text: str, x: int, y: int, w: int = LABEL_W, bold: bool = False) -> None:
        lab = self.w.Label(f"label {text}", text, x, y, w, ROW - 5)
        if bold:
            lab.font_style_bold()
        self.screen.add_widget(lab)

    def value(self, pv: str, x: int, y: int, w: int, string: bool = False, units: bool = False) -> object:
        t = self.w.TextUpdate(f"value {pv}", _ca(pv), x, y, w, ROW - 5)
        t.alarm_border(True)
        if string:
            t.format("string")  # long strings are CHAR arrays (NAME.VAL$): show them as text
        t.show_units(units)
        self.screen.add_widget(t)
        return t

    def row(self, text: str, pv: str, x: int, y: int, w: int, **kw: bool) -> None:
        self.label(text, x, y)
        self.value(pv, x + LABEL_W, y, w - LABEL_W, **kw)

    # --- the three images ---------------------------------------------------------------------

    def panels(self) -> list[_Panel]:
        s, p = self.spec, "$(P)"
        raw_meta = p if s.source_is_waveform else "$(S)"  # a plain waveform has no size PVs: the filter's
        raw_array = "$(S)" if s.source_is_waveform else "$(S)" + s.source_array
        residual = p + FilterPVs.residual.prefix
        return [
            _Panel("Raw (camera)", raw_array, raw_meta, False, True),
            _Panel("Denoised", p + pv_suffix(FilterPVs.array_data), p, False, False),
            _Panel("Residual (raw − denoised)", residual + pv_suffix(NDArrayPVs.array_data), residual, True, False),
        ]

    def image(self, panel: _Panel, x: int, y: int) -> None:
        s = self.spec
        img = self.w.Image(f"image {panel.title}", _ca(panel.array_pv), x, y, s.image_width, s.image_height)
        img.alarm_border(True)
        img.interpolation_none()  # a defect is one pixel: interpolation would smear exactly what we look for
        # CA carries no image shape: the widget takes it from the size PVs, as areaDetector's screens do
        img.data_width(1)
        img.data_height(1)
        img.rule("width", "data_width", {_ca(panel.meta + pv_suffix(NDArrayPVs.array_size0)): True},
                 {"pv0 > 0": "pv0"}, value_as_expression=True)
        img.rule("height", "data_height", {_ca(panel.meta + pv_suffix(NDArrayPVs.array_size1)): True},
                 {"pv0 > 0": "pv0"}, value_as_expression=True)
        if panel.signed_float:
            img.unsigned_data(False)
            if s.residual_limit is not None:  # fixed symmetric scale so that white means "nothing removed"
                img.auto_scale(False)
                img.minimum(-s.residual_limit)
                img.maximum(s.residual_limit)
                for value, rgb in ((0, (0, 0, 255)), (128, (255, 255, 255)), (255, (255, 0, 0))):
                    img.add_color_map(self.w.ColorMapColor(value, *rgb))
            else:
                img.auto_scale(True)
                img.predefined_color_map("VIRIDIS")
        else:
            img.auto_scale(True)
            img.predefined_color_map("GRAY")
            unsigned = " || ".join(f"pv0 == {i}" for i in UNSIGNED_TYPES)
            img.rule("unsigned", "unsigned", {_ca(panel.meta + pv_suffix(NDArrayPVs.data_type)): True},
                     {unsigned: "true", "true": "false"})
        self.screen.add_widget(img)

    def image_column(self, panel: _Panel, x: int, y: int) -> int:
        s = self.spec
        self.label(panel.title, x, y, s.image_width, bold=True)
        y += ROW
        self.image(panel, x, y)
        y += s.image_height + 5
        w = s.image_width
        m = panel.meta
        self.label("UniqueId", x, y)
        self.value(m + pv_suffix(NDArrayPVs.unique_id), x + LABEL_W, y, w - LABEL_W)
        y += ROW
        self.label("Size, type", x, y)
        third = (w - LABEL_W) // 3
        for i, prop in enumerate((NDArrayPVs.array_size0, NDArrayPVs.array_size1, NDArrayPVs.data_type)):
            self.value(m + pv_suffix(prop), x + LABEL_W + i * third, y, third - 2)
        y += ROW
        if not (panel.source_side and s.source_is_waveform):  # a plain waveform has no rate PV
            self.row("Rate", m + pv_suffix(NDArrayPVs.array_rate), x, y, w, units=True)
        return y + ROW

    # --- model, engine, throughput --------------------------------------------------------------

    def model_and_engine(self, x: int, y: int, w: int) -> int:
        p = "$(P)"
        self.label("Model and engine", x, y, w, bold=True)
        y += ROW
        self.label("Model (select)", x, y)
        combo = self.w.ComboBox("model selector", _ca(p + pv_suffix(FilterPVs.model)), x + LABEL_W, y,
                                w - LABEL_W, ROW - 3)
        combo.items_from_pv(False)
        combo.editable(True)  # any NAME:VERSION in the store may be typed, listed or not
        combo.alarm_border(True)
        combo.embedded_python_script(_MODELS_SCRIPT, {_ca(p + pv_suffix(FilterPVs.models) + ".VAL$"): True})
        self.screen.add_widget(combo)
        y += ROW
        self.row("Model (active)", p + pv_suffix(FilterPVs.model_rbv), x, y, w)
        y += ROW
        self.row("Available", p + pv_suffix(FilterPVs.models) + ".VAL$", x, y, w, string=True)
        y += ROW
        self.row("Backend", p + pv_suffix(FilterPVs.backend), x, y, w)
        y += ROW
        for text, prop in (("Engine", FilterPVs.engine_connected), ("Source", FilterPVs.source_connected)):
            self.label(text, x, y)
            led = self.w.LED(f"led {text}", _ca(p + pv_suffix(prop)), x + LABEL_W, y, ROW - 5, ROW - 5)
            led.predefined_on_color(self.colors.OK)
            led.predefined_off_color(self.colors.MAJOR)
            led.alarm_border(True)
            self.screen.add_widget(led)
            self.value(p + pv_suffix(prop), x + LABEL_W + ROW, y, w - LABEL_W - ROW)
            y += ROW
        self.row("Engine address", p + pv_suffix(FilterPVs.engine_address) + ".VAL$", x, y, w, string=True)
        y += ROW
        self.row("Source", p + pv_suffix(FilterPVs.nd_array_port_rbv), x, y, w)
        y += ROW
        self.label("Bad-pixel file", x, y)
        bad = self.w.TextEntry("bad pixel file", _ca(p + pv_suffix(FilterPVs.bad_pixel_file) + ".VAL$"), x + LABEL_W,
                               y, w - LABEL_W, ROW - 3)
        bad.format("string")  # a path: a CHAR array written whole through NAME.VAL$
        bad.alarm_border(True)  # a refused file shows as a WRITE alarm
        self.screen.add_widget(bad)
        y += ROW
        self.row("Bad pixels listed", p + pv_suffix(FilterPVs.bad_pixel_count), x, y, w)
        y += ROW
        self.row("Status", p + pv_suffix(FilterPVs.status) + ".VAL$", x, y, w, string=True)
        y += ROW
        self.label("Last error", x, y)
        err = self.value(p + pv_suffix(FilterPVs.last_error) + ".VAL$", x + LABEL_W, y, w - LABEL_W, string=True)
        err.height(2 * ROW - 5)  # type: ignore[attr-defined]
        err.wrap_words(True)  # type: ignore[attr-defined]
        return y + 2 * ROW

    def throughput(self, x: int, y: int, w: int) -> int:
        p, s = "$(P)", self.spec
        self.label("Throughput", x, y, w, bold=True)
        y += ROW
        self.label("Callbacks", x, y)
        choice = self.w.ChoiceButton("enable callbacks", _ca(p + pv_suffix(FilterPVs.enable_callbacks)),
                                     x + LABEL_W, y, (w - LABEL_W) // 2, ROW - 3)
        choice.items_from_pv(True)  # "Disable"/"Enable" from the enum
        self.screen.add_widget(choice)
        self.value(p + pv_suffix(FilterPVs.enable_callbacks_rbv), x + LABEL_W + (w - LABEL_W) // 2 + 5, y,
                   (w - LABEL_W) // 2 - 5)
        y += ROW
        if not s.source_is_waveform:
            self.row("Rate in (camera)", "$(S)" + pv_suffix(NDArrayPVs.array_rate), x, y, w, units=True)
            y += ROW
        for text, prop in (("Rate out", FilterPVs.array_rate), ("Latency", FilterPVs.latency),
                           ("Execution time", FilterPVs.execution_time)):
            self.row(text, p + pv_suffix(prop), x, y, w, units=True)
            y += ROW
        self.label("Dropped arrays", x, y)
        half = (w - LABEL_W) // 2
        self.value(p + pv_suffix(FilterPVs.dropped_arrays_rbv), x + LABEL_W, y, half)
        reset = self.w.ActionButton("reset dropped", "Reset", _ca(p + pv_suffix(FilterPVs.dropped_arrays)),
                                    x + LABEL_W + half + 5, y, half - 5, ROW - 3)
        reset.action_write_pv(_ca(p + pv_suffix(FilterPVs.dropped_arrays)), 0, "Reset the dropped-array count")
        self.screen.add_widget(reset)
        y += ROW
        for text, prop in (("Frames received", FilterPVs.frames_received), ("Frame errors", FilterPVs.frame_errors),
                           ("Published", FilterPVs.array_counter_rbv)):
            self.row(text, p + pv_suffix(prop), x, y, w)
            y += ROW
        self.label("Queue size, free", x, y)
        entry = self.w.TextEntry("queue size", _ca(p + pv_suffix(FilterPVs.queue_size)), x + LABEL_W, y, half,
                                 ROW - 3)
        entry.alarm_border(True)
        self.screen.add_widget(entry)
        self.value(p + pv_suffix(FilterPVs.queue_free), x + LABEL_W + half + 5, y, half - 5)
        return y + ROW

    # --- camera health ------------------------------------------------------------------------------

    def health(self, x: int, y: int, w: int) -> int:
        """The live bad-pixel map: its counts and alarm, the operator's commands, and the map as an image."""
        p, s = "$(P)", self.spec
        H = HealthPVs
        self.label("Camera health", x, y, w, bold=True)
        y += ROW
        half = (w - MARGIN) // 2
        top = y
        self.label("Camera health", x, y)
        led = self.w.LED("led camera health", _ca(p + pv_suffix(H.camera_health)), x + LABEL_W, y, ROW - 5, ROW - 5)
        led.predefined_on_color(self.colors.MINOR)
        led.predefined_off_color(self.colors.OK)
        led.alarm_border(True)
        self.screen.add_widget(led)
        self.value(p + pv_suffix(H.camera_health), x + LABEL_W + ROW, y, half - LABEL_W - ROW)
        y += ROW
        self.label("Why", x, y)
        why = self.value(p + pv_suffix(H.health_status) + ".VAL$", x + LABEL_W, y, half - LABEL_W, string=True)
        why.height(2 * ROW - 5)  # type: ignore[attr-defined]
        why.wrap_words(True)  # type: ignore[attr-defined]
        y += 2 * ROW
        for text, prop in (("Hot / dead / stuck", (H.hot_pixels, H.dead_pixels, H.stuck_pixels)),
                           ("Bad columns / rows", (H.bad_columns, H.bad_rows)),
                           ("New pixels / lines", (H.new_bad_pixels, H.new_bad_lines)),
                           ("Radiation hits, px/s", (H.radiation_hits, H.radiation_rate)),
                           ("Read noise, offset (DN)", (H.read_noise, H.offset)),
                           ("Frames, skipped", (H.health_frames, H.health_skipped))):
            self.label(text, x, y)
            part = (half - LABEL_W) // len(prop)
            for i, pr in enumerate(prop):
                self.value(p + pv_suffix(pr), x + LABEL_W + i * part, y, part - 2)
            y += ROW
        self.row("Baseline", p + pv_suffix(H.baseline) + ".VAL$", x, y, half, string=True)
        y += ROW
        left_end = y
        # commands, right half
        x2, y = x + half + MARGIN, top
        self.label("Use the live map", x2, y)
        choice = self.w.ChoiceButton("health map use", _ca(p + pv_suffix(H.use_map)), x2 + LABEL_W, y,
                                     (half - LABEL_W) // 2, ROW - 3)
        choice.items_from_pv(True)
        self.screen.add_widget(choice)
        self.value(p + pv_suffix(H.use_map_rbv), x2 + LABEL_W + (half - LABEL_W) // 2 + 5, y,
                   (half - LABEL_W) // 2 - 5)
        y += ROW
        for name, prop, text, tip in (("accept", H.accept, "Accept map as baseline",
                                       "The live map as it is becomes the baseline New* count from"),
                                      ("export", H.export, "Export map file", "Write the live map as an "
                                       "NDPluginBadPixel file into the state directory")):
            b = self.w.ActionButton(f"health {name}", text, _ca(p + pv_suffix(prop)), x2 + LABEL_W, y,
                                    half - LABEL_W, ROW - 3)
            b.action_write_pv(_ca(p + pv_suffix(prop)), 1, tip)
            self.screen.add_widget(b)
            y += ROW
        self.row("Exported", p + pv_suffix(H.export_file) + ".VAL$", x2, y, half, string=True)
        y += ROW
        side = min(s.image_height, half - LABEL_W)
        self.label("Health map", x2, y)
        img = self.w.Image("image health map", _ca(p + HealthPVs.health_map.prefix + pv_suffix(HealthMapPVs.array_data)),
                           x2 + LABEL_W, y, side, side)
        img.interpolation_none()
        img.data_width(1)
        img.data_height(1)
        meta = p + HealthPVs.health_map.prefix
        img.rule("width", "data_width", {_ca(meta + pv_suffix(NDArrayPVs.array_size0)): True}, {"pv0 > 0": "pv0"},
                 value_as_expression=True)
        img.rule("height", "data_height", {_ca(meta + pv_suffix(NDArrayPVs.array_size1)): True}, {"pv0 > 0": "pv0"},
                 value_as_expression=True)
        img.unsigned_data(True)  # UInt8 codes (DBR_CHAR): +128 where new must not read negative
        img.auto_scale(False)
        img.minimum(0)
        img.maximum(8)  # codes 0..5 (+128 where new: shown at the top of the scale)
        img.predefined_color_map("JET")
        self.screen.add_widget(img)
        return max(left_end, y + side + 5)

    def build(self) -> ElementTree.Element:
        s = self.spec
        title = self.w.Label("title", s.window_title, 0, 0, self.width, 30)
        title.predefined_font(self.fonts.Header2)
        self.screen.add_widget(title)
        y0 = 40
        bottom = y0
        for i, panel in enumerate(self.panels()):
            bottom = max(bottom, self.image_column(panel, MARGIN + i * (s.image_width + MARGIN), y0))
        half = (self.width - 3 * MARGIN) // 2
        y = bottom + MARGIN
        end = max(self.model_and_engine(MARGIN, y, half), self.throughput(2 * MARGIN + half, y, half))
        end = self.health(MARGIN, end + MARGIN, self.width - 2 * MARGIN)
        self.screen.width(self.width)
        self.screen.height(end + MARGIN)
        return self.screen.root


def build_display(spec: DisplaySpec) -> ElementTree.Element:
    """The ``<display>`` element of one camera's screen."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # phoebusgen prints (and carries on) where it should raise
        root = _Builder(spec).build()
    if out.getvalue().strip():
        raise ValueError(f"phoebusgen refused part of the display: {out.getvalue().strip()}")
    return root


def write_display(spec: DisplaySpec, path: str | Path) -> Path:
    """Write the ``.bob`` file (UTF-8, indented as Phoebus writes it)."""
    path = Path(path)
    root = build_display(spec)
    ElementTree.indent(root, space="  ")
    path.write_bytes(ElementTree.tostring(root, encoding="UTF-8", xml_declaration=True) + b"\n")
    return path
