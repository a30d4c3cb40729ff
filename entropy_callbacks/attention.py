"""The attention every probe pass runs (docs/method.md §9): softmax(q kᵀ·scale + mask) v written
out with matrix products, standing in for SDPA while a pass runs.

Why not SDPA itself: its fused kernels have no forward-AD rule, and its MATH kernel, the one
that has, repeats each key/value head for every query head sharing it and multiplies
[heads, L, d] by [heads, d, L] per sequence — on an H200 in float32 cuBLAS ran those products on
a small-matrix kernel at ~0.6 TFLOP/s, 12 ms each, more than the rest of a layer. Here the query
heads that share a key/value head are stacked along the rows (grouped-query attention), so each
product is one [rep·L, d] × [d, S] per key/value head: no repeated keys, rep times taller
matrices. Each row's result depends on its own sequence only, whatever the batch size, so
microbatching changes nothing; the ops are plain aten ops, which Taylor-mode jets
(``taylor``) and torch's forward AD both differentiate.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model_guard import hf_model

_FUSED_ONLY = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention", "paged_attention")
_UNSUPPORTED = ("softcap", "position_bias", "s_aux", "sinks")  # then SDPA (MATH kernel) runs as it would


def grouped_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, *, sdpa=None, **kwargs) -> tuple[Tensor, None]:
    """Hugging Face's attention-function interface: query [B, H, L, d], key/value [B, Hkv, S, d],
    a boolean (True: attend) or additive mask [B, 1 or H, L, S]; returns [B, L, H, d] and None.

    A fully masked row (a left-pad query, never read) attends to every key instead (``_additive``);
    every other row is bitwise what it was with masked_fill and ``_safe_softmax``.
    16-bit inputs are computed in float32 and the output rounded once, as fused kernels
    accumulate: with bf16 probabilities the per-sample losses of a bf16 model drifted from the
    gradient its own attention had given the optimizer (attribution's residual, 0.3 % → 1.2 %)."""
    if dropout > 0.0 or any(kwargs.get(name) is not None for name in _UNSUPPORTED):
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                    is_causal=is_causal, **kwargs)
    batch, heads, length, dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    rep = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and length > 1:
        # SDPA's is_causal: aligned top-left, keys cut to the queries (HF does the same)
        key, value, kv_length = key[:, :, :length], value[:, :, :length], length
        attention_mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    narrow = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else None
    if narrow is not None:
        query, key, value = query.float(), key.float(), value.float()
    q = (query * scale).reshape(batch, kv_heads, rep * length, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).view(batch, kv_heads, rep, length, kv_length)
    if attention_mask is not None:
        mask = _additive(attention_mask[..., :kv_length], scores.dtype)
        if mask.dim() == 4:  # [B, 1 or H, L or 1, S] onto [B, Hkv, rep, L, S]
            mask = mask[:, :, None] if mask.shape[1] == 1 else mask.unflatten(1, (kv_heads, rep))
        scores = scores + mask
    probs = torch.softmax(scores, -1)
    out = torch.matmul(probs.view(batch, kv_heads, rep * length, kv_length), value)
    out = out.view(batch, heads, length, value.shape[-1]).transpose(1, 2)
    return (out if narrow is None else out.to(narrow)).contiguous(), None


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean (True: attend) or additive mask as an additive one in which no query row is
    fully masked. A query that sees no key is a left-pad position: no other query attends to it
    and no logit is read there, so it may attend to every key instead. Plain softmax then needs
    no care for rows of −inf, and on the mask's size, not the scores': on a CPU, scores + mask
    and softmax took 0.28 + 1.45 ms where masked_fill and _safe_softmax took 0.90 + 3.87 ms
    (float64, 16 × 4 heads × 80 × 80)."""
    if mask.dtype == torch.bool:
        keep = mask | ~mask.any(-1, keepdim=True)
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
    return mask.to(dtype).masked_fill((mask == float("-inf")).all(-1, keepdim=True), 0.0)


def _interface():
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:  # transformers without the interface: models call SDPA directly
        return None
    return AttentionInterface


def fused_sdpa_is_exact(device: torch.device) -> bool:
    """Whether SDPA's fused kernel on ``device`` computes a pass as exactly as
    ``grouped_attention`` does, so that a pass that differentiates nothing may keep it. On a CPU
    it does: its flash kernel takes float64 and float32 and rounds in the input dtype, and it was
    7 % of a float64 value pass cheaper (Llama h256, E 16 × 80). On CUDA float64 has no fused
    kernel (SDPA would fall back to MATH, the slow kernel above), and whether the float32
    efficient kernel stays IEEE with TF32 allowed has not been measured here."""
    return device.type == "cpu"


@contextlib.contextmanager
def probe_attention(model: torch.nn.Module, *, differentiated: bool = True) -> Iterator[None]:
    """For the duration, a model configured for SDPA (or for a fused-only implementation, switched
    to "sdpa" meanwhile) runs ``grouped_attention``; a direct SDPA call runs on the MATH kernel.
    Everything is put back afterwards. The switch is Hugging Face's global registry entry, so
    another model running SDPA in this process at the same moment gets it too: the same
    function, to rounding.

    ``differentiated=False`` (a value pass): where ``fused_sdpa_is_exact``, SDPA keeps its fused
    kernel instead."""
    inner = hf_model(model)
    original = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    switch = original in _FUSED_ONLY and hasattr(inner, "set_attn_implementation")
    fused = not differentiated and fused_sdpa_is_exact(next(model.parameters()).device)
    interface = None if fused else _interface()
    sdpa = None if interface is None else interface._global_mapping.get("sdpa")
    if switch:
        inner.set_attn_implementation("sdpa")
    if sdpa is not None:
        interface._global_mapping["sdpa"] = lambda *args, **kwargs: grouped_attention(*args, sdpa=sdpa, **kwargs)
    try:
        with contextlib.nullcontext() if fused else sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if sdpa is not None:
            interface._global_mapping["sdpa"] = sdpa
        if switch:
            inner.set_attn_implementation(original)
