"""Settings: defaults < pipeline file < environment < explicit overrides, over the default graph."""

import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from shared.app.load import load
from shared.components import Factory
from shared.config import load_settings
from shared.errors import ConfigError
from shared.graph import Graph
from shared.settings import Settings, StageDecl
from tests.support import ROOT, STAGE_NAMES


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("ORCH_") or key == "NATS_URL":
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_match_the_design():
    s = load()
    assert s.nats_url is None
    assert s.entry == "rag"
    assert [s.stages[n].capacity for n in STAGE_NAMES] == [1024, 512, 512, 1024, 512]
    assert s.stages["inference"].concurrency == 128
    assert s.middleware == []


def test_file_beats_defaults_and_keeps_unnamed_siblings(tmp_path):
    s = load(write(tmp_path, "partitions = 4\n[stages.post]\ncapacity = 10\n"))
    assert s.partitions == 4
    assert s.stages["post"].capacity == 10
    assert s.stages["post"].handler == "services.post.stage:post"  # merged with the default
    assert s.stages["post"].next == "stream"
    assert s.stages["rag"].capacity == 1024


def test_env_beats_file_and_cli_beats_env(tmp_path, monkeypatch):
    path = write(tmp_path, 'nats_url = "nats://file:1"\n[stages.inference]\nconcurrency = 3\n')
    monkeypatch.setenv("ORCH_STAGES__INFERENCE__CONCURRENCY", "7")
    monkeypatch.setenv("ORCH_STAGES__INFERENCE__OPTIONS__ECHO__TOKEN_DELAY", "0.5")
    monkeypatch.setenv("NATS_URL", "nats://env:2")
    s = load(path)
    assert s.nats_url == "nats://env:2"
    assert s.stages["inference"].concurrency == 7
    assert s.stages["inference"].options == {"echo": {"token_delay": 0.5}}
    assert s.stages["rag"].concurrency == 128
    monkeypatch.setenv("ORCH_NATS_URL", "nats://orch:3")
    assert load(path).nats_url == "nats://orch:3"
    assert load(path, nats_url="nats://cli:4").nats_url == "nats://cli:4"
    assert load(path, nats_url=None).nats_url == "nats://orch:3"


def test_config_path_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_CONFIG", str(write(tmp_path, "partitions = 3\n")))
    s = load()
    assert s.partitions == 3
    assert s.source == tmp_path / "pipeline.toml"


def test_without_a_default_graph_the_file_declares_every_stage(tmp_path):
    alone = write(
        tmp_path, 'entry = "only"\n[stages.only]\nhandler = "services.stream.stage:stream"\n'
    )
    assert Graph(load_settings(alone)).names == ["only"]
    assert load_settings().stages == {}  # a client needs no stages
    with pytest.raises(ConfigError, match="no stages declared"):
        Graph(load_settings())


def test_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="partitions"):
        load(write(tmp_path, "partitions = 0\n"))
    with pytest.raises(ConfigError, match="capacityy"):
        load(write(tmp_path, "[stages.post]\ncapacityy = 1\n"))


def test_invalid_values_are_one_line_naming_each_key(tmp_path):
    path = write(tmp_path, "partitions = 0\n[stages.post]\ncapacityy = 1\nbatch = 0\n")
    with pytest.raises(ConfigError) as invalid:
        load(path)
    assert str(invalid.value) == (
        f"invalid configuration in {path} or the environment: "
        "partitions: Input should be greater than or equal to 1 (got 0); "
        "stages.post.batch: Input should be greater than or equal to 1 (got 0); "
        "stages.post.capacityy: Extra inputs are not permitted (got 1)"
    )
    assert [p.key for p in invalid.value.problems] == [
        "partitions", "stages.post.batch", "stages.post.capacityy"]  # fmt: skip


def test_keys_of_the_earlier_layout_name_their_new_place(tmp_path, monkeypatch):
    path = write(tmp_path, (
        "[channels.intake]\ncapacity = 5\n[channels.post]\ncapacity = 6\n"
        "[rag]\ntop_k = 1\n[assemble]\ntemplate = 'x'\n"
        "[worker]\nkind = 'echo'\necho_token_delay = 0.1\n"
    ))  # fmt: skip
    monkeypatch.setenv("ORCH_WORKER__KIND", "echo")
    monkeypatch.setenv("ORCH_CHANNELS__POST__CAPACITY", "7")
    with pytest.raises(ConfigError) as moved:
        load(path)
    problems = {p.key: p.message for p in moved.value.problems}
    assert problems["channels.intake.capacity"].startswith("moved: set stages.rag.capacity")
    assert problems["channels.post.capacity"].startswith("moved: set stages.post.capacity")
    assert problems["rag.top_k"].startswith("moved: set stages.rag.options.top_k")
    assert problems["assemble.template"].startswith("moved: set stages.assemble.options.template")
    assert problems["worker.kind"].startswith("moved: set stages.inference.options.worker")
    assert problems["worker.echo_token_delay"].startswith(
        "moved: set stages.inference.options.echo.token_delay"
    )
    assert problems["ORCH_WORKER__KIND"].startswith(
        "moved: set ORCH_STAGES__INFERENCE__OPTIONS__WORKER"
    )
    assert problems["ORCH_CHANNELS__POST__CAPACITY"].startswith(
        "moved: set ORCH_STAGES__POST__CAPACITY"
    )


def test_an_orch_variable_that_names_no_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("ORCH_PARTITONS", "4")
    monkeypatch.setenv("ORCH_LOG_LEVEL", "DEBUG")  # read elsewhere: not a setting, not an error
    with pytest.raises(ConfigError) as unknown:
        load()
    assert [str(p) for p in unknown.value.problems] == ["ORCH_PARTITONS: no such setting"]


def test_unreadable_pipeline_file_is_a_one_line_config_error(tmp_path, monkeypatch):
    bad = write(tmp_path, "partitions = 4\n[stages.post\ncapacity = 1\n")
    with pytest.raises(ConfigError) as syntax:
        load(bad)
    message = str(syntax.value)
    assert message.startswith(f"pipeline file {bad} is not valid TOML:")
    assert "line 2, column 13" in message
    assert "\n" not in message
    monkeypatch.setenv("ORCH_CONFIG", str(bad))  # the path stage processes take
    with pytest.raises(ConfigError, match="not valid TOML"):
        load()
    with pytest.raises(ConfigError, match=f"cannot read pipeline file {tmp_path}: "):
        load(tmp_path)  # a directory: open() fails
    bad.write_bytes(b"partitions = \xff\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load(bad)


def _fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_example_pipeline_documents_every_key_and_loads():
    path = ROOT / "pipeline.example.toml"
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    top = _fields(Settings) - {"stages", "middleware", "nats_url", "health_file", "instance"}
    assert top <= set(data), top - set(data)  # commented: unset by default
    settings = load(path)
    for name in STAGE_NAMES:
        table = data["stages"][name]
        module, _, attr = table["handler"].partition(":")
        factory = getattr(__import__(module, fromlist=["x"]), attr)
        assert isinstance(factory, Factory) and factory.options is not None
        missing = _fields(StageDecl) - set(table) - {"enabled", "routes"}
        if settings.stages[name].next is None:
            missing.discard("next")
        if not _fields(factory.options):
            missing.discard("options")
        assert not missing, (name, missing)
        # Every option of the stage's factory is shown too (those unset by default are
        # shown commented out).
        shown = set(table.get("options", {}))
        model = factory.options()
        unset = {k for k in _fields(factory.options) if getattr(model, k) in (None, [], {})}
        assert _fields(factory.options) - unset <= shown, (name, shown)
    # The example shows the defaults, so loading it changes nothing but the options it spells
    # out with their default values.
    defaults = load()
    for name in STAGE_NAMES:
        a = settings.stages[name].model_dump(exclude={"options"})
        assert a == defaults.stages[name].model_dump(exclude={"options"}), name
    assert settings.model_dump(exclude={"stages"}) == defaults.model_dump(exclude={"stages"})


def test_a_server_list_is_taken_from_a_file_list_a_comma_string_or_repeated_flags(tmp_path):
    from shared.app.cli import _parser

    path = tmp_path / "p.toml"
    path.write_text('nats_url = ["nats://a:4222", "b:4222"]\n', encoding="utf-8")
    assert load(path).nats_url == "nats://a:4222,b:4222"
    assert load(nats_url="nats://a:4222, tls://b:4222").nats_url == "nats://a:4222,tls://b:4222"
    args = _parser().parse_args(["--nats-url", "nats://a:1", "--nats-url", "b:2", "status"])
    assert args.nats_url == "nats://a:1,b:2"
    with pytest.raises(ConfigError, match="websocket and other URLs cannot be mixed"):
        load(nats_url="nats://a:1,ws://b:2")
