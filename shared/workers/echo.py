"""EchoWorker: answers with the prompt itself. For demos, tests and benchmarks."""

import asyncio
import re
from collections.abc import AsyncIterator

from shared.settings import WorkerSettings

_TOKEN = re.compile(r"\S+\s*")


class EchoWorker:
    """Streams the prompt back word by word, optionally pausing between tokens."""

    def __init__(self, token_delay: float = 0.0) -> None:
        self.token_delay = token_delay

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> "EchoWorker":
        """Build from the `[worker]` section."""
        return cls(token_delay=settings.echo_token_delay)

    async def stream(self, prompt: str, *, session_id: str) -> AsyncIterator[str]:
        """Yield the words of `prompt`, each with its trailing whitespace."""
        for token in _TOKEN.findall(prompt):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            yield token

    async def aclose(self) -> None:
        """Nothing to release."""
