r"""Which samples of the update batch U caused the predicted ΔH (docs/method.md §6, Attribution).

The linear prediction along the real step is g′(0) = ⟨∇Ĥ, Δθ⟩, with ∇Ĥ the gradient of the SNIS
entropy (1) at θ₀. The optimizer's step splits as Δθ = γ ⊙ g + momentum + weight decay
(``optimizer_split``), and the applied gradient as g = c·Σ_u ∇L_u + r, with L_u the per-sample
losses of U whose sum is the objective and c the clip factor. So, exactly,

    g′(0) = Σ_u a_u + a_momentum + a_weight_decay + a_residual,
    a_u   = c·⟨γ ⊙ ∇Ĥ, ∇L_u⟩ ,

and a_residual holds whatever the per-sample losses (or the optimizer's modelled semantics)
do not reproduce: 0 when they do. All a_u come from one reverse pass on E (∇Ĥ) and one
forward-mode pass over U along γ ⊙ ∇Ĥ (the JVP of the per-sample losses).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import Tensor
from torch.func import jvp

from . import estimators
from .engine import _cpu, _prepare, check_options
from .forward_mode import math_attention
from .model_guard import probe_mode
from .optimizer_split import split_step
from .params import StepPoint, check_point
from .precision import Precision, check_precision, pass_numerics, resolve_precision
from .results import Attribution
from .sampling import ProbeBatch
from .scoring import _position_terms, _sums

UpdateLosses = Callable[[Mapping[str, Tensor]], Tensor]


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))


def entropy_gradient(model, batch: ProbeBatch, base: Mapping[str, Tensor], names: list[str], *,
                     normalize: str, estimator: str, microbatch_size: int | None,
                     dtype: torch.dtype | None) -> tuple[dict[str, Tensor], float]:
    r"""∇Ĥ(θ₀) over the parameters ``names`` (float64, on their devices), and Ĥ(θ₀).

    At θ₀ every w_i = b_i, so ∇Ĥ = Σ_i b_i [∇f_i + (f_i − Ĥ c_i) ∇S_i] / Σ_i b_i c_i: the gradient of
    the surrogate Σ_i b_i [f_i + (f_i − Ĥ c_i)·S_i] / C with the bracket's f_i held fixed. Over
    several microbatches a value pass gives Ĥ and C first and the reverse pass then runs
    microbatch by microbatch; in one microbatch the reverse pass's own forward gives them.
    """
    point = StepPoint(base, {}, 0.0, dtype)
    params = dict(model.named_parameters())
    leaves = {n: point(n, params[n]).detach().requires_grad_(True) for n in names}

    def value_of(name, param):
        return leaves[name] if name in leaves else point(name, param)

    def terms(mb: ProbeBatch) -> list[Tensor]:
        return _sums(*_position_terms(model, mb, value_of, estimator, at_origin=True)[:2])

    microbatches = list(batch.microbatches(microbatch_size))
    single = len(microbatches) == 1  # then the gradient pass's own values give Ĥ: no value pass
    with torch.set_grad_enabled(single), math_attention(model):
        parts = [terms(mb) for mb in microbatches]
    log_prob = torch.cat([p[0] for p in parts]).detach()
    integrand = torch.cat([p[1] for p in parts]).detach()
    norm = estimators.normaliser(batch.response_lengths, normalize).to(log_prob.device)
    base_weights = estimators.proposal_weights(log_prob, _cpu(batch.proposal_log_probs))
    b = torch.ones_like(log_prob) if base_weights is None else base_weights.to(log_prob.device)
    total = (b * norm).sum()
    entropy = float((b * integrand).sum() / total)
    gradient = {n: torch.zeros_like(leaves[n], dtype=torch.float64) for n in names}
    start = 0
    with torch.enable_grad(), math_attention(model):
        for mb in microbatches:
            s, f = parts[0] if single else terms(mb)
            rows = slice(start, start + len(mb))
            start += len(mb)
            weight = b[rows] / total
            keep = weight > 0  # 0·(−inf) outside θ₀'s support under a proposal
            surrogate = (weight[keep] * (f[keep] + (f[keep].detach() - entropy * norm[rows][keep]) * s[keep])).sum()
            grads = torch.autograd.grad(surrogate, [leaves[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    gradient[n] += g.double()
    return gradient, entropy


def attribute_delta_h(model, batch: ProbeBatch, base: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
                      update_losses: UpdateLosses, *, normalize: str = "token", estimator: str = "rb",
                      microbatch_size: int | None = None, clip_factor: float | None = None,
                      precision: Precision = "auto") -> Attribution:
    """Split the linear prediction of ΔH along the step ``optimizer`` just took from ``base``
    (θ₀) to the model's current parameters among the samples of the update batch.

    ``optimizer``'s ``.grad``s must still hold the gradient it applied. ``update_losses(params)``
    returns the per-sample losses L_u [n_u] at the parameters given (name → tensor; evaluate
    the model with ``torch.func.functional_call``), deterministically (dropout off), summing to
    the objective whose gradient was applied. ``clip_factor``: c with g = c·Σ_u ∇L_u (e.g. from
    gradient clipping); None fits it as ⟨g, G⟩/⟨G, G⟩ with G = ∇Σ_u L_u from one reverse pass
    over U. For an optimizer ``optimizer_split`` does not cover, only ``linear`` is given.
    """
    check_options(normalize, estimator, microbatch_size)
    check_precision(precision)
    if not callable(update_losses):
        raise ValueError("update_losses must be callable: params (name -> tensor) -> per-sample losses [n_u]")
    if clip_factor is not None and not (math.isfinite(clip_factor) and clip_factor > 0):
        raise ValueError(f"clip_factor must be a positive number or None, got {clip_factor!r}")
    batch = _prepare(model, batch)
    params = check_point(model, base)
    names = [n for n, p in params.items() if p.requires_grad and n in base]
    if not names:
        raise ValueError("base names no trainable parameter; pass θ₀ of the trainable parameters (step.snapshot)")
    delta = {n: params[n].detach().double() - base[n].detach().to(params[n].device).double() for n in names}
    split = split_step(optimizer, {id(p): n for n, p in params.items()}, base)
    if split is not None and not split.gain:
        raise ValueError("the optimizer holds no gradient for the parameters in base; call attribute_delta_h "
                         "after optimizer.step() and before zero_grad()")
    dtype = resolve_precision(precision, model).derivatives
    with probe_mode(model), pass_numerics(model, dtype):
        gradient, entropy = entropy_gradient(model, batch, base, names, normalize=normalize, estimator=estimator,
                                             microbatch_size=microbatch_size, dtype=dtype)
    linear = _dot(gradient, delta)
    if split is None:
        return Attribution(per_sample=None, momentum=math.nan, weight_decay=math.nan, residual=math.nan,
                           linear=linear, entropy=entropy, clip_factor=math.nan,
                           note=f"{type(optimizer).__name__} has no per-sample split here: linear only")
    moved = list(split.gain)
    gradient = {n: gradient[n].to(split.gain[n].device) for n in moved}
    direction = {n: split.gain[n] * gradient[n] for n in moved}  # γ ⊙ ∇Ĥ
    primals = {n: base[n].detach().to(params[n].device, params[n].dtype) for n in moved}
    with probe_mode(model), math_attention(model):
        if clip_factor is None:
            with torch.enable_grad():
                leaves = {n: t.clone().requires_grad_(True) for n, t in primals.items()}
                full = torch.autograd.grad(update_losses(leaves).sum(), [leaves[n] for n in moved], allow_unused=True)
            full = {n: (g.double() if g is not None else torch.zeros_like(split.gradient[n]))
                    for n, g in zip(moved, full)}
            clip_factor = _dot(split.gradient, full) / _dot(full, full)
        with torch.no_grad():
            per_sample = clip_factor * _per_sample_jvp(update_losses, primals, direction)
            jacobian = None
            if split.jacobian_gain is not None:  # Adam: the influence through v_t as well
                jacobian = clip_factor * _per_sample_jvp(
                    update_losses, primals, {n: split.jacobian_gain[n] * gradient[n] for n in moved})
    momentum = _dot(gradient, split.momentum)
    weight_decay = _dot(gradient, split.weight_decay)
    residual = linear - float(per_sample.sum()) - momentum - weight_decay
    return Attribution(per_sample=per_sample, momentum=momentum, weight_decay=weight_decay, residual=residual,
                       linear=linear, entropy=entropy, clip_factor=float(clip_factor), per_sample_jacobian=jacobian)


def _per_sample_jvp(update_losses: UpdateLosses, primals: dict[str, Tensor], direction: dict[str, Tensor]) -> Tensor:
    """⟨direction, ∇L_u⟩ for every u: the JVP of the per-sample losses at θ₀ (float64, CPU)."""
    tangents = {n: direction[n].to(primals[n].dtype) for n in primals}
    _, out = jvp(lambda p: update_losses(p), (primals,), (tangents,))
    return out.detach().double().cpu()
