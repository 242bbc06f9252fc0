"""Who does what in distributed Muon: whole-matrix ownership and the ZeRO-1 flat-buffer layout.

Two planners, both pure functions of the parameter shapes and the world size (so every rank computes the
same plan without communicating):

- :func:`balance_ownership`: give each matrix to one rank so that Newton-Schulz work, not element count, is
  balanced (a ``[4096, 4096]`` matrix costs about 21x a ``[1024, 4096]`` one, for 4x the elements; see
  :func:`newton_schulz_flops`), longest-processing-time first. Used by the replicated (DDP) and FSDP tiers.
- :func:`plan_flat_layout`: order parameters in the ZeRO-1 flat buffer (Moonlight, arXiv 2502.16982,
  Algorithm 1) so that as few matrices as possible straddle a shard boundary. A straddling matrix has to be
  gathered (the only extra communication ZeRO-1 Muon has over ZeRO-1 AdamW) and orthogonalised on every
  rank that holds a piece of it. Element-wise (AdamW) parameters may straddle for free, so the planner
  packs matrices into shards first (best-fit decreasing) and fills the gaps with element-wise parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from muon_opt.matrix_view import MatrixSpec, logical_shapes

__all__ = ["FlatLayout", "balance_ownership", "newton_schulz_flops", "plan_flat_layout"]


def newton_schulz_flops(
    shape: torch.Size | Sequence[int], spec: MatrixSpec | None = None, steps: int = 5
) -> int:
    """Multiply-add FLOPs of ``steps`` Newton-Schulz iterations on the logical matrices of ``shape``.

    Per ``[m, M]`` matrix (``m = min``, ``M = max``; the Gram matrix is the small one), one iteration is
    ``X X^T`` (``2 m^2 M``), ``A A`` (``2 m^3``) and ``B X`` (``2 m^2 M``).
    """
    total = 0
    for count, rows, cols in logical_shapes(tuple(shape), spec):
        m, big = min(rows, cols), max(rows, cols)
        total += count * steps * (4 * m * m * big + 2 * m**3)
    return total


def balance_ownership(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item, greedily balancing the summed cost (longest processing time first).

    Deterministic: ties go to the lower item index and the lower rank, so every rank gets the same plan.
    LPT is within 4/3 of the optimal makespan; equal-cost items (same-shape matrices) are dealt round-robin,
    which keeps same-shape matrices batched on each owner.
    """
    if world_size < 1:
        raise ValueError(f"balance_ownership: world_size={world_size} must be >= 1")
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


@dataclass(frozen=True)
class FlatLayout:
    """Where each parameter lives in a ZeRO-1 flat buffer of ``world_size * shard_size`` elements.

    Rank ``r`` owns elements ``[r * shard_size, (r + 1) * shard_size)``. ``offsets[i]`` is parameter ``i``'s
    first element; ``numels[i]`` its size; ``is_matrix[i]`` whether Muon treats it as a whole (so it must
    not be split, or else be gathered).
    """

    world_size: int
    shard_size: int
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    is_matrix: tuple[bool, ...]
    strategy: str
    elementwise_state: int = 2

    def state_words(self, rank: int) -> int:
        """Optimizer-state elements of ``rank``'s shard: 1 per matrix element (momentum), ``elementwise_state``
        per element-wise one (AdamW's two moments)."""
        words = 0
        for i in range(len(self.numels)):
            held = self.held(i, rank)
            if held is not None:
                words += held[1] * (1 if self.is_matrix[i] else self.elementwise_state)
        return words

    def ranks_touching(self, i: int) -> list[int]:
        """Ranks whose shard holds at least one element of parameter ``i``."""
        if self.numels[i] == 0:
            return []
        first = self.offsets[i] // self.shard_size
        last = (self.offsets[i] + self.numels[i] - 1) // self.shard_size
        return list(range(first, last + 1))

    def held(self, i: int, rank: int) -> tuple[int, int] | None:
        """``(start, length)`` of the part of parameter ``i`` (flattened) that ``rank`` holds, or ``None``."""
        lo = max(self.offsets[i], rank * self.shard_size)
        hi = min(self.offsets[i] + self.numels[i], (rank + 1) * self.shard_size)
        return (lo - self.offsets[i], hi - lo) if hi > lo else None

    @property
    def straddlers(self) -> tuple[int, ...]:
        """Matrix parameters split across more than one shard (each costs one extra gather)."""
        return tuple(
            i for i in range(len(self.numels)) if self.is_matrix[i] and len(self.ranks_touching(i)) > 1
        )

    @property
    def padding(self) -> int:
        return self.world_size * self.shard_size - sum(self.numels)

    def report(self) -> dict[str, float | int | str]:
        """What the plan costs: straddling matrices, their elements, and the extra elements gathered."""
        strad = self.straddlers
        # each touching rank receives every piece it does not hold
        gathered = sum(self.numels[i] * (len(self.ranks_touching(i)) - 1) for i in strad)
        n_matrix = sum(self.is_matrix)
        return {
            "strategy": self.strategy,
            "world_size": self.world_size,
            "shard_size": self.shard_size,
            "matrices": n_matrix,
            "straddling_matrices": len(strad),
            "straddling_elements": sum(self.numels[i] for i in strad),
            "gathered_elements": gathered,
            "padding_elements": self.padding,
            "max_state_words_per_shard": max(self.state_words(r) for r in range(self.world_size)),
            "mean_state_words_per_shard": sum(self.state_words(r) for r in range(self.world_size))
            / self.world_size,
        }


Strategy = Literal["min_straddle", "natural"]


def plan_flat_layout(
    numels: Sequence[int],
    is_matrix: Sequence[bool],
    world_size: int,
    strategy: Strategy = "min_straddle",
    *,
    elementwise_state: int = 2,
) -> FlatLayout:
    """Lay parameters out in a ZeRO-1 flat buffer of ``world_size`` equal shards.

    ``"natural"`` keeps the given order (what Megatron-LM's distributed optimizer does). ``"min_straddle"``
    packs matrices into the shards best-fit decreasing, then lets element-wise parameters (and any matrix
    that fitted nowhere) flow into the gaps; the shard size stays ``ceil(total / world_size)``. It tries two
    packings, one using whole shards and one leaving each shard room for ``1/W`` of the element-wise
    parameters (whose state is ``elementwise_state`` words per element against Muon's 1, so spreading them
    evens out state memory), and the natural order; it returns the one that straddles the fewest elements,
    then the one with the smallest largest per-shard state. A gap's last element-wise parameter can
    overhang into the next shard and push a packed matrix across a boundary, which is why the natural order
    stays a candidate: the result is never worse than ``"natural"``. :meth:`FlatLayout.report` counts what
    still straddles.
    """
    if world_size < 1:
        raise ValueError(f"plan_flat_layout: world_size={world_size} must be >= 1")
    if len(numels) != len(is_matrix):
        raise ValueError(f"plan_flat_layout: {len(numels)} numels but {len(is_matrix)} is_matrix flags")
    if strategy not in ("min_straddle", "natural"):
        raise ValueError(f"plan_flat_layout: strategy={strategy!r} must be 'min_straddle' or 'natural'")
    if strategy == "natural":
        return _layout(numels, is_matrix, world_size, "natural", 0, elementwise_state)
    elementwise = sum(n for n, m in zip(numels, is_matrix, strict=True) if not m)
    candidates = [
        _layout(numels, is_matrix, world_size, "min_straddle", reserve, elementwise_state)
        for reserve in (0, math.ceil(elementwise / world_size))
    ] + [_layout(numels, is_matrix, world_size, "natural", 0, elementwise_state)]

    def cost(lay: FlatLayout) -> tuple[int, int]:
        straddling = sum(lay.numels[i] for i in lay.straddlers)
        return straddling, max(lay.state_words(r) for r in range(world_size))

    return min(candidates, key=cost)


def _layout(
    numels: Sequence[int], is_matrix: Sequence[bool], world_size: int, strategy: str, reserve: int, state: int
) -> FlatLayout:
    n = len(numels)
    total = sum(numels)
    shard = max(1, math.ceil(total / world_size))
    offsets = [0] * n
    if strategy == "natural":
        pos = 0
        for i in range(n):
            offsets[i] = pos
            pos += numels[i]
    else:
        free = [shard - reserve] * world_size
        bins: list[list[int]] = [[] for _ in range(world_size)]
        fluid_matrices: list[int] = []
        for i in sorted((i for i in range(n) if is_matrix[i]), key=lambda i: (-numels[i], i)):
            fits = [r for r in range(world_size) if free[r] >= numels[i]]
            if fits:
                r = min(fits, key=lambda r: (free[r], r))  # best fit: the tightest shard that still fits
                bins[r].append(i)
                free[r] -= numels[i]
            else:
                fluid_matrices.append(i)
        fluid = [i for i in range(n) if not is_matrix[i]] + sorted(fluid_matrices)
        pos, k = 0, 0
        for r in range(world_size):
            for i in bins[r]:
                offsets[i] = pos
                pos += numels[i]
            while k < len(fluid) and pos < (r + 1) * shard:
                offsets[fluid[k]] = pos
                pos += numels[fluid[k]]
                k += 1
        for i in fluid[k:]:
            offsets[i] = pos
            pos += numels[i]
    return FlatLayout(
        world_size=world_size,
        shard_size=shard,
        offsets=tuple(offsets),
        numels=tuple(numels),
        is_matrix=tuple(bool(x) for x in is_matrix),
        strategy=strategy,
        elementwise_state=state,
    )
