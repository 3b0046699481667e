"""post: clean the model's completion into the answer (`data.output`)."""

from shared.data import COMPLETION, OUTPUT
from shared.envelope import Envelope
from shared.stage import Handler, NoOptions, StageContext, stage


def clean(text: str) -> str:
    """Drop control characters and collapse runs of whitespace."""
    text = "".join(ch if ch.isprintable() or ch.isspace() else " " for ch in text)
    return " ".join(text.split())


@stage(options=NoOptions)
def post(ctx: StageContext[NoOptions]) -> Handler:
    """No options yet."""

    async def handle(request: Envelope) -> Envelope:
        return OUTPUT.write(request, clean(COMPLETION.read(request)))

    return handle
