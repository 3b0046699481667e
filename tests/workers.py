"""Model workers for tests, loaded by stage processes as `tests.workers:<factory>`."""

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

from shared.envelope import Usage
from shared.workers import EchoWorker


class PoisonWorker(EchoWorker):
    """Echoes, but until the cure file exists: fails on prompts containing `poison`, never
    answers prompts containing `hang`, and kills its process on prompts containing `crash`.
    A prompt containing `flaky` fails on its first call only.

    Every call is appended to $POISON_LOG (one JSON string per line), so tests can count
    attempts from outside the process.
    """

    def __init__(self, token_delay: float, log: Path | None, cure: Path | None) -> None:
        super().__init__(token_delay)
        self.log = log
        self.cure = cure

    async def stream(self, prompt: str, *, session_id: str) -> AsyncIterator[str | Usage]:
        """Record the call, fail if poisoned, else echo piece by piece."""
        await self._called(prompt)
        async for token in super().stream(prompt, session_id=session_id):
            yield token

    async def complete(self, prompt: str, *, session_id: str) -> tuple[str, Usage]:
        """Record the call, fail if poisoned, else echo in one piece."""
        await self._called(prompt)
        return await super().complete(prompt, session_id=session_id)

    async def _called(self, prompt: str) -> None:
        if self.log is not None:
            with self.log.open("a", encoding="utf-8") as f:
                f.write(json.dumps(prompt) + "\n")
        cured = self.cure is not None and self.cure.exists()
        if "flaky" in prompt and self.log is not None:
            seen = self.log.read_text(encoding="utf-8").splitlines().count(json.dumps(prompt))
            if seen == 1:
                raise RuntimeError("flaky on its first call")
        if "crash" in prompt and not cured:
            os._exit(70)  # as a segfault in native code would: no cleanup, no goodbye
        if "poison" in prompt and not cured:
            raise RuntimeError("poisoned input")
        if "hang" in prompt and not cured:
            await asyncio.Event().wait()


def poison(options: dict[str, object]) -> PoisonWorker:
    """Factory for `[stages.inference.options] worker = "tests.workers:poison"`; its
    `custom.token_delay` paces the echo."""
    log, cure = os.environ.get("POISON_LOG"), os.environ.get("POISON_CURE")
    delay = float(options.get("token_delay", 0.0))  # type: ignore[arg-type]
    return PoisonWorker(delay, Path(log) if log else None, Path(cure) if cure else None)
