"""Building the policy: a tiny random Llama for the embedded default (a local pretrained model is
loaded by ``entropy_callbacks.pretrained``), optionally wrapped in a peft LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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


def with_lora(model, options: LoraOptions):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(options.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)
