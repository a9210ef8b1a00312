"""Deterministic stand-in data for `data.use_dummy_data: true`.

Uniform random tokens would leave a model nothing to learn, so a smoke test could not tell a
training loop that learns from one that does not. The dummy stream is instead a sequence of
"words": 1,024 fixed random token strings of 2 to 6 tokens, drawn with Zipf-like frequencies.
Inside a word the next token is fully determined, so the loss falls quickly below ln(vocab).
Everything comes from a fixed seed: the same vocabulary always gives the same tokens.
"""

from __future__ import annotations

import numpy as np

from stackwise.data.token_cache import TokenSplits, token_dtype
from stackwise.data.tokenizer import DummyTokenizer

N_TRAIN_TOKENS = 1 << 20
N_VAL_TOKENS = 1 << 16
_N_WORDS = 1024
_SEED = 20240607


def dummy_token_splits(
    tokenizer: DummyTokenizer, n_train: int = N_TRAIN_TOKENS, n_val: int = N_VAL_TOKENS
) -> TokenSplits:
    """Train and validation streams drawn from the same word list (so validation is learnable too)."""
    rng = np.random.default_rng([_SEED, tokenizer.vocab_size])
    lengths = rng.integers(2, 7, size=_N_WORDS)
    spelling = rng.choice(tokenizer.regular_ids, size=int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    weights = 1.0 / np.arange(1, _N_WORDS + 1)
    probs = weights / weights.sum()
    dtype = token_dtype(tokenizer.vocab_size)

    def stream(n: int, stream_id: int) -> np.ndarray:
        words = np.random.default_rng([_SEED, tokenizer.vocab_size, stream_id]).choice(
            _N_WORDS, size=n // 2 + 1, p=probs
        )
        lens = lengths[words]  # every word has >= 2 tokens, so n // 2 + 1 words cover n tokens
        first = np.cumsum(lens) - lens  # position of each word's first token in the output
        index = np.repeat(starts[words] - first, lens) + np.arange(int(lens.sum()))
        return spelling[index][:n].astype(dtype)

    return TokenSplits(
        stream(n_train, 1), stream(n_val, 2), n_train, n_val, f"dummy data (vocab {tokenizer.vocab_size})"
    )
