"""Compute a frozen CNN's features once per utterance and reuse them.

Why: when fine-tuning keeps the CNN feature encoder frozen (the usual recipe, and our
early-exit default), its output for an utterance is the same in every epoch and round, yet
a plain training loop recomputes it at every step. On a small device that forward pass is
a large fixed share of a step: for wav2vec 2.0 base on 1 s keywords it is half of a
depth-1 step (``benchmarks/early_exit_cost_shares.py``), which caps what training fewer
layers can save. A client that keeps the features pays the CNN once per utterance instead.

Exactness: an entry is keyed by the utterance *and* a hash of its samples, so a random crop
that differs from the cached one is recomputed rather than served stale, and the whole cache
is dropped if the CNN's weights change. Features are computed per utterance, unpadded; for
CNNs with group normalisation over time (wav2vec 2.0 base, tiny) this differs slightly from
running a zero-padded batch, where the padding enters the normalisation statistics — the
unpadded value is the one the model gives the utterance alone.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from fedspeech.models.early_exit import EarlyExitModel

CNN_DIGEST = "<cnn>"  # the digests' entry for the CNN weights (no utterance id looks like it)


def _digest(tensors: Sequence[Tensor]) -> str:
    sha = hashlib.sha1()
    for tensor in tensors:
        sha.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return sha.hexdigest()


class FrozenFeatureCache:
    """CNN features per utterance id, computed on first use (one entry per utterance).

    ``flops_spent`` counts (``models.accounting.flop_counter``) the FLOPs of every feature computation,
    so a client's reported compute includes what filling the cache cost.
    """

    def __init__(self) -> None:
        self._features: dict[str, tuple[str, Tensor]] = {}
        self._cnn_digest: str | None = None
        self._cnn_seen: list[tuple[weakref.ref, int]] = []  # (tensor, its version) at the last hash
        self.flops_spent = 0.0
        self.computed = 0
        self.reused = 0

    def __len__(self) -> int:
        return len(self._features)

    def _check_cnn(self, cnn: nn.Module) -> None:
        tensors = [*cnn.parameters(), *cnn.buffers()]
        # Hashing the weights (17 MB for base) at every batch would be a cost of its own:
        # hash only when a tensor was written since the last check (torch bumps a tensor's
        # version on every in-place write, load_state_dict's copies included) or is another
        # tensor (weak references: a new model's tensors may reuse a freed one's id).
        if len(tensors) == len(self._cnn_seen) and all(
            ref() is t and version == t._version for t, (ref, version) in zip(tensors, self._cnn_seen)
        ):
            return
        self._cnn_seen = [(weakref.ref(t), t._version) for t in tensors]
        digest = _digest(tensors)
        if digest != self._cnn_digest:
            self._features.clear()
            self._cnn_digest = digest

    def features(self, model: EarlyExitModel, batch: Mapping) -> tuple[Tensor, Tensor]:
        """(padded CNN features (batch, frames, channels), valid frames per item) of a
        ``make_loader`` batch: ``input_values``, ``attention_mask`` and ``utterances``."""
        from fedspeech.models.accounting import flop_counter

        if not model.freeze_feature_encoder:
            raise ValueError("a feature cache needs a frozen feature encoder (its output changes otherwise)")
        self._check_cnn(model.backbone.feature_extractor)
        audio: Tensor = batch["input_values"]
        mask: Tensor | None = batch.get("attention_mask")
        lengths = mask.sum(-1).tolist() if mask is not None else [audio.shape[1]] * audio.shape[0]
        items = []
        for row, (utterance, length) in enumerate(zip(batch["utterances"], lengths, strict=True)):
            wave = audio[row, : int(length)]
            digest = _digest([wave])
            cached = self._features.get(utterance.id)
            if cached is not None and cached[0] == digest:
                self.reused += 1
                items.append(cached[1])
                continue
            counter = flop_counter()
            with torch.no_grad(), counter:
                feats = model.cnn_features(wave.unsqueeze(0))[0]
            self.flops_spent += float(counter.get_total_flops())
            self.computed += 1
            self._features[utterance.id] = (digest, feats)
            items.append(feats)
        frame_lengths = torch.tensor([f.shape[0] for f in items], dtype=torch.long)
        return pad_sequence(items, batch_first=True), frame_lengths

    def export(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """(features per utterance id, digests: per utterance id and ``CNN_DIGEST`` for the
        CNN) for keeping the cache between processes, e.g. in a Flower node's state."""
        features = {utterance: feats for utterance, (_, feats) in self._features.items()}
        digests = {utterance: digest for utterance, (digest, _) in self._features.items()}
        if self._cnn_digest is not None:
            digests[CNN_DIGEST] = self._cnn_digest
        return features, digests

    @classmethod
    def restore(cls, features: Mapping[str, Tensor], digests: Mapping[str, str]) -> FrozenFeatureCache:
        """The cache :meth:`export` gave (counters start at zero)."""
        cache = cls()
        cache._cnn_digest = digests.get(CNN_DIGEST)
        cache._features = {utterance: (digests[utterance], feats) for utterance, feats in features.items()}
        return cache
