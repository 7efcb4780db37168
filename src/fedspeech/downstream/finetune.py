"""Centralised fine-tuning and evaluation for ASR, keyword spotting and speaker ID.

The pieces a federated client needs are separate functions over a model, a DataLoader
and an optimiser — ``train_epochs``, ``evaluate_asr``, ``evaluate_classifier`` (plus
``fedspeech.downstream.state`` for the weights, ``training_dataset`` /
``evaluation_dataset`` for the audio, ``selection_key`` and ``lr_factor``) — and
``finetune_asr`` / ``finetune_classifier`` are the centralised runs built from them;
``fedspeech.apps.finetune`` builds the federated runs from the same pieces.

Determinism: a run draws every random number (head init, dropout, HF's SpecAugment masks,
shuffling, crops) from generators seeded by ``seed``; torch's and numpy's global RNG
states are restored afterwards so callers are not disturbed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedspeech.data.audio import AudioDataset, make_loader
from fedspeech.data.manifest import Utterance
from fedspeech.downstream.heads import (
    CTCModel,
    DownstreamModel,
    UtteranceClassifier,
    make_optimizer,
    wants_normalized_audio,
)
from fedspeech.downstream.metrics import accuracy, cer, confusion_matrix, macro_accuracy, wer
from fedspeech.downstream.state import load_trainable_state, trainable_state
from fedspeech.downstream.text import CharVocab, ctc_greedy_decode, normalize_transcript

log = logging.getLogger(__name__)


@dataclass
class TrainStats:
    """What ``train_epochs`` did; ``epoch_losses`` are example-weighted means."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    examples: int = 0
    skipped_batches: int = 0  # non-finite loss: no update made

    @property
    def last_loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else math.nan


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    mask = batch.get("attention_mask")
    return batch["input_values"].to(device), None if mask is None else mask.to(device)


def train_epochs(
    model: DownstreamModel,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = 1.0,
    start_epoch: int = 0,
) -> TrainStats:
    """Train for ``epochs`` passes over ``loader`` (stopping early after ``max_steps``
    updates). Batches are ``make_loader`` dicts (``input_values``, ``attention_mask``,
    ``utterances``). A batch with a non-finite loss is skipped rather than allowed to
    poison the weights. ``start_epoch`` numbers epochs for the dataset's random crops."""
    device = _device(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats = TrainStats()
    model.train()
    for epoch in range(start_epoch, start_epoch + epochs):
        dataset: Any = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        total, count = 0.0, 0
        for batch in loader:
            if max_steps is not None and stats.steps >= max_steps:
                break
            inputs, mask = _inputs(batch, device)
            out = model(inputs, mask, targets=model.targets(batch["utterances"]))
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(out.loss):
                stats.skipped_batches += 1
                log.warning("skipped a batch with non-finite loss %s", float(out.loss))
                continue
            out.loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            stats.steps += 1
            total += float(out.loss.detach()) * len(inputs)
            count += len(inputs)
        stats.examples += count
        if count:
            stats.epoch_losses.append(total / count)
        if max_steps is not None and stats.steps >= max_steps:
            break
    return stats


@torch.no_grad()
def evaluate_asr(model: CTCModel, loader: Iterable[dict], *, max_examples: int = 5) -> dict[str, Any]:
    """Corpus WER/CER of greedy CTC decoding against normalised transcripts, mean CTC loss."""
    device = _device(model)
    model.eval()
    references, hypotheses, ids = [], [], []
    loss_total, count = 0.0, 0
    for batch in loader:
        inputs, mask = _inputs(batch, device)
        out = model(inputs, mask, targets=model.targets(batch["utterances"]))
        if torch.isfinite(out.loss):
            loss_total += float(out.loss) * len(inputs)
            count += len(inputs)
        for utt, tokens in zip(
            batch["utterances"], ctc_greedy_decode(out.logits, out.lengths, model.vocab.blank_id), strict=True
        ):
            ids.append(utt.id)
            references.append(normalize_transcript(utt.transcript))
            hypotheses.append(model.vocab.decode(tokens))
    if not references:
        raise ValueError("evaluate_asr: the loader yielded no utterances")
    return {
        "wer": wer(references, hypotheses),
        "cer": cer(references, hypotheses),
        "loss": loss_total / count if count else math.nan,
        "num_utterances": len(references),
        "examples": [
            {"id": i, "reference": r, "hypothesis": h}
            for i, r, h in list(zip(ids, references, hypotheses, strict=True))[:max_examples]
        ],
    }


@torch.no_grad()
def evaluate_classifier(model: UtteranceClassifier, loader: Iterable[dict]) -> dict[str, Any]:
    """Accuracy, macro accuracy (mean per-class recall), confusion matrix, mean loss."""
    device = _device(model)
    model.eval()
    true: list[str] = []
    predicted: list[str] = []
    loss_total = 0.0
    for batch in loader:
        inputs, mask = _inputs(batch, device)
        targets = model.targets(batch["utterances"])
        out = model(inputs, mask, targets=targets)
        loss_total += float(out.loss) * len(inputs)
        true.extend(model.labels[i] for i in targets.tolist())
        predicted.extend(model.labels[i] for i in out.logits.argmax(dim=-1).tolist())
    if not true:
        raise ValueError("evaluate_classifier: the loader yielded no utterances")
    matrix = confusion_matrix(true, predicted, model.labels)
    return {
        "accuracy": accuracy(true, predicted),
        "macro_accuracy": macro_accuracy(matrix),
        "confusion_matrix": matrix.tolist(),
        "labels": list(model.labels),
        "loss": loss_total / len(true),
        "num_utterances": len(true),
    }


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's and numpy's global RNGs (HF draws dropout from the first and
    SpecAugment masks from the second) and restore both afterwards."""
    saved = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(saved)


def warmup_linear_decay(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1):
    """Linear warm-up then linear decay to zero (the usual fine-tuning schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_fraction))


def lr_factor(step: int, total_steps: int, warmup_fraction: float = 0.1) -> float:
    """The learning-rate multiplier of ``warmup_linear_decay`` at ``step`` (0-based); federated
    fine-tuning applies it per round instead of per step."""
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def training_dataset(
    train: Sequence[Utterance], *, max_seconds: float | None, seed: int, crop_training: bool
) -> AudioDataset:
    """Training audio: classification may crop to ``max_seconds`` (at random); CTC may not
    (a crop would cut the transcript), so for ASR ``max_seconds`` drops longer utterances."""
    if not crop_training and max_seconds is not None:
        kept = [u for u in train if u.duration <= max_seconds]
        if len(kept) < len(train):
            log.info("dropped %d training utterance(s) longer than %.1f s", len(train) - len(kept), max_seconds)
        if not kept:
            raise ValueError(f"no training utterance is at most --max-seconds {max_seconds} long")
        train = kept
    return AudioDataset(list(train), max_seconds=max_seconds if crop_training else None, seed=seed)


def evaluation_dataset(
    utterances: Sequence[Utterance], *, max_seconds: float | None, seed: int, crop_training: bool
) -> AudioDataset:
    """Evaluation audio: the centre crop when training crops, else whole utterances."""
    return AudioDataset(list(utterances), max_seconds=max_seconds if crop_training else None, seed=seed, crop="center")


def _datasets(
    train: Sequence[Utterance],
    evaluation: Sequence[Utterance],
    dev: Sequence[Utterance],
    *,
    max_seconds: float | None,
    seed: int,
    crop_training: bool,
) -> tuple[AudioDataset, AudioDataset, AudioDataset | None]:
    options: dict[str, Any] = dict(max_seconds=max_seconds, seed=seed, crop_training=crop_training)
    train_set = training_dataset(train, **options)
    eval_set = evaluation_dataset(evaluation, **options)
    dev_set = evaluation_dataset(dev, **options) if dev else None
    return train_set, eval_set, dev_set


DEV_KEYS = ("wer", "cer", "accuracy", "loss")  # what a dev evaluation keeps


def selection_key(metrics: dict[str, float]) -> tuple[float, ...]:
    """Larger is better: the main metric first (accuracy, or -WER then -CER), then the
    negated dev loss, which breaks the frequent accuracy ties on a small dev set."""

    def neg(name: str) -> float:
        value = metrics.get(name, math.nan)
        return -math.inf if math.isnan(value) else -value

    main = (metrics["accuracy"],) if "accuracy" in metrics else (neg("wer"), neg("cer"))
    return (*main, neg("loss"))


def _fit(
    model: DownstreamModel,
    train_set,
    eval_set,
    dev_set,
    evaluate,
    metric: str,
    *,
    epochs: int,
    max_steps: int | None,
    batch_size: int,
    lr_backbone: float,
    lr_head: float,
    seed: int,
    normalize: bool,
    warmup_fraction: float,
    extra_eval_sets: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Shared training loop: per-epoch dev evaluation keeps the best epoch's weights
    (``metric`` is only what the log and the result name). The kept model is scored on
    ``eval_set`` and on every ``extra_eval_sets`` entry (under ``result["extra"]``)."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    loader = make_loader(train_set, batch_size, shuffle=True, seed=seed, normalize=normalize)
    eval_loader = make_loader(eval_set, batch_size, normalize=normalize)
    dev_loader = make_loader(dev_set, batch_size, normalize=normalize) if dev_set else None
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    optimizer = make_optimizer(model, lr_backbone, lr_head)
    scheduler = warmup_linear_decay(optimizer, total, warmup_fraction)

    history: list[dict] = []
    best_key, best_state, best_epoch = None, None, None
    steps, started = 0, time.perf_counter()
    for epoch in range(epochs):
        stats = train_epochs(model, loader, optimizer, scheduler=scheduler, max_steps=total - steps, start_epoch=epoch)
        steps += stats.steps
        entry: dict[str, Any] = {"epoch": epoch + 1, "loss": stats.last_loss, "steps": steps}
        if dev_loader is not None:
            entry["dev"] = {k: v for k, v in evaluate(dev_loader).items() if k in DEV_KEYS}
            key = selection_key(entry["dev"])
            if best_key is None or key > best_key:  # ties keep the earlier epoch
                best_key, best_state, best_epoch = key, trainable_state(model), epoch + 1
        history.append(entry)
        log.info(
            "epoch %d: loss %.4f%s",
            epoch + 1,
            stats.last_loss,
            f", dev {metric} {entry['dev'][metric]:.4f}" if "dev" in entry else "",
        )
        if steps >= total:
            break
    train_seconds = time.perf_counter() - started
    if best_state is not None:
        load_trainable_state(model, best_state)
    result = evaluate(eval_loader)
    if extra_eval_sets:
        result["extra"] = {
            name: {**evaluate(make_loader(dataset, batch_size, normalize=normalize)), "num_eval": len(dataset)}
            for name, dataset in extra_eval_sets.items()
        }
    result.update(
        epoch_losses=[h["loss"] for h in history],
        history=history,
        best_epoch=best_epoch if best_epoch is not None else len(history),
        selected_on="dev " + metric if best_state is not None else "last epoch",
        steps=steps,
        train_seconds=round(train_seconds, 2),
        num_train=len(train_set),
        num_eval=len(eval_set),
        num_dev=len(dev_set) if dev_set else 0,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        seed=seed,
    )
    return result


def finetune_asr(
    backbone: str | Path,
    train_utts: Sequence[Utterance],
    eval_utts: Sequence[Utterance],
    *,
    dev_utts: Sequence[Utterance] | None = None,
    epochs: int = 10,
    max_steps: int | None = None,
    batch_size: int = 8,
    lr_backbone: float = 5e-5,
    lr_head: float = 1e-3,
    freeze_cnn: bool = True,
    freeze_backbone: bool = False,
    max_seconds: float | None = None,
    seed: int = 0,
    warmup_fraction: float = 0.1,
    config_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Character CTC fine-tuning of ``backbone`` (preset name or local folder).

    Returns ``wer``, ``cer`` and ``loss`` on ``eval_utts``, ``epoch_losses``, a few decoded
    ``examples`` and bookkeeping. With ``dev_utts`` the epoch with the lowest dev WER (then CER,
    then loss) is the one evaluated. ``max_seconds`` drops longer training utterances (never crops).
    """
    train_utts = list(train_utts)
    # Letters of every split, so an evaluation transcript never fails to encode for its
    # loss (a letter seen only there is simply never predicted).
    vocab = CharVocab.from_texts(u.transcript for u in [*train_utts, *eval_utts, *(dev_utts or [])])
    with seeded(seed):
        model = CTCModel.build(
            backbone,
            vocab,
            freeze_feature_encoder=freeze_cnn,
            freeze_backbone=freeze_backbone,
            **(config_overrides or {}),
        )
        sets = _datasets(
            train_utts, list(eval_utts), list(dev_utts or []), max_seconds=max_seconds, seed=seed, crop_training=False
        )
        result = _fit(
            model,
            *sets,
            lambda loader: evaluate_asr(model, loader),
            "wer",
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            lr_backbone=lr_backbone,
            lr_head=lr_head,
            seed=seed,
            normalize=wants_normalized_audio(backbone),
            warmup_fraction=warmup_fraction,
        )
    return {"task": "asr", "backbone": str(backbone), **result, "vocab": vocab.tokens}


def finetune_classifier(
    backbone: str | Path,
    train_utts: Sequence[Utterance],
    eval_utts: Sequence[Utterance],
    *,
    task: str = "kws",
    dev_utts: Sequence[Utterance] | None = None,
    epochs: int = 10,
    max_steps: int | None = None,
    batch_size: int = 16,
    lr_backbone: float = 5e-5,
    lr_head: float = 1e-3,
    freeze_cnn: bool = True,
    freeze_backbone: bool = False,
    layer_weighted: bool = False,
    max_seconds: float | None = None,
    seed: int = 0,
    warmup_fraction: float = 0.1,
    config_overrides: dict[str, Any] | None = None,
    extra_eval_utts: Mapping[str, Sequence[Utterance]] | None = None,
) -> dict[str, Any]:
    """Utterance classification: ``task="kws"`` predicts ``label``, ``"speaker"`` the speaker.

    The label list is every class seen in train, dev or eval (sorted), so the confusion
    matrix also shows classes that never occur in training. Training crops to
    ``max_seconds`` at random; evaluation takes the centre. ``extra_eval_utts`` are further
    test sets (e.g. another corpus) the final model is scored on, in ``result["extra"]``.
    """
    fields = {"kws": "label", "speaker": "speaker"}
    if task not in fields:
        raise ValueError(f"task must be 'kws' or 'speaker', got {task!r}")
    target_field = fields[task]
    extra_eval_utts = dict(extra_eval_utts or {})
    everything = [*train_utts, *eval_utts, *(dev_utts or []), *(u for us in extra_eval_utts.values() for u in us)]
    empty = [u.id for u in everything if not getattr(u, target_field)]
    if empty:
        raise ValueError(f"task {task}: utterance(s) without a {target_field}: {empty[:5]}")
    labels = sorted({getattr(u, target_field) for u in everything})
    with seeded(seed):
        model = UtteranceClassifier.build(
            backbone,
            labels,
            target_field=target_field,
            layer_weighted=layer_weighted,
            freeze_feature_encoder=freeze_cnn,
            freeze_backbone=freeze_backbone,
            **(config_overrides or {}),
        )
        sets = _datasets(
            list(train_utts),
            list(eval_utts),
            list(dev_utts or []),
            max_seconds=max_seconds,
            seed=seed,
            crop_training=True,
        )
        extra_sets = {
            name: evaluation_dataset(list(us), max_seconds=max_seconds, seed=seed, crop_training=True)
            for name, us in extra_eval_utts.items()
        }
        result = _fit(
            model,
            *sets,
            lambda loader: evaluate_classifier(model, loader),
            "accuracy",
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            lr_backbone=lr_backbone,
            lr_head=lr_head,
            seed=seed,
            normalize=wants_normalized_audio(backbone),
            warmup_fraction=warmup_fraction,
            extra_eval_sets=extra_sets,
        )
    return {"task": task, "backbone": str(backbone), **result}
