"""param_groups / route_parameters: embeddings, head (tied counted once), norms, biases on AdamW."""

from __future__ import annotations

import pytest
import torch
from models import TinyGPT
from torch import nn

from muon_opt import MatrixSpec, Muon, format_routes, param_groups, route_parameters


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
