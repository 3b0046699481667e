"""Stage 1, rag: attaches retrieved context to the request."""
