"""Logical matrices: how a parameter tensor is seen as one or more matrices for Muon.

Muon orthogonalises matrices, but a parameter is not always one matrix (Moonlight, arXiv 2502.16982,
applies Muon per logical weight matrix):

- a conv weight ``[out, in, kh, kw]`` is the matrix ``[out, in * kh * kw]`` (the scale comes from that shape);
- stacked MoE experts ``[E, A, B]`` are ``E`` independent ``[A, B]`` matrices;
- a fused QKV projection ``[q + k + v, d]`` is three matrices (``split_sizes=(q, k, v)``); stored transposed,
  as GPT-2's ``Conv1D`` ``c_attn`` ``[d, 3 * d]`` is, the split is along the columns (``split_dim=-1``);
- fused MoE experts ``[E, 2 * I, H]`` (transformers' ``gate_up_proj``) are ``2 * E`` matrices ``[I, H]``
  (``layout="batch", split_sizes=(I, I)``);
- an attention projection ``[H * D, d]`` may be orthogonalised per head (``head_dim=D``).

One small frozen dataclass, :class:`MatrixSpec`, declares this per parameter or per param group;
:func:`to_matrix_groups` / :func:`from_matrix_groups` (and the single-shape shortcuts
:func:`to_matrices` / :func:`from_matrices`) map between the tensor and its matrices, exactly (the round
trip is a permutation of elements, no arithmetic). Splits act on the rows (dim -2) of each base matrix,
the output dimension of ``nn.Linear``, or with ``split_dim=-1`` on its columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "MatrixSpec",
    "base_matrix_shape",
    "describe_matrices",
    "from_matrices",
    "from_matrix_groups",
    "logical_shapes",
    "matrix_views",
    "to_matrices",
    "to_matrix_groups",
]

Layout = Literal["auto", "flatten", "batch"]


@dataclass(frozen=True)
class MatrixSpec:
    """How one parameter maps to logical matrices.

    Attributes:
        layout: ``"flatten"`` views ``[d0, d1, ...]`` as one ``[d0, d1 * ...]`` matrix (conv weights);
            ``"batch"`` views ``[*lead, A, B]`` as ``prod(lead)`` matrices ``[A, B]`` (stacked experts);
            ``"auto"`` (default) is one matrix for 2-D, ``"batch"`` for 3-D (``[E, A, B]`` experts) and
            ``"flatten"`` for 4-D and up (Conv2d/Conv3d). A Conv1d weight is 3-D: declare ``"flatten"``
            (``muon_opt.param_groups`` does this for you).
        split_sizes: split each base matrix along ``split_dim`` into chunks of these sizes (fused QKV,
            fused gate/up projections).
        head_dim: split each chunk further into blocks of ``head_dim`` along ``split_dim`` (per-head
            matrices).
        split_dim: ``-2`` (default) splits rows, the output dimension of ``nn.Linear`` weights ``[out, in]``;
            ``-1`` splits columns, for weights stored transposed (``[in, out]``: GPT-2's ``Conv1D``,
            ``x @ W`` code).
    """

    layout: Layout = "auto"
    split_sizes: tuple[int, ...] | None = None
    head_dim: int | None = None
    split_dim: int = -2

    def __post_init__(self) -> None:
        if self.layout not in ("auto", "flatten", "batch"):
            raise ValueError(f"MatrixSpec: layout={self.layout!r} must be 'auto', 'flatten' or 'batch'")
        if self.split_sizes is not None:
            sizes = tuple(self.split_sizes)
            if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
                raise ValueError(f"MatrixSpec: split_sizes={self.split_sizes!r} must be positive ints")
            object.__setattr__(self, "split_sizes", sizes)
        if self.head_dim is not None and (
            isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0
        ):
            raise ValueError(f"MatrixSpec: head_dim={self.head_dim!r} must be a positive int")
        if isinstance(self.split_dim, bool) or self.split_dim not in (-2, -1):
            raise ValueError(
                f"MatrixSpec: split_dim={self.split_dim!r} must be -2 (split the rows of each [A, B] base "
                "matrix) or -1 (split its columns)"
            )


_DEFAULT_SPEC = MatrixSpec()


def _resolved_layout(shape: torch.Size | tuple[int, ...], spec: MatrixSpec) -> str:
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"a {ndim}-D parameter of shape {tuple(shape)} is not a matrix: route it to AdamW "
            "(use_muon=False, or muon_opt.param_groups(model))"
        )
    if spec.layout != "auto":
        return spec.layout
    return "batch" if ndim == 3 else "flatten"


def base_matrix_shape(
    shape: torch.Size | tuple[int, ...], spec: MatrixSpec | None = None
) -> tuple[int, int, int]:
    """``(n, A, B)``: the parameter as ``n`` base matrices ``[A, B]`` before any split."""
    spec = spec or _DEFAULT_SPEC
    shape = tuple(shape)
    if _resolved_layout(shape, spec) == "flatten":
        return 1, shape[0], math.prod(shape[1:])
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _chunks(length: int, spec: MatrixSpec, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(size, matrices_per_base)`` of each chunk of the split axis (rows or columns) of one base matrix."""
    axis = "rows" if spec.split_dim == -2 else "columns"
    sizes = spec.split_sizes or (length,)
    if sum(sizes) != length:
        n, A, B = base_matrix_shape(shape, spec)
        raise ValueError(
            f"MatrixSpec: split_sizes={spec.split_sizes} sum to {sum(sizes)} but the base matrices "
            f"{n} x [{A}, {B}] of the parameter of shape {shape} have {length} {axis} (split_dim={spec.split_dim})"
        )
    chunks = []
    for s in sizes:
        if spec.head_dim is None:
            chunks.append((s, 1))
        elif s % spec.head_dim:
            raise ValueError(
                f"MatrixSpec: head_dim={spec.head_dim} does not divide the chunk of {s} {axis} "
                f"(parameter shape {shape}, split_sizes={spec.split_sizes}, split_dim={spec.split_dim})"
            )
        else:
            chunks.append((spec.head_dim, s // spec.head_dim))
    return chunks


def logical_shapes(
    shape: torch.Size | tuple[int, ...], spec: MatrixSpec | None = None
) -> list[tuple[int, int, int]]:
    """``(count, rows, cols)`` of each group :func:`to_matrix_groups` returns for this shape."""
    spec = spec or _DEFAULT_SPEC
    shape = tuple(shape)
    n, A, B = base_matrix_shape(shape, spec)
    if spec.split_dim == -2:
        return [(n * per_base, r, B) for r, per_base in _chunks(A, spec, shape)]
    return [(n * per_base, A, c) for c, per_base in _chunks(B, spec, shape)]


def describe_matrices(shape: torch.Size | tuple[int, ...], spec: MatrixSpec | None = None) -> str:
    """The logical matrices in a few characters, e.g. ``"3 x [32, 32] (column split 32+32+32)"``.

    Same-shape groups are merged; used by :func:`muon_opt.format_routes`.
    """
    spec = spec or _DEFAULT_SPEC
    merged: dict[tuple[int, int], int] = {}
    for count, r, c in logical_shapes(shape, spec):
        merged[(r, c)] = merged.get((r, c), 0) + count
    text = " + ".join(f"{count} x [{r}, {c}]" for (r, c), count in merged.items())
    notes = []
    if spec.split_sizes is not None:
        axis = "row" if spec.split_dim == -2 else "column"
        notes.append(f"{axis} split {'+'.join(map(str, spec.split_sizes))}")
    if spec.head_dim is not None:
        notes.append(f"head_dim {spec.head_dim}")
    return f"{text} ({', '.join(notes)})" if notes else text


def to_matrix_groups(tensor: Tensor, spec: MatrixSpec | None = None) -> list[Tensor]:
    """The logical matrices of ``tensor`` as a list of ``[n_i, A_i, B_i]`` tensors (one per chunk).

    The inverse is :func:`from_matrix_groups`. Without ``split_sizes`` the list has one entry. Row splits
    return views of ``tensor``; column splits into heads copy.
    """
    spec = spec or _DEFAULT_SPEC
    shape = tuple(tensor.shape)
    n, A, B = base_matrix_shape(shape, spec)
    base = tensor.reshape(n, A, B)
    chunks = _chunks(A if spec.split_dim == -2 else B, spec, shape)
    if len(chunks) == 1 and chunks[0][1] == 1:
        return [base]
    if spec.split_dim == -2:
        pieces = base.split([r * per_base for r, per_base in chunks], dim=1)
        return [p.reshape(n * per_base, r, B) for p, (r, per_base) in zip(pieces, chunks, strict=True)]
    # Columns: [n, A, per_base * c] -> [n, per_base, A, c] keeps the order (base matrix, head) of the row case.
    pieces = base.split([c * per_base for c, per_base in chunks], dim=2)
    return [
        p.reshape(n, A, per_base, c).transpose(1, 2).reshape(n * per_base, A, c)
        for p, (c, per_base) in zip(pieces, chunks, strict=True)
    ]


def matrix_views(tensor: Tensor, spec: MatrixSpec | None = None, *, writable: bool = True) -> list[Tensor]:
    """The logical matrices of ``tensor`` as views ``[n, k, A_i, B_i]``, one per group, never copies.

    ``view.reshape(n * k, A_i, B_i)`` is group ``i`` of :func:`to_matrix_groups` (same elements, same
    order), but writing into a view writes into ``tensor``: the optimizer's fast path reads gradients and
    updates momentum buffers and parameters through these views, so no logical matrix is ever copied out
    and back. A column split is a strided (non-contiguous) view. With ``writable=False`` a tensor that
    cannot be viewed as ``[n, A, B]`` (an unusual stride order) is reshaped, possibly copying: fine for
    reading a gradient. With ``writable=True`` that case raises ``RuntimeError`` (from ``Tensor.view``).
    """
    if (spec is None or spec == _DEFAULT_SPEC) and tensor.ndim == 2:  # the common case, kept cheap
        return [tensor.view(1, 1, *tensor.shape) if writable else tensor.reshape(1, 1, *tensor.shape)]
    spec = spec or _DEFAULT_SPEC
    shape = tuple(tensor.shape)
    n, A, B = base_matrix_shape(shape, spec)
    base = tensor.view(n, A, B) if writable else tensor.reshape(n, A, B)
    chunks = _chunks(A if spec.split_dim == -2 else B, spec, shape)
    views, offset = [], 0
    for size, per_base in chunks:
        width = size * per_base
        if spec.split_dim == -2:
            views.append(base[:, offset : offset + width, :].view(n, per_base, size, B))
        else:
            views.append(base[:, :, offset : offset + width].view(n, A, per_base, size).transpose(1, 2))
        offset += width
    return views


def from_matrix_groups(
    groups: list[Tensor], shape: torch.Size | tuple[int, ...], spec: MatrixSpec | None = None
) -> Tensor:
    """Reassemble a tensor of ``shape`` from the groups :func:`to_matrix_groups` produced."""
    spec = spec or _DEFAULT_SPEC
    shape = tuple(shape)
    n, A, B = base_matrix_shape(shape, spec)
    expected = logical_shapes(shape, spec)
    got = [tuple(g.shape) for g in groups]
    if got != expected:
        raise ValueError(f"from_matrix_groups: groups of shapes {got} do not match {expected} for {shape}")
    if len(groups) == 1 and expected[0][0] == n:
        return groups[0].reshape(shape)
    if spec.split_dim == -2:
        base = torch.cat([g.reshape(n, -1, B) for g in groups], dim=1)
    else:
        base = torch.cat(
            [g.reshape(n, -1, A, g.shape[-1]).transpose(1, 2).reshape(n, A, -1) for g in groups], dim=2
        )
    return base.reshape(shape)


def to_matrices(tensor: Tensor, spec: MatrixSpec | None = None) -> Tensor:
    """The logical matrices of ``tensor`` as one ``[n, A, B]`` tensor.

    Needs all logical matrices to share a shape (true unless ``split_sizes`` are unequal and no
    ``head_dim`` evens them out); otherwise use :func:`to_matrix_groups`.
    """
    groups = to_matrix_groups(tensor, spec)
    if len({tuple(g.shape[1:]) for g in groups}) > 1:
        raise ValueError(
            f"to_matrices: the logical matrices of a {tuple(tensor.shape)} tensor under {spec} have different "
            "shapes; use to_matrix_groups"
        )
    return groups[0] if len(groups) == 1 else torch.cat(groups, dim=0)


def from_matrices(
    matrices: Tensor, shape: torch.Size | tuple[int, ...], spec: MatrixSpec | None = None
) -> Tensor:
    """Inverse of :func:`to_matrices`: ``[n, A, B]`` back to a tensor of ``shape``."""
    counts = [count for count, _, _ in logical_shapes(shape, spec)]
    return from_matrix_groups(list(matrices.split(counts, dim=0)), shape, spec)
