"""Building the policy: a tiny random Llama for the embedded default, or a local HF directory,
optionally wrapped in a peft LoRA adapter. Nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .tokenizer import build_tokenizer


@dataclass(frozen=True)
class TinyModelOptions:
    """Shape of the random Llama used when no ``pretrained_path`` is given."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_positions: int = 32
    seed: int = 0


@dataclass(frozen=True)
class LoraOptions:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def tiny_policy(options: TinyModelOptions):
    """(model, tokenizer): a random Llama over the toy tokenizer's vocabulary."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=options.hidden_size, intermediate_size=options.intermediate_size,
        num_hidden_layers=options.num_layers, num_attention_heads=options.num_heads,
        num_key_value_heads=options.num_heads, max_position_embeddings=options.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(options.seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def pretrained_policy(path: str):
    """(model, tokenizer) from a local Hugging Face directory (never the hub)."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"pretrained_path {path!r} is not a directory; point it at a local HF model folder")
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    model.train()  # from_pretrained returns eval mode; training uses the model's own dropout settings
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def with_lora(model, options: LoraOptions):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(options.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)
