"""Per-matrix update scale and the dtype Newton-Schulz runs in.

Newton-Schulz output has singular values near 1, so for an ``[A, B]`` matrix its RMS is about
``sqrt(1 / max(A, B))`` (the norm-squared is ~``min(A, B)`` spread over ``A * B`` entries). Moonlight
(Liu et al. 2025, arXiv 2502.16982, Sec. 2.2, Lemma 1) multiplies by ``0.2 * sqrt(max(A, B))`` so the update
RMS is ~0.2, the typical RMS of an AdamW update; then AdamW's learning rate and weight decay can be reused
unchanged. The modes are named by the formula they apply.
"""

from __future__ import annotations

import math

import torch

__all__ = ["UPDATE_SCALE_MODES", "resolve_ns_dtype", "update_scale"]

#: Accepted ``adjust_lr`` modes. ``"spectral_unclamped"`` is ``torch.optim.Muon``'s name for ``"spectral"``.
UPDATE_SCALE_MODES = ("match_rms_adamw", "original", "spectral", "spectral_unclamped", "none")


def update_scale(rows: int, cols: int, mode: str = "match_rms_adamw") -> float:
    """Multiplier applied to the orthogonalised update of one ``[rows, cols]`` logical matrix.

    - ``"match_rms_adamw"``: ``0.2 * sqrt(max(rows, cols))`` (Moonlight; update RMS ~0.2 like AdamW).
    - ``"original"``: ``sqrt(max(1, rows / cols))`` (Keller Jordan's Muon, ``torch.optim.Muon``'s default).
    - ``"spectral"`` (alias ``"spectral_unclamped"``): ``sqrt(rows / cols)`` (Bernstein's spectral-norm
      condition).
    - ``"none"``: 1.
    """
    if rows <= 0 or cols <= 0:
        raise ValueError(f"update_scale: rows={rows}, cols={cols} must both be positive")
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if mode == "original":
        return math.sqrt(max(1.0, rows / cols))
    if mode in ("spectral", "spectral_unclamped"):
        return math.sqrt(rows / cols)
    if mode == "none":
        return 1.0
    raise ValueError(f"update_scale: mode={mode!r} is not one of {UPDATE_SCALE_MODES}")


_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_ns_dtype(
    ns_dtype: str | torch.dtype | None,
    device: torch.device | str,
    param_dtype: torch.dtype = torch.float32,
) -> torch.dtype:
    """The dtype Newton-Schulz computes in for a parameter of ``param_dtype`` on ``device``.

    ``"auto"`` picks bf16 on a CUDA device that supports bf16 arithmetic (tensor cores make it several
    times faster, and Newton-Schulz tolerates the rounding), and otherwise the parameter's own dtype
    promoted to at least fp32. On a CPU without AVX512-BF16/AMX, bf16 GEMMs take a slow fallback path
    (measured about 20x below fp32 throughput, so ``torch.optim.Muon``'s forced bf16 makes a step tens of
    times slower); on a CPU with them bf16 is about 2x faster than fp32 but the update is about 5000x
    less precise, so it is an explicit opt-in (``ns_dtype="bf16"``). A GPU without bf16 support is never
    downcast silently. ``None`` means "the parameter's dtype"; a dtype or its name
    (``"float32"``, ``"bf16"``, ...) is used as given.
    """
    if ns_dtype is None:
        return param_dtype
    if isinstance(ns_dtype, torch.dtype):
        if not ns_dtype.is_floating_point:
            raise ValueError(f"ns_dtype={ns_dtype} must be a floating-point dtype")
        return ns_dtype
    if ns_dtype == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.promote_types(param_dtype, torch.float32)
    if isinstance(ns_dtype, str) and ns_dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[ns_dtype]
    raise ValueError(
        f"ns_dtype={ns_dtype!r} must be 'auto', None, a torch floating dtype, or one of {sorted(_DTYPE_NAMES)}"
    )
