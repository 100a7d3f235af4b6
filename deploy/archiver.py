"""What the Archiver Appliance should archive of one filter IOC, in its bulk ``archivePV`` format.

The appliance takes a JSON array posted to ``/mgmt/bpl/archivePV``
(``curl -H "Content-Type: application/json" --data @pvs.json http://HOST:17665/mgmt/bpl/archivePV``),
one object per PV: ``pv``, ``samplingmethod`` (``MONITOR`` or ``SCAN``), ``samplingperiod``
(seconds, *as a string*: the appliance casts it to a string before parsing, and skips an entry
whose period is a JSON number) and optionally ``policy``.

Both methods subscribe with a CA monitor. MONITOR keeps every update, but its buffer holds
``write period / sampling period + 1`` samples (10 s / 1 s → 11), and updates beyond that are
lost until the next write: a PV that changes every frame needs the frame period as its
sampling period. SCAN keeps one sample per period, the latest. The appliance refuses periods
below its ``minimumSamplingPeriod`` (0.1 s unless the site lowered it).

Every PV the filter publishes per frame carries the raw frame's timestamp, so archived denoised
ids, latencies and images line up with the camera's own archived frames by time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from caproto.server import pvproperty
from pydantic import BaseModel, ConfigDict, Field

from cdae.deploy.display import pv_suffix
from cdae.ioc.health import HealthPVs
from cdae.ioc.pvs import FilterPVs, NDArrayPVs

#: The appliance's own check of a channel name (PVNames.channelNamePattern): a ``$`` (long-string
#: ``.VAL$``) or a space fails it, so long strings are archived as DBR_STRING (first 39 characters).
_AA_CHANNEL = re.compile(r"[a-zA-Z0-9_\-+:\[\]<>;/,#{}^]+(\.[a-zA-Z_][a-zA-Z0-9_]*)?")
#: The appliance's default ``minimumSamplingPeriod`` (archappl.properties).
AA_MINIMUM_PERIOD_S = 0.1
EVENT_PERIOD_S = 1.0  # PVs that change on events (model swap, engine down), not per frame

#: Written once per published frame (with the raw frame's timestamp).
PER_FRAME: tuple[pvproperty, ...] = (FilterPVs.unique_id, FilterPVs.array_rate, FilterPVs.latency,
                                     FilterPVs.execution_time, FilterPVs.frames_received)
#: Written when something happens: what the operator is asked about afterwards.
EVENTS: tuple[pvproperty, ...] = (FilterPVs.model_rbv, FilterPVs.backend, FilterPVs.engine_connected,
                                  FilterPVs.source_connected, FilterPVs.last_error, FilterPVs.status,
                                  FilterPVs.dropped_arrays_rbv, FilterPVs.frame_errors,
                                  FilterPVs.enable_callbacks_rbv, FilterPVs.queue_size_rbv,
                                  FilterPVs.bad_pixel_file, FilterPVs.bad_pixel_count)
#: Camera health: counts that change per window (RadiationHits_RBV per frame) and the alarm; what
#: ``cdae health --archiver`` plots over time.
HEALTH: tuple[pvproperty, ...] = (HealthPVs.hot_pixels, HealthPVs.dead_pixels, HealthPVs.stuck_pixels,
                                  HealthPVs.bad_columns, HealthPVs.bad_rows, HealthPVs.new_bad_pixels,
                                  HealthPVs.new_bad_lines, HealthPVs.radiation_rate, HealthPVs.read_noise,
                                  HealthPVs.offset, HealthPVs.camera_health, HealthPVs.health_status,
                                  HealthPVs.baseline, HealthPVs.use_map_rbv)
#: What a client needs to decode an archived image (CA carries no shape).
IMAGE_META: tuple[pvproperty, ...] = (NDArrayPVs.array_size0, NDArrayPVs.array_size1, NDArrayPVs.data_type)


class ArchiverSpec(BaseModel):
    """Which PVs of one filter IOC (and its source) to archive, and how often."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field(min_length=1, description="the filter IOC's output prefix")
    source: str | None = Field(None, description="the source's NDStdArrays prefix (or plain waveform PV)")
    source_is_waveform: bool = Field(False, description="source is a plain waveform PV")
    source_array: str = Field("ArrayData", min_length=1, description="the source's image PV after its prefix")
    frame_rate_hz: float = Field(10.0, gt=0, description="the camera's frame rate: sizes the per-frame buffers")
    images: bool = Field(False, description="also archive raw, denoised and residual frames (large)")
    image_period_s: float = Field(60.0, ge=AA_MINIMUM_PERIOD_S, description="one archived frame per this many s")
    image_size: tuple[int, int] | None = Field(None, description="(width, height): for the storage estimate")
    policy: str | None = Field(None, min_length=1, description="the appliance policy to apply to every PV")


@dataclass
class ArchiverPlan:
    """The ``archivePV`` request body and what the operator should know before posting it."""

    requests: list[dict[str, str]]
    warnings: list[str] = field(default_factory=list)


def _period(seconds: float) -> str:
    return f"{seconds:.6g}"


def archiver_plan(spec: ArchiverSpec) -> ArchiverPlan:
    """The PVs to archive, each with its sampling method and period."""
    p = spec.prefix
    warnings: list[str] = []
    frame_period = 1.0 / spec.frame_rate_hz
    if frame_period < AA_MINIMUM_PERIOD_S:
        warnings.append(
            f"frames every {frame_period * 1e3:.3g} ms: the appliance raises sampling periods below its "
            f"minimumSamplingPeriod ({AA_MINIMUM_PERIOD_S} s by default), and a MONITOR buffer sized for "
            f"{AA_MINIMUM_PERIOD_S} s loses updates between writes; lower minimumSamplingPeriod in "
            f"archappl.properties to keep every frame's id and latency")
    entries: list[tuple[str, str, float]] = [(p + pv_suffix(prop), "MONITOR", frame_period) for prop in PER_FRAME]
    entries += [(p + pv_suffix(prop), "MONITOR", EVENT_PERIOD_S) for prop in EVENTS]
    entries += [(p + pv_suffix(HealthPVs.radiation_hits), "MONITOR", frame_period)]
    entries += [(p + pv_suffix(prop), "MONITOR", EVENT_PERIOD_S) for prop in HEALTH]
    nd_source = spec.source is not None and not spec.source_is_waveform
    if nd_source:  # the raw frame's id: pairs each archived denoised frame with the camera's
        entries.append((f"{spec.source}{pv_suffix(NDArrayPVs.unique_id)}", "MONITOR", frame_period))
    if spec.images:
        residual = p + FilterPVs.residual.prefix
        images = [(p, pv_suffix(FilterPVs.array_data)), (residual, pv_suffix(NDArrayPVs.array_data))]
        if nd_source:
            images.append((spec.source, spec.source_array))  # type: ignore[arg-type]
        for prefix, array in images:
            entries.append((prefix + array, "SCAN", spec.image_period_s))
            entries += [(prefix + pv_suffix(prop), "MONITOR", EVENT_PERIOD_S) for prop in IMAGE_META]
        if spec.source is not None and spec.source_is_waveform:
            entries.append((spec.source, "SCAN", spec.image_period_s))
        warnings.append(_image_cost(spec, len(images) + (1 if spec.source_is_waveform else 0)))
    requests = []
    for pv, method, period in entries:
        if not _AA_CHANNEL.fullmatch(pv):
            raise ValueError(f"{pv!r} fails the Archiver Appliance's PV name check (letters, digits, _-+:[]<>;/,#{{}}^ "
                             f"and one .FIELD); fix the prefix")
        request = {"pv": pv, "samplingmethod": method, "samplingperiod": _period(max(period, AA_MINIMUM_PERIOD_S))}
        if spec.policy:
            request["policy"] = spec.policy
        requests.append(request)
    return ArchiverPlan(requests, warnings)


def _image_cost(spec: ArchiverSpec, n_images: int) -> str:
    per_day = 86400.0 / spec.image_period_s
    text = (f"archiving {n_images} image PVs: every sample is a whole frame. Both SCAN and MONITOR subscribe "
            f"to every frame, so the IOC sends each image to the appliance at the full camera rate even though "
            f"one per {spec.image_period_s:g} s is stored; the appliance needs EPICS_CA_MAX_ARRAY_BYTES above "
            f"the frame size")
    if spec.image_size is not None:
        w, h = spec.image_size
        # raw and denoised keep the camera's type (up to 2 bytes for UInt16), the residual is float32
        frame_bytes = w * h * (2 * (n_images - 1) + 4)
        text += f"; {w}x{h} UInt16 frames: about {frame_bytes * per_day / 1e9:.3g} GB stored per day"
    return text + "."
