"""Delivery reads the delivery count and stream sequence from the ack subject."""

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from shared.transport.pull import JetStreamDelivery as Delivery

REPLIES = [
    "$JS.ACK.ORCH_POST.post_a-1.3.1042.77.1764140000000000000.12",  # v1
    "$JS.ACK.hub.ACC123.ORCH_POST.post_a-1.3.1042.77.1764140000000000000.12.r4nd",  # v2
    "$JS.ACK.hub.ACC123.ORCH_POST.post_a-1.1.7.7.1764140000000000000.0",  # v2, no token
]


@pytest.mark.parametrize("reply", REPLIES)
def test_counts_match_nats_py_metadata(reply):
    msg = Msg(_client=None, subject="orch.post.1", reply=reply, data=b"{}")  # type: ignore[arg-type]
    delivery = Delivery(None, msg.subject, msg.reply, msg.data, None, None)  # type: ignore[arg-type]
    assert (delivery.delivered, delivery.stream_seq) == (
        msg.metadata.num_delivered,
        msg.metadata.sequence.stream,
    )


def test_a_plain_message_is_refused():
    msg = Msg(_client=None, subject="orch.post.1", reply="_INBOX.abc", data=b"{}")  # type: ignore[arg-type]
    with pytest.raises(NotJSMessageError):
        Delivery(None, msg.subject, msg.reply, msg.data, None, None)  # type: ignore[arg-type]
