"""Cached dataset: images per second of the cold path (decode DICOM + preprocess + store) vs the warm path.

Synthetic 1024x1024 DICOMs from ``cxr_risk.synth`` (every DICOM variant in turn: 8/12/16-bit,
MONOCHROME1/2, windows, VOI LUT, RLE, JPEG 2000, JPEG Baseline) are served at 512x512 by
:class:`cxr_risk.CachedImageDataset`. Contenders, interleaved (``benchkit.time_interleaved``):

* ``cold``: a fresh cache directory, one pass over the dataset (what the first epoch costs);
* ``uncached read_image``: the same decoding and preprocessing without writing (the strongest peer: what
  every epoch costs without a cache);
* ``pydicom pixel_array only``: decoding alone, a floor for any reader that re-decodes each epoch;
* ``warm``: a second pass over a filled cache (every later epoch).

Run alone: ``python benchmarks/cache_speed.py [--n 24] [--out DIR]``; ``benchmarks/run.py`` calls :func:`run`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

try:
    import benchkit
except ImportError:  # run from the package folder without tools/ on PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
    import benchkit

# quick: every code path once; default: each of the 8 DICOM variants at least once; full: the README's figure.
PROFILES = {
    "quick": {"n": 4, "repeats": 2},
    "default": {"n": 12, "repeats": 3},
    "full": {"n": 24, "repeats": 3},
}
IMAGE_SIDE = 1024
OUTPUT_SIDE = 512


def _cohort(workdir: Path, n: int):
    import pandas as pd

    from cxr_risk import Cohort
    from cxr_risk.synth import make_cohort

    # Ask for enough images that n of them are DICOMs (3 of every 11 variants are PNG/TIFF).
    csv = make_cohort(workdir / "synth", n=int(np.ceil(n * 11 / 8)) + 1, seed=0, size=IMAGE_SIDE)
    frame = pd.read_csv(csv)
    frame = frame[frame["path"].str.endswith(".dcm")].drop(columns=["study_date", "index_date"]).head(n)
    return Cohort.from_frame(frame, root=csv.parent)


def measure(n: int, repeats: int, workdir: Path) -> dict[str, benchkit.Timing]:
    """Seconds per pass over ``n`` images for each contender."""
    import pydicom

    from cxr_risk import CachedImageDataset, PreprocessConfig, read_image

    cohort = _cohort(workdir, n)
    config = PreprocessConfig(size=OUTPUT_SIDE)
    warm_ds = CachedImageDataset(cohort, config, workdir / "warm-cache")
    assert warm_ds.warm() == [], "synthetic cohort has unreadable files"
    counter = iter(range(10**6))

    def cold() -> None:
        ds = CachedImageDataset(cohort, config, workdir / f"cold-{next(counter)}")
        for i in range(len(ds)):
            ds[i]

    def uncached() -> None:
        for p in cohort.paths:
            read_image(p, config)

    def decode_only() -> None:
        for p in cohort.paths:
            pydicom.dcmread(p).pixel_array  # noqa: B018

    def warm() -> None:
        for i in range(len(warm_ds)):
            warm_ds[i]

    contenders = {
        "cold": cold,
        "uncached read_image": uncached,
        "pydicom pixel_array only": decode_only,
        "warm": warm,
    }
    return benchkit.time_interleaved(contenders, repeats=repeats, warmup=1)


def _plot(rates: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    names = list(rates)
    bars = ax.barh(names, [rates[k] for k in names], color=["#999", "#bbb", "#ddd", "#2a7"])
    ax.bar_label(bars, labels=[f"{rates[k]:.1f}" for k in names], padding=3)
    ax.set_xscale("log")
    ax.set_xlim(right=max(rates.values()) * 4)
    ax.set_xlabel("images / s (log scale; higher is better)")
    ax.set_title(f"Cached dataset, {IMAGE_SIDE}^2 DICOM -> {OUTPUT_SIDE}^2", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(profile: str, outdir: Path, log: Callable[[str], None] = benchkit.progress) -> benchkit.Section:
    """The benchmark section for ``benchmarks/run.py``; writes ``cxr-risk-cache-speed.png`` into ``outdir``."""
    if profile not in PROFILES:
        raise ValueError(f"cache_speed.run: profile={profile!r} must be one of {sorted(PROFILES)}")
    settings = PROFILES[profile]
    n = settings["n"]
    log(f"cache speed: {n} synthetic {IMAGE_SIDE}^2 DICOMs, {settings['repeats']} interleaved passes")
    with tempfile.TemporaryDirectory(prefix="cxr-cache-bench-") as tmp:
        timings = measure(n, settings["repeats"], Path(tmp))
    rates = {name: n / t.median for name, t in timings.items()}
    rows = [
        [
            name,
            round(rates[name], 2),
            round(t.median * 1000 / n, 3),
            round(t.spread, 3),
            round(rates[name] / rates["cold"], 2),
        ]
        for name, t in timings.items()
    ]
    plot = "cxr-risk-cache-speed.png"
    outdir.mkdir(parents=True, exist_ok=True)
    _plot(rates, outdir / plot)
    ratio = rates["warm"] / rates["cold"]
    return benchkit.Section(
        title="Cached dataset: cold vs warm images/s",
        description=(
            f"{n} synthetic {IMAGE_SIDE}x{IMAGE_SIDE} DICOMs (all DICOM variants of cxr_risk.synth) served at "
            f"{OUTPUT_SIDE}x{OUTPUT_SIDE} by CachedImageDataset; median of {settings['repeats']} interleaved passes."
        ),
        columns=["path", "images/s", "ms/image", "IQR/median", "x cold"],
        rows=rows,
        plots=[plot],
        notes=[
            f"warm/cold = {ratio:.1f}x (issue target >= 10x); warm/uncached read_image = "
            f"{rates['warm'] / rates['uncached read_image']:.1f}x",
            "Files are in the OS page cache in both paths: the ratio measures decoding and preprocessing, not disk.",
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=PROFILES["full"]["n"])
    parser.add_argument("--repeats", type=int, default=PROFILES["full"]["repeats"])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    PROFILES["cli"] = {"n": args.n, "repeats": args.repeats}
    t0 = time.time()
    section = run("cli", args.out)
    for row in section.rows:
        print(dict(zip(section.columns, row, strict=True)))
    print(section.notes[0], f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
