"""One LR schedule drives Muon and AdamW; tensor learning rates and step counts; a compiled step compiles once.

AdamW's lr is ``lr * adamw_lr_ratio`` (``adamw_lr`` is read as that ratio at construction), so a scheduler
that moves ``lr`` moves AdamW by the same factor. The reference for the AdamW half is ``torch.optim.AdamW``
driven by the same scheduler from ``adamw_lr``; gradients are fixed random tensors (not backprop), so the
AdamW parameters see the same gradients whatever Muon does to the matrix.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
from close import assert_close, seeded
from torch import nn
from torch.optim import lr_scheduler

from muon_opt import Muon

LR, ADAMW_LR, WD = 1e-2, 3e-3, 0.1
STEPS = 6
FACTORS = (1.0, 0.5, 0.0, 0.25, 1.0, 0.1, 2.0)  # LambdaLR's, one per step and one after the last; includes 0


def _params(dtype: torch.dtype = torch.float32) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    g = seeded(0)
    return (
        nn.Parameter(torch.randn(16, 12, generator=g, dtype=dtype)),  # Muon
        nn.Parameter(torch.randn(16, generator=g, dtype=dtype)),  # AdamW
        nn.Parameter(torch.randn(12, generator=g, dtype=dtype) + 1),  # AdamW
    )


def _grads(step: int, params: tuple[nn.Parameter, ...]) -> None:
    g = seeded(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, float], lr_scheduler.LRScheduler]] = {
    "LambdaLR": lambda opt, peak: lr_scheduler.LambdaLR(opt, lambda s: FACTORS[s]),
    # OneCycleLR sets lr from its own max_lr; cycle_momentum=False keeps torch AdamW's beta1 fixed
    "OneCycleLR": lambda opt, peak: lr_scheduler.OneCycleLR(
        opt, max_lr=peak, total_steps=STEPS + 1, cycle_momentum=False
    ),
    "CosineAnnealingLR": lambda opt, peak: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "reference"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_adamw_params_follow_the_schedule(name: str, foreach: bool) -> None:
    """AdamW parameters move exactly as torch.optim.AdamW's under the same schedule from adamw_lr."""
    w, b, g = _params()
    _, b_ref, g_ref = (nn.Parameter(p.detach().clone()) for p in (w, b, g))
    opt = Muon([{"params": [w]}, {"params": [b, g], "use_muon": False}], lr=LR, weight_decay=WD,
               adamw_lr=ADAMW_LR, foreach=foreach)  # fmt: skip
    ref = torch.optim.AdamW([b_ref, g_ref], lr=ADAMW_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    sched, ref_sched = SCHEDULERS[name](opt, LR), SCHEDULERS[name](ref, ADAMW_LR)
    for s in range(STEPS):
        _grads(s, (w, b, g))
        b_ref.grad, g_ref.grad = b.grad.clone(), g.grad.clone()
        before = [p.detach().clone() for p in (w, b, g)]
        opt.step()
        ref.step()
        assert opt.param_groups[1]["lr"] * opt.param_groups[1]["adamw_lr_ratio"] == pytest.approx(
            ref.param_groups[0]["lr"], rel=1e-12
        )
        for mine, theirs, what in ((b, b_ref, "b"), (g, g_ref, "g")):
            assert_close(
                mine, theirs, atol=10 * torch.finfo(torch.float32).eps, what=f"{name} step {s}: {what}"
            )
        if opt.param_groups[0]["lr"] == 0:  # factor 0: nothing moves, not even by weight decay
            assert all(torch.equal(p, q) for p, q in zip((w, b, g), before, strict=True)), f"step {s} moved"
        sched.step()
        ref_sched.step()


def test_adamw_update_scales_with_the_lr_factor() -> None:
    """From the same state, a step at lr factor f moves every parameter by f times the factor-1 step."""
    f = 0.25
    deltas = []
    for last in (1.0, f):
        w, b, g = _params(torch.float64)
        opt = Muon([{"params": [w]}, {"params": [b, g], "use_muon": False}], lr=LR, weight_decay=WD,
                   adamw_lr=ADAMW_LR)  # fmt: skip
        sched = lr_scheduler.LambdaLR(opt, lambda s, last=last: 1.0 if s == 0 else last)
        _grads(0, (w, b, g))
        opt.step()
        sched.step()
        _grads(1, (w, b, g))
        before = [p.detach().clone() for p in (w, b, g)]
        opt.step()
        deltas.append([p.detach() - q for p, q in zip((w, b, g), before, strict=True)])
    for full, scaled, what in zip(deltas[0], deltas[1], ("w (Muon)", "b (AdamW)", "g (AdamW)"), strict=True):
        assert full.abs().max() > 1e-5, what
        assert_close(scaled, f * full, atol=1e-15, what=what)


def test_adamw_lr_is_stored_as_a_ratio_of_lr() -> None:
    w, b, _ = _params()
    opt = Muon([{"params": [w]}, {"params": [b], "use_muon": False, "lr": 0.5}], lr=LR, adamw_lr=ADAMW_LR)
    # adamw_lr is AdamW's lr at each group's initial lr: the ratio is per group
    assert opt.param_groups[0]["adamw_lr_ratio"] == pytest.approx(0.3)
    assert opt.param_groups[1]["adamw_lr_ratio"] == pytest.approx(ADAMW_LR / 0.5)
    assert all("adamw_lr" not in group for group in opt.param_groups)
    by_ratio = Muon([{"params": [w], "adamw_lr_ratio": 0.3}], lr=LR, adamw_lr=0.5)  # the group's own wins
    assert by_ratio.param_groups[0]["adamw_lr_ratio"] == 0.3
    with pytest.raises(ValueError, match="adamw_lr_ratio"):
        Muon([w], lr=LR, adamw_lr=ADAMW_LR, adamw_lr_ratio=0.3)
    with pytest.raises(ValueError, match=r"adamw_lr=0.003 with lr=0"):
        Muon([w], lr=0.0, adamw_lr=ADAMW_LR)
    opt.param_groups[1]["adamw_lr"] = (
        1e-4  # the pre-ratio way to change AdamW's lr: a clear error, not ignored
    )
    _grads(0, (w, b))
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['adamw_lr'\].*adamw_lr_ratio"):
        opt.step()


def _opt_for_checkpoint(params: tuple[nn.Parameter, ...], **kw) -> Muon:
    # powers of two, so that the ratio of an old file's adamw_lr to lr is exact
    return Muon([{"params": [params[0]]}, {"params": list(params[1:]), "use_muon": False}],
                lr=2.0**-6, weight_decay=WD, **kw)  # fmt: skip


def test_loads_a_checkpoint_written_before_the_ratio() -> None:
    """Older files: ``adamw_lr`` absolute in the groups and integer AdamW steps. They load, and the next
    steps are bit-for-bit those of the uninterrupted run."""
    params = _params()
    opt = _opt_for_checkpoint(params, adamw_lr=2.0**-8)
    for s in range(2):
        _grads(s, params)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group["adamw_lr"] = group.pop("adamw_lr_ratio") * group["lr"]
    for st in saved["state"].values():
        if "step" in st:
            st["step"] = int(st["step"])
    resumed_params = tuple(nn.Parameter(p.detach().clone()) for p in params)
    for s in range(2, 4):
        _grads(s, params)
        opt.step()

    resumed = _opt_for_checkpoint(resumed_params)  # built without adamw_lr: the file brings it
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.param_groups[1]["adamw_lr_ratio"] == 0.25
    assert isinstance(resumed.state[resumed_params[1]]["step"], torch.Tensor)
    for s in range(2, 4):
        _grads(s, resumed_params)
        resumed.step()
    for a, b in zip(params, resumed_params, strict=True):
        assert torch.equal(a, b)
    bad = copy.deepcopy(saved)
    next(st for st in bad["state"].values() if "step" in st)["step"] = 2.5
    with pytest.raises(ValueError, match=r"state 'step'=2.5 must be a non-negative whole number"):
        _opt_for_checkpoint(resumed_params).load_state_dict(bad)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "reference"])
def test_tensor_lr_matches_float_lr(foreach: bool) -> None:
    """``lr=torch.tensor(...)``: schedulers update it in place, the steps equal the Python-float ones to
    rounding, each group keeps its own tensor, and the AdamW step count is a tensor."""
    runs = []
    for lr in (LR, torch.tensor(LR, dtype=torch.float64)):
        params = _params(torch.float64)
        opt = Muon([{"params": [params[0]]}, {"params": list(params[1:]), "use_muon": False}], lr=lr,
                   weight_decay=WD, adamw_lr_ratio=0.3, foreach=foreach)  # fmt: skip
        sched = lr_scheduler.LambdaLR(opt, [lambda s: FACTORS[s], lambda s: FACTORS[-1 - s]])
        for s in range(STEPS - 1):
            _grads(s, params)
            opt.step()
            sched.step()
        runs.append((params, opt))
    (floats, _), (tensors, opt) = runs
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert opt.param_groups[0]["lr"] is not opt.param_groups[1]["lr"]
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(LR * FACTORS[STEPS - 1])
    assert float(opt.param_groups[1]["lr"]) == pytest.approx(LR * FACTORS[-STEPS])
    step = opt.state[tensors[1]]["step"]
    assert isinstance(step, torch.Tensor) and float(step) == STEPS - 1
    for a, b, what in zip(floats, tensors, "wbg", strict=True):
        assert_close(b, a, atol=1e-14, what=what)


class _CountingBackend:
    """A torch.compile backend that counts the graphs it is asked to compile and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return gm.forward


def _compiled_run(lr: float | torch.Tensor, steps: int) -> tuple[list[int], tuple[nn.Parameter, ...], Muon]:
    torch._dynamo.reset()
    params = _params(torch.float64)
    opt = Muon([{"params": [params[0]]}, {"params": list(params[1:]), "use_muon": False}], lr=lr,
               weight_decay=WD, adamw_lr_ratio=0.3, max_grad_norm=1.0)  # fmt: skip
    sched = lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    backend = _CountingBackend()
    step = torch.compile(opt.step, backend=backend)
    graphs = []
    for s in range(steps):
        _grads(s, params)
        step()
        sched.step()
        graphs.append(backend.graphs)
    return graphs, params, opt


def test_compiled_step_compiles_once_under_a_schedule() -> None:
    """With a tensor lr (and the tensor step count), ``torch.compile(opt.step)`` compiles its graphs on the
    first call and never again while LambdaLR changes the lr; the result equals the eager float-lr run.
    Counted with a custom backend (eager execution of the captured graphs, so the test stays fast); the
    float-lr run shows that the counter does see recompilations."""
    steps = 5
    graphs, compiled, compiled_opt = _compiled_run(torch.tensor(LR, dtype=torch.float64), steps)
    assert graphs[0] > 0 and graphs == [graphs[0]] * steps, f"graphs compiled after each step: {graphs}"
    eager = _params(torch.float64)
    opt = Muon([{"params": [eager[0]]}, {"params": list(eager[1:]), "use_muon": False}], lr=LR,
               weight_decay=WD, adamw_lr_ratio=0.3, max_grad_norm=1.0)  # fmt: skip
    sched = lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for s in range(steps):
        _grads(s, eager)
        opt.step()
        sched.step()
    for a, b, what in zip(compiled, eager, "wbg", strict=True):
        assert_close(a, b, atol=1e-12, what=f"compiled vs eager: {what}")
    # the pre-clip norm is recorded by the compiled step too (it clipped: the norm is above max_grad_norm)
    assert float(compiled_opt.last_grad_norm) == pytest.approx(float(opt.last_grad_norm), rel=1e-12)
    assert float(opt.last_grad_norm) > 1.0
    float_graphs, _, _ = _compiled_run(LR, 3)
    assert float_graphs[-1] > float_graphs[0], f"a Python-float lr should recompile: {float_graphs}"
    torch._dynamo.reset()
