"""Stage 4, post: joins the generated tokens and cleans the text."""
