"""Corpora in the forms people keep them (gzip / zstd JSON lines and text, parquet, nanoGPT `.bin`
token files), `data.include`, pretrained tokenizer files (GPT-2 and SentencePiece style) with
exact bytes, and `stackwise eval --data` scoring a whole file."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stackwise.cli import main
from stackwise.data import DataError, builtin_corpus, load_corpus, load_tokenizer
from stackwise.data import formats as formats_module
from stackwise.data.token_cache import stream_bytes
from stackwise.data.tokenizer import BPETokenizer, SentencePieceTokenizer
from stackwise.training import ProgressiveDataLoader, TrainingMachine

needs_pyarrow = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None,
                                   reason="pyarrow is not installed (pip install 'stackwise[parquet]')")
needs_zstd = pytest.mark.skipif(importlib.util.find_spec("zstandard") is None,
                                reason="zstandard is not installed (pip install 'stackwise[zstd]')")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    # 40 real English documents (~150 KB), a few with leading spaces, CJK and emoji
    texts = [d.text for d in builtin_corpus().documents][:40]
    return [*texts[:37], "  indented start, then 日本語 and 🙂 ", "\ttab first\n", "ünïcödé ✓ end"]


def _config(tmp_path, paths, **data):
    return {
        "model": {"d_model": 32, "n_heads": 2, "architecture": {"n_stacks": 1, "blocks_per_stack": 1}, "max_seq_len": 64},
        "training": {"batch_size": 8, "seq_len": 32, "optimizer": {"lr": 3e-3}, "seed": 1},
        "data": {"paths": [str(p) for p in paths], "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.1, **data},
        "run": {"eval_every": 100, "eval_batches": 2, "log_every": 100},
    }


def _trains(config) -> TrainingMachine:
    """20 steps of a d_model-32 model: the loss must fall clearly."""
    machine = TrainingMachine(config, total_steps=20, run_dir=False, console=False)
    losses = machine.train().losses
    assert np.mean(losses[-4:]) < losses[0] - 0.5, losses
    return machine


def _jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


# ---- compressed text and JSON lines ------------------------------------------------------------


def test_gzip_and_zstd_files_read_like_the_plain_ones_streamed_in_small_chunks(tmp_path, docs, monkeypatch):
    plain = tmp_path / "c.jsonl"
    plain.write_bytes(_jsonl(docs))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs[:20])) + gzip.compress(_jsonl(docs[20:])))
    (tmp_path / "one.txt").write_text(docs[0])
    (tmp_path / "one.txt.gz").write_bytes(gzip.compress(docs[0].encode()))
    monkeypatch.setattr(formats_module, "_READ_SIZE", 97)  # lines and members cut across chunks
    expected = [d.text for d in load_corpus([str(plain)]).documents]
    gz = load_corpus([str(tmp_path / "c.jsonl.gz")])  # two gzip members, as `cat a.gz b.gz` makes
    assert [d.text for d in gz.documents] == expected == [d for d in docs if d.strip()]
    assert gz.documents[3].source == f"{tmp_path / 'c.jsonl.gz'}:4"
    assert [d.text for d in load_corpus([str(tmp_path / "one.txt.gz")]).documents] == [docs[0]]
    if importlib.util.find_spec("zstandard"):
        import zstandard

        (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(docs)))
        (tmp_path / "one.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[0].encode()))
        assert [d.text for d in load_corpus([str(tmp_path / "c.jsonl.zst")]).documents] == expected
        assert [d.text for d in load_corpus([str(tmp_path / "one.txt.zst")]).documents] == [docs[0]]


def test_a_gzip_jsonl_corpus_trains(tmp_path, docs):
    (tmp_path / "corpus.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs)))
    _trains(_config(tmp_path, [tmp_path / "corpus.jsonl.gz"]))


@needs_zstd
def test_a_zstd_jsonl_corpus_trains(tmp_path, docs):
    import zstandard

    (tmp_path / "corpus.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(_jsonl(docs)))
    _trains(_config(tmp_path, [tmp_path / "corpus.jsonl.zst"]))


def test_damaged_compressed_files_are_data_errors_naming_them(tmp_path, docs):
    whole = gzip.compress(_jsonl(docs))
    cases = {"cut.jsonl.gz": (whole[: len(whole) // 2], "truncated"),
             "plain.jsonl.gz": (_jsonl(docs), "not a valid gzip file"),
             "cut.txt.gz": (gzip.compress(docs[0].encode())[:-12], "truncated")}
    if importlib.util.find_spec("zstandard"):
        import zstandard

        packed = zstandard.ZstdCompressor().compress(_jsonl(docs))
        cases["cut.jsonl.zst"] = (packed[:-20], "truncated")
        cases["junk.jsonl.zst"] = (b"not zstd at all", "not a valid zstd file")
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=needle) as err:
            load_corpus([str(tmp_path / name)])
        assert name in str(err.value)


def test_missing_optional_packages_name_the_file_and_the_extra(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    for module in ("zstandard", "pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(DataError, match=r"a\.jsonl\.zst: .*pip install 'stackwise\[zstd\]'"):
        load_corpus([str(tmp_path / "a.jsonl.zst")])
    with pytest.raises(DataError, match=r"a\.parquet: .*pip install 'stackwise\[parquet\]'"):
        load_corpus([str(tmp_path / "a.parquet")])


# ---- parquet -------------------------------------------------------------------------------------


def _parquet(path, columns, row_group_size=7):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


@needs_pyarrow
def test_parquet_is_read_in_record_batches_and_trains(tmp_path, docs, monkeypatch):
    path = tmp_path / "train-00000-of-00001.parquet"
    _parquet(path, {"id": list(range(len(docs))), "content": docs})
    monkeypatch.setattr(formats_module, "_PARQUET_BATCH_ROWS", 5)  # several batches per row group
    corpus = load_corpus([str(path)], text_field="content")
    assert [d.text for d in corpus.documents] == docs
    assert corpus.documents[5].source == f"{path}:6"
    _trains(_config(tmp_path, [path], text_field="content"))


@needs_pyarrow
def test_bad_parquet_files_are_data_errors_naming_the_file(tmp_path):
    _parquet(tmp_path / "cols.parquet", {"id": [1, 2], "body": ["a", "b"]})
    with pytest.raises(DataError, match=r"cols\.parquet: no 'text' column \(columns: 'id', 'body'\)"):
        load_corpus([str(tmp_path / "cols.parquet")])
    with pytest.raises(DataError, match=r"cols\.parquet: column 'id' holds int64, not strings"):
        load_corpus([str(tmp_path / "cols.parquet")], text_field="id")
    _parquet(tmp_path / "nulls.parquet", {"text": ["fine", None, "x"]})
    with pytest.raises(DataError, match=r"nulls\.parquet row 2: column 'text' is null"):
        load_corpus([str(tmp_path / "nulls.parquet")])
    (tmp_path / "fake.parquet").write_text("just text")
    with pytest.raises(DataError, match=r"fake\.parquet: not a parquet file"):
        load_corpus([str(tmp_path / "fake.parquet")])


# ---- tokenizer files -----------------------------------------------------------------------------


def _byte_level_file(path, texts, vocab_size=512):
    """GPT-2 style: byte-level BPE with only its own <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(path))
    return path


def _sentencepiece_file(path, texts, style):
    """A Llama 2 / Mistral style file: `legacy` (normalizer Prepend + Replace, BPE, decoder
    Replace/ByteFallback/Fuse/Strip) or `unigram` (Metaspace pre-tokenizer and decoder, Unigram);
    both with <unk>, <s>, </s> and the 256 <0xNN> byte-fallback pieces in the model's vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    hf = Tokenizer(models.BPE() if style == "legacy" else models.Unigram())
    if style == "legacy":
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    else:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>", show_progress=False)
    hf.train_from_iterator([t for t in texts if t.isascii()], trainer=trainer)
    body = json.loads(hf.to_str())
    model = body["model"]
    if style == "legacy":
        order = sorted(model["vocab"], key=model["vocab"].get)
        pieces = specials + byte_pieces + [t for t in order if t not in specials]
        model.update(vocab={t: i for i, t in enumerate(pieces)}, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
        body["decoder"] = json.loads(decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]).__getstate__())
    else:
        rest = [p for p in model["vocab"] if p[0] not in specials]
        model.update(vocab=[[s, 0.0] for s in specials] + [[b, -20.0] for b in byte_pieces] + rest,
                     unk_id=0, byte_fallback=True)
        body["decoder"] = json.loads(decoders.Sequence([
            decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)]).__getstate__())
    sp = Tokenizer.from_str(json.dumps(body))
    sp.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    sp.save(str(path))
    return path


def test_gpt2_style_tokenizer_file_encodes_exactly_and_trains(tmp_path, docs):
    path = _byte_level_file(tmp_path / "gpt2.json", docs)
    tok = load_tokenizer(path)
    assert type(tok) is BPETokenizer and tok.added == ["[PAD]", "[MASK]"]
    for doc in docs:
        ids = tok.encode(doc)
        assert tok.decode(ids) == doc and tok.count_bytes(ids) == len(doc.encode())
    (tmp_path / "c.jsonl").write_bytes(_jsonl(docs))
    _trains(_config(tmp_path, [tmp_path / "c.jsonl"], tokenizer={"path": str(path)}))


@pytest.mark.parametrize("style", ["legacy", "unigram"])
def test_sentencepiece_style_files_round_trip_with_exact_bytes_per_document(tmp_path, docs, style):
    tok = load_tokenizer(_sentencepiece_file(tmp_path / "sp.json", docs, style))
    assert type(tok) is SentencePieceTokenizer and tok.kind == "bpe" and tok.prepends
    assert tok.hf.id_to_token(tok.eos_id) == "</s>" and tok.added == ["[PAD]", "[MASK]"]
    lengths, prefix = tok.token_byte_lengths, tok.dummy_prefix_bytes
    space, byte_a = tok.hf.token_to_id("▁"), tok.hf.token_to_id("<0x41>")
    assert lengths[space] == 1 and lengths[byte_a] == 1 and prefix[space] == 1 and prefix[byte_a] == 0
    assert lengths[tok.eos_id] == lengths[tok.mask_id] == 0
    for doc in [*docs, " one leading space", "   three", "x", "line\n\n  indented\n"]:
        ids = tok.encode(doc)
        assert tok.decode(ids) == doc, doc[:40]
        # the dummy "▁" the tokenizer puts before each document is no text: not counted
        assert tok.count_bytes(ids) == len(doc.encode("utf-8")), doc[:40]
        assert tok.hf.id_to_token(ids[0]).startswith("▁")
    assert any(tok.hf.id_to_token(i).startswith("<0x") for i in tok.encode("日本語 🙂"))  # byte fallback used
    both = [*tok.encode("first"), tok.eos_id, *tok.encode(" second")]
    assert tok.decode(both) == "first second" and tok.count_bytes(both) == len("first second")
    again = load_tokenizer(tok.save(tmp_path / "run"))  # the run directory's copy: same ids, nothing added
    assert again.added == [] and again.encode(docs[0]) == tok.encode(docs[0])


def test_sentencepiece_tokenizer_trains_with_exact_bits_per_byte_in_the_loader(tmp_path, docs, caplog):
    path = _sentencepiece_file(tmp_path / "sp.json", docs, "legacy")
    (tmp_path / "c.jsonl").write_bytes(_jsonl(docs))
    config = _config(tmp_path, [tmp_path / "c.jsonl"], tokenizer={"path": str(path)})
    with caplog.at_level(logging.WARNING, logger="stackwise.data.token_cache"):
        loader = ProgressiveDataLoader(config)
    assert "decode to" not in caplog.text  # token bytes == text bytes in both splits
    tok, tokens = loader.tokenizer, loader._tokens
    assert stream_bytes(tok, tokens.train) == tokens.train_bytes
    assert stream_bytes(tok, tokens.val) == tokens.val_bytes
    # Position by position: a token's bytes, less its dummy prefix where it opens a document.
    val = np.asarray(tokens.val).astype(np.int64)
    opens = np.r_[True, val[:-1] == tok.eos_id]
    per_position = tok.token_byte_lengths[val] - tok.dummy_prefix_bytes[val] * opens
    assert per_position.sum() == tokens.val_bytes
    width = loader.settings.seq_len + 1
    for objective in ("clm", "mlm", "diffusion"):
        loader.configure(objective=objective)
        first = 1 if objective == "clm" else 0  # clm predicts window[1:], the others window[:-1]
        for batch in loader.validation_batches():
            expected = 0
            for row, window in enumerate(batch.sample_ids.tolist()):
                start = window * width + first
                row_bytes = per_position[start : start + loader.settings.seq_len]
                # diffusion's loss bounds the whole window: every position is a target
                expected += int(row_bytes.sum() if objective == "diffusion" else row_bytes[batch.loss_mask[row].numpy()].sum())
            assert batch.n_target_bytes == expected, objective
    # every document as validation (eval --data): windows overlap by one token, all bytes but the
    # first token's and a short tail are scored, and the batches count exactly those
    loader.configure(objective="clm", validation="all")
    everything = np.asarray(loader._tokens.val).astype(np.int64)
    opens = np.r_[True, everything[:-1] == tok.eos_id]
    per_position = tok.token_byte_lengths[everything] - tok.dummy_prefix_bytes[everything] * opens
    assert per_position.sum() == loader._tokens.val_bytes == sum(len(d.encode()) for d in docs)
    scope = loader.validation_coverage()
    last = loader.n_val_windows * loader.settings.seq_len + 1  # one past the last predicted position
    assert scope["bytes"] == per_position[1:last].sum() == sum(b.n_target_bytes for b in loader.validation_batches())
    assert scope["documents"] == scope["total_documents"] == len(docs) and len(everything) - last < width
    _trains(config)


def test_sentencepiece_file_without_byte_fallback_is_refused(tmp_path, docs):
    path = _sentencepiece_file(tmp_path / "sp.json", docs, "legacy")
    body = json.loads(path.read_text())
    body["model"]["byte_fallback"] = False
    path.write_text(json.dumps(body))
    with pytest.raises(DataError, match=r"sp\.json: .*no byte fallback"):
        load_tokenizer(path)


# ---- nanoGPT token files -------------------------------------------------------------------------


def _bin(path, tok, docs, dtype=np.uint16):
    """As nanoGPT's prepare.py: every document's ids followed by the end-of-text id, no header."""
    ids = [i for d in docs for i in [*tok.encode(d), tok.eos_id]]
    np.array(ids, dtype=dtype).tofile(path)
    return path


def test_nanogpt_bin_files_split_by_document_and_train(tmp_path, docs):
    tok_path = _byte_level_file(tmp_path / "gpt2.json", docs)
    tok = load_tokenizer(tok_path)
    _bin(tmp_path / "train.bin", tok, docs)
    config = _config(tmp_path, [tmp_path / "train.bin"], tokenizer={"path": str(tok_path)})
    loader = ProgressiveDataLoader(config)
    tokens = loader._tokens
    meta = json.loads((Path(tokens.train_file).parent / "meta.json").read_text())
    assert meta["split_rule"] == "by-document" and meta["token_files"][0]["dtype"] == "uint16"
    assert tokens.train_docs + tokens.val_docs == len(docs) and tokens.val_docs >= 1
    assert tokens.train_bytes + tokens.val_bytes == sum(len(d.encode()) for d in docs)  # exact, from the ids
    assert len(tokens.train) + len(tokens.val) == sum(len(tok.encode(d)) + 1 for d in docs)
    val_docs = tok.decode(list(tokens.val), skip_special=False).split("<|endoftext|>")[:-1]
    assert set(val_docs) <= set(docs) and len(val_docs) == tokens.val_docs
    # the same ids written as uint32 (named so) give the same split
    _bin(tmp_path / "same.u32.bin", tok, docs, np.uint32)
    other = ProgressiveDataLoader(_config(tmp_path, [tmp_path / "same.u32.bin"], tokenizer={"path": str(tok_path)}))
    assert np.array_equal(other._tokens.val, tokens.val) and np.array_equal(other._tokens.train, tokens.train)
    # nanoGPT's val.bin, scored whole (what `eval --data val.bin` does)
    _bin(tmp_path / "val.bin", tok, docs[:5])
    loader.configure(paths=[str(tmp_path / "val.bin")], validation="all")
    scope = loader.validation_coverage()
    assert scope["total_documents"] == scope["documents"] == 5
    assert scope["total_bytes"] == sum(len(d.encode()) for d in docs[:5]) > scope["bytes"] > 0.95 * scope["total_bytes"]
    _trains(config)


def test_bin_documents_across_chunks_empty_ones_and_a_last_one_without_eos(tmp_path, docs, monkeypatch):
    from stackwise.data import token_files

    tok_path = _byte_level_file(tmp_path / "gpt2.json", docs)
    tok = load_tokenizer(tok_path)
    eos, parts = tok.eos_id, [tok.encode(d) for d in docs[:12]]
    ids = [eos, eos]  # empty documents first, and between
    for i, p in enumerate(parts):
        ids += [*p, eos] + ([eos] if i % 3 == 0 else [])
    ids = ids[:-1]  # the last document has no [EOS] of its own
    np.array(ids, dtype=np.uint16).tofile(tmp_path / "odd.bin")
    config = _config(tmp_path, [tmp_path / "odd.bin"], tokenizer={"path": str(tok_path)}, val_fraction=0.3)
    whole = ProgressiveDataLoader(config)._tokens
    expected = sorted(len(d.encode()) for d in docs[:12])
    found = [tok.count_bytes(np.asarray(s)[: len(s) - 1]) for s in (whole.train, whole.val)]
    assert sum(found) == sum(expected) == whole.train_bytes + whole.val_bytes
    assert whole.train_docs + whole.val_docs == 12 and np.asarray(whole.val)[-1] == eos
    monkeypatch.setattr(token_files, "_CHUNK", 7)  # documents and [EOS] runs cut across chunks
    small = ProgressiveDataLoader({**config, "data": {**config["data"], "cache_dir": str(tmp_path / "c2")}})._tokens
    assert np.array_equal(small.train, whole.train) and np.array_equal(small.val, whole.val)
    assert (small.train_bytes, small.val_bytes) == (whole.train_bytes, whole.val_bytes)


def test_malformed_bin_files_are_data_errors_naming_the_file(tmp_path, docs):
    tok_path = _byte_level_file(tmp_path / "gpt2.json", docs[:10])
    tok = load_tokenizer(tok_path)
    with_tok = {"tokenizer": {"path": str(tok_path)}}

    def refused(name, needle, **data):
        with pytest.raises(DataError, match=needle) as err:
            ProgressiveDataLoader(_config(tmp_path, [tmp_path / name], **{**with_tok, **data}))
        assert name in str(err.value)

    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    refused("odd.bin", "3 bytes is not a whole number of uint16 ids")
    np.array([5, 7, 60000, tok.eos_id] * 40, dtype=np.uint16).tofile(tmp_path / "foreign.bin")
    refused("foreign.bin", r"token id 60,000 at position 2 is outside the vocabulary .*512 ids")
    np.array([5, 7, tok.mask_id, tok.eos_id] * 40, dtype=np.uint16).tofile(tmp_path / "masked.bin")
    refused("masked.bin", r"token id 513 at position 2 is outside the vocabulary")
    _bin(tmp_path / "wide.bin", tok, docs[:10], np.uint32)
    refused("wide.bin", "looks like a uint32 file")
    _bin(tmp_path / "narrow.bin", tok, docs[:10])
    refused("narrow.bin", "is not a whole number of uint32 ids|outside the vocabulary", bin_dtype="uint32")
    (tmp_path / "empty.bin").write_bytes(b"")
    refused("empty.bin", "hold no tokens")
    with pytest.raises(DataError, match=r"narrow\.bin.*data\.tokenizer\.path"):
        ProgressiveDataLoader(_config(tmp_path, [tmp_path / "narrow.bin"]))
    (tmp_path / "t.txt").write_text("text")
    with pytest.raises(DataError, match=r"mixes token files \(\.bin\) with text files .*t\.txt"):
        load_corpus([str(tmp_path / "narrow.bin"), str(tmp_path / "t.txt")])
    # uint32 ids given as such (data.bin_dtype) are read
    loader = ProgressiveDataLoader(_config(tmp_path, [tmp_path / "wide.bin"], bin_dtype="uint32", **with_tok))
    assert len(loader._tokens.train) + len(loader._tokens.val) == sum(len(tok.encode(d)) + 1 for d in docs[:10])


# ---- data.include --------------------------------------------------------------------------------


def test_include_picks_python_files_and_no_corpus_lists_the_suffixes(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / ".venv").mkdir()
    (src / "setup.py").write_text("print('setup')\n" * 40)
    (src / "pkg" / "mod.py").write_text("def f(x):\n    return x\n" * 40)
    (src / "pkg" / "README.md").write_text("# readme\n" * 40)
    (src / ".venv" / "hidden.py").write_text("hidden = 1\n")

    def names(include):
        return [Path(f).relative_to(src).as_posix() for f in load_corpus([str(src)], include=include).files]

    assert names(["*.py"]) == ["setup.py"]
    assert names(["**/*.py"]) == ["pkg/mod.py", "setup.py"]
    assert names(["**/*.py", "**/*.md"]) == ["pkg/README.md", "pkg/mod.py", "setup.py"]
    assert names(None) == ["pkg/README.md"]
    (src / "pkg" / "README.md").unlink()
    with pytest.raises(DataError, match=r"src holds no corpus files .*\.txt, \.md, .*\.jsonl, \.parquet.*data\.include"):
        load_corpus([str(src)])
    with pytest.raises(DataError, match=r"no file matches data\.include \['\*\.rs'\]"):
        load_corpus([str(src)], include=["*.rs"])
    with pytest.raises(DataError, match=r"data\.include: pattern '/abs/\*\.py'"):
        load_corpus([str(src)], include=["/abs/*.py"])
    loader = ProgressiveDataLoader({**_config(tmp_path, [src], include=["**/*.py"]), "model": {}})
    assert loader._tokens.train_docs + loader._tokens.val_docs == 2


# ---- eval --data ---------------------------------------------------------------------------------


def test_eval_data_scores_the_whole_file_and_says_how_much(tmp_path, docs, capsys):
    corpus = tmp_path / "train.jsonl"
    corpus.write_bytes(_jsonl(docs))
    config = {**_config(tmp_path, [corpus]), "run": {"dir": str(tmp_path / "runs"), "name": "r", "eval_batches": 1}}
    config["training"]["total_steps"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "runs" / "r"
    license_text = "".join(docs[:8])
    (tmp_path / "LICENSE").write_text(license_text)
    capsys.readouterr()
    total = len(license_text.encode())
    assert main(["eval", str(run), "--data", str(tmp_path / "LICENSE")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("validation loss") and "bits/byte" in lines[0]
    scored = int(lines[1].split()[1].replace(",", ""))
    assert f"of {total:,} bytes in 1 of 1 documents (every document of {tmp_path / 'LICENSE'}" in lines[1]
    assert total - 40 < scored < total  # all but the first token and a tail shorter than a window (33 tokens)
    assert main(["eval", str(run), "--data", str(tmp_path / "LICENSE"), "--split", "validation"]) == 0
    part = capsys.readouterr().out.splitlines()[1]
    assert int(part.split()[1].replace(",", "")) < total * 0.1 and "the validation split of" in part
    many = tmp_path / "many.jsonl"
    many.write_bytes(_jsonl(docs[:12]))
    assert main(["eval", str(run), "--data", str(many)]) == 0
    assert "in 12 of 12 documents (every document of" in capsys.readouterr().out
    assert main(["eval", str(run)]) == 0  # the run's own corpus: its validation split, as before
    assert "the validation split of" in capsys.readouterr().out
