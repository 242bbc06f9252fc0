"""Tiny models shared by the optimizer tests: every kind of parameter the router has to place."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from muon_opt import MatrixSpec


class TinyGPT(nn.Module):
    """Embedding + tied head, a fused-QKV attention, an MLP with same-shape matrices, norms, biases, a
    Conv1d and stacked 'experts' (a 3-D parameter)."""

    def __init__(self, vocab: int = 37, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.wte = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.fc3 = nn.Linear(d, 2 * d)  # same shape as fc1: stacked with it in one Newton-Schulz call
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.experts = nn.Parameter(torch.randn(3, d, d) / d**0.5)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    @staticmethod
    def specs() -> dict[str, MatrixSpec]:
        return {"qkv.weight": MatrixSpec(split_sizes=(16, 16, 16), head_dim=8)}

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        x = self.wte(idx)
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, -1))
        h = self.ln2(x)
        x = x + self.fc2(torch.relu(self.fc1(h)) * torch.sigmoid(self.fc3(h)))
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = x + torch.einsum("btd,edf->btf", x, self.experts) / 3
        return self.lm_head(x)


def lm_loss(model: nn.Module, idx: Tensor) -> Tensor:
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), idx[:, 1:].reshape(-1))
