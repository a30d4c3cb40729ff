"""The sampling distribution q_θ at one position: temperature, then top-k, then top-p.

The same functions define q_θ for the sampler and for teacher-forced scoring, so the sequences
in E are exactly draws from the distribution that is differentiated. The support is computed
from detached logits: for derivatives it is locally constant (docs/method.md §1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def support_mask(scaled_logits: Tensor, top_k: int, top_p: float) -> Tensor | None:
    """Boolean mask of the tokens q_θ may emit, or None when nothing is truncated.

    Follows Hugging Face's warpers: top-k keeps every logit >= the k-th largest (ties kept);
    top-p then sorts the renormalised top-k distribution ascending and drops the tokens whose
    cumulative probability is <= 1 - top_p, always keeping the most likely token.
    """
    if top_k <= 0 and top_p >= 1.0:
        return None
    z = scaled_logits.detach()
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        keep = z >= kth
    if top_p < 1.0:
        sorted_z, order = z.masked_fill(~keep, float("-inf")).sort(dim=-1)
        cumulative = sorted_z.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= (1.0 - top_p)
        drop_sorted[..., -1] = False
        keep = keep & ~drop_sorted.scatter(-1, order, drop_sorted)
    return keep


def sampling_log_probs(logits: Tensor, config, support: Tensor | None = None,
                       force: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """log q_θ over the vocabulary, and the support used (None = untruncated).

    ``support`` overrides the computed support; ``force`` (token ids, shape logits[..., 0])
    adds those tokens to it. Computation runs in at least float32.
    """
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if config.temperature != 1.0:  # z / 1 is z bitwise: skip a pass over [n, M, V]
        z = z / config.temperature
    if support is None:
        support = support_mask(z, config.top_k, config.top_p)
    if support is not None and force is not None:
        support = support.scatter(-1, force[..., None], True)
    if support is not None:
        z = z.masked_fill(~support, float("-inf"))
    return torch.log_softmax(z, dim=-1), support


def entropy(log_q: Tensor, support: Tensor | None) -> Tensor:
    """H(q) = -Σ_v q(v) log q(v) over the support (0·log 0 taken as 0)."""
    if support is not None:
        log_q = log_q.masked_fill(~support, 0.0)
        return -(torch.where(support, log_q.exp(), 0.0) * log_q).sum(-1)
    return -(log_q.exp() * log_q).sum(-1)


def mass_outside(log_q: Tensor, reference_support: Tensor) -> Tensor:
    """Probability q_θ puts on tokens outside a reference (θ₀) support."""
    return torch.where(reference_support, 0.0, log_q.exp()).sum(-1)
