"""Multi-prompt fusion (ProML, Sec. 3.3): a masked weighted average of the schemas' word vectors.

Support words: ``lambda * option_prefix + (1 - lambda) * label_aware``; query words: option-prefix only
(label-aware needs gold labels). The mask drops a schema where it is absent (the query side) or ablated,
and the weights of the schemas left are renormalised, so the average is always a convex combination.
``lambda`` is fixed (the paper's grid 0.3 / 0.5 / 0.7) or learned (a sigmoid-squashed scalar).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["MultiPromptFusion", "masked_weighted_average"]


def masked_weighted_average(reps: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
    """``sum_s w_s m_s r_s / sum_s w_s m_s`` over schemas ``s``.

    reps: (S, N, H) vectors per schema and word; weights: (S,) non-negative; mask: (S, N) in {0, 1}.
    Every word needs at least one schema present (else the result is undefined and we raise).
    """
    wm = weights[:, None] * mask.to(reps.dtype)  # (S, N)
    denom = wm.sum(0)
    if bool((denom <= 0).any()):
        raise ValueError("masked_weighted_average: some word has no schema present (all masked or weight 0)")
    return (wm[..., None] * reps).sum(0) / denom[:, None]


class MultiPromptFusion(nn.Module):
    """Fuses ``option_prefix`` and ``label_aware`` word vectors; either can be ablated."""

    def __init__(self, fusion_lambda: float = 0.5, learn_lambda: bool = False) -> None:
        super().__init__()
        if not 0.0 <= fusion_lambda <= 1.0:
            raise ValueError(f"MultiPromptFusion: fusion_lambda={fusion_lambda} must be in [0, 1]")
        self.learn_lambda = learn_lambda
        if learn_lambda:
            p = min(max(fusion_lambda, 1e-4), 1 - 1e-4)
            self.lambda_logit = nn.Parameter(torch.tensor(float(torch.logit(torch.tensor(p)))))
        else:
            self.register_buffer("lambda_fixed", torch.tensor(float(fusion_lambda)))

    @property
    def fusion_lambda(self) -> Tensor:
        return torch.sigmoid(self.lambda_logit) if self.learn_lambda else self.lambda_fixed

    def forward(self, reps: Mapping[str, Tensor], enabled: Sequence[str]) -> Tensor:
        """reps: schema name -> (N, H); schemas not in ``reps`` or not ``enabled`` are masked out."""
        names = [n for n in ("option_prefix", "label_aware") if n in reps and n in enabled]
        others = [n for n in reps if n not in ("option_prefix", "label_aware") and n in enabled]
        names += others
        if not names:
            raise ValueError(f"MultiPromptFusion: none of {sorted(reps)} is enabled ({list(enabled)})")
        lam = self.fusion_lambda
        w = []
        for n in names:
            if n == "option_prefix":
                w.append(lam)
            elif n == "label_aware":
                w.append(1 - lam)
            else:
                w.append(torch.ones_like(lam))
        stacked = torch.stack([reps[n] for n in names], 0)
        mask = torch.ones(stacked.shape[:2], device=stacked.device)
        return masked_weighted_average(stacked, torch.stack(w).to(stacked.dtype), mask)
