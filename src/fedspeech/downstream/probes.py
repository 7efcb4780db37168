"""Cheap frozen-feature probes, run on the global model after every federated round
(docs/methods.md §4) to pick the best round per downstream task.

Cheap means: audio is decoded and batched once, when the suite is built; each round does
one no-grad forward pass over a few hundred short utterances, then fits a tiny model on
the frozen features (k-NN needs no fitting; logistic regression is a convex full-batch
LBFGS fit; the ASR proxy is a linear CTC layer trained for a fixed number of full-batch
Adam steps). Everything is seeded and full-batch, so the same model gives the same score.

Scores: accuracy for ``kws`` and ``speaker`` (higher is better), character error rate for
``asr`` (lower is better); ``ProbeSuite.directions`` declares them for BestRoundTracker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedspeech.data.audio import AudioDataset, make_loader
from fedspeech.data.manifest import Utterance
from fedspeech.downstream.heads import backbone_of, frame_mask, masked_mean
from fedspeech.downstream.metrics import cer
from fedspeech.downstream.selection import HIGHER, LOWER
from fedspeech.downstream.text import CharVocab, ctc_greedy_decode, normalize_transcript, pad_targets


@dataclass
class ProbeData:
    """Collated batches (tensors only) and the utterances they hold, in order."""

    batches: list[dict[str, torch.Tensor]]
    utterances: list[Utterance]


def prepare_probe_data(
    utterances: Sequence[Utterance],
    *,
    batch_size: int = 16,
    max_seconds: float | None = None,
    normalize: bool = False,
) -> ProbeData:
    """Decode once; ``max_seconds`` takes the centre of longer clips. Unusable files are
    skipped (``AudioDataset`` warns), and ``utterances`` then lists only the kept ones."""
    dataset = AudioDataset(utterances, max_seconds=max_seconds, crop="center")
    batches = [
        {"input_values": b["input_values"], "attention_mask": b["attention_mask"]}
        for b in make_loader(dataset, batch_size, normalize=normalize)
    ]
    return ProbeData(batches, list(dataset.utterances))


def _hidden(backbone: nn.Module, batch: Mapping[str, torch.Tensor], layer: int | None, device):
    values = batch["input_values"].to(device)
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.to(device)
    out = backbone(values, attention_mask=mask, output_hidden_states=layer is not None)
    hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
    return hidden, frame_mask(backbone, hidden.shape[1], mask, hidden.shape[0]).to(hidden.device)


class _EvalMode:
    """Run a model in eval mode and put its previous mode back afterwards."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.no_grad()
def extract_embeddings(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], layer: int | None = None
) -> torch.Tensor:
    """(N, D) utterance embeddings: frozen features mean-pooled over valid frames.

    ``model`` is any of our models or any HF speech model (its bare encoder is used);
    ``layer`` indexes ``hidden_states`` (0 = input to the first Transformer layer),
    ``None`` = last layer. Batches are ``make_loader`` dicts or ``ProbeData.batches``.
    """
    backbone = backbone_of(model)
    device = next(backbone.parameters()).device
    pooled = []
    with _EvalMode(backbone):
        for batch in batches:
            hidden, mask = _hidden(backbone, batch, layer, device)
            pooled.append(masked_mean(hidden, mask).float().cpu())
    if not pooled:
        raise ValueError("extract_embeddings: no batches")
    return torch.cat(pooled)


@torch.no_grad()
def frame_features(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], layer: int | None = None
) -> list[torch.Tensor]:
    """Per utterance, the (frames, D) frozen features of its valid frames only."""
    backbone = backbone_of(model)
    device = next(backbone.parameters()).device
    features: list[torch.Tensor] = []
    with _EvalMode(backbone):
        for batch in batches:
            hidden, mask = _hidden(backbone, batch, layer, device)
            features.extend(h[m].float().cpu() for h, m in zip(hidden, mask, strict=True))
    return features


def _label_ids(train_labels: Sequence[str], test_labels: Sequence[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Classes = train labels; a test label never seen in training gets id -1 (always wrong)."""
    classes = sorted(set(train_labels))
    index = {c: i for i, c in enumerate(classes)}
    return (
        classes,
        torch.tensor([index[c] for c in train_labels]),
        torch.tensor([index.get(c, -1) for c in test_labels]),
    )


def _check(emb: torch.Tensor, labels: Sequence, name: str) -> None:
    if emb.dim() != 2 or len(emb) != len(labels) or len(emb) == 0:
        raise ValueError(f"{name}: need (N, D) embeddings and N labels, got {tuple(emb.shape)} and {len(labels)}")


def knn_accuracy(
    train_emb: torch.Tensor, train_labels: Sequence[str], test_emb: torch.Tensor, test_labels: Sequence[str], k: int = 5
) -> float:
    """Accuracy of a cosine-similarity k-NN majority vote.

    Ties in the vote go to the tied class with the larger summed similarity: each vote is
    weighted 1 + sim/(2k), which moves a class total by less than 1/2 and so only ever
    breaks ties between equal counts.
    """
    _check(train_emb, train_labels, "knn train")
    _check(test_emb, test_labels, "knn test")
    classes, train_ids, test_ids = _label_ids(train_labels, test_labels)
    k = min(k, len(train_ids))
    sims = F.normalize(test_emb.float(), dim=1) @ F.normalize(train_emb.float(), dim=1).T
    top_sims, top_idx = sims.topk(k, dim=1)
    votes = torch.zeros(len(test_emb), len(classes))
    votes.scatter_add_(1, train_ids[top_idx], 1.0 + top_sims / (2 * k))
    return float((votes.argmax(dim=1) == test_ids).float().mean())


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale with training statistics: the features of an untrained or partly trained
    backbone differ in scale by orders of magnitude between dimensions and rounds."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True, unbiased=False).clamp_min(1e-5)
    return [(x - mean) / std for x in (train, *others)]


def linear_probe_accuracy(
    train_emb: torch.Tensor,
    train_labels: Sequence[str],
    test_emb: torch.Tensor,
    test_labels: Sequence[str],
    *,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> float:
    """Accuracy of multinomial logistic regression on standardised embeddings.

    Convex, zero-initialised and full-batch LBFGS, so the result is deterministic;
    ``l2`` keeps it well-posed when classes are separable.
    """
    _check(train_emb, train_labels, "linear probe train")
    _check(test_emb, test_labels, "linear probe test")
    classes, train_ids, test_ids = _label_ids(train_labels, test_labels)
    if len(classes) < 2:
        raise ValueError("linear probe needs at least 2 classes in training")
    x_train, x_test = _standardise(train_emb.double(), test_emb.double())
    weight = torch.zeros(x_train.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, train_ids) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted = (x_test @ weight + bias).argmax(dim=1)
    return float((predicted == test_ids).float().mean())


def _pad_frames(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(f) for f in features], dtype=torch.long)
    padded = torch.zeros(len(features), int(lengths.max()), features[0].shape[1])
    for i, f in enumerate(features):
        padded[i, : len(f)] = f
    return padded, lengths


def ctc_probe_cer(
    train_features: Sequence[torch.Tensor],
    train_texts: Sequence[str],
    test_features: Sequence[torch.Tensor],
    test_texts: Sequence[str],
    *,
    steps: int = 100,
    lr: float = 2e-2,
    seed: int = 0,
) -> float:
    """CER of a linear CTC layer on frozen frame features: a cheap proxy for how well
    the representation supports ASR. Full-batch Adam for a fixed number of ``steps``,
    greedy decoding, corpus-level CER against normalised transcripts.

    Cost is dominated by ``ctc_loss`` on CPU, roughly 0.05-0.1 s per step for 32 utterances
    of 3 s, hence few steps, a high learning rate and small sets."""
    if not train_features or not test_features:
        raise ValueError("ctc probe: need training and test utterances")
    train_texts = [normalize_transcript(t) for t in train_texts]
    test_texts = [normalize_transcript(t) for t in test_texts]
    vocab = CharVocab.from_texts(train_texts)
    targets = pad_targets([vocab.encode(t) for t in train_texts])
    target_lengths = (targets >= 0).sum(dim=1)
    flat_targets = targets[targets >= 0]
    x_train, train_lengths = _pad_frames(train_features)
    x_test, test_lengths = _pad_frames(test_features)
    # Statistics over real frames only, not padding.
    valid = torch.arange(x_train.shape[1])[None, :] < train_lengths[:, None]
    frames = x_train[valid]
    mean, std = frames.mean(dim=0), frames.std(dim=0, unbiased=False).clamp_min(1e-5)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    # Own generator, not nn.Linear's init: the global RNG stays untouched.
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x_train.shape[2], len(vocab), generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(len(vocab), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            log_probs = (x_train @ weight + bias).log_softmax(dim=-1).transpose(0, 1)  # (T, B, V)
            loss = F.ctc_loss(
                log_probs, flat_targets, train_lengths, target_lengths, blank=vocab.blank_id, zero_infinity=True
            )
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        decoded = ctc_greedy_decode(x_test @ weight + bias, test_lengths, vocab.blank_id)
    return cer(test_texts, [vocab.decode(ids) for ids in decoded])


_KIND_FIELD = {"kws": "label", "speaker": "speaker", "asr": "transcript"}


@dataclass
class ProbeTask:
    """One probe: ``name`` (kws | speaker | asr), its train/test data and ``method``
    (``"linear"`` or ``"knn"`` for classification; ASR always uses the CTC probe)."""

    name: str
    train: ProbeData
    test: ProbeData
    method: str = "linear"

    def __post_init__(self) -> None:
        if self.name not in _KIND_FIELD:
            raise ValueError(f"probe task must be one of {sorted(_KIND_FIELD)}, got {self.name!r}")
        if self.name != "asr" and self.method not in ("linear", "knn"):
            raise ValueError(f"probe method must be 'linear' or 'knn', got {self.method!r}")

    @property
    def direction(self) -> str:
        return LOWER if self.name == "asr" else HIGHER

    def targets(self, data: ProbeData) -> list[str]:
        return [getattr(u, _KIND_FIELD[self.name]) for u in data.utterances]


class ProbeSuite:
    """``suite(model) -> {task: score}`` on small labelled sets fixed at construction.

    ``layer`` picks the hidden state probed (``None`` = last). The last layer of a
    wav2vec 2.0 model is specialised for the contrastive task and often probes worse than
    a middle one; keep the same layer for the whole run so rounds are comparable.
    """

    def __init__(
        self, tasks: Sequence[ProbeTask], *, layer: int | None = None, k: int = 5, ctc_steps: int = 100, seed: int = 0
    ):
        if not tasks:
            raise ValueError("ProbeSuite needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate probe tasks: {names}")
        self.tasks = list(tasks)
        self.layer, self.k, self.ctc_steps, self.seed = layer, k, ctc_steps, seed

    @classmethod
    def from_utterances(
        cls,
        sets: Mapping[str, tuple[Sequence[Utterance], Sequence[Utterance]]],
        *,
        method: str = "linear",
        max_seconds: float | None = 2.0,
        batch_size: int = 16,
        normalize: bool = False,
        **options,
    ) -> ProbeSuite:
        """``sets`` maps task name to (train, test) utterances, e.g. from
        ``fedspeech.downstream.tasks.probe_sets``. Classification clips are centre-cropped to
        ``max_seconds``; ASR clips are never cropped (the transcript must match)."""
        tasks = []
        for name, (train, test) in sets.items():
            crop = None if name == "asr" else max_seconds
            train_data, test_data = [
                prepare_probe_data(u, batch_size=batch_size, max_seconds=crop, normalize=normalize)
                for u in (train, test)
            ]
            tasks.append(ProbeTask(name, train_data, test_data, method=method))
        return cls(tasks, **options)

    @property
    def directions(self) -> dict[str, str]:
        return {t.name: t.direction for t in self.tasks}

    def score(self, model: nn.Module, task: ProbeTask) -> float:
        if task.name == "asr":
            return ctc_probe_cer(
                frame_features(model, task.train.batches, self.layer),
                task.targets(task.train),
                frame_features(model, task.test.batches, self.layer),
                task.targets(task.test),
                steps=self.ctc_steps,
                seed=self.seed,
            )
        train = extract_embeddings(model, task.train.batches, self.layer)
        test = extract_embeddings(model, task.test.batches, self.layer)
        if task.method == "knn":
            return knn_accuracy(train, task.targets(task.train), test, task.targets(task.test), k=self.k)
        return linear_probe_accuracy(train, task.targets(task.train), test, task.targets(task.test))

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return {task.name: self.score(model, task) for task in self.tasks}
