"""Which parameters go to Muon and which to AdamW: ``muon_opt.param_groups(model)``.

Muon is for the hidden weight matrices. Embeddings (a lookup, not a linear map of the activations), the
output head (Moonlight keeps it on AdamW, arXiv 2502.16982 Sec. 2.3; Keller Jordan's Muon too), norm gains,
biases and other 1-D parameters belong on AdamW. Getting this wrong is the most common reason users report
"Muon is worse than AdamW", so the split is returned and can be printed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from muon_opt.matrix_view import MatrixSpec, logical_shapes

__all__ = ["HEAD_NAMES", "ParamRoute", "format_routes", "param_groups", "route_parameters"]

#: Last name component of a Linear module that is taken to be an output head.
HEAD_NAMES = ("lm_head", "head", "output", "classifier", "output_projection", "fc_out", "score")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True)
class ParamRoute:
    """Where one parameter goes and why."""

    name: str
    shape: tuple[int, ...]
    use_muon: bool
    reason: str
    matrix_spec: MatrixSpec | None = None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def route_parameters(
    model: nn.Module,
    *,
    adamw: Iterable[str] = (),
    muon: Iterable[str] = (),
    specs: Mapping[str, MatrixSpec] | None = None,
) -> list[ParamRoute]:
    """Decide Muon or AdamW for every trainable parameter of ``model`` (shared tensors counted once).

    Rules, first match wins: a name matching a glob in ``muon`` -> Muon; a glob in ``adamw`` -> AdamW;
    ``nn.Embedding``/``nn.EmbeddingBag`` weights (and anything tied to them, e.g. a tied LM head) -> AdamW;
    the output head (a Linear whose name ends in one of :data:`HEAD_NAMES`, or the last Linear whose
    ``out_features`` equals an embedding's vocabulary size) -> AdamW; norm parameters -> AdamW; parameters
    with fewer than 2 dims (biases, gains, scalars) -> AdamW; everything else -> Muon. Conv1d weights get
    ``MatrixSpec(layout="flatten")``; ``specs`` maps name globs to a :class:`MatrixSpec` for the rest.
    """
    adamw, muon = tuple(adamw), tuple(muon)
    specs = dict(specs or {})
    owner: dict[int, tuple[str, nn.Module]] = {}
    aliases: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            owner.setdefault(id(p), (full, module))
            aliases.setdefault(id(p), [])
            if full not in aliases[id(p)]:
                aliases[id(p)].append(full)
    embedding_ids: set[int] = set()
    vocab_sizes: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            embedding_ids.add(id(module.weight))
            vocab_sizes.add(module.num_embeddings)
    head_ids: set[int] = set()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for n, m in linears:
        if n.rsplit(".", 1)[-1] in HEAD_NAMES:
            head_ids.update(id(p) for p in m.parameters(recurse=False))
    for _, m in reversed(linears):
        if m.out_features in vocab_sizes:
            head_ids.update(id(p) for p in m.parameters(recurse=False))
            break
    norm_ids = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    conv1d_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv1d)}

    def matches(name: str, patterns: tuple[str, ...]) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)

    routes = []
    for name, p in model.named_parameters():  # de-duplicates shared tensors: counted once
        if not p.requires_grad:
            continue
        names = aliases.get(id(p), [name])
        tied = f" (tied: {', '.join(names)})" if len(names) > 1 else ""
        spec = next((s for pat, s in specs.items() if any(fnmatch.fnmatchcase(n, pat) for n in names)), None)
        if spec is None and id(p) in conv1d_ids:
            spec = MatrixSpec(layout="flatten")
        if any(matches(n, muon) for n in names):
            use, reason = True, "forced to Muon by name"
        elif any(matches(n, adamw) for n in names):
            use, reason = False, "forced to AdamW by name"
        elif id(p) in embedding_ids:
            use, reason = False, "embedding" + tied
        elif id(p) in head_ids:
            use, reason = False, "output head" + tied
        elif id(p) in norm_ids:
            use, reason = False, "norm"
        elif p.ndim < 2:
            use, reason = False, "bias" if name.endswith("bias") else f"{p.ndim}-D"
        else:
            use, reason = True, "matrix"
        if use:
            try:
                logical_shapes(p.shape, spec)
            except ValueError as err:
                raise ValueError(f"param_groups: parameter {name!r} cannot go to Muon: {err}") from None
        routes.append(ParamRoute(name, tuple(p.shape), use, reason, spec if use else None))
    return routes


def format_routes(routes: list[ParamRoute]) -> str:
    """A table of the split: one line per parameter, then the parameter counts per optimizer."""
    width = max([len("parameter")] + [len(r.name) for r in routes])
    lines = [f"{'parameter':<{width}}  {'shape':<18} optimizer  reason"]
    for r in routes:
        spec = f"  {r.matrix_spec}" if r.matrix_spec is not None else ""
        lines.append(
            f"{r.name:<{width}}  {r.shape!s:<18} {'Muon' if r.use_muon else 'AdamW':<9}  {r.reason}{spec}"
        )
    n_muon = sum(_numel(r.shape) for r in routes if r.use_muon)
    n_adamw = sum(_numel(r.shape) for r in routes if not r.use_muon)
    total = max(1, n_muon + n_adamw)
    lines.append(
        f"Muon: {sum(r.use_muon for r in routes)} tensors, {n_muon:,} params ({100 * n_muon / total:.1f}%); "
        f"AdamW: {sum(not r.use_muon for r in routes)} tensors, {n_adamw:,} params ({100 * n_adamw / total:.1f}%)"
    )
    return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def param_groups(
    model: nn.Module,
    *,
    adamw: Iterable[str] = (),
    muon: Iterable[str] = (),
    specs: Mapping[str, MatrixSpec] | None = None,
    verbose: bool = False,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`muon_opt.Muon`: one Muon group (matrices) and one AdamW group (the rest).

    Parameters are passed as ``(name, tensor)`` pairs so the optimizer's errors and
    :meth:`Muon.update_rms` use names. ``group_options`` (e.g. ``weight_decay=0.0``) go into both groups.
    ``verbose=True`` prints :func:`format_routes`; :func:`route_parameters` returns the same decisions.

    Example::

        opt = muon_opt.Muon(muon_opt.param_groups(model, verbose=True), lr=3e-3, weight_decay=0.1)
    """
    routes = route_parameters(model, adamw=adamw, muon=muon, specs=specs)
    if verbose:
        print(format_routes(routes))
    by_name: dict[str, Tensor] = dict(model.named_parameters())
    muon_routes = [r for r in routes if r.use_muon]
    adamw_routes = [r for r in routes if not r.use_muon]
    groups = []
    if muon_routes:
        groups.append(
            {
                "params": [(r.name, by_name[r.name]) for r in muon_routes],
                "use_muon": True,
                "matrix_spec": [r.matrix_spec for r in muon_routes],
                **group_options,
            }
        )
    if adamw_routes:
        groups.append(
            {"params": [(r.name, by_name[r.name]) for r in adamw_routes], "use_muon": False, **group_options}
        )
    return groups
