"""post: the model's completion as the answer (`data.output`, in place of the completion),
its formatting kept.

Special tokens a model may leave in its text (`<|im_end|>`, `<end_of_turn>`, `</s>`, ...) and
control characters other than tabs and line breaks are removed, and the text is trimmed at
both ends. Nothing else changes: lists, code blocks and blank lines arrive as the model wrote
them.
"""

import re

from pydantic import BaseModel, ConfigDict

from shared.data import COMPLETION, OUTPUT, write_all
from shared.envelope import Envelope
from shared.stage import Handler, StageContext, stage

SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>",
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<s>", "</s>", "<pad>",
]  # fmt: skip
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class Options(BaseModel):
    """`[stages.post.options]`."""

    model_config = ConfigDict(extra="forbid")
    special_tokens: list[str] = SPECIAL_TOKENS
    """Removed wherever they appear in the completion."""


def clean(text: str, special_tokens: list[str] = SPECIAL_TOKENS) -> str:
    """Remove special tokens and control characters (not tabs or line breaks); trim."""
    for token in special_tokens:
        text = text.replace(token, "")
    return _CONTROL.sub("", text).strip()


@stage(options=Options)
def post(ctx: StageContext[Options]) -> Handler:
    """Clean each completion with the configured special tokens."""
    special = ctx.options.special_tokens

    async def handle(request: Envelope) -> Envelope:
        return write_all(request, {OUTPUT: clean(COMPLETION.read(request), special)},
                         drop=[COMPLETION])  # fmt: skip

    return handle
