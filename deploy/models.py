"""``cdae models``: what a model store holds, whether it is intact, and switching a running engine.

Read-only over the store (the package format belongs to :mod:`cdae.engine.package`); ``activate``
goes through the engine's control channel, the same request the IOC's ``Model`` PV sends.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import JsonValue

from cdae.deploy.export import verify_artefacts
from cdae.engine.package import DEFAULT_MODEL, Manifest, ModelPackageError, ModelRegistry, load_package, read_manifest


def _metric(manifest: Manifest, *path: str) -> JsonValue:
    node: JsonValue = manifest.metrics.model_dump(mode="json")
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def store_rows(store: Path) -> list[dict[str, JsonValue]]:
    """One row per package: identity, size, provenance, held-out PSNR where evaluated, artefacts."""
    registry = ModelRegistry(store)
    rows: list[dict[str, JsonValue]] = []
    for ref in registry.refs():
        pkg = registry.resolve(ref)
        try:
            m = read_manifest(pkg)
        except ModelPackageError as e:
            rows.append({"ref": ref, "error": str(e)})
            continue
        name_default = m.name == DEFAULT_MODEL and pkg == registry.resolve(DEFAULT_MODEL)
        rows.append({
            "ref": m.ref, "default": name_default, "parameters": m.parameters, "weights_sha256": m.weights_sha256,
            "created_utc": m.created_utc, "parent": m.parent, "seed": m.seed,
            "psnr_db": _metric(m, "held_out", "summary", "psnr_db"),
            # held-out sets of different scene generators do not compare; records before the report
            # named its generator were made with the generator the model was trained on
            "held_out_generator": _metric(m, "held_out", "held_out", "generator") or m.data_generator_version,
            "artefacts": [f"{a.kind}:{a.precision}" for a in m.artefacts],
        })
    return rows


def format_rows(rows: list[dict[str, JsonValue]]) -> str:
    """The store as a table for a terminal."""
    head = (f"{'model':<28} {'params':>8} {'sha256':<12} {'PSNR dB':>8} {'(gen)':<6}  {'created (UTC)':<25} "
            "artefacts")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['ref']:<28} BROKEN: {r['error']}")
            continue
        psnr = f"{r['psnr_db']:.2f}" if isinstance(r["psnr_db"], (int, float)) else "-"
        gen = f"({r['held_out_generator']})" if psnr != "-" and r.get("held_out_generator") else ""
        mark = " *" if r["default"] else ""
        arts = ", ".join(r["artefacts"]) or "-"  # type: ignore[arg-type]
        lines.append(f"{str(r['ref']) + mark:<28} {r['parameters']:>8} {str(r['weights_sha256'])[:12]:<12} "
                     f"{psnr:>8} {gen:<6}  {r['created_utc']!s:<25} {arts}")
    lines.append("* = what a bare `cdae-default` resolves to; (gen): the scene generator of the held-out set, "
                 "PSNRs of different generators do not compare")
    return "\n".join(lines)


def verify_package(pkg: Path) -> list[str]:
    """Everything wrong with one package: manifest, weights' sha256 and safetensors, artefacts."""
    try:
        load_package(pkg)
    except ModelPackageError as e:
        return [str(e)]
    return verify_artefacts(pkg)


def describe(pkg: Path) -> str:
    """``cdae models show``: how a package was made, its held-out metrics and its artefacts, a few lines."""
    m = read_manifest(pkg)
    held = m.metrics.get("held_out") or {}
    summary = held.get("summary", {}) if isinstance(held, dict) else {}
    lines = [f"{m.ref}  ({pkg})",
             f"  architecture  {m.architecture.model_dump_json()}",
             f"  parameters    {m.parameters}, weights {m.weights_bytes} bytes, sha256 {m.weights_sha256}",
             f"  made          {m.created_utc} by code {m.code_version}, seed {m.seed}, "
             f"generator {m.data_generator_version}, parent {m.parent or '-'}",
             f"  command       {m.command or '-'}"]
    if summary:
        lines.append("  held-out      " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float)))
    for a in m.artefacts:
        par = a.parity
        lines.append(f"  artefact      {a.kind} {a.precision} {a.path} sha256 {a.sha256[:12]} parity "
                     f"{'passed' if par.get('passed') else 'FAILED'} (max |Δ| {par.get('max_abs_dn')} DN)")
    return "\n".join(lines)
