"""How a model worker fails. (What it reports besides text, its usage, is
shared.envelope.Usage: a worker's stream may end with one.)"""

from shared.errors import OrchestratorError
from shared.failure import Reject


class ModelUnavailable(OrchestratorError):
    """The model could not answer now (it is overloaded, down, or timed out): retried later,
    or by a fallback model."""


class ModelRefused(Reject):
    """The model refused the request for good (an HTTP 4xx other than 429): the request is
    dead-lettered as `failed` at once, with the backend's message."""
