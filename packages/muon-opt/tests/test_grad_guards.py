"""Gradient guards of muon_opt.Muon: non-finite gradients never reach the state, huge finite ones do not
overflow Newton-Schulz's normalisation, and ``max_grad_norm`` is ``clip_grad_norm_`` done inside the step.

The clipping reference is ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` followed by an
unclipped ``muon_opt.Muon`` step. Muon and AdamW are both nearly invariant to a constant gradient scale, so
the losses are scaled differently at each step (``LOSS_SCALES``): the clip factors then differ from step to
step and change the momentum mix, and the test checks that the clipped run is far from the unclipped one.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from close import assert_close, max_err, seeded
from models import TinyGPT, lm_loss
from torch import nn

from muon_opt import Muon, param_groups

LOSS_SCALES = (1.0, 8.0, 0.25, 3.0)


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 37, (4, 9), generator=seeded(seed))


def _model(dtype: torch.dtype = torch.float64) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT().to(dtype)


def _opt(model: nn.Module, **kw) -> Muon:
    return Muon(param_groups(model, specs=TinyGPT.specs()), lr=2e-2, **kw)


def _backward(model: nn.Module, step: int) -> None:
    model.zero_grad(set_to_none=True)
    (lm_loss(model, _batch(step)) * LOSS_SCALES[step % len(LOSS_SCALES)]).backward()


def _snapshot(model: nn.Module, opt: Muon) -> tuple[list[torch.Tensor], list[dict]]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(list(opt.state.values()))


def _assert_unchanged(model: nn.Module, opt: Muon, snap: tuple[list[torch.Tensor], list[dict]]) -> None:
    params, states = snap
    for (name, p), q in zip(model.named_parameters(), params, strict=True):
        assert torch.equal(p, q), f"{name} changed"
    now = list(opt.state.values())
    assert len(now) == len(states), "state entries were added"
    for a, b in zip(now, states, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"state {k!r} changed"


# ---------------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "reference"])
@pytest.mark.parametrize(
    ("name", "value"),
    [("fc1.weight", math.nan), ("ln2.bias", math.inf), ("experts", -math.inf)],
    ids=["muon-nan", "adamw-inf", "muon3d-neginf"],
)
def test_nonfinite_gradient_raises_naming_the_parameter(name: str, value: float, foreach: bool) -> None:
    model = _model(torch.float32)
    opt = _opt(model, foreach=foreach)
    _backward(model, 0)
    opt.step()  # state exists: the bad step must not touch it
    snap = _snapshot(model, opt)
    _backward(model, 1)
    param = dict(model.named_parameters())[name]
    param.grad.view(-1)[3] = value
    gi = next(i for i, g in enumerate(opt.param_groups) if any(p is param for p in g["params"]))
    j = next(j for j, p in enumerate(opt.param_groups[gi]["params"]) if p is param)
    kind = "nan" if math.isnan(value) else "inf"
    shape = str(tuple(param.shape)).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(
        FloatingPointError,
        match=rf"'{name}' \(param_groups\[{gi}\]\['params'\]\[{j}\], shape {shape}\): {kind}",
    ):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_nonfinite_error_without_names_gives_group_index_and_shape() -> None:
    w, b = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.zeros(6))
    opt = Muon([{"params": [w]}, {"params": [b], "use_muon": False}], lr=1e-2)
    w.grad, b.grad = torch.randn(6, 5), torch.full((6,), math.nan)
    b.grad[0] = math.inf
    with pytest.raises(
        FloatingPointError, match=r"\(param_groups\[1\]\['params'\]\[0\], shape \(6,\)\): nan/inf"
    ):
        opt.step()
    assert not opt.state


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "reference"])
def test_nonfinite_skip_warns_and_the_run_continues_as_if_the_step_never_happened(foreach: bool) -> None:
    model, clean = _model(), _model()
    opt, opt_clean = _opt(model, foreach=foreach, nonfinite="skip"), _opt(clean, foreach=foreach)
    for s in (0, 1):
        _backward(model, s)
        opt.step()
        _backward(clean, s)
        opt_clean.step()
    snap = _snapshot(model, opt)
    _backward(model, 2)
    model.fc2.weight.grad[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match=r"'fc2.weight'.*: nan; step skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert not bool(torch.isfinite(opt.last_grad_norm))
    _assert_unchanged(model, opt, snap)
    for s in (3, 4):
        _backward(model, s)
        opt.step()
        _backward(clean, s)
        opt_clean.step()
    for (name, a), b in zip(model.named_parameters(), clean.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_guard_holds_in_a_compiled_step(mode: str) -> None:
    """``torch.compile(opt.step)``: the host-synced check still raises or skips, and leaves the state alone."""
    torch._dynamo.reset()
    w, b = nn.Parameter(torch.randn(6, 5, generator=seeded(0))), nn.Parameter(torch.zeros(6))
    opt = Muon([{"params": [w]}, {"params": [b], "use_muon": False}], lr=torch.tensor(1e-2), nonfinite=mode)
    step = torch.compile(opt.step, backend="eager")
    for s in range(3):
        w.grad, b.grad = torch.randn(6, 5, generator=seeded(s)), torch.randn(6, generator=seeded(10 + s))
        if s == 1:
            b.grad[2] = math.nan
            before = (w.detach().clone(), b.detach().clone(), opt.state[b]["exp_avg"].clone())
            if mode == "raise":
                with pytest.raises(
                    FloatingPointError, match=r"param_groups\[1\]\['params'\]\[0\], shape \(6,\)\): nan"
                ):
                    step()
            else:
                with pytest.warns(RuntimeWarning, match="step skipped"):
                    step()
            assert torch.equal(w, before[0]) and torch.equal(b, before[1])
            assert torch.equal(opt.state[b]["exp_avg"], before[2]) and float(opt.state[b]["step"]) == 1.0
        else:
            step()
    assert opt.skipped_steps == (1 if mode == "skip" else 0)
    assert float(opt.state[b]["step"]) == 2.0
    torch._dynamo.reset()


# ---------------------------------------------------------------------- huge finite gradients


def test_huge_finite_gradient_does_not_overflow_newton_schulz() -> None:
    """Entries near 1e38 (the Nesterov input 1.95 G stays finite in fp32): the update is that of the same
    gradient scaled by 2^-100, bit for bit. Before the rescaled norm, ||G||_F overflowed to inf and the
    Muon update silently became zero."""
    results = []
    for scale in (1.0, 2.0**-100):
        w = nn.Parameter(torch.randn(24, 40, generator=seeded(0)))
        opt = Muon([w], lr=1e-2, weight_decay=0.0)
        G = (torch.rand(24, 40, generator=seeded(1)) * 2 - 1) * 1e38
        w.grad = G * scale
        opt.step()
        results.append((w.detach().clone(), opt.last_grad_norm))
    (huge, huge_norm), (normal, _) = results
    assert torch.isfinite(huge).all()
    assert torch.equal(huge, normal)
    # the fp32 norm overflows; the step recomputes it in fp64 (what clip_grad_norm_ would give: inf)
    assert huge_norm.dtype == torch.float64
    assert float(huge_norm) == pytest.approx(float(G.double().norm()), rel=1e-6)


# ---------------------------------------------------------------------- clipping


def _clipped_reference(max_norm: float, steps: int, foreach: bool) -> tuple[TinyGPT, list[float]]:
    model = _model()
    opt = _opt(model, foreach=foreach)
    norms = []
    for s in range(steps):
        _backward(model, s)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
    return model, norms


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "reference"])
def test_max_grad_norm_equals_clip_grad_norm_then_muon(foreach: bool) -> None:
    steps, max_norm = 4, 0.5
    ref, ref_norms = _clipped_reference(max_norm, steps, foreach)
    unclipped, _ = _clipped_reference(math.inf, steps, foreach)
    model = _model()
    opt = _opt(model, foreach=foreach, max_grad_norm=max_norm)
    norms = []
    for s in range(steps):
        _backward(model, s)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        norms.append(float(opt.last_grad_norm))
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True)), (
            "grad changed"
        )
    assert min(ref_norms) > 2 * max_norm, f"the reference must clip at every step: {ref_norms}"
    assert norms == pytest.approx(ref_norms, rel=1e-12)
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert_close(a, b, atol=1e-10, what=name)
    # the check above can fail: clipping changes the run far beyond its tolerance
    assert max(max_err(b, c) for b, c in zip(ref.parameters(), unclipped.parameters(), strict=True)) > 1e-4


def test_max_grad_norm_that_never_binds_changes_nothing() -> None:
    """math.inf (log only) and a bound above every norm give the unclipped run bit for bit."""
    runs = []
    for max_norm in (None, math.inf, 1e9):
        model = _model(torch.float32)
        opt = _opt(model, max_grad_norm=max_norm)
        for s in range(3):
            _backward(model, s)
            opt.step()
        runs.append((model, opt.last_grad_norm))
    for model, norm in runs[1:]:
        assert float(norm) == float(runs[0][1]) > 0
        for a, b in zip(model.parameters(), runs[0][0].parameters(), strict=True):
            assert torch.equal(a, b)


def test_grad_norm_is_recorded_even_without_clipping() -> None:
    model = _model()
    opt = _opt(model)
    assert opt.last_grad_norm is None
    _backward(model, 0)
    expected = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
    opt.step()
    assert float(opt.last_grad_norm) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm=0.0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0"),
        ({"max_grad_norm": math.nan}, "max_grad_norm=nan"),
        ({"max_grad_norm": "1"}, "max_grad_norm='1'"),
        ({"nonfinite": "ignore"}, "nonfinite='ignore'"),
    ],
)
def test_bad_guard_arguments_name_the_problem(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Muon([nn.Parameter(torch.zeros(3, 3))], **kwargs)
