"""Joining logged predictions with ground-truth labels that arrive later.

The payload log holds each sampled request's response with its request id and time;
labels come as CSV (``request_id,label``) or JSON lines (``{"request_id", "label"}``).
Classification labels (integers or strings) give accuracy; real-valued labels give
mean absolute error and RMSE. Results are per UTC day and per route.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.analytics.predictions import PredictionReader, json_object


def read_labels(path: Path) -> dict[str, Any]:
    """Labels by request id; ValueError names the file and line of a record it cannot
    read."""
    text = path.read_text(encoding="utf-8")
    labels: dict[str, Any] = {}
    first = text.lstrip()[:1]
    if first == "{":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                record = json_object(line.encode("utf-8", "surrogatepass"), number, str(path))
                if "request_id" not in record or "label" not in record:
                    raise ValueError(f"{path} line {number}: needs request_id and label")
                labels[str(record["request_id"])] = record["label"]
        return labels
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"request_id", "label"} <= set(reader.fieldnames):
        raise ValueError(f"{path}: a CSV of labels needs the columns request_id and label")
    for row in reader:
        if row["request_id"] is None or row["label"] is None:  # a row cut short
            raise ValueError(f"{path} line {reader.line_num}: no label")
        labels[row["request_id"]] = _number_or_text(row["label"])
    return labels


def _number_or_text(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


@dataclass
class Group:
    joined: int = 0
    correct: int = 0
    abs_error: float = 0.0
    sq_error: float = 0.0
    unreadable: int = 0


@dataclass
class JoinReport:
    regression: bool
    groups: dict[tuple[str, str], Group] = field(default_factory=dict)
    unlabelled: int = 0

    @property
    def unreadable(self) -> int:
        """Labelled records whose response held no prediction the reader understands."""
        return sum(g.unreadable for g in self.groups.values())

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for (day, route), g in sorted(self.groups.items()):
            if not g.joined:
                continue
            row: dict[str, Any] = {"day": day, "route": route, "joined": g.joined}
            if self.regression:
                row["mae"] = round(g.abs_error / g.joined, 6) if g.joined else None
                row["rmse"] = round(math.sqrt(g.sq_error / g.joined), 6) if g.joined else None
            else:
                row["accuracy"] = round(g.correct / g.joined, 6) if g.joined else None
            out.append(row)
        return out


def _is_regression(labels: Iterable[Any]) -> bool:
    return any(isinstance(v, float) and not v.is_integer() for v in labels)


def join(
    payload_lines: Iterable[bytes],
    labels: dict[str, Any],
    reader: PredictionReader,
    source: str = "",
) -> JoinReport:
    report = JoinReport(regression=_is_regression(labels.values()))
    for number, line in enumerate(payload_lines, 1):
        if not line.strip():
            continue
        record = json_object(line, number, source)
        request_id = record.get("request_id")
        if not isinstance(request_id, str) or request_id not in labels:
            report.unlabelled += 1
            continue
        key = (str(record.get("timestamp", ""))[:10], str(record.get("route", "-")))
        group = report.groups.setdefault(key, Group())
        predicted = reader.label(record.get("response"))
        if predicted is None:
            group.unreadable += 1
            continue
        truth = labels[request_id]
        group.joined += 1
        if report.regression:
            error = predicted - float(truth)
            group.abs_error += abs(error)
            group.sq_error += error * error
        elif _same_label(predicted, truth):
            group.correct += 1
    return report


def _same_label(predicted: float, truth: Any) -> bool:
    if isinstance(truth, bool):
        return False
    if isinstance(truth, int | float):
        return predicted == float(truth)
    return str(truth) == str(int(predicted)) if predicted.is_integer() else False
