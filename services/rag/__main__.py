"""Run the rag stage as its own process: `python -m services.rag`.

The same as `orchestrator run rag`: settings from the environment and $ORCH_CONFIG.
"""

from shared.app.cli import stage_main

if __name__ == "__main__":
    stage_main("rag")
