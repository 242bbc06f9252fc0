"""Newton-Schulz orthogonalisation: the reference (the spec) and the batched fast path.

Muon replaces a momentum matrix ``G = U S V^T`` by (approximately) its orthogonal polar factor ``U V^T``
(Jordan et al. 2024, "Muon"; Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv 2502.16982,
Sec. 2.1). An odd matrix polynomial applied ``steps`` times does this without an SVD:

    X <- a X + (b A + c A^2) X,    A = X X^T

after ``X = G / (||G||_F + eps)`` puts every singular value in [0, 1]. That norm is taken after dividing
``G`` by a power of two near its largest entry (exact, so the result is unchanged in normal ranges): squaring
entries near the dtype's maximum (~3e38 in fp32 and bf16) would otherwise overflow the norm to inf and turn
the update into zeros. The default quintic
coefficients (3.4445, -4.7750, 2.0315) are Keller Jordan's: they maximise the slope at zero (so small
singular values grow fast) at the price of not converging exactly; after 5 steps the singular values
land in roughly [0.7, 1.2], which Muon tolerates. Polar Express (Amsel et al. 2025, arXiv 2505.16932)
instead uses one optimised triple per step: pass a sequence of triples.

When ``rows > cols`` the matrix is transposed first so that the Gram matrix ``A`` is the small one
(``min(rows, cols)`` squared); the result is transposed back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_NS_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "newton_schulz",
    "newton_schulz_reference",
]

Coefficients = tuple[float, float, float]

#: Keller Jordan's quintic: steepest slope at 0 subject to the iteration staying in [0.7, 1.2].
DEFAULT_NS_COEFFICIENTS: Coefficients = (3.4445, -4.7750, 2.0315)

#: Polar Express per-step coefficients (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932), the
#: five-step schedule used in modded-nanogpt. modded-nanogpt also divides by ``1.02 * ||G||_F`` as a
#: safety margin for bf16 round-off; here the plain Frobenius normalisation is used (it already bounds the
#: spectral norm by 1). A sequence shorter than ``steps`` repeats its last triple.
POLAR_EXPRESS_COEFFICIENTS: tuple[Coefficients, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def _per_step_coefficients(
    steps: int, coefficients: Coefficients | Sequence[Coefficients]
) -> list[Coefficients]:
    """One (a, b, c) per step: a single triple is repeated, a sequence is used in order, its last repeated."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"newton_schulz: steps={steps!r} must be a non-negative int (Muon uses 5)")
    coeffs = list(coefficients)
    if len(coeffs) == 3 and all(isinstance(x, (int, float)) for x in coeffs):
        triple = (float(coeffs[0]), float(coeffs[1]), float(coeffs[2]))
        return [triple] * steps
    if not coeffs or not all(isinstance(c, Sequence) and len(c) == 3 for c in coeffs):
        raise ValueError(
            "newton_schulz: coefficients must be one (a, b, c) triple or a sequence of triples "
            f"(one per step, e.g. POLAR_EXPRESS_COEFFICIENTS); got {coefficients!r}"
        )
    triples = [(float(a), float(b), float(c)) for a, b, c in coeffs]
    return [triples[min(i, len(triples) - 1)] for i in range(steps)]


def _check_input(G: Tensor, name: str) -> None:
    if G.ndim < 2:
        raise ValueError(f"{name}: G must have at least 2 dims [..., rows, cols]; got shape {tuple(G.shape)}")
    if G.is_complex():
        raise ValueError(f"{name}: complex input is not supported (got dtype {G.dtype})")
    if not G.is_floating_point():
        raise ValueError(f"{name}: G must be a floating-point tensor; got dtype {G.dtype}")


def _normalise(X: Tensor, eps: float) -> Tensor:
    """``X / (||X||_F + eps)`` for each trailing matrix, computed without overflow.

    Dividing by ``s = 2^(e-1)``, with ``e`` the binary exponent of the largest ``|x|``, is exact and brings
    every entry into ``(-2, 2)``, so the squares in the norm cannot overflow (nor underflow for tiny
    matrices); ``(X / s) / (||X / s|| + eps / s)`` is then the same number as ``X / (||X|| + eps)``
    whenever the latter does not overflow. A zero matrix stays zero.
    """
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    _, exponent = torch.frexp(amax)
    scale = torch.ldexp(torch.ones_like(amax), exponent - 1)  # a power of two, never inf: e - 1 <= max exp
    X = X / scale
    return X / (torch.linalg.matrix_norm(X, ord="fro", keepdim=True) + eps / scale)


def _newton_schulz_2d(X: Tensor, coeffs: list[Coefficients], eps: float) -> Tensor:
    """The iteration on one matrix, written out as in the papers."""
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T  # make the Gram matrix X X^T the small (min(rows, cols))^2 one
    X = _normalise(X, eps)  # X / (||X||_F + eps): all singular values now <= 1
    for a, b, c in coeffs:
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X


def newton_schulz_reference(
    G: Tensor,
    steps: int = 5,
    coefficients: Coefficients | Sequence[Coefficients] = DEFAULT_NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Readable Newton-Schulz orthogonalisation, one matrix at a time: the specification.

    Args:
        G: ``[..., rows, cols]``; each trailing matrix is orthogonalised independently.
        steps: number of iterations (5 in Muon).
        coefficients: one ``(a, b, c)`` triple used every step, or a sequence of per-step triples
            (Polar Express); a sequence shorter than ``steps`` repeats its last triple.
        eps: added to the Frobenius norm before dividing, so a zero matrix stays zero. The norm is
            computed on a power-of-two rescaled copy, so entries up to the dtype's maximum do not overflow it.
        dtype: the dtype to compute in; ``None`` computes in ``G.dtype``.

    Returns:
        A tensor of ``G``'s shape and dtype whose matrices have singular values close to 1
        (in roughly [0.7, 1.2] for the default coefficients).
    """
    _check_input(G, "newton_schulz_reference")
    coeffs = _per_step_coefficients(steps, coefficients)
    compute_dtype = G.dtype if dtype is None else dtype
    mats = G.reshape(-1, G.shape[-2], G.shape[-1])
    out = [_newton_schulz_2d(m.to(compute_dtype), coeffs, eps).to(G.dtype) for m in mats]
    return torch.stack(out).reshape(G.shape)


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: Coefficients | Sequence[Coefficients] = DEFAULT_NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    *,
    overwrite_input: bool = False,
) -> Tensor:
    """Batched Newton-Schulz orthogonalisation (the fast path of :func:`newton_schulz_reference`).

    Same arguments and result as the reference, but all matrices of ``G``'s leading dims go through one
    batched matmul chain (``baddbmm`` fuses the polynomial's additions into the products), which is what
    lets the optimizer stack same-shape parameters and orthogonalise them in one call. Never modifies
    ``G`` and never returns a view of it, unless ``overwrite_input=True``.

    ``overwrite_input=True`` (for callers that own ``G`` and do not need it afterwards) uses ``G``'s memory
    as one of the two iterates when ``G`` is contiguous and already in the compute dtype: the step then
    allocates one matrix-sized buffer (plus the small Gram matrices) instead of two, and the result may
    live in ``G``'s storage. Tall matrices use the right-hand form ``a X + X p(X^T X)`` instead of
    transposing, which is the same polynomial (``p(X X^T) X = X p(X^T X)``) rounded differently.
    """
    _check_input(G, "newton_schulz")
    coeffs = _per_step_coefficients(steps, coefficients)
    compute_dtype = G.dtype if dtype is None else dtype
    rows, cols = G.shape[-2], G.shape[-1]
    if overwrite_input and G.dtype == compute_dtype and G.is_contiguous():
        return _newton_schulz_in_place(G.view(-1, rows, cols), coeffs, eps).view(G.shape)
    X = G.reshape(-1, rows, cols)
    transposed = rows > cols
    if transposed:
        X = X.mT
    # .to() may return G itself; the division in _normalise always allocates, so nothing aliases the input.
    X = _normalise(X.to(compute_dtype), eps)
    for a, b, c in coeffs:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)  # a X + B X
    if transposed:
        X = X.mT
    return X.to(G.dtype).reshape(G.shape)


def _newton_schulz_in_place(X: Tensor, coeffs: list[Coefficients], eps: float) -> Tensor:
    """The iteration on a contiguous ``[n, rows, cols]`` ``X`` that may be overwritten: normalised in place,
    then ping-pong between ``X`` and one new buffer; the Gram matrix is the small side's."""
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    _, exponent = torch.frexp(amax)
    scale = torch.ldexp(torch.ones_like(amax), exponent - 1)
    X.div_(scale)  # exact (a power of two), as in _normalise
    X.div_(torch.linalg.matrix_norm(X, ord="fro", keepdim=True) + eps / scale)
    Y = torch.empty_like(X)
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in coeffs:
        A = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A
        if tall:
            torch.baddbmm(X, X, B, beta=a, alpha=1.0, out=Y)  # a X + X B
        else:
            torch.baddbmm(X, B, X, beta=a, alpha=1.0, out=Y)  # a X + B X
        X, Y = Y, X
        del A, B  # before the next step's Gram matrix is allocated
    return X
