"""Bundled experiment configs (one per paper setting): they parse, carry the paper's hyper-parameters, and
run end to end on tiny synthetic data; result files record the setting, seed and data version."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import tiny_bert

from proml_ner.cli import main
from proml_ner.experiment import (
    RunConfig,
    apply_overrides,
    bundled_configs,
    load_config_dict,
    load_run_config,
)
from proml_ner.formats import Sentence, write_conll, write_fewnerd_episodes
from proml_ner.protocols import build_episodes
from proml_ner.synthetic import synthetic_corpus, synthetic_episodes

FEWNERD = [
    f"fewnerd-{m}-{n}way-{s}shot" for m in ("intra", "inter") for n in (5, 10) for s in ("1-2", "5-10")
]
ONTONOTES = [f"ontonotes-tag-extension-{g}" for g in "abc"]
TRANSFER = [f"domain-transfer-{t}" for t in ("conll", "wnut", "i2b2", "gum")]


def test_every_paper_setting_is_bundled(capsys):
    assert sorted(bundled_configs()) == sorted(FEWNERD + ONTONOTES + TRANSFER)
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == sorted(FEWNERD + ONTONOTES + TRANSFER)
    assert all(len(line.split()) > 1 for line in listed), "every config has a description"


@pytest.mark.parametrize("name", FEWNERD + ONTONOTES + TRANSFER)
def test_bundled_config_parses_with_paper_hyperparameters(name):
    cfg = load_run_config(name)
    assert isinstance(cfg, RunConfig) and cfg.name == name and cfg.data.version
    assert cfg.train.lr == cfg.train.head_lr == 3e-5 and cfg.train.steps == 10000
    assert cfg.train.warmup == 0.1 and cfg.train.eval_every == 1000 and cfg.train.clip is None
    assert cfg.model.embedding_dim == 128 and cfg.model.fusion_lambda == 0.7
    assert cfg.model.encoder == "bert-base-uncased" and cfg.train.seed == cfg.seed == 0
    assert cfg.train.episodes_per_step == (4 if cfg.episodes.k_shot == 1 else 1)
    assert cfg.model.span_merge == 0.0 and not cfg.model.viterbi  # the paper labels word by word
    if name in FEWNERD:
        n_way = 10 if "10way" in name else 5
        k_shot = 1 if "1-2shot" in name else 5
        assert (cfg.episodes.n_way, cfg.episodes.k_shot, cfg.model.top_k) == (n_way, k_shot, k_shot)
        assert cfg.data.test == f"test_{n_way}_{k_shot}.jsonl" and cfg.episodes.protocol == "episodes"
        assert (cfg.episodes.train, cfg.episodes.dev, cfg.episodes.test) == (0, 500, 5000)
    else:
        assert cfg.episodes.protocol == "full_test" and cfg.model.top_k == 1
        assert cfg.train.finetune_steps == (11 if name in TRANSFER else 0)
        assert cfg.train.finetune_early_stop and not cfg.train.finetune_dropout
    if name in ONTONOTES:
        assert len(cfg.data.train_types) == 12 and len(cfg.data.test_types) == 6
        assert not set(cfg.data.train_types) & set(cfg.data.test_types)


def test_data_paths_must_be_filled_in():
    cfg = load_run_config("fewnerd-intra-5way-1-2shot")
    with pytest.raises(FileNotFoundError, match=r"data.train: .*train_5_1.jsonl does not exist.*data.root"):
        build_episodes(cfg, "train")
    empty = load_run_config("fewnerd-intra-5way-1-2shot", ["data.test="])
    with pytest.raises(ValueError, match=r"data\.test is not set"):
        build_episodes(empty, "test")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.stepz=3"], r"config.train: unknown keys \['stepz'\]"),
        (["data.format=xml"], "data.format='xml' must be one of"),
        (["episodes.protocol=full_test"], "full_test' samples support sets from a corpus"),
        (["episodes.k_shot=0"], "k_shot=0 must be >= 1"),
        (["model.fusion_lambda=2"], r"fusion_lambda=2 must be in \[0, 1\]"),
        (["nonsense"], "must look like section.key=value"),
    ],
)
def test_bad_configs_say_what_is_wrong(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_run_config("fewnerd-intra-5way-1-2shot", overrides)


def test_overrides_and_file_configs(tmp_path):
    d = apply_overrides({"train": {"steps": 5}}, ["train.steps=7", "data.root=/x", "model.top_k=null"])
    assert d == {"train": {"steps": 7}, "data": {"root": "/x"}, "model": {"top_k": None}}
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nseed = 4\n[episodes]\nn_way = 3\n')
    cfg = load_run_config(path)
    assert (cfg.name, cfg.seed, cfg.train.seed, cfg.episodes.n_way) == ("mine", 4, 4, 3)
    with pytest.raises(ValueError, match="neither a config file nor a bundled config"):
        load_config_dict("fewnerd-intra-7way")


def _onto_corpus(n: int, seed: int, tags: list[str]) -> list[Sentence]:
    """Synthetic sentences with their fine types renamed to OntoNotes tags (cycling through ``tags``)."""
    sents = synthetic_corpus("train", n, seed=seed)
    types = sorted({t for s in sents for t in s.types})
    rename = {t: tags[i % len(tags)] for i, t in enumerate(types)}
    return [Sentence(s.words, [rename.get(x, "O") for x in s.labels]) for s in sents]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["fewnerd-intra-5way-1-2shot", "ontonotes-tag-extension-a", "domain-transfer-wnut"]
)
def test_bundled_config_end_to_end_on_tiny_data(name, tokenizer, tmp_path, capsys):
    enc = tmp_path / "encoder"
    tiny_bert(tokenizer, layers=2).save_pretrained(enc)
    tokenizer.save_pretrained(enc)
    root = tmp_path / "data"
    root.mkdir()
    sets = [
        "data.root=" + str(root),
        "data.version=tiny synthetic v0",
        f"model.encoder={enc}",
        "model.embedding_dim=16",
        "model.hidden_layers=2",
        "train.steps=2",
        "train.eval_every=2",
        "episodes.train=3",
        "episodes.dev=1",
        "episodes.test=2",
        "episodes.support_sets=2",
        f"output_dir={tmp_path / 'run'}",
        "seed=5",
    ]
    cfg = load_run_config(name)
    if name.startswith("fewnerd"):
        for split, src in (("train", "train"), ("dev", "dev"), ("test", "test")):
            eps = synthetic_episodes(src, 5, 1, 2, seed=1)
            write_fewnerd_episodes(root / getattr(cfg.data, split), eps)
        test_file = root / cfg.data.test
    else:
        # tag extension: train on 12 OntoNotes types, dev/test on the other 6; domain transfer: source
        # OntoNotes (18 types) for train/dev, WNUT-17's types for test
        train_tags = cfg.data.train_types or sorted(cfg.model.label_words)
        dev_tags = cfg.data.test_types or train_tags
        test_tags = cfg.data.test_types or ["corporation", "creative-work", "group", "location", "person"]
        files = {"train": (train_tags, 160), "dev": (dev_tags, 80), "test": (test_tags, 25)}
        for split, (tags, n) in files.items():
            path = root / getattr(cfg.data, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_conll(path, _onto_corpus(n, {"train": 0, "dev": 1, "test": 2}[split], tags))
        # the OntoNotes configs read the word from column 1: write a leading column there
        if cfg.data.token_column == 1:
            for split in files:
                path = root / getattr(cfg.data, split)
                lines = path.read_text().splitlines()
                path.write_text("\n".join(f"x {ln}" if ln.strip() else ln for ln in lines) + "\n")
        test_file = root / cfg.data.test
    assert main(["train", name, *[a for s in sets for a in ("--set", s)]]) == 0
    trained = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert trained["setting"] == name and trained["seed"] == 5
    assert trained["data"]["version"] == "tiny synthetic v0"
    assert trained["data"]["files"]["train"]["sha256"] == _sha(root / cfg.data.train)
    capsys.readouterr()
    assert main(["eval", name, *[a for s in sets for a in ("--set", s)]]) == 0
    res = json.loads((tmp_path / "run" / "eval" / "result.json").read_text())
    assert res["setting"] == name and res["seed"] == 5 and 0.0 <= res["f1"] <= 1.0
    assert res["data"] == {
        "format": cfg.data.format,
        "version": "tiny synthetic v0",
        "files": {"test": {"path": str(test_file), "sha256": _sha(test_file)}},
    }
    assert res["episodes"] == 2 and res["protocol"] == cfg.episodes.protocol
