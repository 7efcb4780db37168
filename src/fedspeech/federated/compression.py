"""16-bit transport of client updates (``--update-dtype float16``).

The client sends its *update* ``w_k - w`` in float16 instead of its float32 weights: half
the bytes, and the rounding error is relative to the (small) update, not to the weights,
where float16's 3 significant digits would swamp a round's change. The server puts
``w + update`` back in float32 before screening (``strategies.RobustFedAvg``), so every
rule, guard and partial (early-exit) update works unchanged. Integer arrays and float
arrays other than float32 travel as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr.app import Context, Message

#: Train-config key: the dtype the server asks updates in.
UPDATE_DTYPE_KEY = "update-dtype"
#: Reply metric that says the arrays are float16 updates, not weights.
DELTA_METRIC = "float16-update"
UPDATE_DTYPES = ("float32", "float16")


def encode_update(trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 arrays as float16 ``trained - sent``; everything else unchanged."""
    encoded = {}
    for key, value in trained.items():
        start = sent.get(key)
        if value.dtype == np.float32 and start is not None and start.shape == value.shape:
            encoded[key] = (value.astype(np.float64) - start).astype(np.float16)
        else:
            encoded[key] = value
    return encoded


def decode_update(received: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The client's float32 weights back from :func:`encode_update`'s output."""
    decoded = {}
    for key, value in received.items():
        start = reference.get(key)
        if value.dtype == np.float16 and start is not None and np.asarray(start).dtype == np.float32:
            decoded[key] = (np.asarray(start, dtype=np.float64) + value).astype(np.float32)
        else:
            decoded[key] = value
    return decoded


def rewrite_update(
    msg: Message,
    context: Context,
    call_next: Callable[[Message, Context], Message],
    rewrite: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> Message:
    """Run the training step and replace its reply's arrays by ``rewrite(trained, sent)``:
    the shared body of the client mods that change what an update looks like on the wire
    (this module's encoding, ``clipping.clipping_mod``)."""
    from flwr.app import Array, ArrayRecord

    sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    trained = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    rewritten = rewrite(trained, sent)
    reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in rewritten.items()})
    return reply


def compression_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Client mod: send the update in float16 when the train config asks for it."""
    from flwr.app import MessageType

    if msg.metadata.message_type != MessageType.TRAIN or "config" not in msg.content.config_records:
        return call_next(msg, context)
    if str(msg.content["config"].get(UPDATE_DTYPE_KEY, "float32")) != "float16":
        return call_next(msg, context)
    reply = rewrite_update(msg, context, call_next, encode_update)
    if not reply.has_error():
        reply.content["metrics"][DELTA_METRIC] = 1
    return reply
