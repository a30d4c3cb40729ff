"""Typed results of the public functions (plain floats; standard errors are grouped jackknife)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class Estimate:
    """Ĥ on E (nats per token or per sequence) and its standard error."""

    value: float
    se: float
    num_sequences: int = 0
    num_tokens: int = 0
    dof: int = 0  # of the SE: prompt groups − 1 (95 % band: ± estimators.t_quantile(dof)·se)


@dataclass(frozen=True)
class Prediction:
    """Taylor prediction of g(s) − g(0) along the step, from derivatives at θ₀."""

    entropy: float
    entropy_se: float
    linear: float  # g′(0)
    linear_se: float
    curvature: float | None  # g″(0) (order 2)
    quadratic: float | None  # g′(0) + ½ g″(0)
    per_sequence_linear: Tensor = field(repr=False)  # a_i, sums to g′(0)
    curvature_se: float | None = None
    quadratic_se: float | None = None  # of g′(0) + ½ g″(0), jointly (order 2)
    dof: int = 0  # of every SE here: prompt groups − 1
    control_variates: bool = False  # some value here includes a control-variate correction (docs/method.md §5)

    def at_scale(self, scale: float) -> tuple[float, float | None]:
        """(s·g′(0), s·g′(0) + ½ s² g″(0)) — the linear and quadratic predictions at scale s."""
        linear = scale * self.linear
        quadratic = None if self.curvature is None else linear + 0.5 * scale**2 * self.curvature
        return linear, quadratic


@dataclass(frozen=True)
class Measurement:
    """Ĥ re-estimated by SNIS at θ₀ + sΔθ for each scale s, on the same E.

    When a step moves every sequence's sampled token out of the top-k/top-p support, all SNIS
    weights are 0 and ``entropy_after``, ``delta`` and ``ess_fraction`` are NaN at that scale
    (``outside_support`` says why).
    """

    entropy_before: float
    entropy_after: list[float]
    delta: list[float]
    delta_se: list[float]
    ess_fraction: list[float]
    outside_support: list[float]  # mean θ-side mass outside θ₀'s support per response token
    scales: tuple[float, ...]
    entropy_before_se: float = float("nan")
    delta_floor: float = float("nan")  # estimated rounding error of each delta (docs/method.md, Precision)
    dof: int = 0  # of every SE here: prompt groups − 1
    # ESS fraction of the weights q_θ₀/p at θ₀: 1 when E came from q_θ₀; below 1 it measures how
    # far the proposal E was drawn from (the rollout engine) is from the policy the probe scores.
    ess_origin: float = 1.0
    control_variates: bool = False  # some value here includes a control-variate correction (docs/method.md §5)
    # Per scale: False when the step moved more than OUTSIDE_SUPPORT_WARNING of the mass per
    # token outside θ₀'s top-k/top-p support and E came from q_θ₀ itself, which cannot see
    # there: that delta is biased and should not be used (a proposal, e.g. defensive, can see).
    usable: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class Attribution:
    """The linear prediction g′(0) along a real step, split among the samples of the update batch
    (``attribute_delta_h``): linear = Σ per_sample + momentum + weight_decay + residual."""

    per_sample: Tensor | None = field(repr=False)  # a_u [n_u]; None when the optimizer has no split
    momentum: float  # from the optimizer's carried-over state (m_{t−1}, the momentum buffer)
    weight_decay: float
    residual: float  # what the per-sample losses (or the optimizer model) do not reproduce
    linear: float  # ⟨∇Ĥ, Δθ⟩ = g′(0) along the step
    entropy: float  # Ĥ(θ₀) on E, as the gradient pass computed it
    clip_factor: float  # c in g = c·Σ_u ∇L_u
    note: str = ""
    # Adam: c·⟨J ⊙ ∇Ĥ, ∇L_u⟩ with J the exact ∂Δθ/∂g, v_t's dependence on g included (not additive)
    per_sample_jacobian: Tensor | None = field(default=None, repr=False)
    per_sample_se: Tensor | None = field(default=None, repr=False)  # grouped jackknife over E (standard_errors=True)
