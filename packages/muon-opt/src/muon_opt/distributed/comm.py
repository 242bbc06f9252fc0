"""Communication accounting for distributed Muon: bytes each rank sends, per collective, per step.

Moonlight (Liu et al. 2025, arXiv 2502.16982, Sec. 2.3 and Table 5 discussion) argues that ZeRO-1 Muon
communicates between 1x and 1.25x as much as ZeRO-1 AdamW: the reduce-scatter of gradients and the
all-gather of parameters are shared, and Muon adds only the gather of the matrices that straddle shard
boundaries (in bf16). :class:`CommCounter` makes that checkable on a live run.

Unit: the bytes one rank must put on the network for a bandwidth-optimal implementation of the collective,
i.e. the total bytes that cross the network divided by the world size ``W`` (what NCCL-tests calls bus bytes,
except that a broadcast counts ``(W - 1) / W`` of its payload, as every other op here does). For a payload
of ``T`` bytes in total:

============================  ==========================
all-gather (output ``T``)     ``(W - 1) / W * T``
reduce-scatter (input ``T``)  ``(W - 1) / W * T``
all-reduce                    ``2 (W - 1) / W * T``
broadcast                     ``(W - 1) / W * T``
all-to-all                    exactly the bytes sent to other ranks
============================  ==========================

So ZeRO-1 AdamW (reduce-scatter grads + all-gather params, N fp32 parameters) costs ``2 (W-1)/W * 4N`` bytes
per rank per step, and DDP + ``ZeroRedundancyOptimizer`` (all-reduce + broadcast) ``3 (W-1)/W * 4N``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["CommCounter", "collective_bytes"]

_FACTORS = {"all_gather": 1.0, "reduce_scatter": 1.0, "all_reduce": 2.0, "broadcast": 1.0}


def collective_bytes(kind: str, payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends for a collective of ``kind`` moving ``payload_bytes`` in total (see module doc).

    ``payload_bytes`` is the full (gathered / pre-scatter / reduced / broadcast) tensor size; for
    ``"all_to_all"`` pass the bytes this rank sends to the other ranks, which are returned unchanged.
    """
    if world_size < 1:
        raise ValueError(f"collective_bytes: world_size={world_size} must be >= 1")
    if payload_bytes < 0:
        raise ValueError(f"collective_bytes: payload_bytes={payload_bytes} must be >= 0")
    if kind == "all_to_all":
        return payload_bytes
    if kind not in _FACTORS:
        raise ValueError(
            f"collective_bytes: kind={kind!r} must be one of {[*sorted(_FACTORS), 'all_to_all']}"
        )
    return round(_FACTORS[kind] * (world_size - 1) / world_size * payload_bytes)


@dataclass
class CommCounter:
    """Bytes this rank sent, per named collective, for the last step and in total.

    The distributed optimizers own one (``optimizer.comm``); ``last_step`` is what one ``step()`` sent,
    ``total`` the sum over ``steps`` steps. Names say what moved, e.g. ``"reduce_scatter/grads"``.
    """

    world_size: int
    last_step: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    steps: int = 0
    _current: dict[str, int] = field(default_factory=lambda: defaultdict(int), repr=False)

    def record(self, name: str, kind: str, payload_bytes: int) -> int:
        """Account one collective; returns the bytes this rank sent for it."""
        sent = collective_bytes(kind, payload_bytes, self.world_size)
        self._current[name] += sent
        return sent

    def end_step(self) -> None:
        """Close the current step: move its counts into ``last_step`` and ``total``."""
        self.last_step = dict(self._current)
        for k, v in self._current.items():
            self.total[k] += v
        self._current = defaultdict(int)
        self.steps += 1

    def bytes_per_step(self) -> float:
        """Mean bytes sent per step by this rank, over all steps so far."""
        return sum(self.total.values()) / self.steps if self.steps else 0.0

    def summary(self) -> str:
        """One line per collective of the last step, in KiB, and the total."""
        lines = [f"{k:<32s} {v / 1024:10.1f} KiB" for k, v in sorted(self.last_step.items())]
        lines.append(f"{'total (last step)':<32s} {sum(self.last_step.values()) / 1024:10.1f} KiB")
        return "\n".join(lines)
