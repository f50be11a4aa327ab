"""Everything a running sidecar holds, built once from a validated config."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from sidecar.analytics.drift import DriftMonitor
from sidecar.config.plan import Plan
from sidecar.config.schema import CacheFallback, FallbackPolicy, Route, Upstream
from sidecar.control.health import LoopLagMonitor
from sidecar.pipeline.auth import Authenticator
from sidecar.pipeline.forwarding import RoutePath, UpstreamGuard
from sidecar.pipeline.ratelimit import RateLimiter
from sidecar.pipeline.routing import RouteTable
from sidecar.pipeline.stages import InFlight
from sidecar.pipeline.validation import RequestValidator
from sidecar.telemetry.logs import Logs
from sidecar.telemetry.logwriter import LogWriter
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.breaker import UpstreamBreaker
from sidecar.upstream.fallback import FallbackChain, ResponseCache
from sidecar.upstream.retry import RetryBudget
from sidecar.upstream.shadow import Governor, ShadowMirror
from sidecar.upstream.upstreams import ConnectionPools, InFlightCount, Upstreams

if TYPE_CHECKING:
    from sidecar.upstream.shared import BreakerSync, SharedState


class Runtime:
    """One config, compiled: routes, upstream paths, checks and background monitors.

    A reload builds a new Runtime beside the old one; both share the process-long
    parts (metrics, logs, connection pools), which a Runtime never starts or stops.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        metrics: Metrics,
        logs: Logs,
        pools: ConnectionPools,
        clock: Callable[[], float] = time.monotonic,
        previous: Runtime | None = None,
    ) -> None:
        """``previous``: the runtime this one replaces (a reload), whose shadow
        copies still out count against this one's limits, whose rate-limit
        buckets carry on, whose breakers carry on where the upstream's URL and
        breaker settings are unchanged (an open circuit stays open), whose
        routes' fallback caches carry on where what a cached answer means is
        unchanged (``_kept_cache``), and whose shadow governors carry on where the
        shadow settings and candidate are unchanged (``_kept_governor``)."""
        self.plan = plan
        self.loaded = loaded = plan.loaded
        self.config = config = loaded.config
        self.metrics = metrics
        self.logs = logs
        self.routes = RouteTable(config.routes)
        self.upstreams: Upstreams = Upstreams(
            config.upstreams,
            self.metrics,
            pools,
            previous=previous.upstreams if previous is not None else None,
        )
        self.guards = {
            name: UpstreamGuard(
                breaker=(
                    _kept_breaker(previous, name, upstream)
                    or UpstreamBreaker(name, upstream.breaker, self.metrics, clock)
                    if upstream.breaker.enabled
                    else None
                ),
                budget=RetryBudget(upstream.retry_budget),
            )
            for name, upstream in config.upstreams.items()
        }
        self.upstreams.on_probe_passed = self._probe_passed
        breakers = {name: guard.breaker for name, guard in self.guards.items()}
        self.paths = {
            route.name: RoutePath(
                route=route,
                upstream=self.upstreams[route.upstream],
                guard=self.guards[route.upstream],
                fallback=(
                    FallbackChain(
                        route.fallback,
                        self.upstreams.clients,
                        clock,
                        route.protocol,
                        metrics.dropped.labels("fallback_cache", route.name),
                        metrics.dropped.labels("fallback_too_large", route.name),
                        _kept_cache(previous, route, config.upstreams[route.upstream]),
                        breakers,
                        metrics.dropped.labels("fallback_unparsed", route.name),
                    )
                    if route.fallback
                    else None
                ),
                metrics=self.metrics,
                overload_retry_after=config.server.overload_retry_after,
            )
            for route in config.routes
        }
        # Readiness rests on the routes' upstreams and their secondary models only.
        self.upstreams.needed = frozenset(
            name
            for path in self.paths.values()
            for name in (path.route.upstream, *(path.fallback.secondaries if path.fallback else ()))
        )
        # Caps on requests in flight count on across a reload (the previous runtime's
        # requests may still be out).
        self.in_flight: InFlightCount = (
            previous.in_flight if previous is not None else InFlightCount()
        )
        for route in config.routes:
            path = self.paths[route.name]
            before_path = previous.paths.get(route.name) if previous is not None else None
            if before_path is not None:
                path.in_flight = before_path.in_flight
            path.payload_log = self.logs.payload if route.payload_sample > 0 else None
            if route.drift is not None:
                path.drift = DriftMonitor(
                    route.name,
                    route.drift,
                    loaded.resolve(route.drift.baseline),
                    self.metrics,
                    baseline=plan.baselines[route.name],
                )
            if route.shadow is not None:
                path.shadow = ShadowMirror(
                    route.name,
                    route.shadow,
                    self.upstreams[route.shadow.upstream],
                    self.metrics,
                    self.logs.shadow,
                    before_path.shadow.copies_out
                    if before_path is not None and before_path.shadow is not None
                    else None,
                    _kept_governor(previous, route, config.upstreams),
                )
        self.authenticator = (
            Authenticator(config.auth, plan.jwt_public_key, self.metrics)
            if config.auth.enabled
            else None
        )
        if self.authenticator is not None:
            for path in self.paths.values():
                path.credentials = self.authenticator.credential_headers
        self.key_names = frozenset(k.name for k in config.auth.api_keys)
        shared_settings = config.shared_state
        self.shared: SharedState | None = None
        self.breaker_syncs: list[BreakerSync] = []
        self._carried_syncs: dict[int, BreakerSync] = {}  # id of ours -> the one it follows
        if shared_settings is not None:
            # Imported only here: Redis is an extra (sidecar[redis]), which the plan
            # checked is installed.
            from sidecar.upstream.shared import BreakerSync, SharedState

            self.shared = SharedState(
                shared_settings, metrics, previous.shared if previous is not None else None
            )
            if shared_settings.breakers:
                self.breaker_syncs = [
                    BreakerSync(guard.breaker, self.shared)
                    for guard in self.guards.values()
                    if guard.breaker is not None
                ]
                # The syncs of breakers carried on from ``previous``: each starts at
                # the swap, taking over from the one in service until then (two at
                # once would each publish from their own view).
                before = {
                    id(sync.breaker): sync
                    for sync in (previous.breaker_syncs if previous is not None else ())
                }
                self._carried_syncs = {
                    id(sync): before[id(sync.breaker)]
                    for sync in self.breaker_syncs
                    if id(sync.breaker) in before
                }
        self.limiter = (
            RateLimiter(
                config.rate_limit,
                {k.name: k.rate_limit for k in config.auth.api_keys if k.rate_limit},
                self.metrics,
                clock,
                self.shared if shared_settings and shared_settings.rate_limits else None,
            )
            if config.rate_limit.enabled
            else None
        )
        if previous is not None and previous.limiter is not None and self.limiter is not None:
            self.limiter.take_over(previous.limiter)
        self.validators = {
            route.name: RequestValidator(
                route.name,
                route.validate_,
                plan.schemas.get(route.name),
                self.metrics,
                binary_tensors=route.protocol == "v2",
            )
            for route in config.routes
            if route.validate_ is not None
        }
        self.requests = InFlight()  # being handled by this runtime (for retiring it)
        self.draining = False
        self.loop_lag: LoopLagMonitor | None = None  # process-wide, set by its owner

    def _probe_passed(self, upstream: str) -> None:
        guard = self.guards.get(upstream)
        if guard is not None and guard.breaker is not None:
            guard.breaker.probe_passed()

    @property
    def active(self) -> int:
        return self.requests.count

    @property
    def drift_monitors(self) -> list[DriftMonitor]:
        return [p.drift for p in self.paths.values() if p.drift is not None]

    @property
    def mirrors(self) -> list[ShadowMirror]:
        return [p.shadow for p in self.paths.values() if p.shadow is not None]

    @property
    def access_log(self) -> LogWriter | None:
        return self.logs.access

    def put_in_service(self, previous: Runtime | None) -> None:
        """The swap's bookkeeping: only the breakers now in service reach the metrics
        (a straggler of ``previous`` that opens its breaker must not show the
        circuit open while the one in service is closed). A breaker carried on
        from ``previous`` is in service still."""
        kept = {id(guard.breaker) for guard in self.guards.values()}
        for guard in previous.guards.values() if previous is not None else ():
            if guard.breaker is not None and id(guard.breaker) not in kept:
                guard.breaker.retire()
        for guard in self.guards.values():
            if guard.breaker is not None:
                guard.breaker.publish()
        if previous is not None and previous.shared is not None:
            previous.shared.retire()
        if self.shared is not None:
            self.shared.put_in_service()
        for sync in self.breaker_syncs:
            predecessor = self._carried_syncs.get(id(sync))
            if predecessor is not None:
                predecessor.hand_over(sync)
                sync.start()
        for mirror in self.mirrors:
            if mirror.governor_carried:  # the retired mirror stops governing it
                mirror.start_governing()

    async def start(self) -> None:
        if self.shared is not None:
            # Redis's real state from the start (a reload's too), not "up" until a
            # request or the breaker sync next calls it.
            await self.shared.check()
        await self.upstreams.start()
        for monitor in self.drift_monitors:
            monitor.start()
        for mirror in self.mirrors:
            mirror.start()
        for sync in self.breaker_syncs:
            if id(sync) not in self._carried_syncs:  # those start at the swap
                sync.start()

    async def stop_background(self) -> None:
        """Stop what runs on its own (probes, drift, shadow governing, breaker sync):
        a retired runtime must not keep calling the model while a request pins it."""
        for sync in self.breaker_syncs:
            await sync.stop()
        for mirror in self.mirrors:
            await mirror.stop_governing()
        for monitor in self.drift_monitors:
            await monitor.stop()
        await self.upstreams.stop_probing()

    async def stop(self) -> None:
        """Stop everything the runtime holds. Safe to call again after a stop that was
        cut short (a retirement cancelled part way): every part's stop can be repeated."""
        await self.stop_background()
        if self.shared is not None:
            await self.shared.close()
        for mirror in self.mirrors:
            await mirror.stop()
        await self.upstreams.stop()


def _kept_breaker(
    previous: Runtime | None, name: str, upstream: Upstream
) -> UpstreamBreaker | None:
    """The breaker of ``previous`` for this upstream, when a reload changed neither the
    upstream's URL nor its breaker settings: its state and counts carry on, so a model
    that is down is not sent traffic again because a config was reloaded. (Requests
    the old runtime still finishes report to it too: the same model, the same
    breaker.) None: a fresh breaker, closed."""
    if previous is None:
        return None
    guard = previous.guards.get(name)
    before = previous.config.upstreams.get(name)
    if guard is None or guard.breaker is None or before is None:
        return None
    if before.url != upstream.url or before.breaker != upstream.breaker:
        return None
    return guard.breaker


def _cache_settings(policy: FallbackPolicy | None) -> CacheFallback | None:
    """The settings of a chain's cache step (one at most: the config refuses two)."""
    settings = None
    for step in policy.chain if policy is not None else ():
        if step.cache is not None:
            settings = step.cache
    return settings


def _kept_cache(previous: Runtime | None, route: Route, upstream: Upstream) -> ResponseCache | None:
    """The fallback cache of ``previous`` for this route, when a reload changed nothing
    that decides what a cached answer is: the cache's settings, the route's protocol
    and the fallback's max_parse_bytes (its key, and the ``id`` a cached answer is
    given) and the model that gave the
    answers (the route's upstream: where it is, the URL, and the headers it is sent).
    A model that is down during a reload can still be stood in for by its last good
    answers. The cache is shared with the retired chain, whose stragglers store into
    it too (the same model's answers): one set of entries, counted once in its
    budget. None: an empty cache (another model's answer must never be served)."""
    if previous is None or route.fallback is None:
        return None
    before_path = previous.paths.get(route.name)
    if before_path is None or before_path.fallback is None:
        return None
    cache = before_path.fallback.cache
    before = before_path.route
    before_upstream = previous.config.upstreams.get(before.upstream)
    settings = _cache_settings(route.fallback)
    if (
        cache is None
        or settings is None
        or settings != _cache_settings(before.fallback)
        or before.protocol != route.protocol
        or before_upstream is None
        or before_upstream.url != upstream.url
        or before_upstream.headers != upstream.headers
        # Which requests are keyed by their bytes: a cache keeps its own limit.
        or before.fallback is None
        or before.fallback.max_parse_bytes != route.fallback.max_parse_bytes
    ):
        return None
    return cache


def _same_model(before: Upstream | None, after: Upstream) -> bool:
    """The same model server, asked the same way (its URL and the headers sent)."""
    return before is not None and before.url == after.url and before.headers == after.headers


def _kept_governor(
    previous: Runtime | None, route: Route, upstreams: Mapping[str, Upstream]
) -> Governor | None:
    """The shadow governor of ``previous`` for this route, when a reload changed
    neither the route's shadow settings nor its candidate model: a candidate backed
    off for failing (or for slowing the primary) is not given its whole fraction
    again because a config was reloaded. With the primary model unchanged too, the
    governor itself carries on (its references, and the samples of this interval,
    which the retired runtime's requests still add to); with another primary, a
    fresh one at the same fraction (the old references were another model's).
    None: a fresh governor, at the configured fraction."""
    shadow = route.shadow
    if previous is None or shadow is None:
        return None
    before_path = previous.paths.get(route.name)
    if before_path is None or before_path.shadow is None:
        return None
    before = before_path.route
    before_upstreams = previous.config.upstreams
    if before.shadow != shadow or not _same_model(
        before_upstreams.get(shadow.upstream), upstreams[shadow.upstream]
    ):
        return None
    governor = before_path.shadow.governor
    if _same_model(before_upstreams.get(before.upstream), upstreams[route.upstream]):
        return governor
    return Governor.with_fraction_of(governor)
