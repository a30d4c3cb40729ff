"""E from your own rollout engine: HF ``generate`` samples, the probe scores and corrects.

    .venv/bin/python examples/bring_your_own_rollouts.py

Your engine (vLLM, SGLang, HF generate with a static cache, in bf16, at its own temperature)
rarely samples exactly the distribution the probe scores. Hand its draws over with the
log-probabilities it sampled them with, and every estimate is importance-weighted by
q_θ₀ / p (docs/method.md §3). Here HF ``generate`` samples hotter (τ 1.2) than the policy the
probe studies (τ 1.0); ``HFGenerateSampler`` is the same thing packaged for the callback:
``EntropyProbe(sampler=HFGenerateSampler(cache_implementation="static"))``.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from entropy_callbacks import ProbeBatch, SamplingConfig, entropy_estimate, measure_delta_h, predict_delta_h

torch.manual_seed(0)
policy = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, eos_token_id=1,
                                      pad_token_id=0)).eval()
EOS, PAD = 1, 0
prompts = [[2, 5, 9], [2, 7], [2, 11, 13, 4], [2, 3, 3], [2, 8], [2, 4, 6], [2, 9, 9], [2, 10]]
R = 8
probe_config = SamplingConfig(max_new_tokens=16, temperature=1.0)  # the policy whose entropy we study

# 1. The engine: left-padded prompts, R samples each, and the processed scores it sampled from.
rows = [p for p in prompts for _ in range(R)]
width = max(map(len, rows))
input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in rows])
attention_mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in rows])[:, None]).long()
out = policy.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.2, top_k=0,
                      max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD, output_scores=True,
                      return_dict_in_generate=True)
tokens = out.sequences[:, width:]
is_eos = tokens == EOS
counted = (is_eos.cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
log_p = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
proposal_log_probs = log_p.masked_fill(~counted, 0.0).double().sum(-1)  # log p(y | x) per response
responses = [row[keep].tolist() for row, keep in zip(tokens, counted)]

# 2. Hand it over. Without proposal_log_probs the draws would be taken as if from τ 1.0.
batch = ProbeBatch.from_sequences(prompts, responses, probe_config, eos_token_id=EOS, pad_token_id=PAD,
                                  responses_per_prompt=R, proposal_log_probs=proposal_log_probs)
naive = ProbeBatch.from_sequences(prompts, responses, probe_config, eos_token_id=EOS, pad_token_id=PAD,
                                  responses_per_prompt=R)
corrected, uncorrected = entropy_estimate(policy, batch), entropy_estimate(policy, naive)
print(f"entropy at τ 1.0 from τ 1.2 draws: {corrected.value:.4f} ± {corrected.se:.4f} (corrected), "
      f"{uncorrected.value:.4f} ± {uncorrected.se:.4f} (taken as τ 1.0 draws)")

# 3. A step, predicted and measured on the engine's E.
theta0 = {n: p.detach().clone() for n, p in policy.named_parameters()}
delta = {n: 1e-3 * torch.randn_like(p) for n, p in theta0.items()}
prediction = predict_delta_h(policy, batch, theta0, delta, order=1)
measurement = measure_delta_h(policy, batch, theta0, delta)
print(f"ΔH predicted {prediction.linear:+.3e} ± {prediction.linear_se:.1e}, measured {measurement.delta[0]:+.3e} "
      f"± {measurement.delta_se[0]:.1e}; ESS at θ₀ {measurement.ess_origin:.3f} (the engine's mismatch)")
