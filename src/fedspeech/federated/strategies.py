"""Flower strategies (``flwr.serverapp.strategy``, flwr 1.41) for the aggregation rules.

All strategies build on Flower's message-based ``FedAvg`` for node sampling, message
construction and evaluation, and replace ``aggregate_train`` with one that

1. screens every reply on its own: an error reply, a missing ``num-examples``, a
   missing/non-finite ``train_loss`` (loss-based rules), undecodable arrays, or arrays
   refused by :func:`~fedspeech.federated.aggregation.validate_update` drop that client
   with a warning, and the round goes on with the rest. (Flower's own FedAvg validation
   raises on the first inconsistent reply and aborts the round.)
2. aggregates the accepted clients with the pure rule from ``aggregation.py``;
3. records a :class:`RoundReport` (accepted/refused clients and why, weights used).

The weighted-sum rules can also do all three one reply at a time as replies arrive
(:meth:`RobustFedAvg.reply_stream`, :mod:`fedspeech.federated.reply_stream`): each rule's
``_stream`` gives the running form of its ``_aggregate``, and the round loop uses it so the
server never holds every client model.

Wire format (what a ClientApp must send back for a train message)::

    RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(
        {"num-examples": n, "train_loss": mean_loss, ...})})

With ``backbone_prefixes`` the strategy sends only the matching keys of the global
model, aggregates only those, and keeps the other keys (heads) of its global state
unchanged; non-backbone arrays in a reply are ignored with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedspeech.federated import aggregation as agg
from fedspeech.federated.aggregation import StateDict
from fedspeech.federated.arrays import array_view
from fedspeech.federated.clipping import CLIP_NORM_KEY
from fedspeech.federated.compression import UPDATE_DTYPE_KEY, UPDATE_DTYPES, decode_reply
from fedspeech.federated.rules import CLIPPING_SIDES, RULES
from fedspeech.federated.server_optimizers import ServerOptimizer
from fedspeech.federated.streaming import StreamingAverage, StreamingMix, StreamingSoftmaxAverage, cosine, global_norm

if TYPE_CHECKING:
    from fedspeech.federated.reply_stream import ReplyStream

logger = logging.getLogger(__name__)

#: What a rule's aggregation gives: the state, the weight per node, rule-specific details.
Aggregate = tuple[StateDict, dict[int, float], dict[str, Any]]

TRAIN_LOSS_KEY = "train_loss"
METRICS_KEY = "metrics"
#: Config keys the FedU strategy adds to every train message.
FEDU_MU_KEY = "fedu-mu"
FEDU_ENCODER_KEY = "fedu-encoder-prefixes"
FEDU_PREDICTOR_KEY = "fedu-predictor-prefixes"
#: Counters added to the aggregated train MetricRecord.
ACCEPTED_METRIC = "clients-accepted"
REFUSED_METRIC = "clients-refused"


@dataclass
class RoundReport:
    """Per-round bookkeeping a runner can log (``dataclasses.asdict`` makes it JSON-able).

    ``weights`` maps node id to the weight its update got (for L-DAWA the mean over
    tensors of δ/K); ``details`` holds rule-specific extras (L-DAWA deltas, warm-up flag,
    keys nobody trained, ignored non-backbone keys).
    """

    server_round: int
    rule: str
    accepted: list[int] = field(default_factory=list)
    refused: dict[int, list[str]] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def log_record(self) -> dict[str, Any]:
        """The round log's ``aggregation`` entry: refused clients and the weights used."""
        record: dict[str, Any] = {
            "refused": {str(k): v for k, v in self.refused.items()},
            "weights": {str(k): round(v, 6) for k, v in self.weights.items()},
        }
        # the screening's verdicts, when it ran: the round failed, updates clipped, norms
        record.update({k: self.details[k] for k in ("failed", "clipped", "update_norms", "dp") if k in self.details})
        return record


@dataclass
class ClientUpdate:
    """One accepted reply, decoded."""

    node_id: int
    state: StateDict
    num_examples: float
    train_loss: float | None
    content: RecordDict


#: A rule's running aggregate: add one accepted update; finish with all accepted updates
#: (their states already dropped) in node order, giving what ``_aggregate`` gives.
RuleStream = tuple[Callable[[ClientUpdate], None], Callable[[list[ClientUpdate]], Aggregate]]


class RobustFedAvg(FedAvg):
    """FedAvg (w = Σ n_k w_k / Σ n_k) that refuses bad clients instead of failing.

    Parameters beyond Flower's ``FedAvg`` ones (which pass through unchanged):
    ``backbone_prefixes`` (send/aggregate only these keys; ``None`` = all),
    ``loss_key`` (metric holding the client's mean training loss) and
    ``server_optimizer`` (a step of FedAvgM/FedAdam/... from the old global model
    towards the rule's aggregate; ``None`` = the aggregate is the new model).

    Screening, for every rule: a reply is refused for an error, a wrong or missing key,
    shape or dtype, a non-finite value, or an update norm ‖w_k − w‖₂ above
    ``max_update_norm`` or above ``norm_median_ratio`` × the round's median (0 = off);
    accepted updates are scaled down to ``clip_norm`` (0 = off). With fewer than
    ``min_replies`` accepted, the round fails: the global model stays as it was.

    Differential privacy (``dp_noise_multiplier`` > 0, FedAvg only): central DP-FedAvg
    (McMahan et al., ICLR 2018; Flower's server-side fixed clipping): every update clipped
    to ``clip_norm``, averaged with equal weights, Gaussian noise of std
    ``dp_noise_multiplier * clip_norm / K`` added to the float arrays (integer buffers are
    never noised); Flower's RDP accountant reports epsilon at ``dp_delta`` each round.
    Noise comes from the OS's entropy unless ``dp_seed`` is given (tests only: seeded noise
    is predictable, so it protects nothing). ``dp_clipping="client"``: clients clip their
    own updates (:mod:`clipping`; needed under SecAgg+), the server refuses any update above
    ``clip_norm`` instead of clipping it.
    """

    supports_dp = True  # equal-weight averaging bounds each client's influence by clip_norm / K

    rule_name = "fedavg"
    requires_loss = False
    allow_missing_keys = False

    def __init__(
        self,
        *,
        backbone_prefixes: Sequence[str] | str | None = None,
        loss_key: str = TRAIN_LOSS_KEY,
        server_optimizer: ServerOptimizer | None = None,
        max_update_norm: float = 0.0,
        norm_median_ratio: float = 0.0,
        clip_norm: float = 0.0,
        min_replies: int = 1,
        dp_noise_multiplier: float = 0.0,
        dp_delta: float = 1e-5,
        dp_seed: int | None = None,
        dp_clipping: str = "server",
        update_dtype: str = "float32",
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if update_dtype not in UPDATE_DTYPES:
            raise ValueError(f"update_dtype: must be one of {UPDATE_DTYPES}, got {update_dtype!r}")
        self.update_dtype = update_dtype
        if dp_clipping not in CLIPPING_SIDES:
            raise ValueError(f"dp_clipping: must be one of {CLIPPING_SIDES}, got {dp_clipping!r}")
        if dp_clipping == "client" and clip_norm <= 0:
            raise ValueError("dp_clipping: 'client' needs clip_norm > 0 (the norm clients clip to)")
        self.dp_clipping = dp_clipping
        if dp_noise_multiplier < 0 or not math.isfinite(dp_noise_multiplier):
            raise ValueError(f"dp_noise: must be finite and >= 0 (0 = off), got {dp_noise_multiplier}")
        if dp_noise_multiplier > 0:
            if not self.supports_dp:
                raise ValueError(
                    f"dp_noise: differential privacy needs equal-weight FedAvg (strategy fedavg); "
                    f"the {self.rule_name} rule weighs or selects clients by their updates"
                )
            if clip_norm <= 0:
                raise ValueError("dp_noise: needs clip_norm > 0 (it bounds each client's contribution)")
            if not 0 < dp_delta < 1:
                raise ValueError(f"dp_delta: must be in (0, 1), got {dp_delta}")
        self.dp_noise_multiplier, self.dp_delta = dp_noise_multiplier, dp_delta
        self._dp_rng = np.random.default_rng(dp_seed)  # None: fresh OS entropy
        self.dp_population = 0  # clients that may take part (the server app sets it); 0 = those sampled
        self._accountant: Any = None
        self._accountant_state: dict[str, Any] | None = None
        for name, value in (
            ("max_update_norm", max_update_norm),
            ("norm_median_ratio", norm_median_ratio),
            ("clip_norm", clip_norm),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be finite and >= 0 (0 = off), got {value}")
        if min_replies < 1:
            raise ValueError(f"min_replies: must be >= 1, got {min_replies}")
        self.max_update_norm, self.norm_median_ratio = max_update_norm, norm_median_ratio
        self.clip_norm, self.min_replies = clip_norm, min_replies
        self.backbone_prefixes = agg.normalise_prefixes(backbone_prefixes)
        self.loss_key = loss_key
        self.server_optimizer = server_optimizer
        self.reports: list[RoundReport] = []
        self._global_record: ArrayRecord | None = None
        self._global_state: StateDict | None = None

    # ------------------------------------------------------------------ global model

    @property
    def last_report(self) -> RoundReport | None:
        """The most recent round's report (``None`` before the first aggregation)."""
        return self.reports[-1] if self.reports else None

    def set_global_arrays(self, arrays: ArrayRecord) -> None:
        """Remember the global model replies are checked against (and L-DAWA compares to).

        ``configure_train`` calls this; call it yourself only to aggregate without it.
        """
        state = {k: v.numpy() for k, v in arrays.items()}
        if self.backbone_prefixes and not agg.select_keys(state, self.backbone_prefixes):
            raise ValueError(
                f"backbone_prefixes {self.backbone_prefixes} match no key of the global arrays (e.g. {list(state)[:3]})"
            )
        self._global_record = arrays
        self._global_state = state

    def _outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """The part of the global model that is transmitted (Arrays are shared, not copied)."""
        if self.backbone_prefixes is None:
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if k.startswith(self.backbone_prefixes)})

    def _extra_train_config(self, server_round: int) -> dict[str, Any]:
        """Rule-specific config entries for train messages."""
        return {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling and messages, with the outgoing keys and extra config."""
        self.set_global_arrays(arrays)
        round_config = ConfigRecord(dict(config))  # never mutate the caller's record
        for key, value in self._extra_train_config(server_round).items():
            round_config[key] = value
        if self.dp_clipping == "client":  # federated/clipping.py's mod clips on the client
            round_config[CLIP_NORM_KEY] = float(self.clip_norm)
        if self.update_dtype != "float32":  # federated/compression.py's mod encodes the update
            round_config[UPDATE_DTYPE_KEY] = self.update_dtype
        messages = super().configure_train(server_round, self._outgoing(arrays), round_config, grid)
        return _by_destination(messages)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation gets the same (backbone-only) view of the model as training."""
        return _by_destination(
            super().configure_evaluate(server_round, self._outgoing(arrays), ConfigRecord(dict(config)), grid)
        )

    # ---------------------------------------------------------------------- screening

    def _pick_record(self, records: Any, preferred: str, kind: str) -> tuple[Any, str | None]:
        if preferred in records:
            return records[preferred], None
        if len(records) == 1:
            return next(iter(records.values())), None
        return None, f"expected one {kind} (or one named '{preferred}'), got {len(records)}"

    def _decode_reply(
        self, message: Message, reference: StateDict, ignored: dict[int, int]
    ) -> tuple[ClientUpdate | None, list[str]]:
        """Decode one reply, or return the reasons to refuse it."""
        node_id = int(message.metadata.src_node_id)
        if message.has_error():
            error = message.error
            return None, [f"error reply (code {error.code}): {error.reason}"]
        content = message.content
        arrays, problem = self._pick_record(content.array_records, self.arrayrecord_key, "ArrayRecord")
        if problem:
            return None, [problem]
        metrics, problem = self._pick_record(content.metric_records, METRICS_KEY, "MetricRecord")
        if problem:
            return None, [problem]
        reasons: list[str] = []
        num_examples = _finite_number(metrics.get(self.weighted_by_key))
        if num_examples is None or num_examples <= 0:
            reasons.append(f"metric '{self.weighted_by_key}' missing, not finite or not > 0")
        train_loss = _finite_number(metrics.get(self.loss_key))
        if self.requires_loss and train_loss is None:
            reasons.append(f"metric '{self.loss_key}' missing or not finite")
        keys = list(arrays.keys())
        if self.backbone_prefixes is not None:
            extra = [k for k in keys if not k.startswith(self.backbone_prefixes)]
            if extra:
                ignored[node_id] = len(extra)
                logger.warning(
                    "node %d sent %d non-backbone array(s), e.g. '%s'; ignored",
                    node_id,
                    len(extra),
                    extra[0],
                )
                keys = [k for k in keys if k.startswith(self.backbone_prefixes)]
        state: StateDict = {}
        for key in keys:
            try:
                state[key] = array_view(arrays[key])  # read-only, no copy of the reply's bytes
            except Exception as exc:  # noqa: BLE001 - any bad payload refuses the client only
                reasons.append(f"key '{key}': cannot decode array ({exc})")
        state = decode_reply(state, reference, metrics)  # float16/int8 updates (compression.py): float32 weights
        reasons += agg.validate_update(reference, state, allow_missing=self.allow_missing_keys)
        if reasons or num_examples is None:
            return None, reasons
        return ClientUpdate(node_id, state, num_examples, train_loss, content), []

    def screen_replies(
        self, replies: Iterable[Message], reference: StateDict
    ) -> tuple[list[ClientUpdate], dict[int, list[str]], dict[int, int]]:
        """Accepted updates, ``{node: reasons}`` for refusals, ``{node: #ignored keys}``."""
        accepted: list[ClientUpdate] = []
        refused: dict[int, list[str]] = {}
        ignored: dict[int, int] = {}
        for message in replies:
            update, reasons = self._decode_reply(message, reference, ignored)
            if update is None:
                node_id = int(message.metadata.src_node_id)
                refused[node_id] = reasons
                logger.warning(
                    "%s: refusing update from node %d: %s",
                    self.rule_name,
                    node_id,
                    agg.format_reasons(reasons),
                )
            else:
                accepted.append(update)
        return accepted, refused, ignored

    # -------------------------------------------------------------------- aggregation

    def _aggregate(
        self, server_round: int, reference: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[int, float], dict[str, Any]]:
        """Aggregate screened updates: (state, weight per node, details)."""
        # under DP every (clipped) client counts the same, so none can move the mean by more than clip_norm / K
        counts = [1.0] * len(updates) if self.dp_noise_multiplier else [u.num_examples for u in updates]
        state = agg.fedavg([u.state for u in updates], counts, global_state=reference, client_ids=_ids(updates))
        return state, _by_node(updates, agg.fedavg_weights(counts)), {}

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, aggregate the accepted ones, keep untransmitted keys."""
        if self._global_state is None or self._global_record is None:
            raise RuntimeError(
                f"{type(self).__name__}.aggregate_train needs the global model: call "
                "configure_train (or set_global_arrays) first"
            )
        # Flower samples nodes in random order and replies arrive in any order; summing in
        # node order makes the aggregate (float sums) independent of both.
        replies = sorted(replies, key=lambda m: int(m.metadata.src_node_id))
        report = RoundReport(server_round, self.rule_name)
        self.reports.append(report)
        if not replies:
            logger.warning("%s: round %d received no replies", self.rule_name, server_round)
            return None, None
        reference = agg.select_keys(self._global_state, self.backbone_prefixes)
        updates, refused, ignored = self.screen_replies(replies, reference)
        updates = self.guard_norms(updates, reference, refused, report)
        return self.conclude_round(
            report, updates, refused, ignored, len(replies), lambda: self._aggregate(server_round, reference, updates)
        )

    def conclude_round(
        self,
        report: RoundReport,
        updates: list[ClientUpdate],
        refused: dict[int, list[str]],
        ignored: dict[int, int],
        num_replies: int,
        aggregate: Callable[[], Aggregate],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The end of a round, whether the replies were held or streamed
        (:mod:`fedspeech.federated.reply_stream`): fail it with too few valid updates, else
        ``aggregate()``, add DP noise, take the server optimizer's step."""
        report.refused = refused
        report.accepted = [u.node_id for u in updates]
        if ignored:
            report.details["ignored_non_backbone_keys"] = ignored
        if len(updates) < self.min_replies:
            report.accepted, report.details["failed"] = (
                [],
                (f"{len(updates)} valid replies, fewer than min_replies={self.min_replies}"),
            )
            logger.warning(
                "%s: round %d: %d valid of %d replies (%d refused), fewer than %d; the global model stays as it was",
                self.rule_name,
                report.server_round,
                len(updates),
                num_replies,
                len(refused),
                self.min_replies,
            )
            return self._global_record, MetricRecord({ACCEPTED_METRIC: 0, REFUSED_METRIC: len(refused)})
        state, weights, details = aggregate()
        report.weights = weights
        report.details.update(details)
        if self.dp_noise_multiplier:
            report.details["dp"] = self._add_dp_noise(state, len(updates))
        record = self._to_record(state)
        if self.server_optimizer is not None:  # a step from the old global model towards the rule's aggregate
            assert self._global_record is not None
            record = self.server_optimizer.step(report.server_round, self._global_record, record)
        return record, self._aggregate_metrics(updates, len(refused))

    # ------------------------------------------------------------ streamed aggregation

    def reply_stream(self, server_round: int) -> ReplyStream | None:
        """A :class:`~fedspeech.federated.reply_stream.ReplyStream` that aggregates this
        round's replies as they arrive, or ``None`` where every reply is needed at once (the
        rule, or the median-norm guard)."""
        from fedspeech.federated.reply_stream import ReplyStream

        if self._global_state is None or self.norm_median_ratio:
            return None
        reference = agg.select_keys(self._global_state, self.backbone_prefixes)
        rule = self._stream(server_round, reference)
        return None if rule is None else ReplyStream(self, server_round, reference, *rule)

    def _stream(self, server_round: int, reference: StateDict) -> RuleStream | None:
        """(add one accepted update, finish with every accepted update in node order) for
        this rule's running aggregate; the finish gives what ``_aggregate`` gives."""
        equal = bool(self.dp_noise_multiplier)  # as _aggregate: equal weights under DP
        average = StreamingAverage(reference)

        def add(update: ClientUpdate) -> None:
            average.add(update.state, 1.0 if equal else update.num_examples)

        def finish(updates: list[ClientUpdate]) -> Aggregate:
            counts = [1.0 if equal else u.num_examples for u in updates]
            return average.result(), _by_node(updates, agg.fedavg_weights(counts)), {}

        return add, finish

    def guard_norms(
        self, updates: list[ClientUpdate], reference: StateDict, refused: dict[int, list[str]], report: RoundReport
    ) -> list[ClientUpdate]:
        """Refuse updates with outlying norms (into ``refused``), then clip the rest."""
        if not (self.max_update_norm or self.norm_median_ratio or self.clip_norm):
            return updates
        norms = {u.node_id: agg.update_norm(u.state, reference) for u in updates}
        # merged, not replaced: a streamed round guards one reply at a time
        report.details.setdefault("update_norms", {}).update({str(k): round(v, 6) for k, v in norms.items()})
        outliers = agg.norm_outliers(norms, bound=self.max_update_norm, median_ratio=self.norm_median_ratio)
        for node, reason in outliers.items():
            refused[node] = [reason]
            logger.warning("%s: refusing update from node %s: %s", self.rule_name, node, reason)
        kept = [u for u in updates if u.node_id not in outliers]
        if self.clip_norm and self.dp_clipping == "client":  # clipped on the client: check, never fix
            limit = self.clip_norm * (1 + 1e-4)  # float32 rounding of a clipped update
            for node in [u.node_id for u in kept if norms[u.node_id] > limit]:
                refused[node] = [f"update norm {norms[node]:.4g} above clip_norm {self.clip_norm:g}: not clipped"]
                logger.warning("%s: refusing update from node %s: %s", self.rule_name, node, refused[node][0])
            return [u for u in kept if u.node_id not in refused]
        if self.clip_norm:
            clipped = {}
            for i, update in enumerate(kept):
                state, factor = agg.clip_update(update.state, reference, self.clip_norm)
                if factor < 1.0:
                    kept[i] = dataclasses.replace(update, state=state)
                    clipped[str(update.node_id)] = round(factor, 6)
            report.details.setdefault("clipped", {}).update(clipped)
        return kept

    # ------------------------------------------------------------ differential privacy

    def _add_dp_noise(self, state: StateDict, num_clients: int) -> dict[str, Any]:
        """Noise the float arrays of the aggregate in place; compose the release in the
        accountant and return what the round log shows (noise std, epsilon, delta)."""
        from flwr.supercore.differential_privacy import compute_stdv
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        stdv = compute_stdv(self.dp_noise_multiplier, self.clip_norm, num_clients)
        for key, value in state.items():
            if np.asarray(value).dtype.kind == "f":
                noisy = np.asarray(value, dtype=np.float64) + self._dp_rng.normal(0.0, stdv, np.shape(value))
                state[key] = noisy.astype(np.asarray(value).dtype)
        accountant = self._privacy_accountant(num_clients)
        accountant.compose(
            GaussianPrivacyEvent(self.dp_noise_multiplier, num_clients, accountant.config.population_size)
        )
        spent = accountant.get_privacy_spent()
        return {"noise_std": stdv, "epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}

    def _privacy_accountant(self, num_clients: int) -> Any:
        """Flower's RDP accountant, made on first use (client-level, add-or-remove-one; no
        credit for sampling, since our seeded per-round sample is not Poisson)."""
        if self._accountant is None:
            from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
            from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

            population = max(self.dp_population, num_clients)
            config = PrivacyConfig(
                self.dp_delta, population, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION
            )
            self._accountant = RdpAccountant(config)
            if self._accountant_state is not None:
                self._accountant.load_state_dict(self._accountant_state)
        return self._accountant

    def privacy_state(self) -> dict[str, Any] | None:
        """The accountant's state, for a checkpoint (None without DP or before a release)."""
        return None if self._accountant is None else self._accountant.state_dict()

    def load_privacy_state(self, state: dict[str, Any] | None) -> None:
        """Continue the accounting of a resumed run."""
        self._accountant_state = state

    def _to_record(self, aggregated: StateDict) -> ArrayRecord:
        """Full global ArrayRecord: new arrays for aggregated keys, old ones elsewhere."""
        assert self._global_record is not None
        return ArrayRecord(
            {
                key: Array(np.ascontiguousarray(aggregated[key])) if key in aggregated else old
                for key, old in self._global_record.items()
            }
        )

    def _aggregate_metrics(self, updates: list[ClientUpdate], num_refused: int) -> MetricRecord:
        """Flower's weighted metric average over accepted replies, plus client counts."""
        try:
            metrics = self.train_metrics_aggr_fn([u.content for u in updates], self.weighted_by_key)
        except (TypeError, ValueError, KeyError) as exc:  # inconsistent client metrics
            logger.warning("%s: could not aggregate train metrics: %s", self.rule_name, exc)
            metrics = MetricRecord()
        metrics[ACCEPTED_METRIC] = len(updates)
        metrics[REFUSED_METRIC] = num_refused
        return metrics

    def summary(self) -> None:
        """Flower's summary plus the rule and its parameters."""
        super().summary()
        logger.info("rule %s, backbone prefixes %s", self.rule_name, self.backbone_prefixes)


class LossWeighted(RobustFedAvg):
    """Loss-weighted averaging: α = softmax(−L/T) of the clients' ``train_loss``."""

    supports_dp = False

    rule_name = "loss"
    requires_loss = True

    def __init__(self, *, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        agg.loss_weights([0.0], temperature)  # validates the temperature now
        self.temperature = temperature

    def _aggregate(
        self, server_round: int, reference: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[int, float], dict[str, Any]]:
        losses = [float(u.train_loss) for u in updates]  # type: ignore[arg-type]
        state = agg.loss_weighted(
            [u.state for u in updates],
            losses,
            self.temperature,
            global_state=reference,
            client_ids=_ids(updates),
        )
        return state, _by_node(updates, agg.loss_weights(losses, self.temperature)), {}

    def _stream(self, server_round: int, reference: StateDict) -> RuleStream | None:
        average = StreamingSoftmaxAverage(reference)

        def add(update: ClientUpdate) -> None:
            average.add(update.state, -float(update.train_loss) / self.temperature)  # type: ignore[arg-type]

        def finish(updates: list[ClientUpdate]) -> Aggregate:
            losses = [float(u.train_loss) for u in updates]  # type: ignore[arg-type]
            return average.result(), _by_node(updates, agg.loss_weights(losses, self.temperature)), {}

        return add, finish


class CoordinateMedian(RobustFedAvg):
    """Coordinate-wise median of the accepted updates (Yin et al., ICML 2018), unweighted."""

    supports_dp = False

    rule_name = "median"

    def _aggregate(
        self, server_round: int, reference: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[int, float], dict[str, Any]]:
        state = agg.coordinate_median(reference, [u.state for u in updates])
        return state, {u.node_id: 1.0 / len(updates) for u in updates}, {}

    def _stream(self, server_round: int, reference: StateDict) -> RuleStream | None:
        return None  # a median needs every value of a coordinate at once


class TrimmedMean(RobustFedAvg):
    """Coordinate-wise trimmed mean: the ``trim`` share of largest and smallest values
    dropped per coordinate (Yin et al., ICML 2018), unweighted."""

    supports_dp = False

    rule_name = "trimmed"

    def __init__(self, *, trim: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim_fraction: must be in [0, 0.5), got {trim}")
        self.trim = trim

    def _aggregate(
        self, server_round: int, reference: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[int, float], dict[str, Any]]:
        state = agg.trimmed_mean(reference, [u.state for u in updates], self.trim)
        return state, {u.node_id: 1.0 / len(updates) for u in updates}, {"trim": self.trim}

    def _stream(self, server_round: int, reference: StateDict) -> RuleStream | None:
        return None  # trimming needs every value of a coordinate at once


class MixedFedAvgLoss(RobustFedAvg):
    """FedVSSL's mix: β·FedAvg + (1−β)·loss-weighted, element-wise (β = 0.2)."""

    supports_dp = False

    rule_name = "mixed"
    requires_loss = True

    def __init__(self, *, beta: float = 0.2, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        agg.mixed_weights([1.0], [0.0], beta, temperature)  # validates beta and temperature
        self.beta = beta
        self.temperature = temperature

    def _aggregate(
        self, server_round: int, reference: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[int, float], dict[str, Any]]:
        counts = [u.num_examples for u in updates]
        losses = [float(u.train_loss) for u in updates]  # type: ignore[arg-type]
        state = agg.mixed(
            [u.state for u in updates],
            counts,
            losses,
            self.beta,
            self.temperature,
            global_state=reference,
            client_ids=_ids(updates),
        )
        weights = agg.mixed_weights(counts, losses, self.beta, self.temperature)
        return state, _by_node(updates, weights), {}

    def _stream(self, server_round: int, reference: StateDict) -> RuleStream | None:
        average = StreamingMix(reference, self.beta)

        def add(update: ClientUpdate) -> None:
            average.add(update.state, update.num_examples, -float(update.train_loss) / self.temperature)  # type: ignore[arg-type]

        def finish(updates: list[ClientUpdate]) -> Aggregate:
            counts = [u.num_examples for u in updates]
            losses = [float(u.train_loss) for u in updates]  # type: ignore[arg-type]
            return (
                average.result(),
                _by_node(updates, agg.mixed_weights(counts, losses, self.beta, self.temperature)),
                {},
            )

        return add, finish


class LDAWA(RobustFedAvg):
    """L-DAWA: per-tensor cosine-weighted mean (÷K) after ``warmup_rounds`` of FedAvg.

    The previous global model is the one ``configure_train`` sent this round.
    """

    supports_dp = False

    rule_name = "ldawa"

    def __init__(self, *, warmup_rounds: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")
        self.warmup_rounds = warmup_rounds

    def _aggregate(
        self, server_round: int, reference: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[int, float], dict[str, Any]]:
        if server_round <= self.warmup_rounds:
            state, weights, _ = super()._aggregate(server_round, reference, updates)
            return state, weights, {"warmup": True}
        states = [u.state for u in updates]
        state = agg.ldawa(reference, states, client_ids=_ids(updates))
        deltas = agg.ldawa_deltas(reference, states)
        count = len(updates)
        client_weights = [float(np.mean(list(d.values()))) / count for d in deltas]
        details = {"warmup": False, "deltas": {u.node_id: d for u, d in zip(updates, deltas)}}
        return state, _by_node(updates, client_weights), details

    def _stream(self, server_round: int, reference: StateDict) -> RuleStream | None:
        if server_round <= self.warmup_rounds:
            rule = super()._stream(server_round, reference)
            assert rule is not None
            add_fedavg, finish_fedavg = rule

            def finish_warmup(updates: list[ClientUpdate]) -> Aggregate:
                state, weights, _ = finish_fedavg(updates)
                return state, weights, {"warmup": True}

            return add_fedavg, finish_warmup
        norms = {key: global_norm(value) for key, value in reference.items()}  # once per round
        average = StreamingAverage(reference)
        deltas: dict[int, dict[str, float]] = {}

        def add(update: ClientUpdate) -> None:
            delta = {k: cosine(update.state[k], reference[k], norms[k]) for k in reference}
            deltas[update.node_id] = delta
            average.add(update.state, delta, normaliser=1.0)  # each client counts 1 in the divisor K

        def finish(updates: list[ClientUpdate]) -> Aggregate:
            ordered = [deltas[u.node_id] for u in updates]
            weights = [float(np.mean(list(d.values()))) / len(updates) for d in ordered]
            details = {"warmup": False, "deltas": {u.node_id: d for u, d in zip(updates, ordered)}}
            return average.result(), _by_node(updates, weights), details

        return add, finish


class FedU(RobustFedAvg):
    """FedU server: data-size average of the online encoder and predictor.

    Only keys under ``encoder_prefixes`` + ``predictor_prefixes`` are exchanged (unless
    ``backbone_prefixes`` overrides that set); each train config carries ``fedu-mu`` and
    both prefix lists so the client can apply
    :func:`~fedspeech.ssl.fedu.fedu_client_update`.
    """

    supports_dp = False

    rule_name = "fedu"

    def __init__(
        self,
        *,
        encoder_prefixes: Sequence[str] | str,
        predictor_prefixes: Sequence[str] | str,
        mu: float = 0.4,
        backbone_prefixes: Sequence[str] | str | None = None,
        **kwargs: Any,
    ) -> None:
        encoder = agg.normalise_prefixes(encoder_prefixes)
        predictor = agg.normalise_prefixes(predictor_prefixes)
        assert encoder is not None and predictor is not None
        exchanged = backbone_prefixes if backbone_prefixes is not None else encoder + predictor
        super().__init__(backbone_prefixes=exchanged, **kwargs)
        if not (mu >= 0 and math.isfinite(mu)):
            raise ValueError(f"mu must be finite and >= 0, got {mu}")
        self.encoder_prefixes = encoder
        self.predictor_prefixes = predictor
        self.mu = mu

    def _extra_train_config(self, server_round: int) -> dict[str, Any]:
        return {
            FEDU_MU_KEY: float(self.mu),
            FEDU_ENCODER_KEY: list(self.encoder_prefixes),
            FEDU_PREDICTOR_KEY: list(self.predictor_prefixes),
        }


class DepthAwarePartial(RobustFedAvg):
    """Heterogeneous depth: per key, the data-size mean over the clients that sent it.

    Replies may carry different key sets (a shallow client sends only what it trained);
    keys nobody sent keep the global value. ``keys_for_node(node_id, keys)`` optionally
    picks the keys sent to each node (per-node sub-models); by default all nodes get the
    whole (backbone) model. Never calls ``FedAvg.aggregate_train``, whose validation
    requires identical key sets.
    """

    supports_dp = False

    rule_name = "partial"
    allow_missing_keys = True

    def __init__(
        self,
        *,
        keys_for_node: Callable[[int, list[str]], Iterable[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.keys_for_node = keys_for_node

    def _per_node(self, messages: Iterable[Message]) -> list[Message]:
        """Replace each message's arrays by the node's sub-model."""
        messages = list(messages)
        if self.keys_for_node is None:
            return messages
        result = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            content = message.content
            arrays = content[self.arrayrecord_key]
            wanted = list(self.keys_for_node(node_id, list(arrays.keys())))
            unknown = [k for k in wanted if k not in arrays]
            if unknown:
                raise ValueError(f"keys_for_node({node_id}) returned unknown keys {unknown[:5]}")
            record = RecordDict(
                {
                    self.arrayrecord_key: ArrayRecord({k: arrays[k] for k in wanted}),
                    self.configrecord_key: content[self.configrecord_key],
                }
            )
            result.append(Message(record, dst_node_id=node_id, message_type=message.metadata.message_type))
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._per_node(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._per_node(super().configure_evaluate(server_round, arrays, config, grid))

    def _aggregate(
        self, server_round: int, reference: StateDict, updates: list[ClientUpdate]
    ) -> tuple[StateDict, dict[int, float], dict[str, Any]]:
        states = [u.state for u in updates]
        counts = [u.num_examples for u in updates]
        state = agg.partial_average(reference, states, counts, client_ids=_ids(updates))
        coverage = agg.key_coverage(reference, states)
        details = {
            "keys_not_trained": [k for k, n in coverage.items() if n == 0],
            "keys_sent": {u.node_id: len(u.state) for u in updates},
        }
        # Per-node weight: its share of the examples among all accepted clients; the
        # per-key weight is n_k / Σ_{j∈S_l} n_j (larger for deep keys few clients sent).
        return state, _by_node(updates, agg.fedavg_weights(counts)), details

    def _stream(self, server_round: int, reference: StateDict) -> RuleStream | None:
        average = StreamingAverage(reference)  # per key over the clients that sent it
        sent: dict[int, int] = {}

        def add(update: ClientUpdate) -> None:
            average.add(update.state, update.num_examples)
            sent[update.node_id] = len(update.state)

        def finish(updates: list[ClientUpdate]) -> Aggregate:
            covered = average.covered()
            details = {
                "keys_not_trained": [k for k in reference if k not in covered],
                "keys_sent": {u.node_id: sent[u.node_id] for u in updates},
            }
            return average.result(), _by_node(updates, agg.fedavg_weights([u.num_examples for u in updates])), details

        return add, finish


def make_strategy(name: str, **kwargs: Any) -> RobustFedAvg:
    """Build the strategy of the rule registered as ``name`` in :data:`rules.RULES` with ``kwargs``.

    Flower ``FedAvg`` keyword arguments (``fraction_train``, ``min_train_nodes``, ...)
    pass through to every strategy.
    """
    try:
        cls = globals()[RULES[name].strategy]
    except KeyError:
        raise ValueError(f"unknown aggregation strategy '{name}'; choose one of {sorted(RULES)}") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"strategy '{name}': bad arguments: {exc}") from exc


def _by_destination(messages: Iterable[Message]) -> list[Message]:
    """Messages in node order (Flower's sampling shuffles them), so clients run and
    aggregate in the same order in every run of a seed."""
    return sorted(messages, key=lambda m: int(m.metadata.dst_node_id))


def _finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite scalar number (not a bool or list)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _ids(updates: list[ClientUpdate]) -> list[str]:
    return [f"node {u.node_id}" for u in updates]


def _by_node(updates: list[ClientUpdate], weights: Iterable[float]) -> dict[int, float]:
    return {u.node_id: float(w) for u, w in zip(updates, weights, strict=True)}
