"""Write the JSON Schemas of the wire models to docs/schema/: `python -m shared.schema`."""

import json
import sys
from pathlib import Path

import msgspec

from shared.envelope import DeadLettered, Envelope, Request, Result

MODELS: dict[str, type[msgspec.Struct]] = {
    "request": Request,
    "envelope": Envelope,
    "result": Result,
    "dead-lettered": DeadLettered,
}
SCHEMA_DIR = Path(__file__).parents[1] / "docs" / "schema"


def render(model: type[msgspec.Struct]) -> str:
    """The JSON Schema of `model`, as the text stored in docs/schema/."""
    found = msgspec.json.schema(model)  # {"$ref": to the model, "$defs": it and its parts}
    defs = found["$defs"]
    schema = defs.pop(model.__name__)
    if defs:
        schema["$defs"] = defs
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    """Write every schema file, or with --check exit 1 when one is stale."""
    check = "--check" in sys.argv[1:]
    stale = []
    for name, model in MODELS.items():
        path = SCHEMA_DIR / f"{name}.schema.json"
        text = render(model)
        if check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("stale schema files (run python -m shared.schema):", *stale, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
