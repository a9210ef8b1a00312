"""Tiny random Hugging Face models and tokenizers for the interop tests (none can be downloaded
here): `transformers` builds them in a temporary folder, `tokenizers` trains their tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = [v for _, v in sorted(__import__("pydoc_data.topics", fromlist=["topics"]).topics.items())]


def byte_level_tokenizer(path: Path, vocab_size: int = 400, specials: tuple[str, ...] = ("<|endoftext|>",)) -> Path:
    """A GPT-2 / Qwen2-style byte-level BPE file with only its own end-of-text special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(TEXT[:150], trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    hf.save(str(path))
    return path


def hf_model(folder: Path, family: str = "llama", layers: int = 4, tied: bool = False, seed: int = 0,
             max_shard_size: str | None = None, **extra):
    """Save a tiny random `family` causal LM with a byte-level tokenizer into `folder`; returns the
    transformers model (eval mode, fp32)."""
    import transformers

    tok = byte_level_tokenizer(folder / "tokenizer.json")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok)).get_vocab_size()
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config}[family]
    settings = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=tied, rms_norm_eps=1e-6, rope_theta=5000.0)
    settings.update(extra)
    torch.manual_seed(seed)
    model_class = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                   "qwen2": transformers.Qwen2ForCausalLM}[family]
    model = model_class(config_class(**settings)).eval()
    with torch.no_grad():  # random norms and biases too, so a mapping mistake cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


def text_ids(tokenizer, n: int = 48, doc: int = 3) -> torch.Tensor:
    """(1, n) ids of real text."""
    return torch.tensor([tokenizer.encode(TEXT[doc])[:n]])
