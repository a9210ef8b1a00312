"""The data plane: corpora (in every file form: formats.py, token_files.py), tokenizers, the token
cache and the training objectives; preparation is the one-way pipeline of pipeline.py."""

from stackwise.data.batch import Batch
from stackwise.data.cache import resolve_cache_dir
from stackwise.data.corpus import (
    BUILTIN_NAME,
    Corpus,
    CorpusSource,
    CorpusSplit,
    Document,
    builtin_corpus,
    load_corpus,
    open_corpus,
    split_corpus,
)
from stackwise.data.documents import DocumentPlan, plan_documents
from stackwise.data.dummy import dummy_token_splits
from stackwise.data.errors import DataError
from stackwise.data.objectives import ATTENTION_MODE, OBJECTIVES, Corrupted, clm, diffusion, mlm, stable_seed
from stackwise.data.pipeline import corpus_tokenizer, prepare_tokens
from stackwise.data.token_cache import TokenSplits, load_token_splits, token_dtype, tokenize_documents
from stackwise.data.tokenizer import (
    SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    DummyTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    check_vocab,
    load_tokenizer,
)

__all__ = [
    "ATTENTION_MODE",
    "BUILTIN_NAME",
    "OBJECTIVES",
    "SPECIAL_TOKENS",
    "BPETokenizer",
    "Batch",
    "ByteTokenizer",
    "Corpus",
    "CorpusSource",
    "CorpusSplit",
    "Corrupted",
    "DataError",
    "Document",
    "DocumentPlan",
    "DummyTokenizer",
    "SentencePieceTokenizer",
    "TokenSplits",
    "Tokenizer",
    "build_tokenizer",
    "builtin_corpus",
    "check_vocab",
    "clm",
    "corpus_tokenizer",
    "diffusion",
    "dummy_token_splits",
    "load_corpus",
    "load_token_splits",
    "load_tokenizer",
    "mlm",
    "open_corpus",
    "plan_documents",
    "prepare_tokens",
    "resolve_cache_dir",
    "split_corpus",
    "stable_seed",
    "token_dtype",
    "tokenize_documents",
]
