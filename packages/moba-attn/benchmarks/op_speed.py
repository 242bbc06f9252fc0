"""MoBA op vs SDPA causal, same process, interleaved runs (issue 3's speed target).

    PYTHONPATH=tools python packages/moba-attn/benchmarks/op_speed.py            # T=32768, H=4, D=128
    PYTHONPATH=tools python packages/moba-attn/benchmarks/op_speed.py --backward # forward + backward

Prints the median seconds per call of each contender, the inter-quartile spread, and the ratio
``sdpa / moba`` (> 1 means MoBA is faster). Defaults are the issue's: block 512, topk 3, fp32, CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
import benchkit

from moba_attn import moba_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--out", type=Path, help="also write the timings as JSON here")
    args = ap.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (args.t, args.heads, args.dim)
    q, k, v = (
        torch.randn(shape, dtype=dtype, device=args.device, requires_grad=args.backward) for _ in range(3)
    )
    qs, ks, vs = (
        x.detach().transpose(0, 1)[None].contiguous().requires_grad_(args.backward) for x in (q, k, v)
    )

    def moba() -> None:
        o = moba_attention(q=q, k=k, v=v, block_size=args.block_size, topk=args.topk, backend=args.backend)
        if args.backward:
            o.sum().backward()

    def sdpa() -> None:
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        if args.backward:
            o.sum().backward()

    ctx = torch.enable_grad() if args.backward else torch.no_grad()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    with ctx:
        timings = benchkit.time_interleaved(
            {"moba": moba, "sdpa_causal": sdpa}, repeats=args.repeats, warmup=1, sync=sync
        )
    ratio = timings["sdpa_causal"].median / timings["moba"].median
    what = "forward+backward" if args.backward else "forward"
    print(
        f"T={args.t} H={args.heads} D={args.dim} block={args.block_size} topk={args.topk} {args.dtype} "
        f"{args.device} {what}, threads={torch.get_num_threads()}"
    )
    for name, t in timings.items():
        print(
            f"  {name:12s} median {t.median:8.3f} s  spread {t.spread:6.1%}  runs {[round(x, 3) for x in t.runs]}"
        )
    print(f"  speed-up moba vs sdpa causal: {ratio:.2f}x")
    if args.out:
        rows = {n: {"median_s": t.median, "q25_s": t.q25, "q75_s": t.q75} for n, t in timings.items()}
        args.out.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"out": str(args.out)},
                    "timings": rows,
                    "ratio_sdpa_over_moba": ratio,
                    "environment": benchkit.environment(),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
