"""Logical matrices: round trips, shapes, and that each logical matrix is orthogonalised on its own."""

from __future__ import annotations

import pytest
import torch
from close import assert_close, seeded

from muon_opt import (
    MatrixSpec,
    from_matrices,
    from_matrix_groups,
    logical_shapes,
    newton_schulz,
    to_matrices,
    to_matrix_groups,
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


@pytest.mark.parametrize(
    ("shape", "spec", "match"),
    [
        ((5,), None, "not a matrix"),
        ((12, 5), MatrixSpec(split_sizes=(4, 4)), "sum to 8"),
        ((12, 5), MatrixSpec(head_dim=5), "does not divide"),
    ],
)
def test_errors(shape, spec, match) -> None:
    with pytest.raises(ValueError, match=match):
        to_matrix_groups(torch.zeros(shape), spec)


@pytest.mark.parametrize(
    "kwargs",
    [{"layout": "rows"}, {"split_sizes": (4, 0)}, {"split_sizes": ()}, {"head_dim": 0}, {"head_dim": 2.5}],
)
def test_spec_validates(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="MatrixSpec"):
        MatrixSpec(**kwargs)
