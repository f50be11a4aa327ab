"""Log records rendered: timestamps exactly as a UTC datetime is written by orjson."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import orjson

from sidecar.telemetry.logwriter import render


def _as_datetime_renders(timestamp: float) -> str:
    written = orjson.dumps(datetime.fromtimestamp(timestamp, UTC), option=orjson.OPT_UTC_Z)
    return str(orjson.loads(written))


def test_timestamps_are_written_as_a_utc_datetime_is() -> None:
    rng = random.Random(7)
    stamps = [0.0, 1.5, 59.999999, 1_765_046_400.0, 1_765_046_400.000001, 1_765_046_399.9999996]
    stamps += [-1.5, -0.25, -86_400.000001, -62_135_596_800.0, 253_402_300_798.5]
    stamps += [1_702_605_806.8515625, 1_739_726_557.8515625]  # half a microsecond: to even
    stamps += [rng.uniform(-3e9, 4e9) for _ in range(3000)]
    stamps += [float(rng.randrange(0, 2**32)) for _ in range(200)]  # whole seconds: no fraction
    for stamp in stamps:
        line = orjson.loads(render({"timestamp": stamp, "event": "request"}))
        assert line["timestamp"] == _as_datetime_renders(stamp), stamp
    assert orjson.loads(render({"timestamp": 1_765_046_399.9999996}))["timestamp"] == (
        "2025-12-06T18:40:00Z"
    )


def test_a_timestamp_that_is_no_date_stays_a_number() -> None:
    for stamp in (float("nan"), float("inf"), -float("inf"), 1e300, -1e300, 253_402_300_800.0):
        line = orjson.loads(render({"timestamp": stamp, "event": "request"}))
        assert line["event"] == "request"
        assert not isinstance(line["timestamp"], str), stamp


def test_other_fields_are_kept_and_a_line_ends_once() -> None:
    line = render({"event": "request", "status": 200, "timestamp": 0.25})
    assert line.endswith(b"}\n")
    assert line.count(b"\n") == 1
    assert orjson.loads(line) == {
        "event": "request",
        "status": 200,
        "timestamp": "1970-01-01T00:00:00.250000Z",
    }
    assert render(b'{"a":1}') == b'{"a":1}\n'
    assert render(b'{"a":1}\n') == b'{"a":1}\n'
