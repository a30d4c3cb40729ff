"""The measured ΔH is the step, not float rounding, at the learning rates people train with.

Every case is one step in which each trainable coordinate moves by ±lr (the size of a first
AdamW step), on the model as users hold it (fp32; bf16 base + LoRA in fp32 or bf16), checked
against the same E and the same step scored on a float64 copy of the same weights (HF's RMSNorm
computed in float64 there, ``float64_rmsnorm``) with precision="model", a path that casts
nothing.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from entropy_callbacks import SamplingConfig, entropy_estimate, measure_delta_h, predict_delta_h, sample_batch
from entropy_callbacks.layerwise import parameters_at, units
from entropy_callbacks.params import StepPoint
from entropy_callbacks.precision import exact_numerics, resolve_precision
from tiny_models import EOS, PAD, add_lora, float64_rmsnorm, tiny_model

VOCAB = 64
PROMPTS = [[2 + (7 * i + j) % (VOCAB - 3) for j in range(2 + i % 3)] for i in range(8)]
CONFIG = SamplingConfig(max_new_tokens=12)
LRS = (1e-6, 1e-5, 1e-4)
MODELS = ("llama-fp32", "qwen2-fp32", "gpt2-fp32", "llama-bf16+lora-fp32", "qwen2-bf16+lora-bf16")


def build(kind: str, directory) -> torch.nn.Module:
    arch, _, rest = kind.partition("-")
    base_dtype = torch.bfloat16 if rest.startswith("bf16") else torch.float32
    model = tiny_model(arch, directory, vocab=VOCAB, hidden=32, layers=2, dtype=base_dtype)
    if "lora" in rest:
        model = add_lora(model, r=8)
        adapter_dtype = torch.float32 if rest.endswith("fp32") else torch.bfloat16
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(adapter_dtype)
    return model


def sign_step(model, lr: float, seed: int = 0):
    """θ₀ and Δθ = θ₁ − θ₀ where θ₁ = θ₀ ± lr per coordinate, rounded to the parameter's dtype."""
    gen = torch.Generator().manual_seed(seed)
    base, delta = {}, {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            sign = torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1
            after = (p.detach().float() + lr * sign).to(p.dtype)
            base[name] = p.detach().clone()
            delta[name] = after.float() - p.detach().float()
    return base, delta


def float64_reference(model, batch, base, delta):
    """(Ĥ, measured ΔH, linear prediction) on a float64 copy of the same weights."""
    copy64 = copy.deepcopy(model).double()
    base64 = {n: t.double() for n, t in base.items()}
    delta64 = {n: t.double() for n, t in delta.items()}
    with float64_rmsnorm():
        measured = measure_delta_h(copy64, batch, base64, delta64, precision="model")
        linear = predict_delta_h(copy64, batch, base64, delta64, order=1, precision="model").linear
    return measured.entropy_before, measured.delta[0], linear


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{(kind, lr): (model, batch, base, delta, reference)} for every model and lr."""
    directory = tmp_path_factory.mktemp("precision")
    out = {}
    for kind in MODELS:
        model = build(kind, directory)
        batch = sample_batch(model, PROMPTS, CONFIG, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=4,
                             seed=1)
        for lr in LRS:
            base, delta = sign_step(model, lr)
            out[kind, lr] = (model, batch, base, delta, float64_reference(model, batch, base, delta))
    return out


@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("kind", MODELS)
def test_default_measurement_and_prediction_match_float64(cases, kind, lr):
    model, batch, base, delta, (entropy, measured, linear) = cases[kind, lr]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "below the rounding floor" warning either
        m = measure_delta_h(model, batch, base, delta)
        p = predict_delta_h(model, batch, base, delta, order=1)
    assert m.delta[0] == pytest.approx(measured, rel=1e-2)
    assert p.linear == pytest.approx(linear, rel=1e-2)
    assert m.entropy_before == pytest.approx(entropy, rel=1e-6)
    assert entropy_estimate(model, batch).value == pytest.approx(entropy, rel=1e-6)
    assert abs(m.delta[0] - measured) <= m.delta_floor
    assert m.delta_floor < 1e-3 * abs(measured)  # the floor is far below the step: no false alarm


@pytest.mark.parametrize("policy", ["model", "float32"])
@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("kind", MODELS)
def test_floor_bounds_the_rounding_error_of_cheaper_policies(cases, kind, lr, policy):
    model, batch, base, delta, (_, measured, _) = cases[kind, lr]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = measure_delta_h(model, batch, base, delta, precision=policy)
    assert abs(m.delta[0] - measured) <= m.delta_floor


@pytest.mark.parametrize("kind", ["llama-fp32", "llama-bf16+lora-fp32", "qwen2-bf16+lora-bf16"])
def test_model_precision_is_rounding_at_lr_1e6_and_warns(cases, kind):
    """The reference can tell: in the model's own dtype the measurement is off by far more
    than 1 %, and the probe says so."""
    model, batch, base, delta, (_, measured, _) = cases[kind, 1e-6]
    with pytest.warns(UserWarning, match="below the estimated rounding error"):
        m = measure_delta_h(model, batch, base, delta, precision="model")
    assert abs(m.delta[0] - measured) > 0.1 * abs(measured)


def test_policies_resolve_on_cpu(tmp_path):
    fp32 = tiny_model("llama", tmp_path, vocab=VOCAB)
    assert resolve_precision("auto", fp32) == resolve_precision("auto", fp32.to(torch.bfloat16))
    auto = resolve_precision("auto", tiny_model("llama", tmp_path, vocab=VOCAB))
    assert (auto.values, auto.derivatives) == (torch.float64, torch.float32)
    auto64 = resolve_precision("auto", tiny_model("llama", tmp_path, vocab=VOCAB, dtype=torch.float64))
    assert (auto64.values, auto64.derivatives) == (torch.float64, torch.float64)
    model = resolve_precision("model", fp32)
    assert (model.values, model.derivatives) == (None, None)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp64", fp32)


# ---------------------------------------------------------------------------- flags and autocast
def _flags():
    backends = torch.backends
    return (torch.get_float32_matmul_precision(), backends.cuda.matmul.fp32_precision,
            backends.mkldnn.matmul.fp32_precision, backends.cudnn.conv.fp32_precision,
            torch.is_autocast_enabled("cpu"))


def test_numerics_flags_are_set_for_passes_and_restored_exactly(tmp_path, monkeypatch):
    import entropy_callbacks.engine as engine

    model = tiny_model("llama", tmp_path, vocab=VOCAB)
    batch = sample_batch(model, PROMPTS, CONFIG, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=2)
    base, delta = sign_step(model, 1e-5)
    plain = measure_delta_h(model, batch, base, delta)
    seen = []
    original = engine.score_values

    def spy(*args, **kwargs):
        seen.append(_flags())
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "score_values", spy)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what Lightning recommends on Ampere+: TF32
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before = _flags()
            under_autocast = measure_delta_h(model, batch, base, delta)
            after = _flags()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert before == after and before[0] == "high" and before[4]
    assert seen and all(f == ("highest", "ieee", "ieee", "ieee", False) for f in seen)
    assert under_autocast == plain  # the training step's autocast does not reach the probe


# ---------------------------------------------------------------------------- float16
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_float16_models_give_finite_results_or_a_clear_error(tmp_path, arch):
    model = tiny_model(arch, tmp_path, vocab=VOCAB, dtype=torch.float16)
    final_norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm
    with torch.no_grad():  # activations beyond float16's range (65504): a plain fp16 forward overflows
        final_norm.weight.fill_(6e4)
    batch = sample_batch(model, PROMPTS, CONFIG, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=2)
    base, delta = sign_step(model, 1e-4)
    for policy in ("auto", "float32", "float64"):
        m = measure_delta_h(model, batch, base, delta, precision=policy)
        p = predict_delta_h(model, batch, base, delta, precision=policy)
        assert all(torch.isfinite(torch.tensor([m.delta[0], m.entropy_before, p.linear, p.curvature])))
    with pytest.raises(ValueError, match="precision='auto'"):
        measure_delta_h(model, batch, base, delta, precision="model")
    with pytest.raises(ValueError, match="precision='auto'"):
        predict_delta_h(model, batch, base, delta, precision="model")


# ---------------------------------------------------------------------------- one layer at a time
def test_float64_weights_exist_one_layer_at_a_time(tmp_path):
    model = add_lora(tiny_model("llama", tmp_path, vocab=VOCAB, dtype=torch.bfloat16, layers=3))
    layers = model.base_model.model.model.layers
    assert all(layer in units(model) for layer in layers)
    seen = []

    def record(module, args):
        seen.append([layer.self_attn.q_proj.base_layer.weight.dtype for layer in layers])

    batch = sample_batch(model, PROMPTS[:2], CONFIG, eos_token_id=EOS, pad_token_id=PAD)
    handle = layers[1].mlp.register_forward_pre_hook(record)
    params = {n: p for n, p in model.named_parameters()}
    try:
        with parameters_at(model, StepPoint({}, {}, 0.0, torch.float64)), torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        handle.remove()
    assert seen == [[torch.bfloat16, torch.float64, torch.bfloat16]]
    assert all(p is params[n] and p.dtype in (torch.bfloat16, torch.float32) for n, p in model.named_parameters())


def test_parameters_are_restored_after_an_exception(tmp_path):
    model = tiny_model("gpt2", tmp_path, vocab=VOCAB)
    params = {n: p for n, p in model.named_parameters()}

    def fail(module, args):
        raise RuntimeError("boom")

    handle = model.transformer.h[1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with parameters_at(model, StepPoint({}, {}, 0.0, torch.float64)):
                model(input_ids=torch.tensor([[2, 3, 4]]))
    finally:
        handle.remove()
    assert {n: p for n, p in model.named_parameters()} == params
    assert all(p.dtype == torch.float32 for p in params.values())


def test_exact_numerics_restores_flags_after_an_exception():
    before = _flags()
    with pytest.raises(KeyError):
        with exact_numerics(torch.device("cpu")):
            raise KeyError
    assert _flags() == before


def test_floor_from_a_partner_over_part_of_e_scales_its_sum():
    """A partner pass that re-ran only some rows (NaN elsewhere) gives (N / n) Σ_known |r_i|."""
    from entropy_callbacks.engine import floor_rows
    from entropy_callbacks.estimators import rounding_floor

    assert floor_rows(32).tolist() == list(range(0, 32, 4))
    assert floor_rows(12).tolist() == [0, 3, 6, 9] and floor_rows(6).tolist() == list(range(6))
    gen = torch.Generator().manual_seed(0)
    f, c = torch.rand(16, generator=gen, dtype=torch.float64) * 5, torch.full((16,), 4.0, dtype=torch.float64)
    e_s, e_f = (torch.randn(16, generator=gen, dtype=torch.float64) * 1e-7 for _ in range(2))
    rows = floor_rows(16)
    missing = torch.ones(16, dtype=torch.bool).index_fill_(0, rows, False)
    partial = rounding_floor(f, c, e_s.masked_fill(missing, float("nan")), e_f.masked_fill(missing, float("nan")))
    r = (e_f + (f - f.sum() / c.sum() * c) * e_s) / c.sum()
    assert partial == pytest.approx(2 * r[rows].abs().sum().item() * 16 / len(rows), rel=1e-12)
    assert rounding_floor(f, c, e_s, e_f) == pytest.approx(2 * r.abs().sum().item(), rel=1e-12)


def test_arithmetic_floor_bounds_float64s_own_rounding_of_delta_h():
    """A float64 ΔH formed from float64 logits — log-softmax, entropy over V, sums over tokens
    and sequences, the SNIS ratios — against the same ΔH in 50-digit decimal arithmetic from
    the same logits: its error, which no partner pass sees, is within estimators.arithmetic_floor."""
    from decimal import Decimal, getcontext

    from entropy_callbacks import estimators
    from entropy_callbacks.distribution import entropy, sampling_log_probs

    getcontext().prec = 50
    gen = torch.Generator().manual_seed(0)
    n, m, v = 6, 10, 48
    z0 = torch.randn(n, m, v, generator=gen, dtype=torch.float64) * 3
    z1 = z0 + 1e-6 * torch.randn(n, m, v, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, v, (n, m), generator=gen)

    def in_float64(z):
        log_q, _ = sampling_log_probs(z, CONFIG)
        return log_q.gather(-1, tokens[..., None])[..., 0].sum(-1), entropy(log_q, None).sum(-1)

    def exact(z):
        s, f = [], []
        for i in range(n):
            s_i = f_i = Decimal(0)
            for t in range(m):
                logits = [Decimal(x) for x in z[i, t].tolist()]
                lse = sum(x.exp() for x in logits).ln()
                log_q = [x - lse for x in logits]
                s_i += log_q[int(tokens[i, t])]
                f_i -= sum(l.exp() * l for l in log_q)
            s.append(s_i)
            f.append(f_i)
        return s, f

    (s0, f0), (s1, f1) = in_float64(z0), in_float64(z1)
    c = torch.full((n,), float(m), dtype=torch.float64)
    shift = estimators.measured_shift(estimators.snis_weights(s1, s0), f1, f0, c, torch.arange(n))
    (e_s0, e_f0), (e_s1, e_f1) = exact(z0), exact(z1)
    w = [(a - b).exp() for a, b in zip(e_s1, e_s0)]
    before = sum(e_f0) / (n * m)
    delta = sum(wi * fi for wi, fi in zip(w, e_f1)) / (sum(w) * m) - before
    error = abs(Decimal(shift.delta) - delta)
    floor = estimators.arithmetic_floor([float(before), shift.after], n * m, v)
    assert 0 < error <= floor
    assert floor < 1e-14 * float(before) * 30  # ~u₆₄ log₂(V T): far below any step's ΔH


def test_floor_with_sequences_outside_the_support():
    """Under a proposal a sequence outside q_θ₀'s support has b_i = 0 and S_i = −inf, so its
    errors are −inf − (−inf) = NaN whether it was re-run or not. It contributes 0 exactly: not
    NaN (naive f_i = +inf), not a smaller n that scales the others up, and a partner whose
    re-run rows all lie outside gives an unknown floor (NaN), not a ZeroDivisionError."""
    from entropy_callbacks.estimators import rounding_floor

    gen = torch.Generator().manual_seed(0)
    n = 12
    f, c = torch.rand(n, generator=gen, dtype=torch.float64) * 5, torch.full((n,), 4.0, dtype=torch.float64)
    e_s, e_f = (torch.randn(n, generator=gen, dtype=torch.float64) * 1e-7 for _ in range(2))
    b = torch.rand(n, generator=gen, dtype=torch.float64)
    outside = torch.zeros(n, dtype=torch.bool)
    outside[[1, 5]] = True
    b[outside], f[outside] = 0.0, float("inf")  # the naive integrand −S_i of an unreachable sequence
    e_s, e_f = e_s.masked_fill(outside, float("nan")), e_f.masked_fill(outside, float("nan"))
    inside = ~outside
    value = (b[inside] * f[inside]).sum() / (b * c).sum()
    r = b[inside] * (e_f[inside] + (f[inside] - value * c[inside]) * e_s[inside]) / (b * c).sum()
    assert rounding_floor(f, c, e_s, e_f, b) == pytest.approx(2 * r.abs().sum().item(), rel=1e-12)
    # re-run rows 0, 3, 6, 9 (NaN elsewhere): 10 sequences inside, 4 of them re-run
    missing = torch.ones(n, dtype=torch.bool).index_fill_(0, torch.tensor([0, 3, 6, 9]), False)
    partial = rounding_floor(f, c, e_s.masked_fill(missing, float("nan")), e_f.masked_fill(missing, float("nan")), b)
    rerun = torch.tensor([0, 3, 6, 9])
    r_all = torch.zeros(n, dtype=torch.float64)
    r_all[inside] = r
    assert partial == pytest.approx(2 * r_all[rerun].abs().sum().item() * 10 / 4, rel=1e-12)
    only_outside = torch.ones(n, dtype=torch.bool).index_fill_(0, torch.tensor([1, 5]), False)
    assert math.isnan(rounding_floor(f, c, e_s.masked_fill(only_outside, float("nan")),
                                     e_f.masked_fill(only_outside, float("nan")), b))


def test_probe_runs_under_the_per_backend_fp32_precision_api(tmp_path):
    """A run that set TF32 through torch's per-backend API (torch.backends.cuda.matmul.fp32_precision
    = "tf32"), on which torch.get_float32_matmul_precision() raises: the passes still run in IEEE
    float32 and every flag is put back as it was."""
    from entropy_callbacks.precision import exact_numerics

    backends = torch.backends
    leaves = (backends.cuda.matmul, backends.mkldnn.matmul, backends.cudnn.conv)
    before = [backends.fp32_precision] + [leaf.fp32_precision for leaf in leaves]
    backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()  # what the probe used to call first
        set_by_run = [backends.fp32_precision] + [leaf.fp32_precision for leaf in leaves]
        with exact_numerics(torch.device("cpu")):
            assert all(leaf.fp32_precision == "ieee" for leaf in leaves)
        assert [backends.fp32_precision] + [leaf.fp32_precision for leaf in leaves] == set_by_run
        model = tiny_model("llama", tmp_path, vocab=VOCAB)
        batch = sample_batch(model, PROMPTS, CONFIG, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=2)
        assert math.isfinite(entropy_estimate(model, batch).value)
    finally:
        backends.fp32_precision = before[0]
        for leaf, value in zip(leaves, before[1:]):
            leaf.fp32_precision = value
