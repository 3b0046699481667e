"""Stage 2, assemble: formats the prompt from the configured template."""
