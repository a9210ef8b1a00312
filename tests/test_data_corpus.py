"""Corpus loading, the by-document split, and every bad-data error."""

from __future__ import annotations

import json
import logging

import pytest

from stackwise.data import BUILTIN_NAME, DataError, builtin_corpus, load_corpus, split_corpus
from stackwise.training import ProgressiveDataLoader


def _loader_config(paths, cache_dir, seq_len=32):
    return {
        "model": {},
        "training": {"batch_size": 2, "seq_len": seq_len},
        "data": {"paths": [str(p) for p in paths], "cache_dir": str(cache_dir), "tokenizer": "byte"},
    }


def test_builtin_corpus_is_pydoc_topics_in_sorted_order():
    from pydoc_data.topics import topics

    corpus = load_corpus([])
    assert corpus.name == BUILTIN_NAME
    keys = [k for k in sorted(topics) if topics[k].strip()]
    assert [d.source for d in corpus.documents] == [f"pydoc_data.topics:{k}" for k in keys]
    assert corpus.documents[0].text == topics[keys[0]]
    assert builtin_corpus().fingerprint == corpus.fingerprint


def test_split_is_by_document_deterministic_and_disjoint():
    corpus = builtin_corpus()
    a, b = split_corpus(corpus, 0.05), split_corpus(corpus, 0.05)
    assert a == b
    assert a.rule == "by-document"
    assert len(a.train) >= 1 and len(a.val) >= 1
    assert set(a.train).isdisjoint(a.val)
    assert len(a.train) + len(a.val) == len(corpus.documents)
    assert a.train_bytes + a.val_bytes == sum(len(d.text.encode()) for d in corpus.documents)
    bigger = split_corpus(corpus, 0.5)
    assert set(a.val) <= set(bigger.val)  # raising val_fraction only moves documents into validation


def test_split_guarantees_one_document_each_side(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document number {i}\n" * 5)
    split = split_corpus(load_corpus([str(tmp_path)]), 0.001)
    assert len(split.val) == 1 and len(split.train) == 2


def test_single_document_is_split_by_its_tail(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    (tmp_path / "one.txt").write_text(text)
    split = split_corpus(load_corpus([str(tmp_path / "one.txt")]), 0.1)
    assert split.rule == "single-document-tail"
    assert split.train[0] + split.val[0] == text
    assert len(split.val[0]) == round(0.1 * len(text))


def test_folder_walk_is_recursive_sorted_and_skips_hidden_and_other_suffixes(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zed")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "README").write_text("no suffix")
    (tmp_path / "notes.text").write_text("text suffix")
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"text": "from jsonl"}) + "\n\n" + json.dumps({"text": "second"}) + "\n"
    )
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    corpus = load_corpus([str(tmp_path)])
    assert [d.text for d in corpus.documents] == [
        "no suffix",
        "alpha",
        "zed",
        "from jsonl",
        "second",
        "text suffix",
    ]
    assert corpus.documents[4].source.endswith("data.jsonl:3")


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first version")
    before = load_corpus([str(f)]).fingerprint
    f.write_text("second version")
    assert load_corpus([str(f)]).fingerprint != before


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(DataError, match=r"nowhere\.txt") as err:
        load_corpus([str(missing)])
    assert "does not exist" in str(err.value)


def test_empty_corpus_names_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match=r"empty\.txt") as err:
        load_corpus([str(empty)])
    assert "empty" in str(err.value)


def test_folder_without_text_files_names_the_folder(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match="pics"):
        load_corpus([str(tmp_path / "pics")])


def test_bad_jsonl_line_names_file_and_line_number(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"broken\.jsonl line 3: not valid JSON"):
        load_corpus([str(f)])


def test_jsonl_missing_field_names_file_line_and_field(tmp_path):
    f = tmp_path / "fields.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "wrong key"}\n')
    with pytest.raises(DataError, match=r"fields\.jsonl line 2: no 'text' field") as err:
        load_corpus([str(f)])
    assert "'body'" in str(err.value) and "data.text_field" in str(err.value)


def test_jsonl_custom_text_field(tmp_path):
    f = tmp_path / "custom.jsonl"
    f.write_text('{"body": "one"}\n{"body": "two"}\n')
    assert [d.text for d in load_corpus([str(f)], text_field="body").documents] == ["one", "two"]


def test_non_utf8_bytes_are_replaced_counted_and_logged(tmp_path, caplog):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café ".encode("latin-1") + b"ok \xff\xfe end " + "real \ufffd kept".encode())
    with caplog.at_level(logging.WARNING, logger="stackwise.data.corpus"):
        corpus = load_corpus([str(f)])
    # b"\xe9", b"\xff" and b"\xfe" are three invalid sequences; the genuine U+FFFD is not counted.
    assert corpus.replacements == {str(f): 3}
    assert corpus.documents[0].text.count("\ufffd") == 4
    assert "latin1.txt" in caplog.text and "replaced" in caplog.text


def test_corpus_smaller_than_one_sequence_names_the_file(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("far too short")
    with pytest.raises(DataError, match=r"tiny\.txt") as err:
        ProgressiveDataLoader(_loader_config([f], tmp_path / "cache", seq_len=64))
    assert "fewer than one sequence" in str(err.value) and "seq_len" in str(err.value)


def test_later_phase_with_too_long_sequences_fails_at_construction(tmp_path):
    f = tmp_path / "medium.txt"
    f.write_text("x" * 2000)
    config = _loader_config([f], tmp_path / "cache", seq_len=16)
    config["model"] = {"max_seq_len": 4096}
    config["schedule"] = [
        {"name": "short", "start_t": 0.0, "end_t": 0.5},
        {"name": "long", "start_t": 0.5, "end_t": 1.0, "data_config": {"seq_len": 4000}},
    ]
    with pytest.raises(DataError, match=r"medium\.txt"):
        ProgressiveDataLoader(config)
