"""JetStream key-value buckets."""

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue as NatsKeyValue

from shared.errors import BusError
from shared.transport.api import BucketSpec
from shared.transport.translate import change


async def open_bucket(
    js: JetStreamContext, spec: BucketSpec, *, adjust: bool = True
) -> "JetStreamKeyValue":
    """Create (or bind to) the bucket of `spec`. With `adjust`, an existing bucket is brought
    to the spec's replicas and placement (its other limits stay); without, it is used as it
    is."""
    bucket, placement = spec.name, spec.placement
    config = api.KeyValueConfig(bucket=bucket, history=1, ttl=spec.ttl,
                                storage=api.StorageType(spec.storage),
                                replicas=spec.replicas)  # fmt: skip
    try:
        try:
            if placement:
                await js.add_stream(_placed_stream(config, placement))
                kv = await js.key_value(bucket)
            else:
                kv = await js.create_key_value(config=config)
        except nats.js.errors.APIError:  # it exists, made with other settings
            kv = await js.key_value(bucket)
            if adjust:
                await _place(js, bucket, spec.replicas, placement)
    except nats.errors.Error as exc:
        raise BusError(f"open bucket {bucket}: {exc!r}") from None
    return JetStreamKeyValue(kv, bucket, js)


async def _place(js: JetStreamContext, bucket: str, replicas: int, tags: tuple[str, ...]) -> None:
    # An existing bucket follows `replicas` and placement as the streams do (the server moves
    # it); its other limits are left as they are.
    info = await js.stream_info(_stream(bucket))
    config = info.config
    placed = tuple(config.placement.tags or ()) if config.placement else ()
    if config.num_replicas == replicas and placed == tags:
        return
    config.num_replicas = replicas
    config.placement = api.Placement(tags=list(tags)) if tags else None
    what = f"update bucket {bucket} (replicas {replicas}, placement tags {list(tags)})"
    await change(js.update_stream(config), what)


def _stream(bucket: str) -> str:
    """The name of the stream that holds `bucket` (as nats-py and the server name it)."""
    return f"KV_{bucket}"


def _placed_stream(config: api.KeyValueConfig, placement: tuple[str, ...]) -> api.StreamConfig:
    # The stream create_key_value makes, with placement (which nats-py leaves out).
    assert config.ttl is not None
    return api.StreamConfig(
        name=_stream(config.bucket),
        subjects=[f"$KV.{config.bucket}.>"],
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=min(120.0, config.ttl) if config.ttl else 120.0,
        max_age=config.ttl,
        max_consumers=-1,
        max_msgs=-1,
        max_msgs_per_subject=config.history,
        num_replicas=config.replicas,
        storage=config.storage,
        placement=api.Placement(tags=list(placement)),
    )


class JetStreamKeyValue:
    """A JetStream key-value bucket."""

    def __init__(self, kv: NatsKeyValue, bucket: str, js: JetStreamContext) -> None:
        self._kv = kv
        self._js = js
        self.bucket = bucket

    def subject(self, key: str) -> str:
        """The subject a put or delete of `key` is published on (wildcards allowed)."""
        return f"$KV.{self.bucket}.{key}"

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`."""
        try:
            await self._kv.put(key, value)
        except nats.errors.Error as exc:
            raise BusError(f"put {self.bucket}/{key}: {exc}") from None

    async def create(self, key: str, value: bytes) -> bool:
        """Store `value` under `key` unless the key holds a value already; True if stored."""
        try:
            await self._kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except nats.errors.Error as exc:
            raise BusError(f"create {self.bucket}/{key}: {exc}") from None
        return True

    async def delete(self, key: str) -> None:
        """Delete `key` (watchers see a delete marker)."""
        try:
            await self._kv.delete(key)
        except nats.errors.Error as exc:
            raise BusError(f"delete {self.bucket}/{key}: {exc}") from None

    async def exists(self, key: str) -> bool:
        """Whether `key` holds a live value."""
        return await self.get(key) is not None

    async def get(self, key: str) -> bytes | None:
        """The live value of `key`, or None."""
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # also a deleted or purged key
            return None
        except nats.errors.Error as exc:
            raise BusError(f"get {self.bucket}/{key}: {exc}") from None
        return entry.value

    async def items(self, prefix: str) -> dict[str, bytes]:
        """Every live key starting with `prefix`, with its value.

        The keys come from the stream's own count of messages per subject, not from nats-py's
        `keys()`: its watcher can end its listing early, and returns nothing or part of the
        bucket while other keys are being written (nats-io/nats.py#842). Up to 100,000 keys
        match per call (the server's limit on one stream info), far beyond what the project's
        buckets hold: an announcement per instance, a record per un-acked suspect message.
        """
        root = self.subject("")
        # A prefix that ends a token narrows the server's count; any other is filtered here.
        wanted = f"{root}{prefix}>" if prefix.endswith(".") else f"{root}>"
        try:
            info = await self._js.stream_info(_stream(self.bucket), subjects_filter=wanted)
        except nats.errors.Error as exc:
            raise BusError(f"list {self.bucket}: {exc}") from None
        keys = [s.removeprefix(root) for s in info.state.subjects or {}]
        out = {}
        for key in (k for k in keys if k.startswith(prefix)):
            value = await self.get(key)  # None for a key whose last word is a delete marker
            if value is not None:
                out[key] = value
        return out
