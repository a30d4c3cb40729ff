"""The attention probe passes run (attention.grouped_attention) is SDPA's function: checked
against SDPA's MATH kernel in float64 on every mask form Hugging Face hands it, and on models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from entropy_callbacks import attention
from entropy_callbacks.attention import grouped_attention, probe_attention
from tiny_models import tiny_model


class Module(torch.nn.Module):
    is_causal = True


def reference(query, key, value, mask, scale, causal=False):
    """SDPA's MATH kernel with the key/value heads repeated: [B, L, H, d]."""
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    with sdpa_kernel([SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, is_causal=causal)
    return out.transpose(1, 2)


def inputs(heads=6, kv_heads=2, length=7, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, heads, length, 8, generator=gen, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(3, kv_heads, length, 8, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    return q, k, v


def left_padded_mask(length=7, heads=1):
    """[3, heads, L, L] boolean, causal, rows 0 and 1 left-padded by 3 and 1 (fully masked rows)."""
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    keep = torch.ones(3, length, dtype=torch.bool)
    keep[0, :3] = False
    keep[1, :1] = False
    return (causal[None] & keep[:, None, :])[:, None].expand(3, heads, length, length).clone()


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (6, 3), (2, 1)])
@pytest.mark.parametrize("form", ["bool", "additive", "per-head", "causal, no mask"])
def test_matches_sdpa_math_in_float64(heads, kv_heads, form):
    q, k, v = inputs(heads, kv_heads)
    mask = left_padded_mask(heads=heads if form == "per-head" else 1)
    if form == "additive":
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    if form == "causal, no mask":
        mask = None
    ours, none = grouped_attention(Module(), q, k, v, mask, scaling=0.3)
    expected = reference(q, k, v, mask, 0.3, causal=mask is None)
    assert none is None and ours.shape == (3, 7, heads, 8)
    # Query rows that see no key (left padding) are never read: SDPA gives NaN or 0 there, ours
    # attend to every key. They must be finite (a NaN value times a 0 probability is NaN).
    if mask is not None:
        padded = ~(mask if mask.dtype == torch.bool else mask == 0)[:, 0].any(-1)  # [3, L]
        assert padded.any() and torch.isfinite(ours[padded]).all()
        live = ~padded
        torch.testing.assert_close(ours[live], expected[live], rtol=1e-12, atol=1e-13)
    else:
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-13)


def test_bf16_is_computed_in_float32_and_rounded_once():
    q, k, v = inputs(dtype=torch.bfloat16)
    mask = left_padded_mask()
    ours, _ = grouped_attention(Module(), q, k, v, mask, scaling=0.3)
    wide, _ = grouped_attention(Module(), q.float(), k.float(), v.float(), mask, scaling=0.3)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, wide.to(torch.bfloat16))


def test_dropout_or_softcap_go_to_sdpa():
    q, k, v = inputs()
    calls = []

    def sdpa(*args, **kwargs):
        calls.append(kwargs)
        return "sdpa"

    assert grouped_attention(Module(), q, k, v, None, dropout=0.1, sdpa=sdpa) == "sdpa"
    assert grouped_attention(Module(), q, k, v, None, softcap=30.0, sdpa=sdpa) == "sdpa"
    assert len(calls) == 2


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_models_run_it_inside_probe_attention_and_sdpa_outside(tmp_path, arch, monkeypatch):
    model = tiny_model(arch, tmp_path, dtype=torch.float64)
    interface = attention._interface()
    sdpa = interface._global_mapping["sdpa"]
    calls = []
    monkeypatch.setattr(attention, "grouped_attention",
                        lambda *a, **k: calls.append(a[1].shape) or grouped_attention(*a, **k))
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with probe_attention(model):
            ours = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert len(calls) == model.config.num_hidden_layers
    assert interface._global_mapping["sdpa"] is sdpa  # put back
    torch.testing.assert_close(ours[mask.bool()], plain[mask.bool()], rtol=1e-12, atol=1e-12)


def test_probe_attention_puts_the_registry_back_after_an_exception(tmp_path):
    model = tiny_model("llama", tmp_path)
    interface = attention._interface()
    sdpa = interface._global_mapping["sdpa"]
    with pytest.raises(RuntimeError, match="inside"):
        with probe_attention(model):
            assert interface._global_mapping["sdpa"] is not sdpa
            raise RuntimeError("inside")
    assert interface._global_mapping["sdpa"] is sdpa
    assert model.config._attn_implementation == "sdpa"


def test_value_passes_under_a_policy_keep_the_fused_kernel_on_cpu(tmp_path, monkeypatch):
    """Nothing is differentiated in a value pass: under a precision policy it keeps SDPA's fused
    CPU kernel. In the model's own dtypes, where a derivative pass's θ₀ values may replace it
    (engine.measurement_terms), it runs grouped_attention as derivative passes do."""
    from entropy_callbacks import SamplingConfig, sample_batch
    from entropy_callbacks.model_guard import probe_mode
    from entropy_callbacks.params import StepPoint
    from entropy_callbacks.precision import pass_numerics
    from entropy_callbacks.scoring import score_derivatives, score_values

    model = tiny_model("llama", tmp_path)
    batch = sample_batch(model, [[3, 4], [5, 6, 7]], SamplingConfig(max_new_tokens=4), eos_token_id=1,
                         pad_token_id=0, seed=0)
    calls = []
    monkeypatch.setattr(attention, "grouped_attention",
                        lambda *a, **k: calls.append(1) or grouped_attention(*a, **k))
    layers = model.config.num_hidden_layers
    values = {}
    for dtype in (torch.float64, torch.float32, None):
        calls.clear()
        with probe_mode(model), pass_numerics(model, dtype):
            values[dtype] = score_values(model, batch, StepPoint({}, {}, 0.0, dtype), "rb", at_origin=True)
        assert len(calls) == (layers if dtype is None else 0), dtype
    calls.clear()
    with probe_mode(model), pass_numerics(model, None):
        score_derivatives(model, batch, {}, {n: torch.zeros_like(p) for n, p in model.named_parameters()},
                          None, "rb", order=1)
    assert len(calls) == layers
    # the same function: float32 on either kernel agrees with float64 to float32 rounding
    for dtype in (torch.float32, None):
        torch.testing.assert_close(values[dtype].log_prob, values[torch.float64].log_prob, rtol=1e-5, atol=1e-5)
