"""Run the inference stage as its own process: `python -m services.inference`."""

from services.inference.stage import SPEC
from shared.runner import stage_main

if __name__ == "__main__":
    stage_main(SPEC)
