"""Making a Hugging Face model safe for forward-mode AD (JVPs), first and second order.

Three facts about this stack (docs/method.md §9) are handled here, and only here (Taylor-mode
jets, ``taylor``, need only the first; the other two concern the nested-JVP fallback):

- Fused attention kernels (CPU flash, CUDA flash/efficient, the flash-attn package) have no
  forward-AD rule: every derivative pass runs ``attention.grouped_attention`` in SDPA's place
  (``attention.probe_attention``), and a model configured for a flash implementation is switched
  to "sdpa" for the pass and back afterwards.
- ``F.layer_norm``'s second-order forward derivative is wrong in this torch with no error
  (nested ``jvp`` through GPT-2 was off by 3-33 %, PyTorch #196700): nested passes replace
  it by the same function written with mean/rsqrt, whose derivatives are exact.
- silu's forward-AD rule calls ``silu_backward`` which has none of its own; under grad mode
  torch.func decomposes it instead, so nested passes run with grad mode on (every input is a
  detached tensor, so no graph is kept).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .attention import probe_attention


def layer_norm_exact(x: torch.Tensor, normalized_shape: Sequence[int], weight=None, bias=None,
                     eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm written with mean/rsqrt: the same function, with exact derivatives of any order."""
    dims = tuple(range(-len(normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    y = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


@contextlib.contextmanager
def _exact_layer_norm() -> Iterator[None]:
    original = F.layer_norm
    F.layer_norm = layer_norm_exact
    try:
        yield
    finally:
        F.layer_norm = original


@contextlib.contextmanager
def forward_ad_ready(model: torch.nn.Module) -> Iterator[None]:
    """Context for a derivative pass (Taylor-mode jets or torch's dual tensors)."""
    with probe_attention(model), torch.no_grad():
        yield


@contextlib.contextmanager
def nested_jvp_ready() -> Iterator[None]:
    """Inside ``forward_ad_ready``, what nested ``torch.func.jvp`` needs in addition: the exact
    LayerNorm, and grad mode on for silu."""
    with _exact_layer_norm(), torch.enable_grad():
        yield
