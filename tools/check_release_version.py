"""Check that built distributions carry the version their release tag promises.

Used by ``nox -s build`` (without ``--tag``: wheel and sdist agree and belong to the package) and by
``.github/workflows/release.yml`` (with ``--tag <dist>-v<version>``: they also equal the tag), so a
tag such as ``moba-attn-v0.3.0`` can only ever publish ``moba_attn-0.3.0``.

    python tools/check_release_version.py --dist dist/moba-attn --package moba-attn --tag moba-attn-v0.3.0
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PACKAGES = ("muon-opt", "moba-attn", "cxr-risk", "proml-ner")


def parse_tag(tag: str) -> tuple[str, str]:
    """``"moba-attn-v0.3.0"`` -> ``("moba-attn", "0.3.0")``; refs/tags/ prefixes are accepted."""
    tag = tag.removeprefix("refs/tags/")
    for package in PACKAGES:
        prefix = f"{package}-v"
        if tag.startswith(prefix) and len(tag) > len(prefix):
            return package, tag[len(prefix) :]
    raise ValueError(f"tag {tag!r} is not of the form <dist>-v<version> with <dist> one of {PACKAGES}")


def artefact_version(path: Path, package: str) -> str:
    """Version from a wheel or sdist file name (normalised project name, PEP 427 / PEP 625)."""
    stem = package.replace("-", "_")
    name = path.name
    m = re.fullmatch(rf"{stem}-([^-]+)(-[^-]+-[^-]+-[^-]+\.whl|\.tar\.gz)", name)
    if m is None:
        raise ValueError(f"{name!r} is not a wheel or sdist of {package!r} (expected {stem}-<version>...)")
    return m.group(1)


def check(dist: Path, package: str, tag: str | None = None) -> str:
    files = sorted(p for p in dist.iterdir() if p.name.endswith((".whl", ".tar.gz")))
    if not any(p.name.endswith(".whl") for p in files) or not any(p.name.endswith(".tar.gz") for p in files):
        raise ValueError(f"{dist} must hold one wheel and one sdist; found {[p.name for p in files]}")
    versions = {p.name: artefact_version(p, package) for p in files}
    if len(set(versions.values())) != 1:
        raise ValueError(f"artefacts disagree on the version: {versions}")
    version = next(iter(versions.values()))
    if tag is not None:
        tag_package, tag_version = parse_tag(tag)
        if tag_package != package:
            raise ValueError(f"tag {tag!r} releases {tag_package!r}, but {dist} holds {package!r}")
        if tag_version != version:
            raise ValueError(f"tag {tag!r} promises {tag_version}, but the built artefacts are {version}")
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, required=True, help="folder holding the wheel and sdist")
    parser.add_argument("--package", required=True, choices=PACKAGES)
    parser.add_argument("--tag", help="release tag, e.g. moba-attn-v0.3.0 (or refs/tags/...)")
    args = parser.parse_args(argv)
    try:
        version = check(args.dist, args.package, args.tag)
    except ValueError as err:
        print(f"check_release_version: {err}", file=sys.stderr)
        return 1
    print(f"{args.package} {version}: wheel and sdist agree" + (f" with tag {args.tag}" if args.tag else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
