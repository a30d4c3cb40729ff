"""Predictions are derivatives of measurements (docs/method.md §4, §9), checked by finite differences.

With g(s) = Ĥ(θ₀ + sΔθ) on a fixed batch E, ``predict_delta_h(...).linear`` must be g′(0) and
``.curvature`` g″(0), where ``measure_delta_h`` gives g(s) − g(0). In float64 the two agree to
1e-6 relative for GPT-2, Llama and Qwen2, full fine-tuning and LoRA, both estimators and both
normalisations. A second-order error anywhere (a missing denominator term in the SNIS ratio, a
wrong forward-mode rule such as F.layer_norm's, PyTorch #196700) shows up here.

Finite differences: 9-point central stencils in s (truncation O(h⁸)), from two calls of
``measure_delta_h`` (scales must be > 0, so s < 0 is the negated Δθ at |s|).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from entropy_callbacks import (
    SamplingConfig, entropy_estimate, measure_delta_h, predict_delta_h, sample_batch,
)
from tiny_models import EOS, PAD, add_lora, float64_rmsnorm, tiny_model

RTOL = 1e-6  # the tolerance; do not loosen

PROMPTS = [[2, 5, 7], [3, 4], [9, 10, 11, 6], [8]]
CONFIG = SamplingConfig(max_new_tokens=5, temperature=0.9)

# Δθ = STEP[mode] · N(0, 1) per entry; with H the FD step in s, the effective step is STEP·H.
# Chosen so that truncation (∝ H⁸) and float64 round-off (∝ 1/H² for g″) both stay ~100×
# below RTOL in every case (observed worst: 7e-10 for g′, 1.6e-8 for g″; at H/2 round-off
# already reaches ~1e-7 in g″, at 2H truncation ~3e-7 for GPT-2 LoRA).
STEP = {"full": 0.01, "lora": 0.1}
H = 1e-2

# Central-difference weights on s = ±h, ±2h, ±3h, ±4h (the s = 0 term of g − g(0) is 0).
FIRST = ((672, -168, 32, -3), 840)  # g′ ≈ Σ w_k (D(kh) − D(−kh)) / (840 h)
SECOND = ((8064, -1008, 128, -9), 5040)  # g″ ≈ Σ w_k (D(kh) + D(−kh)) / (5040 h²)

CASES = [(arch, mode, estimator, normalize)
         for arch, mode in [("gpt2", "full"), ("gpt2", "lora"), ("llama", "full"), ("llama", "lora"),
                            ("qwen2", "full")]
         for estimator in ("rb", "naive")
         for normalize in ("token", "sequence")]


@dataclass
class Setup:
    arch: str
    model: torch.nn.Module
    batch: object
    base: dict
    delta: dict


def numerics(arch: str):
    """Float64 references need RMSNorm computed in float64 (docs/method.md §9); GPT-2 needs nothing."""
    return contextlib.nullcontext() if arch == "gpt2" else float64_rmsnorm()


def random_step(model, base: dict, scale: float, seed: int = 7) -> dict:
    gen = torch.Generator().manual_seed(seed)
    delta = {n: scale * torch.randn(b.shape, generator=gen, dtype=b.dtype) for n, b in base.items()}
    # Llama/Qwen2 initialise the PAD embedding row to exactly zero (padding_idx) and the sampler
    # may draw PAD as a response token. RMSNorm of x = 0 + sΔ is sΔ/√(s²|Δ|²/d + ε): a branch
    # point at |s| ~ √ε/|Δ_row|, which shrinks g's radius of convergence so much that no FD step
    # has both truncation and round-off well below RTOL (best found: ~4e-7). Derivatives there
    # are still exact, but the FD reference is not, so Δθ leaves that degenerate row alone.
    embedding = model.get_input_embeddings().weight
    for name, param in model.named_parameters():
        if param is embedding and name in delta and not bool(base[name][PAD].any()):
            delta[name][PAD] = 0.0
    return delta


def build(arch: str, mode: str, directory, dtype=torch.float64) -> Setup:
    model = tiny_model(arch, directory, dtype=dtype)
    if mode == "lora":
        model = add_lora(model)
    with numerics(arch) if dtype == torch.float64 else contextlib.nullcontext():
        batch = sample_batch(model, PROMPTS, CONFIG, eos_token_id=EOS, pad_token_id=PAD,
                             responses_per_prompt=3, seed=1)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return Setup(arch, model, batch, base, random_step(model, base, STEP[mode]))


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    cache: dict[tuple, Setup] = {}

    def get(arch: str, mode: str, dtype=torch.float64) -> Setup:
        key = (arch, mode, dtype)
        if key not in cache:
            cache[key] = build(arch, mode, tmp_path_factory.mktemp(f"{arch}-{mode}"), dtype)
        return cache[key]

    return get


def negated(delta: dict) -> dict:
    return {n: -d for n, d in delta.items()}


def finite_differences(setup: Setup, h: float = H, **options) -> tuple[float, float]:
    """(g′(0), g″(0)) from measured ΔH at s = ±h, ±2h, ±3h, ±4h."""
    scales = tuple(k * h for k in range(1, 5))
    plus = measure_delta_h(setup.model, setup.batch, setup.base, setup.delta, scales=scales, **options).delta
    minus = measure_delta_h(setup.model, setup.batch, setup.base, negated(setup.delta), scales=scales,
                            **options).delta
    (w1, d1), (w2, d2) = FIRST, SECOND
    first = sum(w * (p - m) for w, p, m in zip(w1, plus, minus)) / (d1 * h)
    second = sum(w * (p + m) for w, p, m in zip(w2, plus, minus)) / (d2 * h * h)
    return first, second


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


def prediction_errors(setup: Setup, **options) -> tuple[float, float, object]:
    """Relative errors of (linear, curvature) against finite differences, and the prediction."""
    with numerics(setup.arch):
        prediction = predict_delta_h(setup.model, setup.batch, setup.base, setup.delta, order=2, **options)
        first, second = finite_differences(setup, **options)
    return relative(prediction.linear, first), relative(prediction.curvature, second), prediction


@pytest.mark.parametrize("arch, mode, estimator, normalize", CASES, ids=["-".join(c) for c in CASES])
def test_prediction_is_the_derivative_of_the_measurement(setups, arch, mode, estimator, normalize):
    setup = setups(arch, mode)
    linear_error, curvature_error, prediction = prediction_errors(setup, estimator=estimator, normalize=normalize)
    assert linear_error <= RTOL, f"g′(0) {prediction.linear!r} vs FD: relative error {linear_error:.2e}"
    assert curvature_error <= RTOL, f"g″(0) {prediction.curvature!r} vs FD: relative error {curvature_error:.2e}"
    # The quadratic prediction is built from the same two numbers.
    assert prediction.quadratic == pytest.approx(prediction.linear + 0.5 * prediction.curvature, rel=1e-12)


def test_order_one_gives_the_same_linear_term(setups):
    setup = setups("llama", "lora")
    with numerics("llama"):
        first = predict_delta_h(setup.model, setup.batch, setup.base, setup.delta, order=1)
        second = predict_delta_h(setup.model, setup.batch, setup.base, setup.delta, order=2)
    assert first.curvature is None and first.quadratic is None
    assert relative(first.linear, second.linear) <= 1e-12
    assert relative(first.entropy, second.entropy) <= 1e-12


def _response_entropy(setup: Setup):
    """A plain scalar of GPT-2's logits: Σ over response tokens of the softmax entropy."""
    batch = setup.batch
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                  position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0))

    def phi(params):
        modes = [(m, m.training) for m in setup.model.modules()]
        setup.model.eval()  # no dropout (a peft model comes back in train mode)
        try:
            log_p = functional_call(setup.model, params, (), kwargs).logits.log_softmax(-1)
        finally:
            for module, training in modes:
                module.training = training
        return -(log_p.exp() * log_p).sum(-1)[batch.response_mask].sum()

    return phi


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_layer_norm_workaround_is_needed_and_works(setups, mode):
    """docs/method.md §9: nested forward-mode AD through F.layer_norm is silently wrong in this torch
    (PyTorch #196700). Shown on GPT-2 with torch.func alone; predict_delta_h's curvature on the
    same model and step still matches finite differences, because the library avoids it."""
    setup = setups("gpt2", mode)
    phi = _response_entropy(setup)
    base, delta = setup.base, setup.delta

    def curvature_by_nested_jvp():
        first = lambda params: jvp(phi, (params,), (delta,))[1]  # noqa: E731
        with sdpa_kernel([SDPBackend.MATH]), torch.enable_grad():
            return float(jvp(first, (base,), (delta,))[1])

    with torch.no_grad():
        at_origin = float(phi(base))
        shift = lambda s: float(phi({n: base[n] + s * delta[n] for n in base})) - at_origin  # noqa: E731
        (w2, d2) = SECOND
        reference = sum(w * (shift(k * H) + shift(-k * H)) for k, w in enumerate(w2, 1)) / (d2 * H * H)

    raw_error = relative(curvature_by_nested_jvp(), reference)
    assert raw_error > 1e-2, (
        f"nested jvp through F.layer_norm now matches finite differences (relative error {raw_error:.1e}): "
        "PyTorch #196700 looks fixed in this torch, so the layer-norm workaround in entropy_callbacks "
        "may no longer be needed")

    # The cause is F.layer_norm: the same nested jvp with layer norm written as mean/rsqrt is right.
    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        dims = tuple(range(-len(shape), 0))
        centred = x - x.mean(dims, keepdim=True)
        y = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
        return y * weight + bias

    original = F.layer_norm
    F.layer_norm = layer_norm
    try:
        assert relative(curvature_by_nested_jvp(), reference) <= RTOL
    finally:
        F.layer_norm = original

    # And the library's second-order prediction on this model is right.
    linear_error, curvature_error, _ = prediction_errors(setup)
    assert linear_error <= RTOL and curvature_error <= RTOL, (linear_error, curvature_error)


# ---------------------------------------------------------------------------------------------
# Microbatching: the batch is scored in pieces, but the numbers must not depend on the pieces.

@pytest.mark.parametrize("mode", ["full", "lora"])
def test_microbatch_size_does_not_change_results_float32(setups, mode):
    # Llama only: float32 GEMMs on CPU can depend on the number of rows (BLAS row blocking).
    # Here that happens in GPT-2 (Conv1D): its g′, g″ move by up to ~1e-5 relative (LoRA) with
    # microbatch_size, under either attention kernel, so GPT-2 cannot meet RTOL in float32.
    setup = setups("llama", mode, torch.float32)
    model, batch, base, delta = setup.model, setup.batch, setup.base, setup.delta
    assert len(batch) == 12

    def results(microbatch_size):
        estimate = entropy_estimate(model, batch, microbatch_size=microbatch_size)
        prediction = predict_delta_h(model, batch, base, delta, microbatch_size=microbatch_size)
        # The library runs every probe pass on its own attention (attention.grouped_attention),
        # row-for-row the same at any batch size (CPU flash attention splits its work by batch
        # size, which moved float32 per-token values by ~1e-7 and ΔH by ~1e-5..1e-4 relative).
        measurement = measure_delta_h(model, batch, base, delta, scales=(0.5, 1.0),
                                      microbatch_size=microbatch_size)
        return {"entropy": estimate.value, "entropy_se": estimate.se, "linear": prediction.linear,
                "curvature": prediction.curvature, "delta(0.5)": measurement.delta[0],
                "delta(1)": measurement.delta[1], "delta_se(1)": measurement.delta_se[1]}

    whole = results(None)
    for size in (1, 5, 12):
        pieces = results(size)
        for key, value in whole.items():
            assert relative(pieces[key], value) <= RTOL, (size, key, pieces[key], value)


@pytest.mark.parametrize("arch, mode", [("gpt2", "full"), ("gpt2", "lora"), ("llama", "full"), ("llama", "lora")])
def test_proposal_weighted_derivatives_match_finite_differences(setups, arch, mode):
    """E handed over with proposal log-probabilities (docs/method.md §3): g′ and g″ of the
    b_i-weighted ratio are still the derivatives of the weighted measurement."""
    import dataclasses

    setup = setups(arch, mode)
    batch = setup.batch
    gen = torch.Generator().manual_seed(3)
    # A proposal other than q_θ₀: its log-probabilities off by up to ±0.5 nats per sequence.
    log_p = batch.sampler_log_probs.sum(-1).double() + (torch.rand(len(batch), generator=gen, dtype=torch.float64) - 0.5)
    weighted = dataclasses.replace(setup, batch=dataclasses.replace(batch, proposal_log_probs=log_p))
    linear_error, curvature_error, prediction = prediction_errors(weighted)
    assert linear_error <= RTOL, f"g′(0) {prediction.linear!r} vs FD: relative error {linear_error:.2e}"
    assert curvature_error <= RTOL, f"g″(0) {prediction.curvature!r} vs FD: relative error {curvature_error:.2e}"
    unweighted = prediction_errors(setup)[2]
    assert abs(prediction.linear - unweighted.linear) > 1e3 * RTOL * abs(unweighted.linear)  # the weights matter
