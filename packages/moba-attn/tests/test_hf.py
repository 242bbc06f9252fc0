"""The transformers drop-in (moba_attn.hf) on tiny random Llama, Qwen2 and Mistral models.

No downloads: every model is built from a config with random weights. The spec, from issue 4:
with ``topk * block_size >= context`` MoBA is full attention, so logits (and gradients) equal SDPA's;
with sparse settings, a KV-cache ``generate()`` equals no-cache recomputation, a padded batch equals
its sequences run one by one, packed sequences equal separate runs, and ``save_pretrained`` keeps the
MoBA config. Sliding-window layers (Mistral, Qwen2, Gemma3; Gemma2 stops earlier at its softcapping)
work while the window covers the context and raise one clear error, in a forward and in
``generate()`` with either cache, as soon as it does not.
"""

from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import moba_attn  # noqa: E402
from moba_attn.hf import (  # noqa: E402
    MoBAAttention,
    MoBAConfig,
    get_moba_config,
    register_moba,
    set_moba_config,
    use_moba,
)
from moba_attn.hf_cache import MoBACache, MoBACacheLayer  # noqa: E402
from moba_attn.reference import moba_attention_reference  # noqa: E402

VOCAB = 97
FAMILIES = ("llama", "qwen2", "mistral")
# fp32 through a 2-layer model: differences come from summation order only (dense MoBA merges
# per-block partial softmaxes), a few ulps of the O(1) logits times the depth.
ATOL = 1e-4 * 4
RTOL = 1e-4


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = RTOL, what=""
):
    err = (actual.float() - expected.float()).abs()
    rel = err.max() / expected.float().abs().max().clamp_min(1e-12)
    assert torch.allclose(actual.float(), expected.float(), atol=atol, rtol=rtol), (
        f"{what}: max abs err {err.max().item():.3e}, rel err {rel.item():.3e} (atol={atol}, rtol={rtol})"
    )


def tiny_model(family: str, attn: str = "sdpa", seed: int = 0, window: int | None = None, **overrides):
    """A 2-layer random model; ``window`` gives it sliding-window layers the way each family does.

    Mistral: every layer; Qwen2: ``use_sliding_window`` with ``max_window_layers=1`` (layer 1 slides);
    Gemma3 (text) and Gemma2: ``layer_types`` (layer 0 slides, layer 1 is global).
    """
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    gemma = dict(head_dim=8, query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"])
    if family == "llama":
        cfg = LlamaConfig(**common)
    elif family == "qwen2":
        cfg = Qwen2Config(
            **common, use_sliding_window=window is not None, sliding_window=window, max_window_layers=1
        )
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=window)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**common, **gemma, sliding_window=window)
    elif family == "gemma2":
        cfg = Gemma2Config(**common, **gemma, sliding_window=window)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


@pytest.fixture(autouse=True, scope="module")
def _register():
    register_moba()


def as_moba(model, config: MoBAConfig):
    set_moba_config(model, config)
    use_moba(model, True)
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


# --- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), "block_size"),
        (dict(topk=0), "topk"),
        (dict(backend="cuda"), "backend"),
        (dict(full_attention_layers=3), "full_attention_layers"),
        (dict(full_attention_layers=(1.5,)), "full_attention_layers"),
        (dict(sink_blocks=-1), "sink_blocks"),
        (dict(topk=2, sink_blocks=2), "sink_blocks=2 needs topk >= 3"),
    ],
)
def test_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoBAConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = MoBAConfig(block_size=64, topk=4, full_attention_layers=[-1, 0], backend="torch", sink_blocks=1)
    assert cfg.full_attention_layers == (-1, 0)
    assert MoBAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        MoBAConfig.from_dict({"block_size": 4, "top_k": 2})
    assert cfg.is_full_layer(3, 4) and cfg.is_full_layer(0, 4) and not cfg.is_full_layer(1, 4)


def test_package_exports_hf_names():
    for name in (
        "MoBAAttention",
        "MoBAConfig",
        "register_moba",
        "set_moba_config",
        "get_moba_config",
        "use_moba",
    ):
        assert getattr(moba_attn, name) is getattr(moba_attn.hf, name)
    assert moba_attn.MoBACache is MoBACache


# --- the attention function itself -------------------------------------------------------------------


class _Module(torch.nn.Module):
    def __init__(self, layer_idx: int, config=None, is_causal: bool = True):
        super().__init__()
        self.layer_idx, self.is_causal = layer_idx, is_causal
        if config is not None:
            self.config = config


def test_attention_function_matches_op_and_layout():
    """[B, H, S, D] in, [B, S, Hq, D] out; GQA K/V go to the op with Hkv heads; scaling is passed on."""
    torch.manual_seed(0)
    b, hq, hkv, s, d = 2, 4, 2, 19, 8
    q, k, v = torch.randn(b, hq, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    fn = MoBAAttention(MoBAConfig(block_size=4, topk=2))
    out, weights = fn(_Module(0), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (b, s, hq, d)
    for i in range(b):
        ref = moba_attn.moba_attention(
            q=q[i].transpose(0, 1),
            k=k[i].transpose(0, 1),
            v=v[i].transpose(0, 1),
            block_size=4,
            topk=2,
            scale=0.3,
        )
        assert_close(out[i], ref, atol=1e-5, rtol=1e-5, what=f"batch {i}")


def test_full_attention_layers_route_to_sdpa():
    torch.manual_seed(0)
    b, hq, hkv, s, d = 2, 4, 1, 23, 8
    q, k, v = torch.randn(b, hq, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, :5] = False  # left padding on the second sequence
    fn = MoBAAttention(MoBAConfig(block_size=4, topk=1, full_attention_layers=(-1,)))
    cfg = transformers.PretrainedConfig(num_hidden_layers=3)
    full, _ = fn(_Module(2, cfg), q, k, v, mask, scaling=0.25)
    sparse, _ = fn(_Module(0, cfg), q, k, v, mask, scaling=0.25)
    for i, start in enumerate((0, 5)):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[i : i + 1, :, start:],
            k[i : i + 1, :, start:],
            v[i : i + 1, :, start:],
            is_causal=True,
            scale=0.25,
            enable_gqa=True,
        )
        assert_close(
            full[i, start:], ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5, what=f"full layer seq {i}"
        )
    assert (full[1, :5] == 0).all() and (sparse[1, :5] == 0).all()
    assert not torch.allclose(sparse, full, atol=1e-3)  # topk=1 really is sparse here


def test_errors_are_clear():
    q = torch.randn(1, 2, 8, 4)
    fn = MoBAAttention(MoBAConfig(block_size=4, topk=1))
    with pytest.raises(ValueError, match="not causal"):
        fn(_Module(0, is_causal=False), q, q, q, None)
    with pytest.raises(ValueError, match="softcap"):
        fn(_Module(0), q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match="sliding_window"):
        fn(_Module(0), q, q, q, None, sliding_window=4)
    with pytest.raises(ValueError, match="dropout"):
        fn(_Module(0), q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="2D padding mask"):
        fn(_Module(0), q, q, q, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    out, _ = fn(_Module(0), q, q, q, None, sliding_window=8)  # a window covering every key changes nothing
    assert out.shape == (1, 8, 2, 4)


# --- whole models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_settings_equal_sdpa_logits_and_grads(family):
    """topk * block_size >= context: MoBA is exactly full causal attention (forward and backward)."""
    x = tokens(2, 24)
    ref_model = tiny_model(family, "sdpa").train()
    moba_model = as_moba(tiny_model(family, "sdpa"), MoBAConfig(block_size=4, topk=6)).train()
    assert moba_model.config._attn_implementation == "moba"
    ref = ref_model(x, labels=x)
    out = moba_model(x, labels=x)
    assert_close(out.logits, ref.logits, what=f"{family} logits")
    ref.loss.backward()
    out.loss.backward()
    for (name, p_ref), (_, p) in zip(ref_model.named_parameters(), moba_model.named_parameters()):
        assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-3, what=f"{family} grad {name}")


@pytest.mark.parametrize("cache", ["dynamic", "moba", "auto"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_generate_with_cache_equals_recompute(family, cache):
    """Decode with a KV cache (sparse decode path) gives the logits a no-cache forward gives.

    ``dynamic``: transformers' DynamicCache passed explicitly (block means recomputed each step);
    ``moba``: a MoBACache passed in (running block means); ``auto``: no cache passed, and generate()
    builds a MoBACache by itself for a model on attn_implementation="moba".
    """
    model = as_moba(tiny_model(family), MoBAConfig(block_size=4, topk=2))
    prompt = tokens(1, 11)
    dense_logits = tiny_model(family)(prompt).logits
    sparse_logits = model(prompt).logits
    assert not torch.allclose(dense_logits, sparse_logits, atol=1e-3)  # the settings are really sparse
    past = {"moba": MoBACache(config=model.config), "dynamic": DynamicCache(config=model.config)}.get(cache)
    gen = model.generate(
        prompt,
        max_new_tokens=14,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        past_key_values=past,
    )
    assert type(gen.past_key_values) is (DynamicCache if cache == "dynamic" else MoBACache)
    if cache == "auto":
        past = gen.past_key_values
    if cache != "dynamic":
        for layer in past.layers:
            assert isinstance(layer, MoBACacheLayer) and layer.block_means is not None
            assert layer.means_seen == 11 + 13  # the last generated token is never fed back
    seq = gen.sequences
    assert seq.shape[1] == 11 + 14
    with torch.no_grad():
        full = model(seq, use_cache=False).logits
    for step, step_logits in enumerate(gen.logits):
        assert_close(step_logits[0], full[0, 10 + step], what=f"{family} step {step}")
        assert int(seq[0, 11 + step]) == int(full[0, 10 + step].argmax())


@pytest.mark.parametrize("cache", ["dynamic", "moba"])
def test_sink_blocks_in_model_generate_and_reference(cache):
    """sink_blocks reaches the op: differs from plain MoBA, equals the reference rule, decodes exactly."""
    plain = as_moba(tiny_model("llama"), MoBAConfig(block_size=4, topk=3))
    model = as_moba(tiny_model("llama"), MoBAConfig(block_size=4, topk=3, sink_blocks=1))
    prompt = tokens(1, 13)
    with torch.no_grad():
        assert not torch.allclose(plain(prompt).logits, model(prompt).logits, atol=1e-4)
    fn = MoBAAttention(MoBAConfig(block_size=4, topk=3, sink_blocks=1))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    v = torch.randn(1, 2, 20, 8, generator=g)
    out, _ = fn(_Module(0), q, k, v, None)
    want = moba_attention_reference(
        q=q[0].transpose(0, 1), k=k[0].transpose(0, 1), v=v[0].transpose(0, 1), block_size=4, topk=3,
        sink_blocks=1,
    )  # fmt: skip
    assert_close(out[0], want, what="attention function with sinks")
    past = MoBACache(config=model.config) if cache == "moba" else None
    gen = model.generate(
        prompt, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True,
        past_key_values=past,
    )  # fmt: skip
    with torch.no_grad():
        full = model(gen.sequences, use_cache=False).logits
    for step, step_logits in enumerate(gen.logits):
        assert_close(step_logits[0], full[0, 12 + step], what=f"sink step {step}")


@pytest.mark.parametrize("cache", ["dynamic", "moba"])
def test_chunked_prefill_equals_one_pass(cache):
    """Prefill in chunks through a cache (queries shorter than keys, len_q > 1), then a crop."""
    from transformers import DynamicCache

    model = as_moba(tiny_model("llama"), MoBAConfig(block_size=4, topk=2))
    x = tokens(2, 27)
    with torch.no_grad():
        ref = model(x).logits
        past = MoBACache(config=model.config) if cache == "moba" else DynamicCache(config=model.config)
        parts = []
        for a, b in ((0, 10), (10, 17), (17, 27)):
            parts.append(model(x[:, a:b], past_key_values=past, use_cache=True).logits)
        assert_close(torch.cat(parts, 1), ref, what="chunked prefill")
        # Assisted decoding crops the cache; the running means must follow.
        past.crop(-6)
        again = model(x[:, 21:], past_key_values=past, use_cache=True).logits
    assert_close(again, ref[:, 21:], what="after crop")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_one_by_one(family, side):
    model = as_moba(tiny_model(family), MoBAConfig(block_size=4, topk=2))
    lengths = (21, 9, 14)
    seqs = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    s = max(lengths)
    ids = torch.zeros(len(seqs), s, dtype=torch.long)
    mask = torch.zeros(len(seqs), s, dtype=torch.long)
    for i, t in enumerate(seqs):
        sl = slice(s - len(t), s) if side == "left" else slice(0, len(t))
        ids[i, sl], mask[i, sl] = t, 1
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for i, t in enumerate(seqs):
            single = model(t[None]).logits[0]
            sl = slice(s - len(t), s) if side == "left" else slice(0, len(t))
            assert_close(batched[i, sl], single, what=f"{family} {side} seq {i}")


@pytest.mark.parametrize("cache", ["dynamic", "moba"])
def test_padded_generate_equals_one_by_one(cache):
    """Left-padded batched generation with a cache: every row equals its own unpadded generation."""
    model = as_moba(tiny_model("qwen2"), MoBAConfig(block_size=4, topk=2))
    prompts = [tokens(1, n, seed=20 + n)[0] for n in (13, 6)]
    ids = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros(2, 13, dtype=torch.long)
    for i, t in enumerate(prompts):
        ids[i, 13 - len(t) :], mask[i, 13 - len(t) :] = t, 1
    past = MoBACache(config=model.config) if cache == "moba" else None
    batched = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, past_key_values=past
    )
    for i, t in enumerate(prompts):
        single = model.generate(t[None], max_new_tokens=10, do_sample=False)
        assert torch.equal(batched[i, 13:], single[0, len(t) :]), f"row {i}"


def test_packed_sequences_equal_separate_runs():
    """Sequences packed in one row (position_ids restart) do not attend across the boundary."""
    model = as_moba(tiny_model("llama"), MoBAConfig(block_size=4, topk=2))
    a, b = tokens(1, 13, seed=3), tokens(1, 10, seed=4)
    packed = torch.cat([a, b], 1)
    position_ids = torch.cat([torch.arange(13), torch.arange(10)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=position_ids).logits
        assert_close(out[:, :13], model(a).logits, what="first packed sequence")
        assert_close(out[:, 13:], model(b).logits, what="second packed sequence")


def test_hybrid_model_and_switch_mid_training(tmp_path):
    """full_attention_layers mixes SDPA and MoBA layers; use_moba switches the whole model and back."""
    x = tokens(2, 24)
    model = tiny_model("llama")
    with torch.no_grad():
        sdpa = model(x).logits
        as_moba(model, MoBAConfig(block_size=4, topk=2))
        moba = model(x).logits
        set_moba_config(model, MoBAConfig(block_size=4, topk=2, full_attention_layers=(-1,)))
        hybrid = model(x).logits
        set_moba_config(model, MoBAConfig(block_size=4, topk=2, full_attention_layers=(0, 1)))
        all_full = model(x).logits
    assert_close(all_full, sdpa, what="every layer listed as full")
    assert not torch.allclose(hybrid, moba, atol=1e-4) and not torch.allclose(hybrid, sdpa, atol=1e-4)

    # A training step in each mode: parameters and optimiser state carry over.
    set_moba_config(model, MoBAConfig(block_size=4, topk=2))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for enabled in (True, False, True):
        use_moba(model, enabled)
        assert model.config._attn_implementation == ("moba" if enabled else "sdpa")
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    assert get_moba_config(model) == MoBAConfig(block_size=4, topk=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_keeps_moba_config(family, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = MoBAConfig(block_size=4, topk=2, full_attention_layers=(-1,), backend="auto")
    model = as_moba(tiny_model(family), cfg)
    x = tokens(1, 17)
    with torch.no_grad():
        before = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="moba").eval()
    assert loaded.config._attn_implementation == "moba"
    assert get_moba_config(loaded) == cfg
    with torch.no_grad():
        assert_close(loaded(x).logits, before, atol=1e-6, rtol=1e-6, what=f"{family} reloaded")


# --- sliding-window layers ----------------------------------------------------------------------------
# MoBA attends the whole causal context, so a sliding window is honoured only while it covers every
# position seen so far (then sliding-window attention is full attention). Past that, a plain forward
# and generate() with a cache must fail with the same error: the sliding-window cache layers crop the
# keys to the window, which would otherwise give silently wrong results.

WINDOW_FAMILIES = ("mistral", "qwen2", "gemma3")
# the decoder layer that slides (and names itself in the error) in tiny_model(family, window=...)
SLIDING_LAYER = {
    "mistral": "MistralAttention (layer 0)",
    "qwen2": "Qwen2Attention (layer 1)",
    "gemma3": "Gemma3Attention (layer 0)",
}


def without_window(model):
    """A copy of ``model`` (same weights) whose attention modules see no sliding window."""
    import copy

    ref = copy.deepcopy(model)
    if ref.config.model_type == "mistral":  # Mistral reads config.sliding_window at every call
        ref.config.sliding_window = None
    for module in ref.modules():
        if hasattr(module, "sliding_window"):  # Qwen2, Gemma3: fixed per layer at construction
            module.sliding_window = None
    return ref


def window_error(family: str, window: int, positions: int) -> str:
    return rf"{re.escape(SLIDING_LAYER[family])} has sliding_window={window} .*reached {positions} positions"


def new_cache(kind: str, model):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    cache = MoBACache(config=model.config) if kind == "moba" else DynamicCache(config=model.config)
    assert any(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)  # it would crop
    return cache


def test_sliding_window_checks_positions_not_keys():
    """The attention function sees only the cropped keys of a sliding cache: positions decide."""
    q = torch.randn(1, 2, 1, 4)
    kv = torch.randn(1, 2, 8, 4)
    fn = MoBAAttention(MoBAConfig(block_size=4, topk=1))
    fn(_Module(0), q, kv, kv, None, sliding_window=8, position_ids=torch.tensor([[7]]))  # 8 positions: fine
    with pytest.raises(ValueError, match=r"_Module \(layer 0\) has sliding_window=8 .*reached 9 positions"):
        fn(_Module(0), q, kv, kv, None, sliding_window=8, position_ids=torch.tensor([[8]]))
    # A mask longer than the keys: the cache dropped slots. Harmless when they were padding ...
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, :2] = False
    q2, kv2 = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 8, 4)
    out, _ = fn(_Module(0), q2, kv2, kv2, mask, sliding_window=8, position_ids=torch.tensor([[7], [7]]))
    assert out.shape == (2, 1, 2, 4)
    mask[1, 1] = True  # ... an error when a real token was dropped, whatever the positions say
    with pytest.raises(ValueError, match=r"sliding_window=8 .*reached 9 positions"):
        fn(_Module(0), q2, kv2, kv2, mask, sliding_window=8, position_ids=torch.tensor([[7], [7]]))


@pytest.mark.parametrize("family", WINDOW_FAMILIES)
def test_window_shorter_than_context_raises_in_forward(family):
    model = as_moba(tiny_model(family, window=8), MoBAConfig(block_size=4, topk=2))
    with pytest.raises(ValueError, match=window_error(family, 8, 12)) as err:
        model(tokens(1, 12))
    msg = str(err.value)
    assert "config.sliding_window=None" in msg and 'attn_implementation="sdpa"' in msg, msg
    # padded batch: positions come from the mask; the longest row has 10 real tokens
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[:, :2] = 0
    with pytest.raises(ValueError, match=window_error(family, 8, 10)):
        model(tokens(2, 12), attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0))


@pytest.mark.parametrize("cache", ["dynamic", "moba"])
@pytest.mark.parametrize("family", WINDOW_FAMILIES)
def test_window_generate_exact_inside_raises_past(family, cache):
    """generate() with a sliding cache: exact while positions fit the window, the error one step later."""
    model = as_moba(tiny_model(family, window=8), MoBAConfig(block_size=4, topk=2))
    prompt = tokens(1, 5)
    # 4 new tokens feed positions 0..7 back (the last one is never fed): all inside the window
    gen = model.generate(
        prompt, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
        past_key_values=new_cache(cache, model),
    )  # fmt: skip
    with torch.no_grad():
        full = without_window(model)(gen.sequences, use_cache=False).logits
    for step, step_logits in enumerate(gen.logits):
        assert_close(step_logits[0], full[0, 4 + step], what=f"{family} step {step}")
    with pytest.raises(ValueError, match=window_error(family, 8, 9)):
        model.generate(prompt, max_new_tokens=5, do_sample=False, past_key_values=new_cache(cache, model))


@pytest.mark.parametrize("family", WINDOW_FAMILIES)
def test_window_covering_context_equals_no_window(family):
    """A window at least the context changes nothing: sparse MoBA equals the same model without a window,
    dense MoBA equals transformers' own sliding-window SDPA (full attention at this length)."""
    x = tokens(2, 24)
    model = as_moba(tiny_model(family, window=32), MoBAConfig(block_size=4, topk=2))
    with torch.no_grad():
        assert_close(model(x).logits, without_window(model)(x).logits, what=f"{family} sparse")
        dense = as_moba(tiny_model(family, window=32), MoBAConfig(block_size=4, topk=6))(x).logits
        assert_close(dense, tiny_model(family, window=32)(x).logits, what=f"{family} dense vs sdpa")
    for cache in ("dynamic", "moba"):
        gen = model.generate(
            x[:1, :11], max_new_tokens=14, do_sample=False, output_logits=True, return_dict_in_generate=True,
            past_key_values=new_cache(cache, model),
        )  # fmt: skip
        with torch.no_grad():
            full = without_window(model)(gen.sequences, use_cache=False).logits
        for step, step_logits in enumerate(gen.logits):
            assert_close(step_logits[0], full[0, 10 + step], what=f"{family} {cache} step {step}")


@pytest.mark.parametrize("cache", ["dynamic", "moba"])
def test_window_padded_generate_crops_only_padding(cache):
    """Left padding makes the slots outnumber the positions: the cache may drop pad slots, not tokens."""
    model = as_moba(tiny_model("mistral", window=8), MoBAConfig(block_size=4, topk=2))
    prompts = [tokens(1, n, seed=30 + n)[0] for n in (6, 3)]
    ids = torch.zeros(2, 9, dtype=torch.long)  # 9 slots > window; at most 6 positions
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, t in enumerate(prompts):
        ids[i, 9 - len(t) :], mask[i, 9 - len(t) :] = t, 1
    kw = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    batched = model.generate(
        ids, attention_mask=mask, max_new_tokens=3, past_key_values=new_cache(cache, model), **kw
    )  # up to 8 positions in 11 slots: the cache has dropped 3 pad slots
    for i, t in enumerate(prompts):
        single = model.generate(t[None], max_new_tokens=3, **kw)
        for step in range(3):
            assert_close(batched.logits[step][i], single.logits[step][0], what=f"row {i} step {step}")
    with pytest.raises(ValueError, match=window_error("mistral", 8, 9)):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, past_key_values=new_cache(cache, model))


def test_gemma2_softcapping_raises_before_the_window():
    model = as_moba(tiny_model("gemma2", window=8), MoBAConfig(block_size=4, topk=2))
    with pytest.raises(ValueError, match=r"softcap=50\.0"):
        model(tokens(1, 4))


@pytest.mark.parametrize("padding", ["none", "left", "holes"])
def test_decode_reads_the_cache_in_place(padding, monkeypatch):
    """Decode steps through MoBAAttention hand the op views of the cache's [B, H, S, D] tensors, one
    batch row at a time (left padding included), and never a copy of the cache; a mask with holes
    takes the packed (copying) path and stays correct."""
    import moba_attn as top

    model = as_moba(tiny_model("llama"), MoBAConfig(block_size=4, topk=2))
    ids = tokens(2, 12, seed=5)
    mask = torch.ones(2, 12, dtype=torch.long)
    if padding == "left":
        mask[1, :5] = 0
    elif padding == "holes":
        mask[1, 3:5] = 0
    past = MoBACache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=past, use_cache=True)
    storages = {layer.keys.untyped_storage().data_ptr() for layer in past.layers}
    seen: list[bool] = []
    op = top.moba_attention

    def spy(**kw):
        if kw["q"].shape[0] < kw["k"].shape[0]:
            seen.append(kw["k"].untyped_storage().data_ptr() in storages_now)
        return op(**kw)

    monkeypatch.setattr(top, "moba_attention", spy)
    nxt = tokens(2, 1, seed=6)
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    # the cache grows by concatenation: the step's key tensors are the layers' new ones
    storages_now: set[int] = set()
    orig_update = MoBACacheLayer.update

    def update(self, *a, **kw):
        keys, values = orig_update(self, *a, **kw)
        storages_now.add(keys.untyped_storage().data_ptr())
        return keys, values

    monkeypatch.setattr(MoBACacheLayer, "update", update)
    with torch.no_grad():
        step = model(nxt, attention_mask=mask2, past_key_values=past, use_cache=True).logits
        full = model(torch.cat([ids, nxt], 1), attention_mask=mask2).logits
    assert storages  # prefill filled the cache
    if padding == "holes":
        assert seen == [False] * len(seen)
    else:
        assert len(seen) == 2 * len(past.layers) and all(seen)
    for b in range(2):
        assert_close(step[b, -1], full[b, -1], what=f"row {b}")
