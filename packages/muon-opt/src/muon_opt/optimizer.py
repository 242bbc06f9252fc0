"""``muon_opt.Muon``: one ``torch.optim.Optimizer`` with Muon for matrices and AdamW for everything else.

Follows Moonlight ("Muon is Scalable for LLM Training", Liu et al. 2025, arXiv 2502.16982): Nesterov
momentum orthogonalised by Newton-Schulz, each logical ``[A, B]`` matrix's update scaled by
``0.2 * sqrt(max(A, B))`` so its RMS matches AdamW's (~0.2, Sec. 2.2), and decoupled weight decay, so that
AdamW's learning rate and weight decay carry over unchanged. The fast path stacks every same-shape logical
matrix of a step (across parameters and param groups) and orthogonalises the stack in one batched call;
``foreach=False`` runs the per-parameter reference (:func:`muon_opt.muon_reference.muon_step_reference`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from muon_opt.adamw import adamw_foreach, adamw_reference
from muon_opt.matrix_view import MatrixSpec, from_matrix_groups, logical_shapes, to_matrix_groups
from muon_opt.muon import muon_update
from muon_opt.muon_reference import muon_step_reference
from muon_opt.newton_schulz import DEFAULT_NS_COEFFICIENTS, _per_step_coefficients, newton_schulz
from muon_opt.scale import UPDATE_SCALE_MODES, resolve_ns_dtype, update_scale

__all__ = ["Muon"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


class Muon(torch.optim.Optimizer):
    """Muon (Moonlight form) for matrix parameters and AdamW for the rest, in one optimizer.

    Args:
        params: tensors, ``(name, tensor)`` pairs, or param-group dicts (``muon_opt.param_groups(model)``
            builds the recommended groups). A group may set ``use_muon`` (``True``/``False``; ``None``, the
            default, routes each parameter by ``ndim >= 2``), ``matrix_spec`` (one
            :class:`~muon_opt.MatrixSpec` or a list aligned with ``params``), and any option below.
        lr: learning rate, shared by Muon and AdamW (Moonlight reuses AdamW's unchanged, so one LR
            scheduler drives both). In units of AdamW's lr when ``adjust_lr="match_rms_adamw"``.
        weight_decay: decoupled weight decay, ``W <- W - lr * wd * W`` (shared with AdamW).
        momentum: Muon's momentum ``mu`` in ``M <- mu * M + G``.
        nesterov: orthogonalise ``G + mu * M`` instead of ``M``.
        ns_steps: Newton-Schulz iterations.
        ns_coefficients: one ``(a, b, c)`` triple or per-step triples (``muon_opt.POLAR_EXPRESS_COEFFICIENTS``).
        eps: added to the Frobenius norm in Newton-Schulz.
        adjust_lr: per-matrix update scale, one of ``"match_rms_adamw"`` (0.2 sqrt(max(A, B))),
            ``"original"`` (sqrt(max(1, A/B))), ``"spectral"`` (sqrt(A/B)), ``"none"``; see
            :func:`muon_opt.update_scale`.
        ns_dtype: Newton-Schulz compute dtype: ``"auto"`` (bf16 on CUDA with bf16 support, fp32 otherwise),
            ``None`` (the gradient's dtype), or a dtype.
        adamw_betas, adamw_eps: AdamW's moments and epsilon.
        adamw_lr, adamw_weight_decay: AdamW overrides; ``None`` means "same as ``lr`` / ``weight_decay``".
        adjust_lr_fn: ``torch.optim.Muon``'s name for ``adjust_lr`` (``None`` there means ``"original"``);
            when given it overrides ``adjust_lr``.
        foreach: the batched fast path; ``False`` runs the per-parameter reference loop.
        log_update_rms: record the RMS of each Muon parameter's scaled update (``scale * U``, ~0.2 in the
            default mode) and of each AdamW update divided by lr; read them with :meth:`update_rms`.

    Arguments shared with ``torch.optim.Muon`` (``lr``, ``weight_decay``, ``momentum``, ``nesterov``,
    ``ns_coefficients``, ``eps``, ``ns_steps``, ``adjust_lr_fn``) mean the same thing, and the Muon state
    key is the same (``"momentum_buffer"``); the defaults differ where Moonlight's do.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] | Sequence[tuple[float, float, float]] = (
            DEFAULT_NS_COEFFICIENTS
        ),
        eps: float = 1e-7,
        adjust_lr: str = "match_rms_adamw",
        ns_dtype: str | torch.dtype | None = "auto",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_lr: float | None = None,
        adamw_weight_decay: float | None = None,
        *,
        adjust_lr_fn: str | None = None,
        foreach: bool = True,
        log_update_rms: bool = False,
    ) -> None:
        if adjust_lr_fn is not None:
            adjust_lr = adjust_lr_fn
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=_as_coefficients(ns_coefficients),
            eps=eps,
            adjust_lr=adjust_lr,
            ns_dtype=ns_dtype,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            adamw_lr=adamw_lr,
            adamw_weight_decay=adamw_weight_decay,
            use_muon=None,
            matrix_spec=None,
        )
        self.foreach = foreach
        self.log_update_rms = log_update_rms
        self._update_rms: dict[str, Tensor] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "ns_coefficients" in param_group:
            param_group["ns_coefficients"] = _as_coefficients(param_group["ns_coefficients"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        _validate_group(group, gi)
        specs = group["matrix_spec"]
        if isinstance(specs, (list, tuple)):
            if len(specs) != len(group["params"]):
                raise ValueError(
                    f"Muon: param_groups[{gi}]['matrix_spec'] is a list of {len(specs)} specs but the group has "
                    f"{len(group['params'])} params; give one MatrixSpec (or None) per param, or a single spec"
                )
            group["matrix_spec"] = list(specs)
        for j, p in enumerate(group["params"]):
            name = _param_name(group, gi, j)
            if p.is_complex():
                raise ValueError(
                    f"Muon: parameter {name!r} is complex ({p.dtype}); Muon and AdamW here are real-only"
                )
            if not p.is_floating_point():
                raise ValueError(
                    f"Muon: parameter {name!r} has dtype {p.dtype}; only floating-point is supported"
                )
            if _uses_muon(group, p):
                try:
                    logical_shapes(p.shape, _spec_of(group, j))
                except ValueError as err:
                    raise ValueError(
                        f"Muon: parameter {name!r} of shape {tuple(p.shape)} cannot go to Muon: {err}"
                    ) from None

    def state_dict(self) -> dict[str, Any]:
        # MatrixSpec objects become plain dicts so the file loads with torch.load(weights_only=True).
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group["matrix_spec"] = _spec_to_plain(group.get("matrix_spec"))
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The logical-matrix layout is structure (like the params themselves), not a hyper-parameter:
        # keep the specs this optimizer was built with.
        specs = [group["matrix_spec"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, spec in zip(self.param_groups, specs, strict=True):
            group["matrix_spec"] = spec

    def update_rms(self) -> dict[str, float]:
        """RMS of each parameter's last update divided by lr (needs ``log_update_rms=True``).

        For Muon parameters this is the scaled orthogonal update ``scale * U`` (Moonlight's Lemma 1: ~0.2
        with ``adjust_lr="match_rms_adamw"``), for AdamW parameters ``m_hat / (sqrt(v_hat) + eps)``.
        Keys are parameter names when the optimizer was given names, else ``"group{i}.param{j}"``.
        """
        return {k: float(v) for k, v in self._update_rms.items()}

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.log_update_rms:
            self._update_rms = {}
        if self.foreach:
            self._step_foreach()
        else:
            self._step_reference()
        return loss

    def _collect(self, gi: int, group: dict[str, Any]) -> tuple[list[int], list[int]]:
        """Indices of the group's params that have a gradient, split into (muon, adamw)."""
        muon_idx, adamw_idx = [], []
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            g = p.grad
            if g.is_sparse or g.layout != torch.strided:
                raise ValueError(
                    f"Muon: parameter {_param_name(group, gi, j)!r} has a sparse gradient ({g.layout}); Muon and "
                    "AdamW need dense gradients (use nn.Embedding(sparse=False) or a sparse optimizer for it)"
                )
            if g.is_complex():
                raise ValueError(
                    f"Muon: parameter {_param_name(group, gi, j)!r} has a complex gradient ({g.dtype})"
                )
            if g.shape != p.shape:
                raise ValueError(
                    f"Muon: parameter {_param_name(group, gi, j)!r} of shape {tuple(p.shape)} has a gradient of "
                    f"shape {tuple(g.shape)}"
                )
            (muon_idx if _uses_muon(group, p) else adamw_idx).append(j)
        return muon_idx, adamw_idx

    def _adamw_state(self, p: Tensor) -> tuple[Tensor, Tensor, int]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return state["exp_avg"], state["exp_avg_sq"], state["step"]

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    def _step_reference(self) -> None:
        for gi, group in enumerate(self.param_groups):
            muon_idx, adamw_idx = self._collect(gi, group)
            for j in muon_idx:
                p = group["params"][j]
                scaled = muon_step_reference(
                    p,
                    p.grad,
                    self._momentum_buffer(p),
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    nesterov=group["nesterov"],
                    ns_steps=group["ns_steps"],
                    ns_coefficients=group["ns_coefficients"],
                    eps=group["eps"],
                    adjust_lr=group["adjust_lr"],
                    ns_dtype=resolve_ns_dtype(group["ns_dtype"], p.device, p.grad.dtype),
                    matrix_spec=_spec_of(group, j),
                )
                if self.log_update_rms:
                    self._update_rms[_param_name(group, gi, j)] = _rms(scaled)
            lr, wd = _adamw_lr_wd(group)
            for j in adamw_idx:
                p = group["params"][j]
                exp_avg, exp_avg_sq, step = self._adamw_state(p)
                before = p.detach().clone() if self.log_update_rms else None
                adamw_reference(
                    p, p.grad, exp_avg, exp_avg_sq, step,
                    lr=lr, betas=group["adamw_betas"], eps=group["adamw_eps"], weight_decay=wd,
                )  # fmt: skip
                if before is not None:
                    self._log_adamw(group, gi, j, p, before, lr, wd)

    def _log_adamw(
        self, group: dict, gi: int, j: int, p: Tensor, before: Tensor, lr: float, wd: float
    ) -> None:
        if lr > 0:
            step = (before * (1 - lr * wd) - p.detach()) / lr
            self._update_rms[_param_name(group, gi, j)] = _rms(step)

    def _step_foreach(self) -> None:
        # 1. Momentum for every Muon parameter, split into logical matrices and bucketed by (shape, device,
        #    dtype, compute dtype, Newton-Schulz settings) across all groups.
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        pending: list[tuple[int, dict, list[int], list[list[tuple[tuple, int]]], list[Tensor]]] = []
        for gi, group in enumerate(self.param_groups):
            muon_idx, adamw_idx = self._collect(gi, group)
            self._adamw_group_foreach(gi, group, adamw_idx)
            if not muon_idx:
                continue
            params = [group["params"][j] for j in muon_idx]
            # The momentum step is the spec's own function (two cheap elementwise ops per tensor): foreach
            # ops would round the scalar momentum to the buffer's dtype for bf16 (0.95 -> 0.9492).
            updates = [
                muon_update(
                    p.grad, self._momentum_buffer(p), momentum=group["momentum"], nesterov=group["nesterov"]
                )
                for p in params
            ]
            ns_key = (group["ns_steps"], group["ns_coefficients"], group["eps"])
            slots_per_param = []
            for j, p, u in zip(muon_idx, params, updates, strict=True):
                dtype = resolve_ns_dtype(group["ns_dtype"], p.device, u.dtype)
                slots = []
                for mats in to_matrix_groups(u, _spec_of(group, j)):
                    key = (tuple(mats.shape[1:]), mats.device, mats.dtype, dtype, ns_key)
                    slots.append((key, len(buckets[key])))
                    buckets[key].append(mats)
                slots_per_param.append(slots)
            pending.append((gi, group, muon_idx, slots_per_param, params))

        # 2. One batched Newton-Schulz call per bucket.
        results: dict[tuple, list[Tensor]] = {}
        for key, mats in buckets.items():
            _, _, _, dtype, (steps, coeffs, eps) = key
            stacked = mats[0] if len(mats) == 1 else torch.cat(mats)
            ortho = newton_schulz(stacked, steps, coeffs, eps, dtype=dtype)
            results[key] = list(ortho.split([m.shape[0] for m in mats]))

        # 3. Scale per logical matrix, reassemble, apply weight decay and the update.
        for gi, group, muon_idx, slots_per_param, params in pending:
            scaled_updates = []
            for j, p, slots in zip(muon_idx, params, slots_per_param, strict=True):
                pieces = []
                for key, pos in slots:
                    rows, cols = key[0]
                    # results[key][pos] is a slice of a fresh Newton-Schulz output: scaling in place is safe.
                    pieces.append(results[key][pos].mul_(update_scale(rows, cols, group["adjust_lr"])))
                scaled = from_matrix_groups(pieces, p.shape, _spec_of(group, j))
                scaled_updates.append(scaled)
                if self.log_update_rms:
                    self._update_rms[_param_name(group, gi, j)] = _rms(scaled)
            lr, wd = group["lr"], group["weight_decay"]
            if _foreach_exact(params):
                if wd != 0:
                    torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_add_(params, scaled_updates, alpha=-lr)
            else:
                for p, u in zip(params, scaled_updates, strict=True):
                    p.mul_(1 - lr * wd).add_(u, alpha=-lr)

    def _adamw_group_foreach(self, gi: int, group: dict, adamw_idx: list[int]) -> None:
        if not adamw_idx:
            return
        params = [group["params"][j] for j in adamw_idx]
        states = [self._adamw_state(p) for p in params]
        lr, wd = _adamw_lr_wd(group)
        before = [p.detach().clone() for p in params] if self.log_update_rms else None
        step_fn = adamw_foreach if _foreach_exact(params) else _adamw_loop
        step_fn(
            params,
            [p.grad for p in params],
            [s[0] for s in states],
            [s[1] for s in states],
            [s[2] for s in states],
            lr=lr,
            betas=group["adamw_betas"],
            eps=group["adamw_eps"],
            weight_decay=wd,
        )
        if before is not None:
            for j, p, b in zip(adamw_idx, params, before, strict=True):
                self._log_adamw(group, gi, j, p, b, lr, wd)


# ---------------------------------------------------------------------- helpers of this module


def _foreach_exact(tensors: list[Tensor]) -> bool:
    """Whether ``torch._foreach_*`` ops with Python scalars give the per-tensor result.

    On CPU they round the scalar to the tensor dtype first, so for bf16/fp16 ``_foreach_mul_(x, 1 - 1e-4)``
    multiplies by 1.0 and weight decay silently vanishes; those dtypes take the per-tensor loop.
    """
    return all(t.dtype in (torch.float32, torch.float64) for t in tensors)


def _adamw_loop(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                steps: list[int], **kw: Any) -> None:  # fmt: skip
    for args in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        adamw_reference(*args, **kw)


def _as_coefficients(coeffs: Any) -> tuple:
    """Hashable, validated coefficients: a triple of floats or a tuple of triples."""
    per_step = _per_step_coefficients(1, coeffs)  # validates the form
    seq = list(coeffs)
    if len(seq) == 3 and all(isinstance(x, (int, float)) for x in seq):
        return per_step[0]
    return tuple((float(a), float(b), float(c)) for a, b, c in seq)


def _validate_group(group: dict[str, Any], gi: int) -> None:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"Muon: param_groups[{gi}] {key}={group[key]!r} {why}")

    for key in ("lr", "weight_decay", "adamw_eps", "eps"):
        v = group[key]
        if not isinstance(v, (int, float, Tensor)) or not v >= 0:
            raise bad(key, "must be a non-negative number")
    for key in ("adamw_lr", "adamw_weight_decay"):
        v = group[key]
        if v is not None and (not isinstance(v, (int, float)) or not v >= 0):
            raise bad(key, "must be None (same as lr / weight_decay) or a non-negative number")
    if not 0.0 <= group["momentum"] < 1.0:
        raise bad("momentum", "must be in [0, 1)")
    steps = group["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
        raise bad("ns_steps", "must be an int in [0, 100) (Muon uses 5)")
    betas = group["adamw_betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise bad("adamw_betas", "must be two numbers in [0, 1)")
    if group["adjust_lr"] not in UPDATE_SCALE_MODES:
        raise bad("adjust_lr", f"must be one of {UPDATE_SCALE_MODES}")
    try:
        resolve_ns_dtype(group["ns_dtype"], "cpu")
    except ValueError as err:
        raise ValueError(f"Muon: param_groups[{gi}] {err}") from None
    if group["use_muon"] not in (None, True, False):
        raise bad("use_muon", "must be True, False or None (route by ndim >= 2)")
    spec = group["matrix_spec"]
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    if not all(s is None or isinstance(s, MatrixSpec) for s in specs):
        raise bad("matrix_spec", "must be a MatrixSpec, None, or a list of them (one per param)")


def _uses_muon(group: dict[str, Any], p: Tensor) -> bool:
    use = group["use_muon"]
    return p.ndim >= 2 if use is None else bool(use)


def _spec_of(group: dict[str, Any], j: int) -> MatrixSpec | None:
    spec = group["matrix_spec"]
    return spec[j] if isinstance(spec, list) else spec


def _param_name(group: dict[str, Any], gi: int, j: int) -> str:
    names = group.get("param_names")
    return str(names[j]) if names else f"group{gi}.param{j}"


def _adamw_lr_wd(group: dict[str, Any]) -> tuple[float, float]:
    lr = group["lr"] if group["adamw_lr"] is None else group["adamw_lr"]
    wd = group["weight_decay"] if group["adamw_weight_decay"] is None else group["adamw_weight_decay"]
    return lr, wd


def _rms(x: Tensor) -> Tensor:
    return x.detach().float().norm() / math.sqrt(max(1, x.numel()))


def _spec_to_plain(spec: Any) -> Any:
    if isinstance(spec, MatrixSpec):
        return asdict(spec)
    if isinstance(spec, list):
        return [_spec_to_plain(s) for s in spec]
    return spec
