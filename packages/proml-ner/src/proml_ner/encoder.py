"""Word vectors from any BERT-family encoder (``transformers.AutoModel``), through a prompt schema.

Token representation as in ProML (Sec. 3.1, following Das et al. 2022): the mean of the last four hidden
layers, read at each word's first word piece. The hidden size comes from the encoder's config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .prompts import PromptContext, PromptSchema, plan_windows

__all__ = ["TokenEncoder", "encode_sentences", "word_pieces"]


class TokenEncoder(nn.Module):
    """Wraps a ``transformers`` encoder; ``forward`` gives the mean of its last ``layers`` hidden states."""

    def __init__(self, model: nn.Module, layers: int = 4) -> None:
        super().__init__()
        n = getattr(model.config, "num_hidden_layers", None)
        if layers < 1 or (n is not None and layers > n):
            raise ValueError(f"TokenEncoder: layers={layers} must be in [1, num_hidden_layers={n}]")
        self.model = model
        self.layers = layers
        self.hidden_size: int = int(model.config.hidden_size)
        self.max_positions: int = int(getattr(model.config, "max_position_embeddings", 512))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-self.layers :]
        return torch.stack(hidden, dim=0).mean(dim=0)  # (B, T, H)


def word_pieces(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Word-piece ids of each word; a word the tokenizer drops entirely becomes ``[UNK]``."""
    if not words:
        return []
    ids = tokenizer(list(words), add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
    return [x if x else [unk] for x in ids]


def encode_sentences(
    encoder: TokenEncoder,
    tokenizer,
    words: Sequence[Sequence[str]],
    schema: PromptSchema,
    ctx: PromptContext,
    labels: Sequence[Sequence[str]] | None = None,
    max_length: int = 128,
    overlap: int = 16,
    batch_size: int = 32,
    pieces: Sequence[list[list[int]]] | None = None,
) -> list[Tensor]:
    """One ``(n_words, H)`` tensor per sentence, each word read at its first piece in its own window.

    Long sentences are split into windows of words before the prompt is added, so the prompt is intact
    in every window; a word takes its vector from the window that owns it.
    """
    if schema.needs_labels and labels is None:
        raise ValueError(f"encode_sentences: schema {schema.name!r} needs gold labels")
    max_length = min(max_length, encoder.max_positions)
    budget = max_length - schema.overhead(ctx)
    jobs: list[tuple[int, int, int, list[int], list[int]]] = []  # (sentence, own_start, offset, ids, pos)
    for si, sent in enumerate(words):
        wp = pieces[si] if pieces is not None else word_pieces(tokenizer, sent)
        labs = labels[si] if labels is not None else None
        extra = schema.inline_cost(labs, ctx) if labs is not None else [0] * len(wp)
        costs = [len(p) + e for p, e in zip(wp, extra)]
        for w in plan_windows(costs, budget, overlap):
            cut = [p[: max(1, budget - extra[w.start + j])] for j, p in enumerate(wp[w.start : w.end])]
            pr = schema.build(cut, labs[w.start : w.end] if labs is not None else None, ctx)
            own = list(range(w.own_start - w.start, w.own_end - w.start))
            jobs.append((si, w.own_start, w.start, pr.input_ids[:max_length], [pr.positions[j] for j in own]))
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    outs: list[list[tuple[int, Tensor]]] = [[] for _ in words]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][3]))  # similar lengths share a batch
    for b in range(0, len(order), batch_size):
        chunk = [jobs[j] for j in order[b : b + batch_size]]
        length = max(len(c[3]) for c in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for r, c in enumerate(chunk):
            ids[r, : len(c[3])] = torch.tensor(c[3])
            mask[r, : len(c[3])] = 1
        hidden = encoder(ids.to(device), mask.to(device))
        for r, (si, own_start, _, _, pos) in enumerate(chunk):
            idx = torch.tensor(pos, dtype=torch.long, device=device)
            outs[si].append((own_start, hidden[r].index_select(0, idx)))
    result = []
    for si, parts in enumerate(outs):
        parts.sort(key=lambda x: x[0])
        if parts:
            result.append(torch.cat([p for _, p in parts], dim=0))
        else:
            result.append(torch.zeros((0, encoder.hidden_size), device=device, dtype=dtype))
        assert result[-1].shape[0] == len(words[si]), (result[-1].shape, len(words[si]))
    return result
