"""Readers, writers and tag-scheme conversion; malformed files must name the file and the line."""

from __future__ import annotations

import json

import pytest

from proml_ner.formats import (
    Episode,
    FormatError,
    Sentence,
    detect_scheme,
    read_conll,
    read_fewnerd_episodes,
    read_fewnerd_flat,
    read_gliner_json,
    read_hou_json,
    to_io,
    write_conll,
    write_fewnerd_episodes,
    write_fewnerd_flat,
    write_gliner_json,
)


@pytest.mark.parametrize(
    ("tags", "scheme", "io"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], "BIO", ["PER", "PER", "O", "LOC"]),
        (["B-PER", "E-PER", "O", "S-LOC"], "IOBES", ["PER", "PER", "O", "LOC"]),
        (["person-actor", "O"], "IO", ["person-actor", "O"]),
        (["I-ORG", "I-ORG", "O"], "IO", ["ORG", "ORG", "O"]),
        (["B-PER", "B-PER"], "BIO", ["PER", "PER"]),  # adjacent same-type entities merge in IO
    ],
)
def test_to_io_and_detect(tags, scheme, io):
    assert detect_scheme([tags]) == scheme
    assert to_io(tags) == io


def _episode_json(**over):
    ep = {
        "support": {"word": [["Alice", "runs"]], "label": [["person-athlete", "O"]]},
        "query": {"word": [["Bob", "swims"]], "label": [["person-athlete", "O"]]},
        "types": ["person-athlete"],
    }
    ep.update(over)
    return json.dumps(ep)


def test_fewnerd_episodes_roundtrip(tmp_path):
    p = tmp_path / "eps.jsonl"
    p.write_text(_episode_json() + "\n\n" + _episode_json() + "\n")
    eps = read_fewnerd_episodes(p)
    assert len(eps) == 2 and eps[0].types == ["person-athlete"]
    assert eps[0].support[0].labels == ["person-athlete", "O"]
    q = tmp_path / "out.jsonl"
    write_fewnerd_episodes(q, eps)
    assert [e.to_json() for e in read_fewnerd_episodes(q)] == [e.to_json() for e in eps]


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"support": {}, "types": ["x"]}), "missing ['query']"),
        (_episode_json(types=[]), "'types' must be a non-empty list"),
        (_episode_json(query={"word": [["a", "b"]], "label": [["O"]]}), "equal length"),
        (_episode_json(types=["location-GPE"]), "not in types"),
    ],
)
def test_fewnerd_episode_errors_name_file_and_line(tmp_path, bad, needle):
    p = tmp_path / "eps.jsonl"
    p.write_text(_episode_json() + "\n" + bad + "\n")
    with pytest.raises(FormatError) as err:
        read_fewnerd_episodes(p)
    assert f"{p}:2:" in str(err.value) and needle in str(err.value)
    assert err.value.line == 2


def test_fewnerd_flat(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text("Alice\tperson-athlete\nruns\tO\n\nParis\tlocation-GPE\n")
    sents = read_fewnerd_flat(p)
    assert [s.labels for s in sents] == [["person-athlete", "O"], ["location-GPE"]]
    q = tmp_path / "o.txt"
    write_fewnerd_flat(q, sents)
    assert [s.words for s in read_fewnerd_flat(q)] == [s.words for s in sents]
    p.write_text("Alice\tperson-athlete\nruns O extra\n")
    with pytest.raises(FormatError, match=r"train.txt:2: expected 'word<TAB>label'"):
        read_fewnerd_flat(p)


def test_conll_detects_scheme_and_names_bad_line(tmp_path):
    p = tmp_path / "a.conll"
    p.write_text("-DOCSTART- O\n\nEU NNP B-ORG\nrejects VBZ O\nGerman JJ B-MISC\ncall NN I-MISC\n\n")
    sents = read_conll(p)
    assert sents == [Sentence(["EU", "rejects", "German", "call"], ["ORG", "O", "MISC", "MISC"])]
    p.write_text("EU S-ORG\nrejects O\n\nPeter B-PER\nBlack E-PER\n")
    assert read_conll(p)[1].labels == ["PER", "PER"]
    p.write_text("EU B-ORG\nrejects O\nGerman MISC\n")
    with pytest.raises(FormatError, match=r"a.conll:3: tag 'MISC' .* no BIO prefix"):
        read_conll(p)
    q = tmp_path / "w.conll"
    write_conll(q, sents)
    assert read_conll(q) == sents


def test_hou_json(tmp_path):
    data = {
        "GetWeather": [
            {
                "support": {"seq_ins": [["rain", "in", "paris"]], "seq_outs": [["O", "O", "B-city"]]},
                "batch": {
                    "seq_ins": [["sun", "in", "new", "york"]],
                    "seq_outs": [["O", "O", "B-city", "I-city"]],
                },
            }
        ]
    }
    p = tmp_path / "hou.json"
    p.write_text(json.dumps(data))
    eps = read_hou_json(p)["GetWeather"]
    assert eps[0].types == ["city"] and eps[0].query[0].labels == ["O", "O", "city", "city"]
    p.write_text("{\n  'bad'\n}")
    with pytest.raises(FormatError, match=r"hou.json:2: invalid JSON"):
        read_hou_json(p)


def test_gliner_json_roundtrip(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(json.dumps([{"tokenized_text": ["Ada", "Lovelace", "wrote"], "ner": [[0, 1, "person"]]}]))
    sents = read_gliner_json(p)
    assert sents[0].labels == ["person", "person", "O"]
    q = tmp_path / "o.json"
    write_gliner_json(q, sents)
    assert read_gliner_json(q) == sents
    p.write_text(json.dumps([{"tokenized_text": ["a"], "ner": [[0, 3, "x"]]}]))
    with pytest.raises(FormatError, match="outside 1 words"):
        read_gliner_json(p)


def test_episode_rejects_foreign_labels():
    with pytest.raises(ValueError, match="not in types"):
        Episode(["a"], [Sentence(["x"], ["b"])])


def test_conll_tabs_spaces_in_tags_and_messy_rows(tmp_path):
    from proml_ner.formats import ReadReport

    p = tmp_path / "m.conll"
    # a TAB file: a tag with a space is kept whole; a TAB-only line ends a sentence; a zero-width space
    # is removed; a token that is only invisible characters and a row without a tag are dropped
    p.write_text(
        "New York\tB-city name\nrocks\tO\n\t\nHi\u200b\tO\n\u200b\tO\nMumbai\tB-city name\nlonely\n\n",
        encoding="utf-8",
    )
    rep = ReadReport()
    sents = read_conll(p, report=rep)
    assert sents == [
        Sentence(["New York", "rocks"], ["city name", "O"]),
        Sentence(["Hi", "Mumbai"], ["O", "city name"]),
    ]
    assert rep.separator_lines == 1 and rep.sentences == 2 and rep.tokens == 4
    assert [n for n, _ in rep.cleaned] == [4, 5]
    assert [n for n, _ in rep.skipped] == [5, 7] and "no tag column" in rep.skipped[1][1]
    assert "2 rows skipped" in rep.summary()
    p.write_text("EU\tB-ORG\nsays\tO\nGATE\tX-ORG\n")
    with pytest.raises(FormatError, match=r"m.conll:3: tag 'X-ORG' has the unknown prefix 'X-'"):
        read_conll(p)


def test_wnut17_benchmark_copy_reads_with_its_report():
    from pathlib import Path

    from proml_ner.formats import ReadReport

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "wnut17"
    if not root.is_dir():
        pytest.skip("benchmarks/data/wnut17 is not in this tree")
    rep = ReadReport()
    train = read_conll(root / "wnut17train.conll", report=rep)
    # counts from the dataset's own files (blank/TAB-only lines between sentences, BIO tags)
    assert len(train) == 3394 and rep.separator_lines == 2394 and rep.merged == 16
    types = {t for s in train for t in s.types}
    assert types == {"corporation", "creative-work", "group", "location", "person", "product"}
    rep = ReadReport()
    dev = read_conll(root / "emerging.dev.conll", report=rep)
    assert len(dev) == 1009 and [n for n, _ in rep.cleaned] == [15556, 16730]
    assert "Dubbz" in {w for s in dev for w in s.words}
