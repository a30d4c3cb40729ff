"""Teacher-forced scoring of E at any θ, functional in the parameters.

For every sequence i of a (micro)batch this computes, at the θ given by a parameter mapping,

    S_i(θ) = Σ_k log q_θ(y_ik)              (sum over counted response tokens)
    f_i(θ) = Σ_k H(q_θ,ik)  ("rb")  or  −S_i(θ)  ("naive")

in float64, and their first (and second) directional derivatives along Δθ by forward-mode AD
(``torch.func.jvp``, nested for order 2). Nothing here touches the model's own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import functional_call, jvp

from .distribution import entropy, mass_outside, sampling_log_probs
from .forward_mode import forward_ad_ready, math_attention
from .model_guard import forward_kwargs
from .sampling import ProbeBatch


@dataclass
class SequenceValues:
    """S_i and f_i at one θ, plus what a value pass can add (float64, one entry per sequence)."""

    log_prob: Tensor
    integrand: Tensor
    outside_mass: Tensor | None = None  # Σ_k mass of q_θ,ik outside θ₀'s support
    support: Tensor | None = None  # [n, M, V] support used (θ₀ passes only, for later scales)


@dataclass
class SequenceDerivatives:
    """S_i, f_i at θ₀ and their directional derivatives D S_i, D f_i (and D² when order 2)."""

    log_prob: Tensor
    integrand: Tensor
    d_log_prob: Tensor
    d_integrand: Tensor
    d2_log_prob: Tensor | None = None
    d2_integrand: Tensor | None = None


def _logits(model: torch.nn.Module, batch: ProbeBatch, params: Mapping[str, Tensor]) -> Tensor:
    """Logits predicting every response column: [n, M, V] for columns P..L-1."""
    width = batch.prompt_length
    steps = batch.input_ids.shape[1] - width
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = forward_kwargs(model, batch.input_ids, batch.attention_mask, position_ids, keep_last=steps + 1)
    logits = functional_call(model, dict(params), (), {**kwargs, "use_cache": False}).logits
    # Either the last steps+1 positions (logits_to_keep) or all of them: align on the end.
    return logits[:, -(steps + 1):-1]


def _token_terms(model, batch: ProbeBatch, params: Mapping[str, Tensor], estimator: str, *,
                 at_origin: bool, reference_support: Tensor | None = None, keep_support: bool = False):
    """Per-sequence S and f (and the support/outside-mass extras of a value pass)."""
    targets = batch.input_ids[:, batch.prompt_length:]
    counted = batch.response_mask[:, batch.prompt_length:]
    # At θ₀ the sampled token is in the support by construction; forcing it in guards against
    # a tie at the top-k/top-p boundary resolved differently by the sampler's numerics.
    log_q, support = sampling_log_probs(_logits(model, batch, params), batch.config,
                                        force=targets if at_origin else None)
    token_log_prob = log_q.gather(-1, targets[..., None]).squeeze(-1)
    log_prob = token_log_prob.masked_fill(~counted, 0.0).double().sum(-1)
    if estimator == "rb":
        integrand = entropy(log_q, support).masked_fill(~counted, 0.0).double().sum(-1)
    else:
        integrand = -log_prob
    outside = None
    if reference_support is not None:
        outside = mass_outside(log_q.detach(), reference_support).masked_fill(~counted, 0.0).double().sum(-1)
    return log_prob, integrand, outside, (support if keep_support else None)


def _all_params(model: torch.nn.Module, overrides: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # Every parameter passed explicitly and detached: no autograd graph reaches the model's own.
    params = {n: p.detach() for n, p in model.named_parameters()}
    params.update(overrides)
    return params


@torch.no_grad()
def score_values(model, batch: ProbeBatch, point: Mapping[str, Tensor], estimator: str, *,
                 at_origin: bool, reference_support: Tensor | None = None,
                 keep_support: bool = False) -> SequenceValues:
    """A plain forward at θ = ``point`` (names not in it: the model's current values)."""
    with math_attention(model):
        log_prob, integrand, outside, support = _token_terms(
            model, batch, _all_params(model, point), estimator, at_origin=at_origin,
            reference_support=reference_support, keep_support=keep_support)
    return SequenceValues(log_prob, integrand, outside, support)


def score_derivatives(model, batch: ProbeBatch, origin: Mapping[str, Tensor], direction: Mapping[str, Tensor],
                      estimator: str, order: int) -> SequenceDerivatives:
    """S, f at θ₀ and their first (order 1) or first and second (order 2) derivatives along Δθ.

    ``origin`` holds θ₀ for every name in ``direction`` (Δθ), and may fix other parameters too
    (names not in it: the model's current values); all in the parameters' dtypes.
    """
    fixed = _all_params(model, {n: t for n, t in origin.items() if n not in direction})
    primal = {n: origin[n] for n in direction}

    def terms(moving: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        log_prob, integrand, _, _ = _token_terms(model, batch, {**fixed, **moving}, estimator, at_origin=True)
        return log_prob, integrand

    with forward_ad_ready(model, order):
        if order == 1:
            # Plain dual tensors: a few percent cheaper than torch.func.jvp (fewer matmuls).
            with fwAD.dual_level():
                dual = {n: fwAD.make_dual(primal[n], direction[n]) for n in direction}
                log_prob, integrand = (fwAD.unpack_dual(t) for t in terms(dual))
            return SequenceDerivatives(log_prob.primal, integrand.primal, log_prob.tangent, integrand.tangent)

        def with_first(moving: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            values, firsts = jvp(terms, (moving,), (dict(direction),))
            return (*values, *firsts)

        values, tangents = jvp(with_first, (primal,), (dict(direction),))
    log_prob, integrand, d_log_prob, d_integrand = (v.detach() for v in values)
    return SequenceDerivatives(log_prob, integrand, d_log_prob, d_integrand,
                               tangents[2].detach(), tangents[3].detach())
