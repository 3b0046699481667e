"""rag: attach the passages most relevant to the request's input (`data.context`)."""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from shared.data import CONTEXT
from shared.envelope import Envelope
from shared.retrieval import Retriever
from shared.stage import Handler, StageContext, stage


class Options(BaseModel):
    """`[stages.rag.options]`: a corpus file (one passage per line) or the built-in sample."""

    model_config = ConfigDict(extra="forbid")
    corpus: Path | None = None
    top_k: int = Field(default=2, ge=0, le=50)


@stage(options=Options)
def rag(ctx: StageContext[Options]) -> Handler:
    """Load the corpus once; the handler searches it per request."""
    retriever = Retriever.from_file(ctx.options.corpus)
    top_k = ctx.options.top_k

    async def handle(request: Envelope) -> Envelope:
        return CONTEXT.write(request, retriever.search(request.input, top_k))

    return handle
