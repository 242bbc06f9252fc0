"""``torch.compile(model, fullgraph=True)`` of a transformers model on MoBA: no graph breaks, eager results.

Under compile the attention function hands the whole call to the ``moba_attn::hf_attention`` custom
op (``moba_attn.hf_op``), whose backward recomputes the forward. The spec: a tiny random Llama compiles
with ``fullgraph=True`` (a graph break would raise), ``torch._dynamo.explain`` counts no breaks, and
logits and every parameter gradient equal eager mode, for plain MoBA, sink blocks and a MoBA/full
hybrid, with and without an attention mask. Most cases use the ``aot_eager`` backend (AOTAutograd
traces the op through its fake and autograd registrations; nothing is code-generated, so this is
quick on a 2-core CPU); one case runs inductor end to end.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from moba_testing import assert_close

pytest.importorskip("transformers")

from moba_attn.hf import MoBAConfig, register_moba, set_moba_config, use_moba

VOCAB = 97
# fp32: compiled and eager run the same kernels (aot_eager) or fused ones (inductor), so differences are
# summation order only, a few ulps of the O(1) logits.
ATOL, RTOL = 1e-5, 1e-4

PLAIN = MoBAConfig(block_size=4, topk=2)
# layer 0: MoBA with a sink block, layer 1: full attention (the paper's hybrid, section 3.1)
SINKS_HYBRID = MoBAConfig(block_size=4, topk=3, sink_blocks=1, full_attention_layers=(-1,))


def tiny_moba(family: str, config: MoBAConfig, window: int | None = None):
    """A 2-layer random Llama (or Mistral, for a window) switched to MoBA; as in test_hf.tiny_model."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    cfg = LlamaConfig(**common) if family == "llama" else MistralConfig(**common, sliding_window=window)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    set_moba_config(model, config)
    use_moba(model, True)
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def mask_for(kind: str | None, x: torch.Tensor) -> torch.Tensor | None:
    if kind is None:
        return None
    mask = torch.ones_like(x)
    if kind == "padded":
        mask[1, :5] = 0  # left padding on the second row
    return mask


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    register_moba()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss_and_grads(fn, model, x: torch.Tensor, mask: torch.Tensor | None):
    """Logits and parameter gradients of ``model``'s LM loss, run through ``fn`` (model or compiled)."""
    model.zero_grad(set_to_none=True)
    out = fn(x, attention_mask=mask, labels=x, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_compiled_equals_eager(model, compiled, x: torch.Tensor, mask: torch.Tensor | None, what: str):
    model.train()
    logits, grads = loss_and_grads(model, model, x, mask)
    c_logits, c_grads = loss_and_grads(compiled, model, x, mask)
    assert_close(f"{what} logits", c_logits, logits, atol=ATOL, rtol=RTOL)
    for name, g in grads.items():
        assert_close(f"{what} grad {name}", c_grads[name], g, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("full_layer", [False, True], ids=["moba", "full"])
def test_custom_op_matches_eager_call_and_passes_opcheck(full_layer):
    """``moba_attn::hf_attention`` on a left-padded GQA batch: output and q/k/v gradients (the backward
    op recomputes the forward) equal the eager attention function's; ``torch.library.opcheck`` accepts
    the schema, the fake implementation, the autograd registration and AOT dispatch."""
    from moba_attn.hf import MoBAAttention
    from moba_attn.hf_op import hf_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 11, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 11, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 11, 8, generator=g, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :3] = False
    pos = (mask.long().cumsum(1) - 1).clamp_min(0)
    cfg = MoBAConfig(block_size=4, topk=2, sink_blocks=1, full_attention_layers=(0,) if full_layer else ())
    module = torch.nn.Module()
    module.layer_idx = 0
    want, _ = MoBAAttention(cfg)(module, q, k, v, mask, scaling=0.3, position_ids=pos)
    args = (q, k, v, mask, pos, None, None, 4, 2, 1, 0.3, full_layer, "auto", -1, "layer 0")
    got = hf_attention(*args)
    assert_close("op output", got, want, atol=1e-6)
    w = torch.randn(want.shape, generator=g)
    got_grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    for name, a, b in zip("qkv", got_grads, want_grads):
        assert_close(f"op grad {name}", a, b, atol=1e-6)
    assert torch.library.opcheck(hf_attention, args) == dict.fromkeys(
        ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
        "SUCCESS",
    )


@pytest.mark.parametrize(
    "config, mask",
    [(PLAIN, None), (SINKS_HYBRID, "ones")],
    ids=["plain-nomask", "sinks-hybrid-ones"],
)
def test_explain_counts_no_graph_breaks(config, mask):
    model = tiny_moba("llama", config)
    x = tokens(2, 19)
    explained = torch._dynamo.explain(model)(x, attention_mask=mask_for(mask, x), use_cache=False)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize(
    "config, mask",
    [(PLAIN, None), (PLAIN, "padded"), (SINKS_HYBRID, None)],
    ids=["plain-nomask", "plain-padded", "sinks-hybrid-nomask"],
)
def test_fullgraph_compile_equals_eager(config, mask):
    """Logits and every parameter gradient (the backward op recomputes the forward) equal eager mode."""
    model = tiny_moba("llama", config)
    x = tokens(2, 19)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    check_compiled_equals_eager(model, compiled, x, mask_for(mask, x), f"{config} mask={mask}")


def test_dynamic_lengths_compile_once():
    """With dynamic shapes one graph serves every sequence length (no recompiles while training)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_moba("llama", PLAIN)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    frames = []
    with torch.no_grad():
        for length in (19, 26):
            x = tokens(2, length, seed=length)
            got = compiled(x, use_cache=False).logits
            assert_close(f"T={length}", got, model(x, use_cache=False).logits, atol=ATOL, rtol=RTOL)
            frames.append(counter.frame_count)
    assert frames[1] == frames[0], f"recompiled for a new length: {frames}"


def test_compiled_sliding_window_error_equals_eager():
    """The op checks the window at run time: a compiled model fails exactly as the eager one does.

    One graph serves both calls (same shapes, a mask each time): the window binds or not depending on
    the positions, which here come from the padding mask as in generate().
    """
    model = tiny_moba("mistral", PLAIN, window=8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = tokens(2, 12)
    mask = torch.ones_like(x)
    with pytest.raises(ValueError, match=r"sliding_window=8 .*reached 12 positions") as eager:
        model(x, attention_mask=mask, use_cache=False)
    with pytest.raises(ValueError, match="sliding_window=8") as comp:
        compiled(x, attention_mask=mask, use_cache=False)
    assert str(comp.value) == str(eager.value)
    mask[:, :4] = 0  # 8 real tokens per row: inside the window, it runs
    kw = dict(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0), use_cache=False)
    with torch.no_grad():
        got, want = compiled(x, **kw).logits, model(x, **kw).logits
    assert_close("window 8, 8 real tokens", got[:, 4:], want[:, 4:], atol=ATOL, rtol=RTOL)


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c)


@pytest.mark.slow
@pytest.mark.skipif(not _has_cxx(), reason="inductor on CPU needs a C++ compiler (g++/clang++) on PATH")
def test_inductor_fullgraph_equals_eager():
    """The default backend end to end (about 30 s of compiling on a 2-core CPU): sinks + hybrid, masked."""
    model = tiny_moba("llama", SINKS_HYBRID)
    x = tokens(2, 19)
    compiled = torch.compile(model, fullgraph=True)
    check_compiled_equals_eager(model, compiled, x, mask_for("ones", x), "inductor")
