"""Weighted averages of client states built one client at a time.

Why: a server that keeps every client's model until it averages needs K copies of the
model (20 × 380 MB for wav2vec 2.0 base), and summing with NumPy's ``a += w * x`` makes a
temporary the size of each tensor, twice when it also casts to float64. A running sum needs
one float64 accumulator, each reply can be dropped as soon as it is added, and torch's
``Tensor.add_(x, alpha=w)`` does the cast, the scaling and the addition in one pass over
memory (on all cores), which NumPy cannot do without a temporary.

Used by every averaging rule of :mod:`fedspeech.federated.aggregation` (FedAvg, loss,
mixed, partial averages of early exits, L-DAWA) and directly by
``benchmarks/server_aggregation.py``. Rules that need every reply at once (coordinate
median, trimmed mean, the median-norm guard) cannot stream and do not use it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch

StateDict = dict[str, np.ndarray]


def as_tensor(value: np.ndarray) -> torch.Tensor:
    """A zero-copy, read-only torch view of a NumPy array (bools as uint8)."""
    array = np.asarray(value)
    if array.dtype.kind == "b":
        array = array.view(np.uint8)
    with warnings.catch_warnings():  # Flower's arrays are read-only buffers; we only read them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array) if array.ndim else torch.tensor(array.item(), dtype=torch.float64)


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
        self._sums: dict[str, torch.Tensor] = {}
        self._totals: dict[str, float] = {}

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
                accumulator = self._sums[key] = torch.zeros(np.shape(self.reference[key]), dtype=torch.float64)
                self._totals[key] = 0.0
            accumulator.add_(as_tensor(value), alpha=c)
            self._totals[key] += d
        self.clients += 1

    def rescale(self, factor: float) -> None:
        """Multiply every sum and total by ``factor`` (an online softmax's change of shift)."""
        for accumulator in self._sums.values():
            accumulator.mul_(factor)
        self._totals = {key: total * factor for key, total in self._totals.items()}

    def result(self) -> StateDict:
        out: StateDict = {}
        for key, ref_value in self.reference.items():
            total = self._totals.get(key, 0.0)
            if total <= 0.0:
                out[key] = np.array(ref_value, copy=True)
                continue
            mean = self._sums[key].div_(total).numpy()  # the accumulator is done with after this
            out[key] = cast_like(mean, ref_value)
        self._sums, self._totals = {}, {}
        return out


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


def cosine(client: np.ndarray, global_value: np.ndarray, global_norm: float | None = None) -> float:
    """L-DAWA's δ = min(cos(w_k, w_g), 1), 1 where the angle is undefined (integer/bool or
    0-d tensors, zero or non-finite norms). A float32 dot product: one pass, no float64
    copies; its rounding (relative ~1e-7 per term) is far below what the weight needs."""
    client = np.asarray(client)
    if client.dtype.kind != "f" or client.ndim == 0:
        return 1.0
    x, y = as_tensor(client).reshape(-1), as_tensor(np.asarray(global_value)).reshape(-1)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    norms = float(torch.linalg.vector_norm(x)) * (
        float(torch.linalg.vector_norm(y)) if global_norm is None else global_norm
    )
    if norms == 0.0 or not math.isfinite(norms):
        return 1.0
    return min(float(torch.dot(x, y)) / norms, 1.0)


def global_norm(value: np.ndarray) -> float | None:
    """‖w_g‖ of a float tensor, computed once per round for :func:`cosine` (None otherwise)."""
    array = np.asarray(value)
    return float(torch.linalg.vector_norm(as_tensor(array))) if array.dtype.kind == "f" and array.ndim else None


def cast_like(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cast a float64 aggregate back to the reference dtype (ints rounded, bools voted)."""
    dtype = np.asarray(reference).dtype
    if dtype.kind == "b":
        return np.asarray(value >= 0.5)
    if dtype.kind in "iu":
        return np.rint(value).astype(dtype)
    return np.asarray(value).astype(dtype)
