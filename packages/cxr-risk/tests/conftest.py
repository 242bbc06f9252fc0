"""Shared pytest wiring: the ``--device`` option, the ``device`` fixture and the ``cuda`` marker.

``nox -s "tests(<package>, cpu)"`` runs everything not marked ``cuda``; the ``cuda`` session runs
``pytest --device cuda -m cuda`` on a machine with a GPU.
"""

from __future__ import annotations

import pytest
import torch

# Subnormal floats slow CPU training several-fold (see TrainConfig.flush_denormal); set the mode before any
# torch op so the intra-op worker threads inherit it. Values below 1.2e-38 become 0: no tolerance notices.
torch.set_flush_denormal(True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"), help="device for tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--device") == "cuda" and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run with --device cuda on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but torch.cuda.is_available() is False")
    return torch.device(name)
