"""cxr-risk on a GPU: AMP training steps, an exact resume, and the checkpoint's round trip.

    PYTHONPATH=tools:tools/gpu python tools/gpu/cxr_amp.py --out bench-results/gpu/amp-cxr-risk.json

A timm ``resnet18`` (random init: nothing is downloaded) with a Cox head on 64 synthetic 224 x 224
radiographs whose bright disc sets the hazard, batch 16: per AMP setting (``"auto"``, which is bf16 on a
GPU that has it, ``"fp16"`` with a gradient scaler, and ``"off"`` for fp32) one epoch of 4 optimizer steps,
then a second epoch resumed from the checkpoint (``Trainer.fit(resume=True)``, timed: this is the step
time), then ``load_risk_model`` on the GPU and on the CPU. The checks: the AMP dtype and scaler are what
the trainer documents, the loss is finite, the checkpoint is fp32, and its risks equal the trained
model's (GPU reload within 1e-5: cuDNN may pick another algorithm; CPU reload within 1e-4).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import benchkit
import numpy as np
import torch
from partresult import PartResult, parser
from torch.utils.data import Dataset

AMP_SETTINGS = ("auto", "fp16", "off")


class Discs(Dataset):
    """Images with a bright disc whose radius sets the hazard, with follow-up time and event."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        r = rng.uniform(0.05, 0.3, n) * size
        yy, xx = np.mgrid[:size, :size]
        d = np.sqrt((yy - size / 2) ** 2 + (xx - size / 2) ** 2)
        self.img = ((d[None] < r[:, None, None]) * 0.8 + rng.normal(0, 0.05, (n, size, size))).clip(0, 1)
        t = rng.exponential(5 * np.exp(-(r / size - 0.17) * 10))
        c = rng.uniform(1, 10, n)
        self.time, self.event = np.minimum(t, c), (t <= c).astype(float)

    def __len__(self) -> int:
        return len(self.time)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": torch.tensor(self.img[i], dtype=torch.float32)[None],
            "time": torch.tensor(self.time[i], dtype=torch.float32),
            "event": torch.tensor(self.event[i], dtype=torch.float32),
        }


def one_setting(
    out_dir: Path, device: torch.device, amp: str, backbone: str, size: int, n: int, batch: int
) -> list:
    """``[amp, dtype, scaler, epoch-2 s, steps, loss, GPU reload diff, CPU reload diff, status]``."""
    from cxr_risk import (
        PreprocessConfig,
        SurvivalConfig,
        TrainConfig,
        Trainer,
        load_risk_model,
        predict_images,
    )
    from cxr_risk.backbones import RiskModel, create_encoder
    from cxr_risk.checkpoint import Sidecar, load_state
    from cxr_risk.trainer import FinetuneTask

    data = Discs(n, size, seed=3)
    survival = SurvivalConfig(kind="cox", horizon=5.0)
    torch.manual_seed(0)
    task = FinetuneTask(RiskModel(create_encoder(backbone), survival))
    sidecar = Sidecar.create(
        "risk",
        {"name": backbone, "checkpoint_path": None, "drop_rate": 0.0},
        PreprocessConfig(size=size),
        survival=survival.to_dict(),
    )
    cfg = TrainConfig(epochs=2, batch_size=batch, amp=amp, progress=False, lr=1e-3)  # type: ignore[arg-type]
    directory = out_dir / amp
    Trainer(task, cfg, directory, sidecar, device=device).fit(data, stop_after=1)
    trainer = Trainer(task, cfg, directory, sidecar, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    history = trainer.fit(data, resume=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    epoch_s = time.perf_counter() - start
    steps = len(data) // batch  # drop_last, no accumulation
    want = torch.float16 if amp == "fp16" else None
    if amp == "auto" and device.type == "cuda":
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        want = torch.bfloat16
    problems = []
    if trainer.amp_dtype != want:
        problems.append(f"amp dtype {trainer.amp_dtype}, expected {want}")
    if trainer.scaler.is_enabled() != (want == torch.float16):
        problems.append(f"gradient scaler enabled={trainer.scaler.is_enabled()} with dtype {want}")
    loss = float(history[-1]["loss"])
    if not np.isfinite(loss):
        problems.append(f"loss {loss}")
    state = load_state(directory)
    if any(v.dtype != torch.float32 for v in state.values() if v.is_floating_point()):
        problems.append("checkpoint holds non-fp32 floats")
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    trainer.task.eval()
    with torch.no_grad():
        before = trainer.task.model(x.to(device)).float().cpu()
    model, side = load_risk_model(directory, device=device)
    on_device = predict_images(model, side, x.to(device))["out"].float().cpu()
    model_cpu, _ = load_risk_model(directory)
    on_cpu = predict_images(model_cpu, side, x)["out"].float()
    d_dev = float((on_device - before).abs().max())
    d_cpu = float((on_cpu - before).abs().max())
    scale = float(before.abs().max()) + 1e-12
    if d_dev > 1e-5 * (1 + scale):
        problems.append(f"{device.type} reload differs by {d_dev:.2e}")
    if d_cpu > 1e-4 * (1 + scale):
        problems.append(f"CPU reload differs by {d_cpu:.2e}")
    return [
        amp,
        str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "fp32",
        trainer.scaler.is_enabled(),
        round(epoch_s, 3),
        steps,
        round(loss, 4),
        f"{d_dev:.1e}",
        f"{d_cpu:.1e}",
        "ok" if not problems else "failed: " + "; ".join(problems),
    ]


def run(
    result: PartResult, device: torch.device, settings: tuple[str, ...], backbone: str, size: int
) -> None:
    n, batch = 64, 16
    table = result.section(
        "cxr-risk: AMP training, resume and checkpoint round trip",
        f"timm {backbone} (random init), Cox head, {n} synthetic {size} x {size} images, batch {batch}; "
        "'epoch 2 s' is the resumed epoch (checkpoint load, 4 steps, Breslow fit, checkpoint save)",
        [
            "amp",
            "dtype",
            "grad scaler",
            "epoch 2 s",
            "steps",
            "loss",
            "reload diff (same device)",
            "reload diff (CPU)",
            "status",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for amp in settings:
            if result.left() < 10:
                result.stop_early(f"amp={amp} not run: {result.left():.0f} s left")
                break
            try:
                table.rows.append(one_setting(Path(tmp), device, amp, backbone, size, n, batch))
            except Exception as err:  # one setting failing must not hide the others
                table.rows.append([amp, *[None] * 7, f"failed: {type(err).__name__}: {err}"[:300]])
            result.write()


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.check:
        result = PartResult("amp-cxr-risk (check)", None, 0.0)
        run(result, torch.device("cpu"), ("bf16", "off"), "test_resnet", 32)
        bad = [r for r in result.sections[0].rows if r[-1] != "ok"]
        if bad:
            raise SystemExit(f"cxr-risk check failed: {bad}")
        print(f"cxr_amp check ok: {[r[:2] for r in result.sections[0].rows]}")
        return 0
    result = PartResult(
        "amp-cxr-risk", args.out, args.deadline, environment=benchkit.environment(["cxr-risk"])
    )
    result.write()
    run(result, torch.device(args.device), AMP_SETTINGS, "resnet18", 224)
    if any(r[-1] != "ok" for r in result.sections[0].rows):
        result.finish()
        raise SystemExit("cxr-risk: an AMP setting failed (see the table)")
    result.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
