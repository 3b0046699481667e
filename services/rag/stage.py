"""rag: attach the passages most relevant to the request's input."""

from shared.envelope import Envelope
from shared.retrieval import Retriever
from shared.settings import Settings
from shared.stage import Handler, StageSpec


def build(settings: Settings) -> Handler:
    """Load the corpus once; the handler searches it per request."""
    retriever = Retriever.from_file(settings.rag.corpus)
    top_k = settings.rag.top_k

    async def handle(envelope: Envelope) -> Envelope:
        return envelope.model_copy(update={"context": retriever.search(envelope.input, top_k)})

    return handle


SPEC = StageSpec(name="rag", input="intake", output="assemble", build=build)
