"""ProML: prompt-based metric learning for few-shot NER (Chen, Zheng, Yang, Findings of ACL 2023).

Support words are encoded under the option-prefix and the label-aware prompts and fused
(:mod:`proml_ner.fusion`); query words under the option-prefix prompt alone. Training maps words to
Gaussians and minimises the contrastive nearest-neighbour loss over symmetric KL between query and support
words (:mod:`proml_ner.gaussian`). Inference scores each class by the mean distance to its ``k`` closest
support words, in the space the loss trains (``inference_space="gaussian"``, symmetric KL) or in the fused
encoder space (the paper's Sec. 3.5), optionally followed by StructShot Viterbi. Which space, ``k`` and
``lambda`` are the defaults was measured on WNUT-17 (``benchmarks/wnut17.py``; README).

Saved models are folders of ``config.json`` + ``model.safetensors`` + tokenizer files (no pickles).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from .decoding import (
    AbstractTransitions,
    class_scores,
    merge_spans,
    neighbour_scale,
    squared_euclidean,
    viterbi_decode,
)
from .encoder import TokenEncoder, encode_sentences, word_pieces
from .formats import Episode, Sentence
from .fusion import MultiPromptFusion
from .gaussian import GaussianHead, nca_loss, sym_kl
from .metrics import entity_spans
from .prompts import SCHEMAS, PromptContext, get_schema
from .verbalizer import Verbalizer

__all__ = ["EpisodeViews", "ProML", "ProMLConfig", "estimate_shots"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ProMLConfig:
    """Hyper-parameters of ProML; defaults follow the paper (Sec. 4.2) where it gives them.

    encoder: name or local path for ``AutoModel``/``AutoTokenizer`` (recorded; saved models carry the
        encoder's own config so they load offline). embedding_dim: Gaussian dimension (128).
    schemas: enabled prompt schemas (ablation switch): any of ``option_prefix``, ``label_aware``.
    fusion_lambda: support weight of the option-prefix vectors (paper grid 0.3/0.5/0.7); learn_lambda
        learns it instead. hidden_layers: last layers averaged (4). max_length: encoder tokens per window,
        prompt included; window_overlap: words shared by consecutive windows.
    inference_space: ``encoder`` (fused encoder vectors, squared Euclidean; the paper's Sec. 3.5) or
        ``gaussian`` (symmetric KL between the head's Gaussians: the distance the loss trains).
    top_k / k_fraction: how many support words score a class. ``top_k`` an int: that many nearest
        words of every class; ``"shots"``: the support's K (the paper's choice); None: each class takes
        ``k_fraction`` of its own support words (at least 1; None too: the support's K). A fixed k lets
        the ``O`` class, ten times larger than any entity class in a few-shot support, win on its extreme
        neighbours (:func:`~proml_ner.decoding.class_scores`). Defaults measured on WNUT-17 (README, "Does
        training help?" and "predict() out of the box"): the nearest half of each class.
    kl_scale: the distance is ``kl_scale * (KL(p||q) + KL(q||p))``; 1.0 is the authors' code (KL + KL),
        0.5 the symmetric mean this package used before 0.1 (a 2x softmax temperature in the loss).
    prefix_outside: also list ``O`` (label words ``outside_words``) in the option prefix, as the authors'
        code does; off by default (measured: see the README's differences from the authors).
    span_merge: grow predicted entities over adjacent words whose probability of the entity's type is
        at least ``span_merge`` times their probability of O (:func:`~proml_ner.decoding.merge_spans`);
        0 turns it off.
    viterbi / viterbi_weight: StructShot decoding and its transition scale; emissions are the
        log-softmax of class scores divided by the support's typical neighbour distance, so the
        transitions weigh the same in either space.
    label_words: type -> label words overriding the default verbaliser.
    """

    encoder: str = "bert-base-uncased"
    embedding_dim: int = 128
    schemas: tuple[str, ...] = ("option_prefix", "label_aware")
    fusion_lambda: float = 0.5
    learn_lambda: bool = False
    hidden_layers: int = 4
    max_length: int = 128
    window_overlap: int = 16
    inference_space: str = "encoder"
    top_k: int | str | None = None
    k_fraction: float | None = 0.5
    kl_scale: float = 1.0
    prefix_outside: bool = False
    outside_words: str = "none"
    viterbi: bool = False
    viterbi_weight: float = 1.0
    span_merge: float = 0.0
    label_words: dict[str, str] = field(default_factory=dict)
    batch_size: int = 32

    def __post_init__(self) -> None:
        self.schemas = tuple(self.schemas)
        bad = [s for s in self.schemas if s not in ("option_prefix", "label_aware")]
        if bad or not self.schemas:
            raise ValueError(
                f"ProMLConfig: schemas={self.schemas} must be a non-empty subset of "
                f"('option_prefix', 'label_aware'); registered schemas: {sorted(SCHEMAS)}"
            )
        if not 0.0 <= self.fusion_lambda <= 1.0:
            raise ValueError(f"ProMLConfig: fusion_lambda={self.fusion_lambda} must be in [0, 1]")
        if self.embedding_dim < 1 or self.hidden_layers < 1 or self.batch_size < 1:
            raise ValueError("ProMLConfig: embedding_dim, hidden_layers and batch_size must be >= 1")
        if self.max_length < 8:
            raise ValueError(f"ProMLConfig: max_length={self.max_length} must be >= 8")
        if self.window_overlap < 0:
            raise ValueError(f"ProMLConfig: window_overlap={self.window_overlap} must be >= 0")
        if self.inference_space not in ("encoder", "gaussian"):
            raise ValueError(
                f"ProMLConfig: inference_space={self.inference_space!r}: 'encoder' or 'gaussian'"
            )
        if not 0.0 <= self.span_merge <= 1.0:
            raise ValueError(f"ProMLConfig: span_merge={self.span_merge} must be in [0, 1] (0: off)")
        if not self.kl_scale > 0:
            raise ValueError(f"ProMLConfig: kl_scale={self.kl_scale} must be > 0 (1.0: the authors' KL + KL)")
        if self.top_k is not None and self.top_k != "shots":
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                raise ValueError(
                    f"ProMLConfig: top_k={self.top_k!r} must be an int >= 1, 'shots' or None (k_fraction)"
                )
        if self.k_fraction is not None and not 0.0 < self.k_fraction <= 1.0:
            raise ValueError(f"ProMLConfig: k_fraction={self.k_fraction} must be None or in (0, 1]")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schemas"] = list(self.schemas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ProMLConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ProMLConfig: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "k_fraction" not in d and d.get("top_k") is None:
            d["k_fraction"] = None  # a file from before k_fraction: top_k None meant the support's K
        return cls(**d)


@dataclass
class EpisodeViews:
    """An episode encoded once: support word vectors per prompt schema (S, H), their class ids (0 = O),
    the query's option-prefix word vectors (one (n, H) tensor per sentence) and the support's K."""

    types: list[str]
    support: dict[str, Tensor]
    support_labels: Tensor
    query: list[Tensor]
    shots: int


def estimate_shots(support: Sequence[Sentence], types: Sequence[str]) -> int:
    """K of a support set: the fewest entities any type has (greedy K~2K sampling gives >= K)."""
    counts = Counter(t for s in support for _, _, t in entity_spans(s.labels))
    present = [counts[t] for t in types if counts[t] > 0]
    return max(1, min(present)) if present else 1


class ProML(nn.Module):
    """The ProML model around any ``transformers`` encoder (hidden size read from its config)."""

    def __init__(self, config: ProMLConfig, encoder_model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.encoder = TokenEncoder(encoder_model, config.hidden_layers)
        self.head = GaussianHead(self.encoder.hidden_size, config.embedding_dim)
        self.fusion = MultiPromptFusion(config.fusion_lambda, config.learn_lambda)
        self.verbalizer = Verbalizer(config.label_words)
        self.transitions = AbstractTransitions()

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_encoder(cls, encoder: str, config: ProMLConfig | None = None, **overrides) -> ProML:
        """A fresh ProML on a pretrained encoder (name or local folder; offline if it is local)."""
        from transformers import AutoModel, AutoTokenizer

        cfg = config or ProMLConfig(encoder=encoder, **overrides)
        if config is not None and overrides:
            cfg = ProMLConfig.from_dict({**config.to_dict(), **overrides, "encoder": encoder})
        return cls(cfg, AutoModel.from_pretrained(encoder), AutoTokenizer.from_pretrained(encoder))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prompt_context(self, types: Sequence[str]) -> PromptContext:
        outside = self.config.outside_words if self.config.prefix_outside else None
        return PromptContext.build(self.tokenizer, types, self.verbalizer.words(types), outside)

    # ------------------------------------------------------------------------------------ encoding
    def _encode(self, words, schema: str, ctx, labels=None, pieces=None) -> list[Tensor]:
        return encode_sentences(
            self.encoder,
            self.tokenizer,
            words,
            get_schema(schema),
            ctx,
            labels=labels,
            max_length=self.config.max_length,
            overlap=self.config.window_overlap,
            batch_size=self.config.batch_size,
            pieces=pieces,
        )

    def represent(
        self,
        words: Sequence[Sequence[str]],
        types: Sequence[str],
        labels: Sequence[Sequence[str]] | None = None,
        ctx: PromptContext | None = None,
    ) -> list[Tensor]:
        """Fused word vectors, one ``(n_words, H)`` tensor per sentence.

        With ``labels`` (support side) the enabled schemas are fused; without (query side) only the
        option-prefix prompt is used (``plain`` when it is ablated): no gold label reaches a query.
        """
        ctx = ctx or self.prompt_context(types)
        pieces = [word_pieces(self.tokenizer, w) for w in words]
        enabled = self.config.schemas
        if labels is None:
            schema = "option_prefix" if "option_prefix" in enabled else "plain"
            return self._encode(words, schema, ctx, pieces=pieces)
        per_schema = {s: self._encode(words, s, ctx, labels=labels, pieces=pieces) for s in enabled}
        return [self.fusion({s: per_schema[s][i] for s in enabled}, enabled) for i in range(len(words))]

    def _support_tensors(
        self, support: Sequence[Sentence], types: Sequence[str], ctx
    ) -> tuple[Tensor, Tensor]:
        reps = self.represent([s.words for s in support], types, [s.labels for s in support], ctx)
        index = {t: i + 1 for i, t in enumerate(types)}
        labels = torch.tensor([index.get(lab, 0) for s in support for lab in s.labels], device=self.device)
        return torch.cat(reps, 0), labels

    # ------------------------------------------------------------------------------------ training
    def kl_distance(self, query: Tensor, support: Tensor) -> Tensor:
        """(Q, S) ``kl_scale * (KL + KL)`` between the head's Gaussians of two sets of word vectors."""
        q_mu, q_var = self.head(query)
        s_mu, s_var = self.head(support)
        # sym_kl is the mean (KL + KL) / 2; the authors' distance is the sum
        return (2.0 * self.config.kl_scale) * sym_kl(q_mu, q_var, s_mu, s_var)

    def episode_loss(self, episode: Episode) -> Tensor:
        """NCA loss over symmetric KL between Gaussian query and support words (Sec. 3.4)."""
        types = list(episode.types)
        ctx = self.prompt_context(types)
        s_rep, s_lab = self._support_tensors(episode.support, types, ctx)
        q_reps = self.represent([s.words for s in episode.query], types, None, ctx)
        index = {t: i + 1 for i, t in enumerate(types)}
        q_lab = torch.tensor([index.get(x, 0) for s in episode.query for x in s.labels], device=self.device)
        return nca_loss(self.kl_distance(torch.cat(q_reps, 0), s_rep), q_lab, s_lab)

    def support_loss(self, support: Sequence[Sentence], types: Sequence[str]) -> Tensor:
        """Test-time fine-tuning loss: support words (option-prefix view) against the fused support,
        each word excluded from its own neighbours."""
        ctx = self.prompt_context(types)
        s_rep, s_lab = self._support_tensors(support, types, ctx)
        q_rep = torch.cat(self.represent([s.words for s in support], types, None, ctx), 0)
        eye = torch.eye(len(s_lab), dtype=torch.bool, device=self.device)
        return nca_loss(self.kl_distance(q_rep, s_rep), s_lab, s_lab, exclude=eye)

    # ------------------------------------------------------------------------------------ inference
    def distances(self, query: Tensor, support: Tensor, space: str | None = None) -> Tensor:
        """(Q, S) distances in ``space`` (default: ``config.inference_space``)."""
        space = space or self.config.inference_space
        if space == "encoder":
            return squared_euclidean(query, support)
        if space == "gaussian":
            return self.kl_distance(query, support)
        raise ValueError(f"ProML.distances: space={space!r} must be 'encoder' or 'gaussian'")

    def neighbour_rule(
        self, shots: int, top_k: int | str | None = None, k_fraction: float | None = None
    ) -> tuple[int, float | None]:
        """``(k, fraction)`` for :func:`~proml_ner.decoding.class_scores`: ``k_fraction`` if given, else
        ``top_k`` if given (an int, or ``"shots"`` for the support's K), else the config's rule."""
        if k_fraction is not None:
            return 1, k_fraction
        if top_k is None:
            top_k, k_fraction = self.config.top_k, self.config.k_fraction
            if top_k is None and k_fraction is not None:
                return 1, k_fraction
        if top_k is None or top_k == "shots":
            return shots, None
        return int(top_k), None

    def decode(
        self,
        query_reps: Sequence[Tensor],
        support_reps: Tensor,
        support_labels: Tensor,
        n_types: int,
        k: int,
        space: str | None = None,
        viterbi: bool | None = None,
        k_fraction: float | None = None,
        span_merge: float | None = None,
    ) -> tuple[list[list[int]], list[Tensor]]:
        """Class ids (0 = O) and per-class probabilities for each query sentence; a class is scored by
        its ``k`` nearest support words, or by ``k_fraction`` of them (:meth:`neighbour_rule` resolves
        the config's choice), then ``span_merge`` (None: the config's) grows the entities.

        Probabilities are ``softmax(scores / tau)`` with ``tau`` the support's typical neighbour distance
        (:func:`~proml_ner.decoding.neighbour_scale`): scale-free, so they vary with how close a word is
        to each class instead of saturating at 1, and StructShot's transitions weigh the same in both
        spaces. The argmax path does not depend on ``tau``.
        """
        space = space or self.config.inference_space
        viterbi = self.config.viterbi if viterbi is None else viterbi
        merge = self.config.span_merge if span_merge is None else span_merge
        paths, probs = [], []
        log_t, log_s = self.transitions.matrix(n_types)
        tau = neighbour_scale(self.distances(support_reps, support_reps, space))
        for q in query_reps:
            if q.shape[0] == 0:
                paths.append([])
                probs.append(q.new_zeros((0, n_types + 1)))
                continue
            dist = self.distances(q, support_reps, space)
            scores = class_scores(dist, support_labels, n_types + 1, k, fraction=k_fraction)
            logp = torch.log_softmax(scores.float() / tau, dim=-1)
            probs.append(logp.exp())
            if viterbi:
                path = viterbi_decode(logp, log_t, log_s, self.config.viterbi_weight)
            else:
                path = logp.argmax(-1).tolist()
            paths.append(merge_spans(path, probs[-1], merge))
        return paths, probs

    @torch.no_grad()
    def episode_views(self, episode: Episode) -> EpisodeViews:
        """Everything inference needs from an episode, encoded once (see :meth:`predict_views`)."""
        types = list(episode.types)
        ctx = self.prompt_context(types)
        words = [s.words for s in episode.support]
        labels = [s.labels for s in episode.support]
        pieces = [word_pieces(self.tokenizer, w) for w in words]
        per_schema = {
            sch: torch.cat(self._encode(words, sch, ctx, labels=labels, pieces=pieces), 0)
            for sch in self.config.schemas
        }
        index = {t: i + 1 for i, t in enumerate(types)}
        s_lab = torch.tensor([index.get(x, 0) for s in episode.support for x in s.labels], device=self.device)
        query = self.represent([s.words for s in episode.query], types, None, ctx)
        return EpisodeViews(types, per_schema, s_lab, query, estimate_shots(episode.support, types))

    @torch.no_grad()
    def predict_views(
        self,
        views: EpisodeViews,
        space: str | None = None,
        top_k: int | str | None = None,
        fusion_lambda: float | None = None,
        viterbi: bool | None = None,
        k_fraction: float | None = None,
        span_merge: float | None = None,
    ) -> list[list[str]]:
        """IO labels of the query under one inference setting; None takes the config's value,
        ``top_k="shots"`` the support's K (the paper's choice), ``k_fraction`` a per-class k (it wins over
        ``top_k``; see :meth:`neighbour_rule`). Lets a benchmark compare spaces, ``k``, ``lambda`` and
        decoders on the same encoded episode."""
        sup = views.support
        if fusion_lambda is None or len(sup) < 2:
            support = self.fusion(sup, self.config.schemas)
        else:
            if not 0.0 <= fusion_lambda <= 1.0:
                raise ValueError(f"predict_views: fusion_lambda={fusion_lambda} must be in [0, 1]")
            support = fusion_lambda * sup["option_prefix"] + (1 - fusion_lambda) * sup["label_aware"]
        k, fraction = self.neighbour_rule(views.shots, top_k, k_fraction)
        paths, _ = self.decode(
            views.query,
            support,
            views.support_labels,
            len(views.types),
            k,
            space,
            viterbi,
            fraction,
            span_merge,
        )
        names = ["O", *views.types]
        return [[names[c] for c in p] for p in paths]

    @torch.no_grad()
    def predict_episode(self, episode: Episode) -> list[list[str]]:
        """IO labels for every query sentence of ``episode``."""
        return self.predict_views(self.episode_views(episode))

    # ------------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` (ProML + encoder config) + ``model.safetensors`` + tokenizer files."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "proml": self.config.to_dict(),
            "encoder_config": self.encoder.model.config.to_dict(),
            "transitions": asdict(self.transitions),
            "format": "proml-ner/1",
        }
        (d / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(str(d))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> ProML:
        """Load a folder written by :meth:`save_pretrained`; needs no network."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        d = Path(directory)
        if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"ProML.from_pretrained: {d} needs {CONFIG_NAME} and {WEIGHTS_NAME} (written by save_pretrained)"
            )
        meta = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
        if meta.get("format") != "proml-ner/1":
            raise ValueError(f"ProML.from_pretrained: {d / CONFIG_NAME} is not a proml-ner model folder")
        enc_cfg = dict(meta["encoder_config"])
        enc = AutoModel.from_config(AutoConfig.for_model(**enc_cfg))
        model = cls(ProMLConfig.from_dict(meta["proml"]), enc, AutoTokenizer.from_pretrained(str(d)))
        model.transitions = AbstractTransitions(**meta.get("transitions", {}))
        state = load_file(str(d / WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        # position_ids-style buffers may differ across transformers versions; real weights may not.
        real_missing = [k for k in missing if not k.endswith("position_ids")]
        if real_missing or unexpected:
            raise ValueError(
                f"ProML.from_pretrained: weights do not match the config (missing {real_missing[:5]}, "
                f"unexpected {list(unexpected)[:5]})"
            )
        return model.to(device).eval()
