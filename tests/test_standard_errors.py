"""Every reported number has a standard error, and each is the grouped (leave-one-prompt-out)
jackknife of that number, checked here against a brute-force jackknife that recomputes the number
with each prompt's responses removed, through the same public summaries."""

from __future__ import annotations

import dataclasses
import math
import types

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
    # The plain jackknife (controls hold their coefficients fixed, so no brute force reproduces them).
    options = ProbeOptions(sampling=sampling, responses_per_prompt=3, order=2, precision="float64",
                           control_variates=False)
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
        prediction = summarize_prediction(without_group(local.prediction, keep), "token", control_variates=False)
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


def synthetic_draw(gen: torch.Generator, groups: int = 20, per_group: int = 8):
    """f_i = μ_g + 3 e_i + v_i with c_i = 1 (so Ĥ is a plain mean, truth 1.0): μ_g prompt effects,
    e_i a known-mean-0 feature, v_i noise no feature explains; plus a useless feature of mean 0."""
    group = torch.arange(groups).repeat_interleave(per_group)
    mu = 1.0 + 0.3 * torch.randn(groups, generator=gen, dtype=torch.float64)
    e = torch.randn(group.numel(), generator=gen, dtype=torch.float64)
    v = 0.5 * torch.randn(group.numel(), generator=gen, dtype=torch.float64)
    useless = torch.randn(group.numel(), generator=gen, dtype=torch.float64)
    f = mu[group] + 3 * e + v
    # columns as scoring.score_controls gives them; Ĥ uses the step-free ones (3-6)
    return f, torch.ones_like(f), group, torch.stack([e * 0, e * 0, e * 0, e, useless, e * 0, e * 0, e * 0], 1)


def test_cross_fitted_controls_are_unbiased_and_their_ses_calibrated():
    """500 synthetic draws: with a feature that explains most of the within-group noise, the
    controlled Ĥ has z = (Ĥ − 1) / SE of mean ~0 and SD ~1 (the cross-fit adds no bias), and its SE
    is well below the plain one; the plain one is calibrated too (the reference)."""
    from entropy_callbacks.estimators import entropy_at_origin

    gen = torch.Generator().manual_seed(0)
    z_plain, z_controlled, ratios = [], [], []
    for _ in range(500):
        f, c, group, u = synthetic_draw(gen)
        plain = entropy_at_origin(f, c, group)
        controlled = entropy_at_origin(f, c, group, controls=u)
        assert controlled.controlled and not plain.controlled
        z_plain.append((plain.value - 1.0) / plain.se)
        z_controlled.append((controlled.value - 1.0) / controlled.se)
        ratios.append(controlled.se / plain.se)
    for z in (torch.tensor(z_plain), torch.tensor(z_controlled)):
        assert abs(float(z.mean())) < 0.15, float(z.mean())
        assert 0.85 < float(z.std()) < 1.2, float(z.std())
    # within-group variance 9 + 0.25 of which 9 is explained; 0.09·8 per group stays: SE ratio ~0.38
    assert 0.3 < float(torch.tensor(ratios).mean()) < 0.5


def test_controls_that_explain_nothing_are_not_used():
    """A feature set whose out-of-group fit does not beat none is dropped: the plain estimate."""
    from entropy_callbacks.estimators import entropy_at_origin

    gen = torch.Generator().manual_seed(1)
    f, c, group, u = synthetic_draw(gen)
    noise = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    f = f - 3 * u[:, 0]  # nothing left for the features to explain
    plain, controlled = entropy_at_origin(f, c, group), entropy_at_origin(f, c, group, controls=noise)
    if controlled.controlled:  # a chance fit may win by a little, never by much
        assert controlled.se > 0.9 * plain.se
    else:
        assert (controlled.value, controlled.se) == (plain.value, plain.se)


def test_too_few_groups_or_sequences_for_controls():
    from entropy_callbacks.estimators import entropy_at_origin

    gen = torch.Generator().manual_seed(2)
    # < 4 groups; 6 sequences per fit, fewer than 4 per coefficient (intercept and one feature)
    for groups, per_group in ((3, 40), (4, 2)):
        f, c, group, u = synthetic_draw(gen, groups, per_group)
        assert not entropy_at_origin(f, c, group, controls=u).controlled


def test_an_unusable_measurement_is_neither_plotted_nor_calibrated():
    """A record whose measured ΔH is marked unusable (outside_support, docs/method.md §3) keeps the
    number in its JSON but logs no delta_measured or taylor_error scalars, and the callback's
    calibration leaves it out."""
    from entropy_callbacks import EntropyProbe
    from entropy_callbacks.step_probe import ProbeRecord

    record = ProbeRecord(step=3, entropy_before=1.0, entropy_before_se=0.1, delta_measured=-2e-3,
                         delta_measured_se=1e-4, delta_linear=-1e-3, delta_linear_se=1e-4, taylor_error=-1e-3,
                         taylor_error_se=1e-4, scales=[1.0, 2.0], delta_measured_at=[-2e-3, -5e-3],
                         outside_support=[0.02, 0.05], dof=9, delta_measured_usable=False)
    metrics = record.metrics(truncates=True)
    assert not any(k.startswith(("entropy/delta_measured", "entropy/taylor_error")) for k in metrics)
    assert metrics["entropy/outside_support"] == 0.02 and "entropy/delta_linear" in metrics
    assert record.to_json()["delta_measured"] == -2e-3 and record.to_json()["delta_measured_usable"] is False
    usable = dataclasses.replace(record, delta_measured_usable=True).metrics(truncates=True)
    assert "entropy/delta_measured" in usable and "entropy/taylor_error" in usable

    probe = EntropyProbe(prompts=[[2, 3]], sampling=SamplingConfig(max_new_tokens=2, top_p=0.9))
    not_rank_zero = types.SimpleNamespace(is_global_zero=False)  # publishes, logs nothing
    probe._publish(not_rank_zero, record, None)
    assert len(probe.calibration.history) == 0
    probe._publish(not_rank_zero, dataclasses.replace(record, delta_measured_usable=True), None)
    assert len(probe.calibration.history) == 1


def test_after_minus_before_is_the_shift_whichever_took_controls():
    """Ĥ(θ₀) may take its controls where ΔH(s) does not (each on its own evidence): the reported
    Ĥ(θ₀ + sΔθ) is still the reported Ĥ(θ₀) plus the reported ΔH(s)."""
    from entropy_callbacks import estimators

    gen = torch.Generator().manual_seed(4)
    f, c, group, u = synthetic_draw(gen)
    before = estimators.entropy_at_origin(f, c, group, controls=u)
    assert before.controlled
    log_w = 0.1 * torch.randn(f.shape, generator=gen, dtype=torch.float64)
    shift = estimators.measured_shift(estimators.snis_weights(log_w, torch.zeros_like(log_w)), f + 0.01, f, c, group,
                                      controls=torch.zeros_like(u), entropy_before=before.value)  # nothing to fit
    assert not shift.shift.controlled
    assert shift.after - before.value == pytest.approx(shift.delta, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("gap", [20.0, 36.0, 40.0])
def test_leave_outs_survive_one_dominant_group(gap):
    """One sequence's SNIS log-weight far above the rest: each group's leave-out is formed from
    the other groups' sums, not as total − own (which cancels to noise there), and the SE is the
    delete-one-group jackknife's."""
    from entropy_callbacks import estimators

    gen = torch.Generator().manual_seed(0)
    group = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])
    f = 5 * torch.rand(10, generator=gen, dtype=torch.float64)
    c = torch.randint(1, 6, (10,), generator=gen).double()
    after = f + torch.rand(10, generator=gen, dtype=torch.float64)
    log_w = torch.zeros(10, dtype=torch.float64)
    log_w[8] = gap
    w = estimators.snis_weights(log_w, torch.zeros(10, dtype=torch.float64))
    shift = estimators.measured_shift(w, after, f, c, group)
    leave_out = torch.tensor([float((w[k] * after[k]).sum() / (w[k] * c[k]).sum() - f[k].sum() / c[k].sum())
                              for k in (group != g for g in range(4))], dtype=torch.float64)
    assert torch.allclose(shift.shift.leave_out, leave_out, rtol=1e-12, atol=0)
    se = float(((leave_out - leave_out.mean()) ** 2).sum().mul(3 / 4).sqrt())
    assert shift.delta_se == pytest.approx(se, rel=1e-10)
