"""Experiment configs: one YAML file per paper setting, parsed into :class:`RunConfig` dataclasses.

The bundled configs (``proml_ner/configs/*.yaml``, listed by ``proml-ner configs``) cover the settings
of ProML's evaluation (Chen, Zheng, Yang, Findings of ACL 2023):

* Few-NERD INTRA / INTER, 5-way and 10-way, 1~2 and 5~10 shot (Ding et al. 2021): the released episode
  files, trained and tested episode by episode;
* OntoNotes 5.0 tag extension A / B / C (Yang and Katiyar 2020): train on two groups of six types,
  test on the third group with K-shot support sets and the whole test set as query;
* domain transfer: train on OntoNotes, test on CoNLL-03, WNUT-17, I2B2-14 and GUM with K-shot support
  sets, the whole test set as query and test-time fine-tuning on each support set.

Hyper-parameters follow the authors' run script and training code (the paper's implementation section
could not be read to cross-check them): AdamW, lr 3e-5, 10% linear warm-up,
10 000 training episodes, dev every 1 000, 128-d Gaussian embeddings, lambda = 0.7 from the grid
{0.3, 0.5, 0.7}, top-k = K on Few-NERD and k = 1 for the full-test protocols, test-time fine-tuning with
lr 3e-5. Data paths are left for the user: no config downloads anything. ``data.root`` and every
path expand ``~`` and ``$VARS``; relative paths are taken under ``data.root``.

Episodes are built from a config by :mod:`proml_ner.protocols`; result files carry the provenance of
:mod:`proml_ner.provenance`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .model import ProMLConfig
from .train import TrainConfig

__all__ = [
    "DataConfig",
    "EpisodeConfig",
    "RunConfig",
    "apply_overrides",
    "bundled_configs",
    "load_run_config",
]

FORMATS = ("fewnerd-episodes", "fewnerd-flat", "conll", "synthetic")
PROTOCOLS = ("episodes", "full_test")


def _check_keys(cls: type, d: dict, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")


@dataclass
class DataConfig:
    """Where the data are and how to read them.

    format: ``fewnerd-episodes`` (Few-NERD episode JSONL, ``train_5_1.jsonl``), ``fewnerd-flat``
        (``word<TAB>label``) or ``conll`` (BIO/IOBES/IO columns) corpora that are sampled into episodes,
        or ``synthetic`` (the package's generator; paths are then ``synthetic:<split>``).
    root: folder that relative paths are taken under (``~`` and ``$VARS`` expanded).
    train / dev / test: files; ``dev`` may be empty (no model selection: the last state is kept).
    version: what the data are (release, preprocessing); recorded verbatim in every result file.
    train_types / test_types: keep only these entity types (others become ``O``) in train, and in
        dev/test (OntoNotes tag extension); empty keeps all.
    support_files: fixed support sets for the ``full_test`` protocol (one file each, same format as
        ``test``); empty samples ``episodes.support_sets`` of them from the test file.
    token_column / tag_column: columns of ``conll`` files (OntoNotes ``.conllx`` files carry the word in
        column 1).
    """

    format: str = "fewnerd-episodes"
    root: str = ""
    train: str = ""
    dev: str = ""
    test: str = ""
    version: str = ""
    train_types: list[str] = field(default_factory=list)
    test_types: list[str] = field(default_factory=list)
    support_files: list[str] = field(default_factory=list)
    token_column: int = 0
    tag_column: int = -1

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r} must be one of {FORMATS}")
        for name in ("train_types", "test_types", "support_files"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
                raise ValueError(f"data.{name} must be a list of non-empty strings, got {value!r}")

    def path(self, which: str) -> str:
        """The expanded path of ``train``/``dev``/``test`` (or a support file), or a clear error."""
        raw = getattr(self, which) if which in ("train", "dev", "test") else which
        if not raw:
            raise ValueError(
                f"data.{which} is not set: bundled configs leave data paths to you; pass e.g. "
                f"--set data.root=/path/to/data --set data.{which}=FILE (no data is downloaded)"
            )
        if raw.startswith("synthetic"):
            return raw
        p = Path(os.path.expandvars(os.path.expanduser(raw)))
        if not p.is_absolute() and self.root:
            p = Path(os.path.expandvars(os.path.expanduser(self.root))) / p
        if not p.is_file():
            field_name = which if which in ("train", "dev", "test") else "support_files"
            raise FileNotFoundError(
                f"data.{field_name}: {p} does not exist; point data.root (now {self.root!r}) and "
                f"data.{field_name} at your local copy, e.g. --set data.root=/path/to/data"
            )
        return str(p)


@dataclass
class EpisodeConfig:
    """Episode shapes and counts.

    n_way / k_shot: the test setting (N-way K~2K-shot); train_n_way / train_k_shot: the training
    episodes' shape when it differs (0: same as the test setting).
    train / dev / test: episodes sampled from flat or synthetic corpora; episode files are read as they
    are, capped at these counts (0: every episode of the file). protocol: ``episodes`` (Few-NERD) or
    ``full_test`` (support sets of every test type, the whole test file as query; OntoNotes tag extension
    and domain transfer).
    support_sets: how many support sets ``full_test`` samples when ``data.support_files`` is empty.
    """

    n_way: int = 5
    k_shot: int = 1
    train_n_way: int = 0
    train_k_shot: int = 0
    train: int = 10000
    dev: int = 500
    test: int = 5000
    protocol: str = "episodes"
    support_sets: int = 10

    def __post_init__(self) -> None:
        if self.n_way < 1 or self.k_shot < 1:
            raise ValueError(f"episodes: n_way={self.n_way} and k_shot={self.k_shot} must be >= 1")
        if self.train_n_way < 0 or self.train_k_shot < 0:
            raise ValueError("episodes: train_n_way and train_k_shot must be >= 0 (0: same as the test)")
        if min(self.train, self.dev, self.test, self.support_sets) < 0:
            raise ValueError("episodes: train, dev, test and support_sets are counts and must be >= 0")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"episodes.protocol={self.protocol!r} must be one of {PROTOCOLS}")


@dataclass
class RunConfig:
    """One experiment: model, training, data and episodes, with its name, seed and output folder.

    ``train.seed`` and ``train.output_dir`` are taken from ``seed`` and ``output_dir``.
    """

    name: str = "custom"
    description: str = ""
    seed: int = 0
    output_dir: str = "proml-model"
    model: ProMLConfig = field(default_factory=ProMLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)

    def __post_init__(self) -> None:
        self.train.seed = self.seed
        self.train.output_dir = self.output_dir
        if self.episodes.protocol == "full_test" and self.data.format == "fewnerd-episodes":
            raise ValueError(
                "episodes.protocol='full_test' samples support sets from a corpus: set data.format to "
                "'conll', 'fewnerd-flat' or 'synthetic'"
            )

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a run config must be a mapping, got {type(d).__name__}")
        _check_keys(cls, d, "config")
        d = copy.deepcopy(d)
        parts: dict[str, Any] = {}
        for key, sub in (("data", DataConfig), ("episodes", EpisodeConfig), ("train", TrainConfig)):
            value = d.pop(key, None) or {}
            if not isinstance(value, dict):
                raise ValueError(f"config.{key} must be a mapping, got {value!r}")
            _check_keys(sub, value, f"config.{key}")
            parts[key] = sub(**value)
        model = d.pop("model", None) or {}
        if not isinstance(model, dict):
            raise ValueError(f"config.model must be a mapping, got {model!r}")
        parts["model"] = ProMLConfig.from_dict(model)
        return cls(**d, **parts)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return out


# ------------------------------------------------------------------------------------------------ loading
def bundled_configs() -> dict[str, str]:
    """Bundled config names and their one-line descriptions."""
    out = {}
    for entry in sorted(resources.files("proml_ner.configs").iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
            out[entry.name.rsplit(".", 1)[0]] = str(data.get("description", ""))
    return out


def _read_mapping(path: Path | None, text: str, where: str) -> dict:
    if path is not None and path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(text)
    import yaml

    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a config must be a mapping")
    return data


def load_config_dict(name_or_path: str | Path) -> dict:
    """The raw mapping of a config file (``.yaml``/``.yml``/``.toml``) or of a bundled config name."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".toml"):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such config file")
        return _read_mapping(p, p.read_text(encoding="utf-8"), str(p))
    if p.suffix:
        raise ValueError(f"{p}: config files end in .yaml, .yml or .toml")
    entry = resources.files("proml_ner.configs") / f"{name_or_path}.yaml"
    if not entry.is_file():
        names = ", ".join(bundled_configs())
        raise ValueError(f"{name_or_path!r} is neither a config file nor a bundled config; bundled: {names}")
    return _read_mapping(None, entry.read_text(encoding="utf-8"), f"bundled config {name_or_path}")


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``["train.steps=2", "data.root=/data"]`` applied to a config mapping (values parsed as YAML)."""
    import yaml

    out = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return out


def load_run_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A validated :class:`RunConfig` from a bundled name or a file, with ``--set`` style overrides."""
    return RunConfig.from_dict(apply_overrides(load_config_dict(name_or_path), overrides or []))
