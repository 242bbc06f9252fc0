"""muon_opt: the Muon optimizer in the form scaled up by Moonlight ("Muon is Scalable for LLM Training",
Liu et al. 2025, arXiv 2502.16982): Newton-Schulz orthogonalised Nesterov momentum for matrices, update RMS
matched to AdamW's (``0.2 * sqrt(max(A, B))``), decoupled weight decay, and AdamW for everything else.
See README.md.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from muon_opt.adamw import adamw_foreach, adamw_reference
from muon_opt.distributed import (
    DDPMuon,
    FSDPMuon,
    ZeroMuon,
    distributed_muon,
    load_checkpoint,
    save_checkpoint,
)
from muon_opt.distributed.comm import CommCounter, collective_bytes
from muon_opt.distributed.layout import FlatLayout, balance_ownership, newton_schulz_flops, plan_flat_layout
from muon_opt.matrix_view import (
    MatrixSpec,
    describe_matrices,
    from_matrices,
    from_matrix_groups,
    logical_shapes,
    matrix_views,
    to_matrices,
    to_matrix_groups,
)
from muon_opt.muon import muon_update
from muon_opt.muon_reference import muon_step_reference
from muon_opt.newton_schulz import (
    DEFAULT_NS_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    newton_schulz,
    newton_schulz_reference,
)
from muon_opt.optimizer import Muon
from muon_opt.qk_clip import QKClip, max_logits, qk_clip_
from muon_opt.routing import (
    HEAD_NAMES,
    POSITION_NAMES,
    STEM_NAMES,
    TOKEN_NAMES,
    ParamRoute,
    check_bare_params,
    format_routes,
    param_groups,
    route_parameters,
)
from muon_opt.scale import UPDATE_SCALE_MODES, resolve_ns_dtype, update_scale

try:
    __version__: str = _version("muon-opt")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "DEFAULT_NS_COEFFICIENTS",
    "HEAD_NAMES",
    "POLAR_EXPRESS_COEFFICIENTS",
    "POSITION_NAMES",
    "STEM_NAMES",
    "TOKEN_NAMES",
    "UPDATE_SCALE_MODES",
    "CommCounter",
    "DDPMuon",
    "FSDPMuon",
    "FlatLayout",
    "MatrixSpec",
    "Muon",
    "ParamRoute",
    "QKClip",
    "ZeroMuon",
    "__version__",
    "adamw_foreach",
    "adamw_reference",
    "balance_ownership",
    "check_bare_params",
    "collective_bytes",
    "describe_matrices",
    "distributed_muon",
    "format_routes",
    "from_matrices",
    "from_matrix_groups",
    "load_checkpoint",
    "logical_shapes",
    "matrix_views",
    "max_logits",
    "muon_step_reference",
    "muon_update",
    "newton_schulz",
    "newton_schulz_flops",
    "newton_schulz_reference",
    "param_groups",
    "plan_flat_layout",
    "qk_clip_",
    "resolve_ns_dtype",
    "route_parameters",
    "save_checkpoint",
    "to_matrices",
    "to_matrix_groups",
    "update_scale",
]
