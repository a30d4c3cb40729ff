"""Tiny random causal LMs for tests, saved with save_pretrained and loaded back from disk."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

VOCAB = 12
EOS = 1
PAD = 0

ARCHITECTURES = ("gpt2", "llama", "qwen2")


def tiny_config(arch: str, vocab: int = VOCAB, hidden: int = 16, layers: int = 2):
    common = dict(vocab_size=vocab, bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_positions=64, **common)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **common)
    raise ValueError(arch)


def tiny_model(arch: str, directory: Path, *, dtype=torch.float32, seed: int = 0, vocab: int = VOCAB,
               hidden: int = 16, layers: int = 2, init_std: float | None = None):
    """Build from config with random weights, save, and load back (the real loading path)."""
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab, hidden, layers)
    if init_std is not None:
        config.initializer_range = init_std
    model = AutoModelForCausalLM.from_config(config)
    path = Path(directory) / f"{arch}-{seed}"
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def add_lora(model, r: int = 4, seed: int = 0):
    """A peft LoRA wrapper whose B matrices are random (not zero) so every derivative is exercised."""
    from peft import LoraConfig, get_peft_model

    targets = ["c_attn", "c_fc"] if model.config.model_type == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.1))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return peft_model


@contextlib.contextmanager
def float64_rmsnorm():
    """HF Llama/Qwen2 RMSNorm casts to float32 even in a float64 model (docs/method.md §9); for float64
    references, compute it in the input dtype. The function is otherwise the same."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    classes = (modeling_llama.LlamaRMSNorm, modeling_qwen2.Qwen2RMSNorm)
    originals = [c.forward for c in classes]
    for c in classes:
        c.forward = forward
    try:
        yield
    finally:
        for c, f in zip(classes, originals):
            c.forward = f


def random_step(model, scale: float = 1e-3, seed: int = 0):
    """(base, delta): θ₀ snapshot and a random Δθ over the model's trainable parameters.

    Drawn from a private generator, so the global RNG is not touched."""
    gen = torch.Generator().manual_seed(seed)
    base, delta = {}, {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            base[name] = p.detach().clone()
            delta[name] = scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
    return base, delta
