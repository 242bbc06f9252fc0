"""Each package's version comes from its own tag ``<dist>-v<version>`` and from nothing else.

The test clones this repository into a scratch folder, tags one package there, and asks hatchling
(the build backend every package uses, with hatch-vcs) for each package's version and for a wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import check_release_version as crv  # noqa: E402

PACKAGES = ("muon-opt", "moba-attn", "cxr-risk", "proml-ner")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=_git_env()
    ).stdout.strip()


def _git_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.invalid",
    )
    return env


def hatch_version(package_dir: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "hatchling", "version"],
        cwd=package_dir,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository")
    try:
        git(ROOT, "rev-parse", "HEAD")
    except subprocess.CalledProcessError:
        pytest.skip("the checkout has no commit yet")
    dest = tmp_path_factory.mktemp("repo") / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)
    # Drop any release tags the source checkout may carry, so the test controls every tag.
    for tag in git(dest, "tag", "--list").split():
        git(dest, "tag", "-d", tag)
    return dest


def test_tag_sets_only_its_own_package(clone: Path) -> None:
    git(clone, "tag", "moba-attn-v0.3.0")
    versions = {p: hatch_version(clone / "packages" / p) for p in PACKAGES}
    assert versions["moba-attn"] == "0.3.0", versions
    for other in set(PACKAGES) - {"moba-attn"}:
        assert not versions[other].startswith("0.3.0"), versions


def test_other_package_tag_and_later_commits(clone: Path) -> None:
    git(clone, "tag", "muon-opt-v1.2.0")
    assert hatch_version(clone / "packages" / "muon-opt") == "1.2.0"
    git(clone, "commit", "--quiet", "--allow-empty", "-m", "after the release")
    later = hatch_version(clone / "packages" / "muon-opt")
    assert later.startswith("1.2.1.dev1"), later  # the next dev version, not the tag of another package
    assert hatch_version(clone / "packages" / "moba-attn").startswith("0.3.1.dev1")


def test_wheel_file_carries_tag_version(clone: Path, tmp_path: Path) -> None:
    git(clone, "tag", "-f", "proml-ner-v2.0.1", "HEAD")
    for package, expected in (("proml-ner", "2.0.1"), ("cxr-risk", None)):
        out = tmp_path / package
        subprocess.run(
            [sys.executable, "-m", "hatchling", "build", "-d", str(out)],
            cwd=clone / "packages" / package,
            check=True,
            capture_output=True,
        )
        version = crv.check(out, package)
        if expected is None:
            assert version != "2.0.1"
        else:
            assert version == expected
            crv.check(out, package, tag="proml-ner-v2.0.1")
            with pytest.raises(ValueError, match=r"promises 2\.0\.2"):
                crv.check(out, package, tag="proml-ner-v2.0.2")
            with pytest.raises(ValueError, match="releases 'muon-opt'"):
                crv.check(out, package, tag="muon-opt-v2.0.1")


def test_fallback_version_without_git(tmp_path: Path) -> None:
    src = ROOT / "packages" / "muon-opt"
    dest = tmp_path / "muon-opt"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".nox", "__pycache__", "*.egg-info"))
    assert hatch_version(dest) == "0.0.0"


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("moba-attn-v0.3.0", ("moba-attn", "0.3.0")),
        ("refs/tags/cxr-risk-v1.0.0rc1", ("cxr-risk", "1.0.0rc1")),
        ("muon-opt-v10.2", ("muon-opt", "10.2")),
    ],
)
def test_parse_tag(tag: str, expected: tuple[str, str]) -> None:
    assert crv.parse_tag(tag) == expected


@pytest.mark.parametrize("tag", ["v0.3.0", "moba-attn-0.3.0", "moba-attn-v", "other-v1.0"])
def test_parse_tag_rejects(tag: str) -> None:
    with pytest.raises(ValueError, match="not of the form"):
        crv.parse_tag(tag)
