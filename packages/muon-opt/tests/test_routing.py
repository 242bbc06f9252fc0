"""param_groups / route_parameters: embeddings, head (tied counted once), norms, biases on AdamW."""

from __future__ import annotations

import pytest
import torch
from models import TinyGPT
from torch import nn

from muon_opt import MatrixSpec, Muon, check_bare_params, format_routes, param_groups, route_parameters


def test_tiny_gpt_split(capsys: pytest.CaptureFixture[str]) -> None:
    model = TinyGPT()
    routes = {r.name: r for r in route_parameters(model, specs=TinyGPT.specs())}
    # the tied lm_head.weight is the embedding: one entry, on AdamW, with both names shown
    assert "lm_head.weight" not in routes
    assert not routes["wte.weight"].use_muon and "lm_head.weight" in routes["wte.weight"].reason
    for name in ("ln1.weight", "ln1.bias", "qkv.bias", "fc1.bias", "conv.bias"):
        assert not routes[name].use_muon, name
    for name in (
        "qkv.weight",
        "proj.weight",
        "fc1.weight",
        "fc2.weight",
        "fc3.weight",
        "conv.weight",
        "experts",
    ):
        assert routes[name].use_muon, name
    assert routes["conv.weight"].matrix_spec == MatrixSpec(layout="flatten")
    assert routes["qkv.weight"].matrix_spec == TinyGPT.specs()["qkv.weight"]
    n_params = sum(p.numel() for p in model.parameters())
    groups = param_groups(model, specs=TinyGPT.specs(), verbose=True)
    assert sum(p.numel() for g in groups for _, p in g["params"]) == n_params
    out = capsys.readouterr().out
    assert "wte.weight" in out and "Muon:" in out and "AdamW:" in out
    assert format_routes(list(routes.values())) in out


def test_untied_head_by_name_and_by_vocab_size() -> None:
    named = nn.ModuleDict(
        {"emb": nn.Embedding(50, 8), "body": nn.Linear(8, 8), "classifier": nn.Linear(8, 3)}
    )
    routes = {r.name: r for r in route_parameters(named)}
    assert routes["body.weight"].use_muon
    assert not routes["classifier.weight"].use_muon and routes["classifier.weight"].reason == "output head"

    by_vocab = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 50))
    routes = {r.name: r for r in route_parameters(by_vocab)}
    assert routes["1.weight"].use_muon and not routes["2.weight"].use_muon


def test_custom_norm_frozen_params_and_overrides() -> None:
    class RMSNormish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1, 8))  # 2-D, but a norm gain

    model = nn.Sequential(nn.Linear(8, 8), RMSNormish(), nn.Linear(8, 8), nn.Conv2d(2, 4, 3))
    model[2].weight.requires_grad_(False)
    routes = {r.name: r for r in route_parameters(model, adamw=["0.*"], muon=["0.weight"])}
    assert routes["1.scale"].reason == "norm" and not routes["1.scale"].use_muon
    assert "2.weight" not in routes  # frozen: not handed to the optimizer
    assert routes["0.weight"].use_muon and routes["0.weight"].reason == "forced to Muon by name"  # muon wins
    assert not routes["0.bias"].use_muon and routes["0.bias"].reason == "forced to AdamW by name"
    assert routes["3.weight"].use_muon and routes["3.weight"].matrix_spec is None  # 4-D: flattened by default
    with pytest.raises(ValueError, match=r"'3\.bias' cannot go to Muon"):
        param_groups(model, muon=["3.bias"])


def test_groups_feed_the_optimizer_with_names() -> None:
    model = TinyGPT()
    opt = Muon(param_groups(model, specs=TinyGPT.specs(), weight_decay=0.0), lr=1e-2)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert "qkv.weight" in opt.param_groups[0]["param_names"]


class TinyViT(nn.Module):
    """A ViT-shaped model from torch alone: learned tokens, a patch conv, fused QKV, a depthwise conv."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.patch_embed = nn.Conv2d(3, d, 4, stride=4)
        self.attn = nn.MultiheadAttention(d, 2)
        self.dw = nn.Conv2d(d, d, 3, groups=d)
        self.mix = nn.Conv1d(d, d, 3)
        self.gate = nn.Linear(d, 1)  # a scalar gate: [1, d] is a vector, not a matrix
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, 10))


def test_tokens_stem_fused_depthwise_and_degenerate() -> None:
    model = TinyViT()
    routes = {r.name: r for r in route_parameters(model)}
    expected_adamw = {
        "cls_token": "learned token",
        "pos_embed": "position embedding",
        "patch_embed.weight": "input layer",
        "dw.weight": "depthwise conv",
        "gate.weight": "1-D-like",
        "head.2.weight": "output head",  # the last Linear inside a top-level `head`
    }
    for name, reason in expected_adamw.items():
        assert not routes[name].use_muon and reason in routes[name].reason, (name, routes[name])
    for name in ("attn.in_proj_weight", "attn.out_proj.weight", "mix.weight", "head.1.weight"):
        assert routes[name].use_muon, (name, routes[name])
    assert routes["attn.in_proj_weight"].matrix_spec == MatrixSpec(split_sizes=(16, 16, 16))
    assert routes["mix.weight"].matrix_spec == MatrixSpec(layout="flatten")
    unsplit = {r.name: r for r in route_parameters(model, split_fused=False)}
    assert unsplit["attn.in_proj_weight"].use_muon and unsplit["attn.in_proj_weight"].matrix_spec is None
    table = format_routes(list(routes.values()))
    assert "3 x [16, 16] (row split 16+16+16)" in table and "1 x [16, 48]" in table


def test_stem_by_name_when_not_first() -> None:
    """A vision tower after a text embedding (CLIP-like): its patch conv is found by name."""
    model = nn.ModuleDict(
        {
            "text": nn.ModuleDict({"tok": nn.Embedding(30, 8), "proj": nn.Linear(8, 8)}),
            "vision": nn.ModuleDict({"patch_embedding": nn.Conv2d(3, 8, 2), "proj": nn.Linear(8, 8)}),
        }
    )
    routes = {r.name: r for r in route_parameters(model)}
    assert routes["vision.patch_embedding.weight"].reason == "input layer (stem / patch embedding)"
    assert routes["text.proj.weight"].use_muon and routes["vision.proj.weight"].use_muon
    assert not routes["text.tok.weight"].use_muon


def test_user_spec_wins_and_bad_spec_is_a_clear_error() -> None:
    model = TinyViT()
    spec = MatrixSpec(split_sizes=(16, 32))
    routes = {r.name: r for r in route_parameters(model, specs={"attn.in_proj_weight": spec})}
    assert routes["attn.in_proj_weight"].matrix_spec == spec
    with pytest.raises(ValueError, match=r"'attn\.in_proj_weight' cannot go to Muon.*sum to 40.*48 rows"):
        route_parameters(model, specs={"attn.*": MatrixSpec(split_sizes=(16, 24))})


def test_check_bare_params() -> None:
    model = TinyViT()
    issues = check_bare_params(model.parameters())
    text = "\n".join(issues)
    for shape in ((1, 1, 16), (1, 5, 16), (16, 1, 3, 3), (1, 16)):
        assert f"of shape {shape} has a dimension of size 1" in text, shape
    assert "(16, 16, 3) looks like a Conv1d weight" in text
    assert "looks like model.parameters()" in issues[-1]
    # names make the embedding-like ones nameable
    named = check_bare_params(model.named_parameters())
    assert any("patch_embed.weight" in m and "named like an embedding" in m for m in named)
    assert any("cls_token of shape (1, 1, 16)" in m for m in named)
    assert "looks like model.parameters()" in named[-1]
    # with the model, every difference from param_groups(model) is reported with its reason
    exact = check_bare_params(model.parameters(), model=model)
    assert any("head.2.weight" in m and "output head" in m for m in exact)
    assert any("attn.in_proj_weight" in m and "3 x [16, 16]" in m for m in exact)
    # a hand-picked list of hidden matrices is what bare routing is for: nothing to say
    assert check_bare_params([model.attn.out_proj.weight, model.head[1].weight]) == []
    # param_groups' Muon tensors, bare: only the logical-matrix views differ (fused QKV, Conv1d)
    muon_tensors = [p for _, p in param_groups(model)[0]["params"]]
    diffs = check_bare_params(muon_tensors, model=model)
    assert len(diffs) == 2 and "attn.in_proj_weight" in diffs[0] and "mix.weight" in diffs[1]
