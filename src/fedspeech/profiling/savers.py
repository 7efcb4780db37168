"""Memory savers: the knobs a user can turn when a model does not fit a device.

Each saver is named on the command line (``--savers ckpt-cnn freeze-cnn crop=2 amp=bf16``)
and is applied with what transformers / torch already provide:

- ``ckpt-cnn`` / ``ckpt-transformer``: activation checkpointing of the conv feature
  encoder layers / the Transformer layers. transformers 5.x turns on checkpointing for
  *every* ``GradientCheckpointingLayer`` (the conv layers are such layers too), so we enable
  it the library's way and then switch it off again in the scope the user did not pick.
- ``recompute-cnn``: keep nothing of the CNN for backward but its input, and recompute it
  one utterance at a time during backward (``torch.utils.checkpoint`` around the whole
  feature encoder, per example). Per-layer checkpointing (``ckpt-cnn``) still keeps every
  conv layer's input, and the first layers' outputs are the largest tensors of the model;
  per example, the recomputation holds one utterance's CNN activations instead of the
  batch's. Exact: group and layer norms normalise each utterance on its own.
- ``ckpt-contrastive``: compute the contrastive logits (cosine similarity of every frame's
  prediction with its target and 100 distractors) in checkpointed chunks of distractors.
  Plain, autograd keeps the concatenated [101, batch, frames, 256] targets and the cosine's
  intermediates for backward: the largest activations once the CNN and the Transformer are
  checkpointed. Exact: each distractor's cosine is independent of the others.
- ``fused-quantizer``: look up the Gumbel quantizer's codevectors with one batched matrix
  product instead of transformers' broadcast multiply-and-sum, which materialises a
  [frames, groups × codes, dim / groups] tensor (360 MB at base, batch 4, 5.5 s) and three
  such tensors in backward: with everything else checkpointed, the step's peak. Exact up to
  the order of a float sum (the one-hot selection is a sum over codes either way).
- ``step-in-backward``: apply AdamW to each parameter as soon as its gradient is complete
  (``register_post_accumulate_grad_hook``, the pattern of torch's "optimizer step in
  backward" tutorial) and free that gradient at once, so the full set of gradients never
  exists. Same update as one AdamW step; it cannot clip by the *global* gradient norm or
  use fp16 loss scaling, which both need every gradient first.
- ``adam-bf16`` (with ``step-in-backward``): keep AdamW's two moments in bfloat16, halving
  the optimizer state (2 × 4 bytes per weight → 2 × 2). The update is computed in float32
  and written back with *stochastic* rounding, as torchao's low-bit optimizers do: with
  round-to-nearest, the second moment's per-step change (0.1 %) is below bfloat16's
  resolution (0.4 %) and would freeze. Not exact: the benchmark and a test compare the
  loss curve with float32 moments.
- ``freeze-cnn``: ``model.freeze_feature_encoder()`` (no gradients, no optimizer state and
  no saved activations for the CNN).
- ``cache-cnn`` (implies ``freeze-cnn``): keep the frozen CNN's output per utterance and
  serve it when the same samples come again (a crop repeated in the next local epoch), so
  the CNN's forward pass is paid once per crop instead of once per step. Exact for a frozen
  CNN: each row is keyed by a digest of its samples (padding included) and computed as the
  batch would compute it (group/layer norms see one utterance at a time), and the cache is
  dropped when a CNN weight is written. How much it saves depends on how often crops recur
  (in ``fedspeech pretrain`` crops change every round, so ``local_epochs`` − 1 of every
  ``local_epochs`` passes hit); the profiler refuses it, since it times one repeated batch.
- ``crop=S``: train on crops of at most S seconds.
- ``amp=bf16`` / ``amp=fp16``: mixed precision with ``torch.autocast``.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
#: The on/off savers: command-line token -> ``Savers`` field, in the spelling order of ``tokens``.
SWITCHES = {
    "ckpt-cnn": "checkpoint_cnn",
    "recompute-cnn": "recompute_cnn",
    "ckpt-transformer": "checkpoint_transformer",
    "ckpt-contrastive": "checkpoint_contrastive",
    "fused-quantizer": "fused_quantizer",
    "step-in-backward": "step_in_backward",
    "adam-bf16": "adam_bf16",
    "freeze-cnn": "freeze_cnn",
    "cache-cnn": "cache_cnn",
}
_VALUED_SAVERS_HELP = "crop=SECONDS, amp=bf16|fp16"
SAVER_HELP = ", ".join([*SWITCHES, _VALUED_SAVERS_HELP])
#: Savers the profiler cannot time from one repeated batch (a cache would hit every step).
UNPROFILED_SAVERS = ("cache-cnn",)
PROFILER_SAVER_HELP = ", ".join([*(t for t in SWITCHES if t not in UNPROFILED_SAVERS), _VALUED_SAVERS_HELP])
#: The exact savers together: the same gradients and update as no savers (tests check it).
EXACT_SAVERS = ("recompute-cnn", "ckpt-transformer", "ckpt-contrastive", "fused-quantizer", "step-in-backward")
#: Distractors per checkpointed chunk of ``ckpt-contrastive``.
CONTRASTIVE_CHUNK = 10
#: Bytes of CNN features one ``cache-cnn`` model keeps at most (least recently used go first).
CNN_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Savers:
    """A combination of memory savers (all off by default)."""

    checkpoint_cnn: bool = False
    checkpoint_transformer: bool = False
    freeze_cnn: bool = False
    recompute_cnn: bool = False
    checkpoint_contrastive: bool = False
    fused_quantizer: bool = False
    step_in_backward: bool = False
    adam_bf16: bool = False
    cache_cnn: bool = False
    crop_seconds: float | None = None
    amp: str | None = None

    @classmethod
    def parse(cls, tokens: list[str] | tuple[str, ...] | None) -> Savers:
        """Parse command-line tokens; commas also separate savers."""
        savers = cls()
        for raw in tokens or ():
            for token in filter(None, (part.strip() for part in raw.split(","))):
                savers = savers._with_token(token)
        return savers

    def _with_token(self, token: str) -> Savers:
        key, _, value = token.partition("=")
        if key in SWITCHES and not value:
            switched_on: dict[str, Any] = {SWITCHES[key]: True}
            if key == "cache-cnn":  # only a frozen CNN's output can be reused
                switched_on["freeze_cnn"] = True
            return replace(self, **switched_on)
        if key == "crop":
            try:
                seconds = float(value)
            except ValueError:
                raise ValueError(f"saver {token!r}: crop needs seconds, e.g. crop=2") from None
            if seconds <= 0:
                raise ValueError(f"saver {token!r}: crop must be > 0 seconds")
            return replace(self, crop_seconds=seconds)
        if key == "amp":
            if value not in ("bf16", "fp16"):
                raise ValueError(f"saver {token!r}: amp must be amp=bf16 or amp=fp16")
            return replace(self, amp=value)
        raise ValueError(f"unknown saver {token!r}; choose from {SAVER_HELP}")

    def tokens(self) -> list[str]:
        """The command-line spelling, in a fixed order (inverse of :meth:`parse`)."""
        out = [token for token, name in SWITCHES.items() if getattr(self, name)]
        if self.crop_seconds is not None:
            out.append(f"crop={self.crop_seconds:g}")
        if self.amp is not None:
            out.append(f"amp={self.amp}")
        return out

    def singles(self) -> list[Savers]:
        """Each selected saver on its own, to measure what it saves and costs alone."""
        return [Savers.parse([token]) for token in self.tokens()]

    def without_crop(self) -> Savers:
        """For sweeps, which set the length themselves."""
        return replace(self, crop_seconds=None)

    def without_amp(self) -> Savers:
        """For precision comparisons, which set the precision themselves."""
        return replace(self, amp=None)

    def effective_seconds(self, seconds: float) -> float:
        return min(seconds, self.crop_seconds) if self.crop_seconds is not None else seconds

    def effective_precision(self, precision: str) -> str:
        return self.amp if self.amp is not None else precision

    @property
    def any(self) -> bool:
        return bool(self.tokens())


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    return precision


def _feature_encoder(model: nn.Module) -> nn.Module:
    encoder = getattr(model.base_model, "feature_extractor", None)
    if encoder is None:
        raise ValueError(f"{type(model).__name__} has no conv feature encoder (feature_extractor)")
    return encoder


def apply_model_savers(model: nn.Module, savers: Savers) -> None:
    """Turn on checkpointing / freezing on a freshly built model, in place."""
    if savers.freeze_cnn:
        if hasattr(model, "freeze_feature_encoder"):
            model.freeze_feature_encoder()
        else:  # AutoModel bases (HuBERT, WavLM) have the method on the feature encoder only
            _feature_encoder(model)._freeze_parameters()
    if savers.recompute_cnn and savers.checkpoint_cnn:
        raise ValueError("savers recompute-cnn and ckpt-cnn both checkpoint the CNN: pick one")
    if savers.recompute_cnn and not savers.freeze_cnn:  # a frozen CNN keeps nothing for backward anyway
        recompute_per_example(_feature_encoder(model))
    if savers.cache_cnn:
        FrozenCNNCache.attach(_feature_encoder(model))
    if savers.checkpoint_contrastive:
        if not hasattr(model, "compute_contrastive_logits"):
            raise ValueError(f"{type(model).__name__} has no contrastive head: ckpt-contrastive does not apply")
        checkpoint_contrastive_logits(model)
    if savers.fused_quantizer:
        quantizer = getattr(model, "quantizer", None)
        if quantizer is None:
            raise ValueError(f"{type(model).__name__} has no quantizer: fused-quantizer does not apply")
        fuse_quantizer(quantizer)
    if not (savers.checkpoint_cnn or savers.checkpoint_transformer):
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    model.activation_checkpointing_enable()  # non-reentrant torch.utils.checkpoint per layer
    cnn_layers = {id(m) for m in _feature_encoder(model).modules()}
    found = {"cnn": 0, "transformer": 0}
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            in_cnn = id(module) in cnn_layers
            module.gradient_checkpointing = savers.checkpoint_cnn if in_cnn else savers.checkpoint_transformer
            found["cnn" if in_cnn else "transformer"] += 1
    for scope, wanted in (("cnn", savers.checkpoint_cnn), ("transformer", savers.checkpoint_transformer)):
        if wanted and not found[scope]:
            raise ValueError(f"{type(model).__name__}: no checkpointable {scope} layers found")


def recompute_per_example(encoder: nn.Module) -> None:
    """Make ``encoder`` (a conv feature encoder) keep only its input for backward and
    recompute itself one utterance at a time there; in place, parameters and state-dict
    keys unchanged (the instance's ``forward`` is wrapped, the module tree is not).

    Why our own wrapper: transformers checkpoints per conv layer only (``ckpt-cnn``), which
    keeps each layer's input alive; torch's ``checkpoint`` does the recomputation, we only
    split the batch so that backward holds one utterance's activations at a time.
    """
    from torch.utils.checkpoint import checkpoint

    plain_forward = encoder.forward

    def forward(input_values: torch.Tensor) -> torch.Tensor:
        trains = torch.is_grad_enabled() and encoder.training and any(p.requires_grad for p in encoder.parameters())
        if not trains:
            return plain_forward(input_values)
        chunks = [checkpoint(plain_forward, one, use_reentrant=False) for one in input_values.split(1)]
        return torch.cat(chunks)

    encoder.forward = forward


class FrozenCNNCache:
    """The ``cache-cnn`` saver: a frozen conv feature encoder's output per utterance, reused
    when the same samples come again (see the module docstring).

    Why our own: transformers recomputes the CNN at every forward pass, and the library has
    no hook for precomputed features in ``Wav2Vec2ForPreTraining`` (the lengths, masks and
    the quantizer's targets all start from ``input_values``), so the encoder's ``forward``
    is wrapped on the instance, as for ``recompute-cnn``; parameters and state-dict keys are
    unchanged. ``hits`` and ``misses`` count rows served from and added to the cache.
    """

    def __init__(self, encoder: nn.Module, max_bytes: int = CNN_CACHE_BYTES) -> None:
        self.encoder = encoder
        self.plain_forward = encoder.forward
        self.max_bytes = max_bytes
        self.rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._versions: tuple[int, ...] = ()

    @classmethod
    def attach(cls, encoder: nn.Module, max_bytes: int = CNN_CACHE_BYTES) -> FrozenCNNCache:
        cache = cls(encoder, max_bytes)
        encoder.forward = cache
        encoder.cnn_cache = cache
        return cache

    def _check_weights(self) -> None:
        params = [*self.encoder.parameters(), *self.encoder.buffers()]
        if any(p.requires_grad for p in self.encoder.parameters()):
            raise RuntimeError("cache-cnn: the CNN is trainable again, so its cached features would go stale")
        # torch bumps a tensor's version on every in-place write (load_state_dict included)
        versions = tuple(t._version for t in params) + tuple(id(t) for t in params)
        if versions != self._versions:
            self.rows.clear()
            self.bytes = 0
            self._versions = versions

    @staticmethod
    def _key(row: torch.Tensor) -> bytes:
        values = row.detach().to("cpu").contiguous()
        digest = hashlib.blake2b(values.numpy().view("uint8"), digest_size=20)
        digest.update(f"{tuple(values.shape)}{values.dtype}".encode())
        return digest.digest()

    def __call__(self, input_values: torch.Tensor) -> torch.Tensor:
        self._check_weights()
        keys = [self._key(row) for row in input_values]
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            with torch.no_grad():  # frozen: nothing to keep for backward
                computed = self.plain_forward(input_values[missing])
            fresh = {i: row for i, row in zip(missing, computed)}
        rows = []
        for i, key in enumerate(keys):
            if i in fresh:
                row = fresh[i].clone()
                self._store(key, row)
                self.misses += 1
            else:
                row = self.rows[key]
                self.rows.move_to_end(key)
                self.hits += 1
            rows.append(row)
        return torch.stack(rows)

    def _store(self, key: bytes, row: torch.Tensor) -> None:
        if key in self.rows:  # the same samples twice in one batch
            return
        self.rows[key] = row
        self.bytes += row.numel() * row.element_size()
        while self.bytes > self.max_bytes and len(self.rows) > 1:
            _, dropped = self.rows.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()


def checkpoint_contrastive_logits(model: nn.Module, chunk: int = CONTRASTIVE_CHUNK) -> None:
    """Wrap ``model.compute_contrastive_logits`` (transformers' static method, overridden on
    the instance) so that it runs in checkpointed chunks of ``chunk`` distractors: backward
    keeps only the inputs and recomputes one chunk's cosines at a time."""
    from torch.utils.checkpoint import checkpoint

    plain = model.compute_contrastive_logits

    def chunked(
        target_features: torch.Tensor,
        negative_features: torch.Tensor,
        predicted_features: torch.Tensor,
        temperature: float = 0.1,
    ) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return plain(target_features, negative_features, predicted_features, temperature)

        def logits(targets: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
            # the library's formula on a slice of [positive, distractors] (see plain)
            similarity = torch.cosine_similarity(predicted.float(), targets.float(), dim=-1)
            return similarity.type_as(targets) / temperature

        parts = (target_features, *negative_features.split(chunk))
        return torch.cat([checkpoint(logits, part, predicted_features, use_reentrant=False) for part in parts])

    model.compute_contrastive_logits = chunked


def fuse_quantizer(quantizer: nn.Module) -> None:
    """Replace the forward of a transformers Gumbel vector quantizer (wav2vec 2.0 and its
    conformer) on this instance by the same computation with a batched-matmul codevector
    lookup (see ``fused-quantizer``). Everything before the lookup is transformers' code
    path, step by step: projection, hard Gumbel softmax in training / argmax otherwise,
    perplexity of the soft distribution over the masked frames."""
    functional = nn.functional

    def forward(hidden_states: torch.Tensor, mask_time_indices: torch.Tensor | None = None):
        batch_size, sequence_length, _ = hidden_states.shape
        groups, codes = quantizer.num_groups, quantizer.num_vars
        frames = batch_size * sequence_length
        logits = quantizer.weight_proj(hidden_states).view(frames * groups, -1)
        if quantizer.training:
            probs = functional.gumbel_softmax(logits.float(), tau=quantizer.temperature, hard=True).type_as(logits)
            soft = torch.softmax(logits.view(frames, groups, -1).float(), dim=-1)
            perplexity = quantizer._compute_perplexity(soft, mask_time_indices)
        else:
            index = logits.argmax(dim=-1)
            probs = logits.new_zeros(logits.shape).scatter_(-1, index.view(-1, 1), 1.0)
            perplexity = quantizer._compute_perplexity(probs.view(frames, groups, -1), mask_time_indices)
        codebook = quantizer.codevectors.view(groups, codes, -1)
        # [groups, frames, codes] @ [groups, codes, dim/groups]: no [frames, groups*codes, dim/groups] product
        selected = torch.bmm(probs.view(frames, groups, codes).transpose(0, 1), codebook)
        codevectors = selected.transpose(0, 1).reshape(batch_size, sequence_length, -1)
        return codevectors, perplexity

    quantizer.forward = forward


class StepInBackward:
    """AdamW applied per parameter inside backward (see ``step-in-backward`` above).

    Quacks like the optimizer :class:`~fedspeech.profiling.trainstep.TrainStep` uses:
    ``state`` holds every parameter's AdamW state, ``step`` and ``zero_grad`` do nothing
    because the update and the freeing already happened in backward. ``moments_bf16``: the
    ``adam-bf16`` saver (our own update, since torch's AdamW keeps its state in the
    parameters' dtype; the formula is torch's AdamW, checked against it in the tests).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        moments_bf16: bool = False,
        seed: int = 0,
    ) -> None:
        if not params:
            raise ValueError("step-in-backward: no trainable parameters")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.moments_bf16 = moments_bf16
        self.rounding = torch.Generator().manual_seed(seed)  # not the model's RNG stream
        self._state: dict[nn.Parameter, dict[str, Any]] = {}
        # foreach=False: one parameter per optimizer, so there is nothing to batch anyway,
        # and no multi-tensor temporaries the size of the model.
        adamw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        self.optimizers = {} if moments_bf16 else {p: torch.optim.AdamW([p], **adamw) for p in params}
        # The hooks live in C++ (the tensor's autograd metadata), out of sight of Python's
        # garbage collector: a hook holding this object strongly would make the cycle
        # parameter -> hook -> optimizer -> parameter uncollectable and leak the whole model
        # copy and its AdamW state (1.1 GB per measurement of base). A weak reference breaks it.
        this = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            optimizer = this()
            if optimizer is not None:
                optimizer._step(param)

        self.handles = [p.register_post_accumulate_grad_hook(hook) for p in params]

    def _step(self, param: torch.Tensor) -> None:
        if self.moments_bf16:
            self._bf16_step(param)
            param.grad = None
            return
        optimizer = self.optimizers[param]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _bf16_step(self, param: nn.Parameter) -> None:
        grad = param.grad
        assert grad is not None  # the hook runs once the gradient is accumulated
        state = self._state.get(param)
        if state is None:
            zeros = torch.zeros_like(param, dtype=torch.bfloat16)
            state = self._state[param] = {"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
        state["step"] += 1
        beta1, beta2 = self.betas
        exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        param.mul_(1 - self.lr * self.weight_decay)
        correction1 = 1 - beta1 ** state["step"]
        correction2 = 1 - beta2 ** state["step"]
        denominator = (exp_avg_sq.sqrt() / correction2**0.5).add_(self.eps)
        param.addcdiv_(exp_avg, denominator, value=-self.lr / correction1)
        state["exp_avg"].copy_(self._round(exp_avg))
        state["exp_avg_sq"].copy_(self._round(exp_avg_sq))

    def _round(self, value: torch.Tensor) -> torch.Tensor:
        """float32 → bfloat16 with stochastic rounding: add random low 16 bits, truncate."""
        bits = value.view(torch.int32)
        noise = torch.randint(0, 1 << 16, value.shape, generator=self.rounding, dtype=torch.int32)
        return (bits + noise).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        if self.moments_bf16:
            return dict(self._state)
        return {p: s for optimizer in self.optimizers.values() for p, s in optimizer.state.items()}

    def step(self) -> None:
        """Nothing left to do: every parameter was updated during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing left to free: each gradient was dropped right after its update."""
