"""Dead-letter entries: the original payload byte for byte, plus headers saying why.

Header values are ASCII: `Orch-Error` and `Orch-Session-Id` are percent-encoded (RFC 3986
style, only where needed), so any session id and any error text round-trip exactly.

Header names are constants here so that the runtime that writes entries and the operator
tools that read them cannot drift apart. docs/PROTOCOL.md lists them.
"""

import string
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

REASON = "Orch-Reason"
ERROR = "Orch-Error"
STAGE = "Orch-Stage"
SUBJECT = "Orch-Subject"
DELIVERED = "Orch-Delivered"
FAILED_AT = "Orch-Failed-At"
REQUEST_ID = "Orch-Request-Id"
SESSION_ID = "Orch-Session-Id"
REPLAY_OF = "Orch-Replay-Of"
"""Header on a replayed message, and on every output made from it: the sequence of the
dead-letter entry it came from. Stages add it to their outputs' message ids, so that a replay
never collides with what the first run stored under those ids."""
TRUNCATED = "Orch-Truncated"
"""Set (to the original size) when a payload too large to store was cut to fit."""
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_MAX_HEADER = 1024  # NATS headers are small; a long error is cut, never the payload
_SAFE = "".join(ch for ch in string.printable if ch not in "%\t\n\r\x0b\x0c")


def encode_value(value: str, limit: int | None = _MAX_HEADER) -> str:
    """Percent-encode what a header value cannot carry as it is (non-ASCII, controls, '%'),
    cut to `limit` characters (ending in '...') unless `limit` is None.

    NATS headers are parsed like e-mail headers by most clients, which mangle non-ASCII
    text; escaping keeps session ids and error messages exact across every client.
    """
    encoded = quote(value, safe=_SAFE)
    if limit is None or len(encoded) <= limit:
        return encoded
    return encoded[: limit - 3] + "..."


def decode_value(value: str | None) -> str | None:
    """Undo `encode_value`."""
    return None if value is None else unquote(str(value))


def entry_headers(
    *,
    reason: str,
    error: str,
    stage: str,
    subject: str,
    delivered: int,
    request_id: str | None = None,
    session_id: str | None = None,
    original: Mapping[str, str] | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """The headers of a dead-letter entry; trace context is carried over from `original`."""
    hdrs = {
        REASON: reason,
        ERROR: encode_value(error),
        STAGE: stage,
        SUBJECT: subject,
        DELIVERED: str(delivered),
        FAILED_AT: f"{time.time() if now is None else now:.6f}",
    }
    if request_id:
        hdrs[REQUEST_ID] = request_id
    if session_id:
        # Never cut: `dlq --session` must match it. The envelope bounds it (1024 characters).
        hdrs[SESSION_ID] = encode_value(session_id, limit=None)
    for key in (TRACEPARENT, TRACESTATE):
        if original and key in original:
            hdrs[key] = original[key]
    return hdrs


@dataclass(frozen=True)
class Entry:
    """One dead-letter entry as read back from the stream."""

    seq: int
    reason: str
    error: str
    stage: str
    subject: str
    delivered: int
    failed_at: float
    request_id: str | None
    session_id: str | None
    payload: bytes
    headers: Mapping[str, str]

    @classmethod
    def parse(cls, seq: int, payload: bytes, headers: Mapping[str, str]) -> "Entry":
        """Build an entry from a stored message's sequence, payload and headers."""
        return cls(
            seq=seq,
            reason=headers.get(REASON, ""),
            error=decode_value(headers.get(ERROR)) or "",
            stage=headers.get(STAGE, ""),
            subject=headers.get(SUBJECT, ""),
            delivered=int(headers.get(DELIVERED, "0") or 0),
            failed_at=float(headers.get(FAILED_AT, "0") or 0),
            request_id=headers.get(REQUEST_ID),
            session_id=decode_value(headers.get(SESSION_ID)),
            payload=payload,
            headers=headers,
        )
