"""The GPU check's driver (tools/gpu/run.py): its plan fits the deadline, and it keeps its promises on a
machine without a GPU: budgets enforced by killing, partial results kept, reasons for every skip, a
summary whatever happens. The GPU parts themselves are checked by ``nox -s gpu -- --dry-run``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[1] / "gpu"
_spec = importlib.util.spec_from_file_location("gpu_run", GPU / "run.py")
run = importlib.util.module_from_spec(_spec)
sys.modules["gpu_run"] = run  # dataclasses look their module up by name
_spec.loader.exec_module(run)


def test_plan_fits_the_deadline_on_one_and_on_two_gpus():
    for gpus in (1, 2):
        assert run.plan_total(gpus) <= run.DEADLINE_S, f"{gpus} GPU(s): {run.plan_total(gpus)} s"
    # on one GPU every part fits with its whole budget, the elastic benchmark included
    assert run.plan_total(1, full=True) <= run.DEADLINE_S
    # the side-by-side test parts count once, at the longest
    tests = [p for p in run.PARTS if p.kind == "tests"]
    others = [p.needs_s for p in run.PARTS if p.kind != "tests" and p.min_gpus <= 1]
    assert run.plan_total(1) == max(p.budget_s for p in tests) + sum(others) + run.SUMMARY_RESERVE_S


def test_every_part_is_runnable_and_every_package_has_its_cuda_tests_part():
    names = [p.name for p in run.PARTS]
    assert len(set(names)) == len(names) and names[:2] == ["install", "env"]
    for p in run.PARTS:
        assert p.kind in ("install", "tests", "script"), p
        if p.kind == "script":
            assert (GPU / p.script).is_file(), p
        if p.kind == "tests":
            assert (run.ROOT / "packages" / p.package / "tests").is_dir(), p
            assert all("::" in t and t.startswith("tests/") for t in p.named_tests), p
    assert {p.package for p in run.PARTS if p.kind == "tests"} == set(run.PACKAGES)


def test_skip_reasons():
    part = run.Part("x", 30, "script", "", script="x.py")
    assert run.skip_reason(part, 31, 1, None) == ""
    assert "would overrun: needs 30 s, 29 s left" in run.skip_reason(part, 29, 1, None)
    assert "not selected" in run.skip_reason(part, 100, 1, {"y"})
    two = run.Part("x", 30, "script", "", script="x.py", min_gpus=2)
    assert run.skip_reason(two, 100, 1, None) == "skipped: needs 2 GPUs, this machine has 1"
    elastic = run.Part("x", 150, "script", "", script="x.py", min_s=40)
    assert run.skip_reason(elastic, 41, 1, None) == ""


def test_test_outcomes_from_junit_and_from_verbose_output(tmp_path):
    junit = tmp_path / "r.xml"
    junit.write_text(
        textwrap.dedent(
            """\
            <testsuites><testsuite name="pytest">
            <testcase classname="tests.test_op_flex" name="test_a[fp16]" time="1"/>
            <testcase classname="tests.test_op_flex" name="test_b"><failure message="assert 1 == 2">x</failure></testcase>
            <testcase classname="tests.test_op_flash.TestK" name="test_c"><skipped message="no flash_attn"/></testcase>
            </testsuite></testsuites>"""
        )
    )
    got = run.tests_from_junit(junit)
    assert got == [
        {"nodeid": "tests/test_op_flex.py::test_a[fp16]", "outcome": "passed", "message": ""},
        {"nodeid": "tests/test_op_flex.py::test_b", "outcome": "failed", "message": "assert 1 == 2"},
        {"nodeid": "tests/test_op_flash.py::TestK::test_c", "outcome": "skipped", "message": "no flash_attn"},
    ]
    log = textwrap.dedent(
        """\
        tests/test_x.py::test_a[bf16-D128] PASSED                [ 50%]
        tests/test_x.py::test_b SKIPPED (could not import 'flash_attn')   [100%]
        some other line :: PASSED
        """
    )
    assert run.tests_from_verbose(log) == [
        {"nodeid": "tests/test_x.py::test_a[bf16-D128]", "outcome": "passed", "message": ""},
        {
            "nodeid": "tests/test_x.py::test_b",
            "outcome": "skipped",
            "message": "could not import 'flash_attn'",
        },
    ]


def test_tests_status():
    ok = {"nodeid": "a", "outcome": "passed", "message": ""}
    skip = {"nodeid": "b", "outcome": "skipped", "message": "needs a GPU"}
    bad = {"nodeid": "c", "outcome": "failed", "message": "x"}
    assert run.tests_status([ok, skip], 0, False, 60) == "ok: 1 passed, 1 skipped"
    assert run.tests_status([ok, bad], 1, False, 60) == "failed: 1 passed, 1 failed"
    assert run.tests_status([], 2, False, 60).startswith("failed: no test finished (pytest exit code 2)")
    assert run.tests_status([], 5, False, 60) == "skipped: no CUDA-marked tests collected"
    assert run.tests_status([skip], 0, False, 60) == "skipped: every test skipped (needs a GPU)"
    assert run.tests_status([ok], None, True, 60) == "timeout: killed at its 60 s budget; 1 passed"


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(
        "import argparse, json, sys, time\n"
        "p = argparse.ArgumentParser(); p.add_argument('--out'); p.add_argument('--deadline', type=float)\n"
        "args = p.parse_args()\n" + textwrap.dedent(body)
    )
    return str(path)


def _args(tmp_path: Path, **kw) -> argparse.Namespace:
    base = dict(
        out=tmp_path / "results" / "gpu.json",
        only="",
        started=time.time(),
        install_s=12.5,
        flash="no prebuilt flash-attn wheel",
        deadline_s=40.0,
        python=sys.executable,
    )
    return argparse.Namespace(**{**base, **kw})


ENV = """json.dump({"cuda_available": True, "device_count": 1, "gpu": "Fake GPU", "driver": "999.1",
           "torch": "9.9", "cuda": "13.0", "triton": "3.8.0", "flash_attn": "not importable"}, open(args.out, "w"))
"""
SECTION = """json.dump({"status": "ok", "sections": [{"title": "T", "description": "d", "columns": ["a", "b"],
           "rows": [[1, 2.5]], "plots": []}], "notes": ["n1"]}, open(args.out, "w"))
"""


def test_a_part_past_its_budget_is_killed_and_keeps_what_it_wrote(tmp_path):
    slow = _script(
        tmp_path,
        "slow.py",
        'json.dump({"status": "running", "sections": []}, open(args.out, "w"))\ntime.sleep(60)\n',
    )
    broken = _script(tmp_path, "broken.py", "print('boom: the kernel failed'); sys.exit(3)\n")
    fine = _script(tmp_path, "fine.py", SECTION)
    parts = [
        run.Part("slow", 1.5, "script", "", script=slow),
        run.Part("broken", 10, "script", "", script=broken),
        run.Part("fine", 10, "script", "", script=fine),
    ]
    start = time.time()
    got = run.run_parts(parts, sys.executable, tmp_path, left=100)
    assert time.time() - start < 15
    slow_o, broken_o, fine_o = got
    assert slow_o.status.startswith("timeout: killed at its 2 s budget (kept what it had measured)")
    assert slow_o.result == {"status": "running", "sections": []} and slow_o.bad
    assert broken_o.status == "failed: exit code 3: boom: the kernel failed" and broken_o.bad
    assert fine_o.status == "ok" and fine_o.result["sections"][0]["rows"] == [[1, 2.5]]
    assert (tmp_path / "fine.log").read_text().startswith("$ (cd ")


def test_the_whole_run_skips_with_reasons_and_always_writes_its_summary(tmp_path):
    parts = (
        run.Part("install", 75, "install", ""),
        run.Part("env", 10, "script", "", script=_script(tmp_path, "env.py", ENV)),
        run.Part("bench", 10, "script", "", script=_script(tmp_path, "bench.py", SECTION)),
        run.Part("two-gpus", 10, "script", "", script=_script(tmp_path, "two.py", SECTION), min_gpus=2),
        run.Part("too-long", 50, "script", "", script=_script(tmp_path, "long.py", SECTION)),
        run.Part(
            "failing", 10, "script", "", script=_script(tmp_path, "fail.py", "sys.exit('no GPU kernel')\n")
        ),
    )
    args = _args(tmp_path)
    assert run.run_check(args, parts) == 1  # "failing" failed
    data = json.loads(args.out.read_text())
    status = {p["name"]: p["status"] for p in data["parts"]}
    assert status["install"] == "ok" and status["env"] == "ok" and status["bench"] == "ok"
    assert status["two-gpus"] == "skipped: needs 2 GPUs, this machine has 1"
    assert status["too-long"].startswith("skipped: would overrun: needs 50 s")
    assert status["failing"].startswith("failed: exit code 1: no GPU kernel")
    assert data["environment"]["gpu"] == "Fake GPU"
    md = args.out.with_suffix(".md").read_text()
    for expected in (
        "Fake GPU x 1",
        "| driver | 999.1 |",
        "| torch | 9.9 |",
        "| triton | 3.8.0 |",
        "no prebuilt flash-attn wheel",
        "## T",
        "| 1 | 2.5 |",
        "- n1",
    ):
        assert expected in md, expected


def test_without_cuda_nothing_runs_and_the_exit_code_says_so(tmp_path):
    env = _script(tmp_path, "env.py", 'json.dump({"cuda_available": False}, open(args.out, "w"))\n')
    parts = (
        run.Part("install", 75, "install", ""),
        run.Part("env", 10, "script", "", script=env),
        run.Part("bench", 10, "script", "", script=_script(tmp_path, "b.py", SECTION)),
    )
    args = _args(tmp_path, install_s=None)
    assert run.run_check(args, parts) == 2
    status = {p["name"]: p["status"] for p in json.loads(args.out.read_text())["parts"]}
    assert status["bench"].startswith("skipped: torch sees no CUDA GPU")
    assert status["install"].startswith("skipped: not run by nox -s gpu")


def test_only_selects_parts_and_rejects_unknown_names(tmp_path):
    parts = (
        run.Part("install", 75, "install", ""),
        run.Part("env", 10, "script", "", script=_script(tmp_path, "env.py", ENV)),
        run.Part("a", 10, "script", "", script=_script(tmp_path, "a.py", SECTION)),
        run.Part("b", 10, "script", "", script=_script(tmp_path, "b.py", SECTION)),
    )
    args = _args(tmp_path, only="b")
    assert run.run_check(args, parts) == 0
    status = {p["name"]: p["status"] for p in json.loads(args.out.read_text())["parts"]}
    assert status == {"install": "ok", "env": "ok", "a": "skipped: not selected (--only)", "b": "ok"}
    with pytest.raises(SystemExit, match="no part named"):
        run.run_check(_args(tmp_path, only="nope"), parts)
