"""Metrics and CTC text handling against hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedspeech.downstream.metrics import accuracy, cer, confusion_matrix, macro_accuracy, wer, word_errors
from fedspeech.downstream.text import CharVocab, ctc_greedy_decode, normalize_transcript, pad_targets


def test_wer_one_substitution_one_insertion():
    # "sat"->"sit" is 1 substitution, "down" 1 insertion, over 3 reference words.
    assert wer(["the cat sat"], ["the cat sit down"]) == pytest.approx(2 / 3)
    counts = word_errors(["the cat sat"], ["the cat sit down"])
    assert (counts["substitutions"], counts["insertions"], counts["deletions"], counts["hits"]) == (1, 1, 0, 2)


def test_wer_is_corpus_level_not_mean_of_utterances():
    # 2 edits in utterance 1 (3 words), 0 in utterance 2 (6 words): 2/9, whereas the mean of
    # per-utterance rates would be (2/3 + 0)/2 = 1/3.
    refs = ["the cat sat", "a b c d e f"]
    hyps = ["the cat sit down", "a b c d e f"]
    assert wer(refs, hyps) == pytest.approx(2 / 9)


def test_wer_deletion_and_whitespace():
    # "on the mat" vs "on mat": 1 deletion / 3 words; extra spaces are not words.
    assert wer(["on the mat"], ["  on   mat "]) == pytest.approx(1 / 3)


def test_cer_corpus_level_counts_spaces():
    # "abc"->"abd": 1 substitution / 3 chars; "hello world"->"hello word": 1 deletion / 11
    # chars (the space counts). Corpus: 2 / 14.
    assert cer(["abc"], ["abd"]) == pytest.approx(1 / 3)
    assert cer(["abc", "hello world"], ["abd", "hello word"]) == pytest.approx(2 / 14)
    # A doubled space in the hypothesis is not an extra character.
    assert cer(["ab cd"], ["ab  cd"]) == 0.0


def test_error_rate_bad_input():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no words"):
        wer([""], ["x"])
    with pytest.raises(TypeError):
        wer("the cat", "the cat")


def test_accuracy_and_confusion_matrix():
    labels = ["a", "b", "c"]
    true = ["a", "a", "b", "c", "c", "c"]
    pred = ["a", "b", "b", "c", "a", "c"]
    matrix = confusion_matrix(true, pred, labels)
    expected = np.array(
        [
            [1, 1, 0],  # true a: 1 right, 1 called b
            [0, 1, 0],  # true b: right
            [1, 0, 2],
        ]
    )  # true c: 1 called a, 2 right
    np.testing.assert_array_equal(matrix, expected)
    assert accuracy(true, pred) == pytest.approx(4 / 6)
    # Mean per-class recall: (1/2 + 1/1 + 2/3) / 3.
    assert macro_accuracy(matrix) == pytest.approx((0.5 + 1.0 + 2 / 3) / 3)


def test_macro_accuracy_ignores_classes_without_examples():
    matrix = confusion_matrix(["a", "a"], ["a", "b"], ["a", "b", "c"])
    assert macro_accuracy(matrix) == pytest.approx(0.5)  # only class a has examples


def test_confusion_matrix_unknown_label():
    with pytest.raises(ValueError, match="'z' is not in the label list"):
        confusion_matrix(["a"], ["z"], ["a", "b"])


def test_normalize_transcript():
    assert normalize_transcript("Hello, World!  It\u2019s  well-known 42.") == "hello world it's well known"
    assert normalize_transcript("  ") == ""
    assert normalize_transcript("Café NAÏVE") == "café naïve"  # letters of any script stay


def test_vocab_layout_and_round_trip():
    vocab = CharVocab()
    assert vocab.tokens[:4] == ["<blank>", "|", "'", "a"] and len(vocab) == 29
    assert vocab.encode("ab a") == [3, 4, 1, 3]
    text = "it's a cat"
    assert vocab.decode(vocab.encode(text)) == text
    assert vocab.decode(vocab.encode("The CAT, sat!")) == "the cat sat"
    assert CharVocab.from_dict(vocab.to_dict()) == vocab


def test_vocab_unknown_character_and_extension():
    with pytest.raises(ValueError, match="'é' is not in the vocabulary"):
        CharVocab().encode("café")
    vocab = CharVocab.from_texts(["café"])
    assert vocab.decode(vocab.encode("café")) == "café"


def test_pad_targets():
    padded = pad_targets([[3, 4], [5]])
    assert padded.tolist() == [[3, 4], [5, -100]]


def _logits(paths: list[list[int]], vocab_size: int) -> torch.Tensor:
    """One-hot-ish logits whose argmax follows ``paths`` (rows padded to equal length)."""
    out = torch.zeros(len(paths), max(len(p) for p in paths), vocab_size)
    for b, path in enumerate(paths):
        for t, token in enumerate(path):
            out[b, t, token] = 5.0
    return out


def test_greedy_ctc_decode_collapses_repeats_drops_blanks_and_respects_lengths():
    vocab = CharVocab()
    a, b, c, bar, blank = (vocab.tokens.index(x) for x in ("a", "b", "c", "|", "<blank>"))
    # a a _ a b b _ | c  ->  merge runs: a _ a b _ | c  ->  drop blanks: a a b | c
    row0 = [a, a, blank, a, b, b, blank, bar, c]
    # Only the first 3 frames are real; the padding frames would add "c" if they were read.
    row1 = [b, b, b, c, c, c, c, c, c]
    decoded = ctc_greedy_decode(_logits([row0, row1], len(vocab)), torch.tensor([9, 3]))
    assert decoded == [[a, a, b, bar, c], [b]]
    assert [vocab.decode(ids) for ids in decoded] == ["aab c", "b"]
    # Without lengths the whole row counts.
    assert vocab.decode(ctc_greedy_decode(_logits([row1], len(vocab)))[0]) == "bc"
    assert ctc_greedy_decode(_logits([row0], len(vocab)), torch.tensor([0])) == [[]]
