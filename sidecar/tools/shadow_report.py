"""``sidecar shadow-report``: what the comparison log says about the candidate model.

Reads the shadow comparison log (JSON lines) and reports requests compared, the
agreement rate with a 95% Wilson interval, the latency delta (shadow minus primary)
at p50/p95/p99, the fields that differ most, and a few mismatches. ``--html`` writes
a self-contained page with histograms of the numeric differences and latency deltas.
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.analytics.predictions import json_object

_INDEX = re.compile(r"\[\d+\]")


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # Rounded so that an all-match run reports exactly 100% as its upper bound.
    return (max(0.0, round(centre - half, 12)), min(1.0, round(centre + half, 12)))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Report:
    records: int = 0
    matches: int = 0
    mismatches: int = 0
    errors: int = 0
    skipped: int = 0
    latency_deltas_ms: list[float] = field(default_factory=list)
    numeric_diffs: list[float] = field(default_factory=list)
    label_agreements: list[float] = field(default_factory=list)
    differing_fields: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def compared(self) -> int:
        return self.matches + self.mismatches

    @property
    def agreement(self) -> float | None:
        return self.matches / self.compared if self.compared else None

    def summary(self) -> dict[str, Any]:
        low, high = wilson_interval(self.matches, self.compared)
        deltas = self.latency_deltas_ms
        return {
            "records": self.records,
            "compared": self.compared,
            "matches": self.matches,
            "mismatches": self.mismatches,
            "errors": self.errors,
            "skipped": self.skipped,
            "agreement": None if self.agreement is None else round(self.agreement, 4),
            "agreement_95ci": [round(low, 4), round(high, 4)],
            "label_agreement": (
                round(sum(self.label_agreements) / len(self.label_agreements), 4)
                if self.label_agreements
                else None
            ),
            "latency_delta_ms": {
                name: None if (v := percentile(deltas, q)) is None else round(v, 3)
                for name, q in (("p50", 50), ("p95", 95), ("p99", 99))
            },
            "fields_differing_most": self.differing_fields.most_common(10),
            "examples": self.examples,
        }


def build_report(lines: Iterable[bytes], max_examples: int = 5) -> Report:
    """The report of a comparison log; ValueError names a line that is not a JSON
    object. Differences that are not a list of objects are left out."""
    report = Report()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = json_object(line, number)
        report.records += 1
        result = record.get("result")
        if result == "match":
            report.matches += 1
        elif result == "mismatch":
            report.mismatches += 1
            listed = record.get("differences")
            differences = (
                [d for d in listed if isinstance(d, dict)] if isinstance(listed, list) else []
            )
            for difference in differences:
                report.differing_fields[_INDEX.sub("[*]", str(difference.get("field")))] += 1
            if len(report.examples) < max_examples:
                report.examples.append(
                    {
                        "request_id": record.get("request_id"),
                        "reason": record.get("reason"),
                        "differences": differences[:3],
                    }
                )
        elif result == "error":
            report.errors += 1
            continue
        else:
            report.skipped += 1
            continue
        if isinstance(record.get("latency_delta_ms"), int | float):
            report.latency_deltas_ms.append(float(record["latency_delta_ms"]))
        if isinstance(record.get("max_abs_diff"), int | float):
            report.numeric_diffs.append(float(record["max_abs_diff"]))
        if isinstance(record.get("label_agreement"), int | float):
            report.label_agreements.append(float(record["label_agreement"]))
    return report


def render_text(report: Report) -> str:
    s = report.summary()
    lines = [
        f"shadow comparisons: {s['records']} records, {s['compared']} compared "
        f"({s['errors']} errors, {s['skipped']} skipped)"
    ]
    if s["agreement"] is None:
        lines.append("agreement: no comparisons")
    else:
        low, high = s["agreement_95ci"]
        lines.append(
            f"agreement: {s['agreement'] * 100:.2f}% "
            f"(95% CI {low * 100:.2f}% .. {high * 100:.2f}%), "
            f"{s['matches']} match, {s['mismatches']} mismatch"
        )
    if s["label_agreement"] is not None:
        lines.append(f"label agreement: {s['label_agreement'] * 100:.2f}%")
    d = s["latency_delta_ms"]
    lines.append(
        f"latency delta (shadow - primary) ms: p50 {d['p50']}  p95 {d['p95']}  p99 {d['p99']}"
    )
    if s["fields_differing_most"]:
        lines.append("fields that differ most:")
        lines += [f"  {count:>6}  {name}" for name, count in s["fields_differing_most"]]
    if s["examples"]:
        lines.append("mismatch examples:")
        for example in s["examples"]:
            diffs = "; ".join(
                f"{d.get('field')}: {d.get('primary')} -> {d.get('shadow')}"
                for d in example["differences"]
            )
            lines.append(f"  {example['request_id']}  {diffs}")
    return "\n".join(lines) + "\n"


def _histogram_svg(values: Sequence[float], title: str, unit: str, bins: int = 20) -> str:
    if not values:
        return f"<p>{html.escape(title)}: no data</p>"
    low, high = min(values), max(values)
    # Each term divided first: high - low of two large floats overflows to infinity.
    width = high / bins - low / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int(v / width - low / width))] += 1
    top = max(counts)
    bars = []
    for i, count in enumerate(counts):
        h = 0 if top == 0 else 150 * count / top
        label = f"{low + i * width:.4g} .. {low + (i + 1) * width:.4g} {unit}: {count}"
        bars.append(
            f'<rect x="{40 + i * 24}" y="{170 - h:.1f}" width="20" height="{h:.1f}" '
            f'fill="#4a78b5"><title>{html.escape(label)}</title></rect>'
        )
    return (
        f"<h2>{html.escape(title)}</h2>"
        f'<svg width="{60 + bins * 24}" height="200" role="img">'
        f'<line x1="38" y1="170" x2="{42 + bins * 24}" y2="170" stroke="#333"/>'
        + "".join(bars)
        + f'<text x="40" y="190" font-size="11">{low:.4g} {html.escape(unit)}</text>'
        f'<text x="{bins * 24 - 20}" y="190" font-size="11">{high:.4g} '
        f'{html.escape(unit)}</text><text x="2" y="20" font-size="11">{top}</text></svg>'
    )


def render_html(report: Report) -> str:
    text = html.escape(render_text(report))
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>Shadow report</title>'
        "<style>body{font-family:sans-serif;margin:2em;max-width:60em}"
        "pre{background:#f4f4f4;padding:1em}</style></head><body>"
        "<h1>Shadow comparison report</h1>"
        f"<pre>{text}</pre>"
        + _histogram_svg(report.numeric_diffs, "Largest numeric difference per request", "")
        + _histogram_svg(report.latency_deltas_ms, "Latency delta (shadow - primary)", "ms")
        + "</body></html>\n"
    )
