"""Client-side clipping for differential privacy (``--dp-clipping client``).

The server asks for it by putting :data:`CLIP_NORM_KEY` in the train config; this client
mod then scales the client's update ``w_k - w`` down to that norm before it leaves the
device, so the server (or SecAgg+, which hides individual updates) never needs to see an
unclipped update. The server adds the Gaussian noise and counts epsilon as for server-side
clipping, and refuses any reply whose update is above the norm (a client that skipped it).

Why not Flower's ``fixedclipping_mod``: it clips every array, integer buffers included, and
needs exactly one config record; ours clips float tensors only, with the same
``aggregation.clip_update`` the server-side clipping uses, so both modes clip identically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import Context, Message

#: Train-config key carrying the clipping norm (Flower's name for it).
CLIP_NORM_KEY = "clipping_norm"


def clipping_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Clip this client's update to the norm the server asked for (no-op when it did not)."""
    from flwr.app import MessageType

    from fedspeech.federated.aggregation import clip_update
    from fedspeech.federated.compression import rewrite_update

    if msg.metadata.message_type != MessageType.TRAIN or "config" not in msg.content.config_records:
        return call_next(msg, context)
    clip_norm = float(msg.content["config"].get(CLIP_NORM_KEY, 0.0))
    if clip_norm <= 0:
        return call_next(msg, context)
    return rewrite_update(msg, context, call_next, lambda trained, sent: clip_update(trained, sent, clip_norm)[0])
