"""Running probe passes on a user's model without changing anything about it.

``probe_mode`` puts the model in eval mode (no dropout), switches gradient checkpointing off
(it does not compose with torch.func transforms) and snapshots the global RNG; on exit it
restores each module's own train flag, the checkpointing flags and the RNG exactly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Iterator

import torch
from torch import Tensor


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def left_padded_positions(attention_mask: Tensor) -> Tensor:
    """Position ids under left padding: each sequence's first real token is position 0 (pads 0 too)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def forward_kwargs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                   keep_last: int | None = None) -> dict:
    """Keyword arguments for a causal-LM forward (or its decoder's) with explicit positions.

    GPT-2 needs explicit position ids under left padding (docs/method.md §9); ``keep_last`` asks the
    model to apply its LM head to the last positions only, where it supports ``logits_to_keep``.
    """
    accepted = _forward_parameters(type(hf_model(model)))
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "position_ids" in accepted:
        kwargs["position_ids"] = position_ids
    if keep_last is not None and "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = keep_last
    return kwargs


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """The KV cache argument under the name this transformers version uses (``cache`` from 5.x
    on, ``past_key_values`` before)."""
    accepted = _forward_parameters(type(hf_model(model)))
    return {"cache" if "cache" in accepted else "past_key_values": cache}


def returned_cache(output):
    return output.cache if hasattr(output, "cache") else output.past_key_values


def _is_input_grad_hook(hook) -> bool:
    # transformers' enable_input_require_grads (called by gradient_checkpointing_enable and
    # peft's prepare_model_for_kbit_training) hooks the input embeddings to call
    # requires_grad_(True) on their output, which torch.func transforms refuse.
    return "make_inputs_require_grads" in getattr(hook, "__qualname__", "")


@contextlib.contextmanager
def preserved_rng(device: torch.device | None = None) -> Iterator[None]:
    """Restore the global CPU RNG (and the CUDA RNG of ``device``) on exit."""
    cpu_state = torch.get_rng_state()
    cuda_state = None
    if device is not None and device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(device)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


@contextlib.contextmanager
def probe_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no gradient checkpointing (nor its input-grad hook), global RNG preserved;
    all restored on exit."""
    modules = list(model.modules())
    training = [m.training for m in modules]
    checkpointing = [(m, m.gradient_checkpointing) for m in modules
                     if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    # Modules carrying the input-grad hook, with their whole hook dict so order is restored.
    hooked = [(m, dict(m._forward_hooks)) for m in modules
              if any(_is_input_grad_hook(h) for h in m._forward_hooks.values())]
    device = next(model.parameters()).device
    try:
        with preserved_rng(device):
            model.eval()
            for m, _ in checkpointing:
                m.gradient_checkpointing = False
            for m, hooks in hooked:
                for key, hook in hooks.items():
                    if _is_input_grad_hook(hook):
                        del m._forward_hooks[key]
            yield
    finally:
        for m, flag in zip(modules, training):
            m.training = flag
        for m, flag in checkpointing:
            m.gradient_checkpointing = flag
        for m, hooks in hooked:
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)
