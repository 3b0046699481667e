"""Session affinity: which partition a session's requests travel on.

The function is FNV-1a 32-bit over the UTF-8 bytes of the session id, modulo the partition
count: the same hash nats-server uses for its `partition(n, ...)` subject mapping, so any
client in any language can compute it. Test vectors live in docs/PROTOCOL.md.
"""

from functools import lru_cache

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a32(data: bytes) -> int:
    """Return the 32-bit FNV-1a hash of `data`."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


@lru_cache(maxsize=65536)  # a hot session is hashed once, not at every hop
def partition_of(session_id: str, partitions: int) -> int:
    """Return the partition (0..partitions-1) that carries `session_id`'s requests."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    return fnv1a32(session_id.encode("utf-8")) % partitions
