"""Access and payload logs off the hot path, drift (PSI), baselines and label joins."""

from __future__ import annotations

import asyncio
import contextvars
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from structlog.testing import capture_logs

from sidecar.analytics.drift import DriftMonitor, build_baseline
from sidecar.analytics.predictions import PredictionReader
from sidecar.config.baselines import Baseline, Histogram, psi
from sidecar.config.plan import load_plan
from sidecar.config.schema import ConfigError, DriftSettings, bundled_config_dir, load_config
from sidecar.control.workers import _mark_dead
from sidecar.demo.traffic import demo_baseline, iris_row
from sidecar.pipeline.context import RequestContext
from sidecar.telemetry.logs import CURRENT_REQUEST, add_request_fields
from sidecar.telemetry.logwriter import FileSink, LogWriter
from sidecar.telemetry.metrics import Metrics
from sidecar.tools.labels import join, read_labels
from tests.conftest import FakeModel, StartSidecar, base_config
from tests.integration.test_endpoints import metric_value


class BlockingSink:
    """A sink whose writes block until released, like a stalled disk or pipe."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.entered.set()
        self.release.wait(timeout=30)
        self.lines.extend(data.splitlines())

    def close(self) -> None:
        pass


async def test_a_stalled_access_log_never_stalls_requests(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sink = BlockingSink()
    config = base_config(fake_model.url)
    config["logging"] = {"queue_size": 20}
    sidecar = await start_sidecar(config, log_sinks={"access": sink})
    requests = 200
    try:
        async with sidecar.session.get(sidecar.url + "/x", headers={"X-Request-ID": "r-0"}) as resp:
            assert resp.status == 200
        # The writer takes the first record and stays stuck in the sink from then on.
        assert await asyncio.to_thread(sink.entered.wait, 10)
        for index in range(1, requests):
            async with sidecar.session.get(
                sidecar.url + "/x", headers={"X-Request-ID": f"r-{index}"}
            ) as resp:
                assert resp.status == 200
        # Every request completed although the writer was stuck.
        assert sink.lines == []
        async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
            text = await resp.text()
        dropped = metric_value(text, "sidecar_log_dropped_total", log="access", reason="queue_full")
        assert dropped > 0
    finally:
        sink.release.set()
    await sidecar.running.stop()
    written = [orjson.loads(line) for line in sink.lines]
    # Nothing accepted was lost: every record not dropped is written. (The /metrics
    # request's own record met the same full queue and was dropped after the count.)
    assert len(written) == requests - dropped
    indices = [int(w["request_id"].removeprefix("r-")) for w in written]
    assert indices == sorted(set(indices))  # in order, none twice
    assert indices[0] == 0


async def test_every_accepted_record_is_in_the_file_after_shutdown(
    fake_model: FakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    log_file = tmp_path / "logs" / "access.jsonl"
    config = base_config(fake_model.url)
    config["logging"] = {"access_log": {"path": str(log_file)}}
    sidecar = await start_sidecar(config)
    sent = [f"acc-{i}" for i in range(50)]
    for request_id in sent:
        async with sidecar.session.post(
            sidecar.url + "/infer?q=1", data=b"{}", headers={"X-Request-ID": request_id}
        ) as resp:
            assert resp.status == 200
    async with sidecar.session.get(sidecar.url + "/nowhere-route-is-all") as resp:
        assert resp.status == 200
    await sidecar.running.stop()
    lines = [orjson.loads(line) for line in log_file.read_bytes().splitlines()]
    proxied = [line for line in lines if line["route"] == "all"]
    assert [line["request_id"] for line in proxied[:50]] == sent
    first = proxied[0]
    assert first["event"] == "request"
    assert first["method"] == "POST"
    assert first["path"] == "/infer"  # the query string is not logged
    assert first["status"] == 200
    assert first["outcome"] == "ok"
    assert first["attempts"] == 1
    assert first["breaker"] == "closed"
    assert first["bytes_in"] == 2
    assert first["bytes_out"] > 0
    assert first["duration_ms"] >= first["upstream_ms"] > 0
    assert first["timestamp"].endswith("Z")
    assert len(first["trace_id"]) == 32


async def test_log_writer_counts_drops_and_flushes_on_stop() -> None:
    metrics = Metrics()
    sink = BlockingSink()
    writer = LogWriter("test", sink, metrics, queue_size=10, batch_size=4)
    writer.start()
    assert writer.submit({"n": 0})
    await asyncio.to_thread(sink.entered.wait, 10)  # the writer holds record 0
    accepted = sum(writer.submit({"n": i}) for i in range(1, 31))
    assert accepted == 10
    sink.release.set()
    await writer.stop()
    assert [orjson.loads(line)["n"] for line in sink.lines] == list(range(11))
    text = metrics.render().decode()
    assert metric_value(text, "sidecar_log_dropped_total", log="test", reason="queue_full") == 20
    assert metric_value(text, "sidecar_log_written_total", log="test") == 11
    assert not writer.submit({"late": True})  # closed: refused, and counted


async def test_a_record_that_fails_to_render_is_counted_and_its_batch_written() -> None:
    metrics = Metrics()
    sink = BlockingSink()
    sink.release.set()

    def render_or_fail(record: Any) -> bytes:
        if record.get("n") == 2:
            raise ValueError("cannot render this one")
        return orjson.dumps(record) + b"\n"

    writer = LogWriter("test", sink, metrics, linger=0.01, renderer=render_or_fail)
    writer.start()
    for n in range(5):
        assert writer.submit({"n": n})
    for _ in range(500):  # bounded: until the batch is written
        if len(sink.lines) == 4:
            break
        await asyncio.sleep(0.01)
    assert writer.alive  # the writer lives on after a record failed
    assert writer.submit({"n": 5})
    await writer.stop()
    assert [orjson.loads(line)["n"] for line in sink.lines] == [0, 1, 3, 4, 5]
    text = metrics.render().decode()
    assert metric_value(text, "sidecar_log_dropped_total", log="test", reason="unrenderable") == 1
    assert metric_value(text, "sidecar_log_written_total", log="test") == 5


async def in_a_blocked_write(metrics: Metrics) -> tuple[LogWriter, BlockingSink]:
    """A started writer whose thread is in the write of records 0-4, held there until
    the sink is released."""
    sink = BlockingSink()
    writer = LogWriter("test", sink, metrics, linger=0.01)
    writer.start()
    for n in range(5):
        assert writer.submit({"n": n})
    await asyncio.to_thread(sink.entered.wait, 10)
    return writer, sink


async def test_a_batch_the_sink_writes_after_the_flush_timeout_is_counted_written() -> None:
    # The writer is stopped while the thread is still in a slow write; the write
    # then finishes, the sink closes: those records are written, not lost.
    metrics = Metrics()
    writer, sink = await in_a_blocked_write(metrics)
    stopping = asyncio.create_task(writer.stop(flush_within=0.5))
    for _ in range(1000):  # up to 10 s: the flush wait gives up, the writer is stopped
        if not writer.alive:
            break
        await asyncio.sleep(0.01)
    assert not writer.alive
    sink.release.set()  # the slow write finishes; the close comes after it
    await asyncio.wait_for(stopping, 10)
    assert [orjson.loads(line)["n"] for line in sink.lines] == list(range(5))
    text = metrics.render().decode()
    assert metric_value(text, "sidecar_log_written_total", log="test") == 5
    assert log_dropped(text, "test") == 0


async def test_a_batch_a_stuck_sink_never_writes_is_counted_dropped() -> None:
    metrics = Metrics()
    writer, sink = await in_a_blocked_write(metrics)
    await writer.stop(flush_within=0.05)  # neither the write nor the close finishes
    text = metrics.render().decode()
    assert metric_value(text, "sidecar_log_dropped_total", log="test", reason="unwritten") == 5
    assert (metric_value(text, "sidecar_log_written_total", log="test") or 0) == 0
    sink.release.set()


class SlowSink:
    """Each write takes a millisecond, like a real disk; counts the writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.written = threading.Event()

    def write(self, data: bytes) -> None:
        time.sleep(0.001)
        self.writes.append(data)
        self.written.set()

    def close(self) -> None:
        pass


async def test_log_writer_keeps_batching_under_steady_load() -> None:
    # Records arriving while a batch is written wait for the next linger; the writer
    # does not chase them with one thread hand-off per write.
    sink = SlowSink()
    linger = 0.05
    writer = LogWriter("test", sink, Metrics(), linger=linger)
    writer.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n in range(300):  # a record every millisecond or so
        assert writer.submit({"n": n})
        await asyncio.sleep(0.001)
    elapsed = loop.time() - started
    await writer.stop()
    assert b"".join(sink.writes).count(b"\n") == 300
    assert len(sink.writes) <= elapsed / linger + 2


async def test_log_writer_lets_requests_run_while_it_renders_a_large_batch() -> None:
    # Rendering is event-loop work: a batch of a few thousand records rendered at
    # once held every request up for milliseconds. Requests must get turns between
    # slices of the batch, and the batch still goes out whole and in order.
    turns = 0
    turns_seen: list[int] = []

    def render(record: object) -> bytes:
        # Ten microseconds each, like a large payload record: ten milliseconds in all.
        turns_seen.append(turns)
        until = time.perf_counter() + 0.00001
        for _ in range(100_000):
            if time.perf_counter() >= until:
                break
        return orjson.dumps(record) + b"\n"

    async def other_requests() -> None:
        nonlocal turns
        for _ in range(1_000_000):  # cancelled once the batch is written
            turns += 1
            await asyncio.sleep(0)

    sink = SlowSink()
    writer = LogWriter("test", sink, Metrics(), linger=60.0, batch_size=1000, renderer=render)
    writer.start()
    ticker = asyncio.create_task(other_requests())
    for n in range(1000):  # a full batch: written without waiting for the linger
        assert writer.submit({"n": n})
    assert await asyncio.to_thread(sink.written.wait, 10)
    ticker.cancel()
    # The other task had turns while the batch rendered, not only before or after.
    assert len(turns_seen) == 1000
    assert len(set(turns_seen)) >= 5  # ten milliseconds of rendering, in many slices
    await writer.stop()
    assert len(sink.writes) == 1
    assert [orjson.loads(line)["n"] for line in sink.writes[0].splitlines()] == list(range(1000))


async def test_log_writer_stops_lingering_once_a_full_batch_waits() -> None:
    sink = SlowSink()
    writer = LogWriter("test", sink, Metrics(), batch_size=4, linger=60.0)
    writer.start()
    for n in range(4):
        assert writer.submit({"n": n})
    # With a one-minute linger, only the full batch can have started this write.
    assert await asyncio.to_thread(sink.written.wait, 10)
    assert sink.writes[0].count(b"\n") == 4
    await writer.stop()


async def test_payload_log_samples_and_redacts(
    fake_model: FakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    payloads = tmp_path / "payloads.jsonl"
    config = base_config(fake_model.url)
    config["logging"] = {
        "payload_log": {"path": str(payloads)},
        "redact_fields": ["parameters.customer_id", "inputs[0].name"],
    }
    config["routes"][0]["payload_sample"] = 1.0
    sidecar = await start_sidecar(config)
    body = {
        "inputs": [{"name": "secret-name", "data": [1, 2]}],
        "parameters": {"customer_id": "C-998877", "keep": 1},
    }
    async with sidecar.session.post(
        sidecar.url + "/infer", json=body, headers={"X-Request-ID": "pay-1"}
    ) as resp:
        assert resp.status == 200
    await sidecar.running.stop()
    text = payloads.read_text()
    assert "C-998877" not in text
    assert "secret-name" not in text
    record = orjson.loads(text.splitlines()[0])
    assert record["request_id"] == "pay-1"
    assert record["route"] == "all"
    assert record["request"]["parameters"] == {"customer_id": "[REDACTED]", "keep": 1}
    assert record["response"]["method"] == "POST"


async def test_a_body_nested_deeper_than_orjson_writes_is_logged_as_text(
    fake_model: FakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """orjson reads 1024 levels but writes 254: such a record was dropped (counted as
    if the queue were full), and its request could never be joined to its label."""
    payloads = tmp_path / "payloads.jsonl"
    config = base_config(fake_model.url)
    config["logging"] = {
        "payload_log": {"path": str(payloads)},
        "redact_fields": ["parameters.customer_id"],
    }
    config["routes"][0]["payload_sample"] = 1.0
    sidecar = await start_sidecar(config)
    deep = b"[" * 300 + b"1" + b"]" * 300
    body = b'{"parameters":{"customer_id":"C-998877"},"deep":' + deep + b"}"
    async with sidecar.session.post(
        sidecar.url + "/infer",
        data=body,
        headers={"X-Request-ID": "deep-1", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200
    await sidecar.running.stop()
    text = payloads.read_text()
    assert "C-998877" not in text  # the text is of the redacted body
    (record,) = [orjson.loads(line) for line in text.splitlines()]
    assert record["request_id"] == "deep-1"
    request = record["request"]
    assert request["too_deep"] is True
    assert request["size"] == len(body)
    assert orjson.loads(request["json"]) == {
        "parameters": {"customer_id": "[REDACTED]"},
        "deep": orjson.loads(deep),
    }
    assert record["response"]["method"] == "POST"  # the shallow side as it was
    metrics = sidecar.running.live.current.metrics.render().decode()
    assert log_dropped(metrics, "payload") == 0
    assert metric_value(metrics, "sidecar_log_written_total", log="payload") == 1


def drift_settings(**overrides: Any) -> DriftSettings:
    values: dict[str, Any] = {
        "protocol": "v2",
        "output": "label",
        "baseline": "b.json",
        "min_samples": 100,
        "window": 500,
        "features": [{"name": "petal_length", "field": "inputs[0].data[2]"}],
    }
    values.update(overrides)
    return DriftSettings.model_validate(values)


def iris_pairs(count: int, seed: int, shift: float = 0.0) -> list[tuple[bytes, bytes]]:
    from sidecar.demo.model import production_model, v2_response

    rng = random.Random(seed)
    model = production_model()
    out = []
    for _ in range(count):
        row = iris_row(rng, shift)
        request = {"inputs": [{"data": row}]}
        out.append((orjson.dumps(request), orjson.dumps(v2_response(model, [row]))))
    return out


def test_psi_is_zero_for_equal_distributions_and_grows_with_shift() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert psi([0.5, 0.5], [0.6, 0.4]) < psi([0.5, 0.5], [0.9, 0.1])


def test_histograms_pick_categorical_or_quantile_bins() -> None:
    categorical = Histogram.from_samples([0, 1, 1, 2, 2, 2], bins=10)
    assert categorical.kind == "categorical"
    assert categorical.proportions_of([3, 3]) == (0.0, 0.0, 0.0, 1.0)  # unseen values
    numeric = Histogram.from_samples([i / 10 for i in range(1000)], bins=10)
    assert numeric.kind == "numeric"
    assert len(numeric.points) == 9
    assert all(abs(p - 0.1) < 0.01 for p in numeric.proportions)
    assert Histogram.from_json(numeric.to_json()) == numeric


async def test_drift_detected_once_then_cleared(tmp_path: Path) -> None:
    settings = drift_settings()
    baseline_path = tmp_path / "b.json"
    pairs = [(orjson.loads(a), orjson.loads(b)) for a, b in iris_pairs(3000, seed=1)]
    baseline_path.write_bytes(build_baseline(settings, pairs).to_json("infer"))
    metrics = Metrics()
    monitor = DriftMonitor(
        "infer", settings, baseline_path, metrics, baseline=Baseline.load(baseline_path)
    )

    with capture_logs() as logs:
        for request, response in iris_pairs(500, seed=2):
            monitor.observe(request, response)
        steady = monitor.evaluate()
        assert steady["prediction"] < 0.1
        assert steady["petal_length"] < 0.1
        for round_ in range(3):  # shifted traffic, evaluated three times
            for request, response in iris_pairs(500, seed=10 + round_, shift=2.0):
                monitor.observe(request, response)
            shifted = monitor.evaluate()
            assert shifted["prediction"] > 0.2
            assert shifted["petal_length"] > 0.2
        for request, response in iris_pairs(500, seed=20):
            monitor.observe(request, response)
        recovered = monitor.evaluate()
        assert recovered["prediction"] < 0.1

    detected = [e for e in logs if e["event"] == "drift_detected"]
    cleared = [e for e in logs if e["event"] == "drift_cleared"]
    assert sorted(e["signal"] for e in detected) == ["petal_length", "prediction"]
    assert sorted(e["signal"] for e in cleared) == ["petal_length", "prediction"]
    text = metrics.render().decode()
    assert metric_value(text, "sidecar_prediction_psi", route="infer") == pytest.approx(
        recovered["prediction"]
    )
    assert metric_value(text, "sidecar_feature_psi", route="infer", feature="petal_length") > 0


def test_baseline_frozen_from_first_responses_is_written(tmp_path: Path) -> None:
    settings = drift_settings(freeze_after=300)
    path = tmp_path / "frozen" / "b.json"
    monitor = DriftMonitor("infer", settings, path, Metrics(), baseline=None)
    for request, response in iris_pairs(299, seed=3):
        monitor.observe(request, response)
    assert monitor.evaluate() == {}
    assert not path.exists()
    for request, response in iris_pairs(200, seed=4):
        monitor.observe(request, response)
    monitor.evaluate()
    assert Baseline.load(path).samples == 300
    for request, response in iris_pairs(200, seed=5):
        monitor.observe(request, response)
    assert monitor.evaluate()["prediction"] < 0.1


def test_bundled_demo_baseline_is_current() -> None:
    bundled = Baseline.load(bundled_config_dir() / "baselines" / "iris-infer.json")
    assert bundled.histograms == demo_baseline().histograms


async def test_drift_reaches_the_monitor_through_the_sidecar(
    fake_model: FakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    from aiohttp import web

    from sidecar.demo.model import parse_v2_rows, production_model, v2_response

    async def iris(request: web.Request) -> web.Response:
        rows = parse_v2_rows(await request.json())
        return web.json_response(v2_response(production_model(), rows))

    fake_model.on("/v2/models/iris/infer", iris)
    settings = drift_settings(freeze_after=20, min_samples=20)
    config = base_config(fake_model.url)
    config["routes"][0]["drift"] = settings.model_dump(mode="json") | {
        "baseline": str(tmp_path / "live.json")
    }
    sidecar = await start_sidecar(config)
    monitor = sidecar.running.runtime.paths["all"].drift
    assert monitor is not None
    for request, _ in iris_pairs(20, seed=6):
        async with sidecar.session.post(
            sidecar.url + "/v2/models/iris/infer", data=request
        ) as resp:
            assert resp.status == 200
    monitor.evaluate()
    assert Baseline.load(tmp_path / "live.json").samples == 20


def test_join_labels_accuracy_per_day_and_route(tmp_path: Path) -> None:
    def record(rid: str, day: str, route: str, label: int) -> bytes:
        response = {"outputs": [{"name": "label", "data": [label]}]}
        return orjson.dumps(
            {
                "timestamp": f"{day}T10:00:00.000000Z",
                "request_id": rid,
                "route": route,
                "status": 200,
                "request": {},
                "response": response,
            }
        )

    payloads = tmp_path / "payloads.jsonl"
    payloads.write_bytes(
        b"\n".join(
            [
                record("a", "2026-11-01", "infer", 0),
                record("b", "2026-11-01", "infer", 1),
                record("c", "2026-11-01", "infer", 2),
                record("d", "2026-11-01", "infer", 2),
                record("e", "2026-11-02", "infer", 1),
                record("f", "2026-11-02", "other", 1),
                record("g", "2026-11-02", "other", 1),  # no label arrived for g
            ]
        )
        + b"\n"
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\na,0\nb,1\nc,2\nd,1\ne,0\nf,1\n")
    report = join(
        payloads.read_bytes().splitlines(),
        read_labels(labels),
        PredictionReader.build("v2", "label"),
    )
    assert report.rows() == [
        {"day": "2026-11-01", "route": "infer", "joined": 4, "accuracy": 0.75},
        {"day": "2026-11-02", "route": "infer", "joined": 1, "accuracy": 0.0},
        {"day": "2026-11-02", "route": "other", "joined": 1, "accuracy": 1.0},
    ]
    assert report.unlabelled == 1

    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text('{"request_id": "a", "label": 0.5}\n{"request_id": "b", "label": 1.5}\n')
    regression = join(
        payloads.read_bytes().splitlines(),
        read_labels(jsonl),
        PredictionReader.build("v2", "label"),
    )
    assert regression.regression
    assert regression.rows() == [
        {"day": "2026-11-01", "route": "infer", "joined": 2, "mae": 0.5, "rmse": 0.5}
    ]

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "join-labels",
            "--payloads",
            str(payloads),
            "--labels",
            str(labels),
            "--output",
            "label",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "2026-11-01  infer                   4  0.75" in result.stdout


def test_baseline_command_builds_from_a_payload_log(tmp_path: Path) -> None:
    config = yaml.safe_load((bundled_config_dir() / "demo.yaml").read_text())
    config["logging"]["payload_log"]["path"] = str(tmp_path / "p.jsonl")
    config["routes"][0]["drift"]["baseline"] = str(tmp_path / "base.json")
    config["routes"][0]["drift"]["freeze_after"] = 100
    schema = bundled_config_dir() / config["routes"][0]["validate"]["schema"]
    config["routes"][0]["validate"]["schema"] = str(schema)
    config_path = tmp_path / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config))
    lines = []
    for index, (request, response) in enumerate(iris_pairs(400, seed=8)):
        lines.append(
            orjson.dumps(
                {
                    "timestamp": "2026-11-01T00:00:00Z",
                    "request_id": str(index),
                    "route": "infer",
                    "status": 200,
                    "request": orjson.loads(request),
                    "response": orjson.loads(response),
                }
            )
        )
    (tmp_path / "p.jsonl").write_bytes(b"\n".join(lines))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "baseline",
            "--config",
            str(config_path),
            "--route",
            "infer",
            "--payloads",
            str(tmp_path / "p.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    baseline = Baseline.load(tmp_path / "base.json")
    assert baseline.samples == 400
    assert set(baseline.histograms) == {"prediction", "petal_length", "petal_width"}
    assert load_config(config_path, env={}).config.routes[0].drift is not None


def test_missing_baseline_without_freezing_is_a_config_error(tmp_path: Path) -> None:
    config = base_config("http://127.0.0.1:1")
    config["routes"][0]["drift"] = {"baseline": "nope.json"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="config error") as caught:
        load_plan(path, env={})
    assert caught.value.issues[0].path == "routes[0].drift.baseline"


def log_dropped(text: str, log: str) -> float:
    """Records of one log lost, for every reason."""
    reasons = ("queue_full", "stopped", "unrenderable", "unwritten")
    return sum(
        metric_value(text, "sidecar_log_dropped_total", log=log, reason=reason)
        for reason in reasons
    )


def in_worker_processes(tmp_path: Path, script: str, *argvs: list[str]) -> list[str]:
    """What ``script`` prints, run once per argv as worker processes sharing one
    prometheus-client multiprocess folder (one after the other)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    return [
        subprocess.run(
            [sys.executable, "-c", script, *argv],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        for argv in argvs
    ]


def test_metrics_add_up_across_worker_processes(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from sidecar.telemetry.metrics import Metrics\n"
        "m = Metrics()\n"
        "for _ in range(int(sys.argv[1])):\n"
        "    m.requests.labels('infer', '200', 'ok').inc()\n"
        "m.circuit_state.labels('model').set(int(sys.argv[2]))\n"
        "print(m.render().decode())\n"
    )
    outputs = in_worker_processes(tmp_path, script, ["3", "0"], ["4", "2"])
    # The second process sees both: requests summed, the worst breaker state.
    text = outputs[1]
    assert metric_value(text, "sidecar_requests_total", route="infer", outcome="ok") == 7
    assert metric_value(text, "sidecar_circuit_state", upstream="model") == 2


def test_a_dead_workers_last_states_leave_the_metrics(tmp_path: Path) -> None:
    """A worker that died (and was restarted by the supervisor, which marks it dead)
    kept its last gauges in every render for good: an upstream down or a circuit open
    then, Redis lost then, or the config then in service, long after every live
    worker said otherwise (min and max over dead processes too)."""
    script = (
        "import os, sys\n"
        "from sidecar.telemetry.metrics import Metrics\n"
        "m = Metrics()\n"
        "up = int(sys.argv[1])\n"
        "m.upstream_ready.labels('model').set(up)\n"
        "m.circuit_state.labels('model').set(0 if up else 2)\n"
        "m.shared_state_up.set(up)\n"
        "m.set_config_in_service(sys.argv[3], 'c.yaml')\n"
        "m.set_config_in_service(sys.argv[2], 'c.yaml')\n"
        "print(os.getpid())\n"
        "print(m.render().decode())\n"
    )
    (dead,) = in_worker_processes(tmp_path, script, ["0", "old", "new"])
    _mark_dead(int(dead.split()[0]), str(tmp_path))  # as the supervisor does
    (text,) = in_worker_processes(tmp_path, script, ["1", "new", "old"])
    assert metric_value(text, "sidecar_upstream_ready", upstream="model") == 1
    assert metric_value(text, "sidecar_circuit_state", upstream="model") == 0
    assert metric_value(text, "sidecar_shared_state_up") == 1
    assert metric_value(text, "sidecar_config_info", sha256="old", path="c.yaml") == 0
    assert 'sha256="old"' not in text
    assert metric_value(text, "sidecar_config_info", sha256="new", path="c.yaml") == 1


def test_only_the_configs_in_service_have_a_config_info_series(tmp_path: Path) -> None:
    """Each config ever loaded kept its series (set to 0): reloads of a changing config
    grew the scrape without bound. With workers, a removed series stayed in
    prometheus-client's files at 1, as if still in service."""
    single = Metrics()
    for sha256 in ("a", "b", "c"):
        single.set_config_in_service(sha256, "c.yaml")
    text = single.render().decode()
    assert [line for line in text.splitlines() if line.startswith("sidecar_config_info")] == [
        'sidecar_config_info{path="c.yaml",sha256="c"} 1.0'
    ]

    script = (
        "import sys\n"
        "from sidecar.telemetry.metrics import Metrics\n"
        "m = Metrics()\n"
        "for sha256 in sys.argv[1:]:\n"
        "    m.set_config_in_service(sha256, 'c.yaml')\n"
        "print(m.render().decode())\n"
    )
    outputs = in_worker_processes(tmp_path, script, ["a", "b", "c"], ["d", "c"])
    for text in outputs:
        assert 'sha256="a"' not in text
        assert 'sha256="b"' not in text
        assert 'sha256="d"' not in text
        assert metric_value(text, "sidecar_config_info", sha256="c", path="c.yaml") == 1
        assert text.count("sidecar_config_info{") == 1


def test_log_lines_name_the_current_request_and_its_principal() -> None:
    def log_line(ctx: RequestContext | None, **fields: Any) -> Any:
        CURRENT_REQUEST.set(ctx)
        return add_request_fields(None, "info", {"event": "x", **fields})

    ctx = RequestContext(
        request_id="req-1", sidecar_id="s" * 32, traceparent="-", trace_id="t" * 32
    )
    ctx.principal = "alice"
    # Each call runs in its own context, as each request's task does.
    line = contextvars.copy_context().run(log_line, ctx)
    assert line == {
        "event": "x",
        "request_id": "req-1",
        "sidecar_id": "s" * 32,
        "trace_id": "t" * 32,
        "principal": "alice",
    }
    ctx.principal = None
    assert "principal" not in contextvars.copy_context().run(log_line, ctx)
    assert contextvars.copy_context().run(log_line, None) == {"event": "x"}
    # A field the line sets itself is kept.
    assert contextvars.copy_context().run(log_line, ctx, request_id="own")["request_id"] == "own"


class FailingSink:
    """A full disk or a closed stdout: every write fails until ``fixed``."""

    def __init__(self) -> None:
        self.fixed = threading.Event()
        self.attempts = 0
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.attempts += 1
        if not self.fixed.is_set():
            raise OSError(28, "No space left on device")
        self.lines.extend(data.splitlines())

    def close(self) -> None:
        pass


async def test_a_failing_sink_costs_records_never_the_writer_and_every_loss_is_counted() -> None:
    sink = FailingSink()
    metrics = Metrics()
    writer = LogWriter("test", sink, metrics, linger=0.01, retry_delays=(0.01, 0.01))
    writer.start()
    for index in range(5):
        assert writer.submit({"n": index})
    for _ in range(200):  # bounded: until the batch was tried three times and dropped
        if sink.attempts >= 3 and writer.depth == 0:
            break
        await asyncio.sleep(0.01)
    assert writer.alive  # it survives the failing sink
    assert writer.failing
    assert "No space left on device" in (writer.last_error or "")
    sink.fixed.set()
    assert writer.submit({"n": "after"})
    for _ in range(200):
        if sink.lines:
            break
        await asyncio.sleep(0.01)
    assert [orjson.loads(line)["n"] for line in sink.lines] == ["after"]
    assert not writer.failing
    await writer.stop()
    text = metrics.render().decode()
    assert metric_value(text, "sidecar_log_dropped_total", log="test", reason="unwritten") == 5
    assert metric_value(text, "sidecar_log_written_total", log="test") == 1


async def test_a_rotated_log_whose_file_was_deleted_is_written_again(tmp_path: Path) -> None:
    """An operator deletes the access log (to free space), or its folder goes and comes
    back: the next rotation found no file to move aside, failed, and so did every
    rotation after it: every record was dropped until a restart."""
    folder = tmp_path / "logs"
    path = folder / "access.log"
    metrics = Metrics()
    sink = FileSink(path, max_bytes=300, backups=2)
    writer = LogWriter("test", sink, metrics, linger=0.01, retry_delays=(0.01,))
    writer.start()

    async def written(count: int) -> None:
        for _ in range(300):  # bounded: until the writer has dealt with them
            if writer.depth == 0 and not writer.failing:
                text = metrics.render().decode()
                if metric_value(text, "sidecar_log_written_total", log="test") >= count:
                    return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not written: {writer.last_error}")

    for index in range(10):
        writer.submit({"n": index, "pad": "x" * 100})
        await written(index + 1)
    path.unlink()
    for index in range(10, 20):
        writer.submit({"n": index, "pad": "x" * 100})
        await written(index + 1)
    shutil.rmtree(folder)  # the folder too: made again, as at start
    for index in range(20, 30):
        writer.submit({"n": index, "pad": "x" * 100})
        await written(index + 1)
    await writer.stop()
    assert orjson.loads(path.read_bytes().splitlines()[-1])["n"] == 29
    text = metrics.render().decode()
    assert log_dropped(text, "test") == 0


def test_a_log_file_deleted_or_moved_away_is_opened_again(tmp_path: Path) -> None:
    """Without rotation of its own (max_bytes 0), a log file an operator deletes, or
    an outside logrotate moves away, was still written to: records counted written
    that nobody could read."""
    path = tmp_path / "logs" / "access.log"
    sink = FileSink(path)
    sink.write(b'{"n":1}\n')
    path.unlink()
    sink.write(b'{"n":2}\n')
    assert path.read_bytes() == b'{"n":2}\n'
    path.rename(tmp_path / "logs" / "access.log.1")  # logrotate's move, then no signal
    sink.write(b'{"n":3}\n')
    shutil.rmtree(tmp_path / "logs")
    sink.write(b'{"n":4}\n')
    sink.write(b'{"n":5}\n')
    sink.close()
    assert path.read_bytes() == b'{"n":4}\n{"n":5}\n'


async def test_the_queue_is_bounded_in_bytes_and_what_is_left_at_stop_is_counted() -> None:
    sink = BlockingSink()
    metrics = Metrics()
    writer = LogWriter("test", sink, metrics, queue_size=1000, queue_bytes=10_000)
    writer.start()
    accepted = [writer.submit({"body": "x"}, size=3_000) for _ in range(5)]
    assert accepted == [True, True, True, False, False]  # 9,000 of 10,000 bytes held
    await writer.stop(flush_within=0.2)  # the sink never answers
    sink.release.set()
    text = metrics.render().decode()
    assert metric_value(text, "sidecar_log_dropped_total", log="test", reason="queue_full") == 2
    assert metric_value(text, "sidecar_log_dropped_total", log="test", reason="unwritten") == 3


def test_the_drift_queue_is_bounded_in_bytes_and_keeps_only_numbers(tmp_path: Path) -> None:
    settings = drift_settings(max_pending_bytes="2KiB", freeze_after=1000)
    registry_metrics = Metrics()
    monitor = DriftMonitor("infer", settings, tmp_path / "b.json", registry_metrics, baseline=None)
    pairs = list(iris_pairs(40, seed=5))
    for request, response in pairs:
        monitor.observe(request, response)
    size = len(pairs[0][0]) + len(pairs[0][1])
    kept = 2048 // size
    assert len(monitor._pending) == kept
    text = registry_metrics.render().decode()
    assert (
        metric_value(text, "sidecar_dropped_total", buffer="drift_pending", route="infer")
        == 40 - kept
    )
    monitor.evaluate()
    assert not monitor._pending  # the bodies are gone; the windows hold numbers
    assert all(isinstance(v, float) for window in monitor._windows.values() for v in window)


def test_feature_quality_is_counted_per_problem(tmp_path: Path) -> None:
    settings = drift_settings()
    pairs = [(orjson.loads(a), orjson.loads(b)) for a, b in iris_pairs(500, seed=1)]
    baseline = build_baseline(settings, pairs)
    histogram = baseline.histograms["petal_length"]
    assert histogram.low is not None
    assert histogram.high is not None
    metrics = Metrics()
    monitor = DriftMonitor("infer", settings, tmp_path / "b.json", metrics, baseline=baseline)
    response = orjson.dumps({"outputs": [{"name": "label", "data": [0]}]})

    def request(data: Any) -> bytes:
        return orjson.dumps({"inputs": [{"name": "x", "data": data}]})

    monitor.observe(request([5.0, 3.0, 1.4, 0.2]), response)  # fine
    monitor.observe(request([5.0, 3.0]), response)  # petal_length missing
    monitor.observe(request([5.0, 3.0, None, 0.2]), response)
    monitor.observe(request([5.0, 3.0, "long", 0.2]), response)
    monitor.observe(request([5.0, 3.0, histogram.high + 10, 0.2]), response)
    monitor.evaluate()
    text = metrics.render().decode()
    for problem in ("missing", "null", "not_a_number", "out_of_range"):
        labels = {"route": "infer", "feature": "petal_length", "problem": problem}
        assert metric_value(text, "sidecar_feature_quality_total", **labels) == 1, problem


def test_process_cpu_and_memory_are_exported_by_worker_processes_too(tmp_path: Path) -> None:
    script = (
        "from sidecar.control.health import ProcessMonitor\n"
        "from sidecar.telemetry.metrics import Metrics\n"
        "m = Metrics()\n"
        "sum(i * i for i in range(300000))\n"
        "ProcessMonitor(m).sample()\n"
        "print(m.render().decode())\n"
    )
    outputs = in_worker_processes(tmp_path, script, [], [])
    first = metric_value(outputs[0], "sidecar_process_resident_memory_bytes")
    both = metric_value(outputs[1], "sidecar_process_resident_memory_bytes")
    assert first > 10_000_000  # a Python process holds more than 10 MB
    assert both > first  # the second process sees both (live sum)
    assert metric_value(outputs[1], "sidecar_process_cpu_seconds_total") > 0
