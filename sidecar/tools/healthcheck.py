"""``sidecar healthcheck``: is the sidecar on this machine alive? For a container's
HEALTHCHECK, which must follow the configured port rather than assume one."""

from __future__ import annotations

import http.client

from sidecar.config.schema import ConfigError, load_config

# A wildcard bind is reached on loopback from inside the same container.
_LOCAL = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def check_livez(config_path: str, timeout: float) -> str | None:
    """None when ``/livez`` answers 200 on the configured listener, else the reason."""
    try:
        listen = load_config(config_path).config.listen
    except ConfigError as exc:
        return "; ".join(str(issue) for issue in exc.issues)
    host = _LOCAL.get(listen.host, listen.host)
    connection = http.client.HTTPConnection(host, listen.port, timeout=timeout)
    try:
        connection.request("GET", "/livez")
        status = connection.getresponse().status
    except OSError as exc:
        return f"http://{host}:{listen.port}/livez: {exc.strerror or exc}"
    finally:
        connection.close()
    if status != 200:
        return f"http://{host}:{listen.port}/livez answered {status}"
    return None
