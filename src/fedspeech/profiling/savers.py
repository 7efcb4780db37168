"""Memory savers: the knobs a user can turn when a model does not fit a device.

Each saver is named on the command line (``--savers ckpt-cnn freeze-cnn crop=2 amp=bf16``)
and is applied with what transformers / torch already provide:

- ``ckpt-cnn`` / ``ckpt-transformer``: activation checkpointing of the conv feature
  encoder layers / the Transformer layers. transformers 5.x turns on checkpointing for
  *every* ``GradientCheckpointingLayer`` (the conv layers are such layers too), so we enable
  it the library's way and then switch it off again in the scope the user did not pick.
- ``freeze-cnn``: ``model.freeze_feature_encoder()`` (no gradients, no optimizer state and
  no saved activations for the CNN).
- ``crop=S``: train on crops of at most S seconds.
- ``amp=bf16`` / ``amp=fp16``: mixed precision with ``torch.autocast``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
SAVER_HELP = "ckpt-cnn, ckpt-transformer, freeze-cnn, crop=SECONDS, amp=bf16|fp16"


@dataclass(frozen=True)
class Savers:
    """A combination of memory savers (all off by default)."""

    checkpoint_cnn: bool = False
    checkpoint_transformer: bool = False
    freeze_cnn: bool = False
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
        if key == "ckpt-cnn" and not value:
            return replace(self, checkpoint_cnn=True)
        if key == "ckpt-transformer" and not value:
            return replace(self, checkpoint_transformer=True)
        if key == "freeze-cnn" and not value:
            return replace(self, freeze_cnn=True)
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
        out = []
        if self.checkpoint_cnn:
            out.append("ckpt-cnn")
        if self.checkpoint_transformer:
            out.append("ckpt-transformer")
        if self.freeze_cnn:
            out.append("freeze-cnn")
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
