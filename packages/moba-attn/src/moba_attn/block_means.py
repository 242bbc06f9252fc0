"""Incremental mean keys per block, for sparse decoding with a KV cache.

MoBA's gate scores a query against the mean key of every earlier block (Lu et al. 2025, Sec. 2.2).
During decoding the keys grow by a few tokens a step; recomputing every block mean each step costs
``O(T)`` per step. :class:`KeyBlockMeans` keeps fp32 running *sums* per block instead, so appending
``n`` keys costs ``O(n)`` and reading the means costs ``O(T / block_size)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KeyBlockMeans:
    """Running per-block key sums of ``N`` sequences, grown as keys are appended to a cache.

    Usage with a KV cache (one instance per layer)::

        means = KeyBlockMeans(block_size=512)
        means.append(k_prompt, cu_seqlens=cu_k)        # prefill: packed [T, Hkv, D]
        ...
        means.append(k_step, cu_seqlens=cu_step)       # each decode step: the new keys only
        o = moba_attention(q=q_step, k=k_cache, v=v_cache, cu_seqlens=cu_step, cu_seqlens_k=cu_k_total,
                           block_size=512, topk=3, block_means=means)

    The instance must have seen exactly the keys passed as ``k`` (same sequences, same order). Sums are
    fp32 whatever the key dtype; a sequence's partial last block is kept too (its mean is not used by
    the gate until the block is complete and earlier than the query's own block).
    """

    def __init__(self, block_size: int, n_seq: int = 1) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"KeyBlockMeans: block_size must be a positive int, got {block_size!r}")
        if isinstance(n_seq, bool) or not isinstance(n_seq, int) or n_seq < 1:
            raise ValueError(
                f"KeyBlockMeans: n_seq must be a positive int (sequences in the batch), got {n_seq!r}"
            )
        self.block_size = block_size
        self.n_seq = n_seq
        self._sums: Tensor | None = None  # [N, capacity, Hkv, D] fp32
        self.lengths = torch.zeros(n_seq, dtype=torch.int64)

    @classmethod
    def from_keys(cls, k: Tensor, block_size: int, cu_seqlens: Tensor | None = None) -> KeyBlockMeans:
        """Start from packed keys ``[T, Hkv, D]`` (``cu_seqlens`` as in :func:`moba_attn.moba_attention`)."""
        n = 1 if cu_seqlens is None else cu_seqlens.numel() - 1
        out = cls(block_size, n)
        out.append(k, cu_seqlens)
        return out

    def append(self, k: Tensor, cu_seqlens: Tensor | None = None) -> None:
        """Add packed new keys ``[Tnew, Hkv, D]``; ``cu_seqlens [N + 1]`` splits them per sequence."""
        if k.dim() != 3 or not k.is_floating_point():
            raise ValueError(
                f"KeyBlockMeans.append: k must be floating [Tnew, Hkv, D], got {k.dtype} {tuple(k.shape)}"
            )
        dev = k.device
        if cu_seqlens is None:
            if self.n_seq != 1:
                raise ValueError(
                    f"KeyBlockMeans.append: this instance tracks {self.n_seq} sequences; pass cu_seqlens [N + 1]"
                )
            new = torch.tensor([k.shape[0]], dtype=torch.int64, device=dev)
        else:
            cu = cu_seqlens.to(device=dev, dtype=torch.int64)
            if cu.numel() != self.n_seq + 1 or int(cu[-1]) != k.shape[0] or int(cu[0]) != 0:
                raise ValueError(
                    f"KeyBlockMeans.append: cu_seqlens must be [N + 1] = [{self.n_seq + 1}] cumulative lengths from "
                    f"0 to k.shape[0]={k.shape[0]}; got {cu_seqlens.tolist()}"
                )
            new = cu[1:] - cu[:-1]
        if self._sums is None:
            self._sums = torch.zeros(self.n_seq, 0, k.shape[1], k.shape[2], dtype=torch.float32, device=dev)
        elif self._sums.shape[2:] != k.shape[1:] or self._sums.device != dev:
            raise ValueError(
                f"KeyBlockMeans.append: keys are [*, {k.shape[1]}, {k.shape[2]}] on {dev} but earlier keys were "
                f"[*, {self._sums.shape[2]}, {self._sums.shape[3]}] on {self._sums.device}"
            )
        self.lengths = self.lengths.to(dev)
        total = self.lengths + new
        need = int(((total + self.block_size - 1) // self.block_size).max())
        cap = self._sums.shape[1]
        if need > cap:
            grown = self._sums.new_zeros(self.n_seq, max(need, 2 * cap), *self._sums.shape[2:])
            grown[:, :cap] = self._sums
            self._sums = grown
            cap = grown.shape[1]
        seq = torch.repeat_interleave(torch.arange(self.n_seq, device=dev), new, output_size=k.shape[0])
        starts = torch.cumsum(new, 0) - new
        pos = self.lengths[seq] + torch.arange(k.shape[0], device=dev) - starts[seq]
        row = seq * cap + pos // self.block_size
        self._sums.view(-1, *self._sums.shape[2:]).index_add_(0, row, k.detach().float())
        self.lengths = total

    def means(self) -> Tensor:
        """Packed block means ``[NBLK, Hkv, D]`` fp32: each sequence's ``ceil(len / block_size)`` blocks."""
        if self._sums is None:
            raise ValueError("KeyBlockMeans.means: no keys appended yet")
        bs = self.block_size
        nb = (self.lengths + bs - 1) // bs
        dev = self._sums.device
        seq = torch.repeat_interleave(torch.arange(self.n_seq, device=dev), nb)
        local = torch.arange(seq.numel(), device=dev) - (torch.cumsum(nb, 0) - nb)[seq]
        count = torch.clamp(self.lengths[seq] - local * bs, max=bs).to(torch.float32)
        return self._sums[seq, local] / count[:, None, None]
