"""Trainer: exact resume, gradient accumulation, logs, checkpoint round trip and preprocessing contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from cxr_risk import PreprocessConfig
from cxr_risk.autoencoder import AutoencoderWeights, SemiSupervisedAutoencoder
from cxr_risk.backbones import RiskModel, create_encoder
from cxr_risk.checkpoint import Sidecar, load_sidecar, load_state
from cxr_risk.contrastive import AugmentConfig, GrayscaleAugment
from cxr_risk.methods import FINETUNE_AUGMENT
from cxr_risk.predict import check_preprocess, load_risk_model, predict_images
from cxr_risk.survival import SurvivalConfig
from cxr_risk.trainer import FinetuneTask, TrainConfig, Trainer

torch.set_num_threads(1)
SIZE = 32
BACKBONE = "test_resnet"


class Blobs(Dataset):
    """Images with a bright disc whose radius sets the hazard (plus labels and follow-up)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.r = rng.uniform(2, 10, n)
        yy, xx = np.mgrid[:SIZE, :SIZE]
        d = np.sqrt((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2)
        self.img = ((d[None] < self.r[:, None, None]) * 0.8 + rng.normal(0, 0.05, (n, SIZE, SIZE))).clip(0, 1)
        t = rng.exponential(5 * np.exp(-(self.r - 6) / 2))
        c = rng.uniform(1, 10, n)
        self.time, self.event = np.minimum(t, c), (t <= c).astype(float)
        self.labels = np.stack([self.r > 6, self.r > 8], 1).astype(float)

    def __len__(self) -> int:
        return len(self.r)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": torch.tensor(self.img[i], dtype=torch.float32)[None],
            "time": torch.tensor(self.time[i], dtype=torch.float32),
            "event": torch.tensor(self.event[i], dtype=torch.float32),
            "labels": torch.tensor(self.labels[i], dtype=torch.float32),
            "label_mask": torch.tensor([True, i % 3 != 0]),
        }


def sidecar(kind: str = "risk", survival: SurvivalConfig | None = None) -> Sidecar:
    return Sidecar.create(
        kind,
        {"name": BACKBONE, "checkpoint_path": None, "drop_rate": 0.0},
        PreprocessConfig(size=SIZE),
        survival=None if survival is None else survival.to_dict(),
    )


def finetune_task(seed: int = 0, augment: AugmentConfig | None = None) -> FinetuneTask:
    torch.manual_seed(seed)
    model = RiskModel(create_encoder(BACKBONE), SurvivalConfig(kind="cox", horizon=5.0))
    return FinetuneTask(model, None if augment is None else GrayscaleAugment(augment))


def test_finetune_augment_only_in_training_and_changes_the_loss():
    data = Blobs(8, seed=5)
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("image", "time", "event")}
    plain, aug = finetune_task(), finetune_task(augment=FINETUNE_AUGMENT)
    plain.eval(), aug.eval()
    torch.testing.assert_close(plain(batch)[0], aug(batch)[0], rtol=0, atol=0)  # eval: no jitter
    plain.train(), aug.train()
    torch.manual_seed(1)
    a = aug(batch)[0]
    torch.manual_seed(1)
    assert not torch.equal(a, plain(batch)[0])
    torch.manual_seed(1)
    torch.testing.assert_close(aug(batch)[0], a, rtol=0, atol=0)  # seeded: reproducible


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 3e-3, "progress": False, **kw})


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_resume_continues_exactly(tmp_path, augment):
    data = Blobs(40)
    surv = SurvivalConfig(kind="cox", horizon=5.0).to_dict()
    aug = FINETUNE_AUGMENT if augment else None
    t_full = Trainer(
        finetune_task(augment=aug), cfg(), tmp_path / "full", sidecar(survival=SurvivalConfig(horizon=5.0))
    )
    t_full.fit(data)
    t_a = Trainer(
        finetune_task(augment=aug), cfg(), tmp_path / "split", sidecar(survival=SurvivalConfig(horizon=5.0))
    )
    t_a.fit(data, stop_after=1)  # interrupted after one epoch
    # a new process would rebuild everything from scratch (different init seed) and resume from disk
    t_b = Trainer(
        finetune_task(seed=123, augment=aug),
        cfg(),
        tmp_path / "split",
        sidecar(survival=SurvivalConfig(horizon=5.0)),
    )
    t_b.fit(data, resume=True)
    a, b = load_state(tmp_path / "full"), load_state(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert torch.isfinite(a["model.head.base_cumhaz"]).all()  # baseline fitted at the end
    assert t_b.global_step == t_full.global_step == 10
    side = json.loads((tmp_path / "split" / "model.json").read_text())
    assert side["survival"] == surv and side["train"]["epochs"] == 2 and side["input_size"] == [SIZE, SIZE]
    rows = [json.loads(x) for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    assert (tmp_path / "split" / "log.csv").read_text().startswith("kind,epoch,step")


def test_grad_accumulation_matches_large_batch(tmp_path):
    """batch 8 x accum 2 takes the same steps as batch 16 for a per-sample-mean loss (reconstruction)."""
    data = Blobs(32)

    def run(bs: int, accum: int, name: str) -> dict:
        torch.manual_seed(0)
        task = SemiSupervisedAutoencoder(
            create_encoder("test_convnext"), 0, None, AutoencoderWeights(1, 0, 0)
        )
        tr = Trainer(
            task,
            cfg(epochs=1, batch_size=bs, grad_accum=accum, grad_clip=None),
            tmp_path / name,
            sidecar("ssae"),
        )
        # same data order for both: one permutation per epoch, consumed in order
        tr.fit(data)
        return load_state(tmp_path / name)

    a, b = run(16, 1, "big"), run(8, 2, "accum")
    errs = [float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()]
    assert max(errs) < 1e-4, max(errs)


def test_checkpoint_reload_gives_identical_risks_and_contract_is_enforced(tmp_path):
    data = Blobs(24)
    task = finetune_task()
    tr = Trainer(
        task, cfg(epochs=1), tmp_path / "ck", sidecar(survival=SurvivalConfig(kind="cox", horizon=5.0))
    )
    tr.fit(data)
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    task.eval()
    with torch.no_grad():
        before = task.model(x)
    model, side = load_risk_model(tmp_path / "ck")
    after = predict_images(model, side, x)
    assert torch.equal(before, after["out"])
    with pytest.raises(ValueError, match=r"\[N, 1, 32, 32\]"):
        predict_images(model, side, x[:, :, :16, :16])
    with pytest.raises(ValueError, match=r"size=.*model needs"):
        check_preprocess(side, PreprocessConfig(size=64))
    assert check_preprocess(side, PreprocessConfig(size=SIZE)) == PreprocessConfig(size=SIZE)
    # a sidecar whose fingerprint no longer matches the pipeline is refused
    raw = json.loads((tmp_path / "ck" / "model.json").read_text())
    raw["preprocess_fingerprint"] = "0" * 16
    (tmp_path / "ck" / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="pipeline changed"):
        load_risk_model(tmp_path / "ck")
    assert load_sidecar(tmp_path / "ck").kind == "risk"


def test_finetune_learns_from_pixels(tmp_path):
    from cxr_risk.metrics import harrell_c

    train, test = Blobs(96, seed=1), Blobs(64, seed=2)
    task = finetune_task()
    Trainer(task, cfg(epochs=4, lr=3e-3), tmp_path / "ck", sidecar(survival=SurvivalConfig(horizon=5.0))).fit(
        train
    )
    model, side = load_risk_model(tmp_path / "ck")
    x = torch.stack([test[i]["image"] for i in range(len(test))])
    risk = predict_images(model, side, x)["risk"].numpy()
    oracle = harrell_c(test.time, test.event, test.r)  # the true hazard's ranking: 0.70 on this sample
    assert harrell_c(test.time, test.event, risk) > max(0.6, oracle - 0.08)


def test_config_validation_and_small_dataset_error(tmp_path):
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")  # type: ignore[arg-type]
    tr = Trainer(finetune_task(), cfg(batch_size=64), tmp_path / "x", sidecar(survival=SurvivalConfig()))
    with pytest.raises(ValueError, match="batch_size"):
        tr.fit(Blobs(10))


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_trainer import Blobs, cfg, finetune_task, sidecar
from cxr_risk.survival import SurvivalConfig
from cxr_risk.trainer import Trainer
torch.set_num_threads(1)
tr = Trainer(finetune_task(), cfg(epochs=1, batch_size=4), {out!r}, sidecar(survival=SurvivalConfig(horizon=5.0)))
tr.fit(Blobs(16))
flat = torch.cat([p.detach().flatten() for p in tr.task.parameters()])
gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
with open({out!r} + f"/rank{{dist.get_rank()}}.txt", "w") as fh:
    fh.write(str(tr.global_step))
dist.barrier()
dist.destroy_process_group()
# gloo's background threads can abort ("terminate called without an active exception") in interpreter
# teardown; everything this script checks is written, so leave without running C++ destructors.
import os
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "ck")))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",  # a free port on localhost: no clash with another run on the same machine
        str(script),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # 16 images / (2 ranks x batch 4) = 2 optimizer steps on each rank
        assert (tmp_path / "ck" / f"rank{rank}.txt").read_text() == "2"
    assert (tmp_path / "ck" / "model.safetensors").is_file()


def _amp_run(tmp_path, device: torch.device, amp: str, name: str) -> tuple[Trainer, torch.Tensor]:
    data = Blobs(24, seed=3)
    task = finetune_task()
    surv = SurvivalConfig(kind="cox", horizon=5.0)
    tr = Trainer(task, cfg(epochs=1, amp=amp), tmp_path / name, sidecar(survival=surv), device=device)
    tr.fit(data)
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    return tr, x


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_amp_on_cpu_trains_fp32_weights_and_reloads(tmp_path, amp):
    """bf16 autocast on CPU: the step runs, master weights and the checkpoint stay fp32, reload is exact."""
    tr, x = _amp_run(tmp_path, torch.device("cpu"), amp, amp)
    assert tr.amp_dtype == (torch.bfloat16 if amp == "bf16" else None)
    state = load_state(tmp_path / amp)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    rows = [json.loads(r) for r in (tmp_path / amp / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "step")
    model, side = load_risk_model(tmp_path / amp)
    tr.task.eval()
    with torch.no_grad():
        before = tr.task.model(x)
    assert torch.equal(before, predict_images(model, side, x)["out"])


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_amp_on_cuda_trains_and_checkpoint_predicts_identically(tmp_path, device, amp):
    """On a GPU, "auto" picks bf16 where supported (else fp16 with a scaler); the checkpoint reloads on the
    GPU and on the CPU and gives the risks the trained model gives."""
    tr, x = _amp_run(tmp_path, device, amp, amp)
    expected = torch.bfloat16 if amp == "auto" and torch.cuda.is_bf16_supported() else torch.float16
    assert tr.amp_dtype == expected
    assert tr.scaler.is_enabled() == (expected == torch.float16)
    tr.task.eval()
    with torch.no_grad():
        before = tr.task.model(x.to(device)).float().cpu()
    assert torch.isfinite(before).all()
    model, side = load_risk_model(tmp_path / amp, device=device)
    on_gpu = predict_images(model, side, x.to(device))["out"].float().cpu()
    torch.testing.assert_close(on_gpu, before, rtol=1e-5, atol=1e-5)  # cuDNN may pick another algorithm
    model_cpu, _ = load_risk_model(tmp_path / amp)
    on_cpu = predict_images(model_cpu, side, x)["out"]
    torch.testing.assert_close(on_cpu, before, rtol=1e-4, atol=1e-4)  # cuDNN vs CPU kernels, fp32
