"""Each stage's handler alone: a pure async function from envelope to output."""

import itertools

import pytest

from services.assemble.stage import render
from services.post.stage import clean
from services.registry import PIPELINE, STAGES
from shared.envelope import Envelope, Result
from shared.errors import ConfigError
from shared.failure import Reject
from shared.retrieval import Retriever
from shared.settings import WorkerSettings, load_settings
from shared.workers import EchoWorker, ModelWorker, load_worker


@pytest.fixture
def settings(monkeypatch):
    for key in ("ORCH_CONFIG", "NATS_URL"):
        monkeypatch.delenv(key, raising=False)
    return load_settings()


def request(text: str = "What is JetStream?", session: str = "s") -> Envelope:
    return Envelope(request_id="r1", session_id=session, input=text, created_at=1.0)


def test_pipeline_order_and_channels_chain():
    assert [s.name for s in PIPELINE] == ["rag", "assemble", "inference", "post", "stream"]
    assert PIPELINE[0].input == "intake"
    for upstream, downstream in itertools.pairwise(PIPELINE):
        assert upstream.output == downstream.input
    assert PIPELINE[-1].output == "results"


async def test_full_chain_in_memory(settings):
    env = request()
    for spec in PIPELINE:
        env = await spec.build(settings)(env)
    assert isinstance(env, Result)
    assert env.output.startswith("Context: - JetStream adds persistence to NATS")
    assert env.output.endswith("Question: What is JetStream? Answer:")


async def test_rag_attaches_top_k_relevant_passages(settings):
    out = await STAGES["rag"].build(settings)(request("dead-letter stream reason"))
    assert len(out.context) == 2
    assert "dead-letter" in out.context[0]


async def test_rag_with_corpus_file(tmp_path, settings):
    corpus = tmp_path / "c.txt"
    corpus.write_text("apples are red\n\nbananas are yellow\n", encoding="utf-8")
    settings.rag.corpus = corpus
    out = await STAGES["rag"].build(settings)(request("yellow bananas"))
    assert out.context == ["bananas are yellow"]


def test_retriever_missing_corpus_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read corpus"):
        Retriever.from_file(tmp_path / "nope.txt")


def test_retriever_returns_nothing_without_overlap():
    assert Retriever(["alpha beta"]).search("gamma", 3) == []


def test_render_uses_template_and_keeps_braces_in_input():
    env = request("a {weird} input").model_copy(update={"context": ["c1", "c2"]})
    assert render("{context}|{input}|{session_id}", env) == "- c1\n- c2|a {weird} input|s"
    assert render("{context}", request()) == "(none)"


def test_clean_joins_and_normalises_whitespace():
    assert clean(["Hello ", " world\n", "\x00!", "  "]) == "Hello world !"


async def test_echo_worker_streams_words():
    tokens = [t async for t in EchoWorker().stream("a  b\nc", session_id="s")]
    assert tokens == ["a  ", "b\n", "c"]


def test_load_worker_builtin_and_import_path():
    assert isinstance(load_worker(WorkerSettings()), EchoWorker)
    custom = load_worker(WorkerSettings(kind="tests.unit.test_stages:make_upper"))
    assert isinstance(custom, ModelWorker)
    with pytest.raises(ConfigError, match="unknown worker kind"):
        load_worker(WorkerSettings(kind="gpt"))
    with pytest.raises(ConfigError, match="cannot load worker"):
        load_worker(WorkerSettings(kind="no.such.module:f"))


async def test_inference_and_stream_reject_skipped_stages(settings):
    with pytest.raises(Reject, match="no prompt"):
        await STAGES["inference"].build(settings)(request())
    with pytest.raises(Reject, match="no output"):
        await STAGES["stream"].build(settings)(request())


class UpperWorker:
    async def stream(self, prompt, *, session_id):
        yield prompt.upper()

    async def aclose(self):
        return None


def make_upper(settings):
    return UpperWorker()
