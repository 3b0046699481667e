"""Model workers: what the inference stage calls to turn a prompt into tokens."""

from shared.workers.base import ModelWorker, load_worker
from shared.workers.echo import EchoOptions, EchoWorker

__all__ = ["EchoOptions", "EchoWorker", "ModelWorker", "load_worker"]
