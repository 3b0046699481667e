"""Names and limits derived from settings and the stage graph."""

from shared.app.load import load
from shared.topology import Topology


def test_names_subjects_and_limits():
    t = Topology(load(partitions=4))
    assert t.channel_names() == ["intake", "assemble", "inference", "post", "stream"]
    intake = t.channel_stream("intake")
    assert (intake.name, intake.subjects) == ("ORCH_INTAKE", ("orch.intake.*",))
    assert (intake.retention, intake.discard, intake.max_msgs) == ("workqueue", "new", 1024)
    assert t.channel_stream("post").max_msgs == 1024
    assert t.subject_for("assemble", "alice") == "orch.assemble.3"  # fnv1a32("alice") % 4
    assert t.intake_subject("alice") == "orch.intake.3"
    assert t.output_subject("inference", "alice", "r") == "orch.inference.3"
    assert t.output_subject(None, "alice", "r") == "orch.results.r"
    assert t.result_subject("abc") == "orch.results.abc"
    results = t.results_stream()
    assert (results.retention, results.max_msgs_per_subject) == ("limits", 1)
    dlq = t.dlq_stream()
    assert (dlq.name, dlq.retention, dlq.discard) == ("ORCH_DLQ", "limits", "new")
    assert dlq.subjects == ("orch.dlq.*.*",)
    assert t.dlq_subject("post", "expired") == "orch.dlq.post.expired"
    assert t.dlq_subject() == "orch.dlq.*.*"
    counters = t.counters_stream()
    assert (counters.name, counters.counter) == ("ORCH_COUNTERS", True)
    assert t.counter_subject("purged") == "orch.counters.purged"
    assert len(t.streams()) == 9
    assert t.token_subject("r") == "orch.tokens.r"
    assert t.channel_of_subject("orch.post.3") == "post"
    assert t.channel_of_subject("orch.nothing.3") is None


def test_instance_consumer_reads_its_partitions_with_one_extra_delivery():
    s = load()
    t = Topology(s)
    c = t.consumer(t.graph["inference"], "inference-h-1-ab", [5, 1])
    assert (c.stream, c.durable) == ("ORCH_INFERENCE", "inference_inference-h-1-ab")
    assert c.filter_subjects == ("orch.inference.1", "orch.inference.5")
    assert c.max_deliver == s.stages["inference"].max_deliver + 1
    assert c.max_ack_pending == 512
    assert c.inactive_threshold and c.inactive_threshold >= 10 * s.affinity.failover_after
    assert t.partition_of_subject("orch.inference.5") == 5
    assert t.partition_of_subject("orch.inference.*") is None
    assert t.members_bucket() == "ORCH_MEMBERS"


def test_prefixes_apply_everywhere():
    t = Topology(load(subject_prefix="acme", stream_prefix="ACME"))
    assert t.stream_name("dlq") == "ACME_DLQ"
    assert t.dlq_subject("post", "failed") == "acme.dlq.post.failed"
    assert all(s.subjects[0].startswith("acme.") for s in t.streams())


def test_an_added_stage_gets_its_own_channel(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        '[stages.post]\nnext = "moderate"\n'
        '[stages.moderate]\nhandler = "m:f"\nnext = "stream"\ncapacity = 7\n',
        encoding="utf-8",
    )
    t = Topology(load(path))
    assert t.channel_names() == ["intake", "assemble", "inference", "post", "moderate", "stream"]
    assert t.channel_stream("moderate").max_msgs == 7
    assert t.channel_stream("moderate").name == "ORCH_MODERATE"
    assert len(t.streams()) == 10
