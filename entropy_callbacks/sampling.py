"""Drawing the evaluation batch E from the policy at θ₀.

Sampling is a deterministic function of (seed, prompt index, response index): the Gumbel noise
of token v at decoding step t of a row is a hash of (row key, t, v), the row key itself a hash
of that triple (counter-based noise, as Philox is), so the same sequences come out whatever the
batch size or DDP rank, the global RNG is never touched, and one decoding step costs the same
few tensor operations for any number of rows. Gumbel-max over the truncated, temperature-scaled
log-probabilities samples exactly from the sampling distribution q_θ (docs/method.md §1).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor

from .distribution import sampling_log_probs
from .model_guard import cache_kwargs, forward_kwargs, hf_model, left_padded_positions, probe_mode, returned_cache


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


@dataclass(frozen=True)
class SamplingConfig:
    """How E is sampled; also defines q_θ when E is re-scored at any θ."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (HF generate would apply top_k=50 unless told 0)

    def __post_init__(self) -> None:
        if _not_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"SamplingConfig.temperature must be a finite number > 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingConfig.top_p must lie in (0, 1], got {self.top_p!r}; use 1.0 to turn top-p off")
        if _not_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")

    @property
    def truncates(self) -> bool:
        """True when top-k or top-p restricts the support of q_θ."""
        return self.top_k > 0 or self.top_p < 1.0


@dataclass
class ProbeBatch:
    """The evaluation batch E: left-padded prompts followed by sampled responses.

    Every row has the same prompt width ``prompt_length`` (left padding), so column
    ``prompt_length + k`` holds response token k of every row.
    """

    input_ids: Tensor  # [N, L] long
    attention_mask: Tensor  # [N, L] long: 1 on prompt tokens and counted response tokens
    response_mask: Tensor  # [N, L] bool: response tokens that count (up to and including EOS)
    group: Tensor  # [N] long: prompt index g
    response_index: Tensor  # [N] long: response index r within the prompt
    config: SamplingConfig
    prompt_length: int
    seed: int = 0
    # log q_θ₀(y_ik) as the sampler computed it, 0 where response_mask is False.
    sampler_log_probs: Tensor | None = field(default=None, repr=False)
    # [N] float64: log p(y_i | x_i) under the proposal E was actually drawn from (the user's
    # rollout engine); None: drawn from q_θ₀ itself. The estimators then weight by q_θ₀/p.
    proposal_log_probs: Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_sequences(cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                       config: SamplingConfig, *, eos_token_id: int | Sequence[int], pad_token_id: int,
                       responses_per_prompt: int = 1,
                       proposal_log_probs: Sequence[float] | Tensor | None = None) -> "ProbeBatch":
        """E from rollouts drawn elsewhere (HF ``generate``, vLLM, SGLang, ...).

        ``prompts``: G token-id lists. ``responses``: G·R token-id lists, prompt-major (the R
        responses of prompt 0, then of prompt 1, ...), each ending at its first EOS (included)
        or at ``config.max_new_tokens``; padding after the EOS is dropped. ``proposal_log_probs``:
        G·R values log p(y | x), summed over each response's tokens, under the distribution the
        engine really sampled from. Without them E is taken to be drawn from q_θ₀ as the probe
        scores it (``config``), which holds only when the engine samples exactly that
        distribution. The proposal must give positive probability to every response q_θ₀ can
        produce (e.g. sample at a higher temperature or a wider top-p, not a narrower one).
        """
        if _not_int(responses_per_prompt) or responses_per_prompt < 1:
            raise ValueError(f"responses_per_prompt must be >= 1, got {responses_per_prompt}")
        prompts = _check_prompts(prompts, None)
        eos = set(_eos_set(eos_token_id))
        if len(responses) != len(prompts) * responses_per_prompt:
            raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts x {responses_per_prompt} "
                             f"responses per prompt; give G·R responses, prompt-major")
        rows = [_response(i, r, eos, pad_token_id, config.max_new_tokens) for i, r in enumerate(responses)]
        proposal = None
        if proposal_log_probs is not None:
            proposal = torch.as_tensor(proposal_log_probs, dtype=torch.float64).flatten()
            if proposal.numel() != len(rows):
                raise ValueError(f"proposal_log_probs has {proposal.numel()} values for {len(rows)} responses; "
                                 "give one log p(y | x) per response, summed over its tokens")
            if not bool(torch.isfinite(proposal).all()) or bool((proposal > 1e-9).any()):
                raise ValueError("proposal_log_probs must be finite log-probabilities (<= 0), one per response")
        group = [g for g in range(len(prompts)) for _ in range(responses_per_prompt)]
        index = [r for _ in prompts for r in range(responses_per_prompt)]
        width = max(len(p) for p in prompts)
        length = max(len(row) for row in rows)
        tokens = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        counted = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
            counted[i, :len(row)] = True
        return _assemble([prompts[g] for g in group], width, tokens, counted, group, index, config, pad_token_id,
                         seed=0, proposal_log_probs=proposal)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def response_lengths(self) -> Tensor:
        """T_i, the number of response tokens that count, per sequence."""
        return self.response_mask.sum(-1)

    @property
    def num_groups(self) -> int:
        return int(self.group.unique().numel())

    def select(self, index: Tensor | slice | Sequence[int]) -> "ProbeBatch":
        """The rows ``index`` as a new batch with the same layout."""
        if not isinstance(index, (Tensor, slice)):
            index = torch.as_tensor(list(index), dtype=torch.long)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return replace(
            self,
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            response_mask=self.response_mask[index],
            group=self.group[index],
            response_index=self.response_index[index],
            sampler_log_probs=pick(self.sampler_log_probs),
            proposal_log_probs=pick(self.proposal_log_probs),
        )

    def microbatches(self, size: int | None) -> Iterator["ProbeBatch"]:
        n = len(self)
        size = n if size is None else size
        for start in range(0, n, size):
            yield self.select(slice(start, start + size))

    def to(self, device: torch.device | str) -> "ProbeBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            response_mask=move(self.response_mask),
            group=move(self.group),
            response_index=move(self.response_index),
            sampler_log_probs=move(self.sampler_log_probs),
            proposal_log_probs=move(self.proposal_log_probs),
        )


def _response(i: int, response: Sequence[int], eos: set[int], pad_token_id: int, max_new_tokens: int) -> list[int]:
    """Response ``i``'s counted tokens: up to and including its first EOS (padding after it dropped)."""
    ids = [int(t) for t in (response.tolist() if isinstance(response, Tensor) else response)]
    end = next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))
    if any(t != pad_token_id and t not in eos for t in ids[end:]):
        raise ValueError(f"response {i} has tokens after its first EOS; end each response at its EOS")
    ids = ids[:end]
    if not ids:
        raise ValueError(f"response {i} is empty; every response needs at least one token (its EOS)")
    if len(ids) > max_new_tokens:
        raise ValueError(f"response {i} has {len(ids)} tokens, more than config.max_new_tokens "
                         f"({max_new_tokens}); use the rollout engine's max_new_tokens in the SamplingConfig")
    if ids[-1] not in eos and len(ids) < max_new_tokens:
        raise ValueError(f"response {i} stops after {len(ids)} tokens without EOS, before max_new_tokens "
                         f"({max_new_tokens}); q_θ ends a response only at EOS or at max_new_tokens (a stop "
                         "string is not modelled): sample without stop strings or pass the full responses")
    return ids


def _assemble(prompt_rows: list[list[int]], width: int, tokens: Tensor, counted: Tensor, group: Sequence[int],
              response_index: Sequence[int], config: SamplingConfig, pad_token_id: int, *, seed: int,
              sampler_log_probs: Tensor | None = None, proposal_log_probs: Tensor | None = None) -> ProbeBatch:
    """A ProbeBatch from left-padded prompts and right-aligned responses (``tokens``, ``counted`` [n, T])."""
    n, device = len(prompt_rows), tokens.device
    prompt_ids, prompt_mask = left_pad(prompt_rows, width, pad_token_id, device)
    no_response = torch.zeros((n, width), dtype=torch.bool, device=device)
    return ProbeBatch(
        input_ids=torch.cat([prompt_ids, tokens], 1),
        attention_mask=torch.cat([prompt_mask, counted.long()], 1),
        response_mask=torch.cat([no_response, counted], 1),
        group=torch.tensor(list(group), device=device),
        response_index=torch.tensor(list(response_index), device=device),
        config=config,
        prompt_length=width,
        seed=seed,
        sampler_log_probs=(None if sampler_log_probs is None
                           else torch.cat([torch.zeros((n, width), device=device), sampler_log_probs], 1)),
        proposal_log_probs=proposal_log_probs,
    )


def row_seed(seed: int, prompt_index: int, response_index: int) -> int:
    """A 63-bit generator seed that depends only on (seed, prompt index, response index)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{response_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser: a bijection of 64-bit patterns whose outputs look independent for
    consecutive inputs. int64 products wrap modulo 2^64, as the hash needs."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def counter_uniforms(row_keys: Tensor, step: int, vocab: int) -> Tensor:
    """U(0, 1) noise [n, vocab] (float64, never 0 or 1): entry (i, v) is a function of
    (row_keys[i], step, v) only, drawn for all rows by the same handful of tensor operations."""
    # splitmix64: a stream seeded per (row, step), read at index v = state + v·golden, mixed.
    per_row = _mix(row_keys + _signed((step + 1) * 0xD1B54A32D192ED03))
    tokens = torch.arange(vocab, device=row_keys.device, dtype=torch.int64) * _GOLDEN
    bits = _mix(per_row[:, None] + tokens)
    return (_shift_right(bits, 11).to(torch.float64) + 0.5) * 2.0**-53


def context_length(model: torch.nn.Module) -> int | None:
    """The model's maximum number of positions, when its config states one."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int | None) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty sequence of token-id lists; tokenize strings first")
    checked = []
    for g, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            raise ValueError(f"prompt {g} is a string; pass token ids (tokenize it first)")
        ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, Tensor) else prompt)]
        if not ids:
            raise ValueError(f"prompt {g} is empty; every prompt needs at least one token")
        if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
            raise ValueError(f"prompt {g} has token ids outside [0, {vocab_size}); check the tokenizer matches the model")
        checked.append(ids)
    return checked


def check_sampling_inputs(model, prompts: Sequence[Sequence[int]], config: SamplingConfig,
                          eos_token_id: int | Sequence[int], pad_token_id: int) -> list[list[int]]:
    """The prompts as token-id lists, after checking everything a sampling run needs of them and
    of the special tokens against the model (vocabulary, context length); a clear ValueError
    otherwise. The callback calls it once before training, not at every probe."""
    if not isinstance(config, SamplingConfig):
        raise ValueError(f"config must be a SamplingConfig, got {type(config).__name__}")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    prompts = _check_prompts(prompts, vocab_size)
    for name, ids in (("eos_token_id", _eos_set(eos_token_id)), ("pad_token_id", [pad_token_id])):
        if vocab_size is not None and any(not (0 <= int(i) < vocab_size) for i in ids):
            raise ValueError(f"{name} {ids if len(ids) > 1 else ids[0]} is outside the model's vocabulary "
                             f"[0, {vocab_size}); check the tokenizer matches the model")
    width = max(len(p) for p in prompts)
    limit = context_length(model)
    if limit is not None and width + config.max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({width} tokens) plus max_new_tokens ({config.max_new_tokens}) exceeds the "
            f"model's context of {limit} positions; shorten the prompts or lower max_new_tokens")
    return prompts


def _eos_set(eos_token_id: int | Sequence[int]) -> list[int]:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        raise ValueError("eos_token_id must be an int or a non-empty sequence of ints")
    return [int(i) for i in ids]


def left_pad(prompts: list[list[int]], width: int, pad_token_id: int, device) -> tuple[Tensor, Tensor]:
    """(ids, attention mask) [n, width]: each prompt right-aligned, PAD (mask 0) before it."""
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, device=device)
        mask[i, width - len(prompt):] = 1
    return ids, mask


def through_first_eos(tokens: Tensor, eos: Tensor) -> Tensor:
    """Which response tokens count: a response ends at its first EOS (which counts) or at
    max_new_tokens; everything after the EOS is padding."""
    is_eos = torch.isin(tokens, eos)
    return (is_eos.cumsum(1) - is_eos.long()) == 0


def eos_check_interval(device: torch.device) -> int:
    """Decoding steps between checks that every row has ended: each check waits for the device
    (a host sync on a GPU), so there it runs every 8 steps; on a CPU it is free, every step."""
    return 8 if device.type == "cuda" else 1


def check_defensive(defensive: float) -> float:
    if isinstance(defensive, bool) or not isinstance(defensive, (int, float)) or not 0.0 <= defensive < 1.0:
        raise ValueError(f"defensive must be a number in [0, 1) (the weight of the untruncated distribution in "
                         f"E's proposal; 0: sample q_θ₀ itself), got {defensive!r}")
    return float(defensive)


def defensive_log_probs(logits: Tensor, log_q: Tensor, config: SamplingConfig, defensive: float) -> Tensor:
    """log p of the defensive proposal p = (1 − ε)·q + ε·q_full at one position, where q is the
    truncated sampling distribution and q_full the same temperature without top-k/top-p: it gives
    every token positive probability, so tokens a step moves into the support are in E too
    (docs/method.md §3, Defensive proposal)."""
    full, _ = sampling_log_probs(logits, replace(config, top_k=0, top_p=1.0))
    return torch.logaddexp(log_q + math.log1p(-defensive), full + math.log(defensive))


@dataclass(frozen=True)
class DecodeOptions:
    """How ``sample_batch`` runs the model's decoding steps (the draws do not depend on it).

    cache: "dynamic" (the model's default KV cache, grown every step) or "static" (preallocated
        for prompt + max_new_tokens, fixed shapes from step to step).
    compile: ``torch.compile`` the model's forward for decoding (needs cache="static", so that
        the shapes stay fixed; on CUDA in "reduce-overhead" mode, i.e. CUDA graphs, which removes
        the per-kernel launch cost that dominates decoding a small batch). Compiled once per
        model and process.
    """

    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"decode.cache must be 'dynamic' or 'static', got {self.cache!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"decode.compile must be True or False, got {self.compile!r}")
        if self.compile and self.cache != "static":
            raise ValueError("decode.compile needs decode.cache='static': a dynamic cache changes shape every step, "
                             "and each new shape would be compiled again")


_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


def compile_options(device: torch.device) -> dict:
    return {"mode": "reduce-overhead"} if device.type == "cuda" else {}


def _decoder(model: torch.nn.Module, options: DecodeOptions, device: torch.device):
    """The callable that runs one decoding forward."""
    if not options.compile:
        return model
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=False, **compile_options(device))
    return _COMPILED[model]


def _new_cache(model: torch.nn.Module, options: DecodeOptions, length: int):
    if options.cache == "dynamic":
        return None  # the model makes its own on the first step
    from transformers import StaticCache

    return StaticCache(config=hf_model(model).config.get_text_config(decoder=True), max_cache_len=length)


@torch.no_grad()
def _decode(model, rows: list[tuple[list[int], int, int]], width: int, config: SamplingConfig,
            eos: Tensor, pad_token_id: int, seed: int, device: torch.device,
            defensive: float = 0.0, options: DecodeOptions = DecodeOptions()) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sample responses for ``rows`` = [(prompt ids, prompt index, response index)].

    Returns (tokens [n, steps], log q of each sampled token [n, steps], and with ``defensive`` > 0
    the log-probability of each under the proposal it was drawn from, else None). Noise is
    counter-based (``counter_uniforms``), so row i's draw at step t is the same in any batch; a
    row that has ended keeps decoding PAD until every row has, or until ``max_new_tokens``.
    """
    n, steps = len(rows), config.max_new_tokens
    ids, prompt_mask = left_pad([prompt for prompt, _, _ in rows], width, pad_token_id, device)
    keys = torch.tensor([_signed(row_seed(seed, g, r)) for _, g, r in rows], dtype=torch.int64, device=device)
    mask = torch.ones((n, width + steps), dtype=prompt_mask.dtype, device=device)  # preallocated
    mask[:, :width] = prompt_mask
    positions = left_padded_positions(mask)
    tokens = torch.full((n, steps), pad_token_id, dtype=torch.long, device=device)
    log_probs = proposal = None  # in the dtype of the sampling log-probabilities (float64 for a float64 model)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    check_every = eos_check_interval(device)
    cache, step_input, done = _new_cache(model, options, width + steps), ids, 0
    forward = _decoder(model, options, device)
    for t in range(steps):
        end = width + t
        # A static cache masks the slots not yet written by position, so it takes the whole
        # preallocated mask: one shape for every decoding step (compiled once).
        visible = mask if options.cache == "static" else mask[:, :end]
        kwargs = forward_kwargs(model, step_input, visible, positions[:, end - step_input.shape[1]:end], keep_last=1)
        out = forward(**kwargs, **cache_kwargs(model, cache), use_cache=True)
        cache = returned_cache(out)
        logq, _ = sampling_log_probs(out.logits[:, -1], config)
        logp = defensive_log_probs(out.logits[:, -1], logq, config, defensive) if defensive > 0 else logq
        gumbel = -torch.log(-torch.log(counter_uniforms(keys, t, logq.shape[-1]))).to(logq.dtype)
        token = torch.where(finished, pad_token_id, (logp + gumbel).argmax(-1))
        tokens[:, t] = token
        if log_probs is None:
            log_probs = torch.zeros((n, steps), dtype=logq.dtype, device=device)
            proposal = torch.zeros_like(log_probs) if defensive > 0 else None
        log_probs[:, t] = logq.gather(-1, token[:, None]).squeeze(-1).masked_fill(finished, 0.0)
        if proposal is not None:
            proposal[:, t] = logp.gather(-1, token[:, None]).squeeze(-1).masked_fill(finished, 0.0)
        finished |= torch.isin(token, eos)
        done = t + 1
        if done % check_every == 0 and bool(finished.all()):
            break
        step_input = token[:, None]
    return tokens[:, :done], log_probs[:, :done], (None if proposal is None else proposal[:, :done])


def sample_batch(model, prompts: Sequence[Sequence[int]], config: SamplingConfig, *,
                 eos_token_id: int | Sequence[int], pad_token_id: int, responses_per_prompt: int = 1,
                 seed: int = 0, batch_size: int | None = None,
                 prompt_indices: Sequence[int] | None = None, defensive: float = 0.0,
                 decode: DecodeOptions | None = None) -> ProbeBatch:
    """Sample E: ``responses_per_prompt`` responses for each prompt from the model as it is.

    ``decode``: KV cache and compilation of the decoding steps (``DecodeOptions``); the tokens
    drawn are the same either way, up to the rounding of a kernel on a float32 near-tie.

    ``defensive`` = ε > 0 with top-k/top-p draws from (1 − ε)·q_θ₀ + ε·(q_θ₀ untruncated) per
    token and records that proposal (``proposal_log_probs``), so that a measured ΔH sees tokens a
    step moves into the support; without truncation it changes nothing.

    ``prompt_indices`` gives each prompt's global index g (default 0..G-1); DDP ranks pass their
    share's global indices so that the seeds, and so the sequences, match a single process.
    The model's train/eval mode, gradient-checkpointing flags and the global RNG are unchanged.
    """
    prompts = check_sampling_inputs(model, prompts, config, eos_token_id, pad_token_id)
    if _not_int(responses_per_prompt) or responses_per_prompt < 1:
        raise ValueError(f"responses_per_prompt must be >= 1, got {responses_per_prompt}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    defensive = check_defensive(defensive)
    if not config.truncates:
        defensive = 0.0  # q_θ₀ already gives every token positive probability
    indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
    if len(indices) != len(prompts):
        raise ValueError(f"prompt_indices has {len(indices)} entries for {len(prompts)} prompts")
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    eos = torch.tensor(_eos_set(eos_token_id), device=device)
    rows = [(prompt, g, r) for prompt, g in zip(prompts, indices) for r in range(responses_per_prompt)]
    size = len(rows) if batch_size is None else batch_size

    chunks = []
    with probe_mode(model):
        for start in range(0, len(rows), size):
            chunks.append(_decode(model, rows[start:start + size], width, config, eos, pad_token_id, seed, device,
                                  defensive, decode or DecodeOptions()))
    steps = max(t.shape[1] for t, _, _ in chunks)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, steps - t.shape[1]), value=v)  # noqa: E731
    tokens = torch.cat([pad(t, pad_token_id) for t, _, _ in chunks])
    log_probs = torch.cat([pad(lp, 0.0) for _, lp, _ in chunks])

    counted = through_first_eos(tokens, eos)
    length = int(counted.sum(1).max())
    tokens = tokens[:, :length].masked_fill(~counted[:, :length], pad_token_id)
    counted = counted[:, :length]
    log_probs = log_probs[:, :length].masked_fill(~counted, 0.0)
    proposal = None
    if defensive > 0:
        proposal = torch.cat([pad(p, 0.0) for _, _, p in chunks])[:, :length].masked_fill(~counted, 0.0)
        proposal = proposal.double().sum(-1)

    return _assemble([prompt for prompt, _, _ in rows], width, tokens, counted, [g for _, g, _ in rows],
                     [r for _, _, r in rows], config, pad_token_id, seed=seed, sampler_log_probs=log_probs,
                     proposal_log_probs=proposal)
