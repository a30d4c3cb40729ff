"""E drawn by Hugging Face ``generate``, with the proposal log-probabilities it really sampled from.

A rollout engine of the kind RL libraries use: ``model.generate`` (optionally with a static KV
cache) samples the responses, and its processed ``scores`` (the logits after every logits
processor: temperature, top-k, top-p, and whatever else the generation config adds) give
log p(y | x), the distribution each token was actually drawn from. ``ProbeBatch.from_sequences``
hands both to the probe, whose estimators then weight by q_θ₀/p (docs/method.md §3). Use it as
``EntropyProbe(sampler=HFGenerateSampler())`` or in YAML::

    sampler:
      class_path: entropy_callbacks.hf_sampler.HFGenerateSampler
      init_args: {cache_implementation: static}
"""

from __future__ import annotations

import torch

from .model_guard import probe_mode
from .policy import special_tokens
from .sampling import ProbeBatch, SamplingConfig, left_pad, through_first_eos


class HFGenerateSampler:
    """Sample E with ``model.generate`` and record its proposal log-probabilities.

    Args:
        cache_implementation: passed to ``generate`` ("static" preallocates the KV cache; None:
            the model's default dynamic cache).
        batch_size: rows per ``generate`` call (None: all of E at once).
        eos_token_id, pad_token_id: default from the policy's generation config / config.
    """

    def __init__(self, cache_implementation: str | None = None, batch_size: int | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.cache_implementation = cache_implementation
        self.batch_size = batch_size
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def __call__(self, model: torch.nn.Module, prompts: list[list[int]], config: SamplingConfig, *,
                 responses_per_prompt: int, seed: int) -> ProbeBatch:
        eos, pad = special_tokens(model, None, self.eos_token_id, self.pad_token_id)
        rows = [prompt for prompt in prompts for _ in range(responses_per_prompt)]
        size = len(rows) if self.batch_size is None else self.batch_size
        device = next(model.parameters()).device
        responses, log_probs = [], []
        with probe_mode(model), torch.no_grad():  # eval mode; the global RNG is restored on exit
            torch.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(seed)
            for start in range(0, len(rows), size):
                chunk = self._generate(model, rows[start:start + size], config, eos, pad, device)
                responses += chunk[0]
                log_probs.append(chunk[1])
        return ProbeBatch.from_sequences(prompts, responses, config, eos_token_id=eos, pad_token_id=pad,
                                         responses_per_prompt=responses_per_prompt,
                                         proposal_log_probs=torch.cat(log_probs))

    def _generate(self, model, rows: list[list[int]], config: SamplingConfig, eos, pad: int,
                  device) -> tuple[list[list[int]], torch.Tensor]:
        width = max(len(row) for row in rows)
        ids, mask = left_pad(rows, width, pad, device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True,
            temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
            max_new_tokens=config.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
            cache_implementation=self.cache_implementation, output_scores=True, return_dict_in_generate=True)
        tokens = out.sequences[:, width:]
        counted = through_first_eos(tokens, torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device))
        # scores[t]: the processed logits step t was sampled from (softmax of them is p).
        scores = torch.stack(out.scores, 1)[:, : tokens.shape[1]].float()
        token_log_p = scores.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
        log_p = token_log_p.masked_fill(~counted, 0.0).double().sum(-1).cpu()
        responses = [row[keep].tolist() for row, keep in zip(tokens.cpu(), counted.cpu())]
        return responses, log_p
