"""The stages in pipeline order, by name."""

from services.assemble.stage import SPEC as ASSEMBLE
from services.inference.stage import SPEC as INFERENCE
from services.post.stage import SPEC as POST
from services.rag.stage import SPEC as RAG
from services.stream.stage import SPEC as STREAM
from shared.stage import StageSpec

PIPELINE: tuple[StageSpec, ...] = (RAG, ASSEMBLE, INFERENCE, POST, STREAM)
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in PIPELINE}
