"""Generated documentation stays in step with the code."""

from shared.latency import percentile
from shared.schema import MODELS, SCHEMA_DIR, render


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
