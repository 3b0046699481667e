"""`python -m shared.app ...` is the `orchestrator` command."""

from shared.app.cli import main

if __name__ == "__main__":
    main()
