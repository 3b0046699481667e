"""An extra stage, a branch and a middleware, as a pipeline file of your own declares them.

- `moderate`: a sixth stage between post and stream that rejects answers with a banned word
  (the request is dead-lettered as `failed`, with the word in the error);
- `translate`: a stage only requests tagged `metadata.task = "translate"` take, after
  inference: a word-for-word glossary stands in for a translation model;
- `audit`: a middleware that writes one JSON line per handler call and per outcome. Its file
  is opened when the stage starts and closed after its drain: a lifecycle.

pipeline.toml beside this file wires them in; `orchestrator validate` checks it and
`orchestrator --config docs/examples/moderated/pipeline.toml up` runs it.
"""

import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from shared.data import COMPLETION, OUTPUT
from shared.envelope import Envelope
from shared.middleware import (
    Call,
    CallNext,
    Middleware,
    MiddlewareContext,
    Outcome,
    Output,
    middleware,
)
from shared.stage import Handler, Reject, StageContext, stage


class ModerateOptions(BaseModel):
    """`[stages.moderate.options]`, checked when the stage starts and by `validate`."""

    model_config = ConfigDict(extra="forbid")
    banned: list[str] = []


@stage(options=ModerateOptions)
def moderate(ctx: StageContext[ModerateOptions]) -> Handler:
    """Pass the request on unchanged, unless its answer has a banned word."""
    words = {w.lower() for w in ctx.options.banned}

    async def handle(request: Envelope) -> Envelope:
        found = set(re.findall(r"\w+", OUTPUT.read(request).lower())) & words
        if found:
            raise Reject(f"moderated: the answer contains {', '.join(sorted(found))}")
        return request

    return handle


class TranslateOptions(BaseModel):
    """`[stages.translate.options]`."""

    model_config = ConfigDict(extra="forbid")
    glossary: dict[str, str] = {}
    """Word -> translation; other words stay as they are."""


@stage(options=TranslateOptions)
def translate(ctx: StageContext[TranslateOptions]) -> Handler:
    """Translate the model's completion word by word."""
    glossary = {k.lower(): v for k, v in ctx.options.glossary.items()}

    def word(match: re.Match[str]) -> str:
        return glossary.get(match.group(0).lower(), match.group(0))

    async def handle(request: Envelope) -> Envelope:
        return COMPLETION.write(request, re.sub(r"\w+", word, COMPLETION.read(request)))

    return handle


class AuditOptions(BaseModel):
    """`[[middleware]] options`."""

    model_config = ConfigDict(extra="forbid")
    path: Path
    """Where to append the JSON lines (one file may serve several stages and processes)."""


class Audit(Middleware):
    """Writes a line when a call starts, and one when its message leaves the stage."""

    def __init__(self, file: "AuditFile") -> None:
        self.file = file

    async def handle(self, call: Call, call_next: CallNext) -> Output:
        """Note the call, then make it."""
        self.file.write(event="call", stage=call.stage, request_id=call.request.request_id,
                        attempt=call.attempt)  # fmt: skip
        return await call_next(call)

    def settled(self, stage: str, request: Envelope | None, outcome: Outcome) -> None:
        """Note how the message left the stage."""
        self.file.write(event=outcome.action, stage=stage, to=outcome.to, reason=outcome.reason,
                        request_id=request.request_id if request else None,
                        seconds=round(outcome.seconds, 6))  # fmt: skip


class AuditFile:
    """An append-only file of JSON lines."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def write(self, **fields: object) -> None:
        """Append one line, at once (other processes append to the same file)."""
        self._file.write(json.dumps({"at": time.time(), **fields}) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


@middleware(options=AuditOptions)
@asynccontextmanager
async def audit(ctx: MiddlewareContext[AuditOptions]) -> AsyncIterator[Audit]:
    """Open the audit file when the stage starts; close it after the stage has drained."""
    file = AuditFile(ctx.options.path)
    file.write(event="opened", stage=ctx.stage, instance=ctx.instance)
    try:
        yield Audit(file)
    finally:
        file.write(event="closed", stage=ctx.stage, instance=ctx.instance)
        file.close()
