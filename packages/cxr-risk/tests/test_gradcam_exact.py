"""Grad-CAM equals a hand computation on a model whose last feature map and head are linear.

The encoder here is one strided convolution with known kernels, so the feature maps A_k are block sums of
the image, and the head is the package's own survival head with known weights. For a linear head (Cox,
binary) d risk / d A_k(i, j) = w_k / (h w) everywhere, so alpha_k = w_k / (h w); for the logistic-hazard head
risk = 1 - prod_{k <= k_h} sigmoid(-z_k), whose gradient is written out below. The map is then
ReLU(sum_k alpha_k A_k), bilinearly upsampled (align_corners=False, written out in numpy) and divided by its
maximum, as ``cxr_risk.gradcam`` documents. Everything is recomputed in float64 numpy from the weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cxr_risk.backbones import RiskModel, create_encoder
from cxr_risk.gradcam import grad_cam
from cxr_risk.survival import SurvivalConfig

torch.set_num_threads(1)
HEADS = ("cox", "binary", "logistic_hazard")


class BlockMaps(nn.Module):
    """Stands in for :class:`~cxr_risk.backbones.Encoder`: A = conv2d(x, kernels, stride r), no bias."""

    def __init__(self, kernels: Tensor) -> None:
        super().__init__()
        self.kernels = nn.Parameter(kernels[:, None].clone())  # [C, 1, r, r]
        self.num_features = int(kernels.shape[0])
        self.reduction = int(kernels.shape[-1])

    def forward_maps(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.kernels, stride=self.reduction)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_maps(x).mean(dim=(2, 3))


def linear_model(kernels: np.ndarray, w: np.ndarray, kind: str, dtype: torch.dtype) -> RiskModel:
    """A RiskModel with encoder :class:`BlockMaps` and head weight ``w`` ([out, C]), bias 0.3."""
    model = RiskModel(BlockMaps(torch.as_tensor(kernels)), SurvivalConfig(kind=kind, horizon=8.0))  # type: ignore[arg-type]
    model = model.to(dtype)  # before the copy, so that float64 weights are not rounded to float32
    with torch.no_grad():
        model.head.linear.weight.copy_(torch.as_tensor(w))
        model.head.linear.bias.fill_(0.3)
    return model


def feature_maps(image: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """A_k(i, j) = sum_{a, b} K_k(a, b) x(r i + a, r j + b): the strided convolution as block sums."""
    r = kernels.shape[-1]
    h, w = image.shape[0] // r, image.shape[1] // r
    blocks = image[: h * r, : w * r].reshape(h, r, w, r).transpose(0, 2, 1, 3)  # [h, w, r, r]
    return np.einsum("ijab,kab->kij", blocks, kernels)


def head_gradient(
    kind: str, w: np.ndarray, bias: float, feats: np.ndarray, config: SurvivalConfig
) -> np.ndarray:
    """d risk_score / d pooled features, [C]."""
    if kind in ("cox", "binary"):
        return w[0]  # risk = w . f + b
    z = w @ feats + bias  # one logit per interval
    cuts = config.grid().double().numpy()
    k_h = int(np.flatnonzero(np.isclose(cuts, config.horizon))[0])  # intervals 0..k_h-1 end by the horizon
    sig = 1.0 / (1.0 + np.exp(-z[:k_h]))
    survival = np.prod(1.0 - sig)
    # risk = 1 - prod_k (1 - sigmoid(z_k)): d risk / d z_k = S * sigmoid(z_k) for the intervals before t_h
    dz = np.zeros_like(z)
    dz[:k_h] = survival * sig
    return w.T @ dz


def upsample_bilinear(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch's bilinear interpolation with align_corners=False: src = (dst + 0.5) * in / out - 0.5, >= 0."""
    out = cam
    for axis, n_out in enumerate(size):
        n_in = out.shape[axis]
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        shape = [1, 1]
        shape[axis] = n_out
        out = np.take(out, lo, axis=axis) * (1 - frac).reshape(shape) + np.take(
            out, hi, axis=axis
        ) * frac.reshape(shape)
    return out


def hand_grad_cam(image: np.ndarray, kernels: np.ndarray, w: np.ndarray, kind: str) -> np.ndarray:
    maps = feature_maps(image, kernels)
    feats = maps.mean(axis=(1, 2))
    alpha = head_gradient(kind, w, 0.3, feats, SurvivalConfig(kind=kind, horizon=8.0)) / maps[0].size
    cam = np.maximum(np.einsum("k,kij->ij", alpha, maps), 0.0)
    cam = upsample_bilinear(cam, image.shape)
    return cam / cam.max() if cam.max() > 0 else cam


def assert_matches(actual: Tensor, expected: np.ndarray, atol: float) -> None:
    a = actual.detach().double().numpy()
    assert a.shape == expected.shape, (a.shape, expected.shape)
    err = np.abs(a - expected)
    rel = err.max() / max(np.abs(expected).max(), 1e-300)
    assert err.max() <= atol, f"max abs error {err.max():.3g} (relative {rel:.3g}) > {atol:.3g}"


def random_case(h: int, w: int, r: int, c: int, kind: str, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.0, 1.0, (h, w))
    kernels = rng.normal(0.0, 1.0, (c, r, r))
    n_out = SurvivalConfig(kind=kind, horizon=8.0).grid().numel() - 1 if kind == "logistic_hazard" else 1
    weights = rng.normal(0.0, 1.0, (n_out, c))
    return image, kernels, weights


SHAPES = [(28, 20, 4, 3), (30, 22, 4, 5), (35, 25, 5, 2), (16, 16, 1, 4)]


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("h,w,r,c", SHAPES, ids=[f"H{h}-W{w}-r{r}-C{c}" for h, w, r, c in SHAPES])
def test_grad_cam_equals_hand_computation(h, w, r, c, kind):
    for seed in range(4):  # a few draws, so that some have mixed-sign channel sums under the ReLU
        image, kernels, weights = random_case(h, w, r, c, kind, seed)
        expected = hand_grad_cam(image, kernels, weights, kind)
        model = linear_model(kernels, weights, kind, torch.float64)
        cam = grad_cam(model, torch.as_tensor(image)[None, None])
        assert cam.shape == (h, w)
        # float64 throughout: the only error is rounding in sums of a few hundred terms; except that the
        # logistic-hazard head evaluates S(t) in float32 (LogisticHazardHead.survival upcasts with .float())
        assert_matches(cam, expected, atol=1e-6 if kind == "logistic_hazard" else 1e-12)
        assert all(p.grad is None for p in model.parameters())  # no gradient left on the weights


@pytest.mark.parametrize("kind", HEADS)
def test_grad_cam_float32_within_rounding(kind):
    image, kernels, weights = random_case(28, 20, 4, 3, kind, seed=7)
    expected = hand_grad_cam(image, kernels, weights, kind)
    cam = grad_cam(
        linear_model(kernels, weights, kind, torch.float32),
        torch.as_tensor(image, dtype=torch.float32)[None, None],
    )
    # float32: sums of r*r*C ~ 50 products and a normalisation, each ~ 6e-8 relative; 1e-5 leaves room
    assert_matches(cam, expected, atol=1e-5)


def test_negative_contributions_give_an_all_zero_map():
    """Non-negative image and kernels, negative head weights: sum_k alpha_k A_k < 0 everywhere."""
    rng = np.random.default_rng(3)
    image = rng.uniform(0.1, 1.0, (24, 24))
    kernels = rng.uniform(0.1, 1.0, (3, 4, 4))
    weights = -rng.uniform(0.5, 1.0, (1, 3))
    cam = grad_cam(linear_model(kernels, weights, "cox", torch.float64), torch.as_tensor(image)[None, None])
    assert cam.shape == (24, 24) and torch.isfinite(cam).all()
    assert torch.count_nonzero(cam) == 0, float(cam.abs().max())


def test_map_peaks_at_the_only_bright_block():
    """One bright 5x5 block in a black image: the map is 1 at that block's centre pixel and 0 two cells away."""
    r, i0, j0 = 5, 4, 2
    image = np.zeros((35, 25))
    image[r * i0 : r * (i0 + 1), r * j0 : r * (j0 + 1)] = 0.9
    kernels = np.ones((2, r, r))
    kernels[1] *= 0.5
    cam = grad_cam(
        linear_model(kernels, np.array([[1.0, 2.0]]), "cox", torch.float64),
        torch.as_tensor(image)[None, None],
    )
    peak = np.unravel_index(int(torch.argmax(cam)), cam.shape)
    # with an odd r, pixel r*i + (r-1)/2 samples cell i exactly: the maximum is there and equals 1
    assert peak == (r * i0 + r // 2, r * j0 + r // 2)
    assert float(cam[peak]) == pytest.approx(1.0, abs=1e-12)
    assert int((cam == cam.max()).sum()) == 1
    # bilinear support reaches only the neighbouring cells' centres
    far = np.ones(cam.shape, dtype=bool)
    far[
        r * (i0 - 1) + r // 2 + 1 : r * (i0 + 1) + r // 2, r * (j0 - 1) + r // 2 + 1 : r * (j0 + 1) + r // 2
    ] = False
    assert torch.count_nonzero(cam[torch.as_tensor(far)]) == 0


@pytest.mark.parametrize("rgb", [False, True], ids=["grey-stem", "rgb-stem"])
def test_timm_encoder_matches_hooked_forward(rgb):
    """On a real timm encoder, the map is that of the model's own forward pass (hooked feature map)."""
    torch.manual_seed(0)
    encoder = create_encoder("test_resnet")
    if rgb:
        from cxr_risk.backbones import BackboneConfig, Encoder

        encoder = Encoder(
            BackboneConfig("test_resnet", input_mean=(0.4, 0.5, 0.6), input_std=(0.2, 0.25, 0.3))
        )
    model = RiskModel(encoder, SurvivalConfig(kind="cox", horizon=8.0)).double().eval()
    image = torch.rand(1, 1, 40, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    captured: list[Tensor] = []
    hook = model.encoder.body.register_forward_hook(lambda mod, inp, out: captured.append(out[-1]))
    try:
        risk = model.head.risk_score(model(image))
    finally:
        hook.remove()
    (grad,) = torch.autograd.grad(risk.sum(), captured[0])
    fmap = captured[0].detach()
    coarse = F.relu((grad.mean(dim=(2, 3), keepdim=True) * fmap).sum(1))[0].numpy()
    expected = upsample_bilinear(coarse, (40, 36))
    expected = expected / expected.max() if expected.max() > 0 else expected
    assert_matches(grad_cam(model, image), expected, atol=1e-10)
