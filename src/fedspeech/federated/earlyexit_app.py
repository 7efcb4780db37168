"""The Flower app for federated early-exit fine-tuning on heterogeneous devices (METHODS §3):
one ``ServerApp`` and one ``ClientApp``, run unchanged by the in-process runner and by
Flower's engines (see :mod:`fedspeech.federated.earlyexit_runner`).

Task (``task`` setting): keyword spotting (``kws``: the keyword labels of the manifest, a
classification head per exit, accuracy) or speech recognition (``asr``: character CTC on
the sentence utterances, a CTC head per exit, WER and CER by greedy decoding), with a
head after every ``exit-every`` Transformer layers of an HF SSL backbone
(:class:`~fedspeech.models.early_exit.EarlyExitModel`).

Start: the server queries every client once; each client plans its own depth from its
device (fleet or ``device`` node config), its data and the round deadline, and replies with
the plan. The server turns the plans into training depths by ``mode``
(:func:`~fedspeech.federated.earlyexit_plan.training_depths`) and writes ``plan.json``.

Round: every sampled client receives only the arrays it runs (frozen CNN, shared trunk,
layers and heads <= its depth), trains layers and heads <= its depth on the loss of all its
exits (optionally with self-distillation), and sends back only what it trained, with the
training FLOPs it spent and their predicted time on its device. The server aggregates
depth-aware (:class:`~fedspeech.federated.strategies.DepthAwarePartial`), measures the
accuracy (kws) or WER and CER (asr) at every exit on held-out speakers, writes an HF
checkpoint (backbone; heads in ``extra.safetensors``) and one JSON line: per-client depth,
FLOPs, upload bytes and device time, FLOPs and bytes per device tier, and the simulated
round wall-clock (the slowest sampled client's predicted device time).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load_file

from fedspeech.data.audio import TARGET_SAMPLE_RATE, AudioDataset, make_loader
from fedspeech.data.manifest import Utterance, read_manifest
from fedspeech.data.partition import Partition, client_utterances
from fedspeech.downstream.metrics import cer, wer
from fedspeech.downstream.tasks import asr_utterances
from fedspeech.downstream.text import CharVocab, ctc_greedy_decode, normalize_transcript, pad_targets
from fedspeech.federated import checkpoints, roundlog
from fedspeech.federated.earlyexit_plan import (
    ClientPlan,
    client_device,
    device_seconds,
    inclusive_deadline,
    plan_client,
    steps_per_round,
    training_depths,
    with_deadline,
)
from fedspeech.federated.earlyexit_settings import EarlyExitSettings
from fedspeech.federated.inprocess import message_bytes
from fedspeech.federated.sampling import SampledGrid, sampled_nodes, wait_for_nodes
from fedspeech.federated.strategies import make_strategy
from fedspeech.models.depth_planner import DepthCostModel, Device, measure_depth_costs
from fedspeech.models.early_exit import ConfidenceExit, EarlyExitModel, early_exit_loss
from fedspeech.models.feature_cache import FrozenFeatureCache
from fedspeech.ssl.train import LRSchedule, train_local

log = logging.getLogger(__name__)

client_app = ClientApp()
server_app = ServerApp()

CONSTANT_LR = LRSchedule(decay="constant")  # the server schedules the learning rate per round
PLAN_FILE = "plan.json"
HEAD_PREFIX = "heads."
EVAL_BATCH = 32


# ----------------------------------------------------------------------------- model


def _model_key(settings: EarlyExitSettings) -> tuple:
    """The settings that decide the model's architecture and initial weights."""
    outputs = settings.label_names if settings.task == "kws" else tuple(run_vocab(settings).tokens)
    return (settings.model, settings.num_layers, settings.model_overrides, settings.exit_every, settings.exits,
            settings.task, outputs, settings.freeze_feature_encoder, settings.head_dropout, settings.seed)


def run_vocab(settings: EarlyExitSettings) -> CharVocab:
    """The asr character vocabulary: fixed by the settings (not read from data), so the
    server and every client, whatever manifest it holds, agree on the CTC outputs."""
    return CharVocab(settings.letter_set) if settings.letter_set else CharVocab()


def model_head(settings: EarlyExitSettings) -> tuple[str, int]:
    """(model task, outputs per exit) of the run's task."""
    if settings.task == "asr":
        return "ctc", len(run_vocab(settings))
    return "classify", len(settings.label_names)


def build_model(settings: EarlyExitSettings) -> EarlyExitModel:
    """The early-exit model of a run; presets are initialised from ``seed`` (same weights
    on the server and in every process)."""
    task, outputs = model_head(settings)
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        return EarlyExitModel.build(
            settings.model, task, outputs, exits=settings.exit_list,
            every=None if settings.exit_list else settings.exit_every,
            config_overrides=settings.config_overrides,
            freeze_feature_encoder=settings.freeze_feature_encoder, head_dropout=settings.head_dropout,
        )


# Per-process caches for the clients (settings are not hashable, so no lru_cache): one
# model, loaded with every array a call runs, and the measured cost lines per precision.
_MODELS: dict[tuple, EarlyExitModel] = {}
_COSTS: dict[tuple, dict[int, DepthCostModel]] = {}
# What a client keeps in its node's ``context.state`` for the rest of the run. Under the
# Deployment Engine every message runs in a fresh ClientApp process, so in-memory caches
# would start empty each round; the node state survives, under every runner.
COST_LINES_STATE = "early-exit-cost-lines"
FEATURES_STATE = "early-exit-cnn-features"
FEATURE_DIGESTS_STATE = "early-exit-cnn-feature-digests"


def client_model(settings: EarlyExitSettings) -> EarlyExitModel:
    key = _model_key(settings)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = build_model(settings)
    return _MODELS[key]


def depth_costs(settings: EarlyExitSettings, precision: str = "fp32",
                lengths: tuple[float, float] | None = None) -> dict[int, DepthCostModel]:
    """FLOPs and memory per depth, measured once per process on the run's model at two audio
    lengths (default: half and all of ``train_seconds``) and fitted linearly in audio length
    (``measure_depth_costs``)."""
    lengths = lengths or (settings.train_seconds / 2, settings.train_seconds)
    key = (_model_key(settings), lengths, precision, settings.cached_cnn)
    if key not in _COSTS:
        model = client_model(settings)
        model.freeze_beyond(None)  # every layer trainable; layers deeper than d simply do not run
        _COSTS[key] = {c.depth: c for c in measure_depth_costs(model, lengths=lengths, precision=precision,
                                                               cached_cnn=settings.cached_cnn)}
    return _COSTS[key]


def cost_lengths(settings: EarlyExitSettings, dataset: AudioDataset) -> tuple[float, float]:
    """Where a client's cost lines are measured. kws: half and all of the crop (every batch
    is padded to at most the crop). asr: the client's own shortest (at most half its longest)
    and longest sentence. Why not the ``asr_max_seconds`` cap: self-attention grows
    quadratically with length, so a line fitted at 8 and 16 s badly mispredicts 3 s sentences
    (for a tiny model even to shrinking cost with depth)."""
    if settings.task == "kws":
        return settings.max_seconds / 2, settings.max_seconds
    durations = [u.duration for u in dataset.utterances]
    longest = max(durations)
    return min(min(durations), longest / 2), longest


def client_costs(settings: EarlyExitSettings, client_id: int, manifest: str, partition: str,
                 precision: str = "fp32") -> dict[int, DepthCostModel]:
    """:func:`depth_costs` measured at the lengths of this client's training data."""
    dataset = _task_dataset(settings, manifest, partition, client_id)
    return depth_costs(settings, precision, cost_lengths(settings, dataset))


def node_costs(settings: EarlyExitSettings, context: Context, client_id: int, manifest: str, partition: str,
               precision: str) -> dict[int, DepthCostModel]:
    """:func:`client_costs`, measured once per run and node and kept in its ``context.state``."""
    kept = context.state.get(COST_LINES_STATE)
    if kept is not None and precision in kept:
        return {line["depth"]: DepthCostModel(**line) for line in json.loads(str(kept[precision]))}
    costs = client_costs(settings, client_id, manifest, partition, precision)
    kept = kept if kept is not None else ConfigRecord()
    kept[precision] = json.dumps([asdict(line) for line in costs.values()])
    context.state[COST_LINES_STATE] = kept
    return costs


def node_feature_cache(settings: EarlyExitSettings, context: Context) -> FrozenFeatureCache | None:
    """The client's CNN feature cache from its node state (None when the CNN is trained or
    caching is off): each client pays for computing an utterance's features once per run."""
    if not settings.cached_cnn:
        return None
    features, digests = context.state.get(FEATURES_STATE), context.state.get(FEATURE_DIGESTS_STATE)
    if features is None or digests is None:
        return FrozenFeatureCache()
    return FrozenFeatureCache.restore(features.to_torch_state_dict(), {k: str(v) for k, v in digests.items()})


def keep_feature_cache(context: Context, cache: FrozenFeatureCache | None) -> None:
    if cache is not None:
        features, digests = cache.export()
        context.state[FEATURES_STATE] = ArrayRecord(features)
        context.state[FEATURE_DIGESTS_STATE] = ConfigRecord(digests)


def load_early_exit(folder: str | Path) -> EarlyExitModel:
    """An early-exit model from one of this app's round checkpoints (inference, evaluation)."""
    folder = Path(folder)
    state = checkpoints.load_state(folder)
    settings = EarlyExitSettings.from_run_config(state["settings"])
    outputs = len(state["vocab"]) if settings.task == "asr" else len(state["labels"])
    model = EarlyExitModel.build(folder, model_head(settings)[0], outputs, exits=state["exits"],
                                 freeze_feature_encoder=settings.freeze_feature_encoder)
    _restore_heads(model, folder)
    return model


def load_vocab(folder: str | Path) -> CharVocab:
    """The character vocabulary of an asr round checkpoint (to decode its CTC exits)."""
    state = checkpoints.load_state(Path(folder))
    if "vocab" not in state:
        raise ValueError(f"{folder}: not an asr checkpoint (it has no character vocabulary)")
    return CharVocab.from_dict({"tokens": state["vocab"]})


def _restore_heads(model: EarlyExitModel, folder: Path) -> None:
    heads = checkpoints.load_extra(folder)
    missing = [k for k in model.state_dict() if k.startswith(HEAD_PREFIX) and k not in heads]
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks heads {missing[:3]}")
    model.load_state_dict(heads, strict=False)


# ----------------------------------------------------------------------------- data


def _keyword_utterances(utterances: list[Utterance]) -> list[Utterance]:
    return [u for u in utterances if u.label]


# What each task trains and evaluates on: keyword clips, or sentences (as downstream ASR).
_TASK_UTTERANCES = {"kws": (_keyword_utterances, "keyword"), "asr": (asr_utterances, "transcribed sentence")}


@lru_cache(maxsize=256)
def _client_dataset(manifest: str, partition: str, client_id: int, max_seconds: float, seed: int,
                    task: str = "kws") -> AudioDataset:
    """A client's utterances of the task, decoded once per process. kws crops them to
    ``max_seconds`` at random; asr drops longer sentences instead (a crop would cut the
    transcript)."""
    pick, what = _TASK_UTTERANCES[task]
    utterances = pick(client_utterances(Partition.load(partition), read_manifest(manifest), client_id))
    if not utterances:
        raise ValueError(f"client {client_id} of {partition} holds no {what} utterances in {manifest}")
    if task == "kws":
        return AudioDataset(utterances, max_seconds=max_seconds, seed=seed + client_id)
    kept = [u for u in utterances if u.duration <= max_seconds]
    if not kept:
        raise ValueError(f"client {client_id} of {partition}: all {len(utterances)} sentences are longer than "
                         f"--asr-max-seconds {max_seconds}")
    if len(kept) < len(utterances):
        log.info("client %d: dropped %d sentence(s) longer than %.1f s", client_id, len(utterances) - len(kept),
                 max_seconds)
    return AudioDataset(kept, max_seconds=None, seed=seed + client_id)


@lru_cache(maxsize=4)
def _eval_dataset(manifest: str, splits: tuple[str, ...], max_utterances: int, max_seconds: float,
                  task: str = "kws") -> AudioDataset:
    """The task's utterances of held-out speakers (``splits``), a fixed subset so rounds
    compare; keywords centre-cropped to ``max_seconds``, sentences whole."""
    pick, what = _TASK_UTTERANCES[task]
    chosen = sorted((u for u in pick(read_manifest(manifest)) if u.split in splits), key=lambda u: u.id)
    if not chosen:
        raise ValueError(f"{manifest}: no {what} utterances in split(s) {', '.join(splits)} to evaluate on")
    if max_utterances:
        chosen = chosen[:max_utterances]
    return AudioDataset(chosen, max_seconds=max_seconds if task == "kws" else None, seed=0, crop="center")


def _task_dataset(settings: EarlyExitSettings, manifest: str, partition: str, client_id: int) -> AudioDataset:
    return _client_dataset(manifest, partition, client_id, settings.train_seconds, settings.seed, settings.task)


def label_targets(utterances: list[Utterance], labels: tuple[str, ...]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(labels)}
    try:
        return torch.tensor([index[u.label] for u in utterances], dtype=torch.long)
    except KeyError as missing:
        raise ValueError(f"utterance label {missing} is not a class of this run ({', '.join(labels)}); "
                         "set --labels") from None


def transcript_targets(utterances: list[Utterance], vocab: CharVocab) -> torch.Tensor:
    """CTC targets (padded with -100) of the normalised transcripts."""
    sequences = []
    for utterance in utterances:
        try:
            sequences.append(vocab.encode(utterance.transcript))
        except ValueError as error:
            raise ValueError(f"utterance {utterance.id}: {error}; set --letters") from None
    return pad_targets(sequences)


# ----------------------------------------------------------------------------- client


@dataclass
class _StepOutput:
    loss: torch.Tensor
    num_examples: int


class EarlyExitObjective:
    """Loss of one batch over the client's exits (``train_local`` objective), counting the
    training FLOPs of every batch it runs from the depth's measured cost line. With a
    ``vocab`` the exits are CTC heads trained on the transcripts, else classifiers of ``labels``."""

    def __init__(self, depth: int, labels: tuple[str, ...], cost: DepthCostModel, *, distill_lambda: float,
                 temperature: float, mixed: bool, vocab: CharVocab | None = None,
                 cache: FrozenFeatureCache | None = None) -> None:
        self.depth, self.labels, self.cost, self.vocab, self.cache = depth, labels, cost, vocab, cache
        self.distill_lambda, self.temperature, self.mixed = distill_lambda, temperature, mixed
        self.flops = 0.0
        self.cache_flops = 0.0
        self.longest_seconds = 0.0
        self.largest_batch = 0

    def __call__(self, model: EarlyExitModel, batch: dict, rng: np.random.Generator | None) -> _StepOutput:
        audio = batch["input_values"]
        seconds = audio.shape[1] / TARGET_SAMPLE_RATE  # a padded batch costs its longest item
        self.flops += self.cost.at(seconds, audio.shape[0]).train_flops
        self.longest_seconds = max(self.longest_seconds, seconds)
        self.largest_batch = max(self.largest_batch, audio.shape[0])
        if self.cache is not None:  # the cost line starts after the CNN; filling the cache is counted here
            spent = self.cache.flops_spent
            features, frame_lengths = self.cache.features(model, batch)
            self.cache_flops += self.cache.flops_spent - spent
            self.flops += self.cache.flops_spent - spent
            inputs = {"features": features, "frame_lengths": frame_lengths}
        else:
            inputs = {"input_values": audio, "attention_mask": batch.get("attention_mask")}
        with torch.autocast(audio.device.type, dtype=torch.bfloat16, enabled=self.mixed):
            out = model(**inputs, depth=self.depth)
        if self.vocab is None:
            targets = label_targets(batch["utterances"], self.labels).to(audio.device)
            loss = early_exit_loss(out.logits, targets, "classify", distill_lambda=self.distill_lambda,
                                   temperature=self.temperature)
        else:
            targets = transcript_targets(batch["utterances"], self.vocab).to(audio.device)
            loss = early_exit_loss(out.logits, targets, "ctc", distill_lambda=self.distill_lambda,
                                   temperature=self.temperature, output_lengths=out.output_lengths,
                                   blank=self.vocab.blank_id)
        return _StepOutput(loss, int(audio.shape[0]))


def _node_paths(settings: EarlyExitSettings, context: Context) -> tuple[int, str, str]:
    """(client id, manifest, partition); a SuperNode may point at its own files."""
    node = context.node_config
    return (int(node["partition-id"]), str(node.get("manifest", settings.manifest)),
            str(node.get("partition", settings.partition)))


def _client_device(settings: EarlyExitSettings, context: Context) -> Device:
    """The client's device: its ``device`` node config, else its place in the fleet."""
    node = context.node_config
    client_id = int(node["partition-id"])
    num_clients = int(node.get("num-partitions", 0)) or Partition.load(settings.partition).num_clients
    override = node.get("device")
    return client_device(settings.fleet, settings.fleet_seed, settings.catalogue, client_id, num_clients,
                         str(override) if override else None)


def _precision(settings: EarlyExitSettings, device: Device) -> str:
    return "mixed" if settings.precision == "mixed" and device.mixed_precision else "fp32"


@dataclass(frozen=True)
class Workload:
    """What a client's round costs to plan: steps, batch size and the longest crop a batch holds."""

    steps: int
    batch: int
    seconds: float


def client_workload(settings: EarlyExitSettings, client_id: int, manifest: str, partition: str) -> Workload:
    dataset = _task_dataset(settings, manifest, partition, client_id)
    return Workload(steps=steps_per_round(len(dataset), settings.batch_size, settings.local_epochs),
                    batch=min(settings.batch_size, len(dataset)),
                    seconds=min(settings.train_seconds, max(u.duration for u in dataset.utterances)))


@client_app.query()
def client_plan(msg: Message, context: Context) -> Message:
    """Plan this client's depth from its device, its data and the deadline (none when auto:
    the server then decides from the candidates)."""
    settings = EarlyExitSettings.from_run_config(context.run_config)
    client_id, manifest, partition = _node_paths(settings, context)
    device = _client_device(settings, context)
    precision = _precision(settings, device)
    work = client_workload(settings, client_id, manifest, partition)
    cap = context.node_config.get("max-depth")
    plan = plan_client(
        client_id, device, list(node_costs(settings, context, client_id, manifest, partition, precision).values()),
        deadline=settings.deadline or math.inf,
        steps=work.steps, batch=work.batch, seconds=work.seconds, precision=precision,
        max_depth=int(cap) if cap not in (None, "") else None,
    )
    content = RecordDict({"plan": ConfigRecord({"plan": json.dumps(plan.to_dict())}),
                          "metrics": MetricRecord({"partition-id": client_id, "depth": plan.depth})})
    return Message(content, reply_to=msg)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    settings = EarlyExitSettings.from_run_config(context.run_config)
    config = msg.content["config"]
    depth, server_round = int(config["depth"]), int(config["server-round"])
    client_id, manifest, partition = _node_paths(settings, context)
    device = _client_device(settings, context)
    precision = _precision(settings, device)
    start = time.perf_counter()

    model = client_model(settings)
    received = msg.content["arrays"].to_torch_state_dict()
    needed = set(model.held_keys(depth))
    if missing := sorted(needed - set(received)):
        raise ValueError(f"depth {depth} needs {len(missing)} arrays the server did not send, e.g. {missing[0]}")
    if unknown := model.load_state_dict(received, strict=False).unexpected_keys:
        raise ValueError(f"the server sent {len(unknown)} arrays this model does not have, e.g. {unknown[0]}")
    model.freeze_beyond(depth)

    dataset = _task_dataset(settings, manifest, partition, client_id)
    dataset.set_epoch(server_round)
    loader = make_loader(dataset, settings.batch_size, shuffle=True, seed=settings.seed * 100_003 + server_round)
    cost = node_costs(settings, context, client_id, manifest, partition, precision)[depth]
    cache = node_feature_cache(settings, context)
    objective = EarlyExitObjective(depth, settings.label_names, cost, distill_lambda=settings.distill_lambda,
                                   temperature=settings.distill_temperature, mixed=precision == "mixed",
                                   vocab=run_vocab(settings) if settings.task == "asr" else None,
                                   cache=cache)
    # Seeded last: measuring cost lines (in a node's first message only) draws random numbers.
    torch.manual_seed(hash((settings.seed, server_round, client_id)) % 2**63)  # dropout
    result = train_local(model, objective, loader, epochs=settings.local_epochs, lr=float(config["lr"]),
                         lr_schedule=CONSTANT_LR, max_grad_norm=settings.max_grad_norm,
                         rng=np.random.default_rng([settings.seed, server_round, client_id]))
    keep_feature_cache(context, cache)

    peak = cost.at(objective.longest_seconds, objective.largest_batch).peak_bytes
    metrics = {
        "num-examples": result.num_examples, "train_loss": result.mean_loss_last_epoch,
        "partition-id": client_id, "depth": depth, "steps": result.steps,
        "skipped-batches": result.skipped_batches, "train-flops": objective.flops,
        "cnn-cache-flops": objective.cache_flops,
        "predicted-peak-bytes": peak, "fits-memory": int(peak <= device.usable_bytes),
        "seconds": time.perf_counter() - start,
    }
    simulated = device_seconds(objective.flops, device, precision)
    if simulated is not None:
        metrics["device-seconds"] = simulated
    content = RecordDict({
        "arrays": ArrayRecord(model.partial_state_dict(depth)),
        "metrics": MetricRecord(metrics),
        "info": ConfigRecord({"device": device.name, "precision": precision}),
    })
    return Message(content, reply_to=msg)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _eval_outputs(model: EarlyExitModel, batch: dict, cache: FrozenFeatureCache | None):
    """All exits' outputs for an evaluation batch, from cached CNN features when there is a cache."""
    if cache is None:
        return model(batch["input_values"], batch["attention_mask"])
    features, frame_lengths = cache.features(model, batch)
    return model(features=features, frame_lengths=frame_lengths)


def evaluate_exits(model: EarlyExitModel, dataset: AudioDataset, labels: tuple[str, ...],
                   threshold: float, cache: FrozenFeatureCache | None = None) -> dict:
    """Accuracy at every exit, and of the confidence-exit policy (with its mean exit layer)."""
    was_training = model.training
    model.eval()
    policy = ConfidenceExit(threshold)
    correct = {e: 0 for e in model.exits}
    policy_correct, exit_sum, total = 0, 0.0, 0
    try:
        for batch in make_loader(dataset, EVAL_BATCH, shuffle=False):
            targets = label_targets(batch["utterances"], labels)
            out = _eval_outputs(model, batch, cache)
            for layer, logits in out.logits.items():
                correct[layer] += int((logits.argmax(-1) == targets).sum())
            chosen_exit, chosen_logits = policy.select(out.logits)
            policy_correct += int((chosen_logits.argmax(-1) == targets).sum())
            exit_sum += float(chosen_exit.float().sum())
            total += len(targets)
    finally:
        model.train(was_training)
    return {
        "accuracy": {str(e): c / total for e, c in correct.items()},
        "confidence_exit": {"threshold": threshold, "accuracy": policy_correct / total,
                            "mean_exit_layer": exit_sum / total},
        "eval_utterances": total,
    }


@torch.no_grad()
def evaluate_ctc_exits(model: EarlyExitModel, dataset: AudioDataset, vocab: CharVocab, threshold: float,
                       cache: FrozenFeatureCache | None = None) -> dict:
    """Corpus WER and CER at every exit (greedy CTC decoding of the normalised transcripts),
    and of the confidence-exit policy (with its mean exit layer)."""
    was_training = model.training
    model.eval()
    policy = ConfidenceExit(threshold)
    hypotheses: dict[int, list[str]] = {e: [] for e in model.exits}
    policy_hypotheses, references, exit_sum = [], [], 0.0

    def decode(logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return [vocab.decode(tokens) for tokens in ctc_greedy_decode(logits, lengths, vocab.blank_id)]

    try:
        for batch in make_loader(dataset, EVAL_BATCH, shuffle=False):
            references += [normalize_transcript(u.transcript) for u in batch["utterances"]]
            out = _eval_outputs(model, batch, cache)
            for layer, logits in out.logits.items():
                hypotheses[layer] += decode(logits, out.output_lengths)
            chosen_exit, chosen_logits = policy.select(out.logits, out.output_lengths)
            policy_hypotheses += decode(chosen_logits, out.output_lengths)
            exit_sum += float(chosen_exit.float().sum())
    finally:
        model.train(was_training)
    return {
        "wer": {str(e): wer(references, h) for e, h in hypotheses.items()},
        "cer": {str(e): cer(references, h) for e, h in hypotheses.items()},
        "confidence_exit": {"threshold": threshold, "wer": wer(references, policy_hypotheses),
                            "cer": cer(references, policy_hypotheses),
                            "mean_exit_layer": exit_sum / len(references)},
        "eval_utterances": len(references),
        # one example per exit, so a round log shows what the numbers mean
        "example": {"reference": references[0], **{str(e): h[0] for e, h in hypotheses.items()}},
    }


def _evaluate(settings: EarlyExitSettings, model: EarlyExitModel, dataset: AudioDataset,
              cache: FrozenFeatureCache | None) -> dict:
    """The task's per-exit scores, plus ``<score>_deepest`` for the deepest exit."""
    deepest = str(model.exits[-1])
    if settings.task == "asr":
        scores = evaluate_ctc_exits(model, dataset, run_vocab(settings), settings.confidence_threshold, cache)
        return {**scores, "wer_deepest": scores["wer"][deepest], "cer_deepest": scores["cer"][deepest]}
    scores = evaluate_exits(model, dataset, settings.label_names, settings.confidence_threshold, cache)
    return {**scores, "accuracy_deepest": scores["accuracy"][deepest]}


# ----------------------------------------------------------------------------- server


def _query_plans(grid: Grid, nodes: list[int]) -> tuple[dict[int, ClientPlan], dict[int, str]]:
    """Every node's own depth plan; nodes that fail to plan are reported, not fatal."""
    messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in nodes]
    plans, failed = {}, {}
    for reply in grid.send_and_receive(messages):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            failed[node] = reply.error.reason
            log.warning("node %d could not plan its depth: %s", node, reply.error.reason)
            continue
        plans[node] = ClientPlan.from_dict(json.loads(reply.content["plan"]["plan"]))
    if not plans:
        raise RuntimeError(f"no client could plan its depth: {failed}")
    return plans, failed


def _resume_or_start(settings: EarlyExitSettings, model: EarlyExitModel) -> int:
    """Restore the last complete round when resuming; return the next round."""
    out = Path(settings.out_dir)
    latest = checkpoints.latest_checkpoint(out) if settings.resume else None
    if latest is None:
        if roundlog.log_path(out).exists() and not settings.resume:
            raise ValueError(f"{out}: holds an earlier run; pass --resume to continue it or choose another --out")
        return 1
    model.backbone.load_state_dict(load_file(str(latest / "model.safetensors")))
    _restore_heads(model, latest)
    state = checkpoints.load_state(latest)
    roundlog.truncate_after(out, state["round"])
    log.info("resuming after round %d from %s", state["round"], latest)
    return int(state["round"]) + 1


def _client_rows(replies: list[Message], client_of: dict[int, int]) -> list[dict]:
    rows = []
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            rows.append({"client": client_of.get(node, -1), "error": reply.error.reason})
            continue
        m, info = reply.content["metrics"], reply.content["info"]
        rows.append({
            "client": int(m["partition-id"]), "device": str(info["device"]), "precision": str(info["precision"]),
            "depth": int(m["depth"]), "examples": int(m["num-examples"]), "train_loss": float(m["train_loss"]),
            "steps": int(m["steps"]), "train_flops": float(m["train-flops"]),
            "cnn_cache_flops": float(m.get("cnn-cache-flops", 0.0)),
            "device_seconds": float(m["device-seconds"]) if "device-seconds" in m else None,
            "predicted_peak_bytes": float(m["predicted-peak-bytes"]), "fits_memory": bool(m["fits-memory"]),
            "arrays_sent": len(reply.content["arrays"]), "bytes_sent": message_bytes(reply),
            "seconds": float(m["seconds"]),
        })
    return sorted(rows, key=lambda r: r["client"])


def _by_device(rows: list[dict], field: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        totals[row["device"]] += row[field]
    return dict(sorted(totals.items()))


def _layers_not_trained(model: EarlyExitModel, rows: list[dict]) -> list[int]:
    deepest = max((r["depth"] for r in rows), default=0)
    return list(range(deepest + 1, model.num_layers + 1))


def _write_plan(out: Path, settings: EarlyExitSettings, deadline: float, plans: dict[int, ClientPlan],
                failed: dict[int, str], depths: dict[int, int]) -> None:
    clients = []
    for node, plan in sorted(plans.items(), key=lambda item: item[1].client):
        clients.append({**plan.to_dict(), "training_depth": depths.get(node, 0), "takes_part": node in depths})
    document = {"mode": settings.mode, "deadline": deadline, "auto_deadline": not settings.deadline, "clients": clients,
                "failed_nodes": {str(k): v for k, v in failed.items()}}
    (out / PLAN_FILE).write_text(json.dumps(document, indent=2) + "\n")


def run_server(grid: Grid, settings: EarlyExitSettings) -> list[dict]:
    """Run (or resume) federated early-exit fine-tuning; returns the round records written."""
    from rich.progress import Progress

    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(settings)
    first_round = _resume_or_start(settings, model)
    num_clients = Partition.load(settings.partition).num_clients
    nodes = wait_for_nodes(grid, num_clients)
    plans, failed = _query_plans(grid, nodes)
    deadline = settings.deadline
    if not deadline:
        deadline = inclusive_deadline(plans.values())
        plans = {n: with_deadline(p, deadline) for n, p in plans.items()}
        log.info("auto deadline: %.4g s of device time per round", deadline)
    depths = training_depths(settings.mode, {n: p.depth for n, p in plans.items()}, model.num_layers)
    client_of = {n: p.client for n, p in plans.items()}
    _write_plan(out, settings, deadline, plans, failed, depths)
    log.info("%s: depths %s", settings.mode, {client_of[n]: d for n, d in sorted(depths.items())})

    held = {d: model.held_keys(d) for d in set(depths.values())}
    strategy = make_strategy("partial", keys_for_node=lambda node, keys: held[depths[node]], fraction_train=1.0,
                             fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    arrays = ArrayRecord(model.state_dict())
    eval_set = _eval_dataset(settings.manifest, settings.split_names, settings.eval_max_utterances,
                             settings.max_seconds, settings.task)
    # the server's own cache of the held-out set's CNN features (not client compute)
    eval_cache = FrozenFeatureCache() if settings.cached_cnn else None
    participants = sorted(depths)
    cumulative_flops = sum(r["client_flops"] for r in roundlog.read_rounds(out)) if first_round > 1 else 0.0
    records = []
    with Progress(disable=not sys.stderr.isatty(), transient=True) as progress:
        task = progress.add_task(f"early-exit fine-tuning ({settings.mode})", total=settings.rounds,
                                 completed=first_round - 1)
        for server_round in range(first_round, settings.rounds + 1):
            started = time.perf_counter()
            chosen = sampled_nodes(participants, settings.clients_per_round, server_round, settings.seed)
            config = ConfigRecord({"lr": settings.lr_at_round(server_round)})
            messages = list(strategy.configure_train(server_round, arrays, config, SampledGrid(grid, chosen)))
            for message in messages:  # one sub-model per node: its depth goes with it
                own = dict(message.content["config"])
                message.content["config"] = ConfigRecord({**own, "depth": depths[message.metadata.dst_node_id]})
            replies = list(grid.send_and_receive(messages))
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = new_arrays
            model.load_state_dict(arrays.to_torch_state_dict())
            clients = _client_rows(replies, client_of)
            ok = [c for c in clients if "error" not in c]
            evaluation = _evaluate(settings, model, eval_set, eval_cache)
            checkpoints.save_checkpoint(
                out, server_round, model.backbone,
                {k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIX)},
                state={"settings": settings.to_run_config(), "exits": list(model.exits),
                       **({"vocab": run_vocab(settings).tokens} if settings.task == "asr"
                          else {"labels": list(settings.label_names)})})
            checkpoints.prune_checkpoints(out, settings.keep_checkpoints)
            timed = [c["device_seconds"] for c in ok if c["device_seconds"] is not None]
            round_flops = sum(c["train_flops"] for c in ok)
            cumulative_flops += round_flops
            report = strategy.last_report
            record = {
                "round": server_round,
                "mode": settings.mode,
                "task": settings.task,
                "sampled": sorted(c["client"] for c in ok),
                "failed": [c for c in clients if "error" in c],
                "refused": {str(client_of.get(k, k)): v for k, v in (report.refused if report else {}).items()},
                "clients": ok,
                "train_loss": sum(c["train_loss"] * c["examples"] for c in ok) / max(1, sum(c["examples"] for c in ok)),
                **evaluation,
                "layers_not_trained": _layers_not_trained(model, ok),
                "client_flops": round_flops,
                "client_flops_by_device": _by_device(ok, "train_flops"),
                "cumulative_client_flops": cumulative_flops,
                "upload_bytes": sum(c["bytes_sent"] for c in ok),
                "upload_bytes_by_device": _by_device(ok, "bytes_sent"),
                "bytes_to_clients": sum(message_bytes(m) for m in messages),
                "simulated_round_seconds": max(timed) if timed else None,
                "deadline": deadline,
                "lr": config["lr"],
                "round_seconds": time.perf_counter() - started,
            }
            roundlog.append_round(out, record)
            records.append(record)
            score = "wer" if settings.task == "asr" else "accuracy"
            log.info("round %d (%s): train loss %.4f, %s by exit %s, simulated %.3g s", server_round,
                     settings.mode, record["train_loss"], score, {k: round(v, 3) for k, v in record[score].items()},
                     record["simulated_round_seconds"] or math.nan)
            progress.advance(task)
    return records


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run_server(grid, EarlyExitSettings.from_run_config(context.run_config))
