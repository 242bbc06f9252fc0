"""Each pretraining method, run through :func:`cxr_risk.methods.pretrain`, lowers its own loss.

A tiny synthetic cohort (16 phantoms, 32 px, ``test_resnet``) is pretrained for 20 optimizer steps by the
package's trainer; the method's loss on one fixed batch is then compared with the loss of the same task
before training (rebuilt with the seed ``pretrain`` uses, so it is exactly the initial model). The loss is
measured in training mode (batch statistics, so BatchNorm's running averages, which move even without a
single optimizer step, play no part) with the augmentation draws seeded, and for MoCo with the initial
queue of negatives on both sides. Without optimizer steps the two losses are then identical, which the
control test checks: what the main test sees is learning, not a change in what is measured.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from cxr_risk import Cohort, PreprocessConfig
from cxr_risk.backbones import BackboneConfig, Encoder
from cxr_risk.cache import CachedImageDataset
from cxr_risk.checkpoint import load_state
from cxr_risk.methods import PRETRAINED_METHODS, build_pretrain_task, pretrain
from cxr_risk.survival import SurvivalConfig
from cxr_risk.synth import make_cohort
from cxr_risk.trainer import TrainConfig, collate

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
PRE = PreprocessConfig(size=32)
BACKBONE = BackboneConfig("test_resnet")
# 16 images, batch 8: 2 steps per epoch, 20 steps in all. lr 3e-3 with the trainer's warm-up and cosine decay;
# SimCLR, the slowest of the four here, ends about 20 % below its initial loss at this seed.
TRAIN = TrainConfig(epochs=10, batch_size=8, lr=3e-3, progress=False, amp="off", seed=0)
MARGIN = 0.9  # loss after training at most 90 % of the loss before
# Small projectors and a MoCo queue of the order of the cohort (the class docstring: it must not exceed
# the number of training images by much)
OPTIONS: dict[str, dict] = {
    "simclr": {"proj_dim": 32, "hidden": 64},
    "moco": {"proj_dim": 32, "hidden": 64, "queue_size": 64},
    "autoencoder": {},
    "ssae": {},
}
# what each method's loss is made of, as its forward logs it
TERMS = {"simclr": {"nt_xent"}, "moco": {"info_nce"}, "autoencoder": {"rec"}, "ssae": {"rec", "dx", "risk"}}
SURVIVAL = SurvivalConfig(horizon=8.0)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pretrain-learns")
    cohort = Cohort.read(make_cohort(root / "pre", n=16, seed=21, size=32), check_files=False)
    dataset = CachedImageDataset(cohort, PRE, root / "cache")
    batch = collate([dataset[i] for i in range(8)])
    assert bool(batch["event"].sum() > 0) and bool(batch["label_mask"].any())  # every ssae term is active
    return {"root": root, "cohort": cohort, "cache": root / "cache", "batch": batch}


def initial_task(method: str) -> torch.nn.Module:
    """The task exactly as :func:`pretrain` builds it before its first step (same seed, same calls)."""
    torch.manual_seed(TRAIN.seed)
    survival = SURVIVAL if method == "ssae" else None
    return build_pretrain_task(method, Encoder(BACKBONE), 3, survival, None, OPTIONS[method])


def own_loss(task: torch.nn.Module, batch: dict, queue: torch.Tensor | None) -> float:
    """The method's loss on ``batch``: training mode, seeded augmentations, MoCo's queue set to ``queue``."""
    probe = copy.deepcopy(task).train()  # MoCo's forward moves its key encoder and queue: leave task alone
    if queue is not None:
        probe.queue.copy_(queue)
    torch.manual_seed(1234)
    with torch.no_grad():
        loss, _ = probe(batch)
    return float(loss)


def before_and_after(site: dict, method: str, out: Path) -> tuple[float, float]:
    start = initial_task(method)
    pretrain(
        method,
        site["cohort"],
        out,
        BACKBONE,
        PRE,
        TRAIN,
        site["cache"],
        survival=SURVIVAL if method == "ssae" else None,
        options=OPTIONS[method],
    )
    trained = copy.deepcopy(start)
    trained.load_state_dict(load_state(out))
    queue = start.queue.clone() if method == "moco" else None
    return own_loss(start, site["batch"], queue), own_loss(trained, site["batch"], queue)


@pytest.mark.parametrize("method", PRETRAINED_METHODS)
def test_pretraining_lowers_the_methods_own_loss(site, method):
    out = site["root"] / method
    before, after = before_and_after(site, method, out)
    assert after <= MARGIN * before, f"{method}: loss {before:.4f} -> {after:.4f} ({after / before:.3f}x)"
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [row for row in steps if row["kind"] == "step"]
    assert len(steps) == TRAIN.epochs * 2
    logged = {k for k in steps[-1] if k not in ("kind", "epoch", "step", "lr", "loss")}
    assert logged == TERMS[method]  # the loss that fell is the method's full objective


@pytest.mark.parametrize("method", PRETRAINED_METHODS)
def test_without_optimizer_steps_the_loss_is_unchanged(site, method, monkeypatch):
    """Control: with AdamW's step a no-op the measured loss must not move, so the test above measures
    learning (and would fail if the trainer skipped its optimizer step)."""
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *args, **kwargs: None)
    before, after = before_and_after(site, method, site["root"] / f"{method}-no-step")
    # MoCo: its key encoder still follows the (unchanged) query encoder, a rounding-level change
    assert after == pytest.approx(before, rel=1e-5), (before, after)
