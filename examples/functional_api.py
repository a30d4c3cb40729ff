"""Predict and measure the entropy change of one optimizer step by hand, without Lightning.

    .venv/bin/python examples/functional_api.py

A tiny random Llama stands in for your policy; with a real model, load it with
AutoModelForCausalLM.from_pretrained(local_dir) and tokenize your held-out prompts.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from entropy_callbacks import SamplingConfig, entropy_estimate, measure_delta_h, predict_delta_h, sample_batch

torch.manual_seed(0)
policy = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, eos_token_id=1,
                                      pad_token_id=0))
EOS, PAD = 1, 0
prompts = [[2, 5, 9], [2, 7], [2, 11, 13, 4], [2, 3, 3]]  # held-out prompts, as token ids

# 1. Draw the evaluation batch E at θ₀ (4 prompts x 8 responses).
config = SamplingConfig(max_new_tokens=16, temperature=1.0)
batch = sample_batch(policy, prompts, config, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=8, seed=0)
print(f"E: {len(batch)} sequences, {int(batch.response_lengths.sum())} response tokens")
before = entropy_estimate(policy, batch)
print(f"entropy at θ₀: {before.value:.4f} ± {before.se:.4f} nats/token")

# 2. Take one real optimizer step (here: REINFORCE on random rewards for the sequences of E).
trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
theta0 = {n: p.detach().clone() for n, p in trainable.items()}
optimizer = torch.optim.AdamW(trainable.values(), lr=1e-5)  # a realistic RL fine-tuning lr
logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
log_q = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
rewards = torch.randn(len(batch))
loss = -(rewards[:, None] * log_q * batch.response_mask[:, 1:]).sum() / batch.response_mask.sum()
loss.backward()
optimizer.step()
delta = {n: p.detach() - theta0[n] for n, p in trainable.items()}

# 3. Predict (JVP, first and second order) and measure (SNIS) the change on the same E. The
#    measurement runs in float64 (precision="auto"): at this lr ΔH is ~1e-7 of the entropy,
#    below float32 rounding; delta_floor estimates what rounding is left.
prediction = predict_delta_h(policy, batch, theta0, delta, order=2)
measurement = measure_delta_h(policy, batch, theta0, delta, scales=(0.5, 1.0, 2.0))
print(f"predicted ΔH: linear {prediction.linear:+.3e} ± {prediction.linear_se:.1e}, "
      f"quadratic {prediction.quadratic:+.3e}")
for s, d, se, ess in zip(measurement.scales, measurement.delta, measurement.delta_se, measurement.ess_fraction):
    lin, quad = prediction.at_scale(s)
    print(f"  scale {s:>3}: measured {d:+.3e} ± {se:.1e}   linear {lin:+.3e}   quadratic {quad:+.3e}   ESS {ess:.3f}")
print(f"rounding floor of the measurement: {measurement.delta_floor:.1e}; "
      f"in float32 it would be {measure_delta_h(policy, batch, theta0, delta, precision='float32').delta_floor:.1e}")
