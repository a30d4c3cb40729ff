"""Attribution of the predicted ΔH to the samples of the update batch (docs/method.md §6).

float64 models and real optimizer steps: the split Σ a_u + momentum + weight decay + residual is
the linear prediction of ``predict_delta_h`` (forward mode, an independent code path) to 1e-6,
with a residual below 1e-6 of it, for AdamW at a later step (momentum present) with and without
clipping, Adam with L2 decay, SGD with momentum, Nesterov and decay, and gradient accumulation.
For SGD the step is linear in the gradient, so a_u is exactly the change of the linear
prediction when sample u is left out of the step, which is checked by retaking it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from entropy_callbacks import SamplingConfig, predict_delta_h, sample_batch
from entropy_callbacks.attribution import attribute_delta_h
from tiny_models import EOS, PAD, add_lora, float64_rmsnorm, tiny_model

PROMPTS_E = [[2, 3, 4], [5, 6], [7, 8, 9, 3], [4, 4], [6, 2, 5], [3, 9]]
PROMPTS_U = [[9, 8], [3, 5, 7], [2, 2, 6], [8, 4]]
CONFIG = SamplingConfig(max_new_tokens=6)


@pytest.fixture(scope="module", autouse=True)
def exact_norms():
    with float64_rmsnorm():
        yield


def per_sample_losses(model, rollouts, advantages: torch.Tensor, scale: float = 1.0):
    """REINFORCE losses L_u = −scale·A_u·Σ_t log q(y_t) / T_u at the parameters given."""
    ids, mask = rollouts.input_ids, rollouts.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    width = rollouts.prompt_length
    counted = rollouts.response_mask[:, width:].to(torch.float64)

    def losses(params):
        logits = functional_call(model, dict(params), (), {"input_ids": ids, "attention_mask": mask,
                                                           "position_ids": positions, "use_cache": False}).logits
        log_q = logits[:, width - 1:-1].double().log_softmax(-1).gather(-1, ids[:, width:, None]).squeeze(-1)
        return -scale * advantages * (log_q * counted).sum(-1) / counted.sum(-1)
    return losses


def live(model):
    return dict(model.named_parameters())


def setting(tmp_path, arch="llama", seed=0):
    model = tiny_model(arch, tmp_path, dtype=torch.float64, seed=seed)
    batch_e = sample_batch(model, PROMPTS_E, CONFIG, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=3,
                           seed=1)
    rollouts = sample_batch(model, PROMPTS_U, CONFIG, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=4,
                            seed=2)
    advantages = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return model, batch_e, rollouts, advantages


def take_step(model, optimizer, losses, *, clip: float | None = None, accumulate: int = 1):
    optimizer.zero_grad(set_to_none=True)
    values = losses(live(model))
    for part in values.chunk(accumulate):  # accumulation: one backward per micro-batch
        part.sum().backward(retain_graph=True)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()


def warm_up(model, optimizer, losses, steps: int = 2):
    for _ in range(steps):
        take_step(model, optimizer, losses)


def stepped(model, optimizer, losses, warm_up_steps: int = 2, **kwargs) -> dict:
    """Warm-up steps (so Adam's moments and SGD's buffer are live), then θ₀ and the step taken
    from it; returns θ₀."""
    warm_up(model, optimizer, losses, steps=warm_up_steps)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    take_step(model, optimizer, losses, **kwargs)
    return base


def check_split(model, batch_e, base, optimizer, losses, **kwargs):
    result = attribute_delta_h(model, batch_e, base, optimizer, losses, **kwargs)
    delta = {n: p.detach() - base[n] for n, p in model.named_parameters() if p.requires_grad}
    forward = predict_delta_h(model, batch_e, base, delta, order=1, control_variates=False)
    total = float(result.per_sample.sum()) + result.momentum + result.weight_decay + result.residual
    assert result.linear == pytest.approx(forward.linear, rel=1e-6)
    assert total == pytest.approx(result.linear, rel=1e-12)
    assert abs(result.residual) <= 1e-6 * abs(result.linear), (result.residual, result.linear)
    assert result.entropy == pytest.approx(forward.entropy, rel=1e-9)
    return result


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["unclipped", "clipped"])
def test_adamw_with_weight_decay_at_a_later_step(tmp_path, arch, clip):
    model, batch_e, rollouts, advantages = setting(tmp_path, arch)
    losses = per_sample_losses(model, rollouts, advantages)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    base = stepped(model, optimizer, losses, clip=clip)
    result = check_split(model, batch_e, base, optimizer, losses)
    assert result.momentum != 0 and result.weight_decay != 0
    if clip is None:
        assert result.clip_factor == pytest.approx(1.0, rel=1e-9)
    else:
        assert result.clip_factor < 0.9  # it really clipped, and the fit found by how much
    # the samples, not momentum, carry a step's worth of change (no sample is a rounding error)
    assert float(result.per_sample.abs().max()) > 1e-3 * abs(result.linear)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_adamw_at_a_realistic_learning_rate(tmp_path, arch):
    """LoRA adapters only (the base frozen), AdamW at lr 1e-5 with decay, a later step."""
    model, batch_e, rollouts, advantages = setting(tmp_path, arch, seed=9)
    model = add_lora(model).eval()
    losses = per_sample_losses(model, rollouts, advantages)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)
    base = stepped(model, optimizer, losses)
    result = check_split(model, batch_e, base, optimizer, losses)
    assert len(result.per_sample) == len(rollouts) and result.momentum != 0


def test_adam_with_l2_decay(tmp_path):
    model, batch_e, rollouts, advantages = setting(tmp_path, seed=1)
    losses = per_sample_losses(model, rollouts, advantages)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.05)
    base = stepped(model, optimizer, losses, warm_up_steps=1)
    result = check_split(model, batch_e, base, optimizer, losses, clip_factor=1.0)
    assert result.weight_decay != 0


def test_gradient_accumulation(tmp_path):
    model, batch_e, rollouts, advantages = setting(tmp_path, seed=2)
    losses = per_sample_losses(model, rollouts, advantages, scale=0.5)  # each micro-batch's loss halved
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    base = stepped(model, optimizer, losses, warm_up_steps=1, accumulate=2)
    whole = check_split(model, batch_e, base, optimizer, losses)
    # E in microbatches (a value pass first, then the reverse pass piece by piece): the same split
    pieces = check_split(model, batch_e, base, optimizer, losses, microbatch_size=4)
    torch.testing.assert_close(pieces.per_sample, whole.per_sample, rtol=1e-9, atol=0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_leave_one_out_is_exact(tmp_path, nesterov):
    """SGD's step is linear in the gradient: leaving sample u out of the step changes the
    linear prediction by exactly a_u."""
    model, batch_e, rollouts, advantages = setting(tmp_path, seed=3)
    losses = per_sample_losses(model, rollouts, advantages)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    warm_up(model, optimizer, losses)
    before_model, before_optimizer_state = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    take_step(model, optimizer, losses)
    result = check_split(model, batch_e, base, optimizer, losses)
    for u in (0, 5, 11):
        again = copy.deepcopy(before_model)
        optimizer_again = torch.optim.SGD(again.parameters(), lr=1e-2, momentum=0.9, nesterov=nesterov,
                                          weight_decay=0.01)
        optimizer_again.load_state_dict(copy.deepcopy(before_optimizer_state))  # SGD steps its buffers in place
        keep = torch.ones(len(rollouts), dtype=torch.float64)
        keep[u] = 0.0
        without = per_sample_losses(again, rollouts, advantages * keep)
        take_step(again, optimizer_again, without)
        delta = {n: p.detach() - base[n] for n, p in again.named_parameters()}
        linear_without = predict_delta_h(model, batch_e, base, delta, order=1, control_variates=False).linear
        assert result.linear - linear_without == pytest.approx(float(result.per_sample[u]), rel=1e-6, abs=1e-12)


def test_other_optimizers_get_the_total_only(tmp_path):
    model, batch_e, rollouts, advantages = setting(tmp_path, seed=4)
    losses = per_sample_losses(model, rollouts, advantages)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    take_step(model, optimizer, losses)
    result = attribute_delta_h(model, batch_e, base, optimizer, losses)
    delta = {n: p.detach() - base[n] for n, p in model.named_parameters()}
    assert result.per_sample is None and "RMSprop" in result.note
    assert result.linear == pytest.approx(predict_delta_h(model, batch_e, base, delta, order=1).linear, rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(update_losses=None), "update_losses must be callable"),
    (dict(clip_factor=0.0), "clip_factor must be a positive number"),
    (dict(normalize="tokens"), "normalize must be"),
])
def test_bad_input(tmp_path, kwargs, message):
    model, batch_e, rollouts, advantages = setting(tmp_path, seed=5)
    losses = per_sample_losses(model, rollouts, advantages)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    take_step(model, optimizer, losses)
    arguments = dict(update_losses=losses) | kwargs
    with pytest.raises(ValueError, match=message):
        attribute_delta_h(model, batch_e, base, optimizer, arguments.pop("update_losses"), **arguments)


def test_adam_jacobian_influence_is_the_derivative_of_the_step(tmp_path):
    """For Adam, v_t depends on g as well: per_sample_jacobian[u] is the derivative of the linear
    prediction with respect to sample u's weight in the objective (central difference of retaken
    steps with weights 1 ± h), which per_sample — v_t held fixed — is not."""
    model, batch_e, rollouts, advantages = setting(tmp_path, seed=6)
    losses = per_sample_losses(model, rollouts, advantages)
    make = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)  # noqa: E731
    optimizer = make(model)
    warm_up(model, optimizer, losses, steps=1)  # bc2 small: far from linear in g
    before_model, before_state = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    take_step(model, optimizer, losses)
    result = check_split(model, batch_e, base, optimizer, losses)
    h = 1e-4
    for u in (1, 7):
        linears = []
        for sign in (1.0, -1.0):
            again = copy.deepcopy(before_model)
            optimizer_again = make(again)
            optimizer_again.load_state_dict(copy.deepcopy(before_state))
            weights = torch.ones(len(rollouts), dtype=torch.float64)
            weights[u] += sign * h
            take_step(again, optimizer_again, per_sample_losses(again, rollouts, advantages * weights))
            delta = {n: p.detach() - base[n] for n, p in again.named_parameters()}
            linears.append(predict_delta_h(model, batch_e, base, delta, order=1, control_variates=False).linear)
        derivative = (linears[0] - linears[1]) / (2 * h)
        assert float(result.per_sample_jacobian[u]) == pytest.approx(derivative, rel=1e-5)
        assert abs(float(result.per_sample[u]) - derivative) > 1e-3 * abs(derivative)  # v_t's share is real


def test_per_sample_standard_errors_are_the_grouped_jackknife(tmp_path):
    """per_sample_se against a brute-force jackknife: the attribution recomputed with each prompt
    group of E removed."""
    model, batch_e, rollouts, advantages = setting(tmp_path, seed=7)
    losses = per_sample_losses(model, rollouts, advantages)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    base = stepped(model, optimizer, losses, warm_up_steps=1)
    result = attribute_delta_h(model, batch_e, base, optimizer, losses, clip_factor=1.0, standard_errors=True)
    groups = batch_e.group.unique().tolist()
    leave_out = torch.stack([
        attribute_delta_h(model, batch_e.select(torch.nonzero(batch_e.group != g).flatten()), base, optimizer, losses,
                          clip_factor=1.0).per_sample for g in groups])
    brute = torch.sqrt((len(groups) - 1) / len(groups) * ((leave_out - leave_out.mean(0)) ** 2).sum(0))
    torch.testing.assert_close(result.per_sample_se, brute, rtol=1e-6, atol=1e-15)
    assert bool((result.per_sample_se > 0).all())


def test_a_step_with_no_gradient_is_all_momentum(tmp_path):
    """Every advantage 0 (a GRPO group all right or all wrong): the samples contribute nothing and
    the whole step is Adam's momentum (and AdamW's decay)."""
    model, batch_e, rollouts, advantages = setting(tmp_path, seed=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warm_up(model, optimizer, per_sample_losses(model, rollouts, advantages))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    idle = per_sample_losses(model, rollouts, torch.zeros_like(advantages))
    take_step(model, optimizer, idle)
    result = check_split(model, batch_e, base, optimizer, idle)
    assert float(result.per_sample.abs().max()) == 0.0
    assert result.momentum + result.weight_decay == pytest.approx(result.linear, rel=1e-6)


def test_bf16_base_with_lora_at_a_realistic_learning_rate(tmp_path):
    """bf16 base + float32 LoRA adapters, AdamW at lr 1e-5. ∇Ĥ runs in float32 (the precision
    policy's derivative dtype) and agrees with the forward-mode prediction to 1e-4; the per-sample
    losses run in the model's bf16, like the gradient the optimizer applied, and reproduce it to
    bf16 rounding: measured here, a residual of 0.3 % of the linear prediction and c = 1.0012."""
    model = add_lora(tiny_model("llama", tmp_path, dtype=torch.bfloat16, seed=3)).eval()
    batch_e = sample_batch(model, PROMPTS_E, CONFIG, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=3,
                           seed=1)
    rollouts = sample_batch(model, PROMPTS_U, CONFIG, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=4,
                            seed=2)
    advantages = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    losses = per_sample_losses(model, rollouts, advantages)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)
    base = stepped(model, optimizer, losses)
    result = attribute_delta_h(model, batch_e, base, optimizer, losses)
    delta = {n: p.detach().float() - base[n].float() for n, p in model.named_parameters() if p.requires_grad}
    forward = predict_delta_h(model, batch_e, base, delta, order=1)
    assert result.linear == pytest.approx(forward.linear, rel=1e-4)
    assert abs(result.residual) <= 1e-2 * abs(result.linear)
    assert result.clip_factor == pytest.approx(1.0, abs=1e-2)
