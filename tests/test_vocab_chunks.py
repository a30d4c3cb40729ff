"""The vocabulary side runs over response positions in chunks (scoring.VOCAB_CHUNK); the chunk
size must not change a number, in values or derivatives of either order, with or without a
top-k/top-p support."""

from __future__ import annotations

import pytest
import torch

from entropy_callbacks import SamplingConfig, sample_batch, scoring
from entropy_callbacks.params import StepPoint
from tiny_models import EOS, PAD, VOCAB, tiny_model


@pytest.mark.parametrize("truncated", [False, True])
def test_chunked_vocabulary_side_changes_nothing(tmp_path, monkeypatch, truncated):
    config = (SamplingConfig(max_new_tokens=6, temperature=0.7, top_p=0.9, top_k=6) if truncated
              else SamplingConfig(max_new_tokens=6))
    model = tiny_model("qwen2", tmp_path, dtype=torch.float64).eval()
    batch = sample_batch(model, [[3, 4], [5], [7, 8, 9]], config, eos_token_id=EOS, pad_token_id=PAD,
                         responses_per_prompt=2, seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = {n: 0.1 * torch.randn_like(p) for n, p in base.items()}
    origin = StepPoint(base, delta, 0.0, None)

    def everything():
        values = scoring.score_values(model, batch, origin, "rb", at_origin=True, keep_support=True)
        shifted = scoring.score_values(model, batch, StepPoint(base, delta, 1.0, None), "rb", at_origin=False,
                                       reference_support=values.support)
        first = scoring.score_derivatives(model, batch, base, delta, None, "rb", 1)
        second = scoring.score_derivatives(model, batch, base, delta, None, "rb", 2)
        out = [values.log_prob, values.integrand, shifted.log_prob, shifted.integrand,
               first.d_log_prob, first.d_integrand, second.d2_log_prob, second.d2_integrand]
        return out + ([values.support, shifted.outside_mass] if truncated else [])

    whole = everything()
    assert len(scoring._position_chunks(torch.empty(len(batch), 6, VOCAB))) == 1
    monkeypatch.setattr(scoring, "VOCAB_CHUNK", 2 * len(batch) * VOCAB)  # 2 positions per chunk
    assert len(scoring._position_chunks(torch.empty(len(batch), 6, VOCAB))) == 3
    for a, b in zip(whole, everything()):
        assert torch.equal(a, b)
