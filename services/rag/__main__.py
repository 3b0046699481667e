"""Run the rag stage as its own process: `python -m services.rag`."""

from services.rag.stage import SPEC
from shared.runner import stage_main

if __name__ == "__main__":
    stage_main(SPEC)
