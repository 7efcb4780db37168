"""Attribute parameters, FLOPs and saved activations to the layers of a wav2vec2-family model.

Layers ("units") follow the naming every HF wav2vec2-family model shares: conv layers of
``feature_extractor``, ``feature_projection``, the children of ``encoder`` (positional conv,
layer norm, each Transformer layer) and, with a pretraining head, ``quantizer``,
``project_hid``, ``project_q``. Groups follow docs/methods.md §1. Whatever belongs to no unit
(``masked_spec_embed``, glue ops between layers) is reported as ``other``, never dropped.

Two counting conventions (:data:`CONVENTIONS`): ``complete`` counts every op torch's counter
has a formula for; ``gao2022`` is the reference study's per-module table (METHODS.md §1): the
FLOPs of conv and linear layers only (no attention Q·Kᵀ / A·V products), and the contrastive
projections (:data:`PROJECTIONS`) outside every module and the total.

Why not just ``FlopCounterMode.get_flop_counts()`` per module: its module tracker assigns
backward FLOPs by module-boundary gradient hooks, which in these models hands one layer's
backward to its neighbour (e.g. the feature projection's backward lands in the positional
conv). We keep torch's FLOP formulas and replace only the attribution: forward ops go to the
unit whose forward is running; backward ops go to the unit that *created the autograd node*
being executed (``torch._C._current_autograd_node``), recomputation under checkpointing
included. Saved tensors are attributed the same way, through
``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

GROUPS = ("cnn_encoder", "transformer", "quantization")
OTHER = "other"
PROJECTIONS = ("project_hid", "project_q")
COMPLETE, GAO2022 = "complete", "gao2022"
CONVENTIONS = {
    COMPLETE: "every counted op (conv, linear, attention Q·Kᵀ and A·V); "
    "quantization = quantizer + project_hid + project_q",
    GAO2022: "conv + linear layers only (no attention Q·Kᵀ / A·V); quantization = quantizer only, "
    "project_hid + project_q listed as projections, outside the total",
}
COUNTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d)


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown counting convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")


@dataclass(frozen=True)
class Unit:
    """One reported layer: a short name, its module path in the model and its group."""

    name: str
    path: str
    group: str
    module: nn.Module


def _short_name(relative_path: str) -> str:
    """``feature_extractor.conv_layers.0`` -> ``conv_layers.0``; encoder layers keep their prefix."""
    if relative_path.startswith("feature_extractor."):
        return relative_path.removeprefix("feature_extractor.")
    if relative_path == "encoder.pos_conv_embed":
        return "pos_conv_embed"
    return relative_path


def discover_units(model: nn.Module) -> list[Unit]:
    """The layers of the model, in forward order, with their docs/methods.md §1 group."""
    base = model.base_model
    prefix = "" if base is model else model.base_model_prefix + "."
    units: list[Unit] = []

    def add(path: str, group: str) -> None:
        module = model.get_submodule(path)
        units.append(Unit(_short_name(path.removeprefix(prefix)), path, group, module))

    conv_layers = getattr(getattr(base, "feature_extractor", None), "conv_layers", None)
    if conv_layers is None or not hasattr(base, "feature_projection") or not hasattr(base, "encoder"):
        raise ValueError(f"{type(model).__name__} is not a wav2vec2-family model (feature_extractor/encoder)")
    for index in range(len(conv_layers)):
        add(f"{prefix}feature_extractor.conv_layers.{index}", "cnn_encoder")
    add(f"{prefix}feature_projection", "cnn_encoder")
    for child_name, child in base.encoder.named_children():
        if isinstance(child, nn.ModuleList):
            for index in range(len(child)):
                add(f"{prefix}encoder.{child_name}.{index}", "transformer")
        elif any(True for _ in child.parameters()):
            add(f"{prefix}encoder.{child_name}", "transformer")
    for head in ("quantizer", *PROJECTIONS):
        if isinstance(getattr(model, head, None), nn.Module):
            add(head, "quantization")
    return units


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unattributed_params(model: nn.Module, units: list[Unit]) -> dict[str, int]:
    """Parameters that belong to no unit, by name (e.g. ``wav2vec2.masked_spec_embed``)."""
    in_units = {id(p) for unit in units for p in unit.module.parameters()}
    return {name: p.numel() for name, p in model.named_parameters() if id(p) not in in_units}


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


class UnitAttribution:
    """Knows which unit is running: in forward by module hooks, in backward by autograd node.

    Also records, per unit, the bytes of tensors saved for backward (deduplicated by storage,
    parameters excluded) and, for checkpointed layers, the inputs the checkpoint keeps for
    recomputation (which never pass through saved-tensor hooks).
    """

    def __init__(self, model: nn.Module, units: list[Unit]) -> None:
        self.model = model
        self.units = units
        self._stack: list[str] = []
        self._node_owner: dict[Any, str] = {}
        self._param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._param_storages |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self._saved_storages: dict[int, tuple[str, int]] = {}
        self._entry_nodes: dict[str, list[Any]] = {}
        self._handles: list[Any] = []

    # -- current unit -------------------------------------------------------------------
    def current(self) -> str:
        if self._stack:
            return self._stack[-1]
        node = torch._C._current_autograd_node()
        if node is not None:
            return self._node_owner.get(node, OTHER)
        return OTHER

    # -- module hooks ---------------------------------------------------------------------
    def _pre_hook(self, unit: Unit):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._stack.append(unit.name)
            inputs = list(_tensors((args, kwargs)))
            self._entry_nodes[unit.name] = [t.grad_fn for t in inputs if t.grad_fn is not None]
            if self._checkpointed(module, inputs):
                for tensor in inputs:  # non-reentrant checkpoint keeps these alive until backward
                    self._record_saved(tensor, unit.name)

        return hook

    @staticmethod
    def _checkpointed(module: nn.Module, inputs: list[torch.Tensor]) -> bool:
        """Will this call be checkpointed *and* build a graph (else nothing is kept)?"""
        if not (getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled()):
            return False
        return any(t.requires_grad for t in inputs) or any(p.requires_grad for p in module.parameters())

    def _post_hook(self, unit: Unit):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._stack.pop()
            self._claim_nodes(unit.name, output)

        return hook

    def _claim_nodes(self, owner: str, output: Any) -> None:
        """Mark every autograd node created inside the unit as the unit's."""
        stop = set(self._entry_nodes.pop(owner, []))
        todo = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or node in stop or node in self._node_owner:
                continue
            self._node_owner[node] = owner
            todo.extend(next_node for next_node, _ in node.next_functions)

    # -- saved tensors ------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._record_saved(tensor, self.current())
        return tensor

    def _record_saved(self, tensor: torch.Tensor, owner: str) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in self._param_storages or pointer in self._saved_storages:
            return
        self._saved_storages[pointer] = (owner, storage.nbytes())

    def saved_bytes(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for owner, nbytes in self._saved_storages.values():
            totals[owner] += nbytes
        return dict(totals)

    # -- context ------------------------------------------------------------------------
    def track_saved_tensors(self):
        """Context for the forward pass: record what autograd saves for backward."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def __enter__(self) -> UnitAttribution:
        for unit in self.units:
            self._handles.append(unit.module.register_forward_pre_hook(self._pre_hook(unit), with_kwargs=True))
            self._handles.append(unit.module.register_forward_hook(self._post_hook(unit), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def grouped_conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape,
    **kwargs,
) -> int:
    """FLOPs of ``convolution_backward``, correct for grouped convolutions.

    torch 2.13's formula counts the weight gradient as if the conv were not grouped (16x too
    much for the positional conv of wav2vec 2.0 base). Both gradients cost as many
    multiply-adds as the forward conv, which ``conv_flop_count`` gets right for any groups.
    """
    flops = 0
    if output_mask[0]:  # grad_input: a transposed conv of grad_out with the weight
        flops += conv_flop_count(grad_out_shape, w_shape, x_shape, not transposed)
    if output_mask[1]:  # grad_weight: one multiply-add per (output position, weight element)
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def cpu_attention_flop(query_shape, key_shape, value_shape, *_args, **_kwargs) -> int:
    """FLOPs of the fused CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``).

    torch 2.13's counter has formulas for the CUDA flash/efficient/cuDNN kernels but none for
    this CPU one, so on CPU, wherever PyTorch picks it (no dropout: eval, or dropout 0), the
    Q·Kᵀ and A·V products silently count as 0. The work is the same as any SDPA kernel's.
    """
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *_args, **_kwargs) -> int:
    """Backward of :func:`cpu_attention_flop`, with torch's SDPA backward formula."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# Formulas torch 2.13's FlopCounterMode lacks or gets wrong (see each function).
FLOP_FORMULAS = {
    aten.convolution_backward: grouped_conv_backward_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flop,
}


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode with the corrected formulas above: use it for every FLOP count,
    so the profiler, the depth planner and the early-exit clients count alike."""
    return FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)


class ConvLinearGate:
    """Tells whether the forward of a conv or linear layer (:data:`COUNTED_LAYERS`) is running,
    so the gao2022 convention can count those layers' ops and nothing else (the attention's
    Q·Kᵀ and A·V run outside them). Forward only: it is used for inference FLOPs.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, COUNTED_LAYERS)]
        self.depth = 0
        self._handles: list[Any] = []

    def __call__(self) -> bool:
        return self.depth > 0

    def _enter_layer(self, module: nn.Module, args: tuple) -> None:
        self.depth += 1

    def _leave_layer(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.depth -= 1

    def __enter__(self) -> ConvLinearGate:
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._enter_layer))
            self._handles.append(layer.register_forward_hook(self._leave_layer))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.depth = 0


class UnitFlopCounter(FlopCounterMode):
    """torch's FlopCounterMode, with counts also split by :class:`UnitAttribution` units.

    Overrides the private ``_count_flops`` hook of torch 2.13 (pinned); the FLOP formulas
    (2 per multiply-add; matmul, conv, attention and their backward) stay torch's. With
    ``counts``, an op is counted only while ``counts()`` is true (see :class:`ConvLinearGate`).
    """

    def __init__(self, attribution: UnitAttribution, counts: Callable[[], bool] | None = None) -> None:
        super().__init__(display=False, custom_mapping=FLOP_FORMULAS)
        self.attribution = attribution
        self.counts = counts
        self.unit_flops: dict[str, int] = defaultdict(int)

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry and (self.counts is None or self.counts()):
            count = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            self.unit_flops[self.attribution.current()] += count
            self.flop_counts["Global"][func_packet] += count
        return out

    def snapshot(self) -> dict[str, int]:
        return dict(self.unit_flops)
