"""Run the assemble stage as its own process: `python -m services.assemble`."""

from services.assemble.stage import SPEC
from shared.runner import stage_main

if __name__ == "__main__":
    stage_main(SPEC)
