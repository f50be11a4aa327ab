"""``sidecar init``: a commented starting config for one model server.

The config needs no files and no secrets: one upstream with its readiness probe,
routes for the protocol the server speaks, request ids, timeouts and metrics. It is
checked the way ``run`` checks it before it is written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sidecar.config.plan import load_plan

# The readiness path each kind of server answers once its model is loaded.
DEFAULT_HEALTH_PATHS = {
    "v2": "/v2/health/ready",  # Triton, MLServer, KServe
    "openai": "/health",  # vLLM, llama.cpp server, TGI
    "plain": "/health",  # most FastAPI / Flask model apps; change it to yours
}

_ROUTES = {
    "v2": """\
  - name: infer                  # Open Inference Protocol (V2) inference
    path_prefix: /v2/models
    methods: [POST]
    upstream: model
    timeout: 10s                 # total deadline for an answer to start (504 after)
    retryable: true              # inference is idempotent: retry connect errors and 502/503/504
    validate: {json: true}       # strict JSON before the model sees it (400 otherwise)
  - name: metadata               # server and model metadata, readiness
    path_prefix: /v2
    methods: [GET, HEAD]
    upstream: model
    timeout: 5s
""",
    "openai": """\
  - name: chat                   # chat and text completions, streamed or not
    path_prefix: /v1
    methods: [POST]
    upstream: model
    timeout: 120s                # total deadline for generation to start
  - name: models                 # /v1/models and other reads
    path_prefix: /
    methods: [GET, HEAD]
    upstream: model
    timeout: 10s
""",
    "plain": """\
  - name: all                    # everything goes to the model server
    path_prefix: /
    upstream: model
    timeout: 30s                 # total deadline for an answer to start (504 after)
""",
}

_TEMPLATE = """\
# sidecar config written by `sidecar init` for a {protocol} model server.
# Every key is explained in the sidecar's config/sidecar.example.yaml; check a change
# with `sidecar check-config {name}`, apply it with SIGHUP or a restart.

listen:
  host: 0.0.0.0                  # the address clients (and probes) use
  port: {port}

admin:                           # /health (detail), /metrics and reload: loopback only
  host: 127.0.0.1
  port: 9901

upstreams:
  model:
    url: {upstream}
    connect_timeout: 1s
    health:                      # background readiness probe behind /readyz
      path: {health_path}
      interval: 5s
      timeout: 2s

routes:                          # tried in order; the first matching prefix and method wins
{routes}
logging:
  access_log: {{path: "-"}}      # one JSON line per request on stdout
"""


def starting_config(
    *, upstream: str, protocol: str, port: int = 8080, health_path: str | None = None, name: str
) -> str:
    return _TEMPLATE.format(
        protocol=protocol,
        name=name,
        port=port,
        upstream=upstream,
        health_path=health_path or DEFAULT_HEALTH_PATHS[protocol],
        routes=_ROUTES[protocol],
    )


def write_starting_config(
    out: Path, *, upstream: str, protocol: str, port: int = 8080, health_path: str | None = None
) -> str:
    """Write the config to ``out`` once it loads cleanly; raises ``ConfigError`` (and
    writes nothing) when it does not, e.g. for a URL that is not an origin."""
    text = starting_config(
        upstream=upstream, protocol=protocol, port=port, health_path=health_path, name=out.name
    )
    folder = out.resolve().parent
    handle, staged = tempfile.mkstemp(prefix=".sidecar-init-", suffix=".yaml", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        load_plan(staged, env={})
        os.replace(staged, out)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    return text
