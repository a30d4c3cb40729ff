"""The public functions: estimate Ĥ, measure ΔH, predict ΔH on a batch E.

Each one checks its input, runs the model passes it needs (``scoring``) inside ``probe_mode``
and hands the per-sequence terms to ``estimators``, where the math lives. None of them changes
the model's parameters, train/eval mode, ``.grad``s, gradient-checkpointing flags or the
global RNG.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch
from torch import Tensor

from . import estimators
from .model_guard import probe_mode
from .params import check_point, check_scales, check_step, point_on_step, tangent
from .results import Estimate, Measurement, Prediction
from .sampling import ProbeBatch
from .scoring import score_derivatives, score_values

OUTSIDE_SUPPORT_WARNING = 1e-3


def check_options(normalize: str, estimator: str, microbatch_size: int | None) -> None:
    if normalize not in ("token", "sequence"):
        raise ValueError(f"normalize must be 'token' or 'sequence', got {normalize!r}")
    if estimator not in ("rb", "naive"):
        raise ValueError(f"estimator must be 'rb' (Rao-Blackwell) or 'naive', got {estimator!r}")
    if microbatch_size is not None and (isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int)
                                        or microbatch_size < 1):
        raise ValueError(f"microbatch_size must be a positive integer or None, got {microbatch_size!r}")


def _prepare(model: torch.nn.Module, batch: ProbeBatch) -> ProbeBatch:
    if not isinstance(batch, ProbeBatch):
        raise ValueError(f"batch must be a ProbeBatch (from sample_batch), got {type(batch).__name__}")
    if len(batch) == 0:
        raise ValueError("batch is empty; sample at least one sequence")
    if not bool(batch.response_mask.any(-1).all()):
        raise ValueError("every sequence in the batch needs at least one response token")
    return batch.to(next(model.parameters()).device)


def entropy_estimate(model, batch: ProbeBatch, *, params: Mapping[str, Tensor] | None = None,
                     normalize: str = "token", estimator: str = "rb",
                     microbatch_size: int | None = None) -> Estimate:
    """Ĥ(θ₀) = Σ f_i / Σ c_i on E, with its grouped-jackknife standard error.

    ``params`` overrides named parameters (θ₀ = the model's values with those replaced).
    """
    check_options(normalize, estimator, microbatch_size)
    batch = _prepare(model, batch)
    point = dict(params or {})
    check_point(model, point)
    with probe_mode(model):
        integrand = torch.cat([score_values(model, mb, point, estimator, at_origin=True).integrand
                               for mb in batch.microbatches(microbatch_size)])
    norm = estimators.normaliser(batch.response_lengths, normalize)
    result = estimators.entropy_at_origin(integrand, norm, batch.group)
    return Estimate(result.value, result.se, len(batch), int(batch.response_lengths.sum()))


def measure_delta_h(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor], *,
                    scales: Sequence[float] = (1.0,), normalize: str = "token", estimator: str = "rb",
                    microbatch_size: int | None = None) -> Measurement:
    """Measured ΔH(s) = Ĥ(θ₀ + sΔθ) − Ĥ(θ₀) by SNIS on the same E, for each scale s.

    One forward at θ₀ and one per scale, microbatch by microbatch (θ₀'s top-k/top-p support is
    kept only for the microbatch in hand, to measure ``outside_support``).
    """
    check_options(normalize, estimator, microbatch_size)
    scales = check_scales(scales)
    batch = _prepare(model, batch)
    params = check_step(model, base, delta)
    origin = point_on_step(params, base, delta, 0.0)
    points = [point_on_step(params, base, delta, s) for s in scales]
    truncates = batch.config.truncates

    at_origin, at_scale = [], [[] for _ in scales]
    with probe_mode(model):
        for mb in batch.microbatches(microbatch_size):
            reference = score_values(model, mb, origin, estimator, at_origin=True, keep_support=truncates)
            at_origin.append(reference)
            for values, point in zip(at_scale, points):
                values.append(score_values(model, mb, point, estimator, at_origin=False,
                                           reference_support=reference.support))
            reference.support = None  # free it before the next microbatch

    log_prob_0 = torch.cat([v.log_prob for v in at_origin])
    integrand_0 = torch.cat([v.integrand for v in at_origin])
    norm = estimators.normaliser(batch.response_lengths, normalize)
    before = estimators.entropy_at_origin(integrand_0, norm, batch.group)
    num_tokens = float(batch.response_lengths.sum())
    shifts, outside = [], []
    for scale, values in zip(scales, at_scale):
        weights = estimators.snis_weights(torch.cat([v.log_prob for v in values]), log_prob_0)
        shifts.append(estimators.measured_shift(weights, torch.cat([v.integrand for v in values]),
                                                integrand_0, norm, batch.group))
        mass = float(torch.cat([v.outside_mass for v in values]).sum()) / num_tokens if truncates else 0.0
        outside.append(mass)
        if mass > OUTSIDE_SUPPORT_WARNING:
            warnings.warn(f"at scale {scale:g} the step moved {mass:.2e} of the sampling mass per token outside "
                          "θ₀'s top-k/top-p support; SNIS cannot see those sequences, so the measured ΔH is "
                          "biased there", stacklevel=2)
    return Measurement(
        entropy_before=before.value,
        entropy_after=[s.after for s in shifts],
        delta=[s.delta for s in shifts],
        delta_se=[s.delta_se for s in shifts],
        ess_fraction=[s.ess_fraction for s in shifts],
        outside_support=outside,
        scales=scales,
        entropy_before_se=before.se,
    )


def predict_delta_h(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor], *,
                    order: int = 2, normalize: str = "token", estimator: str = "rb",
                    microbatch_size: int | None = None) -> Prediction:
    """Taylor prediction of ΔH along Δθ: g′(0) by one JVP pass (order 1), plus g″(0) by a
    nested JVP pass (order 2, which also yields g′(0), so it is one pass either way)."""
    check_options(normalize, estimator, microbatch_size)
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (linear) or 2 (linear + curvature), got {order!r}")
    batch = _prepare(model, batch)
    params = check_step(model, base, delta)
    origin = point_on_step(params, base, delta, 0.0)
    direction = tangent(params, delta)
    with probe_mode(model):
        parts = [score_derivatives(model, mb, origin, direction, estimator, order)
                 for mb in batch.microbatches(microbatch_size)]
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    norm = estimators.normaliser(batch.response_lengths, normalize)
    terms = estimators.taylor_terms(cat("integrand"), norm, cat("d_log_prob"), cat("d_integrand"), batch.group,
                                    cat("d2_log_prob"), cat("d2_integrand"))
    quadratic = None if terms.curvature is None else terms.linear + 0.5 * terms.curvature
    return Prediction(
        entropy=terms.entropy,
        entropy_se=terms.entropy_se,
        linear=terms.linear,
        linear_se=terms.linear_se,
        curvature=terms.curvature,
        quadratic=quadratic,
        per_sequence_linear=terms.per_sequence_linear,
        curvature_se=terms.curvature_se,
    )
