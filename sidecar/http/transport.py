"""What the server's and the client's connections share: reading paused and resumed
at most once each way (flow control asks from several places), and an abort."""

from __future__ import annotations

import asyncio
from typing import cast


class FlowControlled:
    """A protocol whose reading can be paused by more than one party.

    An asyncio protocol by its methods, not by inheritance: a class compiled by mypyc
    may not extend an interpreted one (asyncio.Protocol); ``as_protocol`` gives it to
    the event loop."""

    __slots__ = ("_reading_paused", "_transport", "closed")
    # A subclass must not annotate these again (``self._transport: T = None``): mypyc
    # 2.4 then gives the garbage collector the attribute twice, which cancels out an
    # outside reference, and a collection can clear a connection still in use
    # (tests/unit/test_native_gc.py).
    _transport: asyncio.Transport | None
    _reading_paused: bool
    closed: bool

    # asyncio.Protocol's defaults, for a subclass that does not define its own: the
    # event loop calls these on every protocol.
    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None and not self.closed:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self.closed:
            self._reading_paused = False
            self._transport.resume_reading()


def as_protocol(protocol: FlowControlled) -> asyncio.Protocol:
    """``protocol`` as the event loop's type (it has every method the loop calls)."""
    return cast(asyncio.Protocol, protocol)
