"""A variant's report as Markdown: what ran, one row per property, the verdict."""

from __future__ import annotations

from dsv4shard.engine import outcome as o


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def yes_no(value) -> str:
    return {True: "yes", False: "no"}.get(value, str(value))


def properties_line(props: dict) -> str:
    parts = []
    if "revision" in props:
        parts.append(f"spec revision: {props['revision']}")
    if "hash_routing" in props:
        parts.append(f"hash routing: {yes_no(props['hash_routing'])}")
    if "softmax_renormalised" in props:
        parts.append(f"softmax renormalised: {yes_no(props['softmax_renormalised'])}")
    if "k1_renormalised" in props:
        parts.append(f"k = 1 renormalised: {yes_no(props['k1_renormalised'])}")
    if "epsilon" in props:
        eps = props["epsilon"]
        parts.append("renormalisation epsilon: none" if not eps else f"renormalisation epsilon: "
                     f"~{eps:.1g}")
    if props.get("forced_quantization"):
        parts.append(f"forced quantization: {props['forced_quantization']}")
    if props.get("route_scale"):
        parts.append(f"route_scale {props['route_scale']}")
    return "; ".join(parts)


def identity_lines(ident: dict) -> list[str]:
    if not ident:
        return []
    lines = [f"file: {ident.get('file') or '(in memory)'}"
             + (f" (sha256 {ident['sha256'][:16]}…)" if ident.get("sha256") else ""),
             f"ran on: {ident.get('backend')} ({ident.get('device')}), mlx {ident.get('mlx')}, "
             f"mlx-lm {ident.get('mlx_lm')}, dsv4shard {ident.get('dsv4shard')}, "
             f"python {ident.get('python')}"]
    gates = ident.get("device_gates") or []
    if gates:
        lines.append(f"device-gated paths: the file branches on {', '.join(gates[:4])}; only "
                     f"the {ident.get('backend')} path was exercised here")
    return lines


def status_word(v) -> str:
    if v.status == o.FAIL:
        return "FAIL (required)"
    if v.status == o.DEPARTS:
        return "DEPARTS (informational)" if not v.required else "DEPARTS (within one rounding)"
    if v.status == o.WEAK:
        return "WEAK (passed, bound too loose to rely on)"
    return v.status


def verdict(report) -> str:
    if report.error:
        return f"NOT CHECKED: {report.error}"
    failed = [v.prop for v in report.failed]
    departs = [v.prop for v in report.verdicts if v.status == o.DEPARTS]
    skipped_required = [v.prop for v in report.verdicts if v.required and v.status == o.SKIP]
    backend = [v.prop for v in report.verdicts if v.status == o.BACKEND]
    weak = [v.prop for v in report.verdicts if v.required and v.status == o.WEAK]
    notes = []
    if weak:
        notes.append(f"passed only weakly on this backend, no evidence here: {', '.join(weak)}")
    if departs:
        notes.append(f"{len(departs)} departure{'s' * (len(departs) != 1)} reported: "
                     f"{', '.join(departs)}")
    if skipped_required:
        notes.append(f"not applicable here: {', '.join(skipped_required)}")
    if backend:
        notes.append(f"backend defects (MLX's, not the variant's): {', '.join(backend)}")
    note = f" ({'; '.join(notes)})" if notes else ""
    if failed:
        return f"FAILS {len(failed)} required check{'s' * (len(failed) != 1)}: " \
               f"{', '.join(failed)}{note}"
    from dsv4shard.engine.records import variant_properties

    total = len(variant_properties())
    scope = "" if len(report.verdicts) == total else \
        f" (only {len(report.verdicts)} of {total} checks run)"
    return f"conforms: every required check passes or is not applicable{note}{scope}"


def markdown(report) -> str:
    lines = [f"### variant: {report.variant}", ""]
    ident = identity_lines(report.identity)
    if ident:
        lines += [line + "  " for line in ident] + [""]
    if report.error:
        return "\n".join(lines + [f"verdict: {verdict(report)}"])
    layout = report.properties.get("layout")
    if layout:
        lines += [f"layout: {layout}", ""]
    props = properties_line(report.properties)
    if props:
        lines += [f"properties: {props}", ""]
    lines += ["| check | kind | result | examples | seconds | detail |",
              "|---|---|---|---|---|---|"]
    for v in report.verdicts:
        kind = "required" if v.required else "informational"
        lines.append(f"| {v.prop} | {kind} | {status_word(v)} | {v.examples} | {v.seconds} | "
                     f"{_cell(v.detail)} |")
    from dsv4shard.engine.records import variant_properties

    summaries = {r.name: r.summary for r in variant_properties()}
    lines += ["", "legend:"] + [f"- `{v.prop}`: {summaries.get(v.prop, '')}"
                                for v in report.verdicts]
    failing = [v for v in report.verdicts if v.reproduce and v.status in (o.FAIL, o.DEPARTS)]
    if failing:
        lines += ["", "reproduce:"] + [f"- {v.prop}: `{v.reproduce}`" for v in failing]
    lines += ["", f"verdict: {verdict(report)}"]
    return "\n".join(lines)
