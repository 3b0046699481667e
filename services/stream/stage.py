"""stream: turn the finished envelope into the result the client reads."""

import time

from shared.envelope import Envelope, Result
from shared.failure import Reject
from shared.settings import Settings
from shared.stage import RESULTS, Handler, StageSpec


def build(settings: Settings) -> Handler:
    """No configuration yet."""

    async def handle(envelope: Envelope) -> Result:
        if envelope.output is None:
            raise Reject("no output: the request skipped the post stage")
        return Result(
            request_id=envelope.request_id,
            session_id=envelope.session_id,
            output=envelope.output,
            metadata=envelope.metadata,
            created_at=envelope.created_at,
            completed_at=time.time(),
            hops=list(envelope.hops),
        )

    return handle


SPEC = StageSpec(name="stream", input="stream", output=RESULTS, build=build)
