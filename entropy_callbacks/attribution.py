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
from .attention import probe_attention
from .model_guard import probe_mode
from .optimizer_split import StepSplit, split_step
from .params import StepPoint, check_point
from .precision import Precision, check_precision, pass_numerics, resolve_precision
from .results import Attribution
from .sampling import ProbeBatch
from .scoring import _position_terms, _sums

UpdateLosses = Callable[[Mapping[str, Tensor]], Tensor]


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))


class GradientsOnE:
    r"""Reverse-mode passes over E at θ₀, the parameters ``names`` as leaves (float64 results).

    At θ₀ every w_i = b_i, so ∇Ĥ = Σ_i b_i [∇f_i + (f_i − Ĥ c_i) ∇S_i] / Σ_i b_i c_i: the gradient of
    the surrogate Σ_i b_i [f_i + (f_i − Ĥ c_i)·S_i] / C with the bracket's f_i held fixed. Over
    several microbatches a value pass gives Ĥ and C first and the reverse pass then runs
    microbatch by microbatch; in one microbatch the reverse pass's own forward gives them.
    """

    def __init__(self, model, batch: ProbeBatch, base: Mapping[str, Tensor], names: list[str], *,
                 normalize: str, estimator: str, microbatch_size: int | None, dtype: torch.dtype | None):
        self.model, self.batch, self.names, self.estimator = model, batch, names, estimator
        self.point = StepPoint(base, {}, 0.0, dtype)
        params = dict(model.named_parameters())
        self.leaves = {n: self.point(n, params[n]).detach().requires_grad_(True) for n in names}
        self.microbatches = list(batch.microbatches(microbatch_size))
        self._kept = None
        single = len(self.microbatches) == 1  # then the gradient pass's own values give Ĥ: no value pass
        with torch.set_grad_enabled(single), probe_attention(model):
            parts = [self.terms(mb) for mb in self.microbatches]
        if single:
            self._kept = parts[0]
        self.log_prob = torch.cat([p[0] for p in parts]).detach()
        self.integrand = torch.cat([p[1] for p in parts]).detach()
        self.norm = estimators.normaliser(batch.response_lengths, normalize).to(self.log_prob.device)
        base_weights = estimators.proposal_weights(self.log_prob, _cpu(batch.proposal_log_probs))
        self.weights = torch.ones_like(self.log_prob) if base_weights is None else base_weights.to(self.log_prob.device)
        self.total = (self.weights * self.norm).sum()
        self.entropy = float((self.weights * self.integrand).sum() / self.total)

    def _value_of(self, name, param):
        return self.leaves[name] if name in self.leaves else self.point(name, param)

    def terms(self, mb: ProbeBatch) -> list[Tensor]:
        return _sums(*_position_terms(self.model, mb, self._value_of, self.estimator, at_origin=True)[:2])

    def gradient(self, surrogate: Callable[[Tensor, Tensor, Tensor], Tensor],
                 rows: Tensor | None = None) -> dict[str, Tensor]:
        """∇ Σ over microbatches of ``surrogate(index, S, f)`` (index: the rows of E in hand), over
        all of E, or over the sequences ``rows`` in one pass."""
        if rows is None:
            pieces = self.microbatches
            indices = torch.arange(len(self.batch)).split([len(m) for m in pieces])
        else:
            pieces, indices = [self.batch.select(rows)], [rows]
        out = {n: torch.zeros_like(self.leaves[n], dtype=torch.float64) for n in self.names}
        with torch.enable_grad(), probe_attention(self.model):
            for mb, index in zip(pieces, indices):
                s, f = self._kept if (self._kept is not None and rows is None) else self.terms(mb)
                keep = self.weights[index] > 0  # 0·(−inf) outside θ₀'s support under a proposal
                grads = torch.autograd.grad(surrogate(index[keep], s[keep], f[keep]),
                                            [self.leaves[n] for n in self.names], allow_unused=True,
                                            retain_graph=rows is None and self._kept is not None)
                for n, g in zip(self.names, grads):
                    if g is not None:
                        out[n] += g.double()
        return out

    def entropy_gradient(self) -> dict[str, Tensor]:
        """∇Ĥ(θ₀)."""
        b, c, h = self.weights, self.norm, self.entropy
        return self.gradient(lambda i, s, f: (b[i] * (f + (f.detach() - h * c[i]) * s)).sum() / self.total)


def attribute_delta_h(model, batch: ProbeBatch, base: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
                      update_losses: UpdateLosses, *, normalize: str = "token", estimator: str = "rb",
                      microbatch_size: int | None = None, clip_factor: float | None = None,
                      precision: Precision = "auto", standard_errors: bool = False,
                      step_split: StepSplit | None = None) -> Attribution:
    """Split the linear prediction of ΔH along the step ``optimizer`` just took from ``base``
    (θ₀) to the model's current parameters among the samples of the update batch.

    ``optimizer``'s ``.grad``s must still hold the gradient it applied. ``update_losses(params)``
    returns the per-sample losses L_u [n_u] at the parameters given (name → tensor; evaluate
    the model with ``torch.func.functional_call``), deterministically (dropout off), summing to
    the objective whose gradient was applied. ``clip_factor``: c with g = c·Σ_u ∇L_u (e.g. from
    gradient clipping); None fits it as ⟨g, G⟩/⟨G, G⟩ with G = ∇Σ_u L_u from one reverse pass
    over U. For an optimizer ``optimizer_split`` does not cover, only ``linear`` is given.

    ``step_split``: ``optimizer_split.split_step`` taken right after the step, for when the
    optimizer has moved on since (a scheduler's lr, a later step's gradients); by default it is
    taken from ``optimizer`` now.

    ``standard_errors``: the grouped-jackknife SE over E's prompt groups of every a_u
    (``per_sample_se``), at the cost of one more reverse pass over E, split by group, and G + 1
    JVPs over U (``per_sample_se`` below).
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
    split = step_split if step_split is not None else split_step(optimizer, {id(p): n for n, p in params.items()}, base)
    if split is not None and not split.gain:
        raise ValueError("the optimizer holds no gradient for the parameters in base; call attribute_delta_h "
                         "after optimizer.step() and before zero_grad()")
    dtype = resolve_precision(precision, model).derivatives
    with probe_mode(model), pass_numerics(model, dtype):
        on_e = GradientsOnE(model, batch, base, names, normalize=normalize, estimator=estimator,
                            microbatch_size=microbatch_size, dtype=dtype)
        gradient, entropy = on_e.entropy_gradient(), on_e.entropy
    linear = _dot(gradient, delta)
    if split is None:
        return Attribution(per_sample=None, momentum=math.nan, weight_decay=math.nan, residual=math.nan,
                           linear=linear, entropy=entropy, clip_factor=math.nan,
                           note=f"{type(optimizer).__name__} has no per-sample split here: linear only")
    moved = list(split.gain)
    gradient = {n: gradient[n].to(split.gain[n].device) for n in moved}
    direction = {n: split.gain[n] * gradient[n] for n in moved}  # γ ⊙ ∇Ĥ
    primals = {n: base[n].detach().to(params[n].device, params[n].dtype) for n in moved}
    with probe_mode(model), probe_attention(model):
        if clip_factor is None:
            with torch.enable_grad():
                leaves = {n: t.clone().requires_grad_(True) for n, t in primals.items()}
                full = torch.autograd.grad(update_losses(leaves).sum(), [leaves[n] for n in moved], allow_unused=True)
            full = {n: (g.double() if g is not None else torch.zeros_like(split.gradient[n]))
                    for n, g in zip(moved, full)}
            norm = _dot(full, full)
            # G = 0 (e.g. every advantage 0): no sample moved anything; a_u = 0 whatever c is.
            clip_factor = _dot(split.gradient, full) / norm if norm > 0 else 1.0
        with torch.no_grad():
            influence = _per_sample_jvp(update_losses, primals, direction)
            per_sample = clip_factor * influence
            jacobian = None
            if split.jacobian_gain is not None:  # Adam: the influence through v_t as well
                jacobian = clip_factor * _per_sample_jvp(
                    update_losses, primals, {n: split.jacobian_gain[n] * gradient[n] for n in moved})
    se = None
    if standard_errors:
        with probe_mode(model), pass_numerics(model, dtype), probe_attention(model), torch.no_grad():
            se = per_sample_se(on_e, lambda d: _per_sample_jvp(update_losses, primals, d), split.gain,
                               clip_factor, influence)
    momentum = _dot(gradient, split.momentum)
    weight_decay = _dot(gradient, split.weight_decay)
    residual = linear - float(per_sample.sum()) - momentum - weight_decay
    return Attribution(per_sample=per_sample, momentum=momentum, weight_decay=weight_decay, residual=residual,
                       linear=linear, entropy=entropy, clip_factor=float(clip_factor), per_sample_jacobian=jacobian,
                       per_sample_se=se)


def per_sample_se(on_e: GradientsOnE, project: Callable[[dict[str, Tensor]], Tensor], gain: dict[str, Tensor],
                  clip_factor: float, influence: Tensor) -> Tensor:
    r"""Grouped-jackknife SE over E's prompt groups of each a_u = c·⟨γ ⊙ ∇Ĥ, ∇L_u⟩.

    Without group h, ∇Ĥ_(−h) = [C ∇Ĥ + (Ĥ − Ĥ_(−h)) B − E_h] / C_(−h), with B = ∇Σ_i b_i c_i S_i over
    all of E and E_h = ∇Σ_{i∈h} b_i [f_i + (f_i − Ĥ_(−h) c_i)·S_i] (bracket held fixed), so
    a_u^(−h) = c [C j_u + (Ĥ − Ĥ_(−h)) β_u − ε_hu] / C_(−h) with j, β, ε_h the projections
    ⟨γ ⊙ ·, ∇L_u⟩ (``project``: one JVP over U each) of ∇Ĥ, B and E_h.
    """
    dense, groups = estimators.group_index(on_e.batch.group.cpu())
    if groups < 2:
        return torch.full_like(influence, math.nan)
    b, c = on_e.weights.double().cpu(), on_e.norm.double().cpu()
    f = torch.where(b > 0, on_e.integrand.double().cpu(), 0.0)
    per_group = lambda x: torch.zeros(groups, dtype=torch.float64).index_add_(0, dense, x)  # noqa: E731
    total, weighted_f = float((b * c).sum()), float((b * f).sum())
    total_without = total - per_group(b * c)
    entropy_without = (weighted_f - per_group(b * f)) / total_without
    along = lambda grad: project({n: gain[n] * grad[n].to(gain[n].device) for n in gain})  # noqa: E731
    weights, norm = on_e.weights, on_e.norm
    beta = along(on_e.gradient(lambda i, s, f_: (weights[i] * norm[i] * s).sum()))
    leave_out = []
    for h in range(groups):
        rows = torch.nonzero(dense == h).flatten()
        level = float(entropy_without[h])
        piece = on_e.gradient(lambda i, s, f_: (weights[i] * (f_ + (f_.detach() - level * norm[i]) * s)).sum(),
                              rows=rows.to(weights.device))
        leave_out.append(clip_factor * (total * influence + (on_e.entropy - level) * beta - along(piece))
                         / float(total_without[h]))
    leave_out = torch.stack(leave_out)
    return torch.sqrt((groups - 1) / groups * ((leave_out - leave_out.mean(0)) ** 2).sum(0))


def _per_sample_jvp(update_losses: UpdateLosses, primals: dict[str, Tensor], direction: dict[str, Tensor]) -> Tensor:
    """⟨direction, ∇L_u⟩ for every u: the JVP of the per-sample losses at θ₀ (float64, CPU)."""
    tangents = {n: direction[n].to(primals[n].dtype) for n in primals}
    _, out = jvp(lambda p: update_losses(p), (primals,), (tangents,))
    return out.detach().double().cpu()
