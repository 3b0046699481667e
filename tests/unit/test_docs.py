"""Generated documentation and the code the docs show stay in step with the code."""

import re
import shutil
from pathlib import Path

import pytest

from bench.stats import percentile
from shared.schema import MODELS, SCHEMA_DIR, render
from tests.support import ROOT


def test_schema_files_are_current():
    for name, model in MODELS.items():
        path = SCHEMA_DIR / f"{name}.schema.json"
        assert path.read_text(encoding="utf-8") == render(model), (
            f"{path} is stale: run python -m shared.schema"
        )


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


DOCS = [ROOT / "README.md", ROOT / "docs" / "ARCHITECTURE.md"]
SOURCES = [
    *(ROOT / "shared").rglob("*.py"),
    *(ROOT / "services").rglob("*.py"),
    *(ROOT / "docs" / "examples").rglob("*.py"),
]


def _blocks(language: str) -> list[tuple[Path, str]]:
    return [
        (doc, block)
        for doc in DOCS
        for block in re.findall(
            rf"```{language}\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.DOTALL
        )
    ]


def test_code_shown_in_the_docs_is_the_code_that_runs():
    # Scripts (they call asyncio.run) are run by the integration tests; every other Python
    # block is quoted from a source file, so it cannot drift from what runs.
    sources = [path.read_text(encoding="utf-8") for path in SOURCES]
    blocks = _blocks("python")
    assert len(blocks) >= 4
    for doc, block in blocks:
        if "asyncio.run(" in block:
            continue
        assert any(block in text for text in sources), f"{doc.name}: not in any source:\n{block}"


def test_pipeline_snippets_in_the_docs_validate(tmp_path, monkeypatch):
    from shared.app.cli import main

    monkeypatch.delenv("ORCH_CONFIG", raising=False)
    example = ROOT / "docs" / "examples" / "moderated"
    shutil.copy(example / "moderation.py", tmp_path / "moderation.py")
    snippets = _blocks("toml")
    assert len(snippets) >= 3
    for i, (doc, block) in enumerate(snippets):
        path = tmp_path / f"snippet{i}.toml"
        # A snippet of a part of a graph is completed with the example's other stages.
        text = (example / "pipeline.toml").read_text(encoding="utf-8")
        path.write_text(block if "[stages." in block else text + "\n" + block, encoding="utf-8")
        with pytest.raises(SystemExit) as exited:
            main(["validate", str(path)])
        assert exited.value.code == 0, (doc.name, block)
