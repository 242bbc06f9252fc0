"""muon_opt.Muon: fast path vs reference, the Moonlight update written out, AdamW vs torch, and the edges."""

from __future__ import annotations

import io
import math

import pytest
import torch
from close import assert_close, max_err, seeded
from models import TinyGPT, lm_loss
from torch import nn

import muon_opt
from muon_opt import MatrixSpec, Muon, muon_update, newton_schulz_reference, param_groups, update_scale


def _batch(seed: int, n: int = 4, T: int = 9, vocab: int = 37) -> torch.Tensor:
    return torch.randint(0, vocab, (n, T), generator=seeded(seed))


def _model(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT().to(dtype)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed0: int = 0) -> None:
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, _batch(seed0 + s)).backward()
        opt.step()


def _opt(model: TinyGPT, **kw) -> Muon:
    return Muon(param_groups(model, specs=TinyGPT.specs()), lr=kw.pop("lr", 2e-2), **kw)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original", "spectral", "none"])
def test_fast_path_matches_reference_fp64(nesterov: bool, adjust_lr: str) -> None:
    fast, ref = _model(torch.float64), _model(torch.float64)
    opt_f = _opt(fast, nesterov=nesterov, adjust_lr=adjust_lr)
    opt_r = _opt(ref, nesterov=nesterov, adjust_lr=adjust_lr, foreach=False)
    _train(fast, opt_f, 3)
    _train(ref, opt_r, 3)
    # float64 rounding differences, amplified by AdamW's g / sqrt(v) on near-zero gradients; any formula
    # difference would show at the scale of lr (1e-2).
    for (name, a), b in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert_close(a, b, atol=1e-8, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fast_path_error_bounded_by_reference_error(dtype: torch.dtype) -> None:
    """The fast path is as close to a float64 run as the reference in the same dtype is (dion-style)."""
    truth, fast, ref = _model(torch.float64), _model(dtype), _model(dtype)
    _train(truth, _opt(truth, foreach=False), 2)
    _train(fast, _opt(fast), 2)
    _train(ref, _opt(ref, foreach=False), 2)
    for (name, t), f, r in zip(truth.named_parameters(), fast.parameters(), ref.parameters(), strict=True):
        assert max_err(f, t) <= 2 * max_err(r, t) + 10 * torch.finfo(dtype).eps, name


def test_one_step_is_moonlight_formula() -> None:
    """W <- W - lr * (0.2 sqrt(max(A, B)) NS5(G + mu M) + wd W) with M <- mu M + G (Algorithm 1)."""
    torch.manual_seed(0)
    W0 = torch.randn(24, 40, dtype=torch.float64)
    W = nn.Parameter(W0.clone())
    lr, wd, mu = 0.03, 0.1, 0.95
    opt = Muon([W], lr=lr, weight_decay=wd, momentum=mu)
    M = torch.zeros_like(W0)
    for step in range(3):
        G = torch.randn(24, 40, generator=seeded(step), dtype=torch.float64)
        W.grad = G.clone()
        opt.step()
        M = mu * M + G
        W0 = W0 - lr * (0.2 * math.sqrt(40) * newton_schulz_reference(G + mu * M) + wd * W0)
        assert_close(W.detach(), W0, atol=1e-12, what=f"step {step}")
        assert torch.equal(W.grad, G), "grad modified"


def test_adamw_part_matches_torch_adamw() -> None:
    torch.manual_seed(0)
    ours, theirs = nn.Linear(7, 5), nn.Linear(7, 5)
    theirs.load_state_dict(ours.state_dict())
    opt = Muon([{"params": ours.parameters(), "use_muon": False}], lr=1e-2, weight_decay=0.1,
               adamw_betas=(0.9, 0.95), adamw_eps=1e-8)  # fmt: skip
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for s in range(5):
        x = torch.randn(3, 7, generator=seeded(s))
        for m, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert_close(a, b, atol=10 * torch.finfo(torch.float32).eps, what="vs torch.optim.AdamW")


def test_same_arguments_as_torch_muon() -> None:
    """torch.optim.Muon's keyword arguments work unchanged; with its settings the step matches it (its
    momentum is the (1 - mu)-dampened lerp form, which Newton-Schulz's normalisation cancels)."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(32, 48))
    b = nn.Parameter(a.detach().clone())
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True, ns_coefficients=(3.4445, -4.775, 2.0315),
              eps=1e-7, ns_steps=5, adjust_lr_fn="original")  # fmt: skip
    ours = Muon([a], ns_dtype=torch.bfloat16, **kw)
    theirs = torch.optim.Muon([b], **kw)
    for s in range(3):
        g = torch.randn(32, 48, generator=seeded(s))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    # both run Newton-Schulz in bf16, on inputs that differ by the (1 - mu) factor: bf16-level agreement
    assert_close(a.detach(), b.detach(), atol=0.02 * 3 * 0.02, what="vs torch.optim.Muon")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nesterov", [True, False])
def test_never_aliases_state_with_grads(dtype: torch.dtype, nesterov: bool) -> None:
    """Regression: torch.optim.Muon with bf16 params and nesterov=False renormalises an alias of its
    momentum buffer in place. Here the buffer must hold exactly mu * M + G after every step."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(16, 24).to(dtype))
    opt = Muon([W], lr=0.01, momentum=0.9, nesterov=nesterov)
    M = torch.zeros_like(W)
    for s in range(3):
        G = torch.randn(16, 24, generator=seeded(s)).to(dtype)
        W.grad = G.clone()
        opt.step()
        M = M.mul(0.9).add(G)
        assert torch.equal(opt.state[W]["momentum_buffer"], M), f"momentum buffer corrupted at step {s}"
        assert torch.equal(W.grad, G), "gradient modified"
    buf, grad = torch.zeros(4, 4), torch.randn(4, 4)
    out = muon_update(grad, buf, momentum=0.9, nesterov=nesterov)
    out.mul_(100.0)
    assert torch.equal(buf, grad) and out.untyped_storage().data_ptr() not in (
        buf.untyped_storage().data_ptr(),
        grad.untyped_storage().data_ptr(),
    )


def test_grad_none_is_skipped() -> None:
    model = _model()
    opt = _opt(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.fc3.weight.requires_grad_(False)  # fc3.weight gets no gradient
    lm_loss(model, _batch(0)).backward()
    model.fc3.weight.requires_grad_(True)
    opt.step()
    assert torch.equal(model.fc3.weight, before["fc3.weight"])
    assert model.fc3.weight not in opt.state
    assert not torch.equal(model.fc1.weight, before["fc1.weight"])


def test_gradient_accumulation_equals_one_large_batch() -> None:
    big, acc = _model(torch.float64), _model(torch.float64)
    opt_b, opt_a = _opt(big), _opt(acc)
    for s in range(2):
        data = _batch(s, n=8)
        opt_b.zero_grad()
        lm_loss(big, data).backward()
        opt_b.step()
        opt_a.zero_grad()
        for half in data.chunk(2):
            (lm_loss(acc, half) / 2).backward()
        opt_a.step()
    for (name, a), b in zip(acc.named_parameters(), big.parameters(), strict=True):
        assert_close(a, b, atol=1e-8, what=name)  # float64 rounding, amplified as above


@pytest.mark.parametrize("foreach", [True, False])
def test_state_dict_round_trip_resumes_bit_for_bit(foreach: bool) -> None:
    model = _model()
    opt = _opt(model, foreach=foreach)
    _train(model, opt, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, 3, seed0=10)

    buffer.seek(0)
    saved = torch.load(buffer)  # weights_only=True by default: the file holds no custom classes
    resumed = _model(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = _opt(resumed, foreach=foreach, lr=0.5)  # hyper-parameters come back from the file
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == 2e-2
    assert isinstance(opt2.param_groups[0]["matrix_spec"][0], (MatrixSpec, type(None)))
    _train(resumed, opt2, 3, seed0=10)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_lr_scheduler_drives_muon_and_adamw() -> None:
    sched_model, manual_model = _model(), _model()
    opt_s, opt_m = _opt(sched_model), _opt(manual_model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda s: 1.0 / (1 + s))
    for s in range(3):
        for g in opt_m.param_groups:
            g["lr"] = 2e-2 / (1 + s)
        _train(sched_model, opt_s, 1, seed0=s)
        _train(manual_model, opt_m, 1, seed0=s)
        sched.step()
    for (name, a), b in zip(sched_model.named_parameters(), manual_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    # and a zero lr freezes both halves of the optimizer (weight decay is lr-scaled too)
    for g in opt_s.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in sched_model.parameters()]
    _train(sched_model, opt_s, 1)
    assert all(torch.equal(a, b) for a, b in zip(sched_model.parameters(), before, strict=True))


def test_update_rms_log_is_0p2_for_every_muon_matrix() -> None:
    model = _model(torch.float64)
    opt = _opt(model, log_update_rms=True)
    _train(model, opt, 2)
    rms = opt.update_rms()
    routes = {r.name: r for r in muon_opt.route_parameters(model)}
    assert set(rms) == set(routes)
    for name, value in rms.items():
        if routes[name].use_muon:
            assert value == pytest.approx(0.2, rel=0.2), name
        else:
            assert 0 < value < 2, name
    assert opt.update_rms() == rms


def test_default_routing_by_ndim_and_polar_express() -> None:
    model = _model()
    with pytest.warns(UserWarning, match="looks like a Conv1d weight"):  # routing by shape alone is flagged
        opt = Muon(model.parameters(), lr=1e-2, ns_coefficients=muon_opt.POLAR_EXPRESS_COEFFICIENTS)
    _train(model, opt, 2)
    assert "momentum_buffer" in opt.state[model.fc1.weight]
    assert "exp_avg" in opt.state[model.fc1.bias]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sparse_and_complex_gradients_are_clear_errors() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Muon([("emb.weight", emb.weight)], lr=1e-2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"'emb.weight'.*sparse"):
        opt.step()
    with pytest.raises(ValueError, match=r"'z'.*complex"):
        Muon([("z", nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64)))])


@pytest.mark.parametrize(
    ("group", "kwargs", "match"),
    [
        ({}, {"lr": -1.0}, "lr="),
        ({}, {"lr": math.inf}, "lr=inf must be a finite"),
        ({}, {"lr": torch.tensor([1e-2, 2e-2])}, r"lr=tensor.*one-element"),
        ({}, {"lr": torch.tensor(1)}, r"lr=tensor\(1\) must be a number or a one-element floating-point"),
        ({}, {"lr": torch.tensor(-1.0)}, r"lr=tensor\(-1.\) must be a finite non-negative"),
        ({}, {"eps": torch.tensor(1e-7)}, "eps=.*only lr and weight_decay may be tensors"),
        ({}, {"adamw_lr_ratio": -0.5}, "adamw_lr_ratio=-0.5"),
        ({"adamw_lr": 1e-3, "adamw_lr_ratio": 0.5}, {}, "sets both adamw_lr and adamw_lr_ratio"),
        ({}, {"momentum": 1.0}, "momentum="),
        ({}, {"ns_steps": 2.5}, "ns_steps="),
        ({}, {"adjust_lr": "adam"}, "adjust_lr="),
        ({}, {"ns_dtype": "int8"}, "ns_dtype"),
        ({}, {"adamw_betas": (0.9, 1.0)}, "adamw_betas="),
        ({"use_muon": True}, {}, "'b'.*not a matrix"),
        ({"use_muon": "yes"}, {}, "use_muon="),
        ({"matrix_spec": [None]}, {}, "one MatrixSpec"),
        ({"matrix_spec": "flat"}, {}, "matrix_spec="),
    ],
)
def test_bad_arguments_name_the_problem(group: dict, kwargs: dict, match: str) -> None:
    params = [("w", nn.Parameter(torch.zeros(4, 4))), ("b", nn.Parameter(torch.zeros(4)))]
    with pytest.raises(ValueError, match=match):
        Muon([{"params": params, **group}], **kwargs)


@pytest.mark.slow
def test_torch_compile_smoke() -> None:
    """A compiled model trains with Muon (the optimizer runs eagerly on the compiled model's params)."""
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    opt = _opt(model)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = lm_loss(compiled, _batch(0))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_scale_uses_logical_shape() -> None:
    """A conv weight's scale comes from its flattened [out, in*k] shape; QKV heads from [head_dim, d]."""
    torch.manual_seed(0)
    conv = nn.Parameter(torch.randn(8, 4, 3, dtype=torch.float64))
    opt = Muon([{"params": [conv], "matrix_spec": MatrixSpec(layout="flatten")}], lr=1.0, weight_decay=0.0)
    G = torch.randn(8, 4, 3, generator=seeded(0), dtype=torch.float64)
    conv.grad = G
    before = conv.detach().clone()
    opt.step()
    O = newton_schulz_reference((G + 0.95 * G).reshape(8, 12)) * update_scale(8, 12, "match_rms_adamw")
    assert_close(before - conv.detach(), O.reshape(8, 4, 3), atol=1e-12, what="conv1d flattened")


@pytest.mark.slow
def test_torch_compile_of_the_step_matches_eager() -> None:
    """``torch.compile`` traces the optimizer step (graph breaks allowed) and gives the eager result."""
    eager_model, compiled_model = _model(torch.float64), _model(torch.float64)
    eager_opt, compiled_opt = _opt(eager_model), _opt(compiled_model)
    compiled_step = torch.compile(compiled_opt.step, backend="aot_eager")
    for s in range(2):
        for model, opt, step in (
            (eager_model, eager_opt, eager_opt.step),
            (compiled_model, compiled_opt, compiled_step),
        ):
            opt.zero_grad()
            lm_loss(model, _batch(s)).backward()
            step()
    for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters(), strict=True):
        assert_close(a, b, atol=1e-10, what=name)


@pytest.mark.cuda
def test_on_device_fast_path_matches_reference(device: torch.device) -> None:
    """On CUDA, ns_dtype='auto' is bf16 (where supported); the batched path stays as close to a float64
    CPU run as the per-parameter reference on the same device."""
    assert muon_opt.resolve_ns_dtype("auto", device) in (torch.bfloat16, torch.float32)
    truth = _model(torch.float64)
    fast, ref = _model().to(device), _model().to(device)
    _train(truth, _opt(truth, foreach=False), 2)
    for model, foreach in ((fast, True), (ref, False)):
        opt = _opt(model, foreach=foreach)
        for s in range(2):
            opt.zero_grad()
            lm_loss(model, _batch(s).to(device)).backward()
            opt.step()
    for (name, t), f, r in zip(truth.named_parameters(), fast.parameters(), ref.parameters(), strict=True):
        assert max_err(f.cpu(), t) <= 2 * max_err(r.cpu(), t) + 1e-5, name
