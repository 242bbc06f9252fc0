"""Gaussian embeddings and the contrastive nearest-neighbour loss (ProML Sec. 3.4, after CONTaiNER,
Das et al., ACL 2022).

Each word vector ``h`` maps to a diagonal Gaussian ``N(mu, diag(var))``: ``mu = W_mu relu(h)``,
``var = elu(W_var relu(h)) + 1 + eps`` (positive). :func:`sym_kl` is the symmetric KL divergence
``d(p, q) = (KL(p||q) + KL(q||p)) / 2``, whose log-determinant terms cancel:
``d = 1/4 * sum_k [var_p/var_q + var_q/var_p + (mu_p - mu_q)^2 (1/var_p + 1/var_q) - 2]``.
The model's distance is ``ProMLConfig.kl_scale * (KL + KL)``: the authors' code uses the plain sum
(``kl_scale = 1``), twice this mean.

:func:`sym_kl_reference` broadcasts that formula over all pairs (readable, O(N M D) memory);
:func:`sym_kl` expands the squares into matrix products (O(N M) memory) and is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GaussianHead", "kl_diag", "nca_loss", "sym_kl", "sym_kl_reference"]

VAR_EPS = 1e-6  # keeps 1/var finite in fp32


class GaussianHead(nn.Module):
    """Projects ``(..., hidden)`` word vectors to means and diagonal variances of ``dim`` dimensions."""

    def __init__(self, hidden: int, dim: int = 128) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"GaussianHead: dim={dim} must be >= 1")
        self.mu = nn.Linear(hidden, dim)
        self.var = nn.Linear(hidden, dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu(h)
        return self.mu(x), F.elu(self.var(x)) + 1 + VAR_EPS


def kl_diag(mu_p: Tensor, var_p: Tensor, mu_q: Tensor, var_q: Tensor) -> Tensor:
    """KL(p || q) for diagonal Gaussians, elementwise over leading dims, summed over the last."""
    return 0.5 * (var_p / var_q + (mu_q - mu_p) ** 2 / var_q - 1 + torch.log(var_q) - torch.log(var_p)).sum(
        -1
    )


def sym_kl_reference(mu_a: Tensor, var_a: Tensor, mu_b: Tensor, var_b: Tensor) -> Tensor:
    """(N, M) symmetric KL between every row of ``a`` (N, D) and of ``b`` (M, D), by broadcasting."""
    pa, va = mu_a[:, None, :], var_a[:, None, :]
    pb, vb = mu_b[None, :, :], var_b[None, :, :]
    return 0.5 * (kl_diag(pa, va, pb, vb) + kl_diag(pb, vb, pa, va))


def sym_kl(mu_a: Tensor, var_a: Tensor, mu_b: Tensor, var_b: Tensor) -> Tensor:
    """Same as :func:`sym_kl_reference` with matrix products; clamped at 0 against rounding."""
    ia, ib = 1.0 / var_a, 1.0 / var_b
    d = mu_a.shape[-1]
    ratio = var_a @ ib.T + ia @ var_b.T  # sum_k var_a/var_b + var_b/var_a
    # sum_k (mu_a - mu_b)^2 (ia + ib), expanded
    sq = (
        (mu_a**2 * ia).sum(-1, keepdim=True)
        + (mu_a**2) @ ib.T
        - 2 * (mu_a * ia) @ mu_b.T
        - 2 * mu_a @ (mu_b * ib).T
        + ia @ (mu_b**2).T
        + (mu_b**2 * ib).sum(-1)[None, :]
    )
    return (0.25 * (ratio + sq - 2 * d)).clamp_min(0.0)


def nca_loss(
    dist: Tensor,
    query_labels: Tensor,
    support_labels: Tensor,
    exclude: Tensor | None = None,
    zero_nonfinite: bool = True,
) -> Tensor:
    """Contrastive nearest-neighbour loss over distances ``dist`` (Q, S), in log space.

    For each query token ``i`` with at least one support token of its label:
    ``-log( sum_{j: y_j = y_i} exp(-d_ij) / sum_j exp(-d_ij) )``, computed as a difference of
    ``logsumexp``; the mean is over those tokens. ``exclude`` (Q, S) bool drops pairs (a token and itself
    in test-time fine-tuning). Returns 0 (with a graph) when no query token has a positive.
    ``zero_nonfinite`` sets a token's term to 0 when it is not finite (an infinite distance), as the
    authors' code does; in log space that is the only way a term can be non-finite.
    """
    logits = -dist
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    pos = query_labels[:, None] == support_labels[None, :]
    if exclude is not None:
        pos = pos & ~exclude
    has_pos = pos.any(1)
    if not bool(has_pos.any()):
        return dist.sum() * 0.0
    logits, pos = logits[has_pos], pos[has_pos]
    num = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), dim=1)
    den = torch.logsumexp(logits, dim=1)
    per_token = den - num
    if zero_nonfinite:
        per_token = torch.where(torch.isfinite(per_token), per_token, torch.zeros_like(per_token))
    return per_token.mean()
