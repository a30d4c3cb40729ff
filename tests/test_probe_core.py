"""The callback's framework-free core gives exactly what the public functions give.

In the model's own dtypes StepProbe reuses the prediction pass's primal values at θ₀ in place of
the measurement's θ₀ pass (they are bitwise the same computation); under a precision policy it
runs its own θ₀ pass. This checks the record against separate calls of predict_delta_h and
measure_delta_h on the same E and the same real step, for each policy.
"""

import pytest
import torch

from entropy_callbacks import SamplingConfig, measure_delta_h, predict_delta_h
from entropy_callbacks.step_probe import ProbeOptions, StepProbe
from tiny_models import EOS, PAD, tiny_model


@pytest.mark.parametrize("sampling", [SamplingConfig(max_new_tokens=5), SamplingConfig(max_new_tokens=5, top_p=0.9)],
                         ids=["untruncated", "top-p"])
@pytest.mark.parametrize("microbatch_size", [None, 3])
@pytest.mark.parametrize("precision", ["auto", "float32", "model"])
@pytest.mark.parametrize("order", [1, 2])
def test_step_probe_record_equals_the_public_functions(tmp_path, sampling, microbatch_size, precision, order):
    model = tiny_model("gpt2", tmp_path)  # LayerNorm: its jet rule must keep the kernel's values
    options = ProbeOptions(sampling=sampling, responses_per_prompt=3, order=order, scales=(1.0, 2.0),
                           microbatch_size=microbatch_size, precision=precision)
    core = StepProbe(options, [[2, 3, 4], [2, 5], [6, 7, 8, 9]], eos_token_id=EOS, pad_token_id=PAD)
    batch = core.begin(model, step=0, lr=1e-2)
    theta0 = {n: t.clone() for n, t in core.pending.before.items()}

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits.logsumexp(-1).mean().backward()
    optimizer.step()
    delta = {n: p.detach() - theta0[n] for n, p in model.named_parameters()}

    record = core.finish(model)
    kwargs = dict(microbatch_size=microbatch_size, precision=precision)
    prediction = predict_delta_h(model, batch, theta0, delta, order=order, **kwargs)
    measurement = measure_delta_h(model, batch, theta0, delta, scales=(1.0, 2.0), **kwargs)
    assert record.delta_linear == prediction.linear
    assert record.curvature == prediction.curvature
    assert record.delta_quadratic == prediction.quadratic
    assert record.entropy_before == measurement.entropy_before
    assert record.delta_measured_at == measurement.delta
    assert record.delta_measured_se_at == measurement.delta_se
    assert record.ess_at == measurement.ess_fraction
    assert record.outside_support == measurement.outside_support
    assert record.per_sequence_linear == prediction.per_sequence_linear.tolist()


def test_base_names_outside_delta_are_held_at_base(tmp_path):
    """θ₀ is `base` for every name it holds, also those Δθ leaves out: the prediction must not
    read such parameters from the model (which has moved on)."""
    from entropy_callbacks import sample_batch

    model = tiny_model("llama", tmp_path)
    batch = sample_batch(model, [[2, 3, 4], [2, 5]], SamplingConfig(max_new_tokens=4), eos_token_id=EOS,
                         pad_token_id=PAD, responses_per_prompt=3)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    moving = "model.layers.0.mlp.up_proj.weight"
    delta = {moving: 1e-2 * torch.randn(base[moving].shape, generator=gen)}
    reference = predict_delta_h(model, batch, base, delta, order=2)
    reference_measured = measure_delta_h(model, batch, base, delta)
    with torch.no_grad():  # the model moves away from θ₀ in a parameter Δθ does not name
        model.lm_head.weight.add_(0.5)
    moved = predict_delta_h(model, batch, base, delta, order=2)
    assert moved.linear == reference.linear and moved.curvature == reference.curvature
    for order in (1, 2):
        assert predict_delta_h(model, batch, base, delta, order=order).entropy == reference.entropy
    assert measure_delta_h(model, batch, base, delta).delta == reference_measured.delta
