"""FedU's client half (Zhuang et al., ICCV 2021): the divergence between a client's online
encoder and the global one decides whether the client takes the global predictor. It lives
with the SSL method that has a predictor (feature matching); the server half is the
``FedU`` strategy in :mod:`fedspeech.federated.strategies`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

StateDict = dict[str, np.ndarray]


def _select(state: Mapping[str, np.ndarray], prefixes: str | Iterable[str] | None) -> StateDict:
    """The entries under ``prefixes`` (all if ``None``), in key order."""
    if prefixes is None:
        return dict(state)
    chosen = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
    return {k: v for k, v in state.items() if k.startswith(chosen)}


def fedu_divergence(
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    prefixes: str | Iterable[str] | None = None,
) -> float:
    """FedU divergence (Zhuang et al., ICCV 2021): mean over weight tensors of ‖a − b‖₂.

    Over the float tensors of ``before`` (optionally those under ``prefixes``, e.g. the
    online encoder); integer buffers are not weights and are skipped. Both states must
    hold the same tensors with the same shapes.
    """
    chosen = _select(before, prefixes)
    norms: list[float] = []
    for key, value in chosen.items():
        if key not in after:
            raise ValueError(f"fedu_divergence: key '{key}' missing from the second state")
        first, second = np.asarray(value), np.asarray(after[key])
        if first.shape != second.shape:
            raise ValueError(f"fedu_divergence: key '{key}' shapes {first.shape} != {second.shape}")
        if first.dtype.kind != "f":
            continue
        difference = first.astype(np.float64) - second.astype(np.float64)
        norms.append(float(np.linalg.norm(difference.ravel())))
    if not norms:
        raise ValueError("fedu_divergence: no float tensors to compare")
    return float(np.mean(norms))


@dataclass(frozen=True)
class FedUClientUpdate:
    """What a FedU client does with a new global model (see :func:`fedu_client_update`)."""

    state: StateDict
    divergence: float
    took_global_predictor: bool


def fedu_client_update(
    local_state: Mapping[str, np.ndarray],
    global_state: Mapping[str, np.ndarray],
    *,
    encoder_prefixes: str | Iterable[str],
    predictor_prefixes: str | Iterable[str],
    mu: float = 0.4,
) -> FedUClientUpdate:
    """Client side of FedU's divergence-aware predictor update (ICCV 2021, §3.3).

    divergence = :func:`fedu_divergence` between the client's online encoder (after its
    last local training) and the received global online encoder. The client always
    takes the global encoder; it takes the global predictor only if divergence < μ,
    else keeps its own. Every other key (e.g. the EMA target encoder) stays local.
    """
    local_encoder = _select(local_state, encoder_prefixes)
    global_encoder = _select(global_state, encoder_prefixes)
    if set(local_encoder) != set(global_encoder):
        missing = sorted(set(local_encoder) ^ set(global_encoder))[:5]
        raise ValueError(f"FedU: local and global encoder keys differ, e.g. {missing}")
    divergence = fedu_divergence(local_encoder, global_encoder)
    update = dict(global_encoder)
    global_predictor = _select(global_state, predictor_prefixes)
    took_predictor = bool(global_predictor) and divergence < mu
    if took_predictor:
        unknown = [k for k in global_predictor if k not in local_state]
        if unknown:
            raise ValueError(f"FedU: global predictor keys unknown locally: {unknown[:5]}")
        update.update(global_predictor)
    new_state = {k: np.array(update.get(k, v), copy=True) for k, v in local_state.items()}
    return FedUClientUpdate(new_state, divergence, took_predictor)
