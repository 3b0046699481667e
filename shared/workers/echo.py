"""EchoWorker: answers with the prompt itself. For demos, tests and benchmarks."""

import asyncio
import re
from collections.abc import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

_TOKEN = re.compile(r"\S+\s*")


class EchoOptions(BaseModel):
    """`[stages.inference.options.echo]`."""

    model_config = ConfigDict(extra="forbid")
    token_delay: float = Field(default=0.0, ge=0)
    """Seconds the echo worker waits before each token (to imitate a model's pace)."""


class EchoWorker:
    """Streams the prompt back word by word, optionally pausing between tokens."""

    def __init__(self, token_delay: float = 0.0) -> None:
        self.token_delay = token_delay

    @classmethod
    def from_options(cls, options: EchoOptions) -> "EchoWorker":
        """Build from `[stages.inference.options.echo]`."""
        return cls(token_delay=options.token_delay)

    async def stream(self, prompt: str, *, session_id: str) -> AsyncIterator[str]:
        """Yield the words of `prompt`, each with its trailing whitespace."""
        for token in _TOKEN.findall(prompt):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            yield token

    async def aclose(self) -> None:
        """Nothing to release."""
