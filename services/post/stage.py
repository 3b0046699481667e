"""post: join the generated tokens into clean text."""

from shared.envelope import Envelope
from shared.settings import Settings
from shared.stage import Handler, StageSpec


def clean(tokens: list[str]) -> str:
    """Join tokens, drop control characters and collapse runs of whitespace."""
    text = "".join(tokens)
    text = "".join(ch if ch.isprintable() or ch.isspace() else " " for ch in text)
    return " ".join(text.split())


def build(settings: Settings) -> Handler:
    """No configuration yet."""

    async def handle(envelope: Envelope) -> Envelope:
        return envelope.model_copy(update={"output": clean(envelope.tokens)})

    return handle


SPEC = StageSpec(name="post", input="post", output="stream", build=build)
