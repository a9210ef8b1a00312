"""Tokenizers: raw bytes, HF `tokenizers` files (byte-level BPE, or SentencePiece style with byte
fallback), and the dummy one for random data.

Every tokenizer has the three special tokens [PAD], [MASK] and [EOS] ([EOS] separates documents)
and knows, for each id, the exact number of UTF-8 bytes it decodes to (0 for specials), which is
what makes bits per byte exact and comparable across tokenizers. A SentencePiece-style tokenizer
also puts a "▁" (its dummy prefix, not text) at the start of every document: `dummy_prefix_bytes`
says which ids carry it, and `count_bytes` leaves it out for the token that opens a document.

A run directory always holds a `tokenizer.json`: the HF file for BPE, a small stackwise JSON for
the byte and dummy tokenizers. `load_tokenizer` reads either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stackwise.data.cache import atomic_write_text, cache_error, ensure_writable, resolve_cache_dir
from stackwise.data.errors import DataError
from stackwise.data.files import read_regular

if TYPE_CHECKING:
    from stackwise.config import DataConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[EOS]")
TOKENIZER_FILE = "tokenizer.json"
# Bump when the BPE training recipe changes: cached tokenizers trained with the old one are not reused.
BPE_RECIPE = "bytelevel-bpe-v1"


class Tokenizer(ABC):
    """What the data plane and the model need from a tokenizer."""

    kind: str
    pad_id: int
    mask_id: int
    eos_id: int  # separates documents in the token stream

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    @abstractmethod
    def to_json(self) -> str:
        """The content of this tokenizer's `tokenizer.json`."""

    @property
    @abstractmethod
    def token_byte_lengths(self) -> np.ndarray:
        """int64 array (vocab_size,): UTF-8 bytes each id decodes to; 0 for special tokens."""

    @property
    def dummy_prefix_bytes(self) -> np.ndarray | None:
        """None, or int64 array (vocab_size,): bytes of each id that are the tokenizer's own dummy
        prefix, not text, when the id opens a document (1 for SentencePiece pieces starting with
        "▁"). A token opens a document at the start of a stream and right after [EOS]."""
        return None

    def count_bytes(self, ids: Sequence[int] | np.ndarray, opens_document: bool = True) -> int:
        """The exact UTF-8 bytes of the text a token stream stands for: `token_byte_lengths`
        summed, less the dummy prefix of every token that opens a document (the first one when
        `opens_document`, and each one after [EOS])."""
        ids = np.asarray(ids, dtype=np.int64)
        if not ids.size:
            return 0
        total = int(self.token_byte_lengths[ids].sum())
        prefix = self.dummy_prefix_bytes
        if prefix is not None:
            starts = np.empty(ids.size, dtype=bool)
            starts[0] = opens_document
            np.equal(ids[:-1], self.eos_id, out=starts[1:])
            total -= int(prefix[ids[starts]].sum())
        return total

    @property
    def special_ids(self) -> tuple[int, int, int]:
        return (self.pad_id, self.mask_id, self.eos_id)

    @cached_property
    def regular_ids(self) -> np.ndarray:
        """Every id that is not a special token (MLM draws its random replacements from these)."""
        keep = np.ones(self.vocab_size, dtype=bool)
        keep[list(self.special_ids)] = False
        return np.flatnonzero(keep)

    @cached_property
    def identity(self) -> str:
        """A hash of the tokenizer's definition: equal identities encode every text identically."""
        return hashlib.blake2b(self.to_json().encode(), digest_size=16).hexdigest()

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts; subclasses override with something faster than a Python loop."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `tokenizer.json` into the folder `path` (or to `path` itself if it ends in .json)."""
        path = Path(path)
        target = path if path.suffix == ".json" else path / TOKENIZER_FILE
        atomic_write_text(target, self.to_json())
        return target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------
# bytes


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the bytes of the UTF-8 text; then [PAD]=256, [MASK]=257, [EOS]=258."""

    kind = "byte"
    pad_id, mask_id, eos_id = 256, 257, 258

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        # Decoding a slice may cut a multi-byte character: those bytes become U+FFFD, never an error.
        out, run = [], bytearray()
        for i in (int(x) for x in ids):
            if i < 256:
                run.append(i)
                continue
            if not skip_special:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(SPECIAL_TOKENS[i - 256])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    @cached_property
    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[256:] = 0
        return lengths

    def to_json(self) -> str:
        return json.dumps(
            {"stackwise_tokenizer": "byte", "vocab_size": 259, "specials": _special_map(self)}, indent=2
        )


# --------------------------------------------------------------------------------------------
# byte-level BPE


class BPETokenizer(Tokenizer):
    """Byte-level BPE from HF `tokenizers`: every text encodes, and decoding gives it back exactly.

    Any byte-level `tokenizer.json` works, ours or a pretrained model's (GPT-2, Qwen2, Llama 3).
    Its end-of-text token serves as [EOS] (`<|endoftext|>`, `</s>`, ..., or the `eos_token` of a
    `tokenizer_config.json` beside it); [PAD] and [MASK] are added as new ids when it lacks them,
    and `added` says which tokens were added (the vocabulary grows by as many).
    `from_file` hands SentencePiece-style files to `SentencePieceTokenizer`.
    """

    kind = "bpe"  # an HF tokenizer.json (byte-level or SentencePiece style; `style` says which)
    style = "byte-level"

    def __init__(self, hf: Any, source: str = "<memory>", eos_token: str | None = None):
        self.hf = hf
        # Text that happens to contain "[MASK]" must stay text: otherwise a document could inject a
        # special id, and decoding (which drops specials) would no longer give the text back.
        self.hf.encode_special_tokens = True
        self.source = source
        self._check()
        self.added: list[str] = []
        eos = self._find(eos_token, _EOS_NAMES, "[EOS]")
        pad = self._find(None, _PAD_NAMES, "[PAD]")
        mask = self._find(None, _MASK_NAMES, "[MASK]")
        self.pad_id, self.mask_id, self.eos_id = (hf.token_to_id(t) for t in (pad, mask, eos))
        if self.added:
            log.info("%s: added special token(s) %s as new ids", source, ", ".join(self.added))

    def _find(self, preferred: str | None, names: tuple[str, ...], ours: str) -> str:
        """The tokenizer's own token for a role, or `ours` added as a new special id."""
        for name in ((preferred,) if preferred else ()) + names:
            if self.hf.token_to_id(name) is not None:
                return name
        self.hf.add_special_tokens([ours])
        self.added.append(ours)
        return ours

    def _check(self) -> None:
        body = json.loads(self.hf.to_str())
        decoder = body.get("decoder") or {}
        if "ByteLevel" not in _types(decoder):
            raise DataError(
                f"{self.source}: only byte-level BPE and SentencePiece-style (byte fallback) tokenizers are "
                f"supported (decoder is {decoder.get('type')!r}, not 'ByteLevel'; no Metaspace or '▁' "
                "replacement either): bits per byte needs each token's exact bytes; use a byte-level "
                "tokenizer.json (GPT-2, Qwen2, Llama 3 style), a SentencePiece-style one (Llama 2, Mistral) "
                "or let stackwise train one",
                self.source,
            )

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on `texts` (documents, consumed once as a stream: the trainer keeps word counts,
        not the text); the vocabulary includes the 256 bytes and the 3 specials."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        # No normalizer and no prefix space: anything else would break the exact round trip.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            # Every byte gets a token even if the training text lacks it, so any text encodes.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, source=f"<BPE-{vocab_size} trained in memory>")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], text: str | None = None) -> BPETokenizer:
        """Load a `tokenizer.json` (`text`: its content, when the caller has already read it).
        Only a regular file is read: a FIFO or a device in its place is a DataError, not a hang."""
        from tokenizers import Tokenizer as HFTokenizer

        if text is None:
            text = _read_tokenizer_text(Path(path))
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise DataError(
                f"{path}: not a valid tokenizer.json ({err}); point data.tokenizer.path at a tokenizers file",
                path,
            ) from None
        if cls is BPETokenizer and _sentencepiece_style(json.loads(hf.to_str())):
            cls = SentencePieceTokenizer
        return cls(hf, source=str(path), eos_token=_configured_eos(Path(path)))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [
            np.asarray(e.ids, dtype=np.int64)
            # encode_batch_fast: no character offsets (never used here), on all cores like encode_batch.
            for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        ]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def to_json(self) -> str:
        return self.hf.to_str()

    @cached_property
    def token_byte_lengths(self) -> np.ndarray:
        alphabet = _byte_level_alphabet()
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        added = self.hf.get_added_tokens_decoder()
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if i in added:
                lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            elif alphabet.issuperset(token):
                lengths[i] = len(token)  # one character of a byte-level token is one byte
            else:
                raise DataError(
                    f"{self.source}: token {token!r} (id {i}) is not byte-level; use a byte-level BPE tokenizer",
                    self.source,
                )
        return lengths


class SentencePieceTokenizer(BPETokenizer):
    """A SentencePiece-style `tokenizer.json` with byte fallback, as Llama 2 and Mistral ship it:
    spaces written "▁" (normalizer Replace(" ", "▁"), with Prepend("▁") in the legacy form, or a
    Metaspace pre-tokenizer), a BPE or Unigram model whose `<0xNN>` tokens spell any byte the
    vocabulary lacks.

    Byte lengths are exact: "▁" is one byte (a space), `<0xNN>` one byte, any other piece its UTF-8
    length. Where the tokenizer prepends a "▁" to the text (SentencePiece's dummy prefix), it is
    prepended always, as SentencePiece does (HF's Metaspace skips it when the text starts with a
    space, and then cannot give that space back): the first token of every document carries it,
    `dummy_prefix_bytes` marks it, and decoding drops it. So `decode(encode(text)) == text` and
    `count_bytes(encode(text)) == len(text.encode())` for every text without a literal "▁"
    (U+2581), which SentencePiece itself reads as a space.

    Decoding is done here, piece by piece (HF's Metaspace decoder drops every "▁" of the first
    token, not only the prefix); a token right after [EOS] opens a document and loses its prefix too.
    """

    style = "sentencepiece"

    def __init__(self, hf: Any, source: str = "<memory>", eos_token: str | None = None):
        super().__init__(hf, source, eos_token)
        self._self_test()

    def _check(self) -> None:
        body = json.loads(self.hf.to_str())
        model = body.get("model") or {}
        problem = None
        if model.get("type") not in ("BPE", "Unigram"):
            problem = f"its model is {model.get('type')!r}, not BPE or Unigram"
        elif not model.get("byte_fallback"):
            problem = "its model has no byte fallback, so a character outside the vocabulary becomes <unk>"
        else:
            normalizers = _parts(body.get("normalizer"), "normalizers")
            pre_tokenizers = _parts(body.get("pre_tokenizer"), "pretokenizers")
            bad_norm = [n.get("type") for n in normalizers if not _sp_normalizer(n)]
            bad_pre = [p.get("type") for p in pre_tokenizers if p.get("type") not in _SP_PRE_TOKENIZERS]
            if bad_norm:
                problem = f"its normalizer {bad_norm[0]!r} changes the text (only Prepend('▁') and Replace(' ', '▁') keep it)"
            elif bad_pre:
                problem = f"its pre-tokenizer {bad_pre[0]!r} is not one that keeps the text"
            else:
                meta = [p for p in pre_tokenizers if p.get("type") == "Metaspace"]
                self.prepends = any(n.get("type") == "Prepend" for n in normalizers) or any(
                    p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
                    for p in meta
                )
                if self.prepends and self.hf.token_to_id(_SPACE) is None:
                    problem = "it prepends '▁' but has no '▁' token"
        if problem:
            raise DataError(
                f"{self.source}: this SentencePiece-style tokenizer cannot be used: {problem}; bits per byte "
                "needs every text encoded exactly (Llama 2 / Mistral style files work)",
                self.source,
            )

    @cached_property
    def _encoder(self) -> Any:
        """The tokenizer with its own prefix switched off: `encode` prepends the space itself."""
        from tokenizers import Tokenizer as HFTokenizer

        if not self.prepends:
            return self.hf
        body = json.loads(self.hf.to_str())
        normalizer = body.get("normalizer")
        if normalizer and normalizer.get("type") == "Prepend":
            body["normalizer"] = None
        elif normalizer and normalizer.get("type") == "Sequence":
            normalizer["normalizers"] = [n for n in normalizer["normalizers"] if n.get("type") != "Prepend"]
        for p in _parts(body.get("pre_tokenizer"), "pretokenizers"):
            if p.get("type") == "Metaspace":
                p["prepend_scheme"] = "never"
                p.pop("add_prefix_space", None)
        encoder = HFTokenizer.from_str(json.dumps(body))
        encoder.encode_special_tokens = True
        return encoder

    def _prepared(self, text: str) -> str:
        # " " becomes "▁": the dummy prefix, always there, as SentencePiece's add_dummy_prefix.
        return " " + text if self.prepends else text

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self._encoder.encode(self._prepared(text), add_special_tokens=False).ids

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        encoded = self._encoder.encode_batch_fast([self._prepared(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids if t else [], dtype=np.int64) for t, e in zip(texts, encoded, strict=True)]

    @cached_property
    def _pieces(self) -> tuple[list[bytes | None], np.ndarray]:
        """Per id: the bytes it decodes to (None for a special token), and whether it starts
        with "▁" (the place a dummy prefix can be)."""
        pieces: list[bytes | None] = [None] * self.vocab_size
        opens = np.zeros(self.vocab_size, dtype=bool)
        added = self.hf.get_added_tokens_decoder()
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if i in added:
                pieces[i] = None if added[i].special else added[i].content.encode("utf-8")
            elif (m := _BYTE_TOKEN.fullmatch(token)) is not None:
                pieces[i] = bytes([int(m.group(1), 16)])
            else:
                pieces[i] = token.replace(_SPACE, " ").encode("utf-8")
                opens[i] = token.startswith(_SPACE)
        return pieces, opens

    @cached_property
    def token_byte_lengths(self) -> np.ndarray:
        pieces, _ = self._pieces
        return np.array([0 if p is None else len(p) for p in pieces], dtype=np.int64)

    @cached_property
    def _prefix(self) -> np.ndarray | None:
        return self._pieces[1].astype(np.int64) if self.prepends else None

    @property
    def dummy_prefix_bytes(self) -> np.ndarray | None:
        return self._prefix

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        pieces, opens = self._pieces
        out = bytearray()
        at_start = True
        for i in (int(x) for x in ids):
            piece = pieces[i]
            if piece is None:  # a special token
                if not skip_special:
                    out += (self.hf.id_to_token(i) or "").encode("utf-8")
                at_start = at_start or i == self.eos_id
                continue
            out += piece[1:] if at_start and self.prepends and opens[i] else piece
            at_start = False
        return out.decode("utf-8", errors="replace")

    def _self_test(self) -> None:
        for probe in _PROBES:
            ids = self.encode(probe)
            back, counted = self.decode(ids), self.count_bytes(ids)
            if back != probe or counted != len(probe.encode("utf-8")):
                raise DataError(
                    f"{self.source}: this SentencePiece-style tokenizer does not encode text exactly "
                    f"({probe!r} decodes to {back!r}, {counted} bytes counted for {len(probe.encode())}); "
                    "bits per byte needs an exact round trip",
                    self.source,
                )


_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SP_PRE_TOKENIZERS = frozenset({"Metaspace", "Split", "Digits", "Punctuation"})  # none of them drops text
_PROBES = ("Hello, world!", "  two leading spaces,\ttabs\nand lines ", "naïve café, 日本語, 🙂 and \x00")


def _types(section: Any) -> set[Any]:
    """The `type` of a tokenizer.json section and of the parts of a Sequence."""
    if not isinstance(section, dict):
        return set()
    parts = [d for key in ("decoders", "normalizers", "pretokenizers") for d in section.get(key) or []]
    return {section.get("type")} | {d.get("type") for d in parts if isinstance(d, dict)}


def _parts(section: Any, key: str) -> list[dict]:
    """The steps of a normalizer / pre-tokenizer section: itself, or its Sequence's parts."""
    if not isinstance(section, dict):
        return []
    if section.get("type") == "Sequence":
        return [d for d in section.get(key) or [] if isinstance(d, dict)]
    return [section]


def _sp_normalizer(step: dict) -> bool:
    if step.get("type") == "Prepend":
        return step.get("prepend") == _SPACE
    if step.get("type") == "Replace":
        return (step.get("pattern") or {}).get("String") == " " and step.get("content") == _SPACE
    return False


def _sentencepiece_style(body: dict) -> bool:
    """A tokenizer.json that writes spaces as "▁" (and is not byte-level)."""
    if "ByteLevel" in _types(body.get("decoder")) | _types(body.get("pre_tokenizer")):
        return False
    return "Metaspace" in _types(body.get("pre_tokenizer")) or any(
        n.get("type") == "Replace" and n.get("content") == _SPACE for n in _parts(body.get("normalizer"), "normalizers")
    )


# A pretrained tokenizer's own tokens for the three roles, in order of preference.
_EOS_NAMES = ("[EOS]", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>")
_MASK_NAMES = ("[MASK]", "<mask>", "<|mask|>")


def _configured_eos(path: Path) -> str | None:
    """The `eos_token` of a `tokenizer_config.json` next to the tokenizer file, if any (an
    unreadable or malformed one is ignored; a FIFO or device in its place is refused, named)."""
    config_path = path.parent / "tokenizer_config.json"
    if not config_path.exists():
        return None
    try:
        config = json.loads(read_regular(config_path, "tokenizer", "remove it or replace it with a regular file"))
    except DataError as err:
        if config_path.is_file():  # a regular file we could not read: ignored as before
            return None
        raise err from None
    except (ValueError, RecursionError):
        return None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    if isinstance(eos, dict):  # the AddedToken form
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def _byte_level_alphabet() -> frozenset[str]:
    """The 256 printable characters byte-level BPE uses for the 256 bytes (one character = one byte)."""
    from tokenizers import pre_tokenizers

    return frozenset(pre_tokenizers.ByteLevel.alphabet())


# --------------------------------------------------------------------------------------------
# dummy (random data)


class DummyTokenizer(Tokenizer):
    """For `data.use_dummy_data`: ids have no text; the last three ids are the specials.

    Each regular id counts as one byte, so bits per byte on dummy data equals bits per token.
    """

    kind = "dummy"

    def __init__(self, vocab_size: int):
        if vocab_size < 8:
            raise DataError(
                f"model.vocab_size={vocab_size} is too small for dummy data; use at least 8 (3 ids are special)"
            )
        self._vocab_size = vocab_size
        self.pad_id, self.mask_id, self.eos_id = vocab_size - 3, vocab_size - 2, vocab_size - 1

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        # "<12><7>" round-trips through decode; anything else has no meaning here.
        return [int(p) for p in text.replace(">", " ").replace("<", " ").split()]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        specials = dict(zip(self.special_ids, SPECIAL_TOKENS, strict=True))
        return "".join(
            specials.get(i, f"<{i}>") for i in map(int, ids) if not (skip_special and i in specials)
        )

    @cached_property
    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[list(self.special_ids)] = 0
        return lengths

    def to_json(self) -> str:
        body = {"stackwise_tokenizer": "dummy", "vocab_size": self.vocab_size, "specials": _special_map(self)}
        return json.dumps(body, indent=2)


def _special_map(tok: Tokenizer) -> dict[str, int]:
    return dict(zip(SPECIAL_TOKENS, tok.special_ids, strict=True))


# --------------------------------------------------------------------------------------------
# loading and building


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a `tokenizer.json` (HF byte-level BPE, or stackwise's byte/dummy description)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.exists():
        raise DataError(
            f"{path}: tokenizer file not found; fix data.tokenizer.path or remove it to train one", path
        )
    text = _read_tokenizer_text(path)
    try:
        head = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not a JSON tokenizer file ({err}); point data.tokenizer.path at a tokenizer.json", path
        ) from None
    except RecursionError:
        raise DataError(
            f"{path}: JSON nested too deeply to read (more than about {sys.getrecursionlimit()} levels); "
            "not a tokenizer.json: point data.tokenizer.path at one",
            path,
        ) from None
    kind = head.get("stackwise_tokenizer") if isinstance(head, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "dummy":
        return DummyTokenizer(int(head["vocab_size"]))
    return BPETokenizer.from_file(path, text)


def _read_tokenizer_text(path: Path) -> str:
    """The text of a tokenizer file: a regular file (never a FIFO or device), UTF-8."""
    data = read_regular(path, "data.tokenizer.path", "point it at a tokenizer.json file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not a JSON tokenizer file ({err}); point data.tokenizer.path at a tokenizer.json", path
        ) from None


def bpe_cache_key(train_texts: Sequence[str], vocab_size: int) -> str:
    """Hash of everything a trained BPE depends on: the training text, the size and the recipe."""
    import tokenizers

    digest = hashlib.blake2b(
        f"{BPE_RECIPE}\0{tokenizers.__version__}\0{vocab_size}\0".encode(), digest_size=16
    )
    for text in train_texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: document boundaries count
        digest.update(data)
    return digest.hexdigest()


def build_tokenizer(
    data_config: DataConfig,
    train_texts: Sequence[str],
    cache_dir: str | os.PathLike[str] | None = None,
    save_dir: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """The run's tokenizer: loaded from `data.tokenizer.path`, the byte tokenizer, or a BPE trained
    on `train_texts` (the training split only, in memory) and cached so the next run does not
    retrain. With `save_dir`, its `tokenizer.json` is written there too. Corpora too large for
    memory go through `stackwise.data.pipeline`, which trains on a streamed sample (`cached_bpe`).
    """
    settings = data_config.tokenizer
    if settings.path:
        tokenizer = load_tokenizer(settings.path)
    elif settings.kind == "byte":
        tokenizer = ByteTokenizer()
    else:
        tokenizer = cached_bpe(settings.vocab_size, bpe_cache_key(train_texts, settings.vocab_size),
                               lambda: train_texts, resolve_cache_dir(cache_dir or data_config.cache_dir))
    if save_dir is not None:
        tokenizer.save(save_dir)
    return tokenizer


def cached_bpe(vocab_size: int, key: str, texts: Callable[[], Iterable[str]], cache_dir: Path) -> BPETokenizer:
    """The BPE tokenizer cached under `key` (everything it depends on, hashed), trained on
    `texts()` (a stream) on a miss."""
    path = cache_dir / "tokenizers" / f"bpe-{vocab_size}-{key[:24]}.json"
    if path.is_file():
        try:
            return BPETokenizer.from_file(path)
        except DataError as err:  # a damaged cache entry is rebuilt, not fatal
            log.warning("ignoring damaged cached tokenizer: %s", err)
    ensure_writable(path.parent, "saving the trained BPE tokenizer")  # before training, not after
    tokenizer = BPETokenizer.train(texts(), vocab_size)
    if tokenizer.vocab_size < vocab_size:
        log.info(
            "BPE stopped at %d tokens (asked for %d): the training text has no more frequent pairs",
            tokenizer.vocab_size,
            vocab_size,
        )
    try:
        tokenizer.save(path)
    except OSError as err:
        raise cache_error(path.parent, err, "saving the trained BPE tokenizer") from None
    tokenizer.source = str(path)
    return tokenizer


def check_vocab(model_vocab: int | None, tokenizer_vocab: int) -> int:
    """The model's vocabulary size: `model.vocab_size` if set (it must hold every tokenizer id),
    else the tokenizer's. A larger model vocabulary is allowed (e.g. padded to a multiple of 64)."""
    if model_vocab is None:
        return tokenizer_vocab
    if model_vocab < tokenizer_vocab:
        raise DataError(
            f"model.vocab_size={model_vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab} ids); "
            f"set model.vocab_size to at least {tokenizer_vocab}, or leave it unset to use the tokenizer's size"
        )
    return model_vocab
