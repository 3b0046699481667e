"""Run the assemble stage as its own process: `python -m services.assemble`.

The same as `orchestrator run assemble`: settings from the environment and $ORCH_CONFIG.
"""

from shared.app.cli import stage_main

if __name__ == "__main__":
    stage_main("assemble")
