"""The framework-free core of EntropyProbe: probe one real optimizer step.

``begin`` (before the optimizer step) samples E at θ₀ and snapshots the trainable parameters;
``measure_local`` (after it) takes Δθ = θ₁ − θ₀ and runs the prediction and measurement passes
on this rank's share of E; ``summarize`` combines the shares of all ranks exactly into one
``ProbeRecord``. The Lightning callback moves the shares between ranks; the core never imports
Lightning.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, Sequence

import torch

from . import estimators
from .engine import (check_flag, check_options, check_order, concat_terms, measurement_terms, prediction_terms, sampled_from,
                     summarize_measurement, summarize_prediction, taylor_gap)
from .params import check_scales
from .precision import Precision, check_precision, resolve_precision
from .sampling import DecodeOptions, ProbeBatch, SamplingConfig, check_defensive, sample_batch
from .step import is_skipped, snapshot, step_delta, step_norm

# With top-k/top-p, E is drawn from 0.9·q_θ₀ + 0.1·(q_θ₀ untruncated) and weighted back, so a
# step that moves tokens into the support is measured without bias (docs/method.md §3).
DEFAULT_DEFENSIVE = 0.1


class Sampler(Protocol):
    """Draws E for the probe from the user's own rollout engine.

    Called as ``sampler(model, prompts, config, responses_per_prompt=R, seed=seed)`` with the
    policy at θ₀, G token-id prompts and the probe's SamplingConfig; returns a ProbeBatch of
    G·R sequences, prompt-major, with ``config`` as given (it defines the q_θ the probe scores),
    usually from ``ProbeBatch.from_sequences(..., proposal_log_probs=...)``. It must not change
    the model's parameters or the global RNG (fork it: ``torch.random.fork_rng``).
    """

    def __call__(self, model: torch.nn.Module, prompts: list[list[int]], config: SamplingConfig, *,
                 responses_per_prompt: int, seed: int) -> ProbeBatch: ...


def check_sampled(batch: object, config: SamplingConfig, prompts: int, responses_per_prompt: int) -> ProbeBatch:
    """A sampler's result, checked: what the probe will score must be what it asked for."""
    if not isinstance(batch, ProbeBatch):
        raise ValueError(f"the sampler returned {type(batch).__name__}; return a ProbeBatch "
                         "(ProbeBatch.from_sequences turns token lists into one)")
    if len(batch) != prompts * responses_per_prompt:
        raise ValueError(f"the sampler returned {len(batch)} sequences for {prompts} prompts x "
                         f"{responses_per_prompt} responses; return G·R sequences, prompt-major")
    if batch.config != config:
        raise ValueError(f"the sampler's ProbeBatch has config {batch.config}, the probe's is {config}; build it "
                         "with the config the sampler was given (it defines the q_θ the probe scores)")
    expected = torch.arange(prompts).repeat_interleave(responses_per_prompt)
    if not torch.equal(batch.group.cpu(), expected):
        raise ValueError("the sampler's ProbeBatch is not prompt-major (group must be 0,0,..,1,1,..): give the "
                         "R responses of each prompt together, in the order of the prompts")
    return batch


@dataclass(frozen=True)
class ProbeOptions:
    """What to probe and how (validated on construction)."""

    sampling: SamplingConfig
    every_n_steps: int = 10
    responses_per_prompt: int = 1
    order: int = 2
    scales: tuple[float, ...] = (1.0,)
    normalize: Literal["token", "sequence"] = "token"
    estimator: Literal["rb", "naive"] = "rb"
    microbatch_size: int | None = 64
    seed: int = 0
    snapshot_device: Literal["auto", "cpu"] = "auto"
    precision: Precision = "auto"
    defensive: float = DEFAULT_DEFENSIVE
    control_variates: bool = False
    decode: DecodeOptions = DecodeOptions()

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingConfig):
            raise ValueError(f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        if isinstance(self.every_n_steps, bool) or not isinstance(self.every_n_steps, int) or self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {self.every_n_steps!r}")
        if self.responses_per_prompt < 1:
            raise ValueError(f"responses_per_prompt must be >= 1, got {self.responses_per_prompt!r}")
        check_order(self.order)
        check_options(self.normalize, self.estimator, self.microbatch_size)
        scales = check_scales(self.scales)
        # s = 1 is the real step: always measured, and listed first.
        object.__setattr__(self, "scales", tuple(dict.fromkeys((1.0,) + scales)))  # no duplicate tags
        if self.snapshot_device not in ("auto", "cpu"):
            raise ValueError(f"snapshot_device must be 'auto' or 'cpu', got {self.snapshot_device!r}")
        check_precision(self.precision)
        check_defensive(self.defensive)
        check_flag("control_variates", self.control_variates)
        if not isinstance(self.decode, DecodeOptions):
            raise ValueError(f"decode must be a DecodeOptions, got {type(self.decode).__name__}")


@dataclass
class ProbeRecord:
    """Everything one probe found (JSON-serialisable via ``to_json``)."""

    step: int
    skipped: bool = False
    entropy_before: float = math.nan
    entropy_before_se: float = math.nan
    delta_measured: float = math.nan
    delta_measured_se: float = math.nan
    delta_measured_floor: float = math.nan
    delta_linear: float = math.nan
    delta_linear_se: float = math.nan
    curvature: float | None = None
    curvature_se: float | None = None
    delta_quadratic: float | None = None
    delta_quadratic_se: float | None = None
    taylor_error: float = math.nan
    taylor_error_se: float = math.nan  # jackknife SE of the paired difference measured − prediction
    ess: float = math.nan
    step_norm: float = math.nan
    lr: float = math.nan  # the first parameter group's, as the step used it (before a scheduler steps)
    delta_linear_per_lr: float = math.nan
    delta_linear_per_lr_se: float = math.nan
    probe_seconds: float = math.nan
    scales: list[float] = field(default_factory=list)
    delta_measured_at: list[float] = field(default_factory=list)
    delta_measured_se_at: list[float] = field(default_factory=list)
    ess_at: list[float] = field(default_factory=list)
    ess_origin: float = 1.0  # of the weights q_θ₀/p at θ₀: below 1 when E came from another proposal
    proposal: bool = False  # E carried proposal log-probabilities (a sampler of the user's)
    outside_support: list[float] = field(default_factory=list)
    num_sequences: int = 0
    num_tokens: int = 0
    dof: int = 0  # of every SE: prompt groups − 1; bands are ± t_quantile(dof)·SE
    control_variates: bool = False  # the estimates and SEs include score control variates
    # False when the step moved mass outside θ₀'s top-k/top-p support that E, drawn from q_θ₀
    # itself, cannot see (outside_support above the warning level): the measured ΔH is biased
    delta_measured_usable: bool = True
    per_sequence_linear: list[float] = field(default_factory=list)
    per_sequence_weight: list[float] = field(default_factory=list)  # SNIS weight at s = 1, mean 1
    # Attribution to the update batch (docs/method.md §6; modules with entropy_probe_losses):
    # linear (⟨∇Ĥ, Δθ⟩, no control variates) = Σ rollout_a + momentum + weight decay + residual
    attribution_linear: float = math.nan
    attribution_momentum: float = math.nan
    attribution_weight_decay: float = math.nan
    attribution_residual: float = math.nan
    rollout_a: list[float] = field(default_factory=list)
    rollout_a_jacobian: list[float] = field(default_factory=list)  # Adam: v_t's dependence included
    top_rollouts: list[dict] = field(default_factory=list)  # the largest |a_u|: text, reward, advantage
    cui_pearson: float = math.nan  # Pearson(a_u, −lr·Cov(log π, A) per rollout), Cui et al.'s proxy

    def metrics(self, truncates: bool, prefix: str = "entropy/") -> dict[str, float]:
        """Scalars under the ``prefix`` tags (``entropy/`` by default)."""
        if self.skipped:
            return {}
        relative = abs(self.taylor_error / self.delta_measured) if self.delta_measured else math.nan
        t = estimators.t_quantile(self.dof)  # 95 % bands with G − 1 degrees of freedom
        m = {
            "before": self.entropy_before,
            "before_se": self.entropy_before_se,
            "before_lower": self.entropy_before - t * self.entropy_before_se,
            "before_upper": self.entropy_before + t * self.entropy_before_se,
            "delta_measured": self.delta_measured,
            "delta_measured_se": self.delta_measured_se,
            "delta_measured_floor": self.delta_measured_floor,
            "delta_measured_lower": self.delta_measured - t * self.delta_measured_se,
            "delta_measured_upper": self.delta_measured + t * self.delta_measured_se,
            "delta_linear": self.delta_linear,
            "delta_linear_se": self.delta_linear_se,
            "taylor_error": self.taylor_error,
            "taylor_error_se": self.taylor_error_se,
            "taylor_error_relative": relative,  # |measured − prediction| / |measured|
            "ess": self.ess,
            "step_norm": self.step_norm,
            "lr": self.lr,
            "delta_linear_per_lr": self.delta_linear_per_lr,
            "delta_linear_per_lr_se": self.delta_linear_per_lr_se,
            "probe_seconds": self.probe_seconds,
        }
        if self.proposal:
            m["ess_origin"] = self.ess_origin  # the rollout engine's mismatch with the scorer
        if self.delta_quadratic is not None:
            m["delta_quadratic"] = self.delta_quadratic
            m["delta_quadratic_se"] = self.delta_quadratic_se
            m["curvature"] = self.curvature
        for scale, delta in zip(self.scales[1:], self.delta_measured_at[1:]):
            m[f"delta_measured@{scale:g}"] = delta
        if truncates:
            m["outside_support"] = self.outside_support[0]
        if self.rollout_a and self.attribution_linear:
            for part in ("momentum", "weight_decay", "residual"):
                m[f"attribution/{part}_share"] = getattr(self, f"attribution_{part}") / self.attribution_linear
            m["attribution/cui_pearson"] = self.cui_pearson
        if not self.delta_measured_usable:  # biased (outside_support says why): not plotted as if it were not
            m = {k: v for k, v in m.items() if not k.startswith(("delta_measured", "taylor_error"))}
        return {prefix + name: value for name, value in m.items()}

    def to_json(self) -> dict:
        """A dict for strict JSON: NaN becomes None (null), also inside lists and their dicts
        (``top_rollouts``)."""
        def clean(v):
            if isinstance(v, float) and math.isnan(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return [clean(x) for x in v] if isinstance(v, list) else v
        return clean(asdict(self))


def relative_weights(terms) -> torch.Tensor:
    """SNIS weights at s = 1 (the real step) divided by their mean: 1 everywhere when the step
    changed nothing, far from 1 for the sequences it made much more or less likely. With a
    proposal p they are q_θ₁/p (q_θ₁/q_θ₀ is undefined for a defensive draw outside θ₀'s support)."""
    weights = estimators.snis_weights(terms.log_prob[0], sampled_from(terms))
    return weights / weights.mean()


def step_seed(seed: int, step: int) -> int:
    """E's sampling seed at a step: a function of (seed, step) only, so a resumed run draws
    the same E as an uninterrupted one."""
    digest = hashlib.blake2b(f"entropy-probe/{seed}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


@dataclass
class _Pending:
    step: int
    batch: ProbeBatch
    before: dict[str, torch.Tensor]
    lr: float
    started: float
    seconds: float
    delta: dict[str, torch.Tensor] | None = None  # Δθ taken right after the step (``capture``)


@dataclass
class LocalTerms:
    """One rank's share of a probe, before the ranks are combined (picklable)."""

    step: int
    lr: float
    step_norm: float
    seconds: float
    skipped: bool = False
    prediction: object = None  # engine.PredictionTerms
    measurement: object = None  # engine.MeasurementTerms


class StepProbe:
    """Predict and measure the entropy change of selected optimizer steps of one policy."""

    def __init__(self, options: ProbeOptions, prompts: Sequence[Sequence[int]], *, eos_token_id, pad_token_id: int,
                 prompt_indices: Sequence[int] | None = None, sampler: Sampler | None = None) -> None:
        self.options = options
        self.sampler = sampler
        self.prompts = [list(p) for p in prompts]
        self.prompt_indices = list(range(len(self.prompts))) if prompt_indices is None else list(prompt_indices)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.pending: _Pending | None = None

    def due(self, step: int) -> bool:
        return step % self.options.every_n_steps == 0

    def begin(self, model: torch.nn.Module, step: int, lr: float = math.nan) -> ProbeBatch:
        """Before the optimizer step: sample E at θ₀ and snapshot the trainable parameters."""
        started = time.perf_counter()
        o = self.options
        if self.sampler is None:
            batch = sample_batch(model, self.prompts, o.sampling, eos_token_id=self.eos_token_id,
                                 pad_token_id=self.pad_token_id, responses_per_prompt=o.responses_per_prompt,
                                 seed=step_seed(o.seed, step), batch_size=o.microbatch_size,
                                 prompt_indices=self.prompt_indices, defensive=o.defensive, decode=o.decode)
        else:
            batch = check_sampled(self.sampler(model, self.prompts, o.sampling, responses_per_prompt=o.responses_per_prompt,
                                               seed=step_seed(o.seed, step)),
                                  o.sampling, len(self.prompts), o.responses_per_prompt)
            # The rank's prompts have global indices (DDP shards): the jackknife groups use them.
            batch.group = torch.as_tensor(self.prompt_indices, device=batch.group.device)[batch.group]
        self.pending = _Pending(step, batch, snapshot(model, o.snapshot_device), lr, started,
                                time.perf_counter() - started)
        return batch

    def cancel(self) -> None:
        self.pending = None

    def capture(self, model: torch.nn.Module) -> None:
        """Right after the optimizer step: take Δθ = θ₁ − θ₀ now, so that later steps before
        ``measure_local`` (two ``opt.step()`` in one manual-optimization batch) do not enter it."""
        if self.pending is not None and self.pending.delta is None:
            self.pending.delta = step_delta(model, self.pending.before)

    def measure_local(self, model: torch.nn.Module) -> "LocalTerms":
        """After the optimizer step: Δθ (as captured, else θ now − θ₀), and the per-sequence
        terms of this rank's share of E."""
        pending, self.pending = self.pending, None
        if pending is None:
            raise RuntimeError("measure_local() called without begin()")
        started = time.perf_counter()
        o = self.options
        delta = pending.delta if pending.delta is not None else step_delta(model, pending.before)
        local = LocalTerms(step=pending.step, lr=pending.lr, step_norm=step_norm(delta), seconds=pending.seconds)
        if is_skipped(delta):
            local.skipped = True
            return local
        kwargs = dict(estimator=o.estimator, microbatch_size=o.microbatch_size,
                      precision=resolve_precision(o.precision, model))
        base = pending.before  # moved to each parameter's device where used
        local.prediction = prediction_terms(model, pending.batch, base, delta, order=o.order, **kwargs)
        # The prediction's primal values at θ₀ stand in for the measurement's θ₀ pass (same
        # precision) or for its partner pass (another precision).
        local.measurement = measurement_terms(model, pending.batch, base, delta, scales=o.scales,
                                              origin=local.prediction, **kwargs)
        local.seconds += time.perf_counter() - started
        return local

    def finish(self, model: torch.nn.Module) -> ProbeRecord:
        """Single process: ``measure_local`` then ``summarize``."""
        return self.summarize([self.measure_local(model)])

    def summarize(self, parts: Sequence["LocalTerms"]) -> ProbeRecord:
        """Combine the ranks' terms exactly (concatenated per sequence) into one record."""
        first = parts[0]
        if first.skipped:
            return ProbeRecord(step=first.step, skipped=True, lr=first.lr)
        started = time.perf_counter()
        o = self.options
        prediction = concat_terms([p.prediction for p in parts])
        measurement = concat_terms([p.measurement for p in parts])
        controls = prediction.controls if o.control_variates else None
        predicted = summarize_prediction(prediction, o.normalize, o.control_variates)
        measured = summarize_measurement(measurement, o.scales, o.normalize, controls=controls)
        quadratic = predicted.quadratic
        gap, gap_se = taylor_gap(prediction, measurement, o.normalize, control_variates=o.control_variates)
        seconds = max(p.seconds for p in parts) + time.perf_counter() - started
        return ProbeRecord(
            step=first.step,
            entropy_before=measured.entropy_before,
            entropy_before_se=measured.entropy_before_se,
            delta_measured=measured.delta[0],
            delta_measured_se=measured.delta_se[0],
            delta_measured_floor=measured.delta_floor,
            delta_linear=predicted.linear,
            delta_linear_se=predicted.linear_se,
            curvature=predicted.curvature,
            curvature_se=predicted.curvature_se,
            delta_quadratic=quadratic,
            delta_quadratic_se=predicted.quadratic_se,
            taylor_error=gap,
            taylor_error_se=gap_se,
            ess=measured.ess_fraction[0],
            step_norm=first.step_norm,
            lr=first.lr,
            delta_linear_per_lr=predicted.linear / first.lr if first.lr else math.nan,
            delta_linear_per_lr_se=predicted.linear_se / first.lr if first.lr else math.nan,
            probe_seconds=seconds,
            scales=list(o.scales),
            delta_measured_at=list(measured.delta),
            delta_measured_se_at=list(measured.delta_se),
            ess_at=list(measured.ess_fraction),
            ess_origin=measured.ess_origin,
            proposal=measurement.proposal_log_prob is not None,
            outside_support=list(measured.outside_support),
            num_sequences=int(prediction.group.numel()),
            dof=predicted.dof,
            control_variates=measured.control_variates,
            delta_measured_usable=measured.usable[0],
            num_tokens=int(prediction.token_counts.sum()),
            per_sequence_linear=predicted.per_sequence_linear.tolist(),
            per_sequence_weight=relative_weights(measurement).tolist(),
        )
