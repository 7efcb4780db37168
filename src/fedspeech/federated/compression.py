"""16- and 8-bit transport of client updates (``--update-dtype float16|int8``).

The client sends its *update* ``w_k - w`` instead of its float32 weights: in float16 (half
the bytes), or in int8 (a quarter, plus one float32 scale per block of :data:`INT8_BLOCK`
values: 0.27x). The rounding error is then relative to the (small) update, not to the
weights, where float16's 3 significant digits (or int8's 2) would swamp a round's change.
int8 is blockwise absmax quantisation (one scale per 256 values, so one large value costs
precision only in its block) with stochastic rounding, which makes the quantised update
unbiased: averaged over clients the rounding errors cancel instead of adding up (QSGD,
Alistarh et al., NeurIPS 2017). The server puts ``w + update`` back in float32 before
screening (``strategies.RobustFedAvg``), so every rule, guard and partial (early-exit)
update works unchanged. Integer arrays and float arrays other than float32 travel as they
are.
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
#: Reply metric that says the arrays are int8 updates with per-block scales.
INT8_METRIC = "int8-update"
UPDATE_DTYPES = ("float32", "float16", "int8")
#: Values sharing one int8 scale (as bitsandbytes' blockwise quantisation).
INT8_BLOCK = 256
#: Suffix of the array holding a quantised array's float32 block scales.
SCALE_SUFFIX = "::int8-scale"


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


def quantise_int8(update: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``update`` as int8 codes (its shape) and one float32 scale per :data:`INT8_BLOCK`
    values (absmax / 127), rounded stochastically so that E[code * scale] = update."""
    flat = np.asarray(update, dtype=np.float32).reshape(-1)
    blocks = -(-flat.size // INT8_BLOCK)
    padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
    padded[: flat.size] = flat
    padded = padded.reshape(blocks, INT8_BLOCK)
    scales = np.abs(padded).max(axis=1) / 127.0
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    scaled = padded / safe[:, None]
    codes = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
    codes = np.clip(codes, -127, 127).astype(np.int8).reshape(-1)[: flat.size]
    return codes.reshape(np.shape(update)), scales.astype(np.float32)


def dequantise_int8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float64 update back from :func:`quantise_int8`'s output."""
    flat = np.asarray(codes).reshape(-1).astype(np.float64)
    per_value = np.repeat(np.asarray(scales, dtype=np.float64), INT8_BLOCK)[: flat.size]
    return (flat * per_value).reshape(np.shape(codes))


def encode_int8_update(
    trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """float32 arrays as int8 ``trained - sent`` plus their scales; everything else unchanged."""
    encoded = {}
    for key, value in trained.items():
        start = sent.get(key)
        if value.dtype == np.float32 and start is not None and start.shape == value.shape:
            encoded[key], encoded[key + SCALE_SUFFIX] = quantise_int8(value.astype(np.float64) - start, rng)
        else:
            encoded[key] = value
    return encoded


def decode_int8_update(
    received: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The client's float32 weights back from :func:`encode_int8_update`'s output. A code
    array without its scales, or scales that do not fit it, are left as they came, so that
    screening refuses the reply (wrong dtype or unknown key) with a reason."""
    decoded = {}
    for key, value in received.items():
        if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in received:
            continue
        start, scales = reference.get(key), received.get(key + SCALE_SUFFIX)
        fits = scales is not None and np.size(scales) == -(-np.size(value) // INT8_BLOCK)
        if value.dtype == np.int8 and start is not None and np.asarray(start).dtype == np.float32 and fits:
            decoded[key] = (np.asarray(start, dtype=np.float64) + dequantise_int8(value, scales)).astype(np.float32)
        else:
            decoded[key] = value
    return decoded


def decode_reply(
    state: dict[str, np.ndarray], reference: Mapping[str, np.ndarray], metrics: Mapping
) -> dict[str, np.ndarray]:
    """A reply's arrays as float32 weights, whichever encoding its metrics announce."""
    if metrics.get(DELTA_METRIC) == 1:
        return decode_update(state, reference)
    if metrics.get(INT8_METRIC) == 1:
        return decode_int8_update(state, reference)
    return state


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
    """Client mod: send the update in float16 or int8 when the train config asks for it."""
    from flwr.app import MessageType

    if msg.metadata.message_type != MessageType.TRAIN or "config" not in msg.content.config_records:
        return call_next(msg, context)
    config = msg.content["config"]
    dtype = str(config.get(UPDATE_DTYPE_KEY, "float32"))
    if dtype not in ("float16", "int8"):
        return call_next(msg, context)
    # int8 rounding is seeded by round and node: a rerun (or a resumed run) sends the same codes
    rng = np.random.default_rng([int(config.get("server-round", 0)), int(context.node_id) % (1 << 63)])

    def encode(trained: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return encode_update(trained, sent) if dtype == "float16" else encode_int8_update(trained, sent, rng)

    reply = rewrite_update(msg, context, call_next, encode)
    if not reply.has_error():
        reply.content["metrics"][DELTA_METRIC if dtype == "float16" else INT8_METRIC] = 1
    return reply
