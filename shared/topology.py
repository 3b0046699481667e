"""The streams, subjects and consumers of a pipeline, derived from settings (no I/O here).

Each stage of the graph reads one channel: stream `<STREAM_PREFIX>_<CHANNEL>` holding subjects
`<prefix>.<channel>.<partition>` (the entry stage's channel is `intake`). Results live in
`<STREAM_PREFIX>_RESULTS` under `<prefix>.results.<request_id>`; dead letters in
`<STREAM_PREFIX>_DLQ` under `<prefix>.dlq.<stage>.<reason>`; operator counters in
`<STREAM_PREFIX>_COUNTERS`.
"""

from collections.abc import Iterable
from typing import Literal

from shared.graph import INTAKE, Graph, Stage
from shared.partition import partition_of
from shared.settings import Settings
from shared.transport.api import BucketSpec, ConsumerSpec, StreamSpec

RESULTS = "results"
DLQ = "dlq"
COUNTERS = "counters"
TOKENS = "tokens"
OUTCOMES = "outcomes"
"""The counter of dead-lettered requests' outcomes stored in the results stream."""


class Topology:
    """Names and configurations of everything a pipeline declares on the server."""

    def __init__(self, settings: Settings, graph: Graph | None = None) -> None:
        self.settings = settings
        self._graph = graph
        self.prefix = settings.subject_prefix
        self.partitions = settings.partitions

    @property
    def graph(self) -> Graph:
        """The stage graph (built on first use: a client needs none of it)."""
        if self._graph is None:
            self._graph = Graph(self.settings)
        return self._graph

    def stream_name(self, channel: str) -> str:
        """The stream behind `channel`."""
        return f"{self.settings.stream_prefix}_{channel.upper()}"

    def channel_subject(self, channel: str, partition: int) -> str:
        """The subject of one partition of `channel`."""
        return f"{self.prefix}.{channel}.{partition}"

    def channel_subjects(self, channel: str) -> str:
        """The wildcard subject of every partition of `channel`."""
        return f"{self.prefix}.{channel}.*"

    def subject_for(self, channel: str, session_id: str) -> str:
        """The subject a session's message travels on in `channel`."""
        return self.channel_subject(channel, partition_of(session_id, self.partitions))

    def intake_subject(self, session_id: str) -> str:
        """Where a client publishes a request of `session_id`."""
        return self.subject_for(INTAKE, session_id)

    def status_subject(self, instance: str) -> str:
        """Where a stage instance answers requests for its status (a NATS micro endpoint;
        four tokens, so no channel's stream, `<prefix>.<channel>.*`, captures it)."""
        return f"{self.prefix}.stages.status.{instance}"

    def result_subject(self, request_id: str) -> str:
        """Where the result of `request_id` is stored."""
        return f"{self.prefix}.{RESULTS}.{request_id}"

    def output_subject(self, stage: str | None, session_id: str, request_id: str) -> str:
        """Where an output goes: the channel of `stage`, or the results when it is None."""
        if stage is None:
            return self.result_subject(request_id)
        return self.subject_for(self.graph[stage].channel, session_id)

    def _stream(
        self,
        channel: str,
        subject: str,
        retention: Literal["workqueue", "limits"],
        discard: Literal["new", "old"],
        max_msgs: int,
        max_bytes: int,
        max_age: float = 0.0,
        max_msgs_per_subject: int = -1,
        counter: bool = False,
    ) -> StreamSpec:
        s = self.settings
        return StreamSpec(
            name=self.stream_name(channel),
            subjects=(subject,),
            retention=retention,
            discard=discard,
            max_msgs=max_msgs,
            max_bytes=max_bytes,
            max_age=max_age,
            # The stage, not the server, rejects oversized messages, so that they reach the
            # dead-letter stream with a reason; the server keeps its own hard ceiling above.
            max_msg_size=-1,
            max_msgs_per_subject=max_msgs_per_subject,
            storage=s.storage,
            replicas=s.replicas,
            placement=tuple(s.placement),
            duplicate_window=s.duplicate_window,
            counter=counter,
        )

    def channel_names(self) -> list[str]:
        """The channels of the graph's stages, intake first."""
        return self.graph.channels

    def channel_stream(self, channel: str) -> StreamSpec:
        """The bounded work-queue stream of `channel`."""
        stage = self.graph.reading(channel)
        if stage is None:
            raise KeyError(f"no stage reads channel {channel!r}")
        decl = stage.decl
        subject = self.channel_subjects(channel)
        return self._stream(channel, subject, "workqueue", "new", decl.capacity, decl.max_bytes)

    def results_stream(self) -> StreamSpec:
        """The results stream: limits retention, bounded by age, one message per request."""
        r = self.settings.results
        return self._stream(RESULTS, f"{self.prefix}.{RESULTS}.*", "limits", "old",
                            r.max_msgs, r.max_bytes, r.max_age, max_msgs_per_subject=1)  # fmt: skip

    def token_subject(self, request_id: str) -> str:
        """Where the tokens of `request_id`'s answer are published as they are generated."""
        return f"{self.prefix}.{TOKENS}.{request_id}"

    def tokens_stream(self) -> StreamSpec:
        """The token stream: limits retention, kept for a short while, oldest dropped first."""
        t = self.settings.tokens
        return self._stream(TOKENS, f"{self.prefix}.{TOKENS}.*", "limits", "old",
                            t.max_msgs, t.max_bytes, t.max_age)  # fmt: skip

    def dlq_subject(self, stage: str = "*", reason: str = "*") -> str:
        """Where `stage` puts what it cannot process for `reason` (wildcards by default)."""
        return f"{self.prefix}.{DLQ}.{stage}.{reason}"

    def counter_subject(self, name: str) -> str:
        """The subject of one operator counter (e.g. `replayed.intake`, `purged`)."""
        return f"{self.prefix}.{COUNTERS}.{name}"

    def counters_stream(self) -> StreamSpec:
        """Exact, server-side counters of operator actions, for the accounting identity."""
        subject = f"{self.prefix}.{COUNTERS}.>"
        return self._stream(COUNTERS, subject, "limits", "old", -1, -1, counter=True)

    def dlq_stream(self) -> StreamSpec:
        """The dead-letter stream: limits retention so entries stay until replayed or purged."""
        d = self.settings.dead_letter
        # Refusing new entries keeps old ones: the stage then holds the message instead.
        return self._stream(DLQ, f"{self.prefix}.{DLQ}.*.*", "limits", "new",
                            d.max_msgs, d.max_bytes, d.max_age)  # fmt: skip

    def streams(self) -> list[StreamSpec]:
        """Every stream the pipeline needs."""
        channels = [self.channel_stream(c) for c in self.channel_names()]
        return [*channels, self.results_stream(), self.tokens_stream(), self.dlq_stream(),
                self.counters_stream()]  # fmt: skip

    def consumer_name(self, stage: str, instance: str) -> str:
        """The durable consumer of one instance of `stage`."""
        return f"{stage}_{instance}"

    def instance_of_consumer(self, stage: str, consumer: str) -> str | None:
        """The instance whose consumer of `stage` is `consumer` (`consumer_name` reversed);
        None for a consumer the pipeline did not name."""
        instance = consumer.removeprefix(f"{stage}_")
        return instance if instance != consumer else None

    def consumer(self, stage: Stage, instance: str, partitions: Iterable[int]) -> ConsumerSpec:
        """The consumer through which `instance` of `stage` reads the partitions it owns."""
        decl = stage.decl
        return ConsumerSpec(
            stream=self.stream_name(stage.channel),
            durable=self.consumer_name(stage.name, instance),
            filter_subjects=tuple(
                self.channel_subject(stage.channel, p) for p in sorted(partitions)
            ),
            max_ack_pending=decl.max_ack_pending,
            ack_wait=decl.ack_wait,
            # One delivery more than the handler gets: a message whose handling crashed the
            # stage on every attempt comes back once more, to be dead-lettered unhandled.
            max_deliver=decl.max_deliver + 1,
            # A safety net: the consumer of an instance that vanished unnoticed goes away.
            inactive_threshold=max(60.0, 10 * self.settings.affinity.failover_after),
        )

    def partition_of_subject(self, subject: str) -> int | None:
        """The partition a channel subject carries, or None if it is not one."""
        tail = subject.rsplit(".", 1)[-1]
        return int(tail) if tail.isdigit() else None

    def channel_of_subject(self, subject: str) -> str | None:
        """The channel a subject of this pipeline belongs to, or None."""
        parts = subject.split(".")
        if len(parts) != 3 or parts[0] != self.prefix or self.graph.reading(parts[1]) is None:
            return None
        return parts[1]

    def members_bucket(self) -> str:
        """The key-value bucket where stage instances announce themselves."""
        return f"{self.settings.stream_prefix}_MEMBERS"

    def attempts_bucket(self) -> str:
        """The key-value bucket that counts attempts across consumers (shared.runtime.attempts)."""
        return f"{self.settings.stream_prefix}_ATTEMPTS"

    def bucket(self, name: str, ttl: float) -> BucketSpec:
        """Bucket `name`, entries expiring `ttl` s after a put, stored as the streams are."""
        s = self.settings
        return BucketSpec(name, ttl, s.storage, s.replicas, tuple(s.placement))

    def members(self) -> BucketSpec:
        """The members bucket: an announcement lives for `affinity.failover_after`."""
        return self.bucket(self.members_bucket(), self.settings.affinity.failover_after)
