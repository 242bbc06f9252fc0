"""Peak transient memory of one optimizer step, counted from the allocations themselves.

The CPU allocator keeps no peak counter (``torch.cuda.max_memory_allocated`` has no CPU twin) and RSS
mixes in the allocator's caching, so :class:`PeakTransient` counts bytes directly: a
``TorchDispatchMode`` sees every op's outputs, adds the bytes of each *new* storage (an output whose
storage is one of the op's inputs, a view or an in-place result, allocates nothing) and a weak-reference
finaliser subtracts them when that storage is freed. What existed before the mode was entered
(parameters, gradients, optimizer state) is not counted: the figure is what the step itself allocates on
top of them, at its worst moment. On CUDA the allocator's own counters say the same
(``torch.cuda.max_memory_allocated`` minus the bytes allocated before).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTransient(TorchDispatchMode):
    """``with PeakTransient() as m: fn()`` then ``m.peak`` is the most bytes ``fn`` had allocated at once."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live or key in inputs:
                continue
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


def peak_transient_bytes(fn: Callable[[], Any], device: torch.device | None = None) -> int:
    """The most bytes ``fn()`` had allocated at once beyond what existed before it (see the module)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakTransient() as mode:
        fn()
    return mode.peak
