"""Scores for the downstream tasks.

WER and CER are *corpus-level* (total edits over total reference words or characters),
not a mean of per-utterance rates, so long utterances weigh more, as in every ASR paper.
jiwer does the alignment; we only collapse whitespace first (jiwer's CER transform does
not, and a double space would count as an extra character).
"""

from __future__ import annotations

from collections.abc import Sequence

import jiwer
import numpy as np


def _clean(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name}: expected a list of strings, got a single string")
    return [" ".join(t.split()) for t in texts]


def _pair(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[list[str], list[str]]:
    refs, hyps = _clean(references, "references"), _clean(hypotheses, "hypotheses")
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no utterances to score")
    return refs, hyps


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, int]:
    """Corpus totals: substitutions, deletions, insertions, hits and reference words."""
    refs, hyps = _pair(references, hypotheses)
    out = jiwer.process_words(refs, hyps)
    words = sum(len(r.split()) for r in refs)
    return {
        "substitutions": out.substitutions,
        "deletions": out.deletions,
        "insertions": out.insertions,
        "hits": out.hits,
        "reference_words": words,
    }


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """(S + D + I) / reference words, over the whole corpus."""
    counts = word_errors(references, hypotheses)
    if counts["reference_words"] == 0:
        raise ValueError("WER undefined: the references contain no words")
    edits = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    return edits / counts["reference_words"]


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """(S + D + I) / reference characters (spaces included), over the whole corpus."""
    refs, hyps = _pair(references, hypotheses)
    chars = sum(len(r) for r in refs)
    if chars == 0:
        raise ValueError("CER undefined: the references contain no characters")
    out = jiwer.process_characters(refs, hyps)
    return (out.substitutions + out.deletions + out.insertions) / chars


def accuracy(true: Sequence, predicted: Sequence) -> float:
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true labels but {len(predicted)} predictions")
    if len(true) == 0:
        raise ValueError("accuracy undefined: no examples")
    return sum(t == p for t, p in zip(true, predicted, strict=True)) / len(true)


def confusion_matrix(true: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts, rows = true label, columns = predicted label, both in ``labels`` order."""
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true labels but {len(predicted)} predictions")
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError("confusion_matrix: labels contain duplicates")
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(true, predicted, strict=True):
        for name in (t, p):
            if name not in index:
                raise ValueError(f"confusion_matrix: label {name!r} is not in the label list")
        matrix[index[t], index[p]] += 1
    return matrix


def macro_accuracy(matrix: np.ndarray) -> float:
    """Mean per-class recall over the classes that occur in the true labels.

    Classes with no true examples are left out instead of counting as 0, so a label list
    that includes an unseen class does not drag the score down.
    """
    matrix = np.asarray(matrix)
    support = matrix.sum(axis=1)
    present = support > 0
    if not present.any():
        raise ValueError("macro accuracy undefined: no examples")
    recall = np.diag(matrix)[present] / support[present]
    return float(recall.mean())
