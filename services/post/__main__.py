"""Run the post stage as its own process: `python -m services.post`."""

from services.post.stage import SPEC
from shared.runner import stage_main

if __name__ == "__main__":
    stage_main(SPEC)
