"""Episodic training and Few-NERD evaluation (ProML Sec. 4.2; Ding et al. 2021 Sec. 5).

AdamW with a linear warm-up then linear decay, gradient clipping, evaluation on dev episodes every
``eval_every`` steps keeping the best state (in memory, and on disk when ``output_dir`` is given), and the
seeds recorded in the result. The encoder and the heads have separate learning rates (the head's defaults
to the encoder's, as in the authors' code: at 1e-3 the head drives the loss to zero within tens of
episodes and the encoder stops learning); biases and LayerNorm weights get no weight decay. Optional
test-time fine-tuning adapts a copy of the model to one episode's support set (domain transfer, Sec. 4.5),
with dropout off and the authors' early stop.
"""

from __future__ import annotations

import copy
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .formats import Episode
from .metrics import EntityCounts, mean_f1, score, score_flattened

__all__ = [
    "EpisodicModel",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "freeze_lower_layers",
    "seed_everything",
    "train",
]


class EpisodicModel(Protocol):
    def episode_loss(self, episode: Episode) -> Tensor: ...
    def predict_episode(self, episode: Episode) -> list[list[str]]: ...


@dataclass
class TrainConfig:
    """steps: training episodes; lr: encoder learning rate; head_lr: Gaussian head / fusion rate (None:
    ``lr``); weight_decay: AdamW decay of weight matrices (never of biases or LayerNorm weights);
    warmup: fraction of steps of linear warm-up; clip: max gradient norm; eval_every: steps between dev
    evaluations (0: only at the end); finetune_steps/finetune_lr: test-time fine-tuning on each support
    (at most ``finetune_steps``; with ``finetune_early_stop`` it stops at the first step whose support
    loss is not below the previous one, the authors' rule; dropout is off unless ``finetune_dropout``);
    trainable_layers: train only the top N encoder layers (None: all; 0: heads only), a CPU-budget knob
    (the paper fine-tunes the whole encoder); episodes_per_step: episodes whose mean loss makes one
    optimizer step (the authors' ``batch_size``: 4 for 1~2-shot, 1 for 5~10-shot); clip: None turns
    gradient clipping off (the authors' training loop does not clip)."""

    steps: int = 100
    lr: float = 3e-5
    head_lr: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1
    clip: float | None = 1.0
    eval_every: int = 0
    seed: int = 0
    output_dir: str | None = None
    finetune_steps: int = 0
    finetune_lr: float = 1e-5
    finetune_early_stop: bool = True
    finetune_dropout: bool = False
    trainable_layers: int | None = None
    episodes_per_step: int = 1

    def __post_init__(self) -> None:
        if self.episodes_per_step < 1:
            raise ValueError(f"TrainConfig: episodes_per_step={self.episodes_per_step} must be >= 1")
        if self.steps < 0 or self.eval_every < 0 or self.finetune_steps < 0:
            raise ValueError("TrainConfig: steps, eval_every and finetune_steps must be >= 0")
        if self.trainable_layers is not None and self.trainable_layers < 0:
            raise ValueError(f"TrainConfig: trainable_layers={self.trainable_layers} must be None or >= 0")
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"TrainConfig: warmup={self.warmup} is a fraction of steps in [0, 1]")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ValueError(
                f"TrainConfig: lr={self.lr} and head_lr={self.head_lr} must be > 0 (head_lr may be None)"
            )
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"TrainConfig: clip={self.clip} must be None or > 0")


@dataclass
class EvalResult:
    """counts: micro counts pooled over every query sentence (Few-NERD's protocol); per_episode: one
    episode's (support set's) counts each; flattened: Few-NERD's released metric, each episode's query
    sentences joined into one sequence (:func:`~proml_ner.metrics.score_flattened`)."""

    counts: EntityCounts
    per_episode: list[EntityCounts]
    predictions: list[list[list[str]]] = field(default_factory=list, repr=False)
    flattened: EntityCounts = field(default_factory=EntityCounts)

    @property
    def f1(self) -> float:
        """Pooled micro F1."""
        return self.counts.f1

    @property
    def mean_f1(self) -> float:
        """Mean of per-episode F1: the full-test protocol's mean over support sets."""
        return mean_f1(self.per_episode)


@dataclass
class TrainResult:
    best_f1: float
    best_step: int
    history: list[dict]
    seed: int
    seconds_per_episode: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the legacy global RNG other code may use
    torch.manual_seed(seed)


_LAYER = re.compile(r"\.layers?\.(\d+)\.")


def freeze_lower_layers(model: nn.Module, trainable_layers: int | None) -> None:
    """Leave only the top ``trainable_layers`` encoder layers (and every non-encoder module) trainable."""
    if trainable_layers is None:
        return
    names = [n for n, _ in model.named_parameters() if n.startswith("encoder.")]
    depth = 1 + max((int(m.group(1)) for n in names if (m := _LAYER.search(n))), default=-1)
    for name, p in model.named_parameters():
        if not name.startswith("encoder."):
            continue
        m = _LAYER.search(name)
        p.requires_grad_(m is not None and int(m.group(1)) >= depth - trainable_layers)


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases and normalisation weights (1-d parameters, or named ``*norm*``) take no weight decay."""
    return p.ndim < 2 or "norm" in name.lower()


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Encoder / head groups at ``lr`` / ``head_lr``, each split into decayed and not-decayed parameters."""
    head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
    groups = []
    for is_enc, lr in ((True, cfg.lr), (False, head_lr)):
        for no_decay in (False, True):
            params = [
                p
                for n, p in model.named_parameters()
                if p.requires_grad and n.startswith("encoder.") == is_enc and _no_decay(n, p) == no_decay
            ]
            if params:
                groups.append(
                    {"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay}
                )
    return groups


def _schedule(step: int, total: int, warmup: float) -> float:
    w = int(total * warmup)
    if w and step < w:
        return (step + 1) / w
    return max(0.0, (total - step) / max(1, total - w))


def evaluate(
    model: EpisodicModel,
    episodes: Sequence[Episode],
    finetune: TrainConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Micro P/R/F1 over all query sentences of all ``episodes`` (Few-NERD's protocol), with the
    per-episode counts (for the mean over support sets) and Few-NERD's flattened counts."""
    counts, per, flat = EntityCounts(), [], EntityCounts()
    preds = []
    was_training = getattr(model, "training", False)
    for i, ep in enumerate(episodes):
        m = model
        if finetune is not None and finetune.finetune_steps > 0:
            m = finetune_on_support(model, ep, finetune)
        if hasattr(m, "eval"):
            m.eval()
        p = m.predict_episode(ep)
        gold = [s.labels for s in ep.query]
        c = score(gold, p)
        flat += score_flattened(gold, p)
        counts += c
        per.append(c)
        preds.append(p)
        if progress:
            progress(i)
    if was_training and hasattr(model, "train"):
        model.train()
    return EvalResult(counts, per, preds, flat)


def finetune_on_support(model, episode: Episode, cfg: TrainConfig):
    """A copy of ``model`` fine-tuned on the episode's support alone: at most ``cfg.finetune_steps``
    steps, dropout off (``finetune_dropout`` turns it on), stopping early at the first step whose loss is
    not below the previous step's (``finetune_early_stop``; the authors' rule) and then keeping the
    weights from before that step."""
    if not hasattr(model, "support_loss"):
        raise ValueError(f"finetune_on_support: {type(model).__name__} has no support_loss")
    m = copy.deepcopy(model)
    m.train(cfg.finetune_dropout)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.finetune_lr)
    prev, before = float("inf"), None
    for _ in range(cfg.finetune_steps):
        loss = m.support_loss(episode.support, episode.types)
        value = float(loss.detach())
        if cfg.finetune_early_stop:
            if value >= prev and before is not None:
                m.load_state_dict(before)  # the last step made the loss worse: undo it
                break
            before = {k: v.detach().clone() for k, v in m.state_dict().items()}
        prev = value
        opt.zero_grad()
        loss.backward()
        if cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
    else:
        if cfg.finetune_early_stop and before is not None:
            with torch.no_grad():  # the last step is checked like the others
                if float(m.support_loss(episode.support, episode.types)) >= prev:
                    m.load_state_dict(before)
    return m.eval()


def train(
    model: nn.Module,
    train_episodes: Sequence[Episode],
    dev_episodes: Sequence[Episode] = (),
    config: TrainConfig | None = None,
    progress: Callable[[int, float], None] | None = None,
    metadata: dict | None = None,
    checkpoint: Callable[[int], None] | None = None,
) -> TrainResult:
    """Episodic training; the model ends holding its best dev state (or the last if no dev episodes).

    ``metadata`` (setting name, data version and fingerprints) is written into ``train_result.json``.
    ``checkpoint(step)`` is called at every evaluation point (``eval_every`` steps and the last step),
    after the dev evaluation, with the model as it is then (a learning curve; the learning-rate schedule
    still spans all ``steps``).
    """
    cfg = config or TrainConfig()
    if not train_episodes:
        raise ValueError("train: train_episodes is empty")
    seed_everything(cfg.seed)
    freeze_lower_layers(model, cfg.trainable_layers)
    opt = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.steps, cfg.warmup))
    order = random.Random(cfg.seed)
    history: list[dict] = []
    best_f1, best_step, best_state = -1.0, 0, None
    model.train()
    t0, ran = time.perf_counter(), 0
    eval_points = set(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every)) if cfg.eval_every else set()
    eval_points.add(cfg.steps)
    for step in range(1, cfg.steps + 1):
        opt.zero_grad()
        loss = torch.zeros(())
        for _ in range(cfg.episodes_per_step):
            ep = train_episodes[order.randrange(len(train_episodes))]
            part = model.episode_loss(ep) / cfg.episodes_per_step
            part.backward()
            loss = loss + part.detach().cpu()
        if cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip)
        opt.step()
        sched.step()
        ran += cfg.episodes_per_step
        history.append({"step": step, "loss": float(loss.detach())})
        if progress:
            progress(step, float(loss.detach()))
        if dev_episodes and step in eval_points:
            f1 = evaluate(model, dev_episodes).f1
            history[-1]["dev_f1"] = f1
            if f1 > best_f1:
                best_f1, best_step = f1, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if cfg.output_dir and hasattr(model, "save_pretrained"):
                    model.save_pretrained(cfg.output_dir)
            model.train()
        if checkpoint is not None and step in eval_points:
            checkpoint(step)
            model.train()
    seconds = (time.perf_counter() - t0) / max(1, ran)
    if best_state is not None:
        model.load_state_dict(best_state)
    elif cfg.output_dir and hasattr(model, "save_pretrained"):
        model.save_pretrained(cfg.output_dir)
    model.eval()
    result = TrainResult(best_f1, best_step, history, cfg.seed, seconds)
    if cfg.output_dir:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "train_result.json").write_text(
            json.dumps({**(metadata or {}), "config": asdict(cfg), **asdict(result)}, indent=1),
            encoding="utf-8",
        )
    return result
