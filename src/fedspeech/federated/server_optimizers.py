"""Server-side optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) on top of any aggregation rule.

Flower ships these as strategies whose ``aggregate_train`` first averages the replies with
plain FedAvg and then takes one optimiser step on the pseudo-gradient
``aggregate - current global``. Our rules (loss-weighted, L-DAWA, ...) compute a different
aggregate, so instead of re-implementing the optimisers we reuse Flower's classes and only
swap the aggregate they step from: :class:`_GivenAggregate` stands in for FedAvg in their
MRO and returns the aggregate our rule computed. Everything else (moment updates, bias
correction, momentum convention) is Flower's code.

Why a server optimiser at all: with K clients each taking E local steps from the same global
model, averaging gives roughly E steps of progress per round, while the centralised run
sees the same K·E batches as K·E sequential steps. A server learning rate above 1, server
momentum, or an adaptive server step makes up part of that difference
(Reddi et al., "Adaptive Federated Optimization", 2021; Hsu et al. 2019 for FedAvgM).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

#: ``--server-optimizer`` choices; "none" keeps the rule's aggregate as the new global model.
SERVER_OPTIMIZERS: dict[str, type[FedAvg] | None] = {
    "none": None,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}


class _GivenAggregate(FedAvg):
    """Stands in for FedAvg's averaging: returns the aggregate set in ``given``."""

    given: ArrayRecord | None = None

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.given, None


class ServerOptimizer:
    """One Flower server-optimiser strategy, stepping from aggregates our rules computed.

    ``lr`` is FedAvgM's ``server_learning_rate`` or FedOpt's ``eta``; ``momentum`` is
    FedAvgM's ``server_momentum`` or FedOpt's ``beta_1``; ``tau`` is FedOpt's adaptivity.
    ``scope``: key prefixes the step applies to (empty: every floating-point key); the other
    keys take the rule's aggregate as it is, e.g. a larger server step for the CNN alone,
    the part of wav2vec 2.0 that moves least under averaging (docs/evaluation.md).
    """

    def __init__(
        self,
        name: str,
        *,
        lr: float,
        momentum: float,
        tau: float = 1e-3,
        beta_2: float = 0.99,
        scope: tuple[str, ...] = (),
    ) -> None:
        if name not in SERVER_OPTIMIZERS or SERVER_OPTIMIZERS[name] is None:
            choices = [n for n, cls in SERVER_OPTIMIZERS.items() if cls is not None]
            raise ValueError(f"server optimizer: must be one of {choices}, got {name!r}")
        if not (lr > 0 and np.isfinite(lr)):
            raise ValueError(f"server_lr: must be finite and > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"server_momentum: must be in [0, 1), got {momentum}")
        if not tau > 0:
            raise ValueError(f"server_tau: must be > 0, got {tau}")
        flower_cls = SERVER_OPTIMIZERS[name]
        assert flower_cls is not None  # checked above
        stepper = type(f"{flower_cls.__name__}Step", (flower_cls, _GivenAggregate), {})
        if flower_cls is FedAvgM:
            self._strategy = stepper(server_learning_rate=lr, server_momentum=momentum)
        elif flower_cls is FedAdagrad:
            self._strategy = stepper(eta=lr, tau=tau)
        else:
            self._strategy = stepper(eta=lr, beta_1=momentum, beta_2=beta_2, tau=tau)
        self.name = name
        self.scope = tuple(scope)
        self._restored_momentum: dict[str, np.ndarray] | None = None

    def step(self, server_round: int, current: ArrayRecord, aggregate: ArrayRecord) -> ArrayRecord:
        """The new global model: one optimiser step from ``current`` towards ``aggregate``.

        Dtypes are kept (Flower's FedOpt arithmetic promotes float32 to float64), and keys
        whose arrays are not floating point (integer buffers) or lie outside ``scope`` are
        taken from the aggregate unchanged.
        """
        strategy = self._strategy
        floats = {
            k
            for k, v in current.items()
            if np.issubdtype(v.numpy().dtype, np.floating) and (not self.scope or k.startswith(self.scope))
        }
        if not floats:
            raise ValueError(f"server optimizer scope {list(self.scope)}: matches no floating-point key of the model")
        strategy.given = ArrayRecord({k: aggregate[k] for k in current if k in floats})
        current_floats = ArrayRecord({k: current[k] for k in current if k in floats})
        if isinstance(strategy, FedAvgM):
            strategy.current_arrays = current_floats
            if self._restored_momentum is not None:  # Flower keeps it as a list in key order
                strategy.momentum_vector = [self._restored_momentum[k] for k in current_floats.keys()]
                self._restored_momentum = None
        else:
            strategy.current_arrays = {k: v.numpy() for k, v in current_floats.items()}
        stepped, _ = strategy.aggregate_train(server_round, [])
        assert stepped is not None
        out = {}
        for key, old in current.items():
            if key in floats:
                out[key] = Array(np.ascontiguousarray(stepped[key].numpy().astype(old.numpy().dtype, copy=False)))
            else:
                out[key] = aggregate[key]
        return ArrayRecord(out)

    # -------------------------------------------------------------- resume

    def state(self) -> dict[str, np.ndarray]:
        """The optimiser's moments, flat (for a checkpoint); empty before the first step."""
        strategy = self._strategy
        state: dict[str, np.ndarray] = {}
        if isinstance(strategy, FedAvgM):
            if strategy.momentum_vector is not None and strategy.current_arrays is not None:
                for key, value in zip(strategy.current_arrays.keys(), strategy.momentum_vector, strict=True):
                    state[f"momentum.{key}"] = np.asarray(value)
            return state
        for moment in ("m_t", "v_t"):
            for key, value in (getattr(strategy, moment) or {}).items():
                state[f"{moment}.{key}"] = np.asarray(value)
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned (resume after a crash)."""
        strategy = self._strategy
        if isinstance(strategy, FedAvgM):
            momentum = {k.removeprefix("momentum."): v for k, v in state.items() if k.startswith("momentum.")}
            self._restored_momentum = momentum or None
            strategy.momentum_vector = None
            return
        for moment in ("m_t", "v_t"):
            prefix = f"{moment}."
            values = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            setattr(strategy, moment, values or None)
