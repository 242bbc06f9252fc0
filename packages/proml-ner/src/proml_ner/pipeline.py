"""``ProMLNer``: few-shot NER on your own label set, with a reusable support index.

    ner = ProMLNer.from_pretrained("my-model")                      # config.json + safetensors + tokenizer
    index = ner.support(examples)                                   # encode a handful of labelled sentences once
    ner.predict(["Ada Lovelace visited Zanzibar."], support=index)  # spans with character offsets

Support examples can be :class:`~proml_ner.formats.Sentence` objects, ``{"words": [...], "tags": [...]}``
(IO or BIO tags), ``{"text": "...", "spans": [{"start", "end", "label"}]}`` (character offsets), or
CoNLL text (one ``word tag`` per line, blank line between sentences). With ``labels`` and no support the
model falls back to zero-shot matching against the label words' vectors in the option-prefix prompt,
which is far weaker than a 5-sentence support (see the README).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .encoder import encode_sentences
from .formats import Sentence, detect_scheme, to_io
from .metrics import entity_spans
from .model import ProML, estimate_shots
from .prompts import get_schema
from .words import split_words

__all__ = ["ProMLNer", "SupportIndex"]

SupportLike = Any  # Sentence | dict | str (CoNLL text)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _autocast(dtype: torch.dtype | str | None, device: torch.device, where: str):
    """Mixed-precision context for the encoder forward passes (``None``/float32: plain fp32).

    Only the encoder runs in reduced precision: word vectors come back as float32 before any distance is
    taken, because squared Euclidean distances between nearby vectors cancel badly in 16 bits.
    """
    if dtype is None:
        return contextlib.nullcontext()
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"{where}: dtype={dtype!r} must be one of {sorted(_DTYPES)} or a torch dtype")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{where}: dtype={dtype} must be torch.float32, torch.float16 or torch.bfloat16")
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(
            f"{where}: dtype=float16 needs a CUDA device but the model is on {device.type}; use "
            "dtype='bfloat16' on CPU, or load the model with ProMLNer.from_pretrained(dir, device='cuda')"
        )
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class SupportIndex:
    """Encoded support words: fused vectors (S, H), class ids (S,) with 0 = O, the types and K."""

    types: list[str]
    vectors: Tensor
    labels: Tensor
    shots: int

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"types": json.dumps(self.types), "shots": str(self.shots), "format": "proml-ner-index/1"}
        save_file({"vectors": self.vectors.cpu().contiguous(), "labels": self.labels.cpu()}, str(path), meta)

    @classmethod
    def load(cls, path: str | Path) -> SupportIndex:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "proml-ner-index/1":
                raise ValueError(f"SupportIndex.load: {path} is not a proml-ner support index")
            return cls(
                json.loads(meta["types"]), f.get_tensor("vectors"), f.get_tensor("labels"), int(meta["shots"])
            )


def _tags_to_io(tags: Sequence[str], where: str) -> list[str]:
    if not all(isinstance(t, str) for t in tags):
        raise ValueError(f"{where}: tags must be strings")
    prefixed = [t for t in tags if t != "O" and len(t) > 2 and t[1] == "-"]
    bare = [t for t in tags if t != "O" and not (len(t) > 2 and t[1] == "-")]
    if prefixed and bare:
        raise ValueError(
            f"{where}: tags mix prefixed ({prefixed[0]!r}) and bare ({bare[0]!r}) labels; use IO or BIO"
        )
    scheme = detect_scheme([tags])
    if prefixed and scheme == "IOBES":
        raise ValueError(f"{where}: tags must be IO or BIO, got IOBES-like tag {prefixed[0]!r}")
    if prefixed and any(t[0] not in "BI" for t in prefixed):
        raise ValueError(f"{where}: tag prefixes must be B- or I-")
    return to_io(tags)


def _to_sentence(ex: SupportLike, i: int) -> list[Sentence]:
    where = f"support example {i}"
    if isinstance(ex, Sentence):
        return [ex]
    if isinstance(ex, str):
        out, words, tags = [], [], []
        for lineno, line in enumerate([*ex.splitlines(), ""], start=1):
            if not line.strip():
                if words:
                    out.append(Sentence(words, _tags_to_io(tags, f"{where} (CoNLL line {lineno})")))
                words, tags = [], []
                continue
            cols = line.split()
            if len(cols) < 2:
                raise ValueError(f"{where}: CoNLL line {lineno} needs 'word tag', got {line!r}")
            words.append(cols[0])
            tags.append(cols[-1])
        return out
    if isinstance(ex, dict) and "words" in ex:
        words, tags = list(ex["words"]), list(ex.get("tags", ex.get("labels", [])))
        if len(words) != len(tags):
            raise ValueError(f"{where}: 'words' ({len(words)}) and 'tags' ({len(tags)}) differ in length")
        return [Sentence([str(w) for w in words], _tags_to_io(tags, where))]
    if isinstance(ex, dict) and "text" in ex:
        text = ex["text"]
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'text' must be a string")
        toks = split_words(text)
        labels = ["O"] * len(toks)
        for sp in ex.get("spans", []):
            s, e, lab = int(sp["start"]), int(sp["end"]), str(sp["label"])
            if not 0 <= s < e <= len(text):
                raise ValueError(f"{where}: span {sp} lies outside the text ({len(text)} characters)")
            hit = [j for j, (_, a, b) in enumerate(toks) if a < e and b > s]
            if not hit:
                raise ValueError(f"{where}: span {sp} covers no word")
            first, last = toks[hit[0]], toks[hit[-1]]
            if first[1] < s or last[2] > e:
                raise ValueError(
                    f"{where}: span {sp} ({text[s:e]!r}) cuts into a word: the words it touches run "
                    f"from {first[1]} to {last[2]} ({text[first[1] : last[2]]!r}); give word boundaries"
                )
            for j in hit:
                labels[j] = lab
        return [Sentence([w for w, _, _ in toks], labels)]
    raise ValueError(
        f"{where}: expected a Sentence, {{'words', 'tags'}}, {{'text', 'spans'}} or CoNLL text; "
        f"got {type(ex).__name__}"
    )


# predict()'s span merging (measured, README "predict() out of the box"): on raw text with a 10-sentence,
# 6-type WNUT-17 support it raised span F1 (0.125 -> 0.145 test, 0.177 -> 0.196 dev) and found 2.5x as many
# multi-word names whole; on 2-way episodes it cost 0.10 F1 trained, so the model's episode decoding
# (ProMLConfig.span_merge) stays off.
PREDICT_SPAN_MERGE = 0.5


class ProMLNer:
    """Inference front-end around a trained :class:`~proml_ner.model.ProML`.

    ``span_merge``: the span merging :meth:`predict` applies (:func:`~proml_ner.decoding.merge_spans`;
    0 turns it off, None takes the model config's ``span_merge``, which episode evaluation uses).
    """

    def __init__(self, model: ProML, span_merge: float | None = PREDICT_SPAN_MERGE) -> None:
        if span_merge is not None and not 0.0 <= span_merge <= 1.0:
            raise ValueError(f"ProMLNer: span_merge={span_merge} must be in [0, 1] (0: off) or None")
        self.model = model.eval()
        self.span_merge = span_merge

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        span_merge: float | None = PREDICT_SPAN_MERGE,
    ) -> ProMLNer:
        return cls(ProML.from_pretrained(directory, device=device), span_merge=span_merge)

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)

    # ------------------------------------------------------------------------------------ support
    @torch.no_grad()
    def support(
        self,
        examples: Sequence[SupportLike] | str,
        labels: Sequence[str] | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> SupportIndex:
        """Encode labelled examples once; the index is reusable across ``predict`` calls and saveable.

        ``dtype`` (``"bfloat16"``, ``"float16"`` on CUDA only, or None for float32) runs the encoder under
        autocast; the stored vectors are float32 either way.
        """
        amp = _autocast(dtype, self.model.device, "support")
        if isinstance(examples, str):
            examples = [examples]
        sents = [s for i, ex in enumerate(examples) for s in _to_sentence(ex, i)]
        if not sents:
            raise ValueError(
                "support: no examples given; pass labelled sentences, or labels= alone for zero-shot"
            )
        found = sorted({t for s in sents for t in s.types})
        if not found:
            raise ValueError("support: the examples contain no entity; label at least one word per type")
        if labels is not None:
            labels = self._check_labels(labels)
            missing = sorted(set(found) - set(labels))
            if missing:
                raise ValueError(f"support: labels {missing} occur in the support but not in labels={labels}")
            absent = sorted(set(labels) - set(found))
            if absent:
                raise ValueError(f"support: labels {absent} have no example in the support; add one each")
        types = list(labels) if labels is not None else found
        ctx = self.model.prompt_context(types)
        with amp:
            vecs, labs = self.model._support_tensors(sents, types, ctx)
        return SupportIndex(types, vecs.float(), labs, estimate_shots(sents, types))

    @staticmethod
    def _check_labels(labels: Sequence[str]) -> list[str]:
        if isinstance(labels, str):
            raise ValueError(
                f"labels must be a list of type names, got the string {labels!r}; pass [{labels!r}]"
            )
        if not all(isinstance(x, str) and x and x != "O" for x in labels):
            raise ValueError(f"labels must be a list of non-empty type names other than 'O', got {labels!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels has duplicates: {labels}")
        return list(labels)

    # ------------------------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict(
        self,
        texts: Sequence[str] | str,
        support: SupportIndex | Sequence[SupportLike] | None = None,
        labels: Sequence[str] | None = None,
        return_tags: bool = False,
        zero_shot_threshold: float = 0.5,
        dtype: torch.dtype | str | None = None,
        threshold: float = 0.0,
    ) -> list[list[dict]] | tuple[list[list[dict]], list[list[str]]]:
        """Entities per text: ``{"start", "end", "text", "label", "score"}`` with character offsets.

        ``support`` is an index from :meth:`support` (fast: nothing to re-encode) or raw examples. With
        ``labels`` and no support, zero-shot matching against label words (cosine above
        ``zero_shot_threshold``). ``score`` is the mean over the span's words of the probability of its
        type, ``softmax(class scores / tau)`` with ``tau`` the support's typical neighbour distance (so it
        falls as a word moves away from the type's support words); spans scoring below ``threshold``
        are dropped (their words become ``O`` in the returned tags). ``return_tags`` adds per-word IO tags. ``dtype`` (``"bfloat16"``, or
        ``"float16"`` on CUDA) runs the encoder under autocast; distances are taken in float32.
        """
        amp = _autocast(dtype, self.model.device, "predict")
        single = isinstance(texts, str)
        if not single and not isinstance(texts, Sequence):
            raise TypeError(f"predict: texts must be a str or a list of str, got {type(texts).__name__}")
        texts = [texts] if single else list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"predict: texts[{i}] is {type(t).__name__}, expected str")
        if support is None and labels is None:
            raise ValueError("predict: give support= (an index or examples) or labels= for zero-shot")
        words = [split_words(t) for t in texts]
        if support is None:
            types = self._check_labels(labels)
            tags, probs = self._zero_shot(words, types, zero_shot_threshold, amp)
        else:
            index = support if isinstance(support, SupportIndex) else self.support(support, labels, dtype)
            if labels is not None and isinstance(support, SupportIndex):
                labels = self._check_labels(labels)
                unknown = sorted(set(labels) - set(index.types))
                if unknown:
                    raise ValueError(
                        f"predict: labels {unknown} are not in the support index (it holds {index.types}); "
                        "build a new index with ner.support(examples, labels=...) that has examples of them"
                    )
                extra = sorted(set(index.types) - set(labels))
                if extra:
                    raise ValueError(
                        f"predict: the support index has labels {extra} missing from labels={labels}"
                    )
            types = index.types
            with amp:
                reps = self.model.represent([[w for w, _, _ in ws] for ws in words], types)
            reps = [r.float() for r in reps]
            k, fraction = self.model.neighbour_rule(index.shots)
            dev = self.model.device
            paths, probs = self.model.decode(
                reps,
                index.vectors.to(dev),
                index.labels.to(dev),
                len(types),
                k,
                k_fraction=fraction,
                span_merge=self.span_merge,
            )
            names = ["O", *types]
            tags = [[names[c] for c in p] for p in paths]
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"predict: threshold={threshold} must be in [0, 1] (a span's mean probability)")
        results = []
        for text, ws, tg, pr in zip(texts, words, tags, probs):
            ents = []
            for a, b, lab in entity_spans(tg):
                c = types.index(lab) + 1
                if float(pr[a:b, c].mean()) < threshold:
                    tg[a:b] = ["O"] * (b - a)
                    continue
                start, end = ws[a][1], ws[b - 1][2]
                ents.append(
                    {
                        "start": start,
                        "end": end,
                        "text": text[start:end],
                        "label": lab,
                        "score": float(pr[a:b, c].mean()),
                    }
                )
            results.append(ents)
        if return_tags:
            return results, tags
        return results

    def _zero_shot(self, words, types: list[str], threshold: float, amp=None):
        with amp or contextlib.nullcontext():
            hidden, reps = self._zero_shot_vectors(words, types)
        return self._zero_shot_decode(hidden, reps, types, threshold)

    def _zero_shot_vectors(self, words, types: list[str]):
        m = self.model
        ctx = m.prompt_context(types)
        # label embeddings: mean of the label-word vectors inside the option-prefix prompt
        schema = get_schema("option_prefix")
        prompted = schema.build([], None, ctx)
        ids = torch.tensor([prompted.input_ids], device=m.device)
        hidden = m.encoder(ids, torch.ones_like(ids))[0]
        pos, emb = 1, {}
        for j, t in enumerate(ctx.order):
            n = len(ctx.label_ids[t])
            emb[t] = hidden[pos : pos + n].mean(0)
            pos += n + (len(ctx.comma_ids) if j < len(ctx.order) - 1 else 0)
        E = torch.nn.functional.normalize(torch.stack([emb[t] for t in types]), dim=-1)
        reps = encode_sentences(
            m.encoder,
            m.tokenizer,
            [[w for w, _, _ in ws] for ws in words],
            schema,
            ctx,
            max_length=m.config.max_length,
            overlap=m.config.window_overlap,
        )
        return E.float(), [r.float() for r in reps]

    @staticmethod
    def _zero_shot_decode(E: Tensor, reps: list[Tensor], types: list[str], threshold: float):
        tags, probs = [], []
        for r in reps:
            if r.shape[0] == 0:
                tags.append([])
                probs.append(r.new_zeros((0, len(types) + 1)))
                continue
            sim = torch.nn.functional.normalize(r, dim=-1) @ E.T  # (W, N)
            best, arg = sim.max(-1)
            tags.append([types[a] if b > threshold else "O" for a, b in zip(arg.tolist(), best.tolist())])
            p = torch.cat([torch.full_like(sim[:, :1], threshold), sim], dim=-1).clamp_min(0)
            probs.append(p)
        return tags, probs
