"""The exact memory savers change memory, not the math: same loss, gradients and update.

A saver that silently changed the gradients would make every memory figure meaningless,
so each exact saver is compared with the plain Hugging Face step on the same batch and the
same random state (dropout, Gumbel noise), within float tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fedspeech.profiling.measure import measure_step
from fedspeech.profiling.savers import EXACT_SAVERS, Savers, StepInBackward
from fedspeech.profiling.trainstep import TrainStep, build_model, synthetic_batch


def assert_close_in_norm(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Float rounding differs between batched and per-utterance convolutions (relative
    error ~1e-6 here), and some gradients are zero up to rounding (the attention key bias:
    softmax ignores it), so compare each tensor in norm, relative to its size."""
    error = float((actual - expected).norm())
    assert error <= 1e-4 * float(expected.norm()) + 1e-6, f"{name}: |diff| {error:.3g}"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny")


def _gradients(template, tokens: list[str]) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one step; savers without an optimizer step in backward."""
    step = TrainStep(template, savers=Savers.parse(tokens))
    batch = synthetic_batch(step.model, 3, 1.0, seed=1)
    torch.manual_seed(7)
    loss = step.forward_loss(batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in step.model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _weights_after_steps(template, tokens: list[str], steps: int = 2) -> dict[str, torch.Tensor]:
    step = TrainStep(template, savers=Savers.parse(tokens))
    batch = synthetic_batch(step.model, 3, 1.0, seed=1)
    torch.manual_seed(7)
    for _ in range(steps):
        step(batch)
    return {name: p.detach().clone() for name, p in step.model.named_parameters()}


@pytest.mark.parametrize(
    "tokens",
    [
        ["recompute-cnn"],
        ["ckpt-contrastive"],
        ["fused-quantizer"],
        ["recompute-cnn", "ckpt-transformer", "ckpt-contrastive", "fused-quantizer"],
    ],
)
def test_recomputed_cnn_gives_the_plain_gradients(tiny, tokens):
    plain_loss, plain = _gradients(tiny, [])
    loss, grads = _gradients(tiny, tokens)
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain.keys()
    cnn = [name for name in plain if "feature_extractor" in name]
    assert cnn and all(plain[name].abs().sum() > 0 for name in cnn)  # the CNN really trains
    for name in plain:
        assert_close_in_norm(grads[name], plain[name], name)


def test_step_in_backward_gives_the_plain_adamw_update(tiny):
    plain = _weights_after_steps(tiny, [])
    fused = _weights_after_steps(tiny, list(EXACT_SAVERS))
    start = dict(tiny.named_parameters())
    moved = [name for name in plain if not torch.equal(plain[name], start[name].detach())]
    assert len(moved) > len(plain) // 2  # the steps did update the weights
    # The attention key bias gets a gradient that is zero up to rounding (softmax ignores a
    # per-query constant), and AdamW normalises that rounding noise into full-size steps.
    for name in [n for n in plain if not n.endswith("attention.k_proj.bias")]:
        assert_close_in_norm(fused[name], plain[name], name)


def test_step_in_backward_never_holds_all_gradients(tiny):
    step = TrainStep(copy.deepcopy(tiny), savers=Savers.parse(["step-in-backward"]))
    batch = synthetic_batch(step.model, 2, 1.0)
    step.forward_loss(batch).backward()
    assert all(p.grad is None for p in step.model.parameters())
    assert len(step.optimizer.state) == sum(p.requires_grad for p in step.model.parameters())


def test_exact_savers_cut_what_is_held_for_backward(tiny):
    def measured(tokens):
        return measure_step(tiny, "tiny", 1.0, 4, savers=Savers.parse(tokens), repeats=0, with_layers=False)

    plain, exact = measured([]), measured(list(EXACT_SAVERS))
    assert exact.peak_bytes < plain.peak_bytes
    assert exact.static_bytes["grads"] < plain.static_bytes["grads"] / 4
    recompute = measured(["recompute-cnn"])
    per_layer = measured(["ckpt-cnn"])
    assert recompute.peak_by_phase["forward"] < per_layer.peak_by_phase["forward"]


def test_savers_that_cannot_combine_are_refused(tiny):
    with pytest.raises(ValueError, match="recompute-cnn and ckpt-cnn"):
        TrainStep(tiny, savers=Savers.parse(["recompute-cnn", "ckpt-cnn"]))
    with pytest.raises(ValueError, match="step-in-backward cannot run with fp16"):
        TrainStep(tiny, savers=Savers.parse(["step-in-backward", "amp=fp16"]))


def test_bf16_moments_follow_torch_adamw_and_keep_the_loss_curve(tiny):
    # one step: the update uses the float32 moments before they are rounded, so it is AdamW's
    plain = _weights_after_steps(tiny, [], steps=1)
    bf16 = _weights_after_steps(tiny, ["step-in-backward", "adam-bf16"], steps=1)
    for name in [n for n in plain if not n.endswith("attention.k_proj.bias")]:
        assert_close_in_norm(bf16[name], plain[name], name)

    def losses(tokens: list[str], steps: int = 12) -> list[float]:
        step = TrainStep(tiny, savers=Savers.parse(tokens))
        if isinstance(step.optimizer, StepInBackward):  # a larger lr than the profiler's, so 12 steps move
            step.optimizer.lr = 1e-3
        else:
            for group in step.optimizer.param_groups:
                group["lr"] = 1e-3
        batch = synthetic_batch(step.model, 3, 1.0, seed=1)
        torch.manual_seed(7)
        out = []
        for _ in range(steps):
            loss = step.forward_loss(batch)
            out.append(float(loss.detach()))
            step.backward_and_update(loss)
        return out

    reference, low = losses([]), losses(["step-in-backward", "adam-bf16"])
    assert reference[-1] < 0.9 * reference[0]  # the curve really moves
    assert all(abs(a - b) <= 0.01 * abs(a) for a, b in zip(reference, low)), (reference, low)
    state = TrainStep(tiny, savers=Savers.parse(["step-in-backward", "adam-bf16"]))
    state(synthetic_batch(state.model, 2, 1.0))
    assert {v.dtype for s in state.optimizer.state.values() for v in s.values() if torch.is_tensor(v)} == {
        torch.bfloat16
    }
    with pytest.raises(ValueError, match="adam-bf16 needs step-in-backward"):
        TrainStep(tiny, savers=Savers.parse(["adam-bf16"]))


def test_step_in_backward_frees_its_model_copy_when_dropped(tiny) -> None:
    """The per-parameter hooks must not pin the step: they live in C++, where Python's
    garbage collector cannot break a parameter -> hook -> optimizer -> parameter cycle, and
    the planner measures several saver rungs in one process (a leaked copy per rung)."""
    import gc
    import weakref

    step = TrainStep(tiny, savers=Savers.parse(["step-in-backward"]))
    step(synthetic_batch(step.model, 2, 1.0))
    first_weight = weakref.ref(next(step.model.parameters()))
    del step
    gc.collect()
    assert first_weight() is None
