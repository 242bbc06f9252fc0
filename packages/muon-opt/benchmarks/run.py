"""muon-opt benchmark suite: optimizer step time and state, Newton-Schulz time vs shape, and training
efficiency of Muon vs AdamW on a small GPT (Moonlight, arXiv 2502.16982).

    python benchmarks/run.py --device cpu --profile default --out bench-results/muon-opt-cpu.json
    python benchmarks/run.py --device cuda --profile full --out bench-results/muon-opt-cuda.json

``nox -s "bench(muon-opt, cpu)"`` runs the first line with ``tools/`` on ``PYTHONPATH`` (for ``benchkit``).
The default profile is sized for under 10 minutes on a 2-core CPU; ``full`` is the GPU-scale setting;
``smoke`` checks every code path in about a minute. If ``benchmarks/distributed_bench.py`` exists and
exposes ``run(profile, outdir) -> list[benchkit.Section]``, its sections are appended.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit
import step_time
import training

PREFIX = "muon-opt"


def settings(profile: str, device: torch.device) -> tuple[step_time.StepSettings, training.TrainSettings]:
    if profile == "full":
        cuda = device.type == "cuda"
        return (
            step_time.StepSettings(
                d_model=768 if cuda else 384,
                layers=12 if cuda else 4,
                vocab=50304 if cuda else 8192,
                context=1024,
                big_shape=(1024, 4096) if cuda else (256, 1024),
                small_count=256,
                ns_shapes=(
                    (128, 128),
                    (256, 256),
                    (512, 512),
                    (768, 768),
                    (768, 3072),
                    (1024, 4096),
                    (2048, 2048),
                ),
            ),
            training.TrainSettings(
                lrs=(3e-4, 1e-3, 3e-3, 1e-2),
                sweep_steps=400,
                muon_steps=400,
                adamw_steps=800,
                seeds=(0, 1, 2, 3, 4),
            ),
        )
    if profile == "smoke":
        return (
            step_time.StepSettings(
                d_model=64, layers=2, vocab=256, context=64, big_shape=(64, 128), big_count=2, small_count=8,
                ns_shapes=((32, 32), (32, 64)), ns_batch=2, repeats=2, no_bf16_repeats=1,
            ),
            training.TrainSettings(
                layers=1, d_model=32, heads=2, context=32, batch=4, sweep_steps=4, muon_steps=4, adamw_steps=8,
                seeds=(0, 1), eval_every=2, eval_batches=1,
            ),
        )  # fmt: skip
    return step_time.StepSettings(), training.TrainSettings()


def distributed_sections(profile: str, outdir: Path) -> list[benchkit.Section]:
    path = Path(__file__).resolve().parent / "distributed_bench.py"
    if not path.exists():
        return []
    module = importlib.import_module("distributed_bench")  # benchmarks/ is on sys.path (see above)
    if not hasattr(module, "run"):
        return []
    benchkit.progress("distributed section (distributed_bench.run)")
    return list(module.run(profile, outdir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--profile", default="default", choices=("default", "full", "smoke"))
    parser.add_argument("--out", type=Path, default=Path("bench-results") / f"{PREFIX}-cpu.json")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=("step", "no-bf16", "ns", "training", "distributed")
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads (0: torch's default); 1 on a busy machine",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch.cuda.is_available() is False")
    outdir = args.out.parent
    outdir.mkdir(parents=True, exist_ok=True)
    step_s, train_s = settings(args.profile, device)
    t0 = time.perf_counter()
    result = benchkit.Result(
        package=PREFIX,
        device=args.device,
        profile=args.profile,
        environment=benchkit.environment(["muon-opt"]),
    )
    if "step" not in args.skip:
        sections, extra = step_time.step_time_sections(step_s, device)
        result.sections += sections
        result.extra["step_time_s"] = extra
    if "no-bf16" not in args.skip and device.type == "cpu":
        section, extra = step_time.no_bf16_section(step_s)
        result.sections.append(section)
        result.extra["no_bf16"] = extra
    if "ns" not in args.skip:
        result.sections.append(step_time.ns_time_section(step_s, device, outdir, PREFIX))
    if "training" not in args.skip:
        sections, summary = training.run(train_s, device, outdir, PREFIX)
        result.sections += sections
        result.extra["training"] = summary
    if "distributed" not in args.skip:
        result.sections += distributed_sections(args.profile, outdir)
    result.duration_s = time.perf_counter() - t0
    result.write(args.out)
    benchkit.progress(f"done in {result.duration_s:.0f} s")


if __name__ == "__main__":
    main()
