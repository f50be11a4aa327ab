"""Everything a running sidecar holds, built once from a validated config."""

from __future__ import annotations

from sidecar.config import LoadedConfig
from sidecar.metrics import Metrics
from sidecar.routing import RouteTable
from sidecar.upstreams import Upstreams


class Runtime:
    def __init__(self, loaded: LoadedConfig, metrics: Metrics | None = None) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.metrics = metrics if metrics is not None else Metrics()
        self.routes = RouteTable(self.config.routes)
        self.upstreams = Upstreams(self.config.upstreams, self.metrics)
        self.draining = False

    async def start(self) -> None:
        await self.upstreams.start()

    async def stop(self) -> None:
        await self.upstreams.stop()
