"""Tiny random models for tests and examples (vocabulary as small as 8), saved as real HF directories."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_config(model_type: str = "qwen2", vocab_size: int = 8, seed: int = 0, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}[model_type]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if model_type == "mistral":
        kwargs["sliding_window"] = 4096
    kwargs.update(overrides)
    return cls(**kwargs)


def make_tiny_model(
    directory: str | Path,
    model_type: str = "qwen2",
    vocab_size: int = 8,
    seed: int = 0,
    init_scale: float = 1.0,
    with_tokenizer: bool = False,
    **overrides,
) -> Path:
    """Create and save a random model; `init_scale` widens the logits so distributions are not near-uniform."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, vocab_size, seed, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.normal_(0.0, 0.2 * init_scale)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    if with_tokenizer:
        save_tiny_tokenizer(directory, vocab_size)
    return directory


def save_tiny_tokenizer(directory: str | Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer whose tokens are the single letters a, b, c, ... (no merges), saved in
    HF layout, so text and token ids map one to one ("abc" <-> [0, 1, 2])."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    if vocab_size > len(letters):
        raise ValueError("the tiny tokenizer has at most 26 tokens")
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(letters[:vocab_size])}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(directory))
