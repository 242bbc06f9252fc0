"""QK-clip (MuonClip, Kimi K2): the per-head maths, the recorded maxima, and bounded logits on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from close import assert_close, seeded

from muon_opt import Muon, param_groups
from muon_opt.qk_clip import QKClip, max_logits, qk_clip_

transformers = pytest.importorskip("transformers")


def _head_logits(wq, bq, wk, bk, x, heads, kv):
    """Explicit per-head logits [H, L, L] of q = W_q x + b_q, k = W_k x + b_k (no scaling)."""
    d = wq.shape[0] // heads
    q = (x @ wq.T + bq).view(-1, heads, d).transpose(0, 1)  # [H, L, d]
    k = (x @ wk.T + bk).view(-1, kv, d).transpose(0, 1)
    k = k.repeat_interleave(heads // kv, dim=0)
    return q @ k.transpose(1, 2)


@pytest.mark.parametrize(("heads", "kv"), [(4, 4), (4, 2), (6, 1)])
def test_qk_clip_scales_each_head_to_exactly_tau(heads: int, kv: int) -> None:
    """After the clip, a head whose largest logit was over tau has exactly tau; the others are unchanged
    (in GQA too, where the shared key is scaled and the group's other queries compensate)."""
    g, d, n_in = seeded(0), 8, 12
    wq = torch.randn(heads * d, n_in, generator=g, dtype=torch.float64)
    wk = torch.randn(kv * d, n_in, generator=g, dtype=torch.float64)
    bq, bk = (
        torch.randn(heads * d, generator=g, dtype=torch.float64),
        torch.randn(kv * d, generator=g, dtype=torch.float64),
    )
    x = torch.randn(10, n_in, generator=g, dtype=torch.float64)
    before = _head_logits(wq, bq, wk, bk, x, heads, kv).amax(dim=(1, 2))
    tau = float(before.median())  # about half the heads over
    gamma = qk_clip_(wq, wk, before, tau, heads, kv, q_bias=bq, k_bias=bk)
    after = _head_logits(wq, bq, wk, bk, x, heads, kv).amax(dim=(1, 2))
    over = before > tau
    assert over.any() and (~over).any()
    assert_close(after[over], torch.full_like(after[over], tau), atol=1e-12, rtol=1e-12, what="clipped heads")
    assert_close(after[~over], before[~over], atol=1e-12, rtol=1e-12, what="heads under tau")
    assert_close(gamma, torch.where(over, tau / before, torch.ones_like(before)), atol=0, rtol=1e-15)


def test_qk_clip_leaves_everything_when_no_head_is_over() -> None:
    wq, wk = torch.randn(8, 4), torch.randn(8, 4)
    q0, k0 = wq.clone(), wk.clone()
    qk_clip_(wq, wk, torch.tensor([1.0, 2.0]), 5.0, 2, 2)
    assert torch.equal(wq, q0) and torch.equal(wk, k0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": math.inf}, "tau"),
        ({"num_heads": 3}, "multiple"),
        ({"head_max_logits": torch.tensor([1.0, math.nan])}, "not finite"),
        ({"head_max_logits": torch.ones(3)}, "3 entries"),
        ({"k_weight": torch.zeros(6, 4)}, "k_weight"),
        ({"q_bias": torch.zeros(3)}, "q_bias"),
    ],
)
def test_qk_clip_errors_name_the_problem(kwargs: dict, match: str) -> None:
    args = dict(q_weight=torch.zeros(8, 4), k_weight=torch.zeros(8, 4), head_max_logits=torch.ones(2), tau=1.0,
                num_heads=2, num_kv_heads=2)  # fmt: skip
    args.update(kwargs)
    with pytest.raises((ValueError, FloatingPointError), match=match):
        qk_clip_(**args)


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "additive"])
def test_max_logits_is_the_masked_maximum(mask: str) -> None:
    g = seeded(1)
    q, k = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    full = torch.einsum("bhld,bhsd->bhls", q, k.repeat_interleave(2, dim=1)) * 0.3
    allowed = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    if mask in ("causal", "bool", "additive"):
        allowed = torch.ones(5, 7, dtype=torch.bool).tril(2).expand(2, 1, 5, 7).clone()
    if mask in ("bool", "additive"):
        allowed[1, 0, :, 0] = False  # padding of sample 1's first key
    attn = {"none": None, "causal": None, "bool": allowed,
            "additive": torch.where(allowed, 0.0, torch.finfo(torch.float32).min)}[mask]  # fmt: skip
    want = full.masked_fill(~allowed, -math.inf).amax(dim=(0, 2, 3))
    got = max_logits(q, k, 0.3, attn, is_causal=mask == "causal")
    assert_close(got, want, atol=1e-5, rtol=1e-5, what=f"max logits, mask {mask}")


def _llama(impl: str = "eager", kv: int = 2, layers: int = 2) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv, max_position_embeddings=64, attn_implementation=impl,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


TOKENS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_recording_leaves_the_outputs_and_removes_cleanly(impl: str) -> None:
    plain, clipped = _llama(impl), _llama(impl)
    clip = QKClip(clipped, tau=1e9)
    for m in (plain, clipped):
        m.train()
    assert torch.equal(plain(input_ids=TOKENS).logits, clipped(input_ids=TOKENS).logits)
    assert set(clip.maxima) == {f"model.layers.{i}.self_attn" for i in range(2)}
    assert all(v.shape == (4,) for v in clip.maxima.values())
    clipped.eval()
    clip.step()
    clipped(input_ids=TOKENS)
    assert clip.maxima == {}  # eval forwards are not recorded
    clip.remove()
    assert clipped.config._attn_implementation == impl


@pytest.mark.parametrize("kv", [4, 2])
def test_clip_bounds_the_next_forward_exactly_at_lr_0(kv: int) -> None:
    """With no parameter update between the forwards, every head that was over tau now peaks at exactly
    tau on the same batch, and the heads under it are untouched (one layer: a deeper layer's inputs change
    when an earlier layer is clipped)."""
    model = _llama(kv=kv, layers=1)
    with torch.no_grad():  # make the logits large: some heads well over tau
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    model.train()
    clip = QKClip(model, tau=4.0)
    model(input_ids=TOKENS)
    before = {n: v.clone() for n, v in clip.maxima.items()}
    weights = {n: m.q_proj.weight.clone() for n, m in clip.modules.items()}
    clip.step()
    model(input_ids=TOKENS)
    after = clip.maxima
    any_over = False
    for n in before:
        over = before[n] > 4.0
        any_over |= bool(over.any())
        assert_close(
            after[n][over], torch.full_like(after[n][over], 4.0), atol=1e-4, rtol=1e-4, what=f"{n} clipped"
        )
        assert_close(after[n][~over], before[n][~over], atol=1e-4, rtol=1e-4, what=f"{n} under tau")
        if not bool(over.any()):
            assert torch.equal(clip.modules[n].q_proj.weight, weights[n])
    assert any_over


def _train(tau: float | None, steps: int = 40) -> list[float]:
    model = _llama()
    model.train()
    opt = Muon(param_groups(model), lr=0.05, weight_decay=0.0, adamw_lr_ratio=0.1)
    clip = QKClip(model, tau=tau if tau is not None else 1e9)
    peaks = []
    for _ in range(steps):
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks.append(max(float(v.max()) for v in clip.step().values()))
    return peaks


def test_training_keeps_the_logits_near_tau() -> None:
    """Muon at a high lr on one repeated batch: without the clip the largest logit grows past 2 tau; with
    it, the largest logit any forward sees (one optimizer step after the last clip) stays within 1.5 tau."""
    tau = 3.0
    free, clipped = _train(None), _train(tau)
    assert max(free) > 2 * tau, f"the unclipped run never grew: {max(free):.2f}"
    assert max(clipped) <= 1.5 * tau, f"clipped run peaked at {max(clipped):.2f} (tau {tau})"


def test_qk_norm_models_and_foreign_models_are_refused() -> None:
    cfg = transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    with pytest.raises(ValueError, match="q_norm"):
        QKClip(transformers.Qwen3ForCausalLM(cfg))
    with pytest.raises(ValueError, match="transformers PreTrainedModel"):
        QKClip(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="tau"):
        QKClip(_llama(), tau=-1.0)
    model = _llama()
    QKClip(model)
    with pytest.raises(ValueError, match="already has a QKClip"):
        QKClip(model)
