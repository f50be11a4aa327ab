"""Shadow traffic: mirroring that cannot hurt production, comparison, governor, report."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from sidecar.analytics.compare import Comparer, Comparison
from sidecar.config.schema import ShadowCompare, ShadowGovernor
from sidecar.tools.shadow_report import build_report, render_text, wilson_interval
from sidecar.upstream.shadow import Governor
from tests.conftest import (
    LOOPBACK,
    FakeModel,
    MakeFakeModel,
    SidecarHandle,
    StartSidecar,
    base_config,
    closed_port,
    run_cli,
)
from tests.integration.test_endpoints import metric_value


def v2(probabilities: list[float], label: int | None = None) -> dict[str, Any]:
    outputs: list[dict[str, Any]] = [
        {
            "name": "probabilities",
            "shape": [1, len(probabilities)],
            "datatype": "FP32",
            "data": probabilities,
        }
    ]
    if label is not None:
        outputs.append({"name": "label", "shape": [1], "datatype": "INT64", "data": [label]})
    return {"outputs": outputs}


def answering(payload: dict[str, Any]) -> Any:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(payload)

    return answer


def shadow_config(primary: str, shadow: str, tmp_path: Path, **shadow_settings: Any) -> dict:
    config = base_config(primary)
    config["upstreams"]["candidate"] = {"url": shadow, "breaker": {"enabled": False}}
    config["routes"][0]["shadow"] = {
        "upstream": "candidate",
        "fraction": 1.0,
        "timeout": "5s",
        "compare": {
            "protocol": "v2",
            "output": "probabilities",
            "kind": "numeric",
            "classes": 3,
            "abs_tol": 0.01,
            "rel_tol": 0.0,
        },
        "governor": {"enabled": False},
        **shadow_settings,
    }
    config["logging"] = {"shadow_log": {"path": str(tmp_path / "shadow.jsonl")}}
    return config


def governed_config(primary: str, shadow: str, tmp_path: Path, **governor: Any) -> dict:
    """``shadow_config`` with the governor on, evaluated only when a test calls
    ``govern()`` (every 5 samples at the least); ``governor``: its other settings."""
    settings = {"enabled": True, "interval": "1h", "min_samples": 5, **governor}
    return shadow_config(primary, shadow, tmp_path, governor=settings)


def fall_back_to_a_secondary(config: dict[str, Any], secondary_url: str) -> None:
    """Give ``config``'s route one fallback step, the model at ``secondary_url`` (5 s),
    with the primary's breaker and its own off."""
    config["upstreams"]["model"]["breaker"] = {"enabled": False}
    config["upstreams"]["secondary"] = {"url": secondary_url, "breaker": {"enabled": False}}
    config["routes"][0]["fallback"] = {
        "chain": [{"upstream": {"name": "secondary", "timeout": "5s"}}]
    }


async def metrics_text(sidecar: SidecarHandle) -> str:
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        return await resp.text()


async def test_a_mirrored_request_reaches_the_shadow_with_the_same_body_and_id(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    primary, candidate = await make_fake_model(), await make_fake_model()
    primary.on("/infer", answering(v2([0.9, 0.05, 0.05], 0)))
    candidate.on("/infer", answering(v2([0.1, 0.8, 0.1], 1)))
    sidecar = await start_sidecar(shadow_config(primary.url, candidate.url, tmp_path))
    body = b'{"inputs": [{"data": [1, 2, 3, 4]}]}'
    async with sidecar.session.post(
        sidecar.url + "/infer?x=1", data=body, headers={"X-Request-ID": "mirror-1"}
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["outputs"][1]["data"] == [0]  # production's answer
    mirror = sidecar.running.runtime.paths["all"].shadow
    assert mirror is not None
    await asyncio.wait_for(mirror.wait_idle(), 10)
    copy = candidate.hits_for("/infer")[0]
    assert copy.body == body
    assert copy.target == "/infer?x=1"
    assert copy.headers["x-request-id"] == ["mirror-1"]
    assert copy.headers["x-sidecar-shadow"] == ["1"]
    assert "x-sidecar-shadow" not in primary.hits_for("/infer")[0].headers

    await sidecar.running.stop()
    record = orjson.loads((tmp_path / "shadow.jsonl").read_bytes().splitlines()[0])
    assert record["request_id"] == "mirror-1"
    assert (record["primary_status"], record["shadow_status"]) == (200, 200)
    assert record["result"] == "mismatch"
    assert record["agreement"] is False
    assert record["label_agreement"] == 0.0
    assert record["differences"][0] == {"field": "predictions[0]", "primary": 0.9, "shadow": 0.1}
    assert record["primary_ms"] > 0
    assert record["shadow_ms"] > 0


async def settled_metrics(sidecar: SidecarHandle) -> str:
    """The metrics once every shadow copy out has come back and been compared."""
    mirror = sidecar.running.runtime.paths["all"].shadow
    assert mirror is not None
    await asyncio.wait_for(mirror.wait_idle(), 10)
    return await metrics_text(sidecar)


async def with_a_hung_candidate(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> tuple[SidecarHandle, FakeModel, asyncio.Event, dict[str, Any]]:
    """A sidecar mirroring to a candidate that answers only once ``release`` is set
    (two copies out at most); also its config, to reload."""
    primary, candidate = await make_fake_model(), await make_fake_model()
    release = asyncio.Event()
    primary.on("/infer", answering(v2([0.9, 0.05, 0.05])))

    async def hung(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response(v2([0.9, 0.05, 0.05]))

    candidate.on("/infer", hung)
    config = shadow_config(primary.url, candidate.url, tmp_path, max_in_flight=2, timeout="30s")
    return await start_sidecar(config), candidate, release, config


async def test_a_hung_shadow_never_holds_back_primaries_and_busy_copies_are_skipped(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    sidecar, candidate, release, _ = await with_a_hung_candidate(
        make_fake_model, start_sidecar, tmp_path
    )
    order = []
    for index in range(6):
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.status == 200
        order.append(f"primary {index} answered")
    # All six primaries were answered while both shadow copies were still hanging.
    assert len(candidate.hits_for("/infer")) == 2
    assert order == [f"primary {i} answered" for i in range(6)]
    text = await metrics_text(sidecar)
    assert (
        metric_value(text, "sidecar_shadow_requests_total", route="all", outcome="skipped_busy")
        == 4
    )
    assert metric_value(text, "sidecar_shadow_requests_total", route="all", outcome="sent") == 2
    release.set()
    text = await settled_metrics(sidecar)
    assert metric_value(text, "sidecar_shadow_comparisons_total", route="all", result="match") == 2


async def test_a_reload_does_not_let_more_copies_out_than_max_in_flight(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """Each runtime's mirror counted only its own copies: after a reload the fresh
    one let max_in_flight more out while the retired one's still hung, so a few
    quick reloads multiplied what the candidate got (up to its pool's cap)."""
    sidecar, candidate, release, config = await with_a_hung_candidate(
        make_fake_model, start_sidecar, tmp_path
    )
    for index in range(4):
        if index == 2:
            config["routes"][0]["timeout"] = "7s"
            sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
            assert (await sidecar.running.reload())["result"] == "ok"
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.status == 200
    for _ in range(500):  # until the two copies let out reach the candidate (5 s at most)
        if len(candidate.hits_for("/infer")) >= 2:
            break
        await asyncio.sleep(0.01)
    assert len(candidate.hits_for("/infer")) == 2
    text = await metrics_text(sidecar)
    assert (
        metric_value(text, "sidecar_shadow_requests_total", route="all", outcome="skipped_busy")
        == 2
    )
    release.set()


async def test_shadow_failures_and_timeouts_are_counted_not_felt(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    primary = await make_fake_model()
    primary.on("/infer", answering(v2([1.0, 0.0, 0.0])))
    config = shadow_config(primary.url, f"http://{LOOPBACK}:{closed_port()}", tmp_path)
    sidecar = await start_sidecar(config)
    for _ in range(3):
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.status == 200
    text = await settled_metrics(sidecar)
    assert metric_value(text, "sidecar_shadow_requests_total", route="all", outcome="error") == 3
    assert metric_value(text, "sidecar_shadow_comparisons_total", route="all", result="error") == 3


async def test_the_governor_backs_off_on_failures_and_recovers(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    primary, candidate = await make_fake_model(), await make_fake_model()
    primary.on("/infer", answering(v2([1.0, 0.0, 0.0])))
    healthy = {"value": False}

    async def flaky(request: web.Request) -> web.StreamResponse:
        if not healthy["value"]:
            return web.json_response({"error": "candidate crashed"}, status=500)
        return web.json_response(v2([1.0, 0.0, 0.0]))

    candidate.on("/infer", flaky)
    config = governed_config(
        primary.url,
        candidate.url,
        tmp_path,
        backoff_factor=0.5,
        recover_step=0.25,
        # Only the candidate's failures may move the fraction here: real requests'
        # latencies on a busy machine differ by more than the default 5 ms, and a
        # "primary slower while shadowing" window backed off once in a test run.
        min_latency_increase="60s",
    )
    sidecar = await start_sidecar(config)
    mirror = sidecar.running.runtime.paths["all"].shadow
    assert mirror is not None

    async def traffic(count: int) -> None:
        for index in range(count):
            async with sidecar.session.post(
                sidecar.url + "/infer", data=b"{}", headers={"X-Request-ID": f"g-{index}"}
            ) as resp:
                assert resp.status == 200
        await asyncio.wait_for(mirror.wait_idle(), 10)

    await traffic(10)
    assert mirror.govern() == 0.5
    healthy["value"] = True
    fractions = []
    for _ in range(3):
        await traffic(40)
        fractions.append(mirror.govern())
    assert fractions == [0.75, 1.0, 1.0]
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_shadow_fraction", route="all") == 1.0


@pytest.mark.parametrize(
    ("change", "fraction", "references_kept"),
    [
        ("elsewhere", 0.5, True),
        ("primary url", 0.5, False),
        ("shadow timeout", 1.0, False),
        ("candidate url", 1.0, False),
        ("candidate headers", 1.0, False),
    ],
)
async def test_a_reload_keeps_the_governors_backing_off_unless_the_shadow_changed(
    make_fake_model: MakeFakeModel,
    start_sidecar: StartSidecar,
    tmp_path: Path,
    change: str,
    fraction: float,
    references_kept: bool,
) -> None:
    """Each reload built a fresh governor: a candidate backed off to half for failing
    got its whole fraction again, and the primary's reference latency was measured
    anew, because of a reload that changed something else. The governor carries on
    unless the shadow block or the candidate changed; after another primary, its
    fraction does, not its references (they were the other model's)."""
    primary, other_primary, candidate, other_candidate = [await make_fake_model() for _ in range(4)]
    for model in (primary, other_primary):
        model.on("/infer", answering(v2([1.0, 0.0, 0.0])))

    async def crashing(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": "candidate crashed"}, status=500)

    for model in (candidate, other_candidate):
        model.on("/infer", crashing)
    config = governed_config(
        primary.url,
        candidate.url,
        tmp_path,
        recover_step=1.0,
        min_latency_increase="60s",  # only the candidate's failures count here
    )
    sidecar = await start_sidecar(config)
    before = sidecar.running.runtime.paths["all"].shadow
    assert before is not None

    async def traffic(count: int) -> None:
        for _ in range(count):
            async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
                assert resp.status == 200
        mirror = sidecar.running.runtime.paths["all"].shadow
        assert mirror is not None
        await asyncio.wait_for(mirror.wait_idle(), 10)

    before.governor.fraction = 0.0  # unmirrored first: the primary's reference
    await traffic(5)
    assert before.govern() == 1.0
    assert before.governor.reference_latency is not None
    await traffic(5)  # all mirrored, and the candidate fails them all
    assert before.govern() == 0.5

    config["routes"][0]["timeout"] = "7s"  # a change elsewhere in the route
    if change == "primary url":
        config["upstreams"]["model"]["url"] = other_primary.url
    elif change == "shadow timeout":
        config["routes"][0]["shadow"]["timeout"] = "4s"
    elif change == "candidate url":
        config["upstreams"]["candidate"]["url"] = other_candidate.url
    elif change == "candidate headers":
        config["upstreams"]["candidate"]["headers"] = {"X-Model-Version": "2"}
    sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
    assert (await sidecar.running.reload())["result"] == "ok"
    after = sidecar.running.runtime.paths["all"].shadow
    assert after is not None
    assert after is not before
    assert after.governor.fraction == fraction
    assert (after.governor.reference_latency is not None) == references_kept
    # Governed from the mirror in service (a carried governor from the swap on): a
    # backed-off fraction that nothing evaluated would never recover.
    assert len(after._governing) == 1
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_shadow_fraction", route="all") == fraction


def test_the_governor_backs_off_when_mirrored_primaries_get_slower() -> None:
    governor = Governor(
        1.0, ShadowGovernor(min_samples=5, max_latency_increase=0.25, min_latency_increase="5ms")
    )
    for _ in range(10):
        governor.record_primary(0.020, error=False, mirrored=False)
        governor.record_shadow(failed=False)
    assert governor.evaluate() == (1.0, "healthy")
    for _ in range(10):
        governor.record_primary(0.030, error=False, mirrored=True)  # 50% slower than 20 ms
    assert governor.evaluate() == (0.5, "primary slower while shadowing")
    for _ in range(10):
        governor.record_primary(0.020, error=True, mirrored=True)
    assert governor.evaluate() == (0.25, "primary failing more while shadowing")


@pytest.mark.parametrize(
    ("settings", "primary", "shadow", "result", "reason"),
    [
        ({}, v2([0.5, 0.3, 0.2]), v2([0.5, 0.3, 0.2]), "match", None),
        ({"abs_tol": 0.01}, v2([0.5, 0.3, 0.2]), v2([0.505, 0.295, 0.2]), "match", None),
        ({"abs_tol": 0.001}, v2([0.5, 0.3, 0.2]), v2([0.505, 0.295, 0.2]), "mismatch", "numeric"),
        ({"rel_tol": 0.02, "abs_tol": 0.0}, v2([100.0]), v2([101.5]), "match", None),
        (
            {"kind": "label", "classes": 3},
            v2([0.5, 0.3, 0.2]),
            v2([0.4, 0.35, 0.25]),
            "match",
            None,
        ),
        (
            {"kind": "label", "classes": 3},
            v2([0.5, 0.3, 0.2]),
            v2([0.3, 0.5, 0.2]),
            "mismatch",
            "label",
        ),
        ({"kind": "label", "output": "label"}, v2([0.5], 2), v2([0.4], 2), "match", None),
        (
            {"protocol": "openai", "kind": "embedding", "min_cosine": 0.99},
            {"data": [{"embedding": [1.0, 0.0, 0.0]}]},
            {"data": [{"embedding": [0.99, 0.05, 0.0]}]},
            "match",
            None,
        ),
        (
            {"protocol": "openai", "kind": "embedding", "min_cosine": 0.99},
            {"data": [{"embedding": [1.0, 0.0]}]},
            {"data": [{"embedding": [0.0, 1.0]}]},
            "mismatch",
            "cosine",
        ),
        (
            {"protocol": "v1"},
            {"predictions": [1, 2]},
            {"predictions": [1, 2, 3]},
            "mismatch",
            "shape",
        ),
        (
            {"protocol": "json_path", "json_path": "result.score"},
            {"result": {"score": 0.7}},
            {"result": {"score": 0.7}},
            "match",
            None,
        ),
    ],
)
def test_known_pairs(
    settings: dict[str, Any], primary: Any, shadow: Any, result: str, reason: str | None
) -> None:
    values = {"protocol": "v2", "output": "probabilities", "abs_tol": 0.0, "rel_tol": 0.0}
    values.update(settings)
    comparer = Comparer(ShadowCompare.model_validate(values))
    comparison = comparer.compare(200, orjson.dumps(primary), 200, orjson.dumps(shadow))
    assert (comparison.result, comparison.reason) == (result, reason)


def test_status_stream_and_unreadable_answers() -> None:
    comparer = Comparer(ShadowCompare())
    assert comparer.compare(200, b"{}", 503, b"{}").differences == [
        {"field": "status", "primary": 200, "shadow": 503}
    ]
    same = comparer.compare(200, b"data: a\n\n", 200, b"data: a\n\n", streamed=True)
    assert same.result == "match"
    differ = comparer.compare(200, b"data: abc\n\n", 200, b"data: abd\n\n", streamed=True)
    assert differ.result == "mismatch"
    assert differ.differences[0]["field"] == "stream[8]"
    assert comparer.compare(200, b"not json", 200, b"also not").result == "error"


async def test_streams_are_compared_whole_and_big_ones_skipped(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    primary, candidate = await make_fake_model(), await make_fake_model()

    def sse(events: list[bytes]) -> Any:
        async def stream(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in events:
                await response.write(b"data: " + event + b"\n\n")
            await response.write_eof()
            return response

        return stream

    primary.on("/small", sse([b"a", b"b"]))
    candidate.on("/small", sse([b"a", b"b"]))
    primary.on("/big", sse([b"x" * 1000] * 3))
    candidate.on("/big", sse([b"x" * 1000] * 3))
    config = shadow_config(primary.url, candidate.url, tmp_path)
    config["routes"][0]["shadow"]["compare"]["max_body_size"] = "2KiB"
    sidecar = await start_sidecar(config)
    for path in ("/small", "/big"):
        async with sidecar.session.post(sidecar.url + path, data=b"{}") as resp:
            assert resp.status == 200
            await resp.read()
    text = await settled_metrics(sidecar)
    assert metric_value(text, "sidecar_shadow_comparisons_total", route="all", result="match") == 1
    assert (
        metric_value(
            text, "sidecar_shadow_requests_total", route="all", outcome="skipped_too_large"
        )
        == 1
    )


async def test_openai_streams_of_the_same_words_match_whatever_their_ids(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """vLLM, llama.cpp and TGI give every streamed answer an id of its own, in each
    chunk, and its time: two streams of the same words never had the same bytes, so
    every mirrored LLM stream counted as a mismatch (the answers read whole already
    leave these fields out)."""
    primary, candidate = await make_fake_model(), await make_fake_model()
    answers = iter(range(100))

    def chat(words: list[str]) -> Any:
        async def stream(request: web.Request) -> web.StreamResponse:
            await request.read()
            number = next(answers)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for word in words:
                chunk = {
                    "id": f"chatcmpl-{number}",
                    "object": "chat.completion.chunk",
                    "created": 1700000000 + number,
                    "model": "llm",
                    "system_fingerprint": f"fp-{number}",
                    "choices": [{"index": 0, "delta": {"content": word}}],
                }
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

        return stream

    primary.on("/v1/same", chat(["iris ", "is ", "setosa"]))
    candidate.on("/v1/same", chat(["iris ", "is ", "setosa"]))
    primary.on("/v1/other", chat(["iris ", "is ", "setosa"]))
    candidate.on("/v1/other", chat(["iris ", "is ", "virginica"]))
    compare = {"protocol": "openai", "kind": "numeric"}
    config = shadow_config(primary.url, candidate.url, tmp_path, compare=compare)
    sidecar = await start_sidecar(config)
    for path in ("/v1/same", "/v1/other"):
        async with sidecar.session.post(sidecar.url + path, data=b"{}") as resp:
            assert resp.status == 200
            await resp.read()
    text = await settled_metrics(sidecar)
    assert metric_value(text, "sidecar_shadow_comparisons_total", route="all", result="match") == 1
    assert (
        metric_value(text, "sidecar_shadow_comparisons_total", route="all", result="mismatch") == 1
    )
    await sidecar.running.stop()  # the comparison log written out
    lines = (tmp_path / "shadow.jsonl").read_bytes().splitlines()
    (mismatch,) = [r for r in map(orjson.loads, lines) if r["result"] == "mismatch"]
    assert "virginica" in mismatch["differences"][0]["shadow"]  # the words, not the ids


async def test_a_primary_stream_cut_short_is_not_counted_as_a_disagreement(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """When the primary's stream breaks off after bytes reached the client, what was
    captured is a fragment: comparing it with the candidate's whole answer would count
    the model's outage as the candidate disagreeing."""
    primary, candidate = await make_fake_model(), await make_fake_model()

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: a\n\n")
        assert request.transport is not None
        request.transport.close()
        return response

    async def whole(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: a\n\ndata: b\n\n")
        await response.write_eof()
        return response

    primary.on("/stream", cut)
    candidate.on("/stream", whole)
    sidecar = await start_sidecar(shadow_config(primary.url, candidate.url, tmp_path))
    with contextlib.suppress(aiohttp.ClientPayloadError):
        async with sidecar.session.post(sidecar.url + "/stream", data=b"{}") as resp:
            assert resp.status == 200
            await resp.read()
    text = await settled_metrics(sidecar)
    assert (
        metric_value(text, "sidecar_shadow_comparisons_total", route="all", result="mismatch") == 0
    )
    # Not the candidate's failure either: nothing whole of the primary's to compare.
    assert metric_value(text, "sidecar_shadow_comparisons_total", route="all", result="error") == 0
    assert (
        metric_value(text, "sidecar_shadow_comparisons_total", route="all", result="skipped") == 1
    )


async def test_a_candidate_answer_nested_a_thousand_deep_is_an_error_not_a_crash(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path, capfd: Any
) -> None:
    """orjson reads JSON nested up to 1024 levels; reading the predictions out of such
    an answer must not fail the comparison task (an uncaught RecursionError: nothing
    counted, nothing in the comparison log, a traceback in the sidecar's log)."""
    primary, candidate = await make_fake_model(), await make_fake_model()
    primary.on("/infer", answering(v2([0.9, 0.05, 0.05])))
    deep = b"[" * 1000 + b"0.5" + b"]" * 1000

    async def nested(request: web.Request) -> web.Response:
        await request.read()
        body = b'{"outputs": [{"name": "probabilities", "data": ' + deep + b"}]}"
        return web.Response(body=body, content_type="application/json")

    candidate.on("/infer", nested)
    sidecar = await start_sidecar(shadow_config(primary.url, candidate.url, tmp_path))
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 200
    text = await settled_metrics(sidecar)
    compared = sum(
        metric_value(text, "sidecar_shadow_comparisons_total", route="all", result=result)
        for result in ("match", "mismatch", "error")
    )
    assert compared == 1
    assert "background_task_failed" not in capfd.readouterr().out


async def test_a_large_candidate_answer_is_compared_off_the_event_loop(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """The comparison reads every prediction number in Python: run on the event loop,
    one mirrored request with a large candidate answer (here 2.4 MB of numbers) held
    up every primary request for 100-180 ms. Large answers are compared in a thread,
    small ones on the loop (a thread hand-off costs more than they do)."""
    primary, candidate = await make_fake_model(), await make_fake_model()
    primary.on("/infer", answering(v2([0.9, 0.05, 0.05])))
    numbers = orjson.dumps(v2([0.25] * 300_000))

    async def large(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=numbers, content_type="application/json")

    candidate.on("/large", large)
    candidate.on("/small", answering(v2([0.9, 0.05, 0.05])))
    primary.on("/large", answering(v2([0.9, 0.05, 0.05])))
    primary.on("/small", answering(v2([0.9, 0.05, 0.05])))
    config = shadow_config(primary.url, candidate.url, tmp_path)
    config["routes"][0]["shadow"]["compare"]["max_body_size"] = "8MiB"
    sidecar = await start_sidecar(config)
    mirror = sidecar.running.runtime.paths["all"].shadow
    assert mirror is not None
    comparer = mirror._comparer
    compared_on: list[tuple[int, str]] = []  # (thread, result), in order
    compare = comparer.compare

    def recording(*args: Any, **kwargs: Any) -> Comparison:
        result = compare(*args, **kwargs)
        compared_on.append((threading.get_ident(), result.result))
        return result

    comparer.compare = recording  # type: ignore[method-assign]
    for path in ("/small", "/large", "/small", "/large"):
        async with sidecar.session.post(sidecar.url + path, data=b"{}") as resp:
            assert resp.status == 200
        await asyncio.wait_for(mirror.wait_idle(), 30)
    loop_thread = threading.get_ident()
    assert [(thread == loop_thread, result) for thread, result in compared_on] == [
        (True, "match"),
        (False, "mismatch"),
        (True, "match"),
        (False, "mismatch"),
    ]


async def test_compressed_answers_are_compared_by_what_they_hold(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """Clients such as requests and the openai package send Accept-Encoding: gzip, and
    the copy carries it: both models may then answer gzip-encoded, each with bytes of
    its own. The comparison reads what they hold, not the compressed bytes."""
    import gzip

    primary, candidate = await make_fake_model(), await make_fake_model()

    def compressed(payload: dict[str, Any], level: int) -> Any:
        async def answer(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(
                body=gzip.compress(orjson.dumps(payload), compresslevel=level),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )

        return answer

    primary.on("/infer", compressed(v2([0.9, 0.05, 0.05]), 9))
    candidate.on("/infer", compressed(v2([0.9, 0.05, 0.05]), 1))
    sidecar = await start_sidecar(shadow_config(primary.url, candidate.url, tmp_path))
    headers = {"Accept-Encoding": "gzip"}
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}", headers=headers) as resp:
        assert resp.status == 200
    text = await settled_metrics(sidecar)
    assert metric_value(text, "sidecar_shadow_comparisons_total", route="all", result="match") == 1
    # Inflated only up to the comparison's size limit (no gzip bomb), and only codings
    # zlib knows; others are compared as they are.
    from sidecar.upstream.shadow import decoded

    assert decoded(gzip.compress(b"x" * 10_000), b"GZIP", 10_000) == b"x" * 10_000
    assert decoded(gzip.compress(b"x" * 10_000), b"gzip", 9_999) is None
    assert decoded(zlib.compress(b"{}"), b"deflate", 100) == b"{}"
    assert decoded(b"not gzip", b"gzip", 100) is None
    assert decoded(gzip.compress(b"{}")[:-4], b"gzip", 100) is None  # cut short
    assert decoded(b"\x00br", b"br", 100) == b"\x00br"
    assert decoded(b"{}", None, 100) == b"{}"


@pytest.mark.parametrize("padding", [0, 300 * 1024])
async def test_binary_v2_answers_are_compared_by_their_tensors(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path, padding: int
) -> None:
    """tritonclient asks for binary outputs by default: each comparison of such
    answers was an error ("an answer is not JSON") unless the bytes were the same.
    ``padding``: a second output that makes the answer one relayed as it comes (past
    256 KiB), whose head length the comparison was not given."""
    import struct

    primary, candidate = await make_fake_model(), await make_fake_model()

    def binary(probabilities: list[float]) -> Any:
        raw = struct.pack(f"<{len(probabilities)}f", *probabilities)
        tensor = {"name": "probabilities", "datatype": "FP32", "shape": [1, len(probabilities)]}
        outputs = [tensor | {"parameters": {"binary_data_size": len(raw)}}]
        if padding:
            pad = {"name": "pad", "datatype": "UINT8", "shape": [padding]}
            outputs.append(pad | {"parameters": {"binary_data_size": padding}})
            raw += bytes(padding)
        head = orjson.dumps({"outputs": outputs})

        async def answer(request: web.Request) -> web.Response:
            await request.read()
            length = {"Inference-Header-Content-Length": str(len(head))}
            return web.Response(body=head + raw, headers=length)

        return answer

    primary.on("/infer", binary([0.9, 0.05, 0.05]))
    candidate.on("/infer", binary([0.895, 0.055, 0.05]))  # within abs_tol 0.01
    candidate.on("/far", binary([0.1, 0.8, 0.1]))
    primary.on("/far", binary([0.9, 0.05, 0.05]))
    sidecar = await start_sidecar(shadow_config(primary.url, candidate.url, tmp_path))
    for path in ("/infer", "/far"):
        async with sidecar.session.post(sidecar.url + path, data=b"{}") as resp:
            assert resp.status == 200
    text = await settled_metrics(sidecar)
    for result, count in (("match", 1), ("mismatch", 1), ("error", 0)):
        assert (
            metric_value(text, "sidecar_shadow_comparisons_total", route="all", result=result)
            == count
        ), result


async def test_rejected_requests_are_not_mirrored(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    primary, candidate = await make_fake_model(), await make_fake_model()
    config = shadow_config(primary.url, candidate.url, tmp_path)
    config["server"]["max_body_size"] = "10B"
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"x" * 100) as resp:
        assert resp.status == 413
    assert candidate.hits == []


def _log_line(result: str, delta: float | None = None, **extra: Any) -> bytes:
    record: dict[str, Any] = {"request_id": f"r-{result}-{delta}", "result": result, **extra}
    if delta is not None:
        record["latency_delta_ms"] = delta
    return orjson.dumps(record)


def test_report_on_a_fixed_log(tmp_path: Path) -> None:
    lines = [_log_line("match", float(d), max_abs_diff=0.001) for d in range(1, 9)]
    lines += [
        _log_line(
            "mismatch",
            20.0,
            max_abs_diff=0.4,
            differences=[
                {"field": "predictions[1]", "primary": 0.1, "shadow": 0.5},
                {"field": "predictions[2]", "primary": 0.1, "shadow": 0.3},
            ],
        ),
        _log_line(
            "mismatch",
            30.0,
            max_abs_diff=0.2,
            differences=[{"field": "predictions[1]", "primary": 0.2, "shadow": 0.4}],
        ),
        _log_line("error"),
        _log_line("skipped"),
    ]
    log = tmp_path / "shadow.jsonl"
    log.write_bytes(b"\n".join(lines) + b"\n")
    summary = build_report(log.read_bytes().splitlines()).summary()
    assert (summary["compared"], summary["matches"], summary["mismatches"]) == (10, 8, 2)
    assert (summary["errors"], summary["skipped"]) == (1, 1)
    assert summary["agreement"] == 0.8
    low, high = wilson_interval(8, 10)
    assert summary["agreement_95ci"] == [round(low, 4), round(high, 4)]
    assert summary["latency_delta_ms"] == {"p50": 5.0, "p95": 30.0, "p99": 30.0}
    assert summary["fields_differing_most"] == [("predictions[*]", 3)]

    out = tmp_path / "report.html"
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "shadow-report", str(log), "--html", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == render_text(build_report(log.read_bytes().splitlines()))
    assert "agreement: 80.00% (95% CI 49.02% .. 94.33%), 8 match, 2 mismatch" in result.stdout
    assert "latency delta (shadow - primary) ms: p50 5.0  p95 30.0  p99 30.0" in result.stdout
    page = out.read_text()
    assert page.count("<svg") == 2
    assert "http" not in page.replace("http://", "")  # nothing fetched from elsewhere


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"[1, 2]", "line 2: not a JSON object"),
        (b'{"result": "mismatch", "differences": 5}', None),
        (b'{"result": "mismatch", "differences": [1, {"field": "x"}]}', None),
        (b"{bad", "line 2: not JSON"),
    ],
)
def test_a_shadow_log_line_of_another_shape_is_named_not_a_traceback(
    tmp_path: Path, line: bytes, problem: str | None
) -> None:
    # A record that is not an object, or differences that are not a list of
    # objects, ended the command with a Python traceback.
    log = tmp_path / "shadow.jsonl"
    log.write_bytes(_log_line("match") + b"\n" + line + b"\n")
    result = run_cli("shadow-report", str(log))
    assert "Traceback" not in result.stderr
    if problem is None:  # the parts it can read are reported
        assert result.returncode == 0, result.stderr
        assert "2 records, 2 compared" in result.stdout
    else:
        assert result.returncode == 1
        assert result.stderr.startswith(f"sidecar shadow-report: {log}: {problem}")
        assert len(result.stderr.splitlines()) == 1


def test_the_html_report_takes_deltas_whose_range_overflows_a_float(tmp_path: Path) -> None:
    # max - min of 1e308 and -1e308 is infinity: the histogram's bin width was
    # infinite and the page's rendering ended in a traceback.
    log = tmp_path / "shadow.jsonl"
    log.write_bytes(
        b"\n".join(_log_line("match", d, max_abs_diff=abs(d)) for d in (-1e308, 0.0, 1e308))
    )
    out = tmp_path / "report.html"
    result = run_cli("shadow-report", str(log), "--html", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text().count("<svg") == 2


def test_wilson_interval_bounds() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high
    assert wilson_interval(100, 100)[1] == 1.0


def test_embedding_shadows_compare_vectors_not_encodings() -> None:
    """The openai client asks for base64 by default: a shadow of the same model must
    agree, vector by vector, however each side encoded its floats."""
    import array
    import base64

    from sidecar.analytics.compare import Comparer
    from sidecar.config.schema import ShadowCompare

    vectors = [[0.1, 0.2, 0.3], [0.9, -0.1, 0.0]]

    def answer(encoding: str, vectors: list[list[float]], ident: str) -> bytes:
        data = []
        for index, vector in enumerate(vectors):
            if encoding == "base64":
                encoded: Any = base64.b64encode(array.array("f", vector).tobytes()).decode()
            else:
                encoded = vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        return orjson.dumps({"object": "list", "id": ident, "created": 1, "data": data})

    comparer = Comparer(ShadowCompare(protocol="openai", kind="embedding", min_cosine=0.999))
    same = comparer.compare(200, answer("base64", vectors, "a"), 200, answer("float", vectors, "b"))
    assert same.result == "match", same
    assert same.cosine == pytest.approx(1.0, abs=1e-6)
    turned = [vectors[0], [-0.9, 0.1, 0.0]]  # the second vector points the other way
    differs = comparer.compare(
        200, answer("base64", vectors, "a"), 200, answer("base64", turned, "c")
    )
    assert differs.result == "mismatch"
    assert [d["field"] for d in differs.differences] == ["data[1].embedding.cosine"]


async def test_the_governor_judges_the_primary_model_not_the_fallback_that_answered(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """A request the fallback answered reached the governor as the primary's: with the
    secondary model's time as the primary's latency, and the fallback's 200 as the
    primary's success. One slow fallback answer among ten mirrored requests made the
    primary "slower while shadowing" and backed the fraction off for nothing; a
    primary failing half of them, stood in for by a quick fallback, looked healthy."""
    primary, candidate, secondary = [await make_fake_model() for _ in range(3)]

    async def primary_model(request: web.Request) -> web.Response:
        if (await request.json()).get("fail"):
            return web.json_response({"error": "down"}, status=503)
        return web.json_response(v2([1.0, 0.0, 0.0]))

    async def secondary_model(request: web.Request) -> web.Response:
        if (await request.json()).get("slow"):
            await asyncio.sleep(1.0)
        return web.json_response(v2([1.0, 0.0, 0.0]))

    primary.on("/infer", primary_model)
    candidate.on("/infer", answering(v2([1.0, 0.0, 0.0])))
    secondary.on("/infer", secondary_model)
    config = governed_config(
        primary.url,
        candidate.url,
        tmp_path,
        min_latency_increase="50ms",
        max_error_rate_increase=0.2,
        recover_step=1.0,
    )
    fall_back_to_a_secondary(config, secondary.url)
    sidecar = await start_sidecar(config)
    mirror = sidecar.running.runtime.paths["all"].shadow
    assert mirror is not None

    async def traffic(*payloads: dict[str, bool]) -> None:
        for payload in payloads:
            async with sidecar.session.post(sidecar.url + "/infer", json=payload) as resp:
                assert resp.status == 200
                assert ("X-Sidecar-Fallback" in resp.headers) == bool(payload)
        await asyncio.wait_for(mirror.wait_idle(), 10)

    mirror.governor.fraction = 0.0  # unmirrored first: the primary's reference
    await traffic(*[{}] * 10)
    assert mirror.govern() == 1.0  # healthy: back to the whole configured fraction
    await traffic(*[{}] * 9, {"fail": True, "slow": True})  # 10% failed, within 20
    assert mirror.govern() == 1.0
    await traffic(*[{}] * 5, *[{"fail": True}] * 5)  # 50% failed
    assert mirror.govern() == 0.5
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_shadow_fraction", route="all") == 0.5


async def test_the_comparison_log_gives_no_primary_time_when_the_primary_gave_no_answer(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """The comparison log's primary_ms was the secondary model's time when the
    fallback answered for the primary (and 0 when nothing answered): a primary that
    failed at once showed as taking the secondary's 300 ms. The model's own answer, a
    503 too, keeps its time."""
    primary, candidate, secondary = [await make_fake_model() for _ in range(3)]

    async def secondary_model(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.3)
        return web.json_response(v2([1.0, 0.0, 0.0]))

    primary.on("/infer", status_handler_503)
    candidate.on("/infer", answering(v2([1.0, 0.0, 0.0])))
    secondary.on("/infer", secondary_model)
    config = shadow_config(primary.url, candidate.url, tmp_path)
    fall_back_to_a_secondary(config, secondary.url)
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(
        sidecar.url + "/infer", data=b"{}", headers={"X-Request-ID": "by-fallback"}
    ) as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "secondary"
    secondary.on("/infer", status_handler_503)  # now nothing answers: the model's 503
    async with sidecar.session.post(
        sidecar.url + "/infer", data=b"{}", headers={"X-Request-ID": "unanswered"}
    ) as resp:
        assert resp.status == 503
    await primary.server.close()  # and now no model answers at all: our 502
    async with sidecar.session.post(
        sidecar.url + "/infer", data=b"{}", headers={"X-Request-ID": "no-model"}
    ) as resp:
        assert (resp.status, (await resp.json())["error"]["type"]) == (502, "upstream_error")
    await settled_metrics(sidecar)
    await sidecar.running.stop()
    records = {
        record["request_id"]: record
        for record in map(orjson.loads, (tmp_path / "shadow.jsonl").read_bytes().splitlines())
    }
    fallback, unanswered, no_model = (
        records["by-fallback"],
        records["unanswered"],
        records["no-model"],
    )
    assert (fallback["primary_status"], fallback["reason"]) == (
        200,
        "primary answered by fallback",
    )
    assert fallback["primary_ms"] is None
    assert fallback["shadow_ms"] > 0
    assert unanswered["primary_status"] == 503  # the model's own 503, relayed
    assert unanswered["primary_ms"] > 0
    assert (no_model["primary_status"], no_model["reason"]) == (None, "primary failed")
    assert no_model["primary_ms"] is None  # was 0


async def test_a_primary_the_fallback_answered_for_is_a_skipped_comparison_not_an_error(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """With the primary down and the fallback answering, every mirrored request was
    counted as a comparison ``error``: read on the dashboard (the agreement share) as
    the candidate failing, while the candidate answered every one. It is ``skipped``,
    with the reason in the comparison log, and left out of the agreement share."""
    primary, candidate = await make_fake_model(), await make_fake_model()
    primary.on("/infer", status_handler_503)
    candidate.on("/infer", answering(v2([1.0, 0.0, 0.0])))
    config = shadow_config(primary.url, candidate.url, tmp_path)
    config["upstreams"]["model"]["breaker"] = {"enabled": False}
    config["routes"][0]["fallback"] = {
        "chain": [{"static": {"name": "default-answer", "body": v2([0.0, 1.0, 0.0])}}]
    }
    sidecar = await start_sidecar(config)
    for _ in range(3):
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.headers["X-Sidecar-Fallback"] == "default-answer"
    text = await settled_metrics(sidecar)
    assert metric_value(text, "sidecar_shadow_comparisons_total", route="all", result="error") == 0
    assert (
        metric_value(text, "sidecar_shadow_comparisons_total", route="all", result="skipped") == 3
    )
    await sidecar.running.stop()
    records = [orjson.loads(line) for line in (tmp_path / "shadow.jsonl").read_bytes().splitlines()]
    assert [(r["result"], r["reason"]) for r in records] == [
        ("skipped", "primary answered by fallback")
    ] * 3
    assert build_report(orjson.dumps(r) for r in records).errors == 0


async def status_handler_503(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"error": "down"}, status=503)
