"""JetStream API errors translated into the project's, in one place."""

from collections.abc import Awaitable
from typing import Any

import nats.errors
import nats.js.errors

from shared.errors import BusError, NoSuchStream, SubjectTaken, TopologyError

STORE_FAILED = 10077
"""JetStream "store failed": the stream is full under discard=new."""
NO_SUCH_MESSAGE = 10057
NO_SUCH_STREAM = 10059
FILTER_NOT_UNIQUE = 10100
"""Another consumer of a work-queue stream already has the subject."""

RAISE: Any = object()


async def query(call: Awaitable[Any], what: str, missing: Any = RAISE) -> Any:
    """Await a JetStream API call, translating its errors into the project's.

    "Not found" returns `missing` when one is given; every other failure (an API error, a
    timeout, a closed connection) becomes a BusError naming `what`.
    """
    try:
        return await call
    except nats.js.errors.APIError as exc:
        gone = isinstance(exc, nats.js.errors.NotFoundError) or exc.err_code == NO_SUCH_MESSAGE
        if gone and missing is not RAISE:
            return missing
        if exc.err_code == NO_SUCH_STREAM:
            raise NoSuchStream(f"{what}: {exc.description}") from None
        raise BusError(f"{what}: {exc.description}") from None
    except nats.errors.Error as exc:
        raise BusError(f"{what}: {exc!r}") from None


async def change(call: Awaitable[Any], what: str) -> Any:
    """Await a call that creates or updates a stream or consumer; `what` says which.

    A refusal becomes a TopologyError (SubjectTaken when another consumer holds a subject).
    """
    try:
        return await call
    except nats.js.errors.APIError as exc:
        if exc.err_code == FILTER_NOT_UNIQUE:
            raise SubjectTaken(f"cannot {what}: {exc.description}") from None
        raise TopologyError(
            f"cannot {what}: {exc.description} (server error {exc.err_code}); "
            "fix the configuration or remove the old stream/consumer"
        ) from None
    except nats.errors.Error as exc:
        raise BusError(f"cannot {what}: {exc}") from None
