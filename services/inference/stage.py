"""inference: stream the prompt's completion from the model worker."""

from shared.envelope import Envelope
from shared.failure import Reject
from shared.settings import Settings
from shared.stage import Handler, StageSpec
from shared.workers import load_worker


def build(settings: Settings) -> Handler:
    """Start the configured worker; it lives as long as the stage."""
    worker = load_worker(settings.worker)

    async def handle(envelope: Envelope) -> Envelope:
        if envelope.prompt is None:
            raise Reject("no prompt: the request skipped the assemble stage")
        tokens = [t async for t in worker.stream(envelope.prompt, session_id=envelope.session_id)]
        return envelope.model_copy(update={"tokens": tokens})

    return handle


SPEC = StageSpec(name="inference", input="inference", output="post", build=build)
