"""The stage graph: every broken declaration is named precisely; routes pick the next stage."""

from pathlib import Path

import msgspec
import pytest

from shared.app.load import load
from shared.envelope import Envelope
from shared.errors import ConfigError
from shared.graph import Graph


def graph_of(tmp_path: Path, text: str) -> Graph:
    path = tmp_path / "pipeline.toml"
    path.write_text(text, encoding="utf-8")
    return Graph(load(path))


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as broken:
        graph_of(tmp_path, text)
    return [str(p) for p in broken.value.problems]


EXTRA = """
[stages.post]
next = "moderate"
[stages.moderate]
handler = "m:moderate"
next = "stream"
[stages.translate]
handler = "m:translate"
next = "post"
[stages.inference]
routes = [{ when = { metadata.task = "translate" }, to = "translate" }]
"""


def test_a_sixth_stage_and_a_branch_are_ordered_and_routed(tmp_path):
    graph = graph_of(tmp_path, EXTRA)
    names = graph.names
    assert names[0] == "rag" and names[-1] == "stream"
    assert names.index("translate") < names.index("post") < names.index("moderate")
    route = graph["inference"].route
    request = Envelope(request_id="r", session_id="s", input="x", created_at=0.0)
    assert route(request) == "post"
    tagged = msgspec.structs.replace(request, metadata={"task": "translate"})
    assert route(tagged) == "translate"
    other = msgspec.structs.replace(request, metadata={"task": "summarise"})
    assert route(other) == "post"
    assert "inference -[metadata.task=translate]-> translate" in graph.describe()


def test_route_values_compare_as_json(tmp_path):
    graph = graph_of(tmp_path, EXTRA.replace('"translate" }', '[1, "one"] }', 1))
    route = graph["inference"].route
    base = Envelope(request_id="r", session_id="s", input="x", created_at=0.0)
    for value, expected in ((1, "translate"), ("one", "translate"), (1.0, "translate"),
                            (True, "post"), ("1", "post")):  # fmt: skip
        env = msgspec.structs.replace(base, metadata={"task": value})
        assert route(env) == expected, value
    by_data = graph_of(tmp_path, EXTRA.replace("metadata.task", "data.lang"))["inference"].route
    assert by_data(base.with_data(lang="translate")) == "translate"


def test_a_route_to_a_stage_that_does_not_exist(tmp_path):
    found = problems(tmp_path, '[stages.post]\nnext = "moderat"\n')
    assert found == [
        "stages.post.next: no stage named 'moderat' (stages: assemble, inference, post, rag, "
        "stream)"
    ]
    found = problems(tmp_path, '[stages.inference]\nroutes = [{when={session_id="a"}, to="x"}]\n')
    assert found[0].startswith("stages.inference.routes[0].to: no stage named 'x'")


def test_a_cycle(tmp_path):
    found = problems(tmp_path, '[stages.post]\nnext = "assemble"\n')
    assert found == [
        "stages.post: cycle assemble -> inference -> post -> assemble: a request may pass each "
        "stage only once"
    ]


def test_an_unreachable_stage(tmp_path):
    found = problems(tmp_path, '[stages.lonely]\nhandler = "m:f"\nnext = "stream"\n')
    assert found == [
        "stages.lonely: unreachable: no next or route leads to it from the entry stage 'rag' "
        "(set enabled = false to leave it out)"
    ]
    # Disabled, it is left out; a disabled stage cannot be routed to.
    graph = graph_of(tmp_path, '[stages.lonely]\nhandler = "m:f"\nenabled = false\n')
    assert "lonely" not in graph.names
    found = problems(tmp_path, "[stages.post]\nenabled = false\n")
    assert found == ["stages.inference.next: stage 'post' is disabled"]


def test_bad_names_entries_and_conditions(tmp_path):
    assert problems(tmp_path, 'entry = "nope"\n') == [
        "entry: no stage named 'nope' (stages: assemble, inference, post, rag, stream)"
    ]
    found = problems(tmp_path, '[stages.results]\nhandler = "m:f"\nnext = "stream"\n')
    assert found[0].startswith("stages.results: 'results' is reserved")
    found = problems(tmp_path, '[stages."Bad.Name"]\nhandler = "m:f"\n')
    assert found[0].startswith("stages.Bad.Name: a stage name is 1-32 lower-case letters")
    found = problems(tmp_path, EXTRA.replace("metadata.task", "context"))
    assert found == [
        "stages.inference.routes[0].when.context: cannot route on 'context': use "
        "metadata.<key>, data.<key> or one of session_id, request_id, input"
    ]
    found = problems(tmp_path, '[stages.inference]\nnext = "rag"\n')
    assert found[0].startswith("stages.inference.next: 'rag' is the entry stage")
    found = problems(tmp_path, EXTRA + '[[middleware]]\nfactory = "m:f"\nstages = ["nope"]\n')
    assert found[0].startswith("middleware[0].stages: no enabled stage named 'nope'")


def test_bad_limits_name_their_key(tmp_path):
    found = problems(tmp_path, "[stages.rag]\nconcurrency = 0\nbackoff = [-1]\n")
    assert found == [
        "stages.rag.concurrency: Input should be greater than or equal to 1 (got 0)",
        "stages.rag.backoff: backoff delays must be >= 0",
    ]
