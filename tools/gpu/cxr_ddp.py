"""cxr-risk under DDP: the trainer's torchrun path on 2 GPUs (NCCL), replicas identical, checkpoint loads.

    python -m torch.distributed.run --nproc-per-node 2 tools/gpu/cxr_ddp.py --out bench-results/gpu/ddp-cxr-risk.json

Started by ``torchrun`` (``WORLD_SIZE`` = 2), ``cxr_risk.Trainer`` initialises the process group itself
(NCCL on GPUs, gloo on CPU), wraps the task in ``DistributedDataParallel`` and gives each rank its shard of
the epoch's permutation. One epoch with AMP ``"auto"`` on 64 synthetic 224 x 224 images, batch 8 per rank,
a timm ``resnet18`` (random init). The checks: every rank ends with the same parameters (DDP averages the
gradients, so replicas never drift), the loss is finite, and rank 0's checkpoint loads and predicts.
``--check`` runs the same under ``torchrun`` with gloo on 2 CPU processes (``test_resnet``, 32 px).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from cxr_amp import Discs
from partresult import PartResult, parser


def main(argv: list[str] | None = None) -> int:
    from cxr_risk import (
        PreprocessConfig,
        SurvivalConfig,
        TrainConfig,
        Trainer,
        load_risk_model,
        predict_images,
    )
    from cxr_risk.backbones import RiskModel, create_encoder
    from cxr_risk.checkpoint import Sidecar
    from cxr_risk.trainer import FinetuneTask

    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise SystemExit("cxr_ddp: start with torchrun --nproc-per-node 2 (WORLD_SIZE is not set)")
    rank = int(os.environ["RANK"])
    backbone, size, device = ("test_resnet", 32, "cpu") if args.check else ("resnet18", 224, "cuda")
    if args.check:
        torch.set_num_threads(1)
    result = PartResult(
        "ddp-cxr-risk" + (" (check)" if args.check else ""), None if args.check else args.out, args.deadline
    )
    survival = SurvivalConfig(kind="cox", horizon=5.0)
    torch.manual_seed(0)
    task = FinetuneTask(RiskModel(create_encoder(backbone), survival))
    sidecar = Sidecar.create(
        "risk",
        {"name": backbone, "checkpoint_path": None, "drop_rate": 0.0},
        PreprocessConfig(size=size),
        survival=survival.to_dict(),
    )
    data = Discs(64, size, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        # only rank 0 writes (logs, checkpoint), so each rank's own temporary folder will do
        cfg = TrainConfig(epochs=1, batch_size=8, amp="auto", progress=False)
        folder = Path(tmp) / "ddp"
        trainer = Trainer(task, cfg, folder, sidecar, device=device)  # starts the process group
        start = time.perf_counter()
        history = trainer.fit(data)
        fit_s = time.perf_counter() - start
        flat = torch.cat([p.detach().float().flatten() for p in trainer.task.parameters()])
        every = [torch.zeros_like(flat) for _ in range(trainer.ctx.world_size)]
        dist.all_gather(every, flat)
        drift = max(float((e - every[0]).abs().max()) for e in every)
        loss = float(history[-1]["loss"])
        rows = None
        if rank == 0:
            model, side = load_risk_model(folder, device=trainer.ctx.device)
            x = torch.stack([data[i]["image"] for i in range(8)])
            out = predict_images(model, side, x.to(trainer.ctx.device))["out"]
            problems = []
            if drift != 0.0:
                problems.append(f"replicas differ by {drift:.2e}")
            if not np.isfinite(loss):
                problems.append(f"loss {loss}")
            if not torch.isfinite(out).all():
                problems.append("checkpoint predicts non-finite risks")
            backend = dist.get_backend()
            rows = [
                [
                    backend,
                    trainer.ctx.world_size,
                    str(trainer.amp_dtype or "fp32").removeprefix("torch."),
                    round(fit_s, 2),
                    f"{drift:.1e}",
                    round(loss, 4),
                    "ok" if not problems else "failed: " + "; ".join(problems),
                ]
            ]
        dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return 0
    table = result.section(
        "cxr-risk: DDP training under torchrun",
        f"timm {backbone} (random init), Cox head, 64 synthetic {size} x {size} images, batch 8 per rank, one "
        "epoch, amp 'auto'; 'replica drift' = largest parameter difference between ranks after the epoch",
        ["backend", "ranks", "amp dtype", "fit s", "replica drift", "loss", "status"],
    )
    table.rows.extend(rows or [])
    result.finish()
    if args.check:
        print(
            f"cxr_ddp check ok: {table.rows}" if table.rows[0][-1] == "ok" else f"cxr_ddp check: {table.rows}"
        )
    return 0 if table.rows and table.rows[0][-1] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
