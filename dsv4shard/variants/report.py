"""A variant's report as Markdown (one table per variant) and JSON."""

from __future__ import annotations


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


def verdict(report) -> str:
    if report.error:
        return "NOT CHECKED: the variant cannot be loaded"
    failed = [r.check for r in report.failed_required]
    info = [r.check for r in report.results if not r.required and r.status == "FAIL"]
    note = f" ({len(info)} informational departure{'s' * (len(info) != 1)}: " \
           f"{', '.join(info)})" if info else ""
    if failed:
        return f"FAILS {len(failed)} required check{'s' * (len(failed) != 1)}: " \
               f"{', '.join(failed)}{note}"
    from dsv4shard.variants.checks import CHECKS

    scope = "" if len(report.results) == len(CHECKS) else \
        f" (only {len(report.results)} of {len(CHECKS)} checks run)"
    return f"conforms: every required check passes or is not applicable{note}{scope}"


def markdown(report) -> str:
    lines = [f"### variant: {report.variant}", ""]
    layout = report.properties.get("layout")
    if layout:
        lines += [f"layout: {layout}", ""]
    props = properties_line(report.properties)
    if props:
        lines += [f"properties: {props}", ""]
    lines += ["| check | kind | result | seconds | detail |", "|---|---|---|---|---|"]
    for r in report.results:
        kind = "required" if r.required else "informational"
        lines.append(f"| {r.check} | {kind} | {r.status} | {r.seconds} | {_cell(r.detail)} |")
    lines += ["", f"verdict: {verdict(report)}"]
    return "\n".join(lines)
