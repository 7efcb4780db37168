"""Peak tensor memory of a CPU training step (CUDA has ``max_memory_allocated``; CPU has not).

A ``TorchDispatchMode`` sees the output of every aten op, forward, backward and optimizer
alike. Each new tensor storage is counted once (views and in-place results share it) and
uncounted when it is freed (a ``weakref.finalize`` on the storage: torch keeps one Python
object per storage, so the finalizer fires exactly when the memory is released). The
high-water mark of the running sum is the step's peak of live tensor bytes.

Why not torch's ``MemTracker`` (``torch.distributed._tools``): same idea, but it updates
per-module statistics of every module on every op (minutes of overhead on ``large``) and
refuses models with frozen parameters (``freeze-cnn``).

Not counted: allocator rounding and caching, framework/runtime memory, kernel workspaces
(oneDNN scratchpads), and storages resized in place. The device headroom covers those;
``benchmarks/prediction_error.py`` compares with the process RSS.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Context manager: ``peak_bytes`` of live tensor storages while it is active."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self.existing_bytes = 0
        self.created_at_peak = 0
        self.phase_peaks: dict[str, int] = {}
        self._phase: str | None = None
        self._created = 0
        self._live: set[int] = set()
        for tensor in existing:
            self.existing_bytes += self._track(tensor, created=False)

    def _track(self, tensor: torch.Tensor, created: bool) -> int:
        if tensor.device.type == "meta" or tensor.is_sparse:
            return 0
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return 0
        nbytes = storage.nbytes()
        self._live.add(key)
        self.current_bytes += nbytes
        if created:
            self._created += nbytes
        weakref.finalize(storage, self._release, key, nbytes, created)
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.created_at_peak = self._created
        if self._phase is not None and self.current_bytes > self.phase_peaks[self._phase]:
            self.phase_peaks[self._phase] = self.current_bytes
        return nbytes

    def start_phase(self, name: str) -> None:
        """From now on also keep the high-water mark of phase ``name`` (e.g. the optimizer step)."""
        self._phase = name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current_bytes)

    def _release(self, key: int, nbytes: int, created: bool) -> None:
        self._live.discard(key)
        self.current_bytes -= nbytes
        if created:
            self._created -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value, created=True)
        return out

    def breakdown(self) -> dict[str, int]:
        """Split of the peak: what existed before the step vs. what the step allocated."""
        return {
            "existing_before_step": self.peak_bytes - self.created_at_peak,
            "allocated_during_step": self.created_at_peak,
        }


def tensors_of(*objects: Any) -> list[torch.Tensor]:
    """Every tensor held by modules (parameters, buffers, gradients), optimizers and tensors."""
    found: list[torch.Tensor] = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            found += list(obj.parameters()) + list(obj.buffers())
            found += [p.grad for p in obj.parameters() if p.grad is not None]
        elif isinstance(obj, torch.optim.Optimizer) or hasattr(obj, "optimizers"):  # or StepInBackward
            found += [v for state in obj.state.values() for v in state.values() if torch.is_tensor(v)]
        elif isinstance(obj, torch.Tensor):
            found.append(obj)
        elif obj is not None:
            found += [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]
    return found
