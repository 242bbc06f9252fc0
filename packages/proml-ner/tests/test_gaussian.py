"""Symmetric KL (closed form, fast vs reference, forward and gradients) and the NCA loss."""

from __future__ import annotations

import math

import pytest
import torch

from proml_ner.gaussian import GaussianHead, kl_diag, nca_loss, sym_kl, sym_kl_reference


def _gauss(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, d, generator=g, dtype=dtype)
    var = torch.rand(n, d, generator=g, dtype=dtype) * 2 + 0.1
    return mu, var


def assert_close(a, b, dtype, what):
    err = (a - b).abs().max().item()
    rel = err / max(b.abs().max().item(), 1e-30)
    tol = 200 * torch.finfo(dtype).eps
    assert rel <= tol, f"{what}: abs err {err:.3e}, rel err {rel:.3e} > {tol:.1e}"


def test_kl_diag_matches_torch_distributions():
    mu_p, var_p = _gauss(5, 7, torch.float64, 0)
    mu_q, var_q = _gauss(5, 7, torch.float64, 1)
    p = torch.distributions.Normal(mu_p, var_p.sqrt())
    q = torch.distributions.Normal(mu_q, var_q.sqrt())
    ref = torch.distributions.kl_divergence(p, q).sum(-1)
    torch.testing.assert_close(kl_diag(mu_p, var_p, mu_q, var_q), ref)


def test_sym_kl_properties():
    mu, var = _gauss(6, 16, torch.float64, 2)
    d = sym_kl_reference(mu, var, mu, var)
    assert d.diagonal().abs().max() < 1e-12  # zero on itself
    torch.testing.assert_close(d, d.T)  # symmetric
    assert (d >= 0).all()  # non-negative
    assert (d + torch.eye(6, dtype=d.dtype) > 0).all()  # positive between distinct Gaussians


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("n", "m", "d"), [(1, 1, 1), (7, 5, 3), (13, 31, 128)], ids=lambda x: str(x))
def test_sym_kl_fast_matches_reference(n, m, d, dtype):
    mu_a, var_a = _gauss(n, d, dtype, 3)
    mu_b, var_b = _gauss(m, d, dtype, 4)
    leaves = [t.clone().requires_grad_() for t in (mu_a, var_a, mu_b, var_b)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    fast = sym_kl(*leaves)
    ref = sym_kl_reference(*leaves64)
    assert_close(fast.detach().double(), ref.detach(), dtype, "forward")
    w = torch.randn(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (fast * w.to(dtype)).sum().backward()
    (ref * w).sum().backward()
    for name, a, b in zip(["mu_a", "var_a", "mu_b", "var_b"], leaves, leaves64):
        assert_close(a.grad.double(), b.grad, dtype, f"grad {name}")


def test_nca_loss_hand_computed():
    # one query word of class 1; support distances 1 (class 1), 2 (class 0), 3 (class 1)
    dist = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    loss = nca_loss(dist, torch.tensor([1]), torch.tensor([1, 0, 1]))
    num = math.exp(-1) + math.exp(-3)
    den = num + math.exp(-2)
    assert loss.item() == pytest.approx(-math.log(num / den), rel=1e-12)
    # a query word whose class is absent from the support is skipped; the mean runs over the rest
    dist2 = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    loss2 = nca_loss(dist2, torch.tensor([1, 7]), torch.tensor([1, 0, 1]))
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    # excluding the pair (0, 0) leaves one positive at distance 3
    ex = torch.tensor([[True, False, False]])
    loss3 = nca_loss(dist, torch.tensor([1]), torch.tensor([1, 0, 1]), exclude=ex)
    assert loss3.item() == pytest.approx(-math.log(math.exp(-3) / (math.exp(-3) + math.exp(-2))))


def test_nca_loss_stable_for_large_distances():
    dist = torch.tensor([[1000.0, 1001.0, 5000.0]], requires_grad=True)
    loss = nca_loss(dist, torch.tensor([0]), torch.tensor([0, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(dist.grad).all()
    # fp32 logits near 1000 carry ~6e-5 absolute rounding each: tolerance from the dtype, not luck
    tol = 4 * 1000 * torch.finfo(torch.float32).eps
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=tol)


def test_gaussian_head_variance_positive():
    head = GaussianHead(16, 8)
    mu, var = head(torch.randn(4, 16) * 100)
    assert mu.shape == var.shape == (4, 8) and (var > 0).all()
    with pytest.raises(ValueError, match="dim=0"):
        GaussianHead(16, 0)
