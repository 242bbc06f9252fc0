"""Logical matrices: round trips, shapes, and that each logical matrix is orthogonalised on its own."""

from __future__ import annotations

import pytest
import torch
from close import assert_close, seeded

from muon_opt import (
    MatrixSpec,
    Muon,
    describe_matrices,
    from_matrices,
    from_matrix_groups,
    logical_shapes,
    newton_schulz,
    newton_schulz_reference,
    to_matrices,
    to_matrix_groups,
    update_scale,
)

CASES = [
    ((12, 7), None, [(1, 12, 7)]),
    ((8, 3, 3, 3), None, [(1, 8, 27)]),  # conv2d: [out, in*kh*kw]
    ((4, 2, 3, 2, 2), None, [(1, 4, 24)]),  # conv3d
    ((5, 6, 7), None, [(5, 6, 7)]),  # stacked experts
    ((16, 4, 3), MatrixSpec(layout="flatten"), [(1, 16, 12)]),  # conv1d, declared
    ((2, 3, 6, 7), MatrixSpec(layout="batch"), [(6, 6, 7)]),
    ((24, 10), MatrixSpec(split_sizes=(16, 4, 4)), [(1, 16, 10), (1, 4, 10), (1, 4, 10)]),  # GQA fused QKV
    ((24, 10), MatrixSpec(head_dim=4), [(6, 4, 10)]),  # per head
    ((24, 10), MatrixSpec(split_sizes=(8, 8, 8), head_dim=4), [(2, 4, 10)] * 3),  # QKV then heads
    ((3, 24, 10), MatrixSpec(split_sizes=(16, 8), head_dim=8), [(6, 8, 10), (3, 8, 10)]),
    # column splits: weights stored [in, out] (GPT-2 Conv1D c_attn [d, 3d], x @ W code)
    ((12, 36), MatrixSpec(split_sizes=(12, 12, 12), split_dim=-1), [(1, 12, 12)] * 3),
    ((10, 24), MatrixSpec(split_sizes=(16, 4, 4), split_dim=-1), [(1, 10, 16), (1, 10, 4), (1, 10, 4)]),
    ((10, 24), MatrixSpec(head_dim=4, split_dim=-1), [(6, 10, 4)]),
    ((10, 24), MatrixSpec(split_sizes=(8, 8, 8), head_dim=4, split_dim=-1), [(2, 10, 4)] * 3),
    ((3, 10, 24), MatrixSpec(split_sizes=(16, 8), head_dim=8, split_dim=-1), [(6, 10, 8), (3, 10, 8)]),
    # fused MoE gate/up: [E, 2I, H] (transformers) and transposed [E, H, 2I], per expert and projection
    ((4, 14, 5), MatrixSpec(layout="batch", split_sizes=(7, 7)), [(4, 7, 5), (4, 7, 5)]),
    ((4, 5, 14), MatrixSpec(layout="batch", split_sizes=(7, 7), split_dim=-1), [(4, 5, 7), (4, 5, 7)]),
    ((6, 2, 3, 3), MatrixSpec(split_sizes=(9, 9), split_dim=-1), [(1, 6, 9), (1, 6, 9)]),  # conv, flattened
]


@pytest.mark.parametrize(("shape", "spec", "expected"), CASES, ids=[str(c[0]) + str(c[1]) for c in CASES])
def test_round_trip_and_shapes(shape, spec, expected) -> None:
    t = torch.randn(shape, generator=seeded(0))
    groups = to_matrix_groups(t, spec)
    assert [tuple(g.shape) for g in groups] == expected == logical_shapes(shape, spec)
    assert torch.equal(from_matrix_groups(groups, shape, spec), t)
    if len({e[1:] for e in expected}) == 1:
        mats = to_matrices(t, spec)
        assert mats.shape[0] == sum(e[0] for e in expected)
        assert torch.equal(from_matrices(mats, shape, spec), t)
    else:
        with pytest.raises(ValueError, match="to_matrix_groups"):
            to_matrices(t, spec)


def test_experts_orthogonalised_one_by_one() -> None:
    w = torch.randn(4, 12, 20, generator=seeded(1), dtype=torch.float64)
    out = from_matrices(newton_schulz(to_matrices(w)), w.shape)
    for e in range(4):
        assert_close(out[e], newton_schulz(w[e]), atol=1e-13, what=f"expert {e}")


def test_heads_are_row_blocks() -> None:
    w = torch.randn(12, 5, generator=seeded(2))
    mats = to_matrices(w, MatrixSpec(split_sizes=(8, 4), head_dim=4))
    assert torch.equal(mats[0], w[0:4]) and torch.equal(mats[1], w[4:8]) and torch.equal(mats[2], w[8:12])


def test_columns_are_column_blocks() -> None:
    """GPT-2's c_attn: x @ W[:, :d] is q; the logical matrices are W's column blocks, heads in order."""
    w = torch.randn(5, 12, generator=seeded(3), dtype=torch.float64)
    mats = to_matrices(w, MatrixSpec(split_sizes=(8, 4), head_dim=4, split_dim=-1))
    for i in range(3):
        assert torch.equal(mats[i], w[:, 4 * i : 4 * i + 4]), i
    x = torch.randn(7, 5, generator=seeded(4), dtype=torch.float64)
    q, k, v = to_matrix_groups(w, MatrixSpec(split_sizes=(4, 4, 4), split_dim=-1))
    assert_close(torch.cat([x @ q[0], x @ k[0], x @ v[0]], dim=-1), x @ w, atol=1e-13, what="x @ [q k v]")


def test_experts_gate_up_are_per_expert_then_per_projection() -> None:
    """transformers' experts: gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)."""
    E, I, H = 3, 4, 5
    w = torch.randn(E, 2 * I, H, generator=seeded(5), dtype=torch.float64)
    gate, up = to_matrix_groups(w, MatrixSpec(layout="batch", split_sizes=(I, I)))
    x = torch.randn(6, H, generator=seeded(6), dtype=torch.float64)
    for e in range(E):
        g, u = torch.nn.functional.linear(x, w[e]).chunk(2, dim=-1)
        assert_close(g, x @ gate[e].T, atol=1e-13, what=f"gate {e}")
        assert_close(u, x @ up[e].T, atol=1e-13, what=f"up {e}")


def test_column_split_through_the_optimizer() -> None:
    """Each column block is orthogonalised on its own, with its own [A, c] scale, on both paths."""
    w0 = torch.randn(10, 24, generator=seeded(7), dtype=torch.float64)
    g = torch.randn(10, 24, generator=seeded(8), dtype=torch.float64)
    spec = MatrixSpec(split_sizes=(16, 8), split_dim=-1)
    results = []
    for foreach in (True, False):
        p = torch.nn.Parameter(w0.clone())
        p.grad = g.clone()
        Muon([{"params": [p], "matrix_spec": spec}], lr=1.0, weight_decay=0.0, foreach=foreach).step()
        results.append(w0 - p.detach())
    u = g + 0.95 * g  # Nesterov on a zero buffer
    expected = torch.cat(
        [
            newton_schulz_reference(u[:, :16]) * update_scale(10, 16),
            newton_schulz_reference(u[:, 16:]) * update_scale(10, 8),
        ],
        dim=1,
    )
    for got, path in zip(results, ("foreach", "reference"), strict=True):
        assert_close(got, expected, atol=1e-10, what=path)


def test_describe_matrices() -> None:
    assert describe_matrices((12, 36), MatrixSpec(split_sizes=(12, 12, 12), split_dim=-1)) == (
        "3 x [12, 12] (column split 12+12+12)"
    )
    assert describe_matrices((4, 14, 5), MatrixSpec(layout="batch", split_sizes=(7, 7))) == (
        "8 x [7, 5] (row split 7+7)"
    )
    assert describe_matrices((8, 3, 3, 3)) == "1 x [8, 27]"
    assert describe_matrices((24, 10), MatrixSpec(split_sizes=(16, 8), head_dim=8)) == (
        "3 x [8, 10] (row split 16+8, head_dim 8)"
    )


@pytest.mark.parametrize(
    ("shape", "spec", "match"),
    [
        ((5,), None, "not a matrix"),
        ((12, 5), MatrixSpec(split_sizes=(4, 4)), "sum to 8"),
        ((12, 5), MatrixSpec(head_dim=5), "does not divide"),
        ((12, 5), MatrixSpec(split_sizes=(2, 2), split_dim=-1), r"have 5 columns \(split_dim=-1\)"),
        ((12, 6), MatrixSpec(head_dim=4, split_dim=-1), "chunk of 6 columns"),
        ((4, 14, 5), MatrixSpec(layout="batch", split_sizes=(7, 8)), r"4 x \[14, 5\].*have 14 rows"),
    ],
)
def test_errors(shape, spec, match) -> None:
    with pytest.raises(ValueError, match=match):
        to_matrix_groups(torch.zeros(shape), spec)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layout": "rows"},
        {"split_sizes": (4, 0)},
        {"split_sizes": ()},
        {"head_dim": 0},
        {"head_dim": 2.5},
        {"split_dim": 0},
        {"split_dim": 1},
        {"split_dim": True},
        {"split_dim": "cols"},
    ],
)
def test_spec_validates(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="MatrixSpec"):
        MatrixSpec(**kwargs)
