"""Top-p / top-k without bias: E drawn from a defensive proposal (docs/method.md §3).

A step large enough to move tokens into the top-p (top-k) support puts mass where E, drawn
from q_θ₀, has no sequences: the plain SNIS measurement is biased. Drawn instead from
(1 − ε)·q_θ₀ + ε·q_θ₀,untruncated and weighted back, it is not. Checked against the exact
population ΔH (every response enumerated, ``test_exact_enumeration``, whose reference implements
top-k and top-p) over 50 seeds.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from entropy_callbacks import SamplingConfig, measure_delta_h, sample_batch
from test_exact_enumeration import (  # noqa: F401  (environment, model, base: fixtures used here)
    EOS, LARGE_STEP, MAX_NEW, PAD, PROMPTS, RESPONSES_PER_SLOT, Reference, base, environment, model,
    supports_equal,
)

CASES = {
    "tau0.7-top_p0.85": SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.7, top_p=0.85),
    "tau1-top_p0.85": SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.85),
    "tau1-top_k3": SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, top_k=3),
}
DEFENSIVE = 0.1
SEEDS = range(1, 51)
SLOTS = 250


@pytest.fixture(scope="module")
def references(model, base):
    return {name: Reference(model, base, config) for name, config in CASES.items()}


def measured(model, base, reference: Reference, config: SamplingConfig, seed: int, defensive: float,
             norm: str = "token") -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [PROMPTS[j] for j in torch.randint(len(PROMPTS), (SLOTS,), generator=gen).tolist()]
    batch = sample_batch(model, prompts, config, eos_token_id=EOS, pad_token_id=PAD,
                         responses_per_prompt=RESPONSES_PER_SLOT, seed=seed, defensive=defensive)
    step = {n: LARGE_STEP * d for n, d in reference.direction.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the outside-support warning fires by design here
        result = measure_delta_h(model, batch, base, step, normalize=norm)
    return result.delta[0], result.delta_se[0]


@pytest.fixture(scope="module")
def z_scores(model, base, references):
    out = {}
    for name, config in CASES.items():
        ref = references[name]
        exact = float(ref.large["token"] - ref.at_origin["token"])
        for defensive in (0.0, DEFENSIVE):
            rows = [measured(model, base, ref, config, seed, defensive) for seed in SEEDS]
            out[(name, defensive)] = torch.tensor([(value - exact) / se for value, se in rows], dtype=torch.float64)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_the_step_moves_the_support(references, name):
    ref = references[name]
    assert ref.large["outside"] > 5e-3 and not supports_equal(ref.at_origin, ref.large)


@pytest.mark.parametrize("name", list(CASES))
def test_defensive_proposal_measures_without_bias(z_scores, name):
    plain, defensive = z_scores[(name, 0.0)], z_scores[(name, DEFENSIVE)]
    print(f"{name}: plain z mean {float(plain.mean()):+.3f} std {float(plain.std()):.3f}; "
          f"defensive z mean {float(defensive.mean()):+.3f} std {float(defensive.std()):.3f}")
    assert abs(float(defensive.mean())) < 0.5 and 0.7 <= float(defensive.std()) <= 1.4
    # the plain estimator's bias: its mean z is > 3 standard errors of a mean from 0 (measured:
    # −2.13 at τ 0.7, −0.69 at τ 1, against −0.40 and −0.21 with the defensive proposal)
    assert abs(float(plain.mean())) > 3 * float(plain.std()) / len(SEEDS) ** 0.5


def test_defensive_changes_nothing_without_truncation(model):
    config = SamplingConfig(max_new_tokens=MAX_NEW)
    a = sample_batch(model, PROMPTS, config, eos_token_id=EOS, pad_token_id=PAD, seed=3)
    b = sample_batch(model, PROMPTS, config, eos_token_id=EOS, pad_token_id=PAD, seed=3, defensive=DEFENSIVE)
    assert torch.equal(a.input_ids, b.input_ids) and b.proposal_log_probs is None


@pytest.mark.parametrize("value", [-0.1, 1.0, True, "0.1"])
def test_bad_defensive_weight_is_refused(model, value):
    with pytest.raises(ValueError, match="defensive must be a number in"):
        sample_batch(model, PROMPTS, CASES["tau1-top_p0.85"], eos_token_id=EOS, pad_token_id=PAD, defensive=value)


def test_probe_records_stay_finite_with_draws_outside_the_support(model, references):
    """The callback's core under top-p (defensive by default): draws outside θ₀'s support have
    q_θ₀ = 0, and every per-sequence number of the record is still finite."""
    import copy
    import math

    from entropy_callbacks.step_probe import ProbeOptions, StepProbe

    policy = copy.deepcopy(model)
    options = ProbeOptions(sampling=CASES["tau0.7-top_p0.85"], responses_per_prompt=8, order=2, precision="float64")
    assert options.defensive == DEFENSIVE
    core = StepProbe(options, PROMPTS * 5, eos_token_id=EOS, pad_token_id=PAD)
    core.begin(policy, step=0, lr=1e-3)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            param.add_(LARGE_STEP * references["tau0.7-top_p0.85"].direction[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = core.finish(policy)
    assert record.proposal and record.ess_origin < 1
    assert all(math.isfinite(v) for v in record.per_sequence_weight + record.per_sequence_linear)
    assert math.isfinite(record.delta_measured) and math.isfinite(record.delta_quadratic)
