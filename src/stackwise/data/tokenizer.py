"""Tokenizers: raw bytes, byte-level BPE (HF `tokenizers`), and the dummy one for random data.

Every tokenizer has the three special tokens [PAD], [MASK] and [EOS] ([EOS] separates documents)
and knows, for each id, the exact number of UTF-8 bytes it decodes to (0 for specials), which is
what makes bits per byte exact and comparable across tokenizers.

A run directory always holds a `tokenizer.json`: the HF file for BPE, a small stackwise JSON for
the byte and dummy tokenizers. `load_tokenizer` reads either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
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
    """

    kind = "bpe"

    def __init__(self, hf: Any, source: str = "<memory>", eos_token: str | None = None):
        self.hf = hf
        # Text that happens to contain "[MASK]" must stay text: otherwise a document could inject a
        # special id, and decoding (which drops specials) would no longer give the text back.
        self.hf.encode_special_tokens = True
        self.source = source
        self._check_byte_level()
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

    def _check_byte_level(self) -> None:
        body = json.loads(self.hf.to_str())
        decoder = body.get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or [] if isinstance(d, dict)}
        if "ByteLevel" not in kinds:
            raise DataError(
                f"{self.source}: only byte-level BPE tokenizers are supported (decoder is "
                f"{decoder.get('type')!r}, not 'ByteLevel'): bits per byte needs each token's exact bytes; "
                "use a byte-level tokenizer.json (GPT-2, Qwen2, Llama 3 style) or let stackwise train one",
                self.source,
            )

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> BPETokenizer:
        """Train on `texts` (documents); the vocabulary includes the 256 bytes and the 3 specials."""
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
        return cls(hf, source=str(path), eos_token=_configured_eos(Path(path)))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [
            np.asarray(e.ids, dtype=np.int64)
            for e in self.hf.encode_batch(list(texts), add_special_tokens=False)
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
    on `train_texts` (the training split only) and cached so the next run does not retrain.
    With `save_dir`, its `tokenizer.json` is written there too.
    """
    settings = data_config.tokenizer
    if settings.path:
        tokenizer = load_tokenizer(settings.path)
    elif settings.kind == "byte":
        tokenizer = ByteTokenizer()
    else:
        tokenizer = _cached_bpe(
            train_texts, settings.vocab_size, resolve_cache_dir(cache_dir or data_config.cache_dir)
        )
    if save_dir is not None:
        tokenizer.save(save_dir)
    return tokenizer


def _cached_bpe(train_texts: Sequence[str], vocab_size: int, cache_dir: Path) -> BPETokenizer:
    key = bpe_cache_key(train_texts, vocab_size)
    path = cache_dir / "tokenizers" / f"bpe-{vocab_size}-{key[:24]}.json"
    if path.is_file():
        try:
            return BPETokenizer.from_file(path)
        except DataError as err:  # a damaged cache entry is rebuilt, not fatal
            log.warning("ignoring damaged cached tokenizer: %s", err)
    ensure_writable(path.parent, "saving the trained BPE tokenizer")  # before training, not after
    tokenizer = BPETokenizer.train(train_texts, vocab_size)
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
