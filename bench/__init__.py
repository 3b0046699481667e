"""Benchmarks: the project's pipeline against raw nats-py baselines, measured in one run."""
