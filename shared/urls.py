"""NATS server URLs as users give them: one, or several separated by commas."""

from urllib.parse import urlsplit

SCHEMES = ("nats", "tls", "ws", "wss")
DEFAULT_URL = "nats://127.0.0.1:4222"
"""Where a client or stage connects when no URL is configured (where `up` puts its server)."""


def server_list(text: str) -> list[str]:
    """The URLs in `text` (comma-separated); ValueError naming the first that is not a NATS
    server URL (`nats://host:port`, `tls://`, `ws://`, `wss://`, or `host:port`)."""
    urls = [part.strip() for part in text.split(",")]
    families = set()
    for url in urls:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ValueError(
                f"not a NATS server URL: {url!r} (nats://host:port; also tls://, ws://, wss://)"
            )
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number from 0 to 65535
        except ValueError as exc:
            raise ValueError(f"not a NATS server URL: {url!r} ({exc})") from None
        families.add(parts.scheme.startswith("ws"))
    if len(families) > 1:
        raise ValueError(f"websocket and other URLs cannot be mixed: {text!r}")
    return urls
