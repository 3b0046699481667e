"""Run the post stage as its own process: `python -m services.post`.

The same as `orchestrator run post`: settings from the environment and $ORCH_CONFIG.
"""

from shared.app.cli import stage_main

if __name__ == "__main__":
    stage_main("post")
