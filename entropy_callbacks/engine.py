"""The public functions: estimate Ĥ, measure ΔH, predict ΔH on a batch E.

Each one checks its input, runs the model passes it needs (``scoring``) inside ``probe_mode``
and hands the per-sequence terms to ``estimators``, where the math lives. None of them changes
the model's parameters, train/eval mode, ``.grad``s, gradient-checkpointing flags or the
global RNG.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
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
    check_point(model, point, kind="params")
    with probe_mode(model):
        integrand = torch.cat([score_values(model, mb, point, estimator, at_origin=True).integrand
                               for mb in batch.microbatches(microbatch_size)])
    norm = estimators.normaliser(batch.response_lengths, normalize)
    result = estimators.entropy_at_origin(integrand, norm, batch.group)
    return Estimate(result.value, result.se, len(batch), int(batch.response_lengths.sum()))


@dataclass
class MeasurementTerms:
    """Per-sequence terms of a measurement (CPU float64), ready to concatenate across ranks."""

    group: Tensor
    token_counts: Tensor
    log_prob_origin: Tensor
    integrand_origin: Tensor
    log_prob: list[Tensor]  # one per scale
    integrand: list[Tensor]
    outside_mass: list[Tensor]


@dataclass
class PredictionTerms:
    """Per-sequence derivative terms of a prediction (CPU float64)."""

    group: Tensor
    token_counts: Tensor
    log_prob: Tensor
    integrand: Tensor
    d_log_prob: Tensor
    d_integrand: Tensor
    d2_log_prob: Tensor | None
    d2_integrand: Tensor | None


def _cpu(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach().to("cpu", torch.float64)


def concat_terms(parts: Sequence):
    """Concatenate MeasurementTerms or PredictionTerms (e.g. gathered from DDP ranks), rows
    stably sorted by prompt index so the result matches a single process over all prompts."""
    first = parts[0]
    order = torch.argsort(torch.cat([p.group for p in parts]), stable=True)
    merged = {}
    for name in first.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        if values[0] is None:
            merged[name] = None
        elif isinstance(values[0], list):
            merged[name] = [torch.cat([v[k] for v in values])[order] for k in range(len(values[0]))]
        else:
            merged[name] = torch.cat(values)[order]
    return type(first)(**merged)


def measurement_terms(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor], *,
                      scales: Sequence[float], estimator: str, microbatch_size: int | None,
                      origin: PredictionTerms | None = None) -> MeasurementTerms:
    """Run the passes of a measurement: one forward at θ₀ and one per scale, per microbatch
    (θ₀'s top-k/top-p support is kept only for the microbatch in hand).

    ``origin``: a prediction on the same batch and estimator, whose primal S_i, f_i at θ₀ are
    bitwise those of a plain θ₀ pass; it replaces that pass when nothing is truncated (with
    top-k/top-p the θ₀ pass also supplies the support for ``outside_support``).
    """
    params = check_step(model, base, delta)
    points = [point_on_step(params, base, delta, s) for s in scales]
    truncates = batch.config.truncates
    reuse = origin is not None and not truncates
    origin_point = None if reuse else point_on_step(params, base, delta, 0.0)
    at_origin, at_scale = [], [[] for _ in scales]
    with probe_mode(model):
        for mb in batch.microbatches(microbatch_size):
            reference = None
            if not reuse:
                reference = score_values(model, mb, origin_point, estimator, at_origin=True, keep_support=truncates)
                at_origin.append(reference)
            for values, point in zip(at_scale, points):
                values.append(score_values(model, mb, point, estimator, at_origin=False,
                                           reference_support=None if reference is None else reference.support))
            if reference is not None:
                reference.support = None  # free it before the next microbatch
    zeros = torch.zeros(len(batch), dtype=torch.float64)
    return MeasurementTerms(
        group=batch.group.cpu(),
        token_counts=_cpu(batch.response_lengths),
        log_prob_origin=origin.log_prob if reuse else _cpu(torch.cat([v.log_prob for v in at_origin])),
        integrand_origin=origin.integrand if reuse else _cpu(torch.cat([v.integrand for v in at_origin])),
        log_prob=[_cpu(torch.cat([v.log_prob for v in values])) for values in at_scale],
        integrand=[_cpu(torch.cat([v.integrand for v in values])) for values in at_scale],
        outside_mass=[_cpu(torch.cat([v.outside_mass for v in values])) if truncates else zeros
                      for values in at_scale],
    )


def summarize_measurement(terms: MeasurementTerms, scales: Sequence[float], normalize: str,
                          warn: bool = True) -> Measurement:
    norm = estimators.normaliser(terms.token_counts, normalize)
    before = estimators.entropy_at_origin(terms.integrand_origin, norm, terms.group)
    num_tokens = float(terms.token_counts.sum())
    shifts, outside = [], []
    for k, scale in enumerate(scales):
        weights = estimators.snis_weights(terms.log_prob[k], terms.log_prob_origin)
        shifts.append(estimators.measured_shift(weights, terms.integrand[k], terms.integrand_origin, norm,
                                                terms.group))
        mass = float(terms.outside_mass[k].sum()) / num_tokens
        outside.append(mass)
        if warn and mass > OUTSIDE_SUPPORT_WARNING:
            warnings.warn(f"at scale {scale:g} the step moved {mass:.2e} of the sampling mass per token outside "
                          "θ₀'s top-k/top-p support; SNIS cannot see those sequences, so the measured ΔH is "
                          "biased there", stacklevel=3)
    return Measurement(
        entropy_before=before.value,
        entropy_after=[s.after for s in shifts],
        delta=[s.delta for s in shifts],
        delta_se=[s.delta_se for s in shifts],
        ess_fraction=[s.ess_fraction for s in shifts],
        outside_support=outside,
        scales=tuple(scales),
        entropy_before_se=before.se,
    )


def measure_delta_h(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor], *,
                    scales: Sequence[float] = (1.0,), normalize: str = "token", estimator: str = "rb",
                    microbatch_size: int | None = None) -> Measurement:
    """Measured ΔH(s) = Ĥ(θ₀ + sΔθ) − Ĥ(θ₀) by SNIS on the same E, for each scale s.

    Warns when a step moves more than 1e-3 of the sampling mass per token outside θ₀'s
    top-k/top-p support (``outside_support``), where SNIS is blind.
    """
    check_options(normalize, estimator, microbatch_size)
    scales = check_scales(scales)
    batch = _prepare(model, batch)
    terms = measurement_terms(model, batch, base, delta, scales=scales, estimator=estimator,
                              microbatch_size=microbatch_size)
    return summarize_measurement(terms, scales, normalize)


def check_order(order: int) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2):
        raise ValueError(f"order must be 1 (linear) or 2 (linear + curvature), got {order!r}")


def prediction_terms(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor], *,
                     order: int, estimator: str, microbatch_size: int | None) -> PredictionTerms:
    """Run the derivative passes: one JVP (order 1) or one nested JVP (order 2) per microbatch."""
    params = check_step(model, base, delta)
    origin = point_on_step(params, base, delta, 0.0)
    direction = tangent(params, delta)
    with probe_mode(model):
        parts = [score_derivatives(model, mb, origin, direction, estimator, order)
                 for mb in batch.microbatches(microbatch_size)]
    cat = lambda name: None if getattr(parts[0], name) is None else _cpu(torch.cat([getattr(p, name) for p in parts]))  # noqa: E731
    return PredictionTerms(batch.group.cpu(), _cpu(batch.response_lengths), cat("log_prob"), cat("integrand"),
                           cat("d_log_prob"), cat("d_integrand"), cat("d2_log_prob"), cat("d2_integrand"))


def summarize_prediction(terms: PredictionTerms, normalize: str) -> Prediction:
    norm = estimators.normaliser(terms.token_counts, normalize)
    taylor = estimators.taylor_terms(terms.integrand, norm, terms.d_log_prob, terms.d_integrand, terms.group,
                                     terms.d2_log_prob, terms.d2_integrand)
    quadratic = None if taylor.curvature is None else taylor.linear + 0.5 * taylor.curvature
    return Prediction(
        entropy=taylor.entropy,
        entropy_se=taylor.entropy_se,
        linear=taylor.linear,
        linear_se=taylor.linear_se,
        curvature=taylor.curvature,
        quadratic=quadratic,
        per_sequence_linear=taylor.per_sequence_linear,
        curvature_se=taylor.curvature_se,
    )


def predict_delta_h(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor], *,
                    order: int = 2, normalize: str = "token", estimator: str = "rb",
                    microbatch_size: int | None = None) -> Prediction:
    """Taylor prediction of ΔH along Δθ: g′(0) by one JVP pass (order 1), or g′(0) and g″(0) by
    one nested JVP pass (order 2)."""
    check_options(normalize, estimator, microbatch_size)
    check_order(order)
    batch = _prepare(model, batch)
    terms = prediction_terms(model, batch, base, delta, order=order, estimator=estimator,
                             microbatch_size=microbatch_size)
    return summarize_prediction(terms, normalize)
