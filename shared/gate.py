"""A gate that lets a stage run one message alone: shared entries, exclusive turns.

Messages that were being handled when an instance died are suspected of killing it. After a
second such death a suspect gets an exclusive turn, with nothing else in flight, so that if it
kills the process again it takes no innocent message's attempt with it.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Gate:
    """Many shared holders at once, or one exclusive holder; exclusive turns go first."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = 0  # holding or waiting
        self._idle = asyncio.Event()  # set while nobody holds it shared
        self._open = asyncio.Event()  # set while no exclusive turn is held or waited for
        self._idle.set()
        self._open.set()
        self._turn = asyncio.Lock()

    def try_enter(self) -> bool:
        """Enter shared without waiting, unless an exclusive turn is held or waited for."""
        if self._exclusive:
            return False
        self._shared += 1
        self._idle.clear()
        return True

    async def enter(self) -> None:
        """Enter shared, after the exclusive turns held or waited for."""
        while self._exclusive:
            await self._open.wait()
        self._shared += 1
        self._idle.clear()

    def leave(self) -> None:
        """Leave after `try_enter` or `enter`."""
        self._shared -= 1
        if self._shared == 0:
            self._idle.set()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the gate alone: wait for shared holders to leave and keep new ones out."""
        self._exclusive += 1
        self._open.clear()
        try:
            async with self._turn:
                while self._shared:
                    await self._idle.wait()
                yield
        finally:
            self._exclusive -= 1
            if not self._exclusive:
                self._open.set()
