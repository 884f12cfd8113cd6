"""Gives memory back after a burst of connections: collect cyclic garbage, trim malloc's free lists."""

from __future__ import annotations

import asyncio
import ctypes
import gc
from collections.abc import Callable

RECLAIM_INTERVAL_S = 1.0


class Reclaimer:
    """At most once per RECLAIM_INTERVAL_S while connections keep ending, and once after the last.

    Each closed connection leaves reference cycles (protocol, transport, task, scope). The service
    raises the collector's threshold for its event load (app/service.py), so a burst of thousands of
    connections left tens of MB of garbage for a collection that an idle service never reaches,
    spread over allocator arenas it then could not give back.
    """

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None
        self._trim: Callable[[int], int] | None
        try:
            self._trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):   # not glibc
            self._trim = None
        self.runs = 0

    def poke(self) -> None:
        """Something that may leave garbage has ended."""
        if self._handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._handle = loop.call_later(RECLAIM_INTERVAL_S, self._run)

    def _run(self) -> None:
        self._handle = None
        self.runs += 1
        gc.collect()
        if self._trim is not None:
            self._trim(0)


reclaimer = Reclaimer()
