"""Locust scenarios for the sidecar (and whatever model server is behind it).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080            # web UI
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 50 -r 10 -t 1m --tags steady SidecarUser              # one scenario

Tags: ``steady`` (realistic V2 inference), ``mixed`` (valid, schema-invalid,
unauthorised and oversized requests, each expecting its own answer), ``burst``
(quiet, then many at once), ``stream`` (server-sent events). Settings come from the
environment: SIDECAR_API_KEY (default demo-key), SIDECAR_MODEL (default iris).
An answer that is not the one expected (including a 500) counts as a failure, and
``--exit-code-on-error 1`` makes the run fail on any.
"""

from __future__ import annotations

import json
import os
import random

from locust import between, constant, tag, task
from locust.contrib.fasthttp import FastHttpUser

API_KEY = os.environ.get("SIDECAR_API_KEY", "demo-key")
MODEL = os.environ.get("SIDECAR_MODEL", "iris")
INFER = f"/v2/models/{MODEL}/infer"
STREAM = f"/v2/models/{MODEL}/generate_stream"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

# Per-class means and spreads of iris measurements: requests look like real traffic.
_CLASSES = (
    ((5.01, 3.43, 1.46, 0.25), (0.35, 0.38, 0.17, 0.11)),
    ((5.94, 2.77, 4.26, 1.33), (0.52, 0.31, 0.47, 0.20)),
    ((6.59, 2.97, 5.55, 2.03), (0.64, 0.32, 0.55, 0.27)),
)


def iris_body(rows: int = 1) -> str:
    data = []
    for _ in range(rows):
        means, spreads = random.choice(_CLASSES)
        data += [round(max(0.1, random.gauss(m, s)), 1) for m, s in zip(means, spreads)]  # noqa: B905 - equal lengths
    return json.dumps(
        {"inputs": [{"name": "input-0", "shape": [rows, 4], "datatype": "FP32", "data": data}]}
    )


class SidecarUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def _expect(self, name: str, method: str, path: str, expected: int, **kwargs: object) -> None:
        with self.client.request(
            method, path, name=name, catch_response=True, **kwargs
        ) as response:  # type: ignore[arg-type]
            if response.status_code != expected:
                response.failure(f"expected {expected}, got {response.status_code}")
            elif "X-Request-ID" not in response.headers:
                response.failure("no X-Request-ID on the answer")
            else:
                response.success()

    @tag("steady")
    @task(10)
    def infer(self) -> None:
        self._expect(
            "infer",
            "POST",
            INFER,
            200,
            data=iris_body(random.choice((1, 1, 1, 4))),
            headers=HEADERS,
        )

    @tag("mixed")
    @task(3)
    def infer_valid(self) -> None:
        self._expect("mixed: valid", "POST", INFER, 200, data=iris_body(), headers=HEADERS)

    @tag("mixed")
    @task(1)
    def infer_schema_invalid(self) -> None:
        bad = json.dumps(
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "INT8", "data": [1, "two", 3, 4]}
                ]
            }
        )
        self._expect("mixed: schema-invalid", "POST", INFER, 422, data=bad, headers=HEADERS)

    @tag("mixed")
    @task(1)
    def infer_unauthorized(self) -> None:
        self._expect(
            "mixed: unauthorized",
            "POST",
            INFER,
            401,
            data=iris_body(),
            headers={"Content-Type": "application/json"},
        )

    @tag("mixed")
    @task(1)
    def infer_oversized(self) -> None:
        self._expect(
            "mixed: oversized",
            "POST",
            INFER,
            413,
            data="x" * (1024 * 1024 + 64 * 1024),
            headers=HEADERS,
        )

    @tag("stream")
    @task(2)
    def stream(self) -> None:
        with self.client.post(
            STREAM, data="{}", headers=HEADERS, name="stream", catch_response=True
        ) as response:
            text = (response.content or b"").decode("utf-8", "replace")
            events = [line for line in text.split("\n\n") if line.startswith("data:")]
            if response.status_code != 200:
                response.failure(f"expected 200, got {response.status_code}")
            elif not events or events[-1] != "data: [DONE]":
                response.failure("the event stream did not finish with [DONE]")
            else:
                response.success()


class BurstUser(FastHttpUser):
    """Quiet, then a burst of back-to-back requests: what shedding and limits see."""

    wait_time = constant(2.0)

    @tag("burst")
    @task
    def burst(self) -> None:
        for _ in range(20):
            with self.client.post(
                INFER, data=iris_body(), headers=HEADERS, name="burst", catch_response=True
            ) as response:
                # Shed or rate-limited answers are correct behaviour under a burst.
                if response.status_code in (200, 429, 503):
                    response.success()
                else:
                    response.failure(f"unexpected {response.status_code}")
