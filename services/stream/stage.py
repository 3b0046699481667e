"""stream: turn the finished envelope into the result the client reads."""

import time

from shared.data import OUTPUT, USAGE
from shared.envelope import Envelope, Result
from shared.stage import Handler, NoOptions, StageContext, stage


@stage(options=NoOptions)
def stream(ctx: StageContext[NoOptions]) -> Handler:
    """No options yet."""

    async def handle(request: Envelope) -> Result:
        return Result(
            request_id=request.request_id,
            session_id=request.session_id,
            output=OUTPUT.read(request),
            metadata=request.metadata,
            created_at=request.created_at,
            completed_at=time.time(),
            hops=list(request.hops),
            usage=USAGE.read(request, None),
        )

    return handle
