"""assemble: format the prompt (`data.prompt`) from the template, the context and the input.

The passages (`data.context`) are in the prompt from here on, so they are not carried on
unless `keep_context` says a later stage reads them.
"""

import string

from pydantic import BaseModel, ConfigDict, field_validator

from shared.data import CONTEXT, PROMPT, write_all
from shared.envelope import Envelope
from shared.stage import Handler, StageContext, stage

DEFAULT_TEMPLATE = "Context:\n{context}\n\nQuestion: {input}\nAnswer:"
TEMPLATE_FIELDS = frozenset({"context", "input", "session_id", "request_id"})


class Options(BaseModel):
    """`[stages.assemble.options]`: a str.format template over the fields in TEMPLATE_FIELDS,
    and whether the passages go on past this stage."""

    model_config = ConfigDict(extra="forbid")
    template: str = DEFAULT_TEMPLATE
    keep_context: bool = False
    """Carry `data.context` on to later stages (a stage of yours that cites the passages)."""

    @field_validator("template")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"template is not a valid format string: {exc}") from None
        unknown = names - TEMPLATE_FIELDS
        if unknown:
            raise ValueError(
                f"template uses unknown fields {sorted(unknown)}; known: {sorted(TEMPLATE_FIELDS)}"
            )
        return value


def render(template: str, request: Envelope) -> str:
    """Fill `template` (validated at load time) from the request and its context."""
    context = "\n".join(f"- {passage}" for passage in CONTEXT.read(request, [])) or "(none)"
    return template.format(
        context=context,
        input=request.input,
        session_id=request.session_id,
        request_id=request.request_id,
    )


@stage(options=Options)
def assemble(ctx: StageContext[Options]) -> Handler:
    """Bind the configured template."""
    template = ctx.options.template
    drop = [] if ctx.options.keep_context else [CONTEXT]

    async def handle(request: Envelope) -> Envelope:
        return write_all(request, {PROMPT: render(template, request)}, drop=drop)

    return handle
