"""Run the stream stage as its own process: `python -m services.stream`."""

from services.stream.stage import SPEC
from shared.runner import stage_main

if __name__ == "__main__":
    stage_main(SPEC)
