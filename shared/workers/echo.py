"""EchoWorker: answers with the prompt itself. For demos, tests and benchmarks."""

import asyncio
import re
from collections.abc import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

from shared.envelope import Usage

_TOKEN = re.compile(r"\S+\s*")


class EchoOptions(BaseModel):
    """`[stages.inference.options.echo]`."""

    model_config = ConfigDict(extra="forbid")
    token_delay: float = Field(default=0.0, ge=0)
    """Seconds the echo worker waits before each token (to imitate a model's pace)."""


class EchoWorker:
    """Answers with the prompt: at once, or word by word with `token_delay` between words."""

    def __init__(self, token_delay: float = 0.0) -> None:
        self.token_delay = token_delay

    @classmethod
    def from_options(cls, options: EchoOptions) -> "EchoWorker":
        """Build from `[stages.inference.options.echo]`."""
        return cls(token_delay=options.token_delay)

    async def stream(self, prompt: str, *, session_id: str) -> AsyncIterator[str | Usage]:
        """Yield `prompt` (without a delay, in one piece, as a model that has the whole answer
        would; with one, word by word, each with its trailing whitespace); then the Usage."""
        if self.token_delay:
            tokens = _TOKEN.findall(prompt)
            for token in tokens:
                await asyncio.sleep(self.token_delay)
                yield token
            count = len(tokens)
        else:
            yield prompt
            count = len(prompt.split())  # as many as the words above
        yield Usage(model="echo", prompt_tokens=count, completion_tokens=count)

    async def complete(self, prompt: str, *, session_id: str) -> tuple[str, Usage]:
        """The answer `stream` gives, in one piece, after as long as its pieces would take."""
        if self.token_delay:
            tokens = _TOKEN.findall(prompt)
            await asyncio.sleep(self.token_delay * len(tokens))
            text, count = "".join(tokens), len(tokens)
        else:
            text, count = prompt, len(prompt.split())
        return text, Usage(model="echo", prompt_tokens=count, completion_tokens=count)

    async def aclose(self) -> None:
        """Nothing to release."""
