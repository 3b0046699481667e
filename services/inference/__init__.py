"""Stage 3, inference: runs the prompt through the configured model worker."""
