"""Routing of real architectures: tiny random transformers and timm models, built from configs (no weights).

Each architecture has a table of the parameters a careful user would place by hand (embeddings, position
embeddings, learned tokens, the input layer and the head on AdamW; hidden matrices on Muon, fused ones
split into the matrices they hold), and every test checks that each trainable parameter is routed once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from close import assert_close, seeded
from torch import nn

from muon_opt import Muon, describe_matrices, format_routes, param_groups, route_parameters, to_matrix_groups

D, V = 32, 97  # hidden size and vocabulary of every tiny model


def _hf() -> Any:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _timm() -> Any:
    return pytest.importorskip("timm")


def gpt2() -> nn.Module:
    T = _hf()
    cfg = T.GPT2Config(
        n_embd=D, n_layer=1, n_head=4, n_positions=64, vocab_size=V, bos_token_id=0, eos_token_id=0
    )
    return T.AutoModelForCausalLM.from_config(cfg)


def llama() -> nn.Module:
    T = _hf()
    cfg = T.LlamaConfig(
        hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, tie_word_embeddings=False,
    )  # fmt: skip
    return T.AutoModelForCausalLM.from_config(cfg)


def qwen2_tied() -> nn.Module:
    T = _hf()
    cfg = T.Qwen2Config(
        hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, tie_word_embeddings=True,
    )  # fmt: skip
    return T.AutoModelForCausalLM.from_config(cfg)


def bert_classifier() -> nn.Module:
    T = _hf()
    cfg = T.BertConfig(
        hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=V,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return T.AutoModelForSequenceClassification.from_config(cfg)


def bert_mlm() -> nn.Module:
    T = _hf()
    cfg = T.BertConfig(
        hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=V,
        max_position_embeddings=64,
    )  # fmt: skip
    return T.AutoModelForMaskedLM.from_config(cfg)


def t5() -> nn.Module:
    T = _hf()
    cfg = T.T5Config(
        d_model=D, d_ff=64, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=4, vocab_size=V
    )
    return T.AutoModelForSeq2SeqLM.from_config(cfg)


def mixtral() -> nn.Module:
    T = _hf()
    cfg = T.MixtralConfig(
        hidden_size=D, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return T.AutoModelForCausalLM.from_config(cfg)


def qwen2_moe() -> nn.Module:
    T = _hf()
    cfg = T.Qwen2MoeConfig(
        hidden_size=D, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=48,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=V, num_experts=4,
        num_experts_per_tok=2,
    )  # fmt: skip
    return T.AutoModelForCausalLM.from_config(cfg)


def vit() -> nn.Module:
    return _timm().create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=D, depth=1, num_heads=2,
        num_classes=5, reg_tokens=2,
    )  # fmt: skip


def deit_distilled() -> nn.Module:
    return _timm().create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=D, depth=1,
        num_heads=2, num_classes=5,
    )  # fmt: skip


def resnet() -> nn.Module:
    return _timm().create_model("resnet18", pretrained=False, num_classes=5)


def convnext() -> nn.Module:
    return _timm().create_model(
        "convnext_atto", pretrained=False, num_classes=5, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)
    )


@dataclass(frozen=True)
class Want:
    """The route a careful user would choose: optimizer, a phrase of the reason, the logical matrices."""

    muon: bool
    reason: str = ""
    matrices: str | None = None


ADAMW_EMB, MUON = Want(False, "embedding"), Want(True, "matrix")

# name -> expected route; a name that is absent from the routes (a tied head) maps to None
EXPECTED: dict[str, tuple[Callable[[], nn.Module], dict[str, Want | None]]] = {
    "gpt2": (gpt2, {
        "transformer.wte.weight": Want(False, "embedding (tied: transformer.wte.weight, lm_head.weight)"),
        "lm_head.weight": None,
        "transformer.wpe.weight": Want(False, "position embedding"),
        "transformer.h.0.attn.c_attn.weight": Want(True, "fused QKV", "3 x [32, 32] (column split 32+32+32)"),
        "transformer.h.0.attn.c_proj.weight": Want(True, "matrix", "1 x [32, 32]"),
        "transformer.h.0.mlp.c_fc.weight": Want(True, "matrix", "1 x [32, 128]"),
        "transformer.h.0.attn.c_attn.bias": Want(False, "bias"),
        "transformer.ln_f.weight": Want(False, "norm"),
    }),
    "llama": (llama, {
        "model.embed_tokens.weight": ADAMW_EMB,
        "model.layers.0.self_attn.q_proj.weight": Want(True, "matrix", "1 x [32, 32]"),
        "model.layers.0.self_attn.k_proj.weight": Want(True, "matrix", "1 x [16, 32]"),
        "model.layers.0.mlp.down_proj.weight": MUON,
        "model.layers.0.input_layernorm.weight": Want(False, "norm"),
        "lm_head.weight": Want(False, "output head"),
    }),
    "qwen2-tied": (qwen2_tied, {
        "model.embed_tokens.weight": Want(False, "tied: model.embed_tokens.weight, lm_head.weight"),
        "lm_head.weight": None,
        "model.layers.0.self_attn.q_proj.weight": MUON,
        "model.layers.0.self_attn.q_proj.bias": Want(False, "bias"),
        "model.layers.0.mlp.gate_proj.weight": MUON,
    }),
    "bert-classifier": (bert_classifier, {
        "bert.embeddings.word_embeddings.weight": ADAMW_EMB,
        "bert.embeddings.position_embeddings.weight": Want(False, "position embedding"),
        "bert.embeddings.token_type_embeddings.weight": ADAMW_EMB,
        "bert.encoder.layer.0.attention.self.query.weight": MUON,
        "bert.encoder.layer.0.attention.output.dense.weight": MUON,  # "output" is a block, not the head
        "bert.encoder.layer.0.output.dense.weight": MUON,
        "bert.pooler.dense.weight": MUON,
        "classifier.weight": Want(False, "output head"),
        "classifier.bias": Want(False, "output head"),
    }),
    "bert-mlm": (bert_mlm, {
        "bert.embeddings.word_embeddings.weight": Want(False, "cls.predictions.decoder.weight"),
        "cls.predictions.decoder.weight": None,
        "cls.predictions.transform.dense.weight": MUON,
        "cls.predictions.bias": Want(False, "bias"),
    }),
    "t5": (t5, {
        "shared.weight": Want(False, "tied: shared.weight, encoder.embed_tokens.weight, decoder.embed_tokens."),
        "lm_head.weight": None,
        "encoder.block.0.layer.0.SelfAttention.q.weight": MUON,
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": ADAMW_EMB,
        "decoder.block.0.layer.1.EncDecAttention.k.weight": MUON,
        "decoder.block.0.layer.2.DenseReluDense.wo.weight": MUON,
        "decoder.final_layer_norm.weight": Want(False, "norm"),
    }),
    "mixtral": (mixtral, {
        "model.embed_tokens.weight": ADAMW_EMB,
        "model.layers.0.mlp.experts.gate_up_proj": Want(True, "experts, fused gate/up", "8 x [24, 32] (row split 24+24)"),
        "model.layers.0.mlp.experts.down_proj": Want(True, "matrix", "4 x [32, 24]"),
        "model.layers.0.mlp.gate.weight": Want(True, "matrix", "1 x [4, 32]"),  # the router, as in Moonlight
        "lm_head.weight": Want(False, "output head"),
    }),
    "qwen2-moe": (qwen2_moe, {
        "model.layers.0.mlp.experts.gate_up_proj": Want(True, "experts, fused gate/up", "8 x [24, 32] (row split 24+24)"),
        "model.layers.0.mlp.shared_expert.up_proj.weight": MUON,
        "model.layers.0.mlp.shared_expert_gate.weight": Want(False, "1-D-like"),  # Linear(H, 1)
        "lm_head.weight": Want(False, "output head"),
    }),
    "timm-vit": (vit, {
        "cls_token": Want(False, "learned token"),
        "reg_token": Want(False, "learned token"),
        "pos_embed": Want(False, "position embedding"),
        "patch_embed.proj.weight": Want(False, "input layer"),
        "blocks.0.attn.qkv.weight": Want(True, "fused QKV", "3 x [32, 32] (row split 32+32+32)"),
        "blocks.0.attn.proj.weight": MUON,
        "blocks.0.mlp.fc1.weight": MUON,
        "norm.weight": Want(False, "norm"),
        "head.weight": Want(False, "output head"),
        "head.bias": Want(False, "output head"),
    }),
    "timm-deit-distilled": (deit_distilled, {
        "cls_token": Want(False, "learned token"),
        "dist_token": Want(False, "learned token"),
        "pos_embed": Want(False, "position embedding"),
        "patch_embed.proj.weight": Want(False, "input layer"),
        "head.weight": Want(False, "output head"),
        "head_dist.weight": Want(False, "output head"),  # timm's get_classifier() names both heads
    }),
    "timm-resnet": (resnet, {
        "conv1.weight": Want(False, "input layer"),
        "bn1.weight": Want(False, "norm"),
        "layer1.0.conv1.weight": Want(True, "matrix", "1 x [64, 576]"),
        "layer2.0.downsample.0.weight": Want(True, "matrix", "1 x [128, 64]"),
        "fc.weight": Want(False, "output head"),
    }),
    "timm-convnext": (convnext, {
        "stem.0.weight": Want(False, "input layer"),
        "stem.1.weight": Want(False, "norm"),
        "stages.0.blocks.0.conv_dw.weight": Want(False, "depthwise conv"),
        "stages.0.blocks.0.gamma": Want(False, "1-D"),
        "stages.0.blocks.0.mlp.fc1.weight": Want(True, "matrix", "1 x [32, 8]"),
        "stages.1.downsample.1.weight": Want(True, "matrix", "1 x [16, 32]"),
        "head.fc.weight": Want(False, "output head"),
    }),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_routes_of_architecture(arch: str) -> None:
    factory, want = EXPECTED[arch]
    model = factory()
    routes = route_parameters(model)
    by_name = {r.name: r for r in routes}
    # every trainable parameter exactly once (shared tensors under their first name)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [r.name for r in routes] == [n for n, _ in trainable]
    groups = param_groups(model)
    ids = [id(p) for g in groups for _, p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    table = format_routes(routes).splitlines()
    for name, w in want.items():
        if w is None:
            assert name not in by_name, f"{name} should be counted once, under the tensor it is tied to"
            continue
        r = by_name[name]
        assert (r.use_muon, w.reason in r.reason) == (w.muon, True), f"{arch}: {name}: got {r}, want {w}"
        line = next(line for line in table if line.startswith(name + " "))
        assert ("Muon" if w.muon else "AdamW") in line and r.reason in line, line
        if w.matrices is not None:
            assert describe_matrices(r.shape, r.matrix_spec) == w.matrices and w.matrices in line, line


def test_gpt2_c_attn_columns_are_q_k_v() -> None:
    """The column split of GPT-2's Conv1D c_attn gives exactly the q, k, v its forward computes."""
    model = gpt2().double()
    attn = model.transformer.h[0].attn
    spec = {r.name: r for r in route_parameters(model)}["transformer.h.0.attn.c_attn.weight"].matrix_spec
    x = torch.randn(2, 5, D, generator=seeded(0), dtype=torch.float64)
    q, k, v = attn.c_attn(x).split(attn.split_size, dim=2)
    mats = to_matrix_groups(attn.c_attn.weight.detach(), spec)
    for got, m, bias, what in zip((q, k, v), mats, attn.c_attn.bias.split(D), "qkv", strict=True):
        assert_close(got, x @ m[0] + bias, atol=1e-12, what=what)


def test_moe_gate_up_split_matches_the_experts_forward() -> None:
    model = mixtral().double()
    experts = model.model.layers[0].mlp.experts
    if not hasattr(experts, "is_concatenated"):
        pytest.skip("this transformers stores Mixtral experts without the fused-layout flags")
    spec = {r.name: r for r in route_parameters(model)}["model.layers.0.mlp.experts.gate_up_proj"].matrix_spec
    gate, up = to_matrix_groups(experts.gate_up_proj.detach(), spec)
    x = torch.randn(6, D, generator=seeded(1), dtype=torch.float64)
    for e in range(experts.num_experts):
        g, u = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        assert_close(g, x @ gate[e].T, atol=1e-12, what=f"gate of expert {e}")
        assert_close(u, x @ up[e].T, atol=1e-12, what=f"up of expert {e}")


@pytest.mark.parametrize("arch", ["gpt2", "mixtral", "timm-vit"])
def test_routed_groups_step_the_same_on_both_paths(arch: str) -> None:
    """The routed specs (column splits, per-expert gate/up) run through Muon; fast path == reference."""
    model = EXPECTED[arch][0]().double()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn(p.shape, generator=seeded(i), dtype=torch.float64) for i, p in enumerate(params)]
    after = []
    for foreach in (True, False):
        copy = [p.detach().clone().requires_grad_() for p in params]
        for c, g in zip(copy, grads, strict=True):
            c.grad = g.clone()
        index = {id(p): i for i, p in enumerate(params)}
        groups = [
            {**g, "params": [(n, copy[index[id(p)]]) for n, p in g["params"]]} for g in param_groups(model)
        ]
        Muon(groups, lr=1e-2, foreach=foreach).step()
        after.append(copy)
    for (name, _), a, b in zip(model.named_parameters(), *after, strict=True):
        assert_close(a, b, atol=1e-12, what=name)
