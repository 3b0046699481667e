"""Settings precedence: defaults < pipeline file < environment < explicit overrides."""

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from shared.errors import ConfigError
from shared.settings import Settings, load_settings

ROOT = Path(__file__).parents[2]


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
    s = load_settings()
    assert s.nats_url is None
    assert [s.channels.assemble.capacity, s.channels.inference.capacity] == [512, 512]
    assert [s.channels.post.capacity, s.channels.stream.capacity] == [1024, 512]


def test_file_beats_defaults_and_keeps_unnamed_siblings(tmp_path):
    s = load_settings(write(tmp_path, "partitions = 4\n[channels.post]\ncapacity = 10\n"))
    assert s.partitions == 4
    assert s.channels.post.capacity == 10
    assert s.channels.intake.capacity == 1024


def test_env_beats_file_and_cli_beats_env(tmp_path, monkeypatch):
    path = write(tmp_path, 'nats_url = "nats://file:1"\n[stages.inference]\nconcurrency = 3\n')
    monkeypatch.setenv("ORCH_STAGES__INFERENCE__CONCURRENCY", "7")
    monkeypatch.setenv("NATS_URL", "nats://env:2")
    s = load_settings(path)
    assert s.nats_url == "nats://env:2"
    assert s.stages.inference.concurrency == 7
    assert s.stages.rag.concurrency == 128
    monkeypatch.setenv("ORCH_NATS_URL", "nats://orch:3")
    assert load_settings(path).nats_url == "nats://orch:3"
    assert load_settings(path, nats_url="nats://cli:4").nats_url == "nats://cli:4"
    assert load_settings(path, nats_url=None).nats_url == "nats://orch:3"


def test_config_path_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_CONFIG", str(write(tmp_path, "partitions = 3\n")))
    assert load_settings().partitions == 3


def test_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="partitions"):
        load_settings(write(tmp_path, "partitions = 0\n"))
    with pytest.raises(ConfigError, match="unknown fields"):
        load_settings(write(tmp_path, '[assemble]\ntemplate = "{secret}"\n'))
    with pytest.raises(ConfigError, match="capacityy"):
        load_settings(write(tmp_path, "[channels.post]\ncapacityy = 1\n"))


def test_invalid_values_are_one_line_naming_each_key(tmp_path):
    path = write(tmp_path, "partitions = 0\n[channels.post]\ncapacityy = 1\n")
    with pytest.raises(ConfigError) as invalid:
        load_settings(path)
    assert str(invalid.value) == (
        f"invalid configuration in {path} or the environment: "
        "partitions: Input should be greater than or equal to 1 (got 0); "
        "channels.post.capacity: Field required; "
        "channels.post.capacityy: Extra inputs are not permitted (got 1)"
    )


def test_unreadable_pipeline_file_is_a_one_line_config_error(tmp_path, monkeypatch):
    bad = write(tmp_path, "partitions = 4\n[channels.post\ncapacity = 1\n")
    with pytest.raises(ConfigError) as syntax:
        load_settings(bad)
    message = str(syntax.value)
    assert message.startswith(f"pipeline file {bad} is not valid TOML:")
    assert "line 2, column 15" in message
    assert "\n" not in message
    monkeypatch.setenv("ORCH_CONFIG", str(bad))  # the path stage processes take
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings()
    with pytest.raises(ConfigError, match=f"cannot read pipeline file {tmp_path}: "):
        load_settings(tmp_path)  # a directory: open() fails
    bad.write_bytes(b"partitions = \xff\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_settings(bad)


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _keys(ann, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _toml_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in data.items():
        keys |= _toml_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return keys


def test_example_pipeline_documents_every_key_and_loads():
    path = ROOT / "pipeline.example.toml"
    text = path.read_text(encoding="utf-8")
    # Keys may be commented out (documenting a default that is not set); uncomment to compare.
    uncommented = "\n".join(
        line[2:] if re.match(r"# [a-z_]+ = ", line) else line for line in text.splitlines()
    )
    documented = _toml_keys(tomllib.loads(uncommented))
    assert _keys(Settings) <= documented, _keys(Settings) - documented
    assert documented <= _keys(Settings), documented - _keys(Settings)
    # The example shows the defaults, so loading it changes nothing.
    assert load_settings(path).model_dump() == load_settings().model_dump()
