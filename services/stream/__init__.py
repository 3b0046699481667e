"""Stage 5, stream: publishes the final result to the results stream."""
