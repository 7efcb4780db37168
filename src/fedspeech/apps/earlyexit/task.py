"""The science of federated early-exit fine-tuning (METHODS §3), free of Flower: the
early-exit model of a run and its measured cost per depth, a client's data, and the loss a
client trains on.

Task (``task`` setting): keyword spotting (``kws``: the keyword labels of the manifest, a
classification head per exit, accuracy) or speech recognition (``asr``: character CTC on
the sentence utterances, a CTC head per exit, WER and CER by greedy decoding), with a
head after every ``exit-every`` Transformer layers of an HF SSL backbone
(:class:`~fedspeech.models.early_exit.EarlyExitModel`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedspeech.apps.earlyexit.plan import (
    steps_per_round,
)
from fedspeech.apps.earlyexit.settings import EarlyExitSettings
from fedspeech.data.audio import TARGET_SAMPLE_RATE, AudioDataset
from fedspeech.data.manifest import Utterance, read_manifest
from fedspeech.data.partition import Partition, client_utterances
from fedspeech.downstream.tasks import asr_utterances
from fedspeech.downstream.text import CharVocab, pad_targets
from fedspeech.federated import checkpoints
from fedspeech.models.early_exit import EarlyExitModel, Task, early_exit_loss
from fedspeech.models.feature_cache import FrozenFeatureCache
from fedspeech.profiling.depth_planner import DepthCostModel, measure_depth_costs
from fedspeech.ssl.train import LRSchedule

log = logging.getLogger(__name__)

CONSTANT_LR = LRSchedule(decay="constant")  # the server schedules the learning rate per round
HEAD_PREFIX = "heads."
EVAL_BATCH = 32


def _model_key(settings: EarlyExitSettings) -> tuple:
    """The settings that decide the model's architecture and initial weights."""
    outputs = settings.label_names if settings.task == "kws" else tuple(run_vocab(settings).tokens)
    return (
        settings.model,
        settings.num_layers,
        settings.model_overrides,
        settings.exit_every,
        settings.exits,
        settings.task,
        outputs,
        settings.freeze_feature_encoder,
        settings.head_dropout,
        settings.seed,
    )


def run_vocab(settings: EarlyExitSettings) -> CharVocab:
    """The asr character vocabulary: fixed by the settings (not read from data), so the
    server and every client, whatever manifest it holds, agree on the CTC outputs."""
    return CharVocab(settings.letter_set) if settings.letter_set else CharVocab()


def model_head(settings: EarlyExitSettings) -> tuple[Task, int]:
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
            settings.model,
            task,
            outputs,
            exits=settings.exit_list,
            every=None if settings.exit_list else settings.exit_every,
            config_overrides=settings.config_overrides,
            freeze_feature_encoder=settings.freeze_feature_encoder,
            head_dropout=settings.head_dropout,
        )


# Per-process caches for the clients (settings are not hashable, so no lru_cache): one
# model, loaded with every array a call runs, and the measured cost lines per precision.
_MODELS: dict[tuple, EarlyExitModel] = {}
_COSTS: dict[tuple, dict[int, DepthCostModel]] = {}


def client_model(settings: EarlyExitSettings) -> EarlyExitModel:
    key = _model_key(settings)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = build_model(settings)
    return _MODELS[key]


def depth_costs(
    settings: EarlyExitSettings, precision: str = "fp32", lengths: tuple[float, float] | None = None
) -> dict[int, DepthCostModel]:
    """FLOPs and memory per depth, measured once per process on the run's model at two audio
    lengths (default: half and all of ``train_seconds``) and fitted linearly in audio length
    (``measure_depth_costs``)."""
    lengths = lengths or (settings.train_seconds / 2, settings.train_seconds)
    key = (_model_key(settings), lengths, precision, settings.cached_cnn)
    if key not in _COSTS:
        model = client_model(settings)
        model.freeze_beyond(None)  # every layer trainable; layers deeper than d simply do not run
        _COSTS[key] = {
            c.depth: c
            for c in measure_depth_costs(model, lengths=lengths, precision=precision, cached_cnn=settings.cached_cnn)
        }
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


def client_costs(
    settings: EarlyExitSettings, client_id: int, manifest: str, partition: str, precision: str = "fp32"
) -> dict[int, DepthCostModel]:
    """:func:`depth_costs` measured at the lengths of this client's training data."""
    dataset = task_dataset(settings, manifest, partition, client_id)
    return depth_costs(settings, precision, cost_lengths(settings, dataset))


def load_early_exit(folder: str | Path) -> EarlyExitModel:
    """An early-exit model from one of this app's round checkpoints (inference, evaluation)."""
    folder = Path(folder)
    state = checkpoints.load_state(folder)
    settings = EarlyExitSettings.from_run_config(state["settings"])
    outputs = len(state["vocab"]) if settings.task == "asr" else len(state["labels"])
    model = EarlyExitModel.build(
        folder,
        model_head(settings)[0],
        outputs,
        exits=state["exits"],
        freeze_feature_encoder=settings.freeze_feature_encoder,
    )
    restore_heads(model, folder)
    return model


def load_vocab(folder: str | Path) -> CharVocab:
    """The character vocabulary of an asr round checkpoint (to decode its CTC exits)."""
    state = checkpoints.load_state(Path(folder))
    if "vocab" not in state:
        raise ValueError(f"{folder}: not an asr checkpoint (it has no character vocabulary)")
    return CharVocab.from_dict({"tokens": state["vocab"]})


def restore_heads(model: EarlyExitModel, folder: Path) -> None:
    heads = checkpoints.load_extra(folder)
    missing = [k for k in model.state_dict() if k.startswith(HEAD_PREFIX) and k not in heads]
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks heads {missing[:3]}")
    model.load_state_dict(heads, strict=False)


def _keyword_utterances(utterances: list[Utterance]) -> list[Utterance]:
    return [u for u in utterances if u.label]


# What each task trains and evaluates on: keyword clips, or sentences (as downstream ASR).
_TASK_UTTERANCES = {"kws": (_keyword_utterances, "keyword"), "asr": (asr_utterances, "transcribed sentence")}


@lru_cache(maxsize=256)
def _client_dataset(
    manifest: str, partition: str, client_id: int, max_seconds: float, seed: int, task: str = "kws"
) -> AudioDataset:
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
        raise ValueError(
            f"client {client_id} of {partition}: all {len(utterances)} sentences are longer than "
            f"--asr-max-seconds {max_seconds}"
        )
    if len(kept) < len(utterances):
        log.info(
            "client %d: dropped %d sentence(s) longer than %.1f s", client_id, len(utterances) - len(kept), max_seconds
        )
    return AudioDataset(kept, max_seconds=None, seed=seed + client_id)


@lru_cache(maxsize=4)
def eval_dataset(
    manifest: str, splits: tuple[str, ...], max_utterances: int, max_seconds: float, task: str = "kws"
) -> AudioDataset:
    """The task's utterances of held-out speakers (``splits``), a fixed subset so rounds
    compare; keywords centre-cropped to ``max_seconds``, sentences whole."""
    pick, what = _TASK_UTTERANCES[task]
    chosen = sorted((u for u in pick(read_manifest(manifest)) if u.split in splits), key=lambda u: u.id)
    if not chosen:
        raise ValueError(f"{manifest}: no {what} utterances in split(s) {', '.join(splits)} to evaluate on")
    if max_utterances:
        chosen = chosen[:max_utterances]
    return AudioDataset(chosen, max_seconds=max_seconds if task == "kws" else None, seed=0, crop="center")


def task_dataset(settings: EarlyExitSettings, manifest: str, partition: str, client_id: int) -> AudioDataset:
    return _client_dataset(manifest, partition, client_id, settings.train_seconds, settings.seed, settings.task)


def label_targets(utterances: list[Utterance], labels: tuple[str, ...]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(labels)}
    try:
        return torch.tensor([index[u.label] for u in utterances], dtype=torch.long)
    except KeyError as missing:
        raise ValueError(
            f"utterance label {missing} is not a class of this run ({', '.join(labels)}); set --labels"
        ) from None


def transcript_targets(utterances: list[Utterance], vocab: CharVocab) -> torch.Tensor:
    """CTC targets (padded with -100) of the normalised transcripts."""
    sequences = []
    for utterance in utterances:
        try:
            sequences.append(vocab.encode(utterance.transcript))
        except ValueError as error:
            raise ValueError(f"utterance {utterance.id}: {error}; set --letters") from None
    return pad_targets(sequences)


@dataclass
class _StepOutput:
    loss: torch.Tensor
    num_examples: int


class EarlyExitObjective:
    """Loss of one batch over the client's exits (``train_local`` objective), counting the
    training FLOPs of every batch it runs from the depth's measured cost line. With a
    ``vocab`` the exits are CTC heads trained on the transcripts, else classifiers of ``labels``."""

    def __init__(
        self,
        depth: int,
        labels: tuple[str, ...],
        cost: DepthCostModel,
        *,
        distill_lambda: float,
        temperature: float,
        mixed: bool,
        vocab: CharVocab | None = None,
        cache: FrozenFeatureCache | None = None,
    ) -> None:
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
            loss = early_exit_loss(
                out.logits, targets, "classify", distill_lambda=self.distill_lambda, temperature=self.temperature
            )
        else:
            targets = transcript_targets(batch["utterances"], self.vocab).to(audio.device)
            loss = early_exit_loss(
                out.logits,
                targets,
                "ctc",
                distill_lambda=self.distill_lambda,
                temperature=self.temperature,
                output_lengths=out.output_lengths,
                blank=self.vocab.blank_id,
            )
        return _StepOutput(loss, int(audio.shape[0]))


@dataclass(frozen=True)
class Workload:
    """What a client's round costs to plan: steps, batch size and the longest crop a batch holds."""

    steps: int
    batch: int
    seconds: float


def client_workload(settings: EarlyExitSettings, client_id: int, manifest: str, partition: str) -> Workload:
    dataset = task_dataset(settings, manifest, partition, client_id)
    return Workload(
        steps=steps_per_round(len(dataset), settings.batch_size, settings.local_epochs),
        batch=min(settings.batch_size, len(dataset)),
        seconds=min(settings.train_seconds, max(u.duration for u in dataset.utterances)),
    )
