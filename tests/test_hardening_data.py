"""Hostile and broken data: damaged token caches, deeply nested JSON, FIFOs and devices given as
files, unusable cache folders. Each is one message naming the file (exit 2), never a traceback, a
hang or a silent run on altered data."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stackwise.cli import main
from stackwise.data import DataError, load_corpus, load_tokenizer
from stackwise.data import cache as cache_module
from stackwise.data import token_cache as token_cache_module
from stackwise.training import ProgressiveDataLoader

DEEP = (20_000, 200_000)


def config(tmp_path, *, cache=None, steps=3, **data):
    return {
        "model": {"d_model": 32, "n_heads": 2, "max_seq_len": 32, "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
        "training": {"batch_size": 4, "seq_len": 32, "total_steps": steps},
        "data": {"cache_dir": str(cache or tmp_path / "cache"), **data},
        "run": {"dir": str(tmp_path / "runs"), "name": "run", "eval_every": 1000, "eval_batches": 1, "log_every": 1},
    }


def train(tmp_path, capsys, cfg, *args):
    """`stackwise train CFG` in this process: (exit code, stderr)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = main(["train", str(path), *args])
    return code, capsys.readouterr().err


def assert_refused(code, err, *named):
    assert code == 2, err
    assert "Traceback" not in err, err
    for name in named:
        assert str(name) in err, (name, err)


@contextlib.contextmanager
def deadline(seconds=20):
    """Fail instead of hanging: SIGALRM interrupts a blocking open()/read() (PEP 475 re-raises),
    and an address-space limit turns an endless read of /dev/zero into a MemoryError."""

    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds}s")

    old = signal.signal(signal.SIGALRM, expire)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with contextlib.suppress(OSError, ValueError):
        used = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (used + (4 << 30), hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def cache_entry(cache_dir: Path) -> Path:
    (entry,) = (cache_dir / "tokens").iterdir()
    return entry


# ---- 9. token cache integrity -----------------------------------------------------------------


def _build_cache(tmp_path):
    loader = ProgressiveDataLoader(config(tmp_path))
    entry = cache_entry(tmp_path / "cache")
    return loader, entry


def _flip(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = value
    path.write_bytes(bytes(data))


DAMAGE = {
    # (file, harm): each must be found when the entry is opened, then rebuilt identically
    "flipped byte, id stays in range": ("train.bin", lambda p: _flip(p, 1000, p.read_bytes()[1000] ^ 0x01)),
    "flipped byte, id out of range": ("train.bin", lambda p: _flip(p, 1001, 0xFF)),
    "flipped byte in val.bin": ("val.bin", lambda p: _flip(p, 10, p.read_bytes()[10] ^ 0x20)),
    "truncated train.bin": ("train.bin", lambda p: p.write_bytes(p.read_bytes()[:-2])),
    "train.bin zero-filled, same size": ("train.bin", lambda p: p.write_bytes(bytes(p.stat().st_size))),
    "meta.json garbage": ("meta.json", lambda p: p.write_text("{not json")),
    "meta.json deeply nested": ("meta.json", lambda p: p.write_text("[" * 50_000 + "]" * 50_000)),
    "checksum edited in meta.json": ("meta.json", lambda p: p.write_text(
        json.dumps({**json.loads(p.read_text()), "checksums": {"train.bin": "0" * 64, "val.bin": "0" * 64}}))),
    "flip with mtime put back": ("train.bin", lambda p: _flip_keep_mtime(p)),
}


def _flip_keep_mtime(path: Path) -> None:
    st = path.stat()
    _flip(path, 2000, path.read_bytes()[2000] ^ 0x04)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime still changes: detected


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, damage, caplog):
    loader, entry = _build_cache(tmp_path)
    expected_train, expected_val = np.array(loader._tokens.train), np.array(loader._tokens.val)
    name, harm = DAMAGE[damage]
    harm(entry / name)
    with caplog.at_level(logging.WARNING, logger="stackwise.data.token_cache"):
        again = ProgressiveDataLoader(config(tmp_path))
    assert any("damaged" in r.getMessage() and str(entry) in r.getMessage() for r in caplog.records), caplog.text
    assert np.array_equal(again._tokens.train, expected_train) and np.array_equal(again._tokens.val, expected_val)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stackwise.data.token_cache"):
        ProgressiveDataLoader(config(tmp_path))  # the rebuilt entry is good again
    assert not caplog.records


def test_a_flipped_byte_in_train_bin_is_rebuilt_and_the_run_trains(tmp_path, capsys, caplog):
    _build_cache(tmp_path)
    entry = cache_entry(tmp_path / "cache")
    _flip(entry / "train.bin", 1001, 0xFF)  # an id of 0xFF.. : out of the byte tokenizer's 259
    with caplog.at_level(logging.WARNING):
        code, err = train(tmp_path, capsys, config(tmp_path))
    assert code == 0, err
    assert "train.bin does not match its checksum" in caplog.text


def test_an_intact_entry_is_hashed_once_then_trusted_by_its_stamp(tmp_path, monkeypatch):
    _build_cache(tmp_path)
    entry = cache_entry(tmp_path / "cache")
    assert (entry / token_cache_module.STAMP_FILE).is_file()  # written at build: no hash on the next open
    calls = []
    real = token_cache_module.file_checksum
    monkeypatch.setattr(token_cache_module, "file_checksum", lambda p: calls.append(p.name) or real(p))
    ProgressiveDataLoader(config(tmp_path))
    assert calls == []
    (entry / token_cache_module.STAMP_FILE).unlink()  # e.g. a cache copied elsewhere: hashed again
    ProgressiveDataLoader(config(tmp_path))
    assert sorted(calls) == ["train.bin", "val.bin"]
    ProgressiveDataLoader(config(tmp_path))
    assert len(calls) == 2


def test_ids_out_of_range_when_serving_windows_are_a_data_error_naming_the_file(tmp_path):
    loader, entry = _build_cache(tmp_path)
    # Damage after the entry was opened and verified (the memmap sees the new bytes).
    with open(entry / "train.bin", "r+b") as f:
        f.write(b"\xff\xff" * (len(loader._tokens.train)))
    with pytest.raises(DataError, match=r"train\.bin: token id 65535 at position \d+ is outside"):
        loader.batch_at(0)
    with open(entry / "val.bin", "r+b") as f:
        f.write(b"\x00\x7f")
    with pytest.raises(DataError, match=r"val\.bin: token id 32512 at position 0"):
        next(loader.validation_batches())


# ---- 4. deep JSON, FIFOs and devices ----------------------------------------------------------


@pytest.mark.parametrize("depth", DEEP)
@pytest.mark.parametrize("shape", ["array", "object"])
def test_deeply_nested_jsonl_is_a_data_error_naming_file_and_line(tmp_path, capsys, depth, shape):
    corpus = tmp_path / "deep.jsonl"
    nested = "[" * depth + "]" * depth if shape == "array" else '{"a":' * depth + "1" + "}" * depth
    corpus.write_text('{"text": "a fine first document"}\n\n' + '{"text": "x", "meta": ' + nested + "}\n")
    with pytest.raises(DataError, match=r"deep\.jsonl line 3: JSON nested too deeply"):
        load_corpus([str(corpus)])
    code, err = train(tmp_path, capsys, config(tmp_path, paths=[str(corpus)]))
    assert_refused(code, err, corpus, "line 3")


@pytest.mark.parametrize("depth", DEEP)
def test_deeply_nested_tokenizer_json_is_a_data_error_naming_the_file(tmp_path, capsys, depth):
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(DataError, match=r"tokenizer\.json: JSON nested too deeply"):
        load_tokenizer(tok)
    code, err = train(tmp_path, capsys, config(tmp_path, tokenizer={"path": str(tok)}))
    assert_refused(code, err, tok)


def test_a_moderately_nested_tokenizer_json_is_refused_by_the_tokenizers_parser(tmp_path):
    tok = tmp_path / "tokenizer.json"  # deep enough for serde (limit 128), not for Python's json
    tok.write_text('{"model": ' + "[" * 500 + "]" * 500 + "}")
    with pytest.raises(DataError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(tok)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.txt"
    os.mkfifo(path)
    return path


def _special_files(tmp_path, fifo):
    """(label, path, what the message must call it) for every kind of non-regular file at hand."""
    link = tmp_path / "zero-link.txt"
    link.symlink_to("/dev/zero")
    cases = [("fifo", fifo, "FIFO"), ("/dev/zero", Path("/dev/zero"), "character device"),
             ("symlink to /dev/zero", link, "character device")]
    if Path("/dev/null").exists():
        cases.append(("/dev/null", Path("/dev/null"), "character device"))
    return cases


def test_fifo_and_devices_as_corpus_paths_are_refused_without_blocking(tmp_path, fifo, capsys):
    for label, path, kind in _special_files(tmp_path, fifo):
        with deadline():
            with pytest.raises(DataError, match=kind) as info:
                load_corpus([str(path)])
            assert str(path) in str(info.value), label
            code, err = train(tmp_path, capsys, config(tmp_path, paths=[str(path)]))
        assert_refused(code, err, path, kind)


def test_fifo_and_devices_inside_a_corpus_folder_are_refused_naming_them(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("a regular document " * 50)
    os.mkfifo(folder / "b.txt")
    with deadline():
        with pytest.raises(DataError, match=r"b\.txt is a FIFO"):
            load_corpus([str(folder)])
        code, err = train(tmp_path, capsys, config(tmp_path, paths=[str(folder)]))
    assert_refused(code, err, folder / "b.txt", "FIFO")
    (folder / "b.txt").unlink()
    (folder / "c.md").symlink_to("/dev/zero")
    with deadline(), pytest.raises(DataError, match=r"c\.md is a character device"):
        load_corpus([str(folder)])
    (folder / "c.md").unlink()
    os.mkfifo(folder / "ignored.sock")  # not a corpus suffix: skipped as before, never opened
    (folder / "sub").mkdir()  # a folder whose name has no suffix is not a file to read
    with deadline():
        assert len(load_corpus([str(folder)]).documents) == 1


def test_fifo_and_devices_as_tokenizer_path_are_refused_without_blocking(tmp_path, fifo, capsys):
    for _label, path, kind in _special_files(tmp_path, fifo):
        with deadline():
            with pytest.raises(DataError, match=kind):
                load_tokenizer(path)
            code, err = train(tmp_path, capsys, config(tmp_path, tokenizer={"path": str(path)}))
        assert_refused(code, err, path, kind)
    # A folder holding a FIFO named tokenizer.json, and a FIFO as the tokenizer_config.json beside a good one.
    folder = tmp_path / "tok"
    folder.mkdir()
    os.mkfifo(folder / "tokenizer.json")
    with deadline(), pytest.raises(DataError, match="FIFO"):
        load_tokenizer(folder)


def test_a_fifo_as_tokenizer_config_beside_a_bpe_tokenizer_is_refused(tmp_path):
    from stackwise.data import BPETokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    BPETokenizer.train(["some text to learn a few merges from"] * 20, 280).save(folder)
    os.mkfifo(folder / "tokenizer_config.json")
    with deadline(), pytest.raises(DataError, match=r"tokenizer_config\.json is a FIFO"):
        load_tokenizer(folder)


# ---- 3. unusable cache folders -----------------------------------------------------------------


def test_cache_dir_that_is_a_file_is_one_message_before_anything_is_read(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    read = []
    monkeypatch.setattr("stackwise.training.loader.open_corpus", lambda *a, **k: read.append(1))
    for cache in (blocker, blocker / "below"):
        code, err = train(tmp_path, capsys, config(tmp_path, cache=cache))
        assert_refused(code, err, blocker, "is a file")
        assert "data.cache_dir" in err and not read


def _is_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.skipif(_is_root(), reason="root ignores file permissions, so a read-only folder is writable")
def test_read_only_cache_dir_is_one_message(tmp_path, capsys):
    cache = tmp_path / "ro-cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        code, err = train(tmp_path, capsys, config(tmp_path, cache=cache))
    finally:
        cache.chmod(0o755)
    assert_refused(code, err, cache, "Permission denied")


def _refuse_writes_under(monkeypatch, folder: Path, code: int) -> None:
    """As root nothing is read-only: files made inside `folder` (tempfile.mkstemp / mkdtemp, how
    every cache write starts) fail with `code` instead."""
    for name in ("mkstemp", "mkdtemp"):
        real = getattr(cache_module.tempfile, name)

        def refuse(*args, _real=real, **kwargs):
            if Path(kwargs.get("dir", "")).resolve().is_relative_to(folder.resolve()):
                raise OSError(code, os.strerror(code))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cache_module.tempfile, name, refuse)


@pytest.mark.parametrize("code_", [errno.EACCES, errno.EROFS], ids=["permission", "read-only-fs"])
def test_unwritable_cache_dir_simulated_is_one_message(tmp_path, capsys, monkeypatch, code_):
    cache = tmp_path / "cache"
    _refuse_writes_under(monkeypatch, cache, code_)
    code, err = train(tmp_path, capsys, config(tmp_path, cache=cache))
    assert_refused(code, err, cache, os.strerror(code_), "data.cache_dir")


def test_a_read_only_cache_that_holds_every_entry_still_works(tmp_path, monkeypatch, capsys):
    _build_cache(tmp_path)
    (cache_entry(tmp_path / "cache") / token_cache_module.STAMP_FILE).unlink()  # forces a stamp write
    _refuse_writes_under(monkeypatch, tmp_path / "cache", errno.EROFS)
    code, err = train(tmp_path, capsys, config(tmp_path))
    assert code == 0, err
    assert not (cache_entry(tmp_path / "cache") / token_cache_module.STAMP_FILE).exists()


def test_a_full_disk_while_writing_the_token_cache_is_one_message_and_leaves_no_entry(tmp_path, capsys, monkeypatch):
    real = token_cache_module.tokenize_documents

    def full_disk(source, plan, tokenizer, streams, dtype, progress):
        streams[0].write(np.zeros(1000, dtype))  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(token_cache_module, "tokenize_documents", full_disk)
    cache = tmp_path / "cache"
    code, err = train(tmp_path, capsys, config(tmp_path, cache=cache))
    assert_refused(code, err, cache / "tokens", "No space left on device", "MiB")
    assert list((cache / "tokens").iterdir()) == []  # no entry, complete-looking or not; no temp folder
    monkeypatch.setattr(token_cache_module, "tokenize_documents", real)
    code, err = train(tmp_path, capsys, config(tmp_path, cache=cache))  # space again: it builds
    assert code == 0, err


def test_a_full_disk_while_writing_meta_json_leaves_no_entry(tmp_path, monkeypatch):
    def full_disk(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(token_cache_module, "_write_durably", full_disk)
    with pytest.raises(DataError, match="No space left on device"):
        ProgressiveDataLoader(config(tmp_path))
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
