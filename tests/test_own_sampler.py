"""Bring your own rollouts: HFGenerateSampler, and EntropyProbe(sampler=...) in a training run."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from entropy_callbacks import EntropyProbe, ProbeBatch, SamplingConfig, entropy_estimate, measure_delta_h
from entropy_callbacks.hf_sampler import HFGenerateSampler
from entropy_callbacks.scoring import score_values
from entropy_callbacks.params import StepPoint
from lightning_modules import TinyPolicyModule, random_token_loader
from tiny_models import EOS, PAD, add_lora, float64_rmsnorm, tiny_model

PROMPTS = [[3, 4, 5, 6], [7, 8], [9], [10, 11, 3], [4, 4, 4, 4, 4], [6, 2], [5, 5], [2, 7, 9]]
CONFIG = SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.9)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("own-sampler"), dtype=torch.float64, init_std=0.3).eval()


def scored_log_probs(model, batch: ProbeBatch) -> torch.Tensor:
    """S_i(θ₀) as the probe scores it (float64)."""
    with torch.no_grad(), float64_rmsnorm():
        return score_values(model, batch, StepPoint({}, {}, 0.0, torch.float64), "rb", at_origin=True).log_prob


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_log_probs_are_the_proposal_it_sampled(model, cache):
    """A float64 model sampled by HF generate at the probe's own settings: the recorded log p
    is q_θ₀ as the probe scores it, up to generate's float32 logits (it casts them), so every
    weight q_θ₀/p is 1 to ~1e-6."""
    sampler = HFGenerateSampler(cache_implementation=cache, eos_token_id=EOS, pad_token_id=PAD)
    state = torch.get_rng_state()
    with float64_rmsnorm():
        batch = sampler(model, PROMPTS, CONFIG, responses_per_prompt=3, seed=11)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert len(batch) == 3 * len(PROMPTS) and batch.proposal_log_probs is not None
    torch.testing.assert_close(batch.proposal_log_probs, scored_log_probs(model, batch), atol=1e-5, rtol=0)
    with float64_rmsnorm():
        again = sampler(model, PROMPTS, CONFIG, responses_per_prompt=3, seed=11)
    assert torch.equal(again.input_ids, batch.input_ids)  # a function of the seed


def test_generate_at_another_temperature_is_corrected(model):
    """generate samples at τ 1.2 for a probe scoring τ 0.8: log p is τ 1.2's, the weights are not 1."""
    hot = SamplingConfig(max_new_tokens=6, temperature=1.2, top_p=0.95)
    with float64_rmsnorm():
        drawn = HFGenerateSampler(eos_token_id=EOS, pad_token_id=PAD)(model, PROMPTS, hot, responses_per_prompt=3,
                                                                       seed=2)
        as_probe = ProbeBatch.from_sequences(
            PROMPTS, [row[mask].tolist() for row, mask in zip(drawn.input_ids, drawn.response_mask)], CONFIG,
            eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=3, proposal_log_probs=drawn.proposal_log_probs)
        hot_scored = scored_log_probs(model, drawn)
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        delta = {n: 1e-3 * torch.randn_like(p) for n, p in base.items()}
        measured = measure_delta_h(model, as_probe, base, delta)
        estimate = entropy_estimate(model, as_probe)
    torch.testing.assert_close(drawn.proposal_log_probs, hot_scored, atol=1e-5, rtol=0)
    assert measured.ess_origin < 0.99 and math.isfinite(measured.delta[0]) and math.isfinite(estimate.value)


def make_trainer(root: Path, probe: EntropyProbe, steps: int = 3) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, default_root_dir=str(root), logger=False, max_steps=steps,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[probe])


def test_callback_with_hf_generate_sampler(tmp_path):
    policy = add_lora(tiny_model("llama", tmp_path / "m"))
    probe = EntropyProbe(prompts=PROMPTS, sampling=SamplingConfig(max_new_tokens=5), every_n_steps=1,
                         responses_per_prompt=2, sampler=HFGenerateSampler(cache_implementation="static"),
                         eos_token_id=EOS, pad_token_id=PAD, log_samples=0, on_error="raise", jsonl=False)
    make_trainer(tmp_path, probe).fit(TinyPolicyModule(policy, lr=1e-3), random_token_loader(num=24, batch_size=8))
    records = list(probe.records)
    assert len(records) == 3 and all(r.proposal for r in records)
    for r in records:
        assert math.isfinite(r.delta_measured) and math.isfinite(r.delta_linear) and 0 < r.ess_origin <= 1
        assert r.num_sequences == 2 * len(PROMPTS)
    assert "entropy/ess_origin" in records[0].metrics(truncates=False)


class WrongConfigSampler:
    """Returns E scored under other settings than the probe's: refused."""

    def __call__(self, model, prompts, config, *, responses_per_prompt, seed):
        other = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=2.0)
        return HFGenerateSampler(eos_token_id=EOS, pad_token_id=PAD)(model, prompts, other,
                                                                      responses_per_prompt=responses_per_prompt,
                                                                      seed=seed)


def test_a_sampler_that_returns_another_config_is_a_contained_error(tmp_path):
    policy = tiny_model("llama", tmp_path / "m")
    probe = EntropyProbe(prompts=PROMPTS, sampling=SamplingConfig(max_new_tokens=4), every_n_steps=1,
                         sampler=WrongConfigSampler(), eos_token_id=EOS, pad_token_id=PAD, log_samples=0, jsonl=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, probe, steps=2).fit(TinyPolicyModule(policy, lr=1e-3),
                                                   random_token_loader(num=16, batch_size=8))
    assert probe.probe_errors == 2
    assert any("the sampler's ProbeBatch has config" in str(w.message) for w in caught)


def test_sampler_must_be_callable():
    with pytest.raises(ValueError, match="sampler must be callable"):
        EntropyProbe(prompts=PROMPTS, sampling=CONFIG, sampler="not a function")


def test_sampler_from_yaml_class_path(tmp_path):
    """The default config with the probe's sampler set by class_path, as a user would in YAML."""
    from entropy_callbacks.cli import main

    configs = Path(__file__).resolve().parents[1] / "configs"
    root = tmp_path / "runs"
    main(["fit", "--config", str(configs / "toy_grpo.yaml"), "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--trainer.callbacks.every_n_steps", "1", "--trainer.callbacks.on_error", "raise",
          "--trainer.callbacks.sampler", '{"class_path": "entropy_callbacks.hf_sampler.HFGenerateSampler", '
                                         '"init_args": {"cache_implementation": "static"}}'])
    records = [json.loads(line) for line in (root / "version_0" / "entropy_probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and all(r["proposal"] for r in records)
    assert all(math.isfinite(r["delta_measured"]) and 0 < r["ess_origin"] <= 1 for r in records)
