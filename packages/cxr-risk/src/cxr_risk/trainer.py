"""One training loop for every method: pretraining tasks and survival fine-tuning alike.

A *task* is an ``nn.Module`` whose ``forward(batch)`` returns ``(loss, logs)`` (SimCLR, MoCo, the
(semi-supervised) autoencoder, :class:`FinetuneTask`). The loop adds what long runs need and nothing else:

* AMP where supported (bf16 autocast on GPUs that have it, else fp16 with a gradient scaler; off on CPU
  unless asked), gradient accumulation, gradient clipping;
* a checkpoint after every epoch (``model.safetensors`` + ``model.json``, plus optimizer state) and
  ``resume=True`` that continues *exactly*: the data order and every random draw of epoch e depend only on
  (seed, epoch, rank), so epochs 1..E in one run equal epochs 1..k then k+1..E after a restart;
* a rich progress bar, ``log.csv`` and ``log.jsonl`` (one row per optimizer step and per epoch);
* torch DDP when started by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU; each rank reads
  its own shard of the epoch's permutation and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .backbones import RiskModel
from .cache import collate
from .checkpoint import Sidecar, load_state, save_checkpoint

# ``collate`` lives beside the dataset whose items it stacks; re-exported here, where it was first published.
__all__ = ["FinetuneTask", "TrainConfig", "Trainer", "collate", "distributed_context"]


@dataclass
class TrainConfig:
    """Optimisation settings (AdamW with cosine decay and linear warm-up).

    ``batch_size`` is per rank and per micro-step; the effective batch is
    ``batch_size * grad_accum * world_size``. ``amp``: ``"auto"`` (bf16/fp16 on CUDA, off on CPU), ``"off"``,
    ``"bf16"`` or ``"fp16"``. ``warmup_frac``: fraction of optimizer steps spent warming up.
    ``flush_denormal``: on CPU, ``fit`` calls ``torch.set_flush_denormal(True)`` (process-wide; values below
    1.2e-38 become 0). After a few AdamW steps subnormal floats appear and x86 CPUs slow down on them: a
    ``test_resnet`` step at 64 px, batch 32, took 0.45 s instead of 0.05 s on this project's 2-core CI
    machine. The flag is per thread and worker threads inherit it only when created after it is set, so a
    script that wants every intra-op thread covered calls ``torch.set_flush_denormal(True)`` before its first
    torch operation (the benchmark does). Set False to leave the floating-point mode alone; no effect on GPUs.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    warmup_frac: float = 0.05
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    drop_last: bool = True
    flush_denormal: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: lr={self.lr} must be > 0")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"TrainConfig: amp={self.amp!r} must be 'auto', 'off', 'bf16' or 'fp16'")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"TrainConfig: warmup_frac={self.warmup_frac} must be in [0, 1)")
        if self.num_workers < 0:
            raise ValueError(f"TrainConfig: num_workers={self.num_workers} must be >= 0")


# ------------------------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context(device: str | torch.device | None = None) -> DistContext:
    """Start the process group when launched by ``torchrun``; otherwise a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistContext(rank, world, local, dev)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return DistContext(0, 1, 0, torch.device(device))


class EpochSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch), sharded over ranks (padded to equal length)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = math.ceil(self.n / self.world)
        perm += perm[: per_rank * self.world - self.n]
        return iter(perm[self.rank :: self.world])

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - user code and libraries may draw from the legacy global RNG
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ fine-tuning task
class FinetuneTask(nn.Module):
    """Survival fine-tuning of a :class:`RiskModel` on images whose patient has follow-up.

    ``augment``: an optional batched image transform applied in training mode only (e.g.
    :data:`~cxr_risk.methods.FINETUNE_AUGMENT`, intensity-only jitter against acquisition shift). It draws from
    torch's global generator, which the trainer seeds per (seed, epoch, rank), so resume stays exact.
    """

    def __init__(self, model: RiskModel, augment: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.augment = augment

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x = batch["image"]
        if self.augment is not None and self.training:
            with torch.no_grad():
                x = self.augment(x)
        out = self.model(x)
        has = torch.isfinite(batch["time"]) & torch.isfinite(batch["event"])
        if not bool(has.all()):
            raise ValueError(
                "FinetuneTask: the batch holds images without follow-up (time/event NaN); fine-tune on a "
                "cohort with time and event columns"
            )
        # fp32 loss under autocast: bf16 would round follow-up times (8-bit mantissa) into spurious ties
        out = out.float()
        loss = self.model.head.loss(out, batch["time"].float(), batch["event"].float())
        return loss, {"surv": float(loss.detach())}

    @torch.no_grad()
    def on_train_end(self, dataset: Dataset, device: torch.device) -> None:
        """Fit the Cox head's Breslow baseline on the (whole) training set, so S(t) is defined."""
        from .survival import CoxHead

        if not isinstance(self.model.head, CoxHead):
            return
        was_training = self.training
        self.eval()
        loader = DataLoader(dataset, batch_size=64, shuffle=False, collate_fn=collate)
        outs, times, events = [], [], []
        for batch in loader:
            outs.append(self.model(batch["image"].to(device)).float().cpu())
            times.append(batch["time"].float())
            events.append(batch["event"].float())
        self.model.head.fit_baseline(torch.cat(outs), torch.cat(times), torch.cat(events))
        self.train(was_training)


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Runs a task over a dataset; writes checkpoints and logs to ``out_dir`` (see module docstring)."""

    def __init__(
        self,
        task: nn.Module,
        config: TrainConfig,
        out_dir: str | Path,
        sidecar: Sidecar,
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.sidecar = sidecar
        self.ctx = distributed_context(device)
        self.task = task.to(self.ctx.device)
        self.ddp: nn.Module = self.task
        if self.ctx.world_size > 1:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.task, device_ids=ids)
        params = [p for p in self.task.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.amp_dtype == torch.float16)
        self.epoch = 0  # epochs completed
        self.global_step = 0

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.config.amp
        if amp == "off" or (amp == "auto" and self.ctx.device.type != "cuda"):
            return None
        if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16

    # -------------------------------------------------------------------------------- state i/o
    def save(self, directory: Path | None = None) -> Path:
        """Model + sidecar + optimizer/trainer state (rank 0 only)."""
        directory = directory or self.out_dir
        if not self.ctx.is_main:
            return directory
        self.sidecar.train = asdict(self.config)
        self.sidecar.seed = self.config.seed
        save_checkpoint(directory, self.task, self.sidecar)
        opt = self.optimizer.state_dict()
        tensors: dict[str, Tensor] = {}
        scalars: dict[str, Any] = {}
        for pid, st in opt["state"].items():
            for name, val in st.items():
                if isinstance(val, Tensor):
                    tensors[f"{pid}.{name}"] = val.detach().contiguous().cpu()
                else:
                    scalars[f"{pid}.{name}"] = val
        save_file(tensors, str(directory / "optimizer.safetensors"))
        state = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "param_groups": opt["param_groups"],
            "optimizer_scalars": scalars,
            "scaler": self.scaler.state_dict(),
        }
        (directory / "trainer_state.json").write_text(json.dumps(state, indent=1))
        return directory

    def load(self, directory: Path) -> None:
        """Restore model, optimizer and counters written by :meth:`save`."""
        self.task.load_state_dict(load_state(directory, self.ctx.device))
        state = json.loads((directory / "trainer_state.json").read_text())
        flat = load_file(str(directory / "optimizer.safetensors"), device=str(self.ctx.device))
        opt_state: dict[int, dict[str, Any]] = {}
        for key, val in [*flat.items(), *state["optimizer_scalars"].items()]:
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = val
        for st in opt_state.values():  # AdamW keeps 'step' on the CPU
            if isinstance(st.get("step"), Tensor):
                st["step"] = st["step"].cpu()
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])

    # -------------------------------------------------------------------------------------- fit
    def _lr_at(self, step: int, total: int) -> float:
        warm = max(1, int(self.config.warmup_frac * total))
        if step < warm:
            return self.config.lr * (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    def fit(
        self,
        dataset: Dataset,
        resume: bool = False,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        stop_after: int | None = None,
    ) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs (continuing from the checkpoint when ``resume``).

        ``stop_after``: return once this many epochs are complete (the schedule still spans
        ``config.epochs``), as an interrupted run would; ``resume=True`` later finishes it.
        ``eval_fn(task)`` is called after each epoch on rank 0; its numbers join the epoch's log row.
        """
        cfg = self.config
        if cfg.flush_denormal and self.ctx.device.type == "cpu":
            torch.set_flush_denormal(True)
        if resume and (self.out_dir / "trainer_state.json").is_file():
            self.load(self.out_dir)
        n = len(dataset)  # type: ignore[arg-type]
        sampler = EpochSampler(n, cfg.seed, self.ctx.rank, self.ctx.world_size)
        per_rank = len(sampler)
        if cfg.drop_last and per_rank < cfg.batch_size:
            raise ValueError(
                f"Trainer: {n} images give {per_rank} per rank, fewer than batch_size={cfg.batch_size}; "
                "lower batch_size (in Python, TrainConfig(drop_last=False) also keeps a partial batch)"
            )
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            collate_fn=collate,
            drop_last=cfg.drop_last,
            persistent_workers=False,
        )
        micro_per_epoch = len(loader)
        steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
        total = steps_per_epoch * cfg.epochs
        history: list[dict[str, Any]] = []
        logger = _Logs(self.out_dir) if self.ctx.is_main else None
        progress = _progress(cfg.progress and self.ctx.is_main)
        with progress as bar:
            task_id = bar.add_task("train", total=total, completed=self.global_step)
            for epoch in range(self.epoch, min(cfg.epochs, stop_after or cfg.epochs)):
                sampler.set_epoch(epoch)
                _seed_everything(cfg.seed * 1_000_003 + epoch * 101 + self.ctx.rank)
                self.ddp.train()
                sums: dict[str, float] = {}
                count = 0
                for i, batch in enumerate(loader):
                    batch = _to_device(batch, self.ctx.device)
                    last_micro = (i + 1) % cfg.grad_accum == 0 or i + 1 == micro_per_epoch
                    sync = contextlib.nullcontext()
                    if not last_micro and isinstance(self.ddp, nn.parallel.DistributedDataParallel):
                        sync = self.ddp.no_sync()
                    with sync:
                        amp_on = self.amp_dtype is not None
                        with torch.autocast(
                            self.ctx.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=amp_on
                        ):
                            loss, logs = self.ddp(batch)
                        group_start = (i // cfg.grad_accum) * cfg.grad_accum
                        n_micro = min(
                            cfg.grad_accum, micro_per_epoch - group_start
                        )  # last group may be short
                        self.scaler.scale(loss.float() / n_micro).backward()
                    for k, v in {"loss": float(loss.detach()), **logs}.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                    if not last_micro:
                        continue
                    lr = self._lr_at(self.global_step, total)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    if cfg.grad_clip is not None:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(self.task.parameters(), cfg.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.global_step += 1
                    if logger is not None:
                        step_row = {"kind": "step", "epoch": epoch + 1, "step": self.global_step, "lr": lr}
                        logger.write({**step_row, "loss": float(loss.detach()), **logs})
                    desc = f"epoch {epoch + 1}/{cfg.epochs} loss {float(loss.detach()):.4f}"
                    bar.update(task_id, advance=1, description=desc)
                self.epoch = epoch + 1
                row: dict[str, Any] = {"kind": "epoch", "epoch": self.epoch, "step": self.global_step}
                row.update({k: v / max(count, 1) for k, v in sums.items()})
                if eval_fn is not None and self.ctx.is_main:
                    self.task.eval()
                    row.update(eval_fn(self.task))
                history.append(row)
                if logger is not None:
                    logger.write(row)
                    logger.flush_csv()
                if self.epoch == cfg.epochs and hasattr(self.task, "on_train_end") and self.ctx.is_main:
                    self.task.on_train_end(dataset, self.ctx.device)
                self.save()
                if self.ctx.world_size > 1:
                    dist.barrier()
        return history


class _Logs:
    """``log.jsonl`` (every row) and ``log.csv`` (fixed columns, the union seen so far rewritten on change)."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = out_dir / "log.jsonl"
        self.csv = out_dir / "log.csv"
        self.rows: list[dict[str, Any]] = []
        if self.jsonl.is_file():  # resume: keep what earlier epochs wrote
            self.rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def flush_csv(self) -> None:
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        with self.csv.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns)
            w.writeheader()
            w.writerows(self.rows)


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
