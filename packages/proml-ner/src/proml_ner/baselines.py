"""Baselines of the Few-NERD benchmark (Ding et al. 2021, Sec. 5.2), on the same encoder as ProML.

* ``proto`` -- ProtoBERT (Snell et al. 2017 on BERT): plain encoder, no prompts, each class is the mean of
  its support word vectors, a query word goes to the nearest prototype (squared Euclidean).
* ``nnshot`` -- NNShot (Yang & Katiyar 2020): the nearest support word decides.

Both train episodically with cross-entropy over negative distances, as in Few-NERD's code, and read the
same word vectors as ProML (mean of the last four layers, first word piece).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decoding import class_scores, squared_euclidean
from .encoder import TokenEncoder, encode_sentences
from .formats import Episode, Sentence
from .prompts import PromptContext, get_schema

__all__ = ["BaselineConfig", "PrototypeNer"]


@dataclass
class BaselineConfig:
    encoder: str = "bert-base-uncased"
    method: str = "proto"
    hidden_layers: int = 4
    max_length: int = 128
    window_overlap: int = 16
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in ("proto", "nnshot"):
            raise ValueError(f"BaselineConfig: method={self.method!r} must be 'proto' or 'nnshot'")


class PrototypeNer(nn.Module):
    """ProtoBERT (``method='proto'``) or NNShot (``method='nnshot'``)."""

    def __init__(self, config: BaselineConfig, encoder_model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.encoder = TokenEncoder(encoder_model, config.hidden_layers)

    @classmethod
    def from_encoder(cls, encoder: str, method: str = "proto", **kw) -> PrototypeNer:
        from transformers import AutoModel, AutoTokenizer

        cfg = BaselineConfig(encoder=encoder, method=method, **kw)
        return cls(cfg, AutoModel.from_pretrained(encoder), AutoTokenizer.from_pretrained(encoder))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def represent(self, words: Sequence[Sequence[str]]) -> list[Tensor]:
        ctx = PromptContext.build(self.tokenizer, [], {})
        return encode_sentences(
            self.encoder,
            self.tokenizer,
            words,
            get_schema("plain"),
            ctx,
            max_length=self.config.max_length,
            overlap=self.config.window_overlap,
            batch_size=self.config.batch_size,
        )

    def _labels(self, sents: Sequence[Sentence], types: Sequence[str]) -> Tensor:
        index = {t: i + 1 for i, t in enumerate(types)}
        return torch.tensor([index.get(x, 0) for s in sents for x in s.labels], device=self.device)

    def logits(self, query: Tensor, support: Tensor, support_labels: Tensor, n_classes: int) -> Tensor:
        dist = squared_euclidean(query, support)
        if self.config.method == "nnshot":
            return class_scores(dist, support_labels, n_classes, k=1)
        protos = []
        for c in range(n_classes):
            m = support_labels == c
            protos.append(support[m].mean(0) if bool(m.any()) else torch.full_like(support[0], float("nan")))
        d = squared_euclidean(query, torch.stack(protos))
        return (-d).nan_to_num(nan=float("-inf"))

    def episode_loss(self, episode: Episode) -> Tensor:
        types = list(episode.types)
        s = torch.cat(self.represent([x.words for x in episode.support]), 0)
        q = torch.cat(self.represent([x.words for x in episode.query]), 0)
        s_lab, q_lab = self._labels(episode.support, types), self._labels(episode.query, types)
        logits = self.logits(q, s, s_lab, len(types) + 1)
        keep = torch.isfinite(logits.gather(1, q_lab[:, None]).squeeze(1))
        logits = logits.clamp_min(-1e4)  # absent classes: finite, so cross-entropy stays finite
        return F.cross_entropy(logits[keep], q_lab[keep]) if bool(keep.any()) else logits.sum() * 0.0

    @torch.no_grad()
    def predict_episode(self, episode: Episode) -> list[list[str]]:
        types = list(episode.types)
        s = torch.cat(self.represent([x.words for x in episode.support]), 0)
        s_lab = self._labels(episode.support, types)
        names = ["O", *types]
        out = []
        for q in self.represent([x.words for x in episode.query]):
            if q.shape[0] == 0:
                out.append([])
                continue
            out.append([names[c] for c in self.logits(q, s, s_lab, len(names)).argmax(-1).tolist()])
        return out
