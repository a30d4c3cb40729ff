"""Mistakes that would fail every probe of a run fail once, before training, with a ValueError
that says what to fix; the policy is found wherever it sits on the module; fit and probe
resolve special tokens the same way."""

from __future__ import annotations

import pytest
import torch

from entropy_callbacks import SamplingConfig
from entropy_callbacks.policy import resolve_policy, special_tokens
from lightning_modules import TinyPolicyModule, random_token_loader
from test_callback import PROMPTS, load_policy, make_trainer, probe


def fit_with(tmp_path, policy, module=None, **options):
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[probe(**options)])
    trainer.fit(module or TinyPolicyModule(policy), random_token_loader(num=16, batch_size=8))
    return trainer


def test_policy_without_trainable_parameters_fails_before_training(tmp_path):
    policy = load_policy(tmp_path).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit_with(tmp_path, policy)


@pytest.mark.parametrize("option, value", [("eos_token_id", 99), ("eos_token_id", [1, 12]), ("pad_token_id", -1)])
def test_special_tokens_outside_the_vocabulary_fail_before_training(tmp_path, option, value):
    with pytest.raises(ValueError, match=rf"{option} .* outside the model's vocabulary \[0, 12\)"):
        fit_with(tmp_path, load_policy(tmp_path), **{option: value})


def test_prompt_plus_max_new_tokens_beyond_the_context_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"plus max_new_tokens \(62\) exceeds the model's context of 64"):
        fit_with(tmp_path, load_policy(tmp_path), sampling=SamplingConfig(max_new_tokens=62))


class Actor(torch.nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.lm = policy
        self.value_head = torch.nn.Linear(4, 1)


def test_policy_found_below_the_module_and_ambiguity_refused(tmp_path):
    policy = load_policy(tmp_path)
    module = TinyPolicyModule(policy)
    module.actor = Actor(policy)  # the same model, also at actor.lm: one model, two paths
    del module.policy
    assert resolve_policy(module, None) is policy
    module.reference = Actor(load_policy(tmp_path)).requires_grad_(False)
    with pytest.raises(ValueError, match=r"several causal LMs .*\['actor.lm', 'reference.lm'\]; set `policy`"):
        resolve_policy(module, None)
    assert resolve_policy(module, "actor.lm") is policy


def test_peft_wrapper_counts_once(tmp_path):
    from tiny_models import add_lora

    module = TinyPolicyModule(add_lora(load_policy(tmp_path)))
    assert resolve_policy(module, None) is module.policy


def test_an_eos_id_of_zero_is_kept(tmp_path):
    policy = load_policy(tmp_path)
    policy.generation_config.eos_token_id = None
    policy.config.eos_token_id = 0

    class Tokenizer:
        eos_token_id = 5
        pad_token_id = None

    assert special_tokens(policy, Tokenizer()) == (0, policy.config.pad_token_id)
    policy.config.pad_token_id = None
    policy.generation_config.pad_token_id = None
    assert special_tokens(policy, Tokenizer()) == (0, 0)
    assert special_tokens(policy, Tokenizer(), eos_token_id=[0, 3]) == ([0, 3], 0)


def test_prompts_are_checked_before_training_not_at_each_probe(tmp_path):
    with pytest.raises(ValueError, match=r"prompt 1 has token ids outside \[0, 12\)"):
        fit_with(tmp_path, load_policy(tmp_path), prompts=[PROMPTS[0], [2, 40]])


def test_the_math_and_the_functions_import_without_lightning():
    import subprocess
    import sys

    code = ("import sys, entropy_callbacks.estimators, entropy_callbacks.engine, entropy_callbacks.step_probe\n"
            "from entropy_callbacks import measure_delta_h, predict_delta_h, sample_batch\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')], 'lightning'\n"
            "from entropy_callbacks import EntropyProbe\n"
            "assert 'lightning' in sys.modules and EntropyProbe.__name__ == 'EntropyProbe'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_fewer_than_eight_prompts_warn_about_degrees_of_freedom(tmp_path):
    with pytest.warns(UserWarning, match=r"4 held-out prompt\(s\): .* 3 degree\(s\) of freedom, .* ± 3\.18·SE"):
        fit_with(tmp_path, load_policy(tmp_path))


def test_a_sampling_generation_config_that_differs_warns_once(tmp_path):
    from entropy_callbacks.policy import sampling_mismatch

    policy = load_policy(tmp_path)
    assert sampling_mismatch(policy, SamplingConfig(max_new_tokens=4)) is None  # it does not sample
    policy.generation_config.do_sample = True  # top_k unset: generate() would use 50
    message = sampling_mismatch(policy, SamplingConfig(max_new_tokens=4))
    assert message is not None and "top_k 50 there, 0 here" in message and "temperature" not in message
    assert sampling_mismatch(policy, SamplingConfig(max_new_tokens=4, top_k=50)) is None
    policy.generation_config.temperature = 0.7
    assert "temperature 0.7 there, 1.0 here" in sampling_mismatch(policy, SamplingConfig(max_new_tokens=4, top_k=50))
    with pytest.warns(UserWarning, match="samples differently from the probe's SamplingConfig"):
        fit_with(tmp_path, policy, prompts=PROMPTS * 2)
