"""Model workers: what the inference stage calls to turn a prompt into tokens."""

from shared.workers.base import ModelWorker, load_worker
from shared.workers.echo import EchoOptions, EchoWorker
from shared.workers.errors import ModelRefused, ModelUnavailable
from shared.workers.local import LocalOptions, LocalWorker
from shared.workers.openai import OpenAIOptions, OpenAIWorker

__all__ = [
    "EchoOptions",
    "EchoWorker",
    "LocalOptions",
    "LocalWorker",
    "ModelRefused",
    "ModelUnavailable",
    "ModelWorker",
    "OpenAIOptions",
    "OpenAIWorker",
    "load_worker",
]
