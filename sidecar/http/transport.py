"""What the server's and the client's connections share: reading paused and resumed
at most once each way (flow control asks from several places), and an abort."""

from __future__ import annotations

import asyncio


class FlowControlled(asyncio.Protocol):
    """A protocol whose reading can be paused by more than one party."""

    __slots__ = ("_reading_paused", "_transport", "closed")
    _transport: asyncio.Transport | None
    _reading_paused: bool
    closed: bool

    def pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None and not self.closed:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self.closed:
            self._reading_paused = False
            self._transport.resume_reading()
