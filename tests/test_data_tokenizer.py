"""Byte and BPE tokenizers: exact round trips, byte lengths, specials, caching, loading."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stackwise.config import DataConfig
from stackwise.data import (
    SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    DataError,
    DummyTokenizer,
    build_tokenizer,
    builtin_corpus,
    check_vocab,
    load_tokenizer,
    split_corpus,
)
from stackwise.data import tokenizer as tokenizer_module
from stackwise.training import ProgressiveDataLoader


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return [d.text for d in builtin_corpus().documents]


@pytest.fixture(scope="module")
def bpe(docs) -> BPETokenizer:
    return BPETokenizer.train(docs, 4096)


def test_byte_tokenizer_round_trip_and_specials(docs):
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    assert (tok.pad_id, tok.mask_id, tok.eos_id) == (256, 257, 258)
    text = "\n".join(docs) + " ünïcödé ✓ 🙂"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([104, 105, tok.mask_id, 33]) == "hi!"
    assert tok.decode([104, 105, tok.mask_id, 33], skip_special=False) == "hi[MASK]!"
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # a cut character decodes, it does not raise
    assert tok.token_byte_lengths.tolist() == [1] * 256 + [0, 0, 0]


def test_bpe_round_trips_the_whole_builtin_corpus_exactly(bpe, docs):
    assert bpe.vocab_size == 4096
    assert [bpe.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [bpe.pad_id, bpe.mask_id, bpe.eos_id]
    encoded = bpe.encode_arrays(docs)
    for doc, ids in zip(docs, encoded, strict=True):
        assert bpe.decode(ids.tolist()) == doc
    whole = "\n".join(docs)
    assert bpe.decode(bpe.encode(whole)) == whole
    n_tokens = sum(len(ids) for ids in encoded)
    assert 3.5 < sum(len(d.encode()) for d in docs) / n_tokens < 5.0  # ~4.2 bytes per token at 4k vocab


def test_bpe_token_byte_lengths_are_exact(bpe, docs):
    lengths = bpe.token_byte_lengths
    assert lengths.shape == (bpe.vocab_size,)
    assert [lengths[i] for i in bpe.special_ids] == [0, 0, 0]
    for doc, ids in zip(docs, bpe.encode_arrays(docs), strict=True):
        assert int(lengths[ids].sum()) == len(doc.encode("utf-8"))
    assert lengths[bpe.encode("A")[0]] == 1 and lengths[bpe.encode("é")].sum() == 2
    assert lengths[3:].min() >= 1  # every non-special token stands for at least one byte


def test_bpe_specials_are_not_split_out_of_text_and_never_regular(bpe):
    assert sorted(bpe.special_ids) == [0, 1, 2]
    assert not set(bpe.special_ids) & set(bpe.regular_ids.tolist())
    assert bpe.mask_id not in bpe.encode("a [MASK] in plain text stays text")
    assert bpe.decode(bpe.encode("a [MASK] in plain text stays text")) == "a [MASK] in plain text stays text"


def test_bpe_encodes_bytes_it_never_saw(bpe):
    text = "漢字 and emoji 🙂 and a NUL \x00"
    assert bpe.decode(bpe.encode(text)) == text


def test_save_and_load_round_trip(bpe, tmp_path):
    path = bpe.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer) and loaded.identity == bpe.identity
    assert loaded.encode("def f(x): return x") == bpe.encode("def f(x): return x")
    ByteTokenizer().save(tmp_path / "byte")
    assert isinstance(load_tokenizer(tmp_path / "byte" / "tokenizer.json"), ByteTokenizer)
    DummyTokenizer(100).save(tmp_path / "dummy")
    assert load_tokenizer(tmp_path / "dummy").vocab_size == 100


def test_build_tokenizer_trains_once_then_uses_the_cache(docs, tmp_path, monkeypatch):
    config = DataConfig(tokenizer={"kind": "bpe", "vocab_size": 512})
    train = list(split_corpus(builtin_corpus(), config.val_fraction).train)
    first = build_tokenizer(config, train, tmp_path / "cache", save_dir=tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    assert len(list((tmp_path / "cache" / "tokenizers").glob("bpe-512-*.json"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokenizer_module.BPETokenizer, "train", no_training)
    second = build_tokenizer(config, train, tmp_path / "cache")
    assert second.identity == first.identity
    with pytest.raises(AssertionError, match="reused"):  # other training text → other key → trains
        build_tokenizer(config, [*train, "one more document"], tmp_path / "cache")


def test_tokenizer_path_is_used_and_checked(bpe, tmp_path):
    path = bpe.save(tmp_path / "mine.json")
    config = DataConfig(tokenizer={"kind": "bpe", "path": str(path)})
    assert build_tokenizer(config, [], tmp_path / "cache").identity == bpe.identity
    with pytest.raises(DataError, match=r"absent\.json"):
        load_tokenizer(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(DataError, match=r"bad\.json"):
        load_tokenizer(bad)


def _gpt2_style_file(path, specials=("<|endoftext|>",)):
    """A byte-level BPE file as GPT-2 / Qwen2 ship it: only their own end-of-text special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["some text with words, some more text"] * 10, trainer=trainer)
    hf.save(str(path))
    return hf.get_vocab_size()


def test_pretrained_byte_level_tokenizer_gains_missing_specials(tmp_path):
    size = _gpt2_style_file(tmp_path / "gpt2.json")
    tok = load_tokenizer(tmp_path / "gpt2.json")
    assert tok.hf.id_to_token(tok.eos_id) == "<|endoftext|>"
    assert tok.added == ["[PAD]", "[MASK]"] and tok.vocab_size == size + 2
    assert {tok.pad_id, tok.mask_id} == {size, size + 1}
    text = "naïve text, 𝔘nicode — and [MASK] as plain text"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.mask_id not in ids
    assert int(tok.token_byte_lengths[ids].sum()) == len(text.encode("utf-8"))  # exact bits per byte
    # The run directory keeps the grown file: reloading it adds nothing and gives the same ids.
    again = load_tokenizer(tok.save(tmp_path / "run"))
    assert again.added == [] and again.special_ids == tok.special_ids and again.encode(text) == ids


def test_tokenizer_config_names_the_eos(tmp_path):
    _gpt2_style_file(tmp_path / "tokenizer.json", specials=("<|endoftext|>", "<|im_end|>"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    assert load_tokenizer(tmp_path).hf.id_to_token(load_tokenizer(tmp_path).eos_id) == "<|im_end|>"


def test_non_byte_level_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.decoder = decoders.WordPiece()
    hf.save(str(tmp_path / "words.json"))
    with pytest.raises(DataError, match=r"words\.json.*byte-level"):
        load_tokenizer(tmp_path / "words.json")


def test_check_vocab():
    assert check_vocab(None, 4096) == 4096
    assert check_vocab(4160, 4096) == 4160
    with pytest.raises(
        DataError, match=r"model\.vocab_size=1000 is smaller than the tokenizer's vocabulary \(4096"
    ):
        check_vocab(1000, 4096)


def test_loader_rejects_model_vocab_smaller_than_tokenizer(tmp_path):
    config = {
        "model": {"vocab_size": 200},
        "training": {"seq_len": 32},
        "data": {"cache_dir": str(tmp_path), "tokenizer": "byte"},
    }
    with pytest.raises(DataError, match=r"model\.vocab_size=200.*259"):
        ProgressiveDataLoader(config)


def test_run_dir_records_the_tokenizer(tmp_path):
    config = {
        "model": {},
        "training": {"seq_len": 32},
        "data": {"cache_dir": str(tmp_path / "c"), "tokenizer": "byte"},
    }
    ProgressiveDataLoader(config, run_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert saved["stackwise_tokenizer"] == "byte" and saved["vocab_size"] == 259


def test_dummy_tokenizer_specials_are_the_last_ids():
    tok = DummyTokenizer(64)
    assert tok.special_ids == (61, 62, 63)
    assert tok.regular_ids.tolist() == list(range(61))
    assert np.array_equal(tok.token_byte_lengths, np.array([1] * 61 + [0, 0, 0]))
    assert tok.encode(tok.decode([5, 7, 60])) == [5, 7, 60]
    with pytest.raises(DataError, match=r"model\.vocab_size"):
        DummyTokenizer(4)
