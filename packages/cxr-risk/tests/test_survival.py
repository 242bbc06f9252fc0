"""Survival heads and losses: the fast Cox loss against its loop reference and lifelines; discrete heads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter

from cxr_risk.survival import (
    CXR_RISK_CUTPOINTS,
    BinaryHorizonHead,
    CoxHead,
    LogisticHazardHead,
    SurvivalConfig,
    binary_horizon_targets,
    cox_ph_loss,
    cox_ph_loss_reference,
    logistic_hazard_loss,
    quantile_cutpoints,
    risk_groups,
)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    eps = torch.finfo(dtype).eps
    atol = rtol = 50 * eps**0.5 if dtype != torch.float64 else 1e-10
    err = (actual - expected).abs().max().item()
    rel = err / max(expected.abs().max().item(), 1e-30)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (
        f"{name}: abs err {err:.3g}, rel err {rel:.3g}"
    )


def _data(n: int, seed: int, n_times: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    risk = torch.randn(n, generator=g, dtype=dtype)
    time = torch.randint(1, n_times + 1, (n,), generator=g).to(dtype)  # few distinct times -> many ties
    event = (torch.rand(n, generator=g) < 0.6).to(dtype)
    return risk, time, event


@pytest.mark.parametrize("ties", ["efron", "breslow"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "n,n_times", [(1, 1), (7, 3), (63, 5), (200, 200)], ids=["N1", "N7-T3", "N63-T5", "N200"]
)
def test_cox_loss_matches_reference_forward_and_grad(ties, dtype, n, n_times):
    risk, time, event = _data(n, seed=n, n_times=n_times, dtype=dtype)
    event[0] = 1
    r1 = risk.clone().requires_grad_(True)
    r2 = risk.clone().requires_grad_(True)
    l1 = cox_ph_loss(r1, time, event, ties=ties)
    l2 = cox_ph_loss_reference(r2, time, event, ties=ties)
    (g1,) = torch.autograd.grad(l1, r1)
    (g2,) = torch.autograd.grad(l2, r2)
    assert_close(l1, l2, dtype, "loss")
    assert_close(g1, g2, dtype, "grad")


def test_cox_loss_is_lifelines_partial_likelihood_at_its_mle():
    risk, time, event = _data(80, seed=3, n_times=12)
    x = risk.numpy()
    cph = CoxPHFitter().fit(pd.DataFrame({"x": x, "t": time.numpy(), "e": event.numpy()}), "t", "e")
    beta = torch.tensor(cph.params_["x"], dtype=torch.float64, requires_grad=True)
    loss = cox_ph_loss(risk * beta, time, event)
    (grad,) = torch.autograd.grad(loss, beta)
    assert abs(-loss.item() * event.sum().item() - cph.log_likelihood_) < 1e-6
    assert abs(grad.item()) < 1e-5  # lifelines' estimate is our optimum too (Efron ties)


def test_cox_loss_shift_invariant_and_large_values_stable():
    risk, time, event = _data(50, seed=1, n_times=10)
    a = cox_ph_loss(risk, time, event)
    b = cox_ph_loss(risk + 1000.0, time, event)
    assert torch.isfinite(b) and abs(a.item() - b.item()) < 1e-9


def test_cox_no_event_batch_gives_zero_with_gradient():
    risk = torch.randn(5, requires_grad=True)
    loss = cox_ph_loss(risk, torch.arange(5.0), torch.zeros(5))
    loss.backward()
    assert loss.item() == 0.0 and risk.grad is not None and torch.all(risk.grad == 0)


def test_cox_rejects_bad_shapes():
    with pytest.raises(ValueError, match="1-D"):
        cox_ph_loss(torch.zeros(3, 1), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="ties"):
        cox_ph_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), ties="exact")  # type: ignore[arg-type]


def test_logistic_hazard_loss_by_hand():
    cuts = torch.tensor([0.0, 1.0, 2.0, 3.0])
    logits = torch.tensor([[0.1, -0.2, 0.3], [0.5, 0.0, -1.0], [0.2, 0.2, 0.2]], requires_grad=True)
    time = torch.tensor([1.5, 2.5, 9.0])  # intervals 1, 2, beyond the last cut
    event = torch.tensor([1.0, 0.0, 1.0])
    sp = torch.nn.functional.softplus
    # patient 0: survived int 0, died in int 1; patient 1: survived 0, 1, censored inside 2; patient 2: survived all
    expected = (
        sp(logits[0, 0]) + sp(-logits[0, 1]) + sp(logits[1, 0]) + sp(logits[1, 1]) + sp(logits[2]).sum()
    ) / 3
    got = logistic_hazard_loss(logits, time, event, cuts)
    assert abs(got.item() - expected.item()) < 1e-6


def test_logistic_hazard_survival_curve():
    cfg = SurvivalConfig(kind="logistic_hazard", horizon=2.0, t_max=3.0, n_intervals=3)
    head = LogisticHazardHead(4, cfg)
    out = torch.zeros(2, 3)  # h = 0.5 per interval
    s = head.survival(out, [0.0, 1.0, 2.0, 3.0, 1.5])
    assert torch.allclose(s[0], torch.tensor([1.0, 0.5, 0.25, 0.125, 0.5**1.5]))
    assert torch.allclose(head.prob_event_by(out), torch.full((2,), 0.75))


def test_binary_horizon_targets_censored_before_horizon():
    time = torch.tensor([1.0, 5.0, 12.0, 13.0, 3.0])
    event = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    y, w = binary_horizon_targets(time, event, horizon=12.0)
    assert y.tolist() == [1, 0, 1, 0, 0]
    assert w.tolist() == [1, 0, 1, 1, 0]  # censored at 5 and 3: unknown status at 12 years
    _, w2 = binary_horizon_targets(time, event, horizon=12.0, censored="ipcw")
    assert w2[1] == 0 and w2[4] == 0 and bool((w2[[0, 2, 3]] >= 1).all())
    head = BinaryHorizonHead(3, SurvivalConfig(kind="binary", horizon=12.0))
    with pytest.raises(ValueError, match="only knows S"):
        head.survival(torch.zeros(2), [5.0])


def test_cox_head_baseline_matches_lifelines_breslow():
    risk, time, event = _data(60, seed=5, n_times=10)
    cfg = SurvivalConfig(kind="cox", horizon=6.0, t_max=10.0, n_intervals=10)
    head = CoxHead(2, cfg)
    head.fit_baseline(risk, time, event)
    cph = CoxPHFitter(baseline_estimation_method="breslow").fit(
        pd.DataFrame({"x": risk.numpy(), "t": time.numpy(), "e": event.numpy()}), "t", "e"
    )
    # evaluate with lifelines' fitted beta and compare S(t | x) on integer times
    beta = float(cph.params_["x"])
    head.fit_baseline(risk * beta, time, event)
    times = [2.0, 5.0, 6.0, 9.0]
    ours = head.survival(risk[:5] * beta, times).numpy()
    theirs = cph.predict_survival_function(pd.DataFrame({"x": risk[:5].numpy()}), times=times).to_numpy().T
    assert np.allclose(ours, theirs, atol=1e-6), np.abs(ours - theirs).max()


def test_risk_groups_and_quantiles():
    p = np.array([0.0, 0.064, 0.08, 0.1, 0.2, 0.5, 0.348])
    assert risk_groups(p).tolist() == [0, 1, 1, 2, 3, 4, 4]
    assert CXR_RISK_CUTPOINTS == (0.064, 0.096, 0.158, 0.348)
    rng = np.random.default_rng(0)
    q = rng.random(1000)
    counts = np.bincount(risk_groups(q, quantile_cutpoints(q)), minlength=5)
    assert counts.min() >= 195 and counts.max() <= 205
    with pytest.raises(ValueError, match="increasing"):
        risk_groups(p, (0.2, 0.1))


def test_config_validates():
    with pytest.raises(ValueError, match="kind"):
        SurvivalConfig(kind="weibull")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t_max"):
        SurvivalConfig(horizon=12, t_max=5)
    g = SurvivalConfig(horizon=7.0, t_max=10.0, n_intervals=4).grid()
    assert 7.0 in g.tolist() and g.numel() == 6
