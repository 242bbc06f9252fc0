"""What the GPU check ran on: GPU model, driver, CUDA, torch, triton and flash-attn, as one JSON object.

    PYTHONPATH=tools:tools/gpu python tools/gpu/machine.py --out bench-results/gpu/env.json

Run as its own process (the ``env`` part) so that the driver never initialises CUDA itself. ``nvidia-smi``
gives the driver version, which torch does not report; torch gives what the tests and benchmarks will see.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import benchkit
from partresult import parser


def nvidia_smi() -> list[dict[str, str]]:
    """One row per GPU from ``nvidia-smi --query-gpu`` (empty when the tool is missing or fails)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    fields = ("index", "name", "driver_version", "memory.total", "compute_cap")
    try:
        out = subprocess.run(
            [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [
        dict(zip(fields, (c.strip() for c in line.split(",")))) for line in out.stdout.splitlines() if line
    ]


def flash_attn_status() -> str:
    """``"<version>"`` when flash-attn imports with its CUDA extension, else why not."""
    try:
        import flash_attn
    except ImportError as err:
        return f"not importable: {err}"
    return str(getattr(flash_attn, "__version__", "unknown version"))


def describe() -> dict:
    import torch

    env = benchkit.environment(packages=("muon-opt", "moba-attn", "cxr-risk", "proml-ner"))
    env["gpus"] = nvidia_smi()
    env["driver"] = env["gpus"][0]["driver_version"] if env["gpus"] else None
    env["cuda_available"] = torch.cuda.is_available()
    env["device_count"] = torch.cuda.device_count() if env["cuda_available"] else 0
    if env["cuda_available"]:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as err:
        env["triton"] = f"not importable: {err}"
    env["flash_attn"] = flash_attn_status()
    env["torch_optim_muon"] = hasattr(torch.optim, "Muon")
    return env


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)  # --deadline is ignored: this takes seconds
    env = describe()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps({k: env.get(k) for k in ("gpu", "driver", "torch", "cuda", "triton", "flash_attn")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
