"""Run the stream stage as its own process: `python -m services.stream`.

The same as `orchestrator run stream`: settings from the environment and $ORCH_CONFIG.
"""

from shared.app.cli import stage_main

if __name__ == "__main__":
    stage_main("stream")
