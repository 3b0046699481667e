"""How big a message may be: the intake's limit, and the room the stages need beyond it.

A client's request may be at most `max_message_bytes` encoded: the client checks before it
publishes and the entry stage dead-letters a bigger one as `invalid`. On its way a request
grows: the built-in stages hold at most two copies of the input at once (the input and the
prompt, then the input and the completion or the answer), because each drops what only it
reads. After the intake, a message is bounded only by the server's `max_payload`; so that an
accepted request always fits there, the intake's limit may be at most a third of it, which
leaves the last third for the retrieved passages, the template and the hops.
"""

from shared.errors import ConfigError

GROWTH = 3
"""How many times its encoded size a request may need on its way through the stages."""


def check_limits(max_message_bytes: int, max_payload: int) -> None:
    """ConfigError unless a request of `max_message_bytes` fits the server's `max_payload` at
    every stage."""
    if max_message_bytes * GROWTH > max_payload:
        raise ConfigError(
            f"max_message_bytes is {max_message_bytes}, over a third of the server's "
            f"max_payload ({max_payload}): a request that size could outgrow what the server "
            f"carries between stages; set max_message_bytes to at most "
            f"{max_payload // GROWTH} or raise max_payload in the nats-server configuration"
        )
