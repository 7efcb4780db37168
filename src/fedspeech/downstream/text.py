"""Transcripts to CTC targets and CTC outputs back to text.

Character CTC needs a closed alphabet, so every transcript is normalised the same way
before it becomes a target *and* before it is scored: lowercase, letters and apostrophes
kept, everything else (punctuation, digits, hyphens) turned into a word break. Scoring
normalised references against normalised hypotheses keeps WER about words, not commas.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

BLANK = "<blank>"
WORD_DELIMITER = "|"  # stands for the space, as in HF/fairseq letter dictionaries
DEFAULT_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "`": "'"}  # typographic quotes -> ASCII


def normalize_transcript(text: str) -> str:
    """Lowercase; keep letters (any script), apostrophes and single spaces."""
    chars = []
    for ch in text.lower():
        ch = _APOSTROPHES.get(ch, ch)
        chars.append(ch if ch.isalpha() or ch == "'" else " ")
    return " ".join("".join(chars).split())


class CharVocab:
    """Blank = 0, word delimiter ``|`` = 1, apostrophe = 2, then letters.

    ``encode`` takes a transcript (it normalises it first) and returns ids without blanks;
    ``decode`` turns ids (already collapsed by the CTC decoder) back into text.
    """

    def __init__(self, letters: Iterable[str] = DEFAULT_LETTERS):
        letters = sorted(set(letters) - {" ", "'", WORD_DELIMITER})
        bad = [ch for ch in letters if len(ch) != 1 or not ch.isalpha()]
        if bad:
            raise ValueError(f"CharVocab: letters must be single alphabetic characters, got {bad}")
        self.tokens: list[str] = [BLANK, WORD_DELIMITER, "'", *letters]
        self._index = {tok: i for i, tok in enumerate(self.tokens)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharVocab:
        """The English letters plus any other letter that occurs in ``texts`` (normalised)."""
        seen = set(DEFAULT_LETTERS)
        for text in texts:
            seen.update(normalize_transcript(text))
        return cls(seen)

    @property
    def blank_id(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.tokens == other.tokens

    def encode(self, text: str) -> list[int]:
        normalised = normalize_transcript(text)
        try:
            return [self._index[WORD_DELIMITER if ch == " " else ch] for ch in normalised]
        except KeyError as err:
            raise ValueError(f"transcript {text!r}: character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        chars = []
        for i in ids:
            i = int(i)
            if i == self.blank_id:
                continue
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} outside the vocabulary (size {len(self.tokens)})")
            tok = self.tokens[i]
            chars.append(" " if tok == WORD_DELIMITER else tok)
        return " ".join("".join(chars).split())

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, data: dict) -> CharVocab:
        tokens = data.get("tokens") or []
        head = [BLANK, WORD_DELIMITER, "'"]
        if tokens[:3] != head:
            raise ValueError(f"vocabulary: expected tokens to start with {head}, got {tokens[:3]}")
        return cls(tokens[3:])


def pad_targets(sequences: Sequence[Sequence[int]], pad: int = -100) -> torch.Tensor:
    """(B, U) long tensor padded with ``pad`` (-100 is what HF's CTC loss ignores)."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), pad, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return out


def ctc_greedy_decode(logits: torch.Tensor, lengths: torch.Tensor | None = None, blank: int = 0) -> list[list[int]]:
    """Best path per row of a padded (B, T, V) batch: argmax, merge repeats, drop blanks.

    Only the first ``lengths[b]`` frames of row ``b`` count, so padding frames never leak
    characters into the transcript.
    """
    if logits.dim() != 3:
        raise ValueError(f"ctc_greedy_decode: expected (B, T, V) logits, got shape {tuple(logits.shape)}")
    best = logits.argmax(dim=-1).cpu()
    if lengths is None:
        lengths = torch.full((best.shape[0],), best.shape[1], dtype=torch.long)
    decoded: list[list[int]] = []
    for row, length in zip(best, lengths.tolist(), strict=True):
        path = row[: int(length)]
        if len(path) == 0:
            decoded.append([])
            continue
        keep = torch.ones_like(path, dtype=torch.bool)
        keep[1:] = path[1:] != path[:-1]  # first frame of every run
        decoded.append([int(t) for t in path[keep] if int(t) != blank])
    return decoded
