"""The built-in stages, one package each, and the default graph they form.

`DEFAULT_GRAPH` is plain data, in the shape of a pipeline file: the edge (shared.app) hands it
to shared.config.load_settings, and the pipeline file and environment add to it.
"""

from typing import Any

DEFAULT_GRAPH: dict[str, Any] = {
    "entry": "rag",
    "stages": {
        "rag": {"handler": "services.rag.stage:rag", "next": "assemble", "capacity": 1024},
        "assemble": {"handler": "services.assemble.stage:assemble", "next": "inference"},
        "inference": {"handler": "services.inference.stage:inference", "next": "post"},
        "post": {"handler": "services.post.stage:post", "next": "stream", "capacity": 1024},
        "stream": {"handler": "services.stream.stage:stream"},
    },
}
"""rag -> assemble -> inference -> post -> stream, the entry's channel (intake) and post's
holding 1024 messages, the others 512."""
