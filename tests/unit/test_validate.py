"""`orchestrator validate`: one broken file of each kind, each problem named with its line."""

from pathlib import Path

import pytest

from shared.app.cli import main
from shared.app.validate import locate
from tests.support import ROOT


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("ORCH_") or key == "NATS_URL":
            monkeypatch.delenv(key)


def validate(tmp_path: Path, text: str, capsys) -> tuple[int, list[str], Path]:
    path = tmp_path / "pipeline.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit) as exited:
        main(["validate", str(path)])
    captured = capsys.readouterr()
    return exited.value.code, (captured.out + captured.err).splitlines(), path


def test_the_example_files_validate(capsys):
    examples = ["pipeline.example.toml", "docs/examples/moderated/pipeline.toml",
                "docs/examples/cluster/pipeline.toml"]  # fmt: skip
    for example in (ROOT / name for name in examples):
        with pytest.raises(SystemExit) as exited:
            main(["validate", str(example)])
        out = capsys.readouterr().out
        assert exited.value.code == 0, out
        assert out.startswith(f"{example}: valid; entry 'rag'")


def test_an_unknown_handler(tmp_path, capsys):
    code, lines, path = validate(tmp_path, (
        '[stages.post]\nnext = "moderate"\n\n'
        '[stages.moderate]\nhandler = "no_such_module:moderate"\nnext = "stream"\n'
    ), capsys)  # fmt: skip
    assert code == 2
    assert lines[0] == (
        f"{path}:5: stages.moderate.handler: cannot import no_such_module:moderate: "
        "no module named 'no_such_module'"
    )
    code, lines, path = validate(tmp_path, '[stages.post]\nhandler = "services.post.stage:nope"\n',
                                 capsys)  # fmt: skip
    assert lines[0] == (
        f"{path}:2: stages.post.handler: cannot import services.post.stage:nope: module "
        "'services.post.stage' has no 'nope'"
    )


def test_a_cycle(tmp_path, capsys):
    code, lines, path = validate(tmp_path, '# comment\n[stages.post]\nnext = "inference"\n', capsys)
    assert code == 2
    assert lines[0] == (
        f"{path}:2: stages.post: cycle inference -> post -> inference: a request may pass each "
        "stage only once"
    )


def test_an_unreachable_stage(tmp_path, capsys):
    code, lines, path = validate(tmp_path, (
        'partitions = 4\n[stages.spare]\nhandler = "services.post.stage:post"\nnext = "stream"\n'
    ), capsys)  # fmt: skip
    assert code == 2
    assert lines[0].startswith(f"{path}:2: stages.spare: unreachable: no next or route leads")


def test_a_route_to_a_stage_that_does_not_exist(tmp_path, capsys):
    code, lines, path = validate(tmp_path, (
        '[stages.inference]\nnext = "post"\n\n[[stages.inference.routes]]\n'
        'when = { metadata.task = "translate" }\nto = "translator"\n'
    ), capsys)  # fmt: skip
    assert code == 2
    assert lines[0] == (
        f"{path}:6: stages.inference.routes[0].to: no stage named 'translator' (stages: "
        "assemble, inference, post, rag, stream)"
    )


def test_graph_and_handler_problems_are_reported_together(tmp_path, capsys):
    code, lines, path = validate(tmp_path, (
        '[stages.rag]\nnext = "nowhere"\n\n'
        '[stages.extra]\nhandler = "no_such_module:factory"\nnext = "rag"\n'
    ), capsys)  # fmt: skip
    assert code == 2
    assert sorted(lines[:-1]) == sorted([
        f"{path}:2: stages.rag.next: no stage named 'nowhere' (stages: assemble, extra, "
        "inference, post, rag, stream)",
        f"{path}:6: stages.extra.next: 'rag' is the entry stage: it reads only the intake, "
        "nothing may route to it",
        f"{path}:5: stages.extra.handler: cannot import no_such_module:factory: no module "
        "named 'no_such_module'",
    ])  # fmt: skip
    assert lines[-1] == f"{path}: 3 problems"


def test_bad_limits_and_options(tmp_path, capsys):
    code, lines, path = validate(tmp_path, (
        "[stages.rag]\nconcurrency = 0\nbatch = 5000\n\n[stages.rag.options]\ntop_k = -1\n"
    ), capsys)  # fmt: skip
    assert code == 2
    assert lines == [
        f"{path}:3: stages.rag.batch: Input should be less than or equal to 1024 (got 5000)",
        f"{path}:2: stages.rag.concurrency: Input should be greater than or equal to 1 (got 0)",
        f"{path}: 2 problems",
    ]
    code, lines, path = validate(tmp_path, "[stages.rag.options]\ntop_k = -1\n", capsys)
    assert lines[0] == (
        f"{path}:2: stages.rag.options.top_k: Input should be greater than or equal to 0 (got -1)"
    )


def test_a_syntax_error_names_its_line_and_column(tmp_path, capsys):
    code, lines, path = validate(tmp_path, "partitions = 4\n[stages.post\nnext = 1\n", capsys)
    assert code == 2
    assert lines == [
        f"error: pipeline file {path} is not valid TOML: Expected ']' at the end of a table "
        "declaration (at line 2, column 13)"
    ]


def test_a_key_of_the_earlier_layout(tmp_path, capsys):
    code, lines, path = validate(tmp_path, "[worker]\nkind = 'echo'\n", capsys)
    assert code == 2
    assert lines[0] == (
        f"{path}:2: worker.kind: moved: set stages.inference.options.worker (the model worker "
        "is an option of the inference stage)"
    )


def test_locate_finds_keys_tables_and_arrays_of_tables():
    text = (
        "a = 1\n[stages.x]\nhandler = 'm:f'\n[stages.x.options]\n'quoted.key' = 2\n"
        "[[middleware]]\nfactory = 'a:b'\n[[middleware]]\nfactory = 'c:d'\n"
    )
    assert locate(text, "a") == 1
    assert locate(text, "stages.x.handler") == 3
    assert locate(text, "stages.x.next") == 2  # not written: the stage's table
    assert locate(text, "stages.x.options.quoted.key") == 5
    assert locate(text, "middleware[1].factory") == 9
    assert locate(text, "middleware[1].stages") == 8
    assert locate(text, "nowhere") is None
