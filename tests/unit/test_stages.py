"""Each built-in stage alone: a factory building a pure async function from envelope to output."""

import contextlib
import inspect
from typing import Any

import msgspec
import pytest

from shared.app.load import load
from shared.components import Context, open_component, prepare
from shared.data import COMPLETION, CONTEXT, OUTPUT, PROMPT, USAGE
from shared.envelope import Envelope, Result, Usage
from shared.errors import ConfigError
from shared.failure import Reject
from shared.graph import Graph
from shared.retrieval import Retriever
from shared.stage import Streaming
from shared.workers import EchoWorker, ModelWorker, load_worker
from shared.workers.errors import ModelUnavailable
from shared.workers.models import ModelRouter
from tests.support import STAGE_NAMES


@pytest.fixture
def settings(monkeypatch):
    for key in ("ORCH_CONFIG", "NATS_URL"):
        monkeypatch.delenv(key, raising=False)
    return load()


def request(text: str = "What is JetStream?", session: str = "s") -> Envelope:
    return Envelope(request_id="r1", session_id=session, input=text, created_at=1.0)


@contextlib.asynccontextmanager
async def handler_of(settings, name: str, **options: Any):
    """The handler of stage `name`, built as the runtime builds it (set up, then torn down);
    a streaming handler's pieces are collected in `handle.pieces`."""
    decl = settings.stages[name]
    prepared = prepare(decl.handler, "stage", {**decl.options, **options}, f"stages.{name}")
    async with contextlib.AsyncExitStack() as stack:
        handler = await open_component(prepared, Context(name, "test", prepared.options), stack)
        plain = handler.complete if isinstance(handler, Streaming) else None
        stream = handler.stream if isinstance(handler, Streaming) else handler
        if plain is None and not inspect.isasyncgenfunction(stream):
            yield handler
            return

        async def handle(request: Envelope) -> Any:
            if plain is not None and not request.stream:  # as the runtime calls it
                handle.pieces = []  # type: ignore[attr-defined]
                return await plain(request)
            *pieces, output = [item async for item in stream(request)]
            handle.pieces = pieces  # type: ignore[attr-defined]
            return output

        yield handle


def test_default_graph_chains_the_five_stages(settings):
    graph = Graph(settings)
    assert graph.names == STAGE_NAMES == ["rag", "assemble", "inference", "post", "stream"]
    assert graph.channels == ["intake", "assemble", "inference", "post", "stream"]
    assert [graph[n].route.default for n in graph.names] == [*STAGE_NAMES[1:], None]
    assert graph["stream"].last and not graph["post"].last


async def test_full_chain_in_memory(settings):
    env: Envelope | Result = request()
    for name in STAGE_NAMES:
        async with handler_of(settings, name) as handle:
            assert isinstance(env, Envelope)
            env = await handle(env)
    assert isinstance(env, Result)
    assert env.output.startswith("Context:\n- JetStream adds persistence to NATS")
    assert env.output.endswith("Question: What is JetStream?\nAnswer:")


async def test_each_stage_hands_on_by_name_in_data(settings):
    async with handler_of(settings, "rag") as rag:
        env = await rag(request("dead-letter stream reason"))
    assert len(CONTEXT.read(env)) == 2 and "dead-letter" in CONTEXT.read(env)[0]
    async with handler_of(settings, "assemble", template="{context}|{input}") as assemble:
        env = await assemble(env)
    prompt = PROMPT.read(env)
    assert prompt.endswith("|dead-letter stream reason")
    async with handler_of(settings, "inference") as inference:
        unfollowed = await inference(env)
        assert inference.pieces == []  # nobody follows this request's tokens
        env = await inference(msgspec.structs.replace(env, stream=True))
        pieces = inference.pieces
    completion = COMPLETION.read(env)
    assert completion == prompt == COMPLETION.read(unfollowed)  # the echo worker
    assert "".join(p.text for p in pieces) == completion  # as it was generated
    assert "prompt" not in env.data  # no later stage reads it: it is not carried on
    usage = USAGE.read(env)
    assert (usage.model, usage.pool, usage.fallback) == ("echo", "default", False)
    async with handler_of(settings, "post") as post:
        env = await post(env)
    assert OUTPUT.read(env) == completion.strip()
    assert sorted(env.data) == ["output", "usage"]


async def test_assemble_carries_the_passages_on_only_when_told(settings):
    env = CONTEXT.write(request("q"), ["c1", "c2"])
    async with handler_of(settings, "assemble", template="{context}") as assemble:
        out = await assemble(env)
    assert sorted(out.data) == ["prompt"]  # the passages are in the prompt: not carried on
    assert PROMPT.read(out) == "- c1\n- c2"
    async with handler_of(settings, "assemble", keep_context=True) as assemble:
        out = await assemble(env)
    assert CONTEXT.read(out) == ["c1", "c2"]  # for a later stage of the user's that cites them


async def test_rag_with_corpus_file(tmp_path, settings):
    corpus = tmp_path / "c.txt"
    corpus.write_text("apples are red\n\nbananas are yellow\n", encoding="utf-8")
    async with handler_of(settings, "rag", corpus=str(corpus)) as rag:
        out = await rag(request("yellow bananas"))
    assert CONTEXT.read(out) == ["bananas are yellow"]


def test_stage_options_are_checked_against_the_factory_model(settings):
    with pytest.raises(ConfigError) as bad:
        prepare("services.rag.stage:rag", "stage", {"top_k": 99, "corpse": "x"}, "stages.rag")
    keys = [p.key for p in bad.value.problems]
    assert keys == ["stages.rag.options.top_k", "stages.rag.options.corpse"]
    with pytest.raises(ConfigError, match="unknown fields"):
        prepare("services.assemble.stage:assemble", "stage", {"template": "{x}"}, "stages.a")
    with pytest.raises(ConfigError, match=r"stages\.post\.options\.anything: Extra inputs"):
        prepare("services.post.stage:post", "stage", {"anything": 1}, "stages.post")


def test_inference_options_name_only_known_models():
    ref, key = "services.inference.stage:inference", "stages.inference"
    with pytest.raises(ConfigError, match=r"no model named \['nope'\]"):
        prepare(ref, "stage", {"fallback": ["nope"]}, key)
    with pytest.raises(ConfigError, match=r"no model named \['gone'\]"):
        prepare(ref, "stage", {"routes": [{"when": {"session_id": "a"}, "model": "gone"}]}, key)
    with pytest.raises(ConfigError, match="needs its settings"):
        prepare(ref, "stage", {"models": {"big": {"worker": "openai"}}}, key)
    ok = prepare(ref, "stage", {"models": {"big": {"fallback": ["default"]}}}, key)
    assert list(ok.options.models) == ["big"]


def test_retriever_missing_corpus_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read corpus"):
        Retriever.from_file(tmp_path / "nope.txt")


def test_retriever_returns_nothing_without_overlap():
    assert Retriever(["alpha beta"]).search("gamma", 3) == []


def test_retriever_ranks_by_rarer_shared_words_then_corpus_order():
    passages = ["the cat sat", "the dog ran", "the cat ran", "a bird"]
    retriever = Retriever(passages)
    # "ran" and "cat" each occur twice, "the" three times: passage 2 has two rarer words
    assert retriever.search("The cat RAN!", 4) == ["the cat ran", "the cat sat", "the dog ran"]
    assert retriever.search("cat ran", 1) == ["the cat ran"]
    assert retriever.search("the", 2) == ["the cat sat", "the dog ran"]  # a tie: corpus order
    assert retriever.search("the", 0) == []


def test_render_uses_template_and_keeps_braces_in_input():
    from services.assemble.stage import render

    env = CONTEXT.write(request("a {weird} input"), ["c1", "c2"])
    assert render("{context}|{input}|{session_id}", env) == "- c1\n- c2|a {weird} input|s"
    assert render("{context}", request()) == "(none)"


def test_post_keeps_a_multi_line_answer_with_a_code_block_byte_for_byte():
    from services.post.stage import clean

    answer = (
        "Here is how:\n\n1. Connect.\n2. Publish:\n\n```python\nasync def main():\n"
        '    await nc.publish("a.b", b"hi")  # two  spaces\n\tpass\n```\n\nDone.'
    )
    assert clean(f"  \n{answer}\n\n  ") == answer  # trimmed, nothing else
    assert clean(f"{answer}<end_of_turn><eos>") == answer  # special tokens removed
    assert clean("a\x00b\x07c\r\nd") == "abc\r\nd"  # control characters, not line breaks


async def test_echo_worker_answers_at_once_or_word_by_word_at_its_pace():
    usage = Usage(model="echo", prompt_tokens=3, completion_tokens=3)
    at_once = [t async for t in EchoWorker().stream("a  b\nc", session_id="s")]
    assert at_once == ["a  b\nc", usage]
    paced = [t async for t in EchoWorker(token_delay=0.001).stream("a  b\nc", session_id="s")]
    assert paced == ["a  ", "b\n", "c", usage]


async def test_echo_worker_answers_whole_as_it_streams():
    for worker in (EchoWorker(), EchoWorker(token_delay=0.001)):
        *pieces, usage = [t async for t in worker.stream(" a  b\nc ", session_id="s")]
        assert await worker.complete(" a  b\nc ", session_id="s") == ("".join(pieces), usage)


class Down:
    """A model that is never there."""

    async def stream(self, prompt: str, *, session_id: str):
        raise ModelUnavailable("down")
        yield  # an async generator

    async def aclose(self) -> None:
        pass


class Streams:
    """A model that only streams: a piece per word, no usage."""

    async def stream(self, prompt: str, *, session_id: str):
        for word in prompt.split():
            yield word + "."

    async def aclose(self) -> None:
        pass


async def test_the_router_answers_whole_as_it_streams_through_its_fallbacks():
    router = ModelRouter({"default": Down(), "plain": Streams(), "echo": EchoWorker()},
                         {"default": ["default", "plain"]}, [])  # fmt: skip
    for asked, text, pool, fallback in [(None, "a.b.", "plain", True),
                                        ("echo", "a b", "echo", False)]:  # fmt: skip
        env = request("a b")
        if asked:
            env = msgspec.structs.replace(env, metadata={"model": asked})
        streamed = [item async for item in router.stream(env, "a b")]
        done = await router.complete(env, "a b")
        assert "".join(i for i in streamed if isinstance(i, str)) == done.text == text
        assert streamed[-1] == done.answered
        assert (done.answered.pool, done.answered.fallback) == (pool, fallback)
        assert done.first is not None and done.first >= done.started
    with pytest.raises(ModelUnavailable, match="no model could answer: default: down"):
        await ModelRouter({"default": Down()}, {}, []).complete(request(), "a")


def test_load_worker_builtin_and_import_path():
    assert isinstance(load_worker("echo"), EchoWorker)
    custom = load_worker("tests.unit.test_stages:make_upper", custom={"x": 1})
    assert isinstance(custom, ModelWorker)
    with pytest.raises(ConfigError, match="unknown worker"):
        load_worker("gpt")
    with pytest.raises(ConfigError, match=r"cannot import no\.such\.module:f"):
        load_worker("no.such.module:f")


async def test_a_stage_missing_what_an_earlier_stage_adds_is_rejected(settings):
    async with handler_of(settings, "inference") as inference:
        with pytest.raises(Reject, match=r"data\.prompt is missing \(the prompt: set by"):
            await inference(request())
    async with handler_of(settings, "stream") as stream:
        with pytest.raises(Reject, match=r"data\.output is missing"):
            await stream(request())
    async with handler_of(settings, "post") as post:
        with pytest.raises(Reject, match=r"data\.completion: expected `str`, got `array`"):
            await post(request().with_data(completion=["not", "text"]))


class UpperWorker:
    async def stream(self, prompt, *, session_id):
        yield prompt.upper()

    async def aclose(self):
        return None


def make_upper(options):
    assert options == {"x": 1}
    return UpperWorker()
