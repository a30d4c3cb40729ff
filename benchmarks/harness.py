"""What the benchmark scripts share: the random Llama, a random step, a timer, quiet output."""

from __future__ import annotations

import sys
import time
import warnings
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_llama(*, vocab: int, hidden: int, layers: int, heads: int, max_positions: int, seed: int,
                 device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """A Llama-style model with random weights (no download), in eval mode.

    Its vocabulary has one id more than ``vocab``: id ``vocab`` is the EOS the benchmarks pass,
    and its logit is lowered by 40 (a hook on the LM head), so it is never drawn (p ~ 1e-17)
    and every response runs to full length: each pass runs at the nominal shape."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab + 1,
        hidden_size=hidden,
        intermediate_size=688 if hidden == 256 else 4 * hidden,  # Llama's 8/3·h rounded: 688 for h=256
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(128, max_positions),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=DTYPES[dtype]).eval()
    return _never_eos(model, vocab)


# Shapes of real models (their config.json), for --preset: the same widths, heads, KV heads,
# MLP and vocabulary, random weights. A --layers given on the command line overrides the depth
# (a CPU run of the full 0.5B shape in float64 takes minutes per forward).
PRESETS = {
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936),
    "qwen2.5-1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936),
}


def random_qwen2(preset: str, *, layers: int | None, max_positions: int, seed: int, device: str = "cpu",
                 dtype: str = "float32") -> torch.nn.Module:
    """A Qwen2 model (q/k/v biases, RMSNorm, SwiGLU, GQA, tied embeddings) of a preset's shape with
    random weights, in eval mode. As in ``random_llama``, the last vocabulary id is an EOS that
    is never drawn (its logit lowered by 40)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = PRESETS[preset]
    config = Qwen2Config(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=layers or shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(128, max_positions),
        bos_token_id=1, eos_token_id=shape["vocab"] - 1, pad_token_id=0, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype]).eval()
    return _never_eos(model, shape["vocab"] - 1)


def _never_eos(model: torch.nn.Module, eos: int) -> torch.nn.Module:
    head = model.get_output_embeddings()
    never = torch.zeros(head.weight.shape[0], device=head.weight.device, dtype=head.weight.dtype)
    never[eos] = -40.0
    head.register_forward_hook(lambda module, inputs, logits: logits + never)
    return model


def random_step(model: torch.nn.Module, step_size: float, seed: int):
    """(θ₀, Δθ) with Δθ = step_size · N(0, 1) on every parameter."""
    gen = torch.Generator().manual_seed(seed)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = {n: (step_size * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype)
             for n, p in model.named_parameters()}
    return base, delta


def timer(device: str, clock: str = "wall") -> Callable[[Callable[[], object]], float]:
    """Seconds of one call (CUDA-synchronised; ``clock="cpu"``: this process's CPU time)."""
    now = time.process_time if clock == "cpu" else time.perf_counter

    def run(fn: Callable[[], object]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = now()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return now() - start
    return run


def prepare(threads: int | None, device: str) -> int | None:
    """Quiet library warnings, set the thread count; an exit code when the device is missing."""
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    if threads is not None:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    return None


def add_model_arguments(p) -> None:
    """--hidden --layers --heads --vocab: the random Llama's shape."""
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size")


def add_run_arguments(p, dtype: bool = True) -> None:
    """--device [--dtype] --threads --clock --seed."""
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    if dtype:
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared CPU, cpu device only)")
    p.add_argument("--seed", type=int, default=0)


def check_run_arguments(p, args) -> None:
    """Parser errors for run-flag combinations that make no sense."""
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu only makes sense with --device cpu")
