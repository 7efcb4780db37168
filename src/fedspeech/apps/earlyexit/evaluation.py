"""Accuracy (kws) or WER and CER (asr) at every exit of an early-exit model on held-out
speakers, and what the ConfidenceExit policy would have cost; the server runs it every round."""

from __future__ import annotations

import logging

import torch

from fedspeech.apps.earlyexit.settings import EarlyExitSettings
from fedspeech.apps.earlyexit.task import EVAL_BATCH, label_targets, run_vocab
from fedspeech.data.audio import AudioDataset, make_loader
from fedspeech.downstream.metrics import cer, wer
from fedspeech.downstream.text import CharVocab, ctc_greedy_decode, normalize_transcript
from fedspeech.models.early_exit import ConfidenceExit, EarlyExitModel
from fedspeech.models.feature_cache import FrozenFeatureCache

log = logging.getLogger(__name__)


@torch.no_grad()
def _eval_outputs(model: EarlyExitModel, batch: dict, cache: FrozenFeatureCache | None):
    """All exits' outputs for an evaluation batch, from cached CNN features when there is a cache."""
    if cache is None:
        return model(batch["input_values"], batch["attention_mask"])
    features, frame_lengths = cache.features(model, batch)
    return model(features=features, frame_lengths=frame_lengths)


def evaluate_exits(
    model: EarlyExitModel,
    dataset: AudioDataset,
    labels: tuple[str, ...],
    threshold: float,
    cache: FrozenFeatureCache | None = None,
) -> dict:
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
        "confidence_exit": {
            "threshold": threshold,
            "accuracy": policy_correct / total,
            "mean_exit_layer": exit_sum / total,
        },
        "eval_utterances": total,
    }


@torch.no_grad()
def evaluate_ctc_exits(
    model: EarlyExitModel,
    dataset: AudioDataset,
    vocab: CharVocab,
    threshold: float,
    cache: FrozenFeatureCache | None = None,
) -> dict:
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
        "confidence_exit": {
            "threshold": threshold,
            "wer": wer(references, policy_hypotheses),
            "cer": cer(references, policy_hypotheses),
            "mean_exit_layer": exit_sum / len(references),
        },
        "eval_utterances": len(references),
        # one example per exit, so a round log shows what the numbers mean
        "example": {"reference": references[0], **{str(e): h[0] for e, h in hypotheses.items()}},
    }


def evaluate_exits_of_run(
    settings: EarlyExitSettings, model: EarlyExitModel, dataset: AudioDataset, cache: FrozenFeatureCache | None
) -> dict:
    """The task's per-exit scores, plus ``<score>_deepest`` for the deepest exit."""
    deepest = str(model.exits[-1])
    if settings.task == "asr":
        scores = evaluate_ctc_exits(model, dataset, run_vocab(settings), settings.confidence_threshold, cache)
        return {**scores, "wer_deepest": scores["wer"][deepest], "cer_deepest": scores["cer"][deepest]}
    scores = evaluate_exits(model, dataset, settings.label_names, settings.confidence_threshold, cache)
    return {**scores, "accuracy_deepest": scores["accuracy"][deepest]}
