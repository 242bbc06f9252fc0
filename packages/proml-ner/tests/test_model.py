"""ProML end to end on tiny random BERT encoders with the real MiniLM tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from proml_ner.baselines import BaselineConfig, PrototypeNer
from proml_ner.formats import Episode, Sentence
from proml_ner.model import ProML, ProMLConfig, estimate_shots
from proml_ner.sampler import sample_episodes
from proml_ner.synthetic import synthetic_corpus
from proml_ner.train import TrainConfig, evaluate, train


def make_model(tokenizer, seed=0, hidden=32, **cfg) -> ProML:
    config = ProMLConfig(encoder="tiny-random-bert", embedding_dim=16, hidden_layers=2, **cfg)
    return ProML(config, tiny_bert(tokenizer, hidden=hidden, layers=2, seed=seed), tokenizer).eval()


@pytest.fixture(scope="module")
def episodes():
    corpus = synthetic_corpus("test", 200, seed=0)
    return sample_episodes(corpus, 3, 2, 30, seed=1), sample_episodes(corpus, 3, 2, 8, seed=2)


def test_hidden_size_from_config(tokenizer):
    m = make_model(tokenizer, hidden=48)
    assert m.encoder.hidden_size == 48 and m.head.mu.in_features == 48


def test_long_sentence_windows(tokenizer):
    m = make_model(tokenizer, max_length=24, window_overlap=3)
    words = [f"word{i}" for i in range(70)]
    labels = ["O"] * 70
    labels[10] = labels[11] = "person-athlete"
    with torch.no_grad():
        reps = m.represent([words, words[:3]], ["person-athlete"], [labels, labels[:3]])
    assert reps[0].shape == (70, 32) and reps[1].shape == (3, 32)
    # a sentence that fits in one window is encoded the same with or without the window machinery
    big = make_model(tokenizer, max_length=128)
    big.load_state_dict(m.state_dict())
    with torch.no_grad():
        short_small = m.represent([words[:3]], ["person-athlete"])[0]
        short_big = big.represent([words[:3]], ["person-athlete"])[0]
    torch.testing.assert_close(short_small, short_big)


def test_query_gold_labels_do_not_change_predictions(tokenizer, episodes):
    m = make_model(tokenizer)
    ep = episodes[1][0]
    blank = Episode(ep.types, ep.support, [Sentence(s.words, ["O"] * len(s.words)) for s in ep.query])
    assert m.predict_episode(ep) == m.predict_episode(blank)


def test_predict_shapes_and_viterbi(tokenizer, episodes):
    ep = episodes[1][0]
    for viterbi in (False, True):
        preds = make_model(tokenizer, viterbi=viterbi).predict_episode(ep)
        assert [len(p) for p in preds] == [len(s.words) for s in ep.query]
        assert {x for p in preds for x in p} <= {"O", *ep.types}
    assert estimate_shots(ep.support, ep.types) >= 2


@pytest.mark.parametrize("schemas", [("option_prefix",), ("label_aware",), ("option_prefix", "label_aware")])
def test_schema_ablation_and_learned_lambda(tokenizer, episodes, schemas):
    m = make_model(tokenizer, schemas=schemas, learn_lambda=True)
    loss = m.episode_loss(episodes[0][0])
    loss.backward()
    assert torch.isfinite(loss)
    grad = m.fusion.lambda_logit.grad
    assert (grad is not None and grad.abs() > 0) == (len(schemas) == 2)


def test_config_validation():
    with pytest.raises(ValueError, match="schemas="):
        ProMLConfig(schemas=("nope",))
    with pytest.raises(ValueError, match="fusion_lambda=2"):
        ProMLConfig(fusion_lambda=2)
    with pytest.raises(ValueError, match="unknown keys"):
        ProMLConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="method="):
        BaselineConfig(method="knn")


def test_save_load_roundtrip(tokenizer, episodes, tmp_path):
    m = make_model(tokenizer, learn_lambda=True, viterbi=True)
    with torch.no_grad():
        m.fusion.lambda_logit.fill_(0.4)
    m.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    back = ProML.from_pretrained(tmp_path)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    ep = episodes[1][0]
    assert back.predict_episode(ep) == m.predict_episode(ep)
    with pytest.raises(FileNotFoundError, match=r"needs config\.json"):
        ProML.from_pretrained(tmp_path / "missing")


def test_baselines_train_step(tokenizer, episodes):
    for method in ("proto", "nnshot"):
        b = PrototypeNer(
            BaselineConfig(method=method, hidden_layers=2), tiny_bert(tokenizer, layers=2), tokenizer
        )
        loss = b.episode_loss(episodes[0][0])
        loss.backward()
        assert torch.isfinite(loss)
        preds = b.predict_episode(episodes[1][0])
        assert [len(p) for p in preds] == [len(s.words) for s in episodes[1][0].query]


@pytest.mark.slow
def test_training_learns_well_above_random(tokenizer, episodes):
    """100 episodes on a tiny random encoder: F1 goes from near 0 to well above it (measured ~0.45)."""
    train_eps, test_eps = episodes
    m = make_model(tokenizer, hidden=64)
    before = evaluate(m, test_eps).f1
    res = train(m, train_eps, test_eps[:4], TrainConfig(steps=100, lr=1e-3, head_lr=1e-3, eval_every=50))
    after = evaluate(m, test_eps).f1
    # random labelling (uniform over O + types) almost never hits an exact span: F1 ~ 0
    assert after >= 0.3 and after >= before + 0.15, (before, after)
    assert res.seed == 0 and res.best_step in (50, 100) and len(res.history) == 100


def test_test_time_finetuning_adapts_a_copy(tokenizer, episodes):
    from proml_ner.train import finetune_on_support

    m = make_model(tokenizer)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ep = episodes[1][0]
    tuned = finetune_on_support(m, ep, TrainConfig(finetune_steps=2, finetune_lr=1e-3))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # original untouched
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("head.") for k in changed) and any(k.startswith("encoder.") for k in changed)
    res = evaluate(m, [ep], finetune=TrainConfig(finetune_steps=1))
    assert res.counts.gold > 0
