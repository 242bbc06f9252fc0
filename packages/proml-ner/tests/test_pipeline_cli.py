"""ProMLNer (support index, predict with character offsets, save/load, errors) and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_bert

from proml_ner.cli import main
from proml_ner.formats import Sentence
from proml_ner.model import ProML, ProMLConfig
from proml_ner.pipeline import ProMLNer, SupportIndex
from proml_ner.words import split_words

SUPPORT = [
    {
        "words": ["Serena", "Williams", "won", "in", "Paris", "."],
        "tags": ["B-athlete", "I-athlete", "O", "O", "B-city", "O"],
    },
    {
        "text": "Usain Bolt ran in Kingston.",
        "spans": [{"start": 0, "end": 10, "label": "athlete"}, {"start": 18, "end": 26, "label": "city"}],
    },
    Sentence(["Lagos", "is", "big"], ["city", "O", "O"]),
    "Simone B-athlete\nBiles I-athlete\njumped O\n",
]


@pytest.fixture(scope="module")
def ner(tokenizer):
    cfg = ProMLConfig(encoder="tiny", embedding_dim=16, hidden_layers=2, max_length=32, window_overlap=4)
    return ProMLNer(ProML(cfg, tiny_bert(tokenizer, layers=2), tokenizer))


def test_predict_spans_have_character_offsets(ner):
    index = ner.support(SUPPORT)
    assert index.types == ["athlete", "city"] and index.vectors.shape[0] == 6 + 6 + 3 + 3
    texts = ["Serena Williams won in Paris.", "Nothing here", ""]
    out, tags = ner.predict(texts, support=index, return_tags=True)
    assert len(out) == 3 and tags[2] == [] and len(tags[0]) == 6
    for text, ents in zip(texts, out):
        for e in ents:
            assert text[e["start"] : e["end"]] == e["text"] and e["label"] in index.types
            assert 0.0 <= e["score"] <= 1.0
    # cached index and raw examples give the same answer
    assert ner.predict(texts, support=SUPPORT) == out


def test_long_text_is_windowed(ner):
    text = " ".join(["Serena Williams won in Paris ."] * 40)  # 240 words, windows of 32 tokens
    index = ner.support(SUPPORT)
    _, tags = ner.predict([text], support=index, return_tags=True)
    assert len(tags[0]) == 240


def test_index_and_model_save_load_roundtrip(ner, tmp_path):
    index = ner.support(SUPPORT)
    index.save(tmp_path / "index.safetensors")
    back = SupportIndex.load(tmp_path / "index.safetensors")
    assert back.types == index.types and back.shots == index.shots
    torch.testing.assert_close(back.vectors, index.vectors, rtol=0, atol=0)
    ner.save_pretrained(tmp_path / "model")
    ner2 = ProMLNer.from_pretrained(tmp_path / "model")
    text = ["Simone Biles jumped in Lagos ."]
    assert ner2.predict(text, support=back) == ner.predict(text, support=index)


def test_zero_shot_fallback_on_values(ner):
    text = "Serena Williams won in Paris ."
    types = ["athlete", "city"]
    with torch.no_grad():
        E, reps = ner._zero_shot_vectors([split_words(text)], types)
    sim = torch.nn.functional.normalize(reps[0], dim=-1) @ E.T
    # every word above a threshold below all similarities: each takes its most similar label
    _, tags = ner.predict([text], labels=types, return_tags=True, zero_shot_threshold=-1.0)
    assert tags[0] == [types[i] for i in sim.argmax(-1).tolist()]
    # a threshold above every similarity labels nothing
    out, tags = ner.predict([text], labels=types, return_tags=True, zero_shot_threshold=1.01)
    assert out == [[]] and tags[0] == ["O"] * 6
    cut = float(sim.max(-1).values.median())
    _, tags = ner.predict([text], labels=types, return_tags=True, zero_shot_threshold=cut)
    assert [t != "O" for t in tags[0]] == (sim.max(-1).values > cut).tolist()


def test_scores_vary_and_threshold_drops_spans(ner):
    index = ner.support(SUPPORT)
    texts = ["Serena Williams won in Paris .", "Usain Bolt ran in Kingston and Lagos ."]
    out = ner.predict(texts, support=index)
    scores = [e["score"] for ents in out for e in ents]
    assert scores and all(0.0 < x <= 1.0 for x in scores)
    if len(scores) > 1:
        assert max(scores) - min(scores) > 1e-3  # distance-based, not saturated at 1
    cut = sorted(scores)[len(scores) // 2]
    kept = ner.predict(texts, support=index, threshold=cut)
    assert sorted(e["score"] for ents in kept for e in ents) == sorted(x for x in scores if x >= cut)
    with pytest.raises(ValueError, match=r"threshold=1.5 must be in \[0, 1\]"):
        ner.predict(texts, support=index, threshold=1.5)


def test_labels_checks_name_the_problem(ner):
    index = ner.support(SUPPORT)
    with pytest.raises(ValueError, match=r"labels \['drug'\] are not in the support index"):
        ner.predict(["BRCA1 is a gene ."], support=index, labels=["athlete", "city", "drug"])
    with pytest.raises(ValueError, match=r"got the string 'drug'; pass \['drug'\]"):
        ner.predict(["BRCA1 is a gene ."], support=index, labels="drug")
    with pytest.raises(ValueError, match="got the string"):
        ner.predict(["BRCA1 is a gene ."], labels="drug")
    with pytest.raises(ValueError, match=r"cuts into a word.*'Serena Williams'"):
        ner.support(
            [{"text": "Serena Williams won.", "spans": [{"start": 0, "end": 10, "label": "athlete"}]}]
        )


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"support": []}, ValueError, "no examples"),
        ({"support": SUPPORT, "labels": ["athlete"]}, ValueError, r"\['city'\] occur in the support"),
        ({"support": [{"words": ["a"], "tags": ["X-athlete"]}]}, ValueError, "B- or I-"),
        ({"support": [{"words": ["a", "b"], "tags": ["B-x", "y"]}]}, ValueError, "mix prefixed"),
        ({"support": [{"words": ["a"], "tags": ["O"]}]}, ValueError, "no entity"),
        ({}, ValueError, "give support="),
        ({"support": [42]}, ValueError, "got int"),
    ],
)
def test_bad_input(ner, kwargs, err, match):
    with pytest.raises(err, match=match):
        ner.predict(["a text"], **kwargs)


def test_texts_must_be_strings(ner):
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        ner.predict(["ok", 3], labels=["x"])
    with pytest.raises(TypeError, match="texts must be a str or a list of str, got int"):
        ner.predict(42, labels=["x"])


@pytest.mark.slow
def test_cli_end_to_end(tokenizer, tmp_path, capsys):
    enc = tmp_path / "encoder"
    tiny_bert(tokenizer, layers=2).save_pretrained(enc)
    tokenizer.save_pretrained(enc)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"model: {{encoder: {enc}, embedding_dim: 16, hidden_layers: 2}}\n"
        "train: {steps: 2, eval_every: 2}\n"
        "data: {train: 'synthetic:train', dev: 'synthetic:dev', test: 'synthetic:test'}\n"
        "episodes: {n_way: 2, k_shot: 1, train: 2, dev: 1, test: 2}\n"
        f"output_dir: {tmp_path / 'model'}\nseed: 3\n"
    )
    assert main(["train", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seed"] == 3
    toml = tmp_path / "tiny.toml"
    toml.write_text(
        f'output_dir = "{tmp_path / "model"}"\nseed = 3\n[episodes]\nn_way = 2\nk_shot = 1\ntest = 2\n'
        '[data]\ntest = "synthetic:test"\nversion = "synthetic v1"\n'
    )
    assert main(["eval", str(toml)]) == 0
    res = json.loads((tmp_path / "model" / "eval" / "result.json").read_text())
    assert 0.0 <= res["f1"] <= 1.0 and res["seed"] == 3
    assert (
        res["data"]["version"] == "synthetic v1" and res["data"]["files"]["test"]["path"] == "synthetic:test"
    )
    trained = json.loads((tmp_path / "model" / "train_result.json").read_text())
    assert trained["seed"] == 3 and trained["data"]["files"]["train"]["path"] == "synthetic:train"
    assert (tmp_path / "model" / "eval" / "episodes.csv").is_file()
    sup = tmp_path / "support.conll"
    sup.write_text("Serena B-athlete\nWilliams I-athlete\nwon O\n\nParis B-city\nis O\n")
    assert (
        main(["predict", "--model", str(tmp_path / "model"), "--support", str(sup), "Serena won in Paris ."])
        == 0
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["text"] == "Serena won in Paris ."
    # the CLI gives what the Python API gives for the same model, support and text
    from proml_ner.formats import read_conll

    api = ProMLNer.from_pretrained(tmp_path / "model")
    expected = api.predict(["Serena won in Paris ."], support=api.support(read_conll(sup)))[0]
    assert line["entities"] == json.loads(json.dumps(expected))
    flat = tmp_path / "flat.txt"
    assert main(["convert", "--from", "conll", "--to", "fewnerd-flat", str(sup), str(flat)]) == 0
    assert flat.read_text().startswith("Serena\tathlete\n")
    big = tmp_path / "big.txt"
    from proml_ner.formats import write_fewnerd_flat
    from proml_ner.synthetic import synthetic_corpus

    write_fewnerd_flat(big, synthetic_corpus("test", 200, seed=0))
    eps = tmp_path / "eps.jsonl"
    assert (
        main(
            [
                "sample",
                "--input",
                str(big),
                "--n-way",
                "3",
                "--k-shot",
                "1",
                "--episodes",
                "4",
                "--out",
                str(eps),
            ]
        )
        == 0
    )
    assert len(eps.read_text().splitlines()) == 4
    assert main(["predict", "--model", str(tmp_path / "nope"), "text", "--labels", "x"]) == 2
    assert "needs config.json" in capsys.readouterr().err


def test_cli_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "proml_ner.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "convert" in out.stdout


def test_reduced_precision_arguments_are_checked(ner):
    with pytest.raises(ValueError, match=r"dtype=float16 needs a CUDA device.*bfloat16"):
        ner.predict(["Serena won ."], support=SUPPORT, dtype="float16")
    with pytest.raises(ValueError, match="dtype=float16 needs a CUDA device"):
        ner.support(SUPPORT, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"dtype='int8' must be one of"):
        ner.predict(["Serena won ."], support=SUPPORT, dtype="int8")
    with pytest.raises(ValueError, match=r"must be torch\.float32, torch\.float16 or torch\.bfloat16"):
        ner.predict(["Serena won ."], labels=["athlete"], dtype=torch.float64)


def _max_rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "dtype",
    [pytest.param("bfloat16", id="bf16"), pytest.param("float16", id="fp16", marks=pytest.mark.cuda)],
)
def test_reduced_precision_matches_fp32(ner, device, dtype):
    """Index vectors under autocast stay float32 and within a few units of the dtype's precision of fp32."""
    if dtype == "float16" and device.type != "cuda":
        pytest.skip("float16 autocast is CUDA-only by design")
    ner.model.to(device)
    try:
        ref = ner.support(SUPPORT)
        low = ner.support(SUPPORT, dtype=dtype)
        assert low.vectors.dtype == torch.float32 and low.types == ref.types
        eps = torch.finfo(getattr(torch, dtype)).eps
        err = _max_rel_err(low.vectors, ref.vectors)
        # a 2-layer encoder accumulates a few roundings per layer; 16 eps bounds it with margin
        assert err <= 16 * eps, f"max relative error {err:.3e} > 16 eps = {16 * eps:.3e}"
        assert err > 0, f"dtype={dtype} changed nothing: the encoder did not run under autocast"
        texts = ["Serena Williams won in Paris .", "Simone Biles jumped in Lagos ."]
        out, tags = ner.predict(texts, support=ref, dtype=dtype, return_tags=True)
        _, ref_tags = ner.predict(texts, support=ref, return_tags=True)
        for text, ents in zip(texts, out):
            assert all(text[e["start"] : e["end"]] == e["text"] for e in ents)
        same = sum(a == b for t, r in zip(tags, ref_tags) for a, b in zip(t, r))
        assert same >= 0.75 * sum(len(t) for t in ref_tags), (tags, ref_tags)
    finally:
        ner.model.to("cpu")
