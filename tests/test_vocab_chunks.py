"""The LM head and the vocabulary side run over response positions in chunks
(scoring.VOCAB_CHUNK). The chunk size must not change a number beyond the last bits of the head's
matrix product (BLAS may sum a row differently in a smaller product), in values or derivatives
of either order, with or without a top-k/top-p support; and the model's own forward and the
split decoder + head give the same logits."""

from __future__ import annotations

import pytest
import torch

from entropy_callbacks import SamplingConfig, sample_batch, scoring
from entropy_callbacks.params import StepPoint
from tiny_models import EOS, PAD, VOCAB, tiny_model


def own_log_probs(model, batch) -> torch.Tensor:
    """S_i from the model's own forward: the reference the probe's split head must match."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    log_q = logits[:, batch.prompt_length - 1:-1].log_softmax(-1)
    targets = batch.input_ids[:, batch.prompt_length:]
    counted = batch.response_mask[:, batch.prompt_length:]
    return (log_q.gather(-1, targets[..., None]).squeeze(-1) * counted).sum(-1)


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
    assert len(scoring._position_chunks(len(batch), 6, VOCAB)) == 1
    monkeypatch.setattr(scoring, "VOCAB_CHUNK", 2 * len(batch) * VOCAB)  # 2 positions per chunk
    assert len(scoring._position_chunks(len(batch), 6, VOCAB)) == 3
    for a, b in zip(whole, everything()):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            assert torch.allclose(a, b, rtol=1e-13, atol=1e-13 * float(a.abs().max())), (a - b).abs().max()


def test_split_head_is_used_only_where_it_is_the_models_own(tmp_path):
    """A model whose logits are its head on its decoder's output is split; one that changes its
    logits after the head (here: a soft cap, as Gemma 2 does) keeps its own forward."""
    model = tiny_model("llama", tmp_path, dtype=torch.float64).eval()
    batch = sample_batch(model, [[3, 4], [5]], SamplingConfig(max_new_tokens=4), eos_token_id=EOS,
                         pad_token_id=PAD, responses_per_prompt=2, seed=0)
    assert scoring._separable_head(model, batch) is not None
    capped = tiny_model("llama", tmp_path / "capped", dtype=torch.float64).eval()
    original = type(capped).forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = 10 * torch.tanh(out.logits / 10)
        return out

    type(capped).forward = forward
    try:
        assert scoring._separable_head(capped, batch) is None
        base = {n: p.detach().clone() for n, p in capped.named_parameters()}
        values = scoring.score_values(capped, batch, StepPoint(base, {}, 0.0, None), "rb", at_origin=True)
        assert torch.allclose(values.log_prob, own_log_probs(capped, batch), rtol=1e-12)
    finally:
        type(capped).forward = original


def test_a_replaced_head_is_the_one_scored(tmp_path):
    """Replacing the LM head module after a first probe (a LoRA injected into lm_head) must not
    leave the probe on the old head: the split is checked again and its values are the model's own."""
    from peft import LoraConfig, inject_adapter_in_model

    model = tiny_model("llama", tmp_path, dtype=torch.float64).eval()
    batch = sample_batch(model, [[3, 4], [5]], SamplingConfig(max_new_tokens=4), eos_token_id=EOS,
                         pad_token_id=PAD, responses_per_prompt=2, seed=0)
    empty = StepPoint({}, {}, 0.0, None)
    scoring.score_values(model, batch, empty, "rb", at_origin=True)  # caches the split of the original head
    old_head = model.get_output_embeddings()
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"],
                                               init_lora_weights=False), model)
    assert model.get_output_embeddings() is not old_head
    values = scoring.score_values(model, batch, empty, "rb", at_origin=True)
    assert torch.allclose(values.log_prob, own_log_probs(model, batch), rtol=1e-12)
