"""Run the inference stage as its own process: `python -m services.inference`.

The same as `orchestrator run inference`: settings from the environment and $ORCH_CONFIG.
"""

from shared.app.cli import stage_main

if __name__ == "__main__":
    stage_main("inference")
