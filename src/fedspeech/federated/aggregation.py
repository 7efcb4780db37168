"""Server-side aggregation rules as pure NumPy functions on state dicts.

A *state dict* here is an ordered ``dict[str, np.ndarray]`` (what
``ArrayRecord.to_numpy_ndarrays`` / ``torch.nn.Module.state_dict`` give, key by key).
The rules are kept free of Flower so they can be checked against hand-computed numbers;
``strategies.py`` wraps them for Flower. Exact rules and sources: docs docs/methods.md §2-3.

Conventions shared by every rule:

* **Refusal.** Given the previous global state, every client state is screened with
  :func:`validate_update` (missing/unexpected keys, shape mismatch, non-numeric dtype,
  NaN/Inf). A refused client is dropped with a logged warning naming it and the key; it
  is never averaged in. If every client is refused the global state is returned
  unchanged. Without ``global_state`` the first client is the reference (it can then only
  be refused for non-finite values), so pass ``global_state`` in production.
* **Numerics.** Floats are combined in float64 and cast back to the reference dtype.
  Integer tensors (e.g. ``num_batches_tracked``) are averaged and rounded to the nearest
  integer; bool tensors take the (weighted) majority. The dtype never changes.
* **"Layer" = one state-dict tensor.** L-DAWA's per-layer weights and the FedU divergence
  are computed per tensor (a weight and its bias are two layers), as the reference
  L-DAWA code does (it iterates over the flat list of model arrays).
* **Backbone-only transmission.** Filter the global and client states with
  :func:`select_keys`, aggregate with any rule, and put the result back with
  :func:`merge_state`; heads (keys outside the prefixes) keep their value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean as flower_trim_mean

from fedspeech.federated.streaming import CHUNK, add_scaled, cast_like, cosine, global_norm

logger = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]

#: dtype kinds an aggregation can handle: bool, signed int, unsigned int, float.
_NUMERIC_KINDS = "biuf"
#: How many refusal reasons a warning lists before summarising the rest.
_REASONS_IN_WARNING = 5


# --------------------------------------------------------------------------- keys


def normalise_prefixes(prefixes: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """Return prefixes as a tuple (a bare string is one prefix, not its characters)."""
    if prefixes is None:
        return None
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    result = tuple(prefixes)
    if not result or not all(isinstance(p, str) and p for p in result):
        raise ValueError(f"prefixes must be non-empty strings, got {result!r}")
    return result


def select_keys(state: Mapping[str, np.ndarray], prefixes: str | Iterable[str] | None) -> StateDict:
    """Keep the entries whose key starts with one of ``prefixes`` (all if ``None``).

    Plain ``str.startswith``: end a prefix with ``"."`` to match a module boundary
    (``"encoder."`` does not match ``"encoder_head.weight"``). Key order is kept.
    """
    normalised = normalise_prefixes(prefixes)
    if normalised is None:
        return dict(state)
    return {k: v for k, v in state.items() if k.startswith(normalised)}


def exclude_keys(state: Mapping[str, np.ndarray], prefixes: str | Iterable[str] | None) -> StateDict:
    """The complement of :func:`select_keys` (e.g. the local heads)."""
    normalised = normalise_prefixes(prefixes)
    if normalised is None:
        return {}
    return {k: v for k, v in state.items() if not k.startswith(normalised)}


def merge_state(base: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> StateDict:
    """``base`` with the entries of ``update`` replaced; ``base``'s key order is kept."""
    unknown = [k for k in update if k not in base]
    if unknown:
        raise ValueError(f"update has keys the base state lacks: {unknown[:5]}")
    return {k: update[k] if k in update else v for k, v in base.items()}


# --------------------------------------------------------------------- screening


def validate_update(
    global_state: Mapping[str, np.ndarray],
    client_state: Mapping[str, np.ndarray],
    *,
    allow_missing: bool = False,
) -> list[str]:
    """Reasons to refuse ``client_state`` against ``global_state`` (empty = acceptable).

    Refused: a key the global lacks, a global key the client lacks (unless
    ``allow_missing``, used by depth-aware partial aggregation), a shape that differs
    from the global one, a non-numeric dtype, an integer or bool array where the global one
    is float, or any NaN/Inf in a float tensor.
    """
    reasons: list[str] = []
    if not allow_missing:
        reasons += [f"missing key '{k}'" for k in global_state if k not in client_state]
    for key, value in client_state.items():
        if key not in global_state:
            reasons.append(f"unexpected key '{key}'")
            continue
        array = np.asarray(value)
        expected = np.shape(global_state[key])
        reference_kind = np.asarray(global_state[key]).dtype.kind
        if array.dtype.kind not in _NUMERIC_KINDS:
            reasons.append(f"key '{key}': unsupported dtype {array.dtype}")
        elif reference_kind == "f" and array.dtype.kind != "f":  # e.g. int8 codes that lost their scales
            reasons.append(
                f"key '{key}': dtype {array.dtype} where the global model has {np.asarray(global_state[key]).dtype}"
            )
        elif array.shape != expected:
            reasons.append(f"key '{key}': shape {array.shape} != global shape {expected}")
        elif array.dtype.kind == "f" and not all_finite(array):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            reasons.append(f"key '{key}': {bad} non-finite value(s) of {array.size}")
    return reasons


def all_finite(array: np.ndarray) -> bool:
    """No NaN/Inf in ``array``, usually in one BLAS pass with no mask the size of the tensor
    (which matters on 95 M weights per reply): NaN/Inf make ``x·x`` non-finite, so a finite
    ``x·x`` proves the tensor finite; only when it is not (a bad value, or huge finite values
    that overflow the square) is every element checked."""
    flat = array.reshape(-1)
    if flat.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow only sends us to the full check
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(array).all())


def format_reasons(reasons: Sequence[str]) -> str:
    """One line listing the first few reasons (a model can miss hundreds of keys)."""
    shown = "; ".join(reasons[:_REASONS_IN_WARNING])
    hidden = len(reasons) - _REASONS_IN_WARNING
    return shown + (f"; and {hidden} more" if hidden > 0 else "")


def screen_updates(
    global_state: Mapping[str, np.ndarray],
    states: Sequence[Mapping[str, np.ndarray]],
    client_ids: Sequence[object] | None = None,
    *,
    allow_missing: bool = False,
) -> tuple[list[int], dict[int, list[str]]]:
    """Split clients into accepted indices and ``{index: reasons}`` for the refused.

    Each refusal is logged as a warning naming the client and the offending key(s).
    """
    ids = _client_ids(client_ids, len(states))
    accepted: list[int] = []
    refused: dict[int, list[str]] = {}
    for index, state in enumerate(states):
        reasons = validate_update(global_state, state, allow_missing=allow_missing)
        if reasons:
            refused[index] = reasons
            logger.warning("refusing update from %s: %s", ids[index], format_reasons(reasons))
        else:
            accepted.append(index)
    return accepted, refused


def _client_ids(client_ids: Sequence[object] | None, count: int) -> list[object]:
    if client_ids is None:
        return [f"client {i}" for i in range(count)]
    if len(client_ids) != count:
        raise ValueError(f"got {len(client_ids)} client ids for {count} client states")
    return list(client_ids)


def _screen(
    global_state: Mapping[str, np.ndarray] | None,
    states: Sequence[Mapping[str, np.ndarray]],
    client_ids: Sequence[object] | None,
    allow_missing: bool = False,
) -> tuple[Mapping[str, np.ndarray] | None, list[int]]:
    """Reference state and accepted client indices (``None`` reference: nothing to do)."""
    if not states:
        raise ValueError("no client states to aggregate")
    reference = global_state if global_state is not None else states[0]
    accepted, _ = screen_updates(reference, states, client_ids, allow_missing=allow_missing)
    if not accepted:
        if global_state is None:
            raise ValueError("every client update was refused and no global_state was given")
        logger.warning("every client update was refused; the global state stays as it was")
        return None, []
    return reference, accepted


def _copy_state(state: Mapping[str, np.ndarray]) -> StateDict:
    return {k: np.array(v, copy=True) for k, v in state.items()}


# ------------------------------------------------------------------------ numerics


def weighted_average(
    reference: Mapping[str, np.ndarray],
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
) -> StateDict:
    """Per key, Σ_k c_k w_k / Σ_k c_k over the clients whose state contains that key.

    The building block of FedAvg, the loss-weighted and mixed rules (every client has
    every key, so the normalisation is the global one) and of depth-aware partial
    aggregation (per key, only the clients that sent it). Keys no client sent keep the
    reference value. Inputs are assumed screened; weights must be ≥ 0.
    """
    if len(states) != len(weights):
        raise ValueError(f"got {len(weights)} weights for {len(states)} client states")
    # Key by key, so each key's float64 accumulator stays in the cache across the clients
    # (all replies are here already); streaming.StreamingAverage is the one-reply-at-a-time form.
    scratch = np.empty(CHUNK, dtype=np.float64)
    result: StateDict = {}
    for key, ref_value in reference.items():
        contributors = [(s[key], float(c)) for s, c in zip(states, weights) if key in s]
        total = sum(c for _, c in contributors)
        if not contributors or total <= 0.0:
            result[key] = np.array(ref_value, copy=True)
            continue
        accumulator = np.zeros(np.shape(ref_value), dtype=np.float64)
        for value, weight in contributors:
            add_scaled(accumulator, value, weight / total, scratch)
        result[key] = cast_like(accumulator, ref_value)
    return result


def _check_positive_finite(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or not np.isfinite(array).all() or (array <= 0).any():
        raise ValueError(f"{name} must be finite and > 0 for every client, got {list(values)}")
    return array


# ----------------------------------------------------------------------------- rules


def fedavg_weights(num_examples: Sequence[float]) -> np.ndarray:
    """FedAvg client weights n_k / Σ_j n_j."""
    counts = _check_positive_finite(num_examples, "num_examples")
    return counts / counts.sum()


def fedavg(
    states: Sequence[Mapping[str, np.ndarray]],
    num_examples: Sequence[float],
    *,
    global_state: Mapping[str, np.ndarray] | None = None,
    client_ids: Sequence[object] | None = None,
) -> StateDict:
    """FedAvg (McMahan et al., AISTATS 2017): w = Σ_k n_k w_k / Σ_k n_k."""
    _require_same_length(states, num_examples, "num_examples")
    reference, accepted = _screen(global_state, states, client_ids)
    if reference is None:
        return _copy_state(global_state)  # type: ignore[arg-type]
    weights = fedavg_weights([num_examples[i] for i in accepted])
    return weighted_average(reference, [states[i] for i in accepted], weights)


def loss_weights(losses: Sequence[float], temperature: float = 1.0) -> np.ndarray:
    """α_k = exp(−L_k/T) / Σ_j exp(−L_j/T): lower loss ⇒ larger weight.

    Numerically stable softmax (the maximum logit is subtracted before ``exp``).
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    values = np.asarray(losses, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"losses must be finite, one per client, got {list(losses)}")
    logits = -values / temperature
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def loss_weighted(
    states: Sequence[Mapping[str, np.ndarray]],
    losses: Sequence[float],
    temperature: float = 1.0,
    *,
    global_state: Mapping[str, np.ndarray] | None = None,
    client_ids: Sequence[object] | None = None,
) -> StateDict:
    """Loss-weighted averaging (Gao et al., ICASSP 2022; yan-gao-GY/Flower-SpeechBrain).

    w = Σ_k α_k w_k with α = softmax(−L/T) over the accepted clients, on full weights.
    """
    _require_same_length(states, losses, "losses")
    reference, accepted = _screen(global_state, states, client_ids)
    if reference is None:
        return _copy_state(global_state)  # type: ignore[arg-type]
    weights = loss_weights([losses[i] for i in accepted], temperature)
    return weighted_average(reference, [states[i] for i in accepted], weights)


def mixed_weights(
    num_examples: Sequence[float],
    losses: Sequence[float],
    beta: float = 0.2,
    temperature: float = 1.0,
) -> np.ndarray:
    """Per-client weights β·n_k/Σn + (1−β)·α_k of the mixed rule."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    return beta * fedavg_weights(num_examples) + (1.0 - beta) * loss_weights(losses, temperature)


def mixed(
    states: Sequence[Mapping[str, np.ndarray]],
    num_examples: Sequence[float],
    losses: Sequence[float],
    beta: float = 0.2,
    temperature: float = 1.0,
    *,
    global_state: Mapping[str, np.ndarray] | None = None,
    client_ids: Sequence[object] | None = None,
) -> StateDict:
    """Mixed FedAvg/loss rule (FedVSSL): w = β·FedAvg + (1−β)·LossAgg, element-wise.

    Both terms are linear in the client weights, so the element-wise mix equals one
    weighted average with weights :func:`mixed_weights`; computing it that way rounds
    integer buffers once instead of twice. (The public FedVSSL baseline concatenated the
    two weight lists instead of adding them; this does not.)
    """
    _require_same_length(states, num_examples, "num_examples")
    _require_same_length(states, losses, "losses")
    reference, accepted = _screen(global_state, states, client_ids)
    if reference is None:
        return _copy_state(global_state)  # type: ignore[arg-type]
    weights = mixed_weights([num_examples[i] for i in accepted], [losses[i] for i in accepted], beta, temperature)
    return weighted_average(reference, [states[i] for i in accepted], weights)


def ldawa_deltas(
    global_state: Mapping[str, np.ndarray], states: Sequence[Mapping[str, np.ndarray]]
) -> list[dict[str, float]]:
    """Per client, per tensor δ_k^l = min(cos(w_k^l, w_g^l), 1) (see :func:`ldawa`)."""
    return [{k: cosine(s[k], global_state[k]) for k in global_state} for s in states]


def ldawa(
    global_state: Mapping[str, np.ndarray],
    states: Sequence[Mapping[str, np.ndarray]],
    *,
    warmup: bool = False,
    num_examples: Sequence[float] | None = None,
    client_ids: Sequence[object] | None = None,
) -> StateDict:
    """L-DAWA (Rehman, Gao et al., ICCV 2023; yasar-rehman/L-DAWA).

    Per tensor l: δ_k^l = min(cos(w_k^l, w_g^l), 1), on weights (not updates) against
    the previous global model; w^l = (1/K) Σ_k δ_k^l w_k^l, divided by K (the accepted
    clients), not by Σδ, with no sample weighting. Negative cosines are kept, as in the
    paper. Integer/bool buffers get the plain mean (δ = 1), rounded.

    ``warmup=True`` gives plain FedAvg (weighted by ``num_examples``, equal weights if
    ``None``); the strategy sets it for the first rounds.
    """
    if num_examples is not None:
        _require_same_length(states, num_examples, "num_examples")
    if warmup:
        counts = num_examples if num_examples is not None else [1.0] * len(states)
        return fedavg(states, counts, global_state=global_state, client_ids=client_ids)
    reference, accepted = _screen(global_state, states, client_ids)
    if reference is None:
        return _copy_state(global_state)
    kept = [states[i] for i in accepted]
    scratch = np.empty(CHUNK, dtype=np.float64)
    result: StateDict = {}
    for key, ref_value in global_state.items():  # key by key, as weighted_average
        norm = global_norm(ref_value)
        accumulator = np.zeros(np.shape(ref_value), dtype=np.float64)
        for state in kept:  # δ_k^l w_k^l, each client counting 1 in the divisor
            add_scaled(accumulator, state[key], cosine(state[key], ref_value, norm) / len(kept), scratch)
        result[key] = cast_like(accumulator, ref_value)
    return result


# --------------------------------------------------------------- robust aggregation


def update_norm(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """‖w_k − w_global‖₂ over the float tensors both hold (integer buffers are not weights)."""
    total = 0.0
    for key, value in state.items():
        ref = reference.get(key)
        if ref is None or np.asarray(value).dtype.kind != "f":
            continue
        delta = np.asarray(value, dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def norm_outliers(norms: Mapping[int, float], *, bound: float = 0.0, median_ratio: float = 0.0) -> dict[int, str]:
    """Clients whose update norm is beyond ``bound`` (absolute; 0 = off) or beyond
    ``median_ratio`` × the median of the round's norms (0 = off), with the reason.

    The median is robust to a minority of attackers: scaled-up updates cannot raise it
    unless they are the majority."""
    median = float(np.median(list(norms.values()))) if norms else 0.0
    outliers = {}
    for client, norm in norms.items():
        if bound > 0 and norm > bound:
            outliers[client] = f"update norm {norm:.4g} above the bound {bound:.4g}"
        elif median_ratio > 0 and median > 0 and norm > median_ratio * median:
            outliers[client] = f"update norm {norm:.4g} above {median_ratio:g} x the round's median {median:.4g}"
    return outliers


def clip_update(
    state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_norm: float
) -> tuple[StateDict, float]:
    """The update scaled so that ‖w_k − w_global‖₂ ≤ ``max_norm`` (float tensors only);
    returns (state, the factor applied, 1.0 when within the norm)."""
    norm = update_norm(state, reference)
    if norm <= max_norm or norm == 0.0:
        return dict(state), 1.0
    factor = max_norm / norm
    clipped = {}
    for key, value in state.items():
        ref = reference.get(key)
        if ref is None or np.asarray(value).dtype.kind != "f":
            clipped[key] = value
            continue
        ref64 = np.asarray(ref, dtype=np.float64)
        clipped[key] = cast_like(ref64 + factor * (np.asarray(value, dtype=np.float64) - ref64), value)
    return clipped, factor


def coordinate_median(reference: Mapping[str, np.ndarray], states: Sequence[Mapping[str, np.ndarray]]) -> StateDict:
    """Coordinate-wise median (Yin et al., ICML 2018): unweighted, robust to fewer than
    half of the clients sending anything at all."""
    return trimmed_mean(reference, states, 0.5)


def trimmed_mean(
    reference: Mapping[str, np.ndarray], states: Sequence[Mapping[str, np.ndarray]], trim: float
) -> StateDict:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the
    ``floor(trim · K)`` largest and smallest client values and average the rest (unweighted).
    ``trim`` = 0.5 is the coordinate-wise median. Non-float tensors take the first client's
    value when all agree, else the reference's."""
    if not 0.0 <= trim <= 0.5:
        raise ValueError(f"trim must be in [0, 0.5], got {trim}")
    if not states:
        return _copy_state(reference)
    result: StateDict = {}
    for key, ref_value in reference.items():
        values = [np.asarray(s[key]) for s in states if key in s]
        if not values:
            result[key] = np.array(ref_value, copy=True)
            continue
        if np.asarray(ref_value).dtype.kind != "f":
            same = all(np.array_equal(v, values[0]) for v in values)
            result[key] = np.array(values[0] if same else ref_value, copy=True)
            continue
        stacked = np.stack([v.astype(np.float64) for v in values])
        # Flower's FedMedian/FedTrimmedAvg compute the same per tensor but average integer
        # buffers as floats and skip our screening, so the strategies wrap the arithmetic only.
        combined = np.median(stacked, axis=0) if trim >= 0.5 else flower_trim_mean(stacked, trim)
        result[key] = cast_like(combined, ref_value)
    return result


# ---------------------------------------------------------------- heterogeneous depth


def partial_average(
    global_state: Mapping[str, np.ndarray],
    client_states: Sequence[Mapping[str, np.ndarray]],
    num_examples: Sequence[float],
    *,
    client_ids: Sequence[object] | None = None,
) -> StateDict:
    """Depth-aware partial aggregation (METHODS §3; InclusiveFL weighting).

    For each tensor l, S_l = clients whose state contains l:
    w_l = Σ_{k∈S_l} n_k w_{k,l} / Σ_{k∈S_l} n_k; keys nobody sent keep the global value.
    A client may omit keys (it trained fewer layers) but is refused for unknown keys,
    wrong shapes or non-finite values.
    """
    _require_same_length(client_states, num_examples, "num_examples")
    reference, accepted = _screen(global_state, client_states, client_ids, allow_missing=True)
    if reference is None:
        return _copy_state(global_state)
    counts = _check_positive_finite([num_examples[i] for i in accepted], "num_examples")
    return weighted_average(global_state, [client_states[i] for i in accepted], counts)


def key_coverage(
    global_state: Mapping[str, np.ndarray], client_states: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, int]:
    """How many clients sent each global key (0 = kept at its global value)."""
    return {k: sum(k in s for s in client_states) for k in global_state}


def _require_same_length(states: Sequence[object], values: Sequence[object], name: str) -> None:
    if len(states) != len(values):
        raise ValueError(f"got {len(values)} {name} for {len(states)} client states")
