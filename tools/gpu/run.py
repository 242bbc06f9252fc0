"""The prepared GPU check: every CUDA path of the four packages, verified in one call of at most 8 minutes.

    nox -s gpu                     on a machine with a CUDA GPU: install the CUDA profile, then this script
    nox -s gpu -- --dry-run        anywhere (CI): the plan, every CUDA-marked test collected, each part's CPU smoke
    nox -s gpu -- --only tests-moba-attn,bench-moba-attn    a rerun of some parts
    python tools/gpu/run.py        with an interpreter that already holds torch and the packages' dependencies
                                   (the packages themselves are put on PYTHONPATH from packages/*/src)

A GPU is lent to this project for a few minutes at a time, so the check is written ahead and bounded by
its own clock: every part has a budget in seconds (:data:`PARTS`), the run as a whole has
:data:`DEADLINE_S` counted from the start of ``nox -s gpu`` (installs included), a part starts only if
its budget still fits (else it is skipped, with the reason), and a part that runs past its budget is
killed and reported with what it had. The CUDA-test parts run side by side (one GPU holds them all);
the benchmarks then run one at a time so that their timings are not disturbed. Whatever happens,
``bench-results/gpu.json`` and ``bench-results/gpu.md`` are written at the end, with the GPU model, driver,
torch, triton and flash-attn versions and every part's status; per-part logs, JSON and JUnit files are in
``bench-results/gpu/``. The exit status is 1 when a part failed or timed out, 2 when torch sees no GPU.

This file needs only the standard library: the parts run as subprocesses of the chosen interpreter.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOOLS = HERE.parent
ROOT = TOOLS.parent
PACKAGES = ("muon-opt", "moba-attn", "cxr-risk", "proml-ner")

# The whole run, installs included, on one GPU; what a lent machine's 15 minutes leave after its start-up
# and a possible rerun of the parts that failed.
DEADLINE_S = 480.0
# Kept back from the deadline for writing the summary.
SUMMARY_RESERVE_S = 5.0


@dataclass(frozen=True)
class Part:
    """One step of the check.

    ``kind``: ``install`` (done by ``nox -s gpu`` before this script; only recorded here), ``tests``
    (``pytest --device cuda -m cuda`` in the package's folder) or ``script`` (``tools/gpu/<script>``,
    given ``--out`` and ``--deadline``; ``launcher="torchrun"`` starts it on 2 processes). ``budget_s``: the
    most it may take; a part with ``min_s`` is elastic: it starts with at least that much left and gets
    up to its budget (the last benchmark soaks up what earlier parts saved). ``named_tests``:
    ``file::function`` that must be among the package's CUDA-marked tests (the dry run checks), the
    tests that close the README's "not yet" line quoted in ``closes``.
    """

    name: str
    budget_s: float
    kind: str
    what: str
    closes: str = ""
    package: str = ""
    script: str = ""
    launcher: str = "python"
    min_s: float = 0.0
    min_gpus: int = 1
    named_tests: tuple[str, ...] = ()

    @property
    def needs_s(self) -> float:
        """Seconds that must be left for the part to start."""
        return self.min_s or self.budget_s


MUON_GPU = "muon-opt: no GPU run of the bf16 Newton-Schulz fast path"
MOBA_GPU = "moba-attn: Triton/flash backends and FlexAttention backward never run on a GPU; no GPU figure"
CXR_AMP = "cxr-risk: AMP on GPU untested"
PROML_FP16 = "proml-ner: fp16 inference never run (CUDA only)"

# Budgets: the install was measured at 38 s from a cold uv cache on this project's 2-core CPU machine (5 s
# warm); the rest are estimates for an H200 with 16 cores (no GPU has been lent yet), sized so that the
# plan adds up to at most DEADLINE_S on one GPU and on two (see plan_total). The first real run records
# every part's time in gpu.json: tighten these from it.
PARTS: tuple[Part, ...] = (
    Part("install", 75, "install", "one venv: the four packages and their test extras under "
         "tools/constraints-cuda.txt; flash-attn only from a prebuilt wheel (done by nox -s gpu)"),
    Part("env", 15, "script", "GPU model, driver, CUDA, torch, triton, flash-attn", script="machine.py"),
    Part("tests-muon-opt", 60, "tests", "CUDA-marked tests: batched Newton-Schulz and the optimizer step "
         "in bf16/fp32 on the GPU against the float64 reference", MUON_GPU, package="muon-opt",
         named_tests=("tests/test_newton_schulz.py::test_fast_path_on_device",
                      "tests/test_optimizer.py::test_on_device_fast_path_matches_reference")),
    Part("tests-moba-attn", 150, "tests", "CUDA-marked tests: Triton kernels (fp16/bf16, large, "
         "deterministic backward), flash-attn and FlexAttention forward+backward against the reference",
         MOBA_GPU, package="moba-attn",
         named_tests=("tests/test_op_triton.py::test_triton_low_precision_on_gpu",
                      "tests/test_op_triton.py::test_triton_large_on_gpu_matches_torch",
                      "tests/test_op_flash.py::test_flash_kernels_on_gpu",
                      "tests/test_op_flex.py::test_flex_on_gpu_forward_backward")),
    Part("tests-cxr-risk", 90, "tests", "CUDA-marked tests: AMP (bf16 and fp16 with a scaler) training and "
         "the checkpoint's reload on GPU and CPU", CXR_AMP, package="cxr-risk",
         named_tests=("tests/test_trainer.py::test_amp_on_cuda_trains_and_checkpoint_predicts_identically",)),
    Part("tests-proml-ner", 60, "tests", "CUDA-marked tests: fp16 autocast support index and predict",
         PROML_FP16, package="proml-ner",
         named_tests=("tests/test_pipeline_cli.py::test_reduced_precision_matches_fp32",)),
    Part("bench-muon-opt", 25, "script", "step time at GPT-2-small shapes: bf16 vs fp32 Newton-Schulz vs "
         "torch.optim.Muon, and each update's error against float64", MUON_GPU, script="muon_step.py"),
    Part("amp-cxr-risk", 30, "script", "AMP training epoch (auto/bf16, fp16, off), exact resume, checkpoint "
         "round trip on GPU and CPU (resnet18, 224 px)", CXR_AMP, script="cxr_amp.py"),
    Part("fp16-proml-ner", 25, "script", "predict in fp16 and bf16 vs fp32: time, support-vector error, tag "
         "agreement (MiniLM)", PROML_FP16, script="proml_fp16.py"),
    Part("nccl-muon-opt", 35, "script", "2 processes over NCCL: ZeroMuon and DDPMuon equal single-process "
         "Muon; step time, bytes sent", "muon-opt: NCCL paths untested on GPUs", script="muon_nccl.py",
         min_gpus=2),
    Part("ddp-cxr-risk", 35, "script", "torchrun on 2 GPUs: the trainer's DDP (NCCL) path, identical "
         "replicas, checkpoint loads", "cxr-risk: DDP on GPU untested", script="cxr_ddp.py",
         launcher="torchrun", min_gpus=2),
    Part("bench-moba-attn", 150, "script", "MoBA triton vs flash vs flex vs SDPA causal at 8K/32K/128K, bf16, "
         "forward and forward+backward, median ms and peak MiB", MOBA_GPU, script="moba_speed.py", min_s=40),
)  # fmt: skip


def plan_total(gpus: int, parts: Sequence[Part] = PARTS, full: bool = False) -> float:
    """Seconds the plan needs on a machine with ``gpus`` GPUs so that every part starts: the install, the
    longest of the side-by-side test parts, every other part that runs there (elastic ones at their
    minimum) and the summary; ``full``: with every part using its whole budget."""
    run = [p for p in parts if p.min_gpus <= gpus]
    tests = [p.budget_s for p in run if p.kind == "tests"]
    rest = [p.budget_s if full else p.needs_s for p in run if p.kind != "tests"]
    return max(tests, default=0.0) + sum(rest) + SUMMARY_RESERVE_S


# ------------------------------------------------------------------------------------------ results


@dataclass
class Outcome:
    """What became of one part."""

    name: str
    budget_s: float
    status: str = "not run"  # ok | failed: ... | timeout: ... | skipped: ... | partial: ...
    actual_s: float | None = None
    detail: str = ""
    tests: list[dict[str, str]] = field(default_factory=list)  # tests parts: nodeid, outcome, message
    result: dict[str, Any] | None = None  # script parts: what the script wrote
    log: str = ""

    @property
    def bad(self) -> bool:
        return self.status.startswith(("failed", "timeout"))


_VERBOSE_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b(.*)$")


def tests_from_junit(path: Path) -> list[dict[str, str]]:
    """``[{nodeid, outcome, message}]`` from a pytest JUnit XML file (xunit2)."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        parts = cls.split(".")
        # "tests.test_op_flex" -> tests/test_op_flex.py; "tests.test_x.TestY" -> tests/test_x.py::TestY
        modules = [i for i, p in enumerate(parts) if p.startswith("test")]
        cut = modules[-1] + 1 if modules else len(parts)
        nodeid = "/".join(parts[:cut]) + ".py::" + "::".join([*parts[cut:], name])
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                text = (child.get("message") or child.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        out.append({"nodeid": nodeid, "outcome": outcome, "message": message})
    return out


def tests_from_verbose(log: str) -> list[dict[str, str]]:
    """The same from ``pytest -v`` output, for a run killed before it wrote its JUnit file."""
    out = []
    for line in log.splitlines():
        m = _VERBOSE_LINE.match(line.strip())
        if m:
            message = m.group(3).strip()
            message = re.sub(r"\s*\[\s*\d+%\]$", "", message).strip(" ()")
            out.append({"nodeid": m.group(1), "outcome": m.group(2).lower(), "message": message})
    return out


def tests_status(tests: list[dict[str, str]], returncode: int | None, timed_out: bool, budget: float) -> str:
    count = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    counts = ", ".join(f"{v} {k}" for k, v in count.items() if v) or "no test finished"
    if timed_out:
        return f"timeout: killed at its {budget:.0f} s budget; {counts}"
    if returncode == 5:
        return "skipped: no CUDA-marked tests collected"
    if count["failed"] or count["error"] or returncode not in (0, None):
        return f"failed: {counts}" + (f" (pytest exit code {returncode})" if not tests else "")
    if tests and count["skipped"] == len(tests):
        return f"skipped: every test skipped ({tests[0]['message'] or 'no reason given'})"
    return f"ok: {counts}"


# ------------------------------------------------------------------------------------------ running


def subprocess_env(tests: bool, concurrent: bool = False) -> dict[str, str]:
    """Offline and unbuffered, with the packages' sources on the path (so that an interpreter without them
    installed works too) and, for the scripts, tools/ (benchkit); fewer threads each when side by side.
    A script's own folder (tools/gpu, for partresult) is on its path already."""
    env = dict(os.environ)
    paths = [*([] if tests else [str(TOOLS)]), *(str(ROOT / "packages" / p / "src") for p in PACKAGES)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(
        PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1"
    )
    if concurrent and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 4) // 4))
    return env


def command(part: Part, python: str, out_dir: Path, deadline: float) -> tuple[list[str], Path]:
    """(argv, working directory) of a part."""
    if part.kind == "tests":
        junit = out_dir / f"{part.name}.xml"
        # --continue-on-collection-errors: a test module whose optional import is missing on this machine
        # (reported as an error) must not stop the CUDA tests of the other modules
        argv = [
            python,
            "-m",
            "pytest",
            "--device",
            "cuda",
            "-m",
            "cuda",
            "-v",
            "-rA",
            "-p",
            "no:cacheprovider",
            "--continue-on-collection-errors",
            f"--junitxml={junit}",
        ]
        return argv, ROOT / "packages" / part.package
    script = [
        str(HERE / part.script),
        "--out",
        str(out_dir / f"{part.name}.json"),
        "--deadline",
        f"{deadline:.1f}",
    ]
    if part.launcher == "torchrun":
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script], ROOT
    return [python, *script], ROOT


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_parts(parts: Sequence[Part], python: str, out_dir: Path, left: float) -> list[Outcome]:
    """Start ``parts`` together, each bounded by min(its budget, ``left``); wait for all of them."""
    running = []
    concurrent = len(parts) > 1
    for part in parts:
        limit = min(part.budget_s, left)
        start = time.time()
        argv, cwd = command(part, python, out_dir, start + limit - 2.0)
        log = out_dir / f"{part.name}.log"
        (out_dir / f"{part.name}.json").unlink(missing_ok=True)
        (out_dir / f"{part.name}.xml").unlink(missing_ok=True)
        handle = log.open("w")
        handle.write(f"$ (cd {cwd} && {' '.join(argv)})\n")
        handle.flush()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=subprocess_env(part.kind == "tests", concurrent),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _say(f"{part.name}: started (budget {limit:.0f} s)")
        running.append((part, proc, handle, start, limit, log))
    outcomes = []
    pending = list(running)
    timed_out: set[str] = set()
    while pending:
        for item in list(pending):
            part, proc, handle, start, limit, log = item
            if proc.poll() is None and time.time() - start > limit:
                _kill(proc)
                timed_out.add(part.name)
            if proc.poll() is not None:
                pending.remove(item)
                handle.close()
                outcomes.append(
                    _outcome(
                        part,
                        proc.returncode,
                        part.name in timed_out,
                        time.time() - start,
                        limit,
                        out_dir,
                        log,
                    )
                )
                _say(f"{part.name}: {outcomes[-1].status} ({outcomes[-1].actual_s:.0f} s)")
                if outcomes[-1].bad:
                    tail = log.read_text(errors="replace").splitlines()[-25:]
                    print("\n".join(f"    | {line}" for line in tail), flush=True)
        time.sleep(0.2)
    order = {p.name: i for i, p in enumerate(parts)}
    return sorted(outcomes, key=lambda o: order[o.name])


def _outcome(
    part: Part, rc: int, timed_out: bool, took: float, limit: float, out_dir: Path, log: Path
) -> Outcome:
    o = Outcome(
        part.name,
        part.budget_s,
        actual_s=round(took, 1),
        log=str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log),
    )
    text = log.read_text(errors="replace")
    if part.kind == "tests":
        junit = out_dir / f"{part.name}.xml"
        o.tests = tests_from_junit(junit) if junit.is_file() and not timed_out else tests_from_verbose(text)
        o.status = tests_status(o.tests, rc, timed_out, limit)
        return o
    path = out_dir / f"{part.name}.json"
    if path.is_file():
        try:
            o.result = json.loads(path.read_text())
        except json.JSONDecodeError:
            o.detail = f"{path.name} is not valid JSON"
    if timed_out:
        o.status = f"timeout: killed at its {limit:.0f} s budget" + (
            " (kept what it had measured)" if o.result else ""
        )
    elif rc != 0:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        o.status = f"failed: exit code {rc}: {last[0][:300]}"
    else:
        o.status = (o.result or {}).get("status", "ok") if part.name != "env" else "ok"
    return o


def _say(msg: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def skip_reason(part: Part, left: float, gpus: int, only: set[str] | None) -> str:
    """Why ``part`` does not start ('' when it does)."""
    if only is not None and part.name not in only:
        return "skipped: not selected (--only)"
    if gpus < part.min_gpus:
        return f"skipped: needs {part.min_gpus} GPUs, this machine has {gpus}"
    if left < part.needs_s:
        return f"skipped: would overrun: needs {part.needs_s:.0f} s, {max(left, 0):.0f} s left before the deadline"
    return ""


def run_check(args: argparse.Namespace, parts: Sequence[Part] = PARTS) -> int:
    started = args.started or time.time()
    deadline = started + args.deadline_s - SUMMARY_RESERVE_S
    out_dir = args.out.parent / "gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) | {"env"} if args.only else None
    unknown = (only or set()) - {p.name for p in parts}
    if unknown:
        raise SystemExit(f"--only: no part named {sorted(unknown)}; parts: {[p.name for p in parts]}")
    print_plan(gpus=None)
    outcomes: list[Outcome] = []
    install = parts[0]
    if args.install_s is not None:
        detail = f"flash-attn: {args.flash}" if args.flash else "flash-attn: installed from a prebuilt wheel"
        over = args.install_s > install.budget_s
        status = f"ok (over its budget by {args.install_s - install.budget_s:.0f} s)" if over else "ok"
        outcomes.append(Outcome(install.name, install.budget_s, status, round(args.install_s, 1), detail))
    else:
        outcomes.append(
            Outcome(
                install.name,
                install.budget_s,
                "skipped: not run by nox -s gpu; this interpreter's packages were used as they are",
                detail=f"python: {args.python}",
            )
        )
    env: dict[str, Any] = {}
    gpus = 0
    rest = [p for p in parts if p.kind != "install"]
    groups: list[list[Part]] = []
    for part in rest:  # consecutive test parts form one side-by-side group
        if groups and part.kind == "tests" and groups[-1][0].kind == "tests":
            groups[-1].append(part)
        else:
            groups.append([part])
    for group in groups:
        left = deadline - time.time()
        start, skipped = [], []
        for part in group:
            if part.name != "env" and not env.get("cuda_available"):
                reason = "skipped: torch sees no CUDA GPU in this interpreter (see the env part)"
            else:
                reason = skip_reason(part, left, gpus if part.name != "env" else 1, only)
            (skipped if reason else start).append((part, reason))
        for part, reason in skipped:
            outcomes.append(Outcome(part.name, part.budget_s, reason))
            _say(f"{part.name}: {reason}")
        if start:
            try:
                outcomes += run_parts([p for p, _ in start], args.python, out_dir, left)
            except Exception as err:  # a bug here must not cost the summary of what already ran
                for part, _ in start:
                    outcomes.append(Outcome(part.name, part.budget_s, f"failed: the driver broke: {err!r}"))
        if group[0].name == "env":
            env = (outcomes[-1].result or {}) if outcomes[-1].name == "env" else {}
            gpus = int(env.get("device_count") or 0)
        write_summary(args.out, outcomes, env, started, args)
    summary = write_summary(args.out, outcomes, env, started, args)
    print(summary, flush=True)
    bad = [o.name for o in outcomes if o.bad]
    _say(
        f"wrote {args.out} and {args.out.with_suffix('.md')}; {len(bad)} part(s) failed or timed out {bad or ''}"
    )
    if not env.get("cuda_available"):
        _say("torch sees no CUDA GPU here, so nothing was checked; on a CPU machine run --dry-run instead")
        return 2
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------ summary


def _cell(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render(
    outcomes: Sequence[Outcome], env: dict[str, Any], wall_s: float, deadline_s: float, sha: str
) -> str:
    """The markdown summary: machine and versions, every part's status, the tests, the benchmark tables."""
    gpus = env.get("gpus") or []
    gpu = env.get("gpu") or (gpus[0]["name"] if gpus else "none found")
    memory = f"{gpus[0]['memory.total']}, " if gpus else ""
    lines = [
        "# GPU check",
        "",
        *_table(
            ["", ""],
            [
                [
                    "GPU",
                    f"{gpu} x {env.get('device_count', len(gpus))} ({memory}compute capability "
                    f"{env.get('capability') or (gpus[0].get('compute_cap') if gpus else '?')})",
                ],
                ["driver", env.get("driver") or "?"],
                ["CUDA (torch build)", env.get("cuda") or "?"],
                ["torch", env.get("torch") or "?"],
                ["triton", env.get("triton") or "?"],
                ["flash-attn", env.get("flash_attn") or "?"],
                ["python", env.get("python") or sys.version.split()[0]],
                ["git", sha],
                ["date (UTC)", time.strftime("%Y-%m-%d %H:%M", time.gmtime())],
                ["wall time", f"{wall_s:.0f} s of the {deadline_s:.0f} s deadline (installs included)"],
            ],
        ),
        "",
        "## Parts",
        "",
        *_table(
            ["part", "budget s", "took s", "status", "detail"],
            [[o.name, o.budget_s, o.actual_s, o.status, o.detail] for o in outcomes],
        ),
    ]
    tested = [o for o in outcomes if o.tests]
    if tested:
        lines += ["", "## CUDA-marked tests", ""]
        lines += _table(
            ["test", "outcome", "message"],
            [
                [f"{o.name.removeprefix('tests-')}: {t['nodeid']}", t["outcome"], t["message"]]
                for o in tested
                for t in o.tests
            ],
        )
    for o in outcomes:
        for s in (o.result or {}).get("sections", []):
            lines += ["", f"## {s['title']}", "", s.get("description", ""), ""]
            if s.get("columns"):
                lines += _table(s["columns"], s.get("rows", []))
            for plot in s.get("plots", []):
                lines += ["", f"![{s['title']}]({plot})"]
        notes = (o.result or {}).get("notes", [])
        if notes:
            lines += ["", f"Notes ({o.name}):", *(f"- {n}" for n in notes)]
    return "\n".join(lines).rstrip() + "\n"


def _git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("-dirty" if dirty else "")


def write_summary(
    out: Path, outcomes: Sequence[Outcome], env: dict[str, Any], started: float, args: argparse.Namespace
) -> str:
    wall = time.time() - started
    sha = _git_sha()
    data = {
        "check": "gpu",
        "git_sha": sha,
        "deadline_s": args.deadline_s,
        "wall_s": round(wall, 1),
        "environment": env,
        "parts": [asdict(o) for o in outcomes],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    text = render(outcomes, env, wall, args.deadline_s, sha)
    out.with_suffix(".md").write_text(text)
    return text


# ------------------------------------------------------------------------------------------ dry run


def print_plan(gpus: int | None) -> None:
    print(
        f"[gpu] plan: {len(PARTS)} parts; deadline {DEADLINE_S:.0f} s from the start of nox -s gpu, "
        "installs included",
        flush=True,
    )
    for p in PARTS:
        when = " (side by side with the other tests)" if p.kind == "tests" else ""
        when += f" (only with {p.min_gpus}+ GPUs)" if p.min_gpus > 1 else ""
        when += f" (elastic: starts with {p.min_s:.0f} s left)" if p.min_s else ""
        print(f"[gpu]   {p.name:<16} {p.budget_s:>4.0f} s  {p.what}{when}", flush=True)
        if p.closes:
            print(f"[gpu]   {'':<16}         closes: {p.closes}", flush=True)
    for n in (1, 2) if gpus is None else (gpus,):
        full = plan_total(n, full=True)
        then = (
            f"{full:.0f} s with every part at its whole budget"
            if full <= DEADLINE_S
            else f"{full:.0f} s at whole budgets, so the elastic part gets what is left of the deadline"
        )
        print(f"[gpu]   with {n} GPU(s): every part starts within {plan_total(n):.0f} s; {then}", flush=True)


def collect_cuda_tests(package: str, python: str) -> tuple[list[str], str]:
    """(node ids of the package's CUDA-marked tests, problem or '') from ``pytest --collect-only -m cuda``."""
    env = subprocess_env(tests=True)
    env.setdefault("OMP_NUM_THREADS", "1")
    argv = [python, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    try:
        out = subprocess.run(
            argv, cwd=ROOT / "packages" / package, env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        return [], "collection took more than 600 s"
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if out.returncode not in (0, 5):
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
        return ids, f"pytest --collect-only exited {out.returncode}:\n{tail}"
    return ids, ""


def smoke(part: Part, python: str, scratch: Path) -> tuple[str, float]:
    """('' or the problem, seconds) of ``tools/gpu/<script> --check`` (``--out`` for machine.py)."""
    env = subprocess_env(tests=False)
    env.setdefault("OMP_NUM_THREADS", "1")
    if part.script == "machine.py":
        argv = [python, str(HERE / part.script), "--check", "--out", str(scratch / "env.json")]
    elif part.launcher == "torchrun":
        argv = [
            python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(HERE / part.script),
            "--check",
        ]
    else:
        argv = [python, str(HERE / part.script), "--check"]
    start = time.time()
    try:
        out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "its --check took more than 600 s", time.time() - start
    took = time.time() - start
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
        return f"{' '.join(argv[1:])} exited {out.returncode}:\n{tail}", took
    return "", took


def dry_run(args: argparse.Namespace) -> int:
    """The plan, every CUDA-marked test collected, every named test found, every script's CPU smoke."""
    start = time.time()
    print_plan(gpus=None)
    problems: list[str] = []
    for n in (1, 2):
        if plan_total(n) > DEADLINE_S:
            problems.append(
                f"the plan needs {plan_total(n):.0f} s with {n} GPU(s), over the {DEADLINE_S:.0f} s deadline"
            )
    for p in PARTS:
        if p.script and not (HERE / p.script).is_file():
            problems.append(f"{p.name}: tools/gpu/{p.script} does not exist")
        if p.kind == "tests" and p.package not in PACKAGES:
            problems.append(f"{p.name}: unknown package {p.package!r}")
    if set(PACKAGES) - {p.package for p in PARTS if p.kind == "tests"}:
        problems.append(
            f"packages without a tests part: {sorted(set(PACKAGES) - {p.package for p in PARTS})}"
        )
    test_parts = [p for p in PARTS if p.kind == "tests"]
    scripts = [p for p in PARTS if p.script]
    scratch = args.out.parent / "gpu-dry-run"
    scratch.mkdir(parents=True, exist_ok=True)
    print(
        f"[gpu] dry run with {args.python}: collecting the CUDA-marked tests of {len(test_parts)} packages and "
        f"running {len(scripts)} scripts' CPU checks, {args.jobs} at a time",
        flush=True,
    )
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        collected = {p.name: pool.submit(collect_cuda_tests, p.package, args.python) for p in test_parts}
        checks = {p.name: pool.submit(smoke, p, args.python, scratch) for p in scripts}
        report: dict[str, Any] = {"tests": {}, "checks": {}}
        total = 0
        for p in test_parts:
            ids, problem = collected[p.name].result()
            total += len(ids)
            report["tests"][p.package] = ids
            print(f"[gpu] {p.package}: {len(ids)} CUDA-marked test(s) for part {p.name}", flush=True)
            for nodeid in ids:
                print(f"[gpu]     {nodeid}", flush=True)
            if problem:
                problems.append(f"{p.package}: {problem}")
            if not ids and not problem:
                problems.append(f"{p.package}: no CUDA-marked tests collected (a marker or a test was lost?)")
            for named in p.named_tests:
                if not any(i.split("[", 1)[0] == named for i in ids):
                    problems.append(
                        f"{p.name}: names {named}, which is not among {p.package}'s CUDA-marked tests "
                        "(renamed or unmarked? update tools/gpu/run.py PARTS)"
                    )
        for p in scripts:
            problem, took = checks[p.name].result()
            report["checks"][p.name] = {"script": p.script, "seconds": round(took, 1), "problem": problem}
            print(
                f"[gpu] {p.name}: tools/gpu/{p.script} --check {'ok' if not problem else 'FAILED'} "
                f"({took:.0f} s)",
                flush=True,
            )
            if problem:
                problems.append(f"{p.name}: {problem}")
    report.update(
        problems=problems,
        seconds=round(time.time() - start, 1),
        plan={p.name: p.budget_s for p in PARTS},
        flash=args.flash,
    )
    path = args.out.with_name("gpu-dry-run.json")
    path.write_text(json.dumps(report, indent=1) + "\n")
    for problem in problems:
        print(f"[gpu] PROBLEM: {problem}", flush=True)
    if args.flash:
        print(f"[gpu] flash-attn: {args.flash}", flush=True)
    verdict = "FAILED" if problems else "ok"
    print(
        f"[gpu] dry run {verdict}: {len(PARTS)} parts, plan {plan_total(1):.0f} s (1 GPU) / {plan_total(2):.0f} s "
        f"(2 GPUs) of {DEADLINE_S:.0f} s; {total} CUDA-marked tests in {len(test_parts)} packages; "
        f"{sum(not c['problem'] for c in report['checks'].values())}/{len(scripts)} script checks ok; "
        f"{time.time() - start:.0f} s; {path}",
        flush=True,
    )
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="no GPU needed: plan, test collection, CPU checks"
    )
    parser.add_argument("--only", default="", help="comma-separated part names to run (env always runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "gpu.json")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for the parts (default: this one)"
    )
    parser.add_argument(
        "--started", type=float, default=0.0, help="Unix time the check started (nox passes it)"
    )
    parser.add_argument(
        "--install-s", type=float, default=None, help="seconds the install took (nox passes it)"
    )
    parser.add_argument("--flash", default="", help="why flash-attn was not installed ('' when it was)")
    parser.add_argument("--deadline-s", type=float, default=DEADLINE_S, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=2, help="dry run: collections and checks at a time")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    return dry_run(args) if args.dry_run else run_check(args)


if __name__ == "__main__":
    sys.exit(main())
