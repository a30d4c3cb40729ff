"""The public functions: estimate Ĥ, measure ΔH, predict ΔH on a batch E.

Each one checks its input, runs the model passes it needs (``scoring``) inside ``probe_mode``
and hands the per-sequence terms to ``estimators``, where the math lives. None of them changes
the model's parameters, train/eval mode, ``.grad``s, gradient-checkpointing flags or the
global RNG.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from . import estimators
from .model_guard import probe_mode
from .params import StepPoint, check_point, check_scales, check_step
from .precision import (PassPrecision, Precision, check_precision, effective_dtype, partner_dtype,
                        pass_numerics, resolve_precision, unit_roundoff)
from .results import Estimate, Measurement, Prediction
from .sampling import ProbeBatch
from .scoring import score_derivatives, score_values, vocab_size

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
                     microbatch_size: int | None = None, precision: Precision = "auto") -> Estimate:
    """Ĥ(θ₀) = Σ f_i / Σ c_i on E, with its grouped-jackknife standard error.

    ``params`` overrides named parameters (θ₀ = the model's values with those replaced).
    ``precision``: the compute dtype of the pass (``precision`` module; "auto": float64).
    """
    check_options(normalize, estimator, microbatch_size)
    check_precision(precision)
    batch = _prepare(model, batch)
    overrides = dict(params or {})
    check_point(model, overrides, kind="params")
    point = StepPoint(overrides, {}, 0.0, resolve_precision(precision, model).values)
    with probe_mode(model), pass_numerics(model, point.dtype):
        values = [score_values(model, mb, point, estimator, at_origin=True)
                  for mb in batch.microbatches(microbatch_size)]
    log_prob, integrand = (torch.cat([getattr(v, name) for v in values]) for name in ("log_prob", "integrand"))
    proposal = _cpu(batch.proposal_log_probs)
    _check_finite_origin(_cpu(log_prob), _cpu(integrand), model, point.dtype, proposal is not None)
    norm = estimators.normaliser(batch.response_lengths, normalize)
    base_weights = estimators.proposal_weights(log_prob, proposal)
    result = estimators.entropy_at_origin(integrand, norm, batch.group, base_weights)
    return Estimate(result.value, result.se, len(batch), int(batch.response_lengths.sum()),
                    estimators.degrees_of_freedom(batch.group))


@dataclass
class MeasurementTerms:
    """Per-sequence terms of a measurement (CPU float64), ready to concatenate across ranks.

    ``partner_*``: S_i, f_i at θ₀ from a pass in another precision, whose difference from the
    θ₀ values, times ``roundoff_ratio``, estimates the rounding error of the value passes; NaN
    for the sequences that pass did not re-run (``floor_rows``).
    """

    group: Tensor
    token_counts: Tensor
    log_prob_origin: Tensor
    integrand_origin: Tensor
    log_prob: list[Tensor]  # one per scale
    integrand: list[Tensor]
    outside_mass: list[Tensor]
    partner_log_prob: Tensor
    partner_integrand: Tensor
    roundoff_ratio: float
    vocab_size: int  # V, for the float64 arithmetic's share of the floor (estimators.arithmetic_floor)
    proposal_log_prob: Tensor | None = None  # log p(y_i) when E came from another proposal


@dataclass
class PredictionTerms:
    """Per-sequence derivative terms of a prediction (CPU float64), and the unit roundoff of the
    precision the pass computed in."""

    group: Tensor
    token_counts: Tensor
    log_prob: Tensor
    integrand: Tensor
    d_log_prob: Tensor
    d_integrand: Tensor
    d2_log_prob: Tensor | None
    d2_integrand: Tensor | None
    roundoff: float
    proposal_log_prob: Tensor | None = None
    controls: Tensor | None = None  # [N, J] score features of mean 0 at θ₀ (scoring.score_controls)


def _cpu(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach().to("cpu", torch.float64)


def _check_finite_origin(log_prob: Tensor, integrand: Tensor, model, dtype: torch.dtype | None,
                         proposal: bool = False) -> None:
    """At θ₀ every sampled sequence has a finite log-probability and entropy; a pass that says
    otherwise overflowed (float16 does on GPT-2) and would poison every estimate with NaN.
    A proposal's sequence may lie outside q_θ₀'s support (log q = −inf, weight 0), never NaN."""
    if proposal:
        bad = torch.isnan(log_prob) | torch.isnan(integrand) | (log_prob == math.inf)
    else:
        bad = ~(torch.isfinite(log_prob) & torch.isfinite(integrand))
    if bool(bad.any()):
        rounds_in = effective_dtype(dtype, model)
        raise ValueError(f"the probe's {rounds_in} pass gave non-finite log-probabilities or entropies at θ₀ for "
                         f"{int(bad.sum())} of {bad.numel()} sequences (overflow); use precision='auto' or "
                         "'float32' instead of computing in the model's own dtype")


def concat_terms(parts: Sequence):
    """Concatenate MeasurementTerms or PredictionTerms (e.g. gathered from DDP ranks), rows
    stably sorted by prompt index so the result matches a single process over all prompts."""
    first = parts[0]
    order = torch.argsort(torch.cat([p.group for p in parts]), stable=True)
    merged = {}
    for name in first.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        if values[0] is None or isinstance(values[0], (int, float)):  # per-pass constants: the same on every rank
            merged[name] = values[0]
        elif isinstance(values[0], list):
            merged[name] = [torch.cat([v[k] for v in values])[order] for k in range(len(values[0]))]
        else:
            merged[name] = torch.cat(values)[order]
    return type(first)(**merged)


# A partner pass of its own re-runs only every FLOOR_STRIDE-th sequence of E (all of a small E,
# at least FLOOR_MIN_ROWS): the floor is a sum of per-sequence magnitudes, which a quarter of E
# estimates well enough for a diagnostic (docs/method.md §8), at a quarter of a pass.
FLOOR_STRIDE = 4
FLOOR_MIN_ROWS = 4


def floor_rows(n: int) -> Tensor:
    """Rows of an E of n sequences that a partner pass of its own re-runs (evenly spaced)."""
    return torch.arange(0, n, max(1, min(FLOOR_STRIDE, n // FLOOR_MIN_ROWS)))


def floor_partner_pass(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor],
                       rounds_in: torch.dtype, estimator: str, microbatch_size: int | None) -> tuple[Tensor, Tensor]:
    """S_i and f_i at θ₀ in the partner precision of value passes that round in ``rounds_in``,
    for the ``floor_rows`` of E, NaN for the other rows: the pass a measurement runs for its
    rounding floor when no prediction can serve as its partner."""
    point = StepPoint(base, delta, 0.0, partner_dtype(rounds_in))
    rows = floor_rows(len(batch))
    with probe_mode(model), pass_numerics(model, point.dtype):
        values = [score_values(model, mb, point, estimator, at_origin=True)
                  for mb in batch.select(rows).microbatches(microbatch_size)]

    def over_e(parts: list[Tensor]) -> Tensor:  # the re-run rows in place, NaN elsewhere
        return torch.full((len(batch),), math.nan, dtype=torch.float64).index_copy_(
            0, rows.cpu(), _cpu(torch.cat(parts)))

    return over_e([v.log_prob for v in values]), over_e([v.integrand for v in values])


def measurement_terms(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor], *,
                      scales: Sequence[float], estimator: str, microbatch_size: int | None,
                      precision: PassPrecision, origin: PredictionTerms | None = None) -> MeasurementTerms:
    """Run the passes of a measurement: one forward at θ₀ and one per scale, per microbatch, in
    ``precision.values`` (θ₀'s top-k/top-p support is kept only for the microbatch in hand), and
    the θ₀ pass in a partner precision for the rounding floor.

    ``origin``: a prediction on the same batch and estimator. In the model's own dtypes its
    primal S_i, f_i at θ₀ are bitwise those of a plain θ₀ pass and replace that pass (unless
    top-k/top-p needs θ₀'s support); run in another precision than the value passes, it is the
    partner pass. (Under a precision policy value passes take the vocabulary side in float64 and
    derivative passes do not, so a float32 prediction is never the float32 θ₀ pass.)
    """
    check_step(model, base, delta)
    dtype = precision.values
    rounds_in = effective_dtype(dtype, model)
    unit = unit_roundoff(rounds_in)
    points = [StepPoint(base, delta, s, dtype) for s in scales]
    truncates = batch.config.truncates
    # Jets compute values with a forward's own kernels (taylor), so a derivative pass's θ₀ values
    # are bitwise a value pass's when both run in the model's dtypes.
    same_function = origin is not None and dtype is None and origin.roundoff == unit
    reuse = same_function and not truncates
    partner = origin if origin is not None and origin.roundoff != unit else None
    partner_roundoff = unit_roundoff(partner_dtype(rounds_in)) if partner is None else partner.roundoff
    origin_point = StepPoint(base, delta, 0.0, dtype)
    at_origin, at_scale = [], [[] for _ in scales]
    with probe_mode(model), pass_numerics(model, dtype):
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
    if partner is None:
        partner_log_prob, partner_integrand = floor_partner_pass(model, batch, base, delta, rounds_in, estimator,
                                                                 microbatch_size)
    else:
        partner_log_prob, partner_integrand = partner.log_prob, partner.integrand
    zeros = torch.zeros(len(batch), dtype=torch.float64)
    terms = MeasurementTerms(
        group=batch.group.cpu(),
        token_counts=_cpu(batch.response_lengths),
        log_prob_origin=origin.log_prob if reuse else _cpu(torch.cat([v.log_prob for v in at_origin])),
        integrand_origin=origin.integrand if reuse else _cpu(torch.cat([v.integrand for v in at_origin])),
        log_prob=[_cpu(torch.cat([v.log_prob for v in values])) for values in at_scale],
        integrand=[_cpu(torch.cat([v.integrand for v in values])) for values in at_scale],
        outside_mass=[_cpu(torch.cat([v.outside_mass for v in values])) if truncates else zeros
                      for values in at_scale],
        partner_log_prob=partner_log_prob,
        partner_integrand=partner_integrand,
        # A lower-precision partner's error, scaled by the ratio of unit roundoffs, estimates the
        # value passes' error; a higher-precision partner's difference is that error itself.
        roundoff_ratio=min(1.0, unit / partner_roundoff),
        vocab_size=vocab_size(model),
        proposal_log_prob=_cpu(batch.proposal_log_probs),
    )
    _check_finite_origin(terms.log_prob_origin, terms.integrand_origin, model, dtype,
                         terms.proposal_log_prob is not None)
    return terms


def summarize_measurement(terms: MeasurementTerms, scales: Sequence[float], normalize: str,
                          warn: bool = True, controls: Tensor | None = None) -> Measurement:
    """The measurement's statistics; ``controls``: score features of a prediction on the same E
    (``PredictionTerms.controls``), applied as control variates to Ĥ(θ₀) and every ΔH(s)."""
    norm = estimators.normaliser(terms.token_counts, normalize)
    base = estimators.proposal_weights(terms.log_prob_origin, terms.proposal_log_prob)
    before = estimators.entropy_at_origin(terms.integrand_origin, norm, terms.group, base, controls)
    shifts = [estimators.measured_shift(estimators.snis_weights(log_prob, sampled_from(terms)), integrand,
                                        terms.integrand_origin, norm, terms.group, base, controls,
                                        entropy_before=before.value)
              for log_prob, integrand in zip(terms.log_prob, terms.integrand)]
    num_tokens = float(terms.token_counts.sum())
    floor = estimators.rounding_floor(terms.integrand_origin, norm,
                                      terms.roundoff_ratio * (terms.partner_log_prob - terms.log_prob_origin),
                                      terms.roundoff_ratio * (terms.partner_integrand - terms.integrand_origin), base)
    floor += estimators.arithmetic_floor([before.value, max((abs(s.after) for s in shifts), default=0.0)],
                                         int(num_tokens), terms.vocab_size)
    outside, usable = [], []
    for k, scale in enumerate(scales):
        mass = float(terms.outside_mass[k].sum()) / num_tokens
        outside.append(mass)
        # A proposal (the defensive one, or the user's engine) draws where q_θ₀ does not.
        usable.append(mass <= OUTSIDE_SUPPORT_WARNING or terms.proposal_log_prob is not None)
        if warn and not usable[-1]:
            warnings.warn(f"at scale {scale:g} the step moved {mass:.2e} of the sampling mass per token outside "
                          "θ₀'s top-k/top-p support; SNIS cannot see those sequences, so the measured ΔH is "
                          "biased there", stacklevel=3)
        if warn and abs(shifts[k].delta) < floor:
            warnings.warn(f"at scale {scale:g} the measured ΔH ({shifts[k].delta:.3e}) is below the estimated "
                          f"rounding error of its passes ({floor:.1e}); it is float rounding, not the step. "
                          "Measure with precision='float64' (docs/method.md, Precision)", stacklevel=3)
    return Measurement(
        entropy_before=before.value,
        entropy_after=[s.after for s in shifts],
        delta=[s.delta for s in shifts],
        delta_se=[s.delta_se for s in shifts],
        ess_fraction=[s.ess_fraction for s in shifts],
        outside_support=outside,
        scales=tuple(scales),
        entropy_before_se=before.se,
        delta_floor=floor,
        dof=estimators.degrees_of_freedom(terms.group),
        ess_origin=estimators.ess_fraction(base),
        control_variates=before.controlled or any(s.shift.controlled for s in shifts),
        usable=usable,
    )


def sampled_from(terms: MeasurementTerms) -> Tensor:
    """log of the distribution E was drawn from: the proposal's, else S_i(θ₀)."""
    return terms.log_prob_origin if terms.proposal_log_prob is None else terms.proposal_log_prob


def measure_delta_h(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor], *,
                    scales: Sequence[float] = (1.0,), normalize: str = "token", estimator: str = "rb",
                    microbatch_size: int | None = None, precision: Precision = "auto",
                    control_variates: bool = False) -> Measurement:
    """Measured ΔH(s) = Ĥ(θ₀ + sΔθ) − Ĥ(θ₀) by SNIS on the same E, for each scale s.

    ``precision``: compute dtype of the value passes ("auto": float64; see the ``precision``
    module). ``delta_floor`` estimates their rounding error; a warning
    says when a measured ΔH is below it, and when a step moves more than 1e-3 of the sampling
    mass per token outside θ₀'s top-k/top-p support (``outside_support``), where SNIS is blind.

    ``control_variates``: subtract cross-fitted score control variates (docs/method.md §5). Their
    features come from a derivative pass (one JVP), which this then runs: off by default here, where it
    would double the cost; ``EntropyProbe`` and ``probe`` run that pass anyway (their
    ``control_variates`` option, off by default: docs/method.md §5).
    """
    check_options(normalize, estimator, microbatch_size)
    check_precision(precision)
    check_flag("control_variates", control_variates)
    scales = check_scales(scales)
    batch = _prepare(model, batch)
    passes = resolve_precision(precision, model)
    origin = None
    if control_variates:
        origin = prediction_terms(model, batch, base, delta, order=1, estimator=estimator,
                                  microbatch_size=microbatch_size, precision=passes)
    terms = measurement_terms(model, batch, base, delta, scales=scales, estimator=estimator,
                              microbatch_size=microbatch_size, precision=passes, origin=origin)
    return summarize_measurement(terms, scales, normalize, controls=None if origin is None else origin.controls)


def check_flag(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_order(order: int) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2):
        raise ValueError(f"order must be 1 (linear) or 2 (linear + curvature), got {order!r}")


def prediction_terms(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor], *,
                     order: int, estimator: str, microbatch_size: int | None,
                     precision: PassPrecision) -> PredictionTerms:
    """Run the derivative passes in ``precision.derivatives``: one JVP (order 1) or one nested
    JVP (order 2) per microbatch."""
    check_step(model, base, delta)
    dtype = precision.derivatives
    with probe_mode(model), pass_numerics(model, dtype):
        parts = [score_derivatives(model, mb, base, delta, dtype, estimator, order)
                 for mb in batch.microbatches(microbatch_size)]
    cat = lambda name: None if getattr(parts[0], name) is None else _cpu(torch.cat([getattr(p, name) for p in parts]))  # noqa: E731
    terms = PredictionTerms(batch.group.cpu(), _cpu(batch.response_lengths), cat("log_prob"), cat("integrand"),
                            cat("d_log_prob"), cat("d_integrand"), cat("d2_log_prob"), cat("d2_integrand"),
                            roundoff=unit_roundoff(effective_dtype(dtype, model)),
                            proposal_log_prob=_cpu(batch.proposal_log_probs), controls=cat("controls"))
    _check_finite_origin(terms.log_prob, terms.integrand, model, dtype, terms.proposal_log_prob is not None)
    return terms


def _taylor(terms: PredictionTerms, normalize: str, base: Tensor | None, control_variates: bool):
    norm = estimators.normaliser(terms.token_counts, normalize)
    return estimators.taylor_terms(terms.integrand, norm, terms.d_log_prob, terms.d_integrand, terms.group,
                                   terms.d2_log_prob, terms.d2_integrand, base,
                                   controls=terms.controls if control_variates else None)


def summarize_prediction(terms: PredictionTerms, normalize: str, control_variates: bool = False) -> Prediction:
    base = estimators.proposal_weights(terms.log_prob, terms.proposal_log_prob)
    taylor = _taylor(terms, normalize, base, control_variates)
    second = taylor.curvature is not None
    return Prediction(
        entropy=taylor.entropy.value,
        entropy_se=taylor.entropy.se,
        linear=taylor.linear.value,
        linear_se=taylor.linear.se,
        curvature=taylor.curvature.value if second else None,
        quadratic=taylor.quadratic.value if second else None,
        per_sequence_linear=taylor.per_sequence_linear,
        curvature_se=taylor.curvature.se if second else None,
        quadratic_se=taylor.quadratic.se if second else None,
        dof=estimators.degrees_of_freedom(terms.group),
        control_variates=any(t is not None and t.controlled
                             for t in (taylor.entropy, taylor.linear, taylor.curvature)),
    )


def taylor_gap(prediction: PredictionTerms, measurement: MeasurementTerms, normalize: str,
               scale_index: int = 0, control_variates: bool = False) -> tuple[float, float]:
    """Measured ΔH at ``measurement``'s scale ``scale_index`` (s = 1) minus its best prediction
    (quadratic at order 2), and the jackknife SE of that paired difference: the two share E, and
    their leave-one-group-out values are differenced group by group."""
    norm = estimators.normaliser(measurement.token_counts, normalize)
    # One set of θ₀ weights for both sides of the paired difference: the value pass's.
    base = estimators.proposal_weights(measurement.log_prob_origin, measurement.proposal_log_prob)
    weights = estimators.snis_weights(measurement.log_prob[scale_index], sampled_from(measurement))
    controls = prediction.controls if control_variates else None
    measured = estimators.measured_shift(weights, measurement.integrand[scale_index], measurement.integrand_origin,
                                         norm, measurement.group, base, controls)
    gap = measured.shift - _taylor(prediction, normalize, base, control_variates).best
    return gap.value, gap.se


def predict_delta_h(model, batch: ProbeBatch, base: Mapping[str, Tensor], delta: Mapping[str, Tensor], *,
                    order: int = 2, normalize: str = "token", estimator: str = "rb",
                    microbatch_size: int | None = None, precision: Precision = "auto",
                    control_variates: bool = False) -> Prediction:
    """Taylor prediction of ΔH along Δθ: g′(0) by one JVP pass (order 1), or g′(0) and g″(0) by
    one nested JVP pass (order 2), in the derivative dtype of ``precision`` ("auto": float32, or
    float64 for a float64 model).

    ``control_variates``: subtract cross-fitted score control variates from Ĥ, g′ and g″
    (docs/method.md §5); their features come out of the same pass, at no extra cost. Off by
    default: see docs/method.md §5 on heavy-tailed features.
    """
    check_options(normalize, estimator, microbatch_size)
    check_order(order)
    check_precision(precision)
    check_flag("control_variates", control_variates)
    batch = _prepare(model, batch)
    terms = prediction_terms(model, batch, base, delta, order=order, estimator=estimator,
                             microbatch_size=microbatch_size, precision=resolve_precision(precision, model))
    return summarize_prediction(terms, normalize, control_variates)
