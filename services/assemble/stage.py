"""assemble: format the prompt from the template, the context and the input."""

from shared.envelope import Envelope
from shared.settings import Settings
from shared.stage import Handler, StageSpec


def render(template: str, envelope: Envelope) -> str:
    """Fill `template` (validated at load time) from the envelope's fields."""
    context = "\n".join(f"- {passage}" for passage in envelope.context) or "(none)"
    return template.format(
        context=context,
        input=envelope.input,
        session_id=envelope.session_id,
        request_id=envelope.request_id,
    )


def build(settings: Settings) -> Handler:
    """Bind the configured template."""
    template = settings.assemble.template

    async def handle(envelope: Envelope) -> Envelope:
        return envelope.model_copy(update={"prompt": render(template, envelope)})

    return handle


SPEC = StageSpec(name="assemble", input="assemble", output="inference", build=build)
