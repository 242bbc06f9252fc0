"""Which parameters go to Muon and which to AdamW: ``muon_opt.param_groups(model)``.

Muon is for the hidden weight matrices: maps from one normalised activation space to another, where the
orthogonalised update is steepest descent under the spectral norm (Bernstein & Newhouse, arXiv
2410.21265). Everything else belongs on AdamW, as in Moonlight (arXiv 2502.16982 Sec. 2.3) and Keller
Jordan's Muon:

- embeddings, position embeddings and learned tokens (a lookup or an additive vector per position, not a
  linear map of the activations; ViT's ``cls_token`` is ``[1, 1, D]``, a single vector);
- the input layer (ViT's patch embedding, a ResNet's ``conv1``, a ConvNeXt ``stem``): its input is pixels
  or raw features, not a normalised hidden state;
- the output head (``lm_head``, ``head``, ``fc``, ``classifier``; tied or not): its output is logits;
- norm gains, biases, depthwise conv filters and every other 1-D or 1-D-like parameter.

Fused weights are split into the matrices they hold (GPT-2's ``c_attn`` into q, k, v by columns, timm's
``qkv`` by rows, transformers' MoE ``gate_up_proj`` per expert and per projection). Getting this wrong
is the most common reason users report "Muon is worse than AdamW", so the split is returned and can be
printed; :func:`check_bare_params` says what goes wrong when a bare ``model.parameters()`` is passed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from muon_opt.matrix_view import MatrixSpec, describe_matrices, logical_shapes

__all__ = [
    "HEAD_NAMES",
    "POSITION_NAMES",
    "STEM_NAMES",
    "TOKEN_NAMES",
    "ParamRoute",
    "check_bare_params",
    "format_routes",
    "param_groups",
    "route_parameters",
]

#: Last name component of a Linear module that is taken to be an output head (``fc`` only at the top
#: level: torchvision/timm ResNets; deeper down it is a common name for hidden MLP layers).
HEAD_NAMES = ("lm_head", "head", "output", "classifier", "output_projection", "fc_out", "score")
#: Last name component of a position embedding (a parameter, or the module holding it).
POSITION_NAMES = (
    "pos_embed",
    "pos_embedding",
    "pos_embeddings",
    "position_embedding",
    "position_embeddings",
    "positional_embedding",
    "absolute_pos_embed",
    "embed_positions",
    "wpe",
)
#: Last name component of a learned token: class, register, distillation, mask tokens.
TOKEN_NAMES = ("cls_token", "reg_token", "dist_token", "mask_token", "register_tokens", "class_embedding")
#: Module names whose first layer is the model's input layer even when it is not the first layer overall.
STEM_NAMES = ("stem", "conv_stem", "patch_embed", "patch_embedding", "patch_embeddings")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
# Name components that mark a bare parameter as not hidden ("output" is also BERT's hidden-layer block).
_SUSPECT_NAMES = {*HEAD_NAMES, *POSITION_NAMES, *TOKEN_NAMES, *STEM_NAMES} - {"output"}


@dataclass(frozen=True)
class ParamRoute:
    """Where one parameter goes and why; ``matrix_spec`` is its logical-matrix view on Muon."""

    name: str
    shape: tuple[int, ...]
    use_muon: bool
    reason: str
    matrix_spec: MatrixSpec | None = None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT): a Linear whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, *_EMBEDDING_TYPES)) or _is_hf_conv1d(
        module
    )


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _param_ids(module: Any) -> set[int]:
    """Ids of the parameters of a module, a tuple of modules (timm's distilled heads), or None."""
    if isinstance(module, nn.Module):
        return {id(p) for p in module.parameters()}
    if isinstance(module, (tuple, list)):
        return set().union(*(_param_ids(m) for m in module)) if module else set()
    return set()


def _library_head_ids(model: nn.Module) -> set[int]:
    """The output layer as the model's own library names it: transformers' ``get_output_embeddings()``,
    timm's ``get_classifier()`` (duck-typed: neither library is imported)."""
    ids: set[int] = set()
    for method in ("get_output_embeddings", "get_classifier"):
        fn = getattr(model, method, None)
        if callable(fn):
            try:
                ids |= _param_ids(fn())
            except (NotImplementedError, AttributeError, TypeError):
                continue
    return ids


def _fused_spec(
    mod_name: str, module: nn.Module, p_name: str, p: Tensor, parent: nn.Module | None
) -> tuple[MatrixSpec, str] | None:
    """The logical matrices of a fused weight whose layout is known, and a note for the table."""
    if p_name == "weight" and _is_hf_conv1d(module) and _last(mod_name) == "c_attn":
        # GPT-2: c_attn(x).split(split_size, dim=2) -> q, k, v (k, v for cross-attention): column blocks.
        size = getattr(parent, "split_size", None)
        if isinstance(size, int) and size > 0 and module.nf % size == 0 and module.nf // size in (2, 3):
            k = module.nf // size
            spec = MatrixSpec(split_sizes=(size,) * k, split_dim=-1)
            return spec, f"{'fused QKV' if k == 3 else 'fused KV'} stored [in, out] (GPT-2 Conv1D)"
    if p_name == "weight" and isinstance(module, nn.Linear) and _last(mod_name) == "qkv":
        # timm Attention: qkv(x).reshape(B, N, 3, num_heads, head_dim) -> q, k, v: row blocks.
        heads, head_dim = getattr(parent, "num_heads", None), getattr(parent, "head_dim", None)
        third = module.out_features // 3
        if module.out_features % 3 == 0 and (
            third == module.in_features
            or (isinstance(heads, int) and isinstance(head_dim, int) and heads * head_dim == third)
        ):
            return MatrixSpec(split_sizes=(third,) * 3), "fused QKV"
    if (
        p_name == "in_proj_weight"
        and isinstance(module, nn.MultiheadAttention)
        and module._qkv_same_embed_dim
    ):
        e = module.embed_dim
        return MatrixSpec(split_sizes=(e, e, e)), "fused QKV (nn.MultiheadAttention)"
    if p_name == "gate_up_proj" and p.ndim == 3:
        # transformers >= 5 experts (@use_experts_implementation): [E, 2I, H] ([E, H, 2I] if is_transposed),
        # gate and up concatenated (is_concatenated) and split by .chunk(2, dim=-1) of the output.
        concatenated = getattr(module, "is_concatenated", None)
        if getattr(module, "has_gate", True) and concatenated is True:
            dim = -1 if getattr(module, "is_transposed", False) else -2
            if p.shape[dim] % 2 == 0:
                half = p.shape[dim] // 2
                spec = MatrixSpec(layout="batch", split_sizes=(half, half), split_dim=dim)
                return spec, "experts, fused gate/up"
        if concatenated is False:
            return MatrixSpec(layout="batch"), "experts (gate/up interleaved: not split)"
    return None


def route_parameters(
    model: nn.Module,
    *,
    adamw: Iterable[str] = (),
    muon: Iterable[str] = (),
    specs: Mapping[str, MatrixSpec] | None = None,
    split_fused: bool = True,
) -> list[ParamRoute]:
    """Decide Muon or AdamW for every trainable parameter of ``model`` (shared tensors counted once).

    Rules, first match wins:

    1. a name matching a glob in ``muon`` -> Muon; a glob in ``adamw`` -> AdamW;
    2. ``nn.Embedding``/``nn.EmbeddingBag`` weights and anything tied to them (a tied LM head) -> AdamW;
    3. position embeddings and learned tokens (last name component in :data:`POSITION_NAMES` or
       :data:`TOKEN_NAMES`, of the parameter or of its module) -> AdamW;
    4. the output head -> AdamW: what ``get_output_embeddings()`` (transformers) or ``get_classifier()``
       (timm) returns, a Linear whose name ends in one of :data:`HEAD_NAMES` (or is the top-level ``fc``),
       the last Linear inside a top-level ``head``/``classifier`` module, and the model's last Linear when
       its ``out_features`` is an embedding's vocabulary size;
    5. the input layer -> AdamW: the first Linear/conv in registration order when it comes before any
       embedding, and the first layer inside a module named in :data:`STEM_NAMES`;
    6. norm parameters, and parameters with fewer than 2 dims (biases, gains, scalars) -> AdamW;
    7. depthwise conv weights ``[C, 1, k, k]`` and any parameter with a logical matrix that has a side of
       1 (``Linear(d, 1)``) -> AdamW: orthogonalising a vector only normalises it;
    8. everything else -> Muon.

    Logical matrices: ``specs`` maps name globs to a :class:`MatrixSpec`; otherwise, with ``split_fused``,
    known fused layouts are split (GPT-2 ``c_attn`` by columns into q, k, v; timm ``qkv`` and
    ``nn.MultiheadAttention.in_proj_weight`` by rows; transformers MoE ``gate_up_proj`` per expert and per
    projection), ``nn.Conv1d`` weights are flattened, and the rest take :class:`MatrixSpec`'s defaults.
    """
    adamw, muon = tuple(adamw), tuple(muon)
    specs = dict(specs or {})
    modules = dict(model.named_modules())
    aliases: dict[int, list[str]] = {}
    fused: dict[int, tuple[MatrixSpec, str]] = {}
    for mod_name, module in modules.items():
        parent = modules.get(mod_name.rsplit(".", 1)[0] if "." in mod_name else "") if mod_name else None
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            names = aliases.setdefault(id(p), [])
            if full not in names:
                names.append(full)
            if (
                split_fused
                and id(p) not in fused
                and (found := _fused_spec(mod_name, module, p_name, p, parent))
            ):
                fused[id(p)] = found

    embedding_ids: set[int] = set()
    vocab_sizes: set[int] = set()
    for module in modules.values():
        if isinstance(module, _EMBEDDING_TYPES):
            embedding_ids.add(id(module.weight))
            vocab_sizes.add(module.num_embeddings)

    head_ids = _library_head_ids(model)
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    for n, m in linears:
        if _last(n) in HEAD_NAMES or n == "fc":
            head_ids |= _param_ids(m)
    for top in ("head", "classifier"):
        inside = [m for n, m in linears if n.startswith(top + ".")]
        if inside and not isinstance(modules.get(top), nn.Linear):
            head_ids |= _param_ids(inside[-1])
    if linears and linears[-1][1].out_features in vocab_sizes:
        head_ids |= _param_ids(linears[-1][1])

    layers = [
        (n, m) for n, m in modules.items() if _is_layer(m) and any(True for _ in m.parameters(recurse=False))
    ]
    stem_ids: set[int] = set()
    if layers and not isinstance(layers[0][1], _EMBEDDING_TYPES):
        stem_ids |= _param_ids(layers[0][1])
    for stem in (n for n in modules if n and _last(n) in STEM_NAMES):
        inside = [m for n, m in layers if n == stem or n.startswith(stem + ".")]
        if inside and not isinstance(inside[0], _EMBEDDING_TYPES):
            stem_ids |= _param_ids(inside[0])

    norm_ids = {id(p) for m in modules.values() if _is_norm(m) for p in m.parameters(recurse=False)}
    conv1d_ids = {id(m.weight) for m in modules.values() if isinstance(m, nn.Conv1d)}
    depthwise_ids = {
        id(m.weight)
        for m in modules.values()
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.weight.shape[1] == 1
    }

    def matches(names: list[str], patterns: tuple[str, ...]) -> bool:
        return any(fnmatch.fnmatchcase(n, pat) for n in names for pat in patterns)

    def named_like(names: list[str], table: tuple[str, ...]) -> bool:
        # the parameter's own last component, or its module's for weight/bias (``position_embeddings.weight``)
        return any(
            _last(n) in table
            or (_last(n) in ("weight", "bias") and "." in n and _last(n.rsplit(".", 1)[0]) in table)
            for n in names
        )

    routes = []
    for name, p in model.named_parameters():  # de-duplicates shared tensors: counted once
        if not p.requires_grad:
            continue
        names = aliases.get(id(p), [name])
        tied = f" (tied: {', '.join(names)})" if len(names) > 1 else ""
        spec = next((s for pat, s in specs.items() if matches(names, (pat,))), None)
        note = ""
        if spec is None and id(p) in fused:
            spec, note = fused[id(p)]
        elif spec is None and id(p) in conv1d_ids:
            spec, note = MatrixSpec(layout="flatten"), "Conv1d, flattened"
        forced = True
        if matches(names, muon):
            use, reason = True, "forced to Muon by name"
        elif matches(names, adamw):
            use, reason = False, "forced to AdamW by name"
        else:
            forced = False
            if id(p) in embedding_ids:
                kind = "position embedding" if named_like(names, POSITION_NAMES) else "embedding"
                use, reason = False, kind + tied
            elif named_like(names, POSITION_NAMES):
                use, reason = False, "position embedding"
            elif named_like(names, TOKEN_NAMES):
                use, reason = False, "learned token (class/register/distillation)"
            elif id(p) in head_ids:
                use, reason = False, "output head" + tied
            elif id(p) in stem_ids:
                use, reason = False, "input layer (stem / patch embedding)"
            elif id(p) in norm_ids:
                use, reason = False, "norm"
            elif p.ndim < 2:
                use, reason = False, "bias" if name.endswith("bias") else f"{p.ndim}-D"
            elif id(p) in depthwise_ids:
                use, reason = False, "depthwise conv (one filter per channel, not a matrix)"
            else:
                use, reason = True, f"matrix: {note}" if note else "matrix"
        if use:
            try:
                shapes = logical_shapes(p.shape, spec)
            except ValueError as err:
                raise ValueError(f"param_groups: parameter {name!r} cannot go to Muon: {err}") from None
            if not forced and any(min(r, c) == 1 for _, r, c in shapes):
                use, reason = False, f"1-D-like: its matrices are {describe_matrices(p.shape, spec)}"
        routes.append(ParamRoute(name, tuple(p.shape), use, reason, spec if use else None))
    return routes


def format_routes(routes: list[ParamRoute]) -> str:
    """A table of the split: one line per parameter (name, shape, optimizer, logical matrices, reason),
    then the parameter counts per optimizer."""
    matrices = [describe_matrices(r.shape, r.matrix_spec) if r.use_muon else "-" for r in routes]
    width = max([len("parameter")] + [len(r.name) for r in routes])
    shape_w = max([len("shape")] + [len(str(r.shape)) for r in routes])
    mat_w = max([len("matrices")] + [len(m) for m in matrices])
    lines = [f"{'parameter':<{width}}  {'shape':<{shape_w}}  optimizer  {'matrices':<{mat_w}}  reason"]
    for r, m in zip(routes, matrices, strict=True):
        opt = "Muon" if r.use_muon else "AdamW"
        lines.append(f"{r.name:<{width}}  {r.shape!s:<{shape_w}}  {opt:<9}  {m:<{mat_w}}  {r.reason}")
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
    split_fused: bool = True,
    verbose: bool = False,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`muon_opt.Muon`: one Muon group (matrices) and one AdamW group (the rest).

    Parameters are passed as ``(name, tensor)`` pairs so the optimizer's errors and
    :meth:`Muon.update_rms` use names. ``group_options`` (e.g. ``weight_decay=0.0``) go into both groups.
    ``verbose=True`` prints :func:`format_routes`; :func:`route_parameters` (same arguments) returns the
    decisions and documents the rules.

    Example::

        opt = muon_opt.Muon(muon_opt.param_groups(model, verbose=True), lr=3e-3, weight_decay=0.1)
    """
    routes = route_parameters(model, adamw=adamw, muon=muon, specs=specs, split_fused=split_fused)
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


def check_bare_params(
    params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    names: Sequence[str] | None = None,
    *,
    model: nn.Module | None = None,
) -> list[str]:
    """What goes wrong when ``params`` are routed by ``ndim >= 2`` alone (``Muon(model.parameters())``).

    Returns one message per problem (empty when none is seen), for ``muon_opt.Muon`` to warn with when a
    param group leaves ``use_muon`` unset. ``params`` are tensors or ``(name, tensor)`` pairs;
    ``names`` names plain tensors. Without ``model`` the check sees only shapes and names: a dimension
    of size 1 (class tokens, position embeddings, layer scales, depthwise convs), 3-D weights with a short
    last dimension (a ``Conv1d`` kernel ``[out, in, k]`` would be ``out`` tiny matrices), names of
    embeddings and heads, and a list that holds both matrices and vectors, i.e. a whole
    ``model.parameters()`` whose embeddings and head cannot be told from hidden matrices by shape. With
    ``model`` it reports each parameter that :func:`route_parameters` places differently.
    """
    items = list(params)
    pairs = [
        it if isinstance(it, tuple) else (names[j] if names else f"param{j}", it)
        for j, it in enumerate(items)
    ]
    named = bool(names) or any(isinstance(it, tuple) for it in items)
    pairs = [(n, p) for n, p in pairs if isinstance(p, Tensor) and p.requires_grad]
    issues: list[str] = []
    if model is not None:
        by_name = dict(model.named_parameters())
        routes = {id(by_name[r.name]): r for r in route_parameters(model)}
        for _, p in pairs:
            r = routes.get(id(p))
            if r is None:
                continue
            bare = p.ndim >= 2
            if r.use_muon != bare:
                issues.append(
                    f"muon_opt: {r.name} {tuple(p.shape)} goes to {'Muon' if bare else 'AdamW'} by ndim, but "
                    f"param_groups(model) puts it on {'Muon' if r.use_muon else 'AdamW'} ({r.reason})"
                )
            elif bare and logical_shapes(p.shape, r.matrix_spec) != logical_shapes(p.shape):
                issues.append(
                    f"muon_opt: {r.name} {tuple(p.shape)} is {describe_matrices(p.shape)} by default, but "
                    f"{describe_matrices(p.shape, r.matrix_spec)} under param_groups(model) ({r.reason})"
                )
        return issues
    matrices = [(n, p) for n, p in pairs if p.ndim >= 2]
    for name, p in matrices:
        shape = tuple(p.shape)
        if shape[0] == 1 or shape[1] == 1 or any(min(r, c) == 1 for _, r, c in logical_shapes(shape)):
            issues.append(
                f"muon_opt: {name} of shape {shape} has a dimension of size 1 (a class token, position "
                f"embedding, layer scale or depthwise conv?): not a hidden matrix, yet by ndim it goes to Muon "
                f"as {describe_matrices(shape)}; give it use_muon=False or use muon_opt.param_groups(model)"
            )
        elif p.ndim == 3 and shape[-1] < 8 and shape[-1] < shape[-2]:
            issues.append(
                f"muon_opt: {name} of shape {shape} looks like a Conv1d weight [out, in, k]: by default a 3-D "
                f"parameter is stacked experts, here {describe_matrices(shape)}; give it "
                "MatrixSpec(layout='flatten') or use muon_opt.param_groups(model), which does"
            )
        elif named:
            if set(name.split(".")) & _SUSPECT_NAMES or "embed" in name.lower():
                issues.append(
                    f"muon_opt: {name} of shape {shape} is named like an embedding, input layer or output "
                    "head, which belong on AdamW (arXiv 2502.16982 Sec. 2.3), yet by ndim it goes to Muon; "
                    "use muon_opt.param_groups(model)"
                )
    if matrices and len(matrices) < len(pairs):
        issues.append(
            f"muon_opt: a bare parameter list with {len(matrices)} matrices and {len(pairs) - len(matrices)} "
            "vectors looks like model.parameters(): by ndim its embeddings, input layer and output head "
            "go to Muon, but they belong on AdamW (arXiv 2502.16982 Sec. 2.3). Use muon_opt.param_groups(model) "
            "(verbose=True prints the split), or set use_muon in each param group"
        )
    return issues
