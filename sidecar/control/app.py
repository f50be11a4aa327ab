"""What each listener serves.

The main listener runs the request pipeline (``sidecar.pipeline.stages``) on the
sidecar's own HTTP server; the operator's listener (admin: health detail, metrics,
reload) is a handful of endpoints on a second server of the same kind.
"""

from __future__ import annotations

import asyncio

import structlog

from sidecar.control import admin
from sidecar.control.runtime import Runtime
from sidecar.http import errors
from sidecar.http.messages import Answer, Response
from sidecar.http.server import ClientGone, Request, RequestRefused
from sidecar.pipeline.identity import accept_request_id, new_request_id
from sidecar.pipeline.stages import OwnHandler, Pipeline

log = structlog.get_logger("sidecar.control.app")


def own_endpoints(runtime: Runtime) -> dict[str, tuple[str, OwnHandler]]:
    """Paths the main listener answers itself (never forwarded), by exact path."""
    endpoints: dict[str, tuple[str, OwnHandler]] = {
        "/livez": ("livez", admin.livez_handler(runtime)),
        "/readyz": ("readyz", admin.public_readyz_handler(runtime)),
    }
    if not runtime.config.admin.enabled:
        # Without an admin listener the detailed endpoints live here; with one, these
        # paths reach the model server (whose own /metrics may matter to its owners).
        endpoints["/health"] = ("health", admin.health_handler(runtime))
        endpoints["/metrics"] = ("metrics", admin.metrics_handler(runtime))
    return endpoints


def build_pipeline(runtime: Runtime) -> Pipeline:
    """The whole pipeline of one runtime (built once per config)."""
    return Pipeline(runtime, own_endpoints(runtime))


class AdminEndpoints:
    """The operator's listener (loopback by default): health detail, metrics, reload.

    Served by the same HTTP server as the main listener, so its refusals (malformed
    or oversized heads) are the same JSON error bodies, and every answer carries an
    X-Request-ID. Handlers serve from the runtime in service, across reloads.
    """

    def __init__(
        self,
        current: admin.CurrentRuntime,
        reload: admin.Reload | None = None,
        *,
        reload_open_to_all: bool = True,
    ) -> None:
        self._endpoints: dict[str, tuple[frozenset[str], OwnHandler]] = {
            path: (_READ, admin.current_handler(current, make))
            for path, make in (
                ("/livez", admin.livez_handler),
                ("/readyz", admin.readyz_handler),
                ("/health", admin.health_handler),
                ("/metrics", admin.metrics_handler),
            )
        }
        if reload is not None:
            self._endpoints["/-/reload"] = (
                frozenset({"POST"}),
                admin.reload_handler(current, reload, open_to_all=reload_open_to_all),
            )

    async def dispatch(self, request: Request) -> Answer:
        request_id = accept_request_id(request.headers.get("X-Request-ID"), new_request_id())
        try:
            response = await self._answer(request)
        except errors.SidecarError as exc:
            response = errors.error_response(exc, request_id)
        except (ClientGone, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("unhandled_admin_error", path=request.path)
            error = errors.InternalError("the sidecar failed to handle this request")
            response = errors.error_response(error, request_id)
        else:
            response.headers["X-Request-ID"] = request_id
        return response

    async def _answer(self, request: Request) -> Response:
        endpoint = self._endpoints.get(request.path)
        if endpoint is None:
            # The path is not echoed: this listener does not check targets.
            raise errors.NoRoute("no admin endpoint at this path")
        methods, handler = endpoint
        if request.method not in methods:
            allowed = ", ".join(sorted(methods))
            raise errors.MethodNotAllowed(
                f"{request.path} answers {allowed} only", headers={"Allow": allowed}
            )
        return await handler(request)

    def refuse(self, refusal: RequestRefused, method: str, target: str, peer: str) -> Response:
        """A request the HTTP layer refused (malformed, oversized, stalled)."""
        return errors.error_response(errors.from_refusal(refusal), new_request_id())


_READ = frozenset({"GET", "HEAD"})
