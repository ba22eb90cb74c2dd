"""The spine's transactional outbox: messages enqueued in a use case's unit of work and
delivered by workers as Standard Webhooks requests, with retries, dead-lettering,
redelivery and per-destination pause. Destinations and payloads are opaque to it.

- :func:`enqueue` in the caller's unit of work (the message exists iff the work commits);
- :func:`make_signing_key` and :func:`put_destination` to create or change where messages go;
- :class:`Outbox` for status, redelivery and pause (routes in :mod:`.api`, verbs in :mod:`.cli`);
- :class:`DeliveryWorker` to deliver (``trustfleet worker``, and in ``trustfleet serve``);
- :mod:`.webhooks` to sign and verify Standard Webhooks requests.
"""

from trustfleet.kit.outbox.service import (
    DEFAULT_SCHEDULE,
    DestinationView,
    MessageView,
    Outbox,
    SigningKey,
    enqueue,
    make_signing_key,
    new_message_id,
    parse_schedule,
    put_destination,
)
from trustfleet.kit.outbox.worker import DeliveryWorker, RunningWorker, start_in_thread

__all__ = [
    "DEFAULT_SCHEDULE",
    "DeliveryWorker",
    "DestinationView",
    "MessageView",
    "Outbox",
    "RunningWorker",
    "SigningKey",
    "enqueue",
    "make_signing_key",
    "new_message_id",
    "parse_schedule",
    "put_destination",
    "start_in_thread",
]
