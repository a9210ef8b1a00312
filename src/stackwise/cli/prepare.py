"""`stackwise prepare CONFIG`: the data pipeline alone (documents → tokens → shards) for every
corpus a config's phases read, so that a large corpus is prepared once, ahead of training, and
shared by the runs that use it (they find its shards in the token cache)."""

from __future__ import annotations

from stackwise.data.token_cache import TokenSplits
from stackwise.training.loader import ProgressiveDataLoader


def prepare_report(loader: ProgressiveDataLoader) -> str:
    """What was prepared: the tokenizer, then one block per corpus."""
    tok = loader.tokenizer
    where = getattr(tok, "source", "")
    lines = [f"tokenizer: {tok.kind}, {tok.vocab_size:,} ids" + (f" ({where})" if where and not where.startswith("<") else "")]
    for splits in _unique(loader.prepared_streams()):
        lines += [
            f"corpus: {splits.name}",
            f"  train: {splits.train_docs:,} documents, {splits.train_bytes:,} bytes, {len(splits.train):,} tokens",
            f"  validation: {splits.val_docs:,} documents, {splits.val_bytes:,} bytes, {len(splits.val):,} tokens",
        ]
        if splits.train_file:
            lines.append(f"  shards: {splits.train_file.rsplit('/', 1)[0]}")
    return "\n".join(lines)


def _unique(streams: list[TokenSplits]) -> list[TokenSplits]:
    seen, out = set(), []
    for s in streams:
        if (s.key or id(s)) not in seen:
            seen.add(s.key or id(s))
            out.append(s)
    return out
