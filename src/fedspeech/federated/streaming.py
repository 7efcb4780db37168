"""Weighted averages of client states built one client at a time.

Why: a server that keeps every client's model until it averages needs K copies of the
model (20 × 380 MB for wav2vec 2.0 base), and summing with NumPy's ``a += w * x`` makes a
float64 temporary the size of each tensor. A running sum needs one float64 accumulator,
each reply can be dropped as soon as it is added, and adding through a small scratch
buffer (cast and scale one cache-sized chunk, add it) touches memory once per reply.
(torch's ``add_(x, alpha=w)`` into a float64 accumulator from float32 looked like the
fused answer but ran several times slower than the chunked NumPy loop in a quick check on
this CPU; ``benchmarks/server_aggregation.py`` measures the loop against a NumPy sum.)

:mod:`fedspeech.federated.aggregation` uses the same chunked float64 addition key by key
over replies that are all present (each key's accumulator then stays in the cache across
clients: faster, but every reply is held); the classes here add one whole reply at a time
(``benchmarks/server_aggregation.py`` compares the two). Rules that need every reply at
once (coordinate median, trimmed mean, the median-norm guard) cannot stream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

StateDict = dict[str, np.ndarray]

#: Elements cast and scaled at a time (512 KiB of float64: stays in the L2 cache).
CHUNK = 1 << 16


def add_scaled(accumulator: np.ndarray, value: np.ndarray, weight: float, scratch: np.ndarray) -> None:
    """``accumulator += weight * value`` in float64, one ``CHUNK`` at a time through
    ``scratch`` (float64, at least ``CHUNK`` long): no temporary the size of ``value``."""
    target = accumulator.reshape(-1)
    source = np.asarray(value).reshape(-1)
    if source.dtype.kind == "b":
        source = source.view(np.uint8)
    for start in range(0, source.size, CHUNK):
        part = source[start : start + CHUNK]
        buffer = scratch[: part.size]
        np.multiply(part, weight, out=buffer, dtype=np.float64)
        np.add(target[start : start + CHUNK], buffer, out=target[start : start + CHUNK])


class StreamingAverage:
    """Per key, Σ_k c_k^l x_k^l / Σ_k d_k^l over the clients that sent the key, where the
    summing weight ``c`` and the normalising weight ``d`` default to the same number.

    ``add`` takes a client's state (all keys or a subset, as early exits send) and can be
    called as replies arrive; ``result`` gives the average in each reference key's dtype
    (floats summed in float64; ints rounded, bools by weighted majority, as
    :func:`fedspeech.federated.aggregation.cast_like`). Keys no client sent keep the
    reference value.
    """

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self.reference = reference
        self.clients = 0
        self._sums: dict[str, np.ndarray] = {}
        self._totals: dict[str, float] = {}
        self._scratch = np.empty(CHUNK, dtype=np.float64)

    def add(
        self,
        state: Mapping[str, np.ndarray],
        weight: float | Mapping[str, float],
        normaliser: float | None = None,
    ) -> None:
        """Add one client: ``weight`` per state (or per key, as L-DAWA's cosines), and the
        ``normaliser`` it adds to the denominator (default: ``weight``)."""
        for key, value in state.items():
            if key not in self.reference:
                raise KeyError(f"client key {key!r} is not in the global model")
            c = float(weight[key] if isinstance(weight, Mapping) else weight)
            d = c if normaliser is None else float(normaliser)
            accumulator = self._sums.get(key)
            if accumulator is None:
                accumulator = self._sums[key] = np.zeros(np.shape(self.reference[key]), dtype=np.float64)
                self._totals[key] = 0.0
            add_scaled(accumulator, value, c, self._scratch)
            self._totals[key] += d
        self.clients += 1

    def rescale(self, factor: float) -> None:
        """Multiply every sum and total by ``factor`` (an online softmax's change of shift)."""
        for accumulator in self._sums.values():
            np.multiply(accumulator, factor, out=accumulator)
        self._totals = {key: total * factor for key, total in self._totals.items()}

    def means(self) -> dict[str, np.ndarray]:
        """The float64 averages of the keys some client sent (the sums are reused: call once)."""
        out = {
            key: np.divide(self._sums[key], total, out=self._sums[key])
            for key, total in self._totals.items()
            if total > 0.0
        }
        self._sums, self._totals = {}, {}
        return out

    def covered(self) -> set[str]:
        """Keys at least one client sent."""
        return set(self._sums)

    def result(self) -> StateDict:
        means = self.means()
        return {
            key: cast_like(means[key], ref_value) if key in means else np.array(ref_value, copy=True)
            for key, ref_value in self.reference.items()
        }


class StreamingSoftmaxAverage:
    """Σ_k softmax(z)_k x_k one client at a time (the loss-weighted rule, z_k = −L_k/T):
    exp(z_k − m) with a running shift m, rescaling the sums when a larger z arrives, so no
    weight overflows and no reply waits for the others' losses."""

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self.average = StreamingAverage(reference)
        self.shift: float | None = None

    def add(self, state: Mapping[str, np.ndarray], logit: float) -> None:
        if not math.isfinite(logit):
            raise ValueError(f"softmax logit must be finite, got {logit}")
        if self.shift is None:
            self.shift = logit
        elif logit > self.shift:
            self.average.rescale(math.exp(self.shift - logit))
            self.shift = logit
        self.average.add(state, math.exp(logit - self.shift))

    def result(self) -> StateDict:
        return self.average.result()


class StreamingMix:
    """The mixed rule's β·Σ n_k x_k/Σ n + (1−β)·Σ softmax(z)_k x_k, one client at a time:
    both normalisers are known only once every reply is in, so the two sums are kept apart
    (two float64 accumulators, still independent of the number of clients)."""

    def __init__(self, reference: Mapping[str, np.ndarray], beta: float) -> None:
        self.reference = reference
        self.beta = beta
        self.by_examples = StreamingAverage(reference)
        self.by_loss = StreamingSoftmaxAverage(reference)

    def add(self, state: Mapping[str, np.ndarray], num_examples: float, logit: float) -> None:
        self.by_examples.add(state, num_examples)
        self.by_loss.add(state, logit)

    def result(self) -> StateDict:
        first, second = self.by_examples.means(), self.by_loss.average.means()
        out: StateDict = {}
        for key, ref_value in self.reference.items():
            if key not in first:
                out[key] = np.array(ref_value, copy=True)
                continue
            mixed = np.multiply(first.pop(key), self.beta)
            mixed += (1.0 - self.beta) * second.pop(key)
            out[key] = cast_like(mixed, ref_value)
        return out


def cosine(client: np.ndarray, global_value: np.ndarray, global_norm: float | None = None) -> float:
    """L-DAWA's δ = min(cos(w_k, w_g), 1), 1 where the angle is undefined (integer/bool or
    0-d tensors, zero or non-finite norms). Float32 dot products (BLAS, one pass, no
    float64 copies); their rounding is far below what a weight in [-1, 1] needs."""
    client = np.asarray(client)
    if client.dtype.kind != "f" or client.ndim == 0:
        return 1.0
    x = client.reshape(-1)
    y = np.asarray(global_value).reshape(-1).astype(x.dtype, copy=False)
    own = math.sqrt(max(float(np.dot(x, x)), 0.0))
    norms = own * (math.sqrt(max(float(np.dot(y, y)), 0.0)) if global_norm is None else global_norm)
    if norms == 0.0 or not math.isfinite(norms):
        return 1.0
    return min(float(np.dot(x, y)) / norms, 1.0)


def global_norm(value: np.ndarray) -> float | None:
    """‖w_g‖ of a float tensor, computed once per round for :func:`cosine` (None otherwise)."""
    array = np.asarray(value)
    if array.dtype.kind != "f" or not array.ndim:
        return None
    flat = array.reshape(-1)
    return math.sqrt(max(float(np.dot(flat, flat)), 0.0))


def cast_like(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cast a float64 aggregate back to the reference dtype (ints rounded, bools voted)."""
    dtype = np.asarray(reference).dtype
    if dtype.kind == "b":
        return np.asarray(value >= 0.5)
    if dtype.kind in "iu":
        return np.rint(value).astype(dtype)
    return np.asarray(value).astype(dtype)
