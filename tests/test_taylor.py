"""Taylor-mode jets (entropy_callbacks/taylor.py) against nested forward-mode AD, in float64.

Each rule is checked on its own against torch.func's nested ``jvp`` (an independent
implementation of the same derivatives); whole models are checked the same way here, and
against finite differences in ``test_finite_differences.py`` (order 2 runs on jets).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from entropy_callbacks import SamplingConfig, sample_batch, scoring, taylor
from entropy_callbacks.taylor import Jet, coefficients
from tiny_models import EOS, PAD, add_lora, float64_rmsnorm, tiny_model

gen = torch.Generator().manual_seed(0)


def rand(*shape, positive=False):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x.abs() + 0.5 if positive else x


def nested(f, x0: list, v: list):
    """f(x0 + s v) and its first and second derivatives in s, by nested torch.func.jvp."""
    first = lambda *x: jvp(f, tuple(x), tuple(v))  # noqa: E731
    (value, d1), (_, d2) = jvp(first, tuple(x0), tuple(v))
    return value, d1, d2


def jets(f, x0: list, v: list):
    with torch.no_grad():
        out = f(*[Jet(x, t) for x, t in zip(x0, v)])
    value, d1, d2 = coefficients(out)
    zero = torch.zeros_like(value)  # None: identically zero
    return value, zero if d1 is None else d1, zero if d2 is None else d2


def softmax_masked(x):
    return x.masked_fill(torch.arange(x.shape[-1]) == 2, float("-inf")).softmax(-1)


def attention(q, k, v):
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    mask[0] = False  # a fully masked row: _safe_softmax gives 0 there
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


UNARY = {
    "exp": torch.exp, "log": lambda x: torch.log(x.abs() + 0.5), "rsqrt": lambda x: torch.rsqrt(x.square() + 1),
    "sqrt": lambda x: torch.sqrt(x.square() + 1), "reciprocal": lambda x: 1 / (x.square() + 1),
    "pow3": lambda x: x.pow(3), "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "gelu": F.gelu,
    "sin": torch.sin, "cos": torch.cos, "softmax": lambda x: x.softmax(-1), "log_softmax": lambda x: x.log_softmax(-1),
    "masked softmax": softmax_masked, "clamp": lambda x: x.clamp(-0.5, 0.7) * x,
    "sorted": lambda x: x.sort(-1).values.cumsum(-1) * x.sort(-1, descending=True).values,
    "topk": lambda x: x.topk(2, dim=-1).values.exp(),
    "where": lambda x: torch.where(x > 0, x.square(), 0.5) + x.masked_fill(x < -1, 3.0),
    "structure": lambda x: torch.cat([x.t().reshape(-1), x[1:, ::2].flatten(), x.mean(0), x.sum().reshape(1)]).unsqueeze(0),
    "layer norm (mean/rsqrt)": lambda x: (x - x.mean(-1, keepdim=True))
    * torch.rsqrt((x - x.mean(-1, keepdim=True)).square().mean(-1, keepdim=True) + 1e-5),
}

BINARY = {
    "mm": lambda a, b: a @ b, "mul": lambda a, b: a * b[0], "div": lambda a, b: a / (b[0].square() + 1),
    "addmm": lambda a, b: torch.addmm(b[0], a, b, beta=0.5, alpha=2.0),
    "sub/add": lambda a, b: (a - 2 * b[:, :4].T[:1]) + 1.0 - a.square(),
}


@pytest.mark.parametrize("name", list(UNARY))
def test_pointwise_and_structural_rules(name):
    f = UNARY[name]
    x0, v = [rand(3, 4)], [rand(3, 4)]
    ours = jets(f, x0, v)
    assert torch.equal(ours[0], f(*x0))  # the value is bitwise the plain function's
    for mine, reference in zip(ours, nested(f, x0, v)):
        assert torch.allclose(mine, reference, rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("name", list(BINARY))
@pytest.mark.parametrize("moving", ["both", "left", "right"])
def test_products(name, moving):
    f = BINARY[name]
    a0, b0 = rand(3, 4), rand(4, 4)
    va, vb = rand(3, 4), rand(4, 4)
    if moving == "left":
        x0, v = [a0], [va]
        g = lambda a: f(a, b0)  # noqa: E731
    elif moving == "right":
        x0, v = [b0], [vb]
        g = lambda b: f(a0, b)  # noqa: E731
    else:
        x0, v, g = [a0, b0], [va, vb], f
    ours = jets(g, x0, v)
    assert torch.equal(ours[0], g(*x0))
    for mine, reference in zip(ours, nested(g, x0, v)):
        assert torch.allclose(mine, reference, rtol=1e-12, atol=1e-12), (name, moving)


def test_attention_math_kernel():
    """SDPA's math kernel (bmm, _safe_softmax, a fully masked row) on jets."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x0, v = [rand(2, 5, 4) for _ in range(3)], [rand(2, 5, 4) for _ in range(3)]
    with sdpa_kernel([SDPBackend.MATH]):
        for ours, reference in zip(jets(attention, x0, v), nested(attention, x0, v)):
            assert torch.allclose(ours, reference, rtol=1e-12, atol=1e-12)


def test_native_layer_norm():
    """F.layer_norm on jets: the value bitwise the kernel's, the derivatives those of the
    mean/rsqrt form (nested jvp through F.layer_norm itself is wrong at order 2, PyTorch #196700)."""
    def exact(x, w, b):
        centred = x - x.mean(-1, keepdim=True)
        return centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + 1e-5) * w + b

    x0, v = [rand(3, 4), rand(4), rand(4)], [rand(3, 4), rand(4), rand(4)]
    ours = jets(lambda x, w, b: F.layer_norm(x, (4,), w, b), x0, v)
    assert torch.equal(ours[0], F.layer_norm(x0[0], (4,), x0[1], x0[2]))
    for mine, reference in zip(ours[1:], nested(exact, x0, v)[1:]):
        assert torch.allclose(mine, reference, rtol=1e-12, atol=1e-12)


def test_an_operation_without_a_rule_is_named():
    with pytest.raises(NotImplementedError, match="aten.erfinv"):
        torch.erfinv(Jet(rand(3), rand(3)))


INTO_OUT = {
    "cat": lambda x, out: torch.cat([x, rand(2)], out=out),
    "neg": lambda x, out: torch.neg(x, out=out[:2]),
    "sum": lambda x, out: torch.sum(x, 0, keepdim=True, out=out[:1]),
}


@pytest.mark.parametrize("name", list(INTO_OUT))
def test_out_is_refused(name):
    """An op with out= on jets would write each coefficient into ``out`` in turn and leave the
    last there: refused, so a pass falls back to torch's forward AD instead of going on with it."""
    with pytest.raises(NotImplementedError, match="out="):
        INTO_OUT[name](Jet(rand(2), rand(2), rand(2)), torch.empty(4, dtype=torch.float64))


def test_integer_cast_is_constant():
    """x.to(int64) is a step function of s: no derivative, as in torch's forward AD."""
    x0, v = [torch.tensor([1.7, -2.2, 0.4], dtype=torch.float64)], [torch.tensor([0.6, 3.4, -1.0], dtype=torch.float64)]
    f = lambda x: x.to(torch.int64).double() * x + (x > 0).double()  # noqa: E731
    for ours, reference in zip(jets(f, x0, v), nested(f, x0, v)):
        assert torch.equal(ours, reference)
    assert not isinstance(Jet(x0[0], v[0]).to(torch.int64), Jet)


@pytest.mark.parametrize("exponent", [0, 1, 2, 3])
def test_pow_at_zero(exponent):
    """x.pow(e) at x = 0: e·x^(e−1) is 0·inf = NaN for e = 0, and its derivative for e = 1."""
    f = lambda x: x.pow(exponent)  # noqa: E731
    x0, v = [torch.tensor([0.0, 1.5, -2.0], dtype=torch.float64)], [rand(3)]
    for ours, reference in zip(jets(f, x0, v), nested(f, x0, v)):
        assert torch.isfinite(ours).all() and torch.allclose(ours, reference, rtol=1e-12, atol=1e-12), exponent


def test_in_place_on_a_fresh_jet():
    def f(a, b):
        out = a * b
        out.add_(b, alpha=2.0).mul_(a).div_(2.0).sub_(b)
        return out

    x0, v = [rand(3, 4), rand(3, 4)], [rand(3, 4), rand(3, 4)]
    ours = jets(f, x0, v)
    assert torch.equal(ours[0], f(*x0))
    for mine, reference in zip(ours, nested(f, x0, v)):
        assert torch.allclose(mine, reference, rtol=1e-12, atol=1e-12)


IN_PLACE_REFUSED = {
    "into a view": lambda x: x[0].add_(5.0),
    "into a jet with a view": lambda x: (x.t(), x.add_(1.0)),
    "into a jet viewed through reshape": lambda x: (x.view(-1), x.mul_(2.0)),
    "broadcast to a larger shape": lambda x: x[0].clone().add_(torch.ones(2, 3, dtype=torch.float64)),
    "to another dtype": lambda x: x.float().mul_(rand(2, 3)),
}


@pytest.mark.parametrize("name", list(IN_PLACE_REFUSED))
def test_in_place_that_jets_cannot_follow_is_refused(name):
    """Replacing a jet's coefficients cannot reach the jets that view it, and torch raises on a
    shape change or keeps the dtype: refused, so that a pass falls back to torch's forward AD."""
    with pytest.raises(NotImplementedError):
        IN_PLACE_REFUSED[name](Jet(rand(2, 3), rand(2, 3), rand(2, 3)))


def _derivatives(model, batch, base, delta, order=2):
    return scoring.score_derivatives(model, batch, base, delta, None, "rb", order)


def _nested_only(monkeypatch):
    def refuse(*args):
        raise NotImplementedError("forced")

    monkeypatch.setattr(scoring, "_taylor", refuse)
    monkeypatch.setattr(scoring, "_warned_fallback", set())


FIELDS = ("log_prob", "integrand", "d_log_prob", "d_integrand", "d2_log_prob", "d2_integrand")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("truncated", [False, True])
@pytest.mark.parametrize("order", [1, 2])
def test_models_match_torch_forward_ad(tmp_path, monkeypatch, arch, lora, truncated, order):
    """A whole pass on jets (LayerNorm or RMSNorm, LoRA, top-k/top-p support) gives the numbers
    of torch's own forward AD to float64 rounding: dual tensors at order 1, nested JVPs at order 2."""
    config = (SamplingConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=5) if truncated
              else SamplingConfig(max_new_tokens=5))
    with float64_rmsnorm():
        model = tiny_model(arch, tmp_path, dtype=torch.float64)
        if lora:
            model = add_lora(model)
        model.eval()
        batch = sample_batch(model, [[3, 4], [5], [7, 8, 9]], config, eos_token_id=EOS, pad_token_id=PAD,
                             responses_per_prompt=2, seed=0)
        base = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        step = torch.Generator().manual_seed(1)
        delta = {n: 0.1 * torch.randn(p.shape, generator=step, dtype=p.dtype) for n, p in base.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback: every op has a rule
            ours = _derivatives(model, batch, base, delta, order)
        _nested_only(monkeypatch)
        with pytest.warns(RuntimeWarning, match="nested" if order == 2 else "dual tensors"):
            reference = _derivatives(model, batch, base, delta, order)
    for name in FIELDS[:2 + 2 * order]:
        a, b = getattr(ours, name), getattr(reference, name)
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-11 * float(b.abs().max())), (name, (a - b).abs().max())
    last = reference.d2_integrand if order == 2 else reference.d_integrand
    assert float(last.abs().max()) > 1e-3  # the comparison is not of zeros
    if order == 1:
        assert ours.d2_log_prob is None and ours.d2_integrand is None


def _small_case(arch: str, tmp_path):
    """A float64 model of ``arch``, E of 2 prompts × 2 responses of up to 4 tokens, θ₀ and a
    random Δθ of scale 0.1 on every parameter."""
    model = tiny_model(arch, tmp_path, dtype=torch.float64).eval()
    batch = sample_batch(model, [[3, 4], [5]], SamplingConfig(max_new_tokens=4), eos_token_id=EOS,
                         pad_token_id=PAD, responses_per_prompt=2, seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = {n: 0.1 * torch.randn_like(p) for n, p in base.items()}
    return model, batch, base, delta


def test_missing_rule_falls_back_to_nested_jvp(tmp_path, monkeypatch):
    """A model with an operation Taylor mode cannot run still gets its second derivatives, by
    nested JVPs, with a warning that names the operation."""
    with float64_rmsnorm():
        model, batch, base, delta = _small_case("llama", tmp_path)
        ours = _derivatives(model, batch, base, delta)
        rules = dict(taylor._RULES)
        del rules[torch.ops.aten.silu.default]
        monkeypatch.setattr(taylor, "_RULES", rules)
        monkeypatch.setattr(scoring, "_warned_fallback", set())
        with pytest.warns(RuntimeWarning, match="aten.silu"):
            fallback = _derivatives(model, batch, base, delta)
    for name in FIELDS:
        assert torch.allclose(getattr(ours, name), getattr(fallback, name), rtol=1e-11, atol=1e-12), name


@pytest.mark.parametrize("order", [1, 2])
def test_torch_forward_ad_switch(tmp_path, monkeypatch, order):
    """``scoring.torch_forward_ad()`` runs derivative passes without jets (not one rule is
    consulted, and nothing warns), with the same numbers."""
    with float64_rmsnorm():
        model, batch, base, delta = _small_case("qwen2", tmp_path)
        ours = _derivatives(model, batch, base, delta, order)
        monkeypatch.setattr(taylor, "_RULES", {})  # a jet anywhere would now fail
        with scoring.torch_forward_ad(), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            reference = _derivatives(model, batch, base, delta, order)
    for name in FIELDS[:2 + 2 * order]:
        assert torch.allclose(getattr(ours, name), getattr(reference, name), rtol=1e-11, atol=1e-12), name
