"""Every reported number has a standard error, and each is the grouped (leave-one-prompt-out)
jackknife of that number, checked here against a brute-force jackknife that recomputes the number
with each prompt's responses removed, through the same public summaries."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from entropy_callbacks import SamplingConfig
from entropy_callbacks.engine import summarize_measurement, summarize_prediction
from entropy_callbacks.step_probe import ProbeOptions, StepProbe
from tiny_models import EOS, PAD, tiny_model

PROMPTS = [[2, 3, 4], [2, 5], [6, 7, 8, 9], [3, 3], [4, 9, 2], [7]]


def without_group(terms, keep: torch.Tensor):
    """The same per-sequence terms restricted to the rows in ``keep``."""
    fields = {}
    for name, value in dataclasses.asdict(terms).items():
        if isinstance(value, torch.Tensor):
            fields[name] = value[keep]
        elif isinstance(value, list):
            fields[name] = [v[keep] for v in value]
        else:
            fields[name] = value
    return type(terms)(**fields)


def brute_force_jackknife(values: list[float]) -> float:
    g = len(values)
    mean = sum(values) / g
    return math.sqrt((g - 1) / g * sum((v - mean) ** 2 for v in values))


@pytest.mark.parametrize("sampling", [SamplingConfig(max_new_tokens=5), SamplingConfig(max_new_tokens=5, top_p=0.8)],
                         ids=["untruncated", "top-p"])
def test_quadratic_taylor_error_and_per_lr_ses_are_grouped_jackknifes(tmp_path, sampling):
    model = tiny_model("llama", tmp_path)
    options = ProbeOptions(sampling=sampling, responses_per_prompt=3, order=2, precision="float64")
    core = StepProbe(options, PROMPTS, eos_token_id=EOS, pad_token_id=PAD)
    batch = core.begin(model, step=0, lr=1e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    local = core.measure_local(model)
    record = core.summarize([local])

    quadratic, gap = [], []
    for g in range(len(PROMPTS)):
        keep = local.prediction.group != g
        prediction = summarize_prediction(without_group(local.prediction, keep), "token")
        measurement = summarize_measurement(without_group(local.measurement, keep), options.scales, "token",
                                            warn=False)
        quadratic.append(prediction.quadratic)
        gap.append(measurement.delta[0] - prediction.quadratic)

    assert record.delta_quadratic_se == pytest.approx(brute_force_jackknife(quadratic), rel=1e-6)
    assert record.taylor_error_se == pytest.approx(brute_force_jackknife(gap), rel=1e-6)
    assert record.taylor_error == pytest.approx(record.delta_measured - record.delta_quadratic, rel=1e-9, abs=1e-15)
    assert record.delta_linear_per_lr_se == pytest.approx(record.delta_linear_se / 1e-3, rel=1e-12)
    assert record.dof == len(PROMPTS) - 1
    assert record.taylor_error_se > 0
    if not sampling.truncates:
        # the gap shares E with the measurement: much of the noise cancels, not all of it. (Under
        # top-p this step moves 1.3 % of the mass out of θ₀'s support, and the gap is as noisy
        # as the measurement: measured 1.01x its SE.)
        print(f"taylor_error_se / delta_measured_se = {record.taylor_error_se / record.delta_measured_se:.3f}")
        assert record.taylor_error_se < 0.5 * record.delta_measured_se


@pytest.mark.parametrize("dof, quantile", [(1, 12.7062047), (3, 3.1824463), (7, 2.3646243), (19, 2.0930241),
                                           (1000, 1.9623391)])
def test_t_quantile_matches_the_tables(dof, quantile):
    from entropy_callbacks.estimators import t_quantile

    assert t_quantile(dof) == pytest.approx(quantile, rel=1e-6)
    assert math.isnan(t_quantile(0))


def test_records_carry_their_degrees_of_freedom_and_t_bands():
    from entropy_callbacks.estimators import t_quantile
    from entropy_callbacks.step_probe import ProbeRecord

    record = ProbeRecord(step=0, entropy_before=1.0, entropy_before_se=0.1, delta_measured=-2e-4,
                         delta_measured_se=1e-4, delta_linear=-1e-4, dof=3)
    m = record.metrics(truncates=False)
    assert m["entropy/delta_measured_upper"] == pytest.approx(-2e-4 + t_quantile(3) * 1e-4)
    assert m["entropy/before_lower"] == pytest.approx(1.0 - t_quantile(3) * 0.1)
