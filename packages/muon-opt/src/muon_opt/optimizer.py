"""``muon_opt.Muon``: one ``torch.optim.Optimizer`` with Muon for matrices and AdamW for everything else.

Follows Moonlight ("Muon is Scalable for LLM Training", Liu et al. 2025, arXiv 2502.16982): Nesterov
momentum orthogonalised by Newton-Schulz, each logical ``[A, B]`` matrix's update scaled by
``0.2 * sqrt(max(A, B))`` so its RMS matches AdamW's (~0.2, Sec. 2.2), and decoupled weight decay, so that
AdamW's learning rate and weight decay carry over unchanged. The fast path stacks every same-shape logical
matrix of a step (across parameters and param groups) and orthogonalises the stack in one batched call;
``foreach=False`` runs the per-parameter reference (:func:`muon_opt.muon_reference.muon_step_reference`).

Ready for long runs: one LR scheduler drives both halves (AdamW's lr is ``lr * adamw_lr_ratio``), ``lr`` may
be a tensor and the AdamW step count is one (``torch.compile(opt.step)`` then compiles once under a
schedule), a non-finite gradient raises (or skips the step) before any state changes, and
``max_grad_norm`` clips the global gradient norm as ``torch.nn.utils.clip_grad_norm_`` does.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from muon_opt.adamw import adamw_foreach, adamw_reference
from muon_opt.matrix_view import (
    MatrixSpec,
    from_matrix_groups,
    logical_shapes,
    matrix_views,
    to_matrix_groups,
)
from muon_opt.muon import apply_update, muon_update
from muon_opt.muon_reference import muon_step_reference
from muon_opt.newton_schulz import DEFAULT_NS_COEFFICIENTS, _per_step_coefficients, newton_schulz
from muon_opt.routing import check_bare_params
from muon_opt.scale import UPDATE_SCALE_MODES, resolve_ns_dtype, update_scale

__all__ = ["NONFINITE_MODES", "Muon"]

#: What ``Muon(nonfinite=...)`` does with a NaN/inf gradient entry.
NONFINITE_MODES = ("raise", "skip")

_PLAIN = MatrixSpec()

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


class Muon(torch.optim.Optimizer):
    """Muon (Moonlight form) for matrix parameters and AdamW for the rest, in one optimizer.

    Args:
        params: tensors, ``(name, tensor)`` pairs, or param-group dicts (``muon_opt.param_groups(model)``
            builds the recommended groups). A group may set ``use_muon`` (``True``/``False``; ``None``, the
            default, routes each parameter by ``ndim >= 2``), ``matrix_spec`` (one
            :class:`~muon_opt.MatrixSpec` or a list aligned with ``params``), and any option below.
        lr: learning rate, shared by Muon and AdamW (Moonlight reuses AdamW's unchanged, so one LR
            scheduler drives both). In units of AdamW's lr when ``adjust_lr="match_rms_adamw"``. A Python
            number or a one-element float tensor (``torch.tensor(3e-3)``): with a tensor, schedulers update it
            in place and ``torch.compile(opt.step)`` does not recompile when it changes.
        weight_decay: decoupled weight decay, ``W <- W - lr * wd * W`` (shared with AdamW); number or tensor.
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
        adamw_lr: AdamW's learning rate at the group's initial ``lr``; stored as ``adamw_lr_ratio = adamw_lr /
            lr``, so that LR schedulers scale it with ``lr`` (``None``: same as ``lr``).
        adamw_weight_decay: AdamW's weight decay (``None``: same as ``weight_decay``).
        adamw_lr_ratio: AdamW's learning rate as a multiple of ``lr`` (the group key that is kept; give this
            or ``adamw_lr``, not both). AdamW's step uses ``lr * adamw_lr_ratio``, whatever set ``lr``.
        adjust_lr_fn: ``torch.optim.Muon``'s name for ``adjust_lr`` (``None`` there means ``"original"``);
            when given it overrides ``adjust_lr``.
        foreach: the batched fast path; ``False`` runs the per-parameter reference loop.
        log_update_rms: record the RMS of each Muon parameter's scaled update (``scale * U``, ~0.2 in the
            default mode) and of each AdamW update divided by lr; read them with :meth:`update_rms`.
        max_grad_norm: clip the global 2-norm of all gradients of this optimizer to this value before the
            step, as ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` would (``p.grad`` itself is
            left unchanged). ``math.inf`` records the norm without clipping. The pre-clip norm of every step
            is in :attr:`last_grad_norm`.
        nonfinite: what a NaN/inf gradient entry does. ``"raise"`` (default): ``FloatingPointError`` naming
            each such parameter, before anything is updated. ``"skip"``: a ``RuntimeWarning`` naming them, and
            the whole step is skipped (no parameter, moment or step count changes; :attr:`skipped_steps`
            counts them), as ``torch.amp.GradScaler`` does. The check costs one host sync per step.
        bucket_bytes: the fast path stacks same-shape logical matrices into batched Newton-Schulz calls of at
            most this many bytes each (a single larger matrix still goes whole) and frees each call's
            transients before the next: a step's peak transient memory is about three such chunks. ``None``
            (default): a quarter of the Muon parameters' bytes, clamped to [1 MiB, 256 MiB], which keeps the
            peak under the Muon parameters' own bytes (``benchmarks/``, section "step memory").

    Attributes:
        last_grad_norm: 0-dim tensor, the global gradient 2-norm the last step saw (before clipping), on the
            first parameter's device; ``None`` before the first step with gradients. Always recorded.
        skipped_steps: how many steps ``nonfinite="skip"`` skipped.

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
        adamw_lr_ratio: float | None = None,
        adjust_lr_fn: str | None = None,
        foreach: bool = True,
        log_update_rms: bool = False,
        max_grad_norm: float | None = None,
        nonfinite: str = "raise",
        bucket_bytes: int | None = None,
    ) -> None:
        if adjust_lr_fn is not None:
            adjust_lr = adjust_lr_fn
        if adamw_lr is not None and adamw_lr_ratio is not None:
            raise ValueError(
                f"Muon: got adamw_lr={adamw_lr!r} and adamw_lr_ratio={adamw_lr_ratio!r}; give one (adamw_lr is "
                "stored as the ratio adamw_lr / lr so that LR schedulers drive AdamW too)"
            )
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool)
            or not isinstance(max_grad_norm, (int, float))
            or not max_grad_norm > 0
        ):
            raise ValueError(
                f"Muon: max_grad_norm={max_grad_norm!r} must be None (no clipping) or a positive number "
                "(math.inf records the gradient norm without clipping)"
            )
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"Muon: nonfinite={nonfinite!r} must be one of {NONFINITE_MODES}")
        if bucket_bytes is not None and (
            isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes <= 0
        ):
            raise ValueError(
                f"Muon: bucket_bytes={bucket_bytes!r} must be None (automatic) or a positive int"
            )
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
            adamw_lr_ratio=adamw_lr_ratio,
            adamw_weight_decay=adamw_weight_decay,
            use_muon=None,
            matrix_spec=None,
        )
        self.foreach = foreach
        self.log_update_rms = log_update_rms
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self.bucket_bytes = bucket_bytes
        # Mutated in place, never reassigned: torch.compile drops attribute writes on optimizers
        # (torch 2.14), but keeps dict updates.
        self._stats: dict[str, Any] = {"last_grad_norm": None, "skipped_steps": 0}
        self._update_rms: dict[str, Tensor] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "ns_coefficients" in param_group:
            param_group["ns_coefficients"] = _as_coefficients(param_group["ns_coefficients"])
        gi = len(self.param_groups)
        given = {k for k in ("adamw_lr", "adamw_lr_ratio") if param_group.get(k) is not None}
        if len(given) == 2:
            raise ValueError(
                f"Muon: param_groups[{gi}] sets both adamw_lr and adamw_lr_ratio; give one (adamw_lr is stored "
                "as the ratio adamw_lr / lr)"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in ("lr", "weight_decay"):
            # a tensor default would be one object shared by every group, and schedulers fill_ it per group
            if isinstance(group[key], Tensor) and group[key] is self.defaults[key]:
                group[key] = group[key].clone()
        _validate_group(group, gi)
        group["adamw_lr_ratio"] = _resolve_adamw_ratio(group, given, gi)
        group.pop("adamw_lr", None)
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
        bare = group["use_muon"] is None and group["matrix_spec"] is None  # routed by shape alone
        if bare and (issues := check_bare_params(group["params"], group.get("param_names"))):
            # e.g. Muon(model.parameters()): say what routing by shape alone gets wrong
            warnings.warn("\n".join(issues), UserWarning, stacklevel=4)

    def state_dict(self) -> dict[str, Any]:
        # MatrixSpec objects become plain dicts so the file loads with torch.load(weights_only=True).
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group["matrix_spec"] = _spec_to_plain(group.get("matrix_spec"))
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; also reads files written before AdamW's lr became a ratio of ``lr``
        (their ``adamw_lr`` becomes ``adamw_lr / initial lr``) and with integer AdamW step counts."""
        # The logical-matrix layout is structure (like the params themselves), not a hyper-parameter:
        # keep the specs this optimizer was built with.
        specs = [group["matrix_spec"] for group in self.param_groups]
        ratios = [group["adamw_lr_ratio"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for gi, (group, spec, ratio) in enumerate(zip(self.param_groups, specs, ratios, strict=True)):
            group["matrix_spec"] = spec
            if "adamw_lr_ratio" not in group:
                old = group.pop("adamw_lr", None)
                base = float(group.get("initial_lr", group["lr"]))
                group["adamw_lr_ratio"] = 1.0 if old is None else (old / base if base > 0 else ratio)
            _validate_group(group, gi)
            for j, p in enumerate(group["params"]):
                state = self.state.get(p)
                if state and "step" in state:
                    state["step"] = _step_tensor(state["step"], f"{_describe(group, gi, j, p)} state 'step'")

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The global gradient 2-norm the last step saw, before clipping (0-dim tensor; None before the
        first step with gradients)."""
        return self._stats["last_grad_norm"]

    @property
    def skipped_steps(self) -> int:
        """How many steps ``nonfinite="skip"`` skipped."""
        return self._stats["skipped_steps"]

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
        skip, grad_scale = self._check_and_clip()
        if skip:
            return loss
        # Everything after the check's host sync (a graph break under torch.compile) reaches parameters and
        # gradients through self.param_groups again, which is what keeps a compiled step from recompiling.
        if self.param_groups:
            self._init_group(self.param_groups[0])
        work = [(gi, group, *self._collect(gi, group)) for gi, group in enumerate(self.param_groups)]
        if self.log_update_rms:
            self._update_rms.clear()
        if self.foreach:
            self._step_foreach(work, grad_scale)
        else:
            self._step_reference(work, grad_scale)
        return loss

    def _check_and_clip(self) -> tuple[bool, Tensor | None]:
        """Record the global gradient norm, act on non-finite gradients, return ``(skip, clip factor)``.

        The norm is ``torch.nn.utils.clip_grad_norm_``'s (per-parameter norms in the gradient dtype, at least
        fp32, then the norm of those); only when it is not finite are the gradients inspected one by one: a
        NaN/inf entry raises or skips, and finite gradients whose norm overflowed get it recomputed in fp64.
        """
        work = [(gi, group, *self._collect(gi, group)) for gi, group in enumerate(self.param_groups)]
        grads = [
            group["params"][j].grad for _, group, muon_idx, adamw_idx in work for j in (*muon_idx, *adamw_idx)
        ]
        if not grads:
            return False, None
        norm = _total_norm(grads)
        if not bool(torch.isfinite(norm)):  # the one host sync of the check
            bad = [
                (gi, group, j)
                for gi, group, muon_idx, adamw_idx in work
                for j in (*muon_idx, *adamw_idx)
                if not bool(torch.isfinite(group["params"][j].grad).all())
            ]
            if bad:
                self._stats["last_grad_norm"] = norm
                return self._nonfinite([_describe_bad(group, gi, j) for gi, group, j in bad]), None
            norm = _total_norm(grads, torch.float64)
        self._stats["last_grad_norm"] = norm
        if self.max_grad_norm is None:
            return False, None
        return False, torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)

    def _nonfinite(self, described: list[str]) -> bool:
        """Raise (``nonfinite="raise"``) or warn and return True (``"skip"``) for the named parameters."""
        shown = "; ".join(described[:8]) + (f"; and {len(described) - 8} more" if len(described) > 8 else "")
        what = f"{type(self).__name__}: non-finite gradient in {len(described)} parameter(s): {shown}"
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{what}. Nothing was updated. Find the source (torch.autograd.set_detect_anomaly(True)), "
                "lower the lr or clip (max_grad_norm=...), or pass nonfinite='skip' to skip such steps"
            )
        self._stats["skipped_steps"] += 1
        warnings.warn(
            f"{what}; step skipped: parameters and optimizer state unchanged "
            f"({self.skipped_steps} skipped so far)",
            RuntimeWarning,
            stacklevel=2,
        )
        return True

    def _init_group(self, group: dict[str, Any]) -> None:
        """Create the missing state of every parameter (of all groups) that has a gradient: zeros, and AdamW's
        step count as a float32 tensor, as in ``torch.optim.AdamW``.

        The name and the ``group`` argument are ``torch.optim``'s convention: ``torch.compile`` runs a method
        called ``_init_group(param_group)`` eagerly while tracing and guards on the state it made, so a
        compiled step sees the final state structure from its first call and does not recompile on the
        second. It is called once per step (``group`` is the first group) because the traced view of
        ``self.state`` is taken at that call: state created by a second call would be invisible to it."""
        del group
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if _uses_muon(g, p):
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

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

    def _adamw_steps(self, params: list[Tensor], tensors: bool) -> list[int] | list[Tensor]:
        """Advance the AdamW step counts; Python ints for the exact float arithmetic, or the tensors
        themselves (tensor lr, or under ``torch.compile``, which would otherwise specialise on each value)."""
        steps = [self.state[p]["step"] for p in params]
        if steps:
            torch._foreach_add_(steps, 1.0)
        return steps if tensors else [int(s) for s in steps]

    def _step_reference(
        self, work: list[tuple[int, dict, list[int], list[int]]], grad_scale: Tensor | None
    ) -> None:
        for gi, group, muon_idx, adamw_idx in work:
            for j in muon_idx:
                p = group["params"][j]
                scaled = muon_step_reference(
                    p,
                    _scaled(p.grad, grad_scale),
                    self.state[p]["momentum_buffer"],
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
            lr, wd = _adamw_lr_wd(group, gi)
            params = [group["params"][j] for j in adamw_idx]
            steps = self._adamw_steps(params, _tensor_scalars(lr, wd))
            for j, p, step in zip(adamw_idx, params, steps, strict=True):
                state = self.state[p]
                before = p.detach().clone() if self.log_update_rms else None
                adamw_reference(
                    p, _scaled(p.grad, grad_scale), state["exp_avg"], state["exp_avg_sq"], step,
                    lr=lr, betas=group["adamw_betas"], eps=group["adamw_eps"], weight_decay=wd,
                )  # fmt: skip
                if before is not None:
                    self._log_adamw(group, gi, j, p, before, lr, wd)

    def _log_adamw(
        self, group: dict, gi: int, j: int, p: Tensor, before: Tensor, lr: float | Tensor, wd: float | Tensor
    ) -> None:
        if bool(lr > 0):
            step = (before * (1 - lr * wd) - p.detach()) / lr
            self._update_rms[_param_name(group, gi, j)] = _rms(step)

    def _step_foreach(
        self, work: list[tuple[int, dict, list[int], list[int]]], grad_scale: Tensor | None
    ) -> None:
        """The fast path: AdamW by foreach ops, then Muon bucket by bucket.

        Same-shape logical matrices (across parameters and groups) form a bucket; a bucket is processed in
        chunks of at most :meth:`_chunk_bytes`, and a chunk's transient tensors (the stacked Nesterov
        input, Newton-Schulz's iterates and output) are freed before the next one starts, so the step's peak
        transient memory is about three chunks, not every update of the step at once. Gradients,
        momentum buffers and parameters are reached through views (:func:`muon_opt.matrix_views`): the
        momentum is advanced in place, and the scaled update is added straight into the parameter.
        """
        muon: list[_MuonParam] = []
        for gi, group, muon_idx, adamw_idx in work:
            self._adamw_group_foreach(gi, group, adamw_idx, grad_scale)
            muon += [_MuonParam(gi, group, j, group["params"][j]) for j in muon_idx]
        if not muon:
            return
        buckets, alone = self._muon_buckets(muon)
        sumsq: dict[int, list[Tensor]] | None = defaultdict(list) if self.log_update_rms else None
        for m in alone:
            self._muon_alone(m, grad_scale, sumsq)
        cap = self._chunk_bytes(muon)
        for fields, items in buckets.items():
            key = _BucketKey(*fields)
            for chunk in _chunks_of(items, cap, key.numel_bytes):
                self._muon_chunk(key, chunk, muon, grad_scale, sumsq)
        if sumsq is not None:
            for n, parts in sumsq.items():
                m = muon[n]
                self._update_rms[_param_name(m.group, m.gi, m.j)] = torch.stack(
                    parts
                ).sum().sqrt() / math.sqrt(max(1, m.param.numel()))

    def _muon_buckets(self, muon: list[_MuonParam]) -> tuple[dict[tuple, list[_Item]], list[_MuonParam]]:
        """Phase 1: each Muon parameter's logical matrices as views, bucketed by what one batched Newton-Schulz
        call and one foreach update need to share; parameters that cannot be viewed go ``alone``."""
        buckets: dict[tuple, list[_Item]] = defaultdict(list)
        alone: list[_MuonParam] = []
        shared: dict[tuple, tuple] = {}  # (group, device, dtype) -> the bucket key's fields but the shape
        for n, m in enumerate(muon):
            p, group = m.param, m.group
            grad, buf = p.grad, self.state[p]["momentum_buffer"]
            spec = _spec_of(group, m.j)
            if grad.dtype != p.dtype or buf.dtype != p.dtype:
                alone.append(m)
                continue
            if p.ndim == 2 and (spec is None or spec == _PLAIN) and p.is_contiguous() and buf.is_contiguous():
                views: Iterable[tuple[Tensor, Tensor, Tensor]] = ((p, buf, grad),)
                count = 1
            else:
                try:
                    views = zip(
                        matrix_views(p, spec),
                        matrix_views(buf, spec),
                        matrix_views(grad, spec, writable=False),
                    )
                except RuntimeError:  # a stride order that cannot be viewed as [n, A, B]
                    alone.append(m)
                    continue
                count = 0  # from the view's shape
            fields = shared.get((id(group), p.device, p.dtype))
            if fields is None:
                fields = shared[(id(group), p.device, p.dtype)] = (
                    p.device,
                    p.dtype,
                    resolve_ns_dtype(group["ns_dtype"], p.device, p.dtype),
                    (group["ns_steps"], group["ns_coefficients"], group["eps"]),
                    group["momentum"],
                    group["nesterov"],
                    group["adjust_lr"],
                )
            for pv, bv, gv in views:
                key = (pv.shape[-2], pv.shape[-1], *fields)
                buckets[key].append(_Item(n, pv, bv, gv, count or pv.shape[0] * pv.shape[1]))
        return buckets, alone

    def _chunk_bytes(self, muon: list[_MuonParam]) -> int:
        """Bytes of stacked matrices per batched Newton-Schulz call: ``bucket_bytes`` if set, else a quarter
        of all Muon parameters' bytes (so three chunks' transients stay under 1x of them), at least 1 MiB
        (a small model's buckets are never split) and at most 256 MiB (stacks that large gain nothing)."""
        if self.bucket_bytes is not None:
            return self.bucket_bytes
        total = sum(m.param.numel() * m.param.element_size() for m in muon)
        return min(max(total // 4, 1 << 20), 1 << 28)

    def _muon_chunk(
        self,
        key: _BucketKey,
        chunk: list[_Item],
        muon: list[_MuonParam],
        grad_scale: Tensor | None,
        sumsq: dict[int, list[Tensor]] | None,
    ) -> None:
        """Phases 2-4 for one chunk: momentum and the Nesterov input into one stack, one batched Newton-Schulz
        call, then the scaled update and decoupled weight decay into the parameters."""
        counts = [it.count for it in chunk]
        stack = torch.empty((sum(counts), key.rows, key.cols), dtype=key.dtype, device=key.device)
        inputs = _stack_views(stack, chunk, counts)
        bufs = [it.buf for it in chunk]
        exact = key.dtype in (torch.float32, torch.float64)
        # 2. M <- mu M + G and the matrix to orthogonalise, G + mu M (Nesterov) or M, as muon_update does.
        torch._foreach_copy_(inputs, [it.grad for it in chunk])  # a copy rounds nothing
        if grad_scale is not None:
            stack.mul_(grad_scale.to(stack.device))  # clipping: the same G * c as _scaled
        _mul(bufs, key.momentum, exact)
        _add(bufs, inputs, 1.0, exact)
        if key.nesterov:
            _add(inputs, bufs, key.momentum, exact)
        else:
            torch._foreach_copy_(inputs, bufs)
        del inputs
        # 3. One batched Newton-Schulz call, scaled per logical matrix (Moonlight's 0.2 sqrt(max(A, B))).
        steps, coeffs, eps = key.ns
        ortho = newton_schulz(stack, steps, coeffs, eps, dtype=key.ns_dtype, overwrite_input=True)  # ours
        del stack
        ortho.mul_(update_scale(key.rows, key.cols, key.adjust_lr))
        updates = _stack_views(ortho, chunk, counts)
        if sumsq is not None:
            for it, norm in zip(chunk, torch._foreach_norm(updates), strict=True):
                sumsq[it.entry].append(norm.float().square())
        # 4. W <- W (1 - lr wd) - lr * update, per param group (lr and wd are the group's).
        by_group: dict[int, list[int]] = defaultdict(list)
        for i, it in enumerate(chunk):
            by_group[muon[it.entry].gi].append(i)
        for idx in by_group.values():
            group = muon[chunk[idx[0]].entry].group
            lr, wd = group["lr"], group["weight_decay"]
            params, ups = [chunk[i].param for i in idx], [updates[i] for i in idx]
            if exact and not _tensor_scalars(lr, wd):
                torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_add_(params, ups, alpha=-lr)
            else:
                for p, u in zip(params, ups, strict=True):
                    apply_update(p, u, lr=lr, weight_decay=wd)

    def _muon_alone(
        self, m: _MuonParam, grad_scale: Tensor | None, sumsq: dict[int, list[Tensor]] | None
    ) -> None:
        """One parameter the bucketed path cannot view (mixed dtypes, unusual strides): its own NS calls."""
        p, group = m.param, m.group
        spec = _spec_of(group, m.j)
        u = muon_update(
            _scaled(p.grad, grad_scale),
            self.state[p]["momentum_buffer"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
        )
        dtype = resolve_ns_dtype(group["ns_dtype"], p.device, u.dtype)
        # u is muon_update's fresh tensor: its memory may be reused
        pieces = [_scaled_orthogonal(mats, group, dtype) for mats in to_matrix_groups(u, spec)]
        scaled = from_matrix_groups(pieces, p.shape, spec)
        if sumsq is not None:
            self._update_rms[_param_name(group, m.gi, m.j)] = _rms(scaled)
        apply_update(p, scaled, lr=group["lr"], weight_decay=group["weight_decay"])

    def _adamw_group_foreach(
        self, gi: int, group: dict, adamw_idx: list[int], grad_scale: Tensor | None
    ) -> None:
        if not adamw_idx:
            return
        params = [group["params"][j] for j in adamw_idx]
        states = [self.state[p] for p in params]
        lr, wd = _adamw_lr_wd(group, gi)
        steps = self._adamw_steps(params, _tensor_scalars(lr, wd))
        grads = [p.grad for p in params]
        if grad_scale is not None:
            grads = torch._foreach_mul(grads, grad_scale)
        before = [p.detach().clone() for p in params] if self.log_update_rms else None
        step_fn = adamw_foreach if _foreach_exact(params) else _adamw_loop
        step_fn(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            steps,
            lr=lr,
            betas=group["adamw_betas"],
            eps=group["adamw_eps"],
            weight_decay=wd,
        )
        if before is not None:
            for j, p, b in zip(adamw_idx, params, before, strict=True):
                self._log_adamw(group, gi, j, p, b, lr, wd)


# ---------------------------------------------------------------------- helpers of this module


def _scaled_orthogonal(mats: Tensor, group: dict[str, Any], ns_dtype: torch.dtype | None) -> Tensor:
    """``update_scale * NS(mats)`` for a stack ``[..., rows, cols]`` of logical matrices, with ``group``'s
    Newton-Schulz settings and scale mode. ``mats`` must be the caller's to spend: its memory may hold the
    result (``newton_schulz(overwrite_input=True)``). Shared by the per-parameter path here and the
    distributed tiers."""
    ortho = newton_schulz(
        mats, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype=ns_dtype, overwrite_input=True
    )
    return ortho.mul_(update_scale(mats.shape[-2], mats.shape[-1], group["adjust_lr"]))


@dataclass
class _MuonParam:
    """A Muon parameter with a gradient in this step: its group index, group and position there."""

    gi: int
    group: dict[str, Any]
    j: int
    param: Tensor


@dataclass(frozen=True)
class _BucketKey:
    """What the logical matrices stacked into one Newton-Schulz call must share."""

    rows: int
    cols: int
    device: torch.device
    dtype: torch.dtype
    ns_dtype: torch.dtype
    ns: tuple
    momentum: float
    nesterov: bool
    adjust_lr: str

    @property
    def numel_bytes(self) -> int:
        return self.rows * self.cols * self.dtype.itemsize


class _Item(NamedTuple):
    """One group of logical matrices of one parameter (or a slice of them along the first dim): views
    ``[n, k, rows, cols]`` of the parameter, its momentum buffer and its gradient, or for a plain 2-D
    parameter the ``[rows, cols]`` tensors themselves (no view to make, the common case kept cheap)."""

    entry: int  # index of the parameter in the step's Muon list
    param: Tensor
    buf: Tensor
    grad: Tensor
    count: int  # logical matrices: n * k, or 1


def _chunks_of(items: list[_Item], cap_bytes: int, matrix_bytes: int) -> Iterator[list[_Item]]:
    """``items`` in runs of at most ``cap_bytes`` of matrices (at least one matrix per run); an item with
    more matrices than fit is cut along its first dim."""
    cap = max(1, cap_bytes // matrix_bytes)
    run: list[_Item] = []
    used = 0
    for it in items:
        if it.param.ndim == 2:  # a plain matrix: one, never cut
            per, n = 1, 1
        else:
            per, n = it.param.shape[1], it.param.shape[0]  # matrices per index of the first dim
        start = 0
        while start < n:
            room = (cap - used) // per
            if room == 0 and run:
                yield run
                run, used = [], 0
                continue
            stop = min(n, start + max(1, room))
            piece = (
                it
                if (start, stop) == (0, n)
                else _Item(
                    it.entry,
                    it.param[start:stop],
                    it.buf[start:stop],
                    it.grad[start:stop],
                    (stop - start) * per,
                )
            )
            run.append(piece)
            used += piece.count
            start = stop
    if run:
        yield run


def _stack_views(stack: Tensor, chunk: list[_Item], counts: list[int]) -> list[Tensor]:
    """Views of the stacked ``[sum(counts), rows, cols]`` tensor shaped like each item's views."""
    if len(counts) == stack.shape[0] and all(it.param.ndim == 2 for it in chunk):
        return list(stack.unbind(0))
    return [s.view(it.param.shape) for s, it in zip(stack.split(counts), chunk, strict=True)]


def _mul(xs: list[Tensor], scalar: float, exact: bool) -> None:
    """``x *= scalar`` for each; per tensor when foreach would round ``scalar`` to a bf16/fp16 dtype."""
    if exact:
        torch._foreach_mul_(xs, scalar)
    else:
        for x in xs:
            x.mul_(scalar)


def _add(xs: list[Tensor], ys: list[Tensor], alpha: float, exact: bool) -> None:
    """``x += alpha * y`` for each (see :func:`_mul` on rounding)."""
    if exact:
        torch._foreach_add_(xs, ys, alpha=alpha)
    else:
        for x, y in zip(xs, ys, strict=True):
            x.add_(y, alpha=alpha)


def _foreach_exact(tensors: list[Tensor]) -> bool:
    """Whether ``torch._foreach_*`` ops with Python scalars give the per-tensor result.

    On CPU they round the scalar to the tensor dtype first, so for bf16/fp16 ``_foreach_mul_(x, 1 - 1e-4)``
    multiplies by 1.0 and weight decay silently vanishes; those dtypes take the per-tensor loop.
    """
    return all(t.dtype in (torch.float32, torch.float64) for t in tensors)


def _tensor_scalars(lr: float | Tensor, wd: float | Tensor) -> bool:
    """Whether the step keeps its scalars as tensors: a tensor lr / wd, or tracing under ``torch.compile``."""
    return isinstance(lr, Tensor) or isinstance(wd, Tensor) or torch.compiler.is_compiling()


def _scaled(grad: Tensor, scale: Tensor | None) -> Tensor:
    """The gradient the step uses: ``grad * scale`` for clipping (a new tensor; ``p.grad`` is left alone).

    ``scale`` is cast to the gradient dtype, exactly as ``clip_grad_norm_``'s in-place ``mul_`` does."""
    return grad if scale is None else grad * scale.to(grad.device)


def _total_norm(grads: list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``'s total 2-norm: per-parameter norms (grouped by device and dtype,
    computed in the gradient dtype but at least fp32, or in ``dtype``), then the norm of those."""
    by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
    for g in grads:
        by_kind[(g.device, g.dtype)].append(g)
    out = dtype or (torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32)
    first = grads[0].device
    norms = []
    for (_, kind), gs in by_kind.items():
        norm_dtype = dtype or (kind if kind in (torch.float32, torch.float64) else torch.float32)
        norms += [n.to(device=first, dtype=out) for n in torch._foreach_norm(gs, 2, dtype=norm_dtype)]
    return torch.linalg.vector_norm(torch.stack(norms))


def _describe(group: dict[str, Any], gi: int, j: int, p: Tensor) -> str:
    names = group.get("param_names")
    name = f"{names[j]!r} " if names else ""
    return f"{name}(param_groups[{gi}]['params'][{j}], shape {tuple(p.shape)})"


def _describe_bad(group: dict[str, Any], gi: int, j: int) -> str:
    g = group["params"][j].grad
    kinds = [k for k, f in (("nan", torch.isnan), ("inf", torch.isinf)) if bool(f(g).any())]
    return f"{_describe(group, gi, j, group['params'][j])}: {'/'.join(kinds)}"


def _step_tensor(value: Any, where: str) -> Tensor:
    """A loaded AdamW step count as a fresh float32 CPU tensor (int from older files, or a tensor)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        v = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    else:
        v = math.nan
    if not (math.isfinite(v) and v >= 0 and v == int(v)):
        raise ValueError(f"Muon.load_state_dict: {where}={value!r} must be a non-negative whole number")
    return torch.tensor(v, dtype=torch.float32)


def _adamw_loop(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                steps: list[int] | list[Tensor], **kw: Any) -> None:  # fmt: skip
    for args in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        adamw_reference(*args, **kw)


def _as_coefficients(coeffs: Any) -> tuple:
    """Hashable, validated coefficients: a triple of floats or a tuple of triples."""
    per_step = _per_step_coefficients(1, coeffs)  # validates the form
    seq = list(coeffs)
    if len(seq) == 3 and all(isinstance(x, (int, float)) for x in seq):
        return per_step[0]
    return tuple((float(a), float(b), float(c)) for a, b, c in seq)


def _number(v: Any) -> float | None:
    """``v`` as a float if it is a real Python number (not a bool), else None."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _validate_group(group: dict[str, Any], gi: int) -> None:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"Muon: param_groups[{gi}] {key}={group[key]!r} {why}")

    for key in ("lr", "weight_decay"):
        v = group[key]
        if isinstance(v, Tensor):
            if v.numel() != 1 or not v.is_floating_point():
                raise bad(key, "must be a number or a one-element floating-point tensor")
            value = float(v.detach())
        else:
            value = _number(v)
        if value is None or not (math.isfinite(value) and value >= 0):
            raise bad(key, "must be a finite non-negative number (or a one-element float tensor holding one)")
    for key in ("adamw_eps", "eps"):
        value = _number(group[key])
        if value is None or not (math.isfinite(value) and value >= 0):
            raise bad(
                key, "must be a finite non-negative Python number (only lr and weight_decay may be tensors)"
            )
    for key in ("adamw_lr", "adamw_lr_ratio", "adamw_weight_decay"):
        v = group.get(key)
        value = _number(v)
        if v is not None and (value is None or not (math.isfinite(value) and value >= 0)):
            raise bad(key, "must be None or a finite non-negative Python number")
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


def _resolve_adamw_ratio(group: dict[str, Any], given: set[str], gi: int) -> float:
    """``adamw_lr_ratio`` of a new group: its own ratio, else its own ``adamw_lr / lr``, else the
    constructor's ratio, else the constructor's ``adamw_lr / lr`` (this group's lr), else 1."""
    if "adamw_lr_ratio" in given or ("adamw_lr" not in given and group["adamw_lr_ratio"] is not None):
        return float(group["adamw_lr_ratio"])
    absolute = group["adamw_lr"]
    if absolute is None:
        return 1.0
    lr = float(group["lr"])
    if lr == 0 and absolute != 0:
        raise ValueError(
            f"Muon: param_groups[{gi}] adamw_lr={absolute!r} with lr=0: AdamW's lr is lr * adamw_lr_ratio (so "
            "that LR schedulers drive it), which cannot reach a non-zero adamw_lr; give adamw_lr_ratio instead"
        )
    return float(absolute) / lr if lr else 0.0


def _adamw_lr_wd(group: dict[str, Any], gi: int) -> tuple[float | Tensor, float | Tensor]:
    """AdamW's (lr, weight decay) for a group: ``lr * adamw_lr_ratio``, so schedulers drive it."""
    if "adamw_lr" in group:
        raise ValueError(
            f"Muon: param_groups[{gi}]['adamw_lr'] was set after construction; AdamW's lr is lr * adamw_lr_ratio "
            f"(so that LR schedulers drive it): set param_groups[{gi}]['adamw_lr_ratio'] instead"
        )
    ratio = group["adamw_lr_ratio"]
    lr = group["lr"] if ratio == 1.0 else group["lr"] * ratio
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
