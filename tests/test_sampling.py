"""The sampler (docs/method.md §1): it samples exactly from q_θ, its log-probs are the teacher-forced
ones, it is invariant to batch size and DDP sharding, masks after EOS, and leaves the global RNG
alone."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TopKLogitsWarper, TopPLogitsWarper

from entropy_callbacks import ProbeBatch, SamplingConfig, sample_batch
from entropy_callbacks import sampling as sampling_module
from entropy_callbacks.sampling import DecodeOptions, _signed, counter_uniforms, row_seed
from tiny_models import ARCHITECTURES, EOS, PAD, add_lora, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# Different lengths on purpose: every batch below needs left padding.
PROMPTS = [[3, 4, 5, 6], [7, 8], [9], [10, 11, 3], [4, 4, 4, 4, 4], [6, 2]]
INIT_STD = 0.3  # peaked enough that top-k / top-p really truncate and EOS is drawn now and then

CONFIGS = {
    "plain": SamplingConfig(max_new_tokens=8),
    "temperature": SamplingConfig(max_new_tokens=8, temperature=0.7),
    "top_k": SamplingConfig(max_new_tokens=8, top_k=5),
    "top_p": SamplingConfig(max_new_tokens=8, top_p=0.9),
    "all": SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sampling-models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = {arch: tiny_model(arch, directory, init_std=INIT_STD).eval() for arch in ARCHITECTURES}
        built["llama-lora"] = add_lora(tiny_model("llama", directory, seed=1, init_std=INIT_STD)).eval()
    return built


def draw(model, config=CONFIGS["all"], prompts=PROMPTS, **kwargs) -> ProbeBatch:
    kwargs.setdefault("eos_token_id", EOS)
    kwargs.setdefault("pad_token_id", PAD)
    kwargs.setdefault("responses_per_prompt", 2)
    return sample_batch(model, prompts, config, **kwargs)


def reference_log_q(model, input_ids, attention_mask, prompt_length, config) -> torch.Tensor:
    """Teacher-forced log q_θ over the vocabulary at every response column, computed independently
    of the library: one plain forward, then HF's own temperature / top-k / top-p warpers."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits.float()
    scores = logits[:, prompt_length - 1:-1] / config.temperature
    n, m, v = scores.shape
    flat = scores.reshape(n * m, v)
    if config.top_k > 0:
        flat = TopKLogitsWarper(config.top_k)(None, flat)
    if config.top_p < 1.0:
        flat = TopPLogitsWarper(config.top_p)(None, flat)
    return flat.log_softmax(-1).reshape(n, m, v)


def response_tokens(batch: ProbeBatch, i: int) -> list[int]:
    row = batch.input_ids[i, batch.prompt_length:]
    return row[batch.response_mask[i, batch.prompt_length:]].tolist()


def prompt_tokens(batch: ProbeBatch, i: int) -> list[int]:
    row = batch.input_ids[i, :batch.prompt_length]
    return row[batch.attention_mask[i, :batch.prompt_length].bool()].tolist()


# --- (a) the sampler's log q equals the teacher-forced log q -------------------------------------

@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("arch", [*ARCHITECTURES, "llama-lora"])
def test_sampler_log_probs_equal_teacher_forced(models, arch, config_name):
    model, config = models[arch], CONFIGS[config_name]
    batch = draw(model, config, seed=7)
    assert batch.sampler_log_probs is not None
    assert batch.sampler_log_probs.shape == batch.input_ids.shape

    log_q = reference_log_q(model, batch.input_ids, batch.attention_mask, batch.prompt_length, config)
    targets = batch.input_ids[:, batch.prompt_length:]
    counted = batch.response_mask[:, batch.prompt_length:]
    expected = log_q.gather(-1, targets[..., None]).squeeze(-1)

    # Every sampled token lies in the support of q_θ (finite log-prob) ...
    assert torch.isfinite(expected[counted]).all(), "the sampler drew a token outside the top-k/top-p support"
    # ... and its log-prob is the teacher-forced one.
    got = batch.sampler_log_probs[:, batch.prompt_length:]
    torch.testing.assert_close(got[counted].double(), expected[counted].double(), atol=1e-5, rtol=0)
    # Nothing is reported where nothing counts.
    assert (batch.sampler_log_probs[~batch.response_mask] == 0).all()
    if config.truncates:
        # Not vacuous: the support really is truncated at some of the sampled positions.
        truncated = torch.isinf(log_q).any(-1)
        assert truncated[counted].any()


def test_sampled_tokens_follow_q(models):
    """Gumbel-max draws follow q_θ: first-token frequencies over many responses match it."""
    model, config = models["llama"], SamplingConfig(max_new_tokens=1, temperature=0.7, top_k=5)
    prompt = [3, 4, 5]
    n = 3000
    batch = sample_batch(model, [prompt], config, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=n, seed=3)
    first = batch.input_ids[:, batch.prompt_length]
    ids = torch.tensor([prompt])
    q = reference_log_q(model, torch.cat([ids, ids[:, :1]], 1), torch.ones(1, 4, dtype=torch.long), 3,
                        config)[0, 0].exp().double()
    counts = torch.bincount(first, minlength=q.numel()).double()
    assert (counts[q == 0] == 0).all(), "tokens outside the top-k support were sampled"
    sigma = (n * q * (1 - q)).sqrt()
    assert ((counts - n * q).abs() <= 5 * sigma + 1).all(), (counts, n * q)
    assert int((q > 0).sum()) == 5 and int((counts > 0).sum()) >= 2


class _OpsPerStep(TorchDispatchMode):
    """Counts aten operations between consecutive forwards of ``model`` (one decoding step each)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.steps: list[int] = []
        self.handle = model.register_forward_pre_hook(lambda *_: self.steps.append(0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.steps:
            self.steps[-1] += 1
        return func(*args, **(kwargs or {}))


def test_operations_per_decoding_step_do_not_grow_with_rows(models):
    """Counter-based noise: one set of tensor ops draws every row's noise, so a decoding step
    issues the same number of operations for 2 rows and for 12 (per-row generators: +1 per row)."""
    model, config = models["llama"], SamplingConfig(max_new_tokens=6, top_p=0.9)
    counts = {}
    for rows in (1, 6):
        counter = _OpsPerStep(model)
        try:
            with counter:
                draw(model, config, prompts=PROMPTS[:2], responses_per_prompt=rows, seed=4)
        finally:
            counter.handle.remove()
        counts[rows] = counter.steps
    steps = min(len(counts[1]), len(counts[6]))
    assert steps >= 3
    # step 0 is the prefill (its own shapes); every later step must cost the same op count
    assert counts[1][1:steps - 1] == counts[6][1:steps - 1], counts


def test_counter_noise_is_uniform_and_row_local():
    keys = torch.tensor([_signed(row_seed(0, g, r)) for g in range(40) for r in range(5)])
    u = counter_uniforms(keys, 3, 500)
    assert u.dtype == torch.float64 and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert torch.equal(counter_uniforms(keys[7:11], 3, 500), u[7:11])  # a row's noise ignores the others
    other_step = counter_uniforms(keys, 4, 500)
    assert abs(float(torch.corrcoef(torch.stack([u.flatten(), other_step.flatten()]))[0, 1])) < 0.01


# --- (b) batch-size invariance and DDP sharding ---------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batch_size_invariance(models, arch):
    model = models[arch]
    full = draw(model, seed=11)
    for batch_size in (1, 3, 5):
        other = draw(model, seed=11, batch_size=batch_size)
        assert other.prompt_length == full.prompt_length
        for name in ("input_ids", "attention_mask", "response_mask", "group", "response_index"):
            assert torch.equal(getattr(other, name), getattr(full, name)), (batch_size, name)
        torch.testing.assert_close(other.sampler_log_probs, full.sampler_log_probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prompt_indices_reproduce_rows_of_the_full_batch(models, arch):
    """A DDP rank that draws prompts[2:4] with their global indices gets rows 4..7 of the full batch,
    although its own left padding is narrower."""
    model = models[arch]
    full = draw(model, seed=5)
    shard = draw(model, prompts=PROMPTS[2:4], prompt_indices=[2, 3], seed=5)
    assert shard.prompt_length < full.prompt_length  # the padding really differs
    assert shard.group.tolist() == [2, 2, 3, 3]
    assert shard.response_index.tolist() == [0, 1, 0, 1]
    for i, j in enumerate(range(4, 8)):
        assert prompt_tokens(shard, i) == prompt_tokens(full, j)
        assert response_tokens(shard, i) == response_tokens(full, j), (i, j)
        got = shard.sampler_log_probs[i][shard.response_mask[i]]
        want = full.sampler_log_probs[j][full.response_mask[j]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Without the global indices the shard would be drawn as prompts 0 and 1: different sequences.
    local = draw(model, prompts=PROMPTS[2:4], seed=5)
    assert [response_tokens(local, i) for i in range(4)] != [response_tokens(shard, i) for i in range(4)]


# --- (c) EOS masking -----------------------------------------------------------------------------

@pytest.mark.parametrize("eos, pad", [(EOS, PAD), ([EOS, 5], PAD), ((EOS,), EOS)],
                         ids=["single-eos", "two-eos-ids", "pad-is-eos"])
def test_eos_masking(models, eos, pad):
    config = SamplingConfig(max_new_tokens=8, temperature=1.3)
    batch = draw(models["qwen2"], config, eos_token_id=eos, pad_token_id=pad, responses_per_prompt=4, seed=2)
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
    width = batch.prompt_length
    responses = batch.input_ids[:, width:]
    assert responses.shape[1] <= config.max_new_tokens
    assert not batch.response_mask[:, :width].any()
    assert batch.response_mask.dtype == torch.bool

    ended_by = set()
    with_eos = without_eos = pad_after_eos = 0
    for i in range(len(batch)):
        tokens = responses[i].tolist()
        counted = batch.response_mask[i, width:].tolist()
        length = sum(counted)
        assert length >= 1
        assert counted == [True] * length + [False] * (len(tokens) - length)  # one contiguous run from the start
        assert int(batch.response_lengths[i]) == length
        hits = [k for k, t in enumerate(tokens[:length]) if t in eos_ids]
        if hits:
            # Ends at the first EOS, which counts; everything after it is PAD and not attended.
            assert hits == [length - 1], tokens
            assert all(t == pad for t in tokens[length:]), tokens
            ended_by.add(tokens[length - 1])
            with_eos += 1
            pad_after_eos += len(tokens) - length
        else:
            # No EOS: exactly max_new_tokens tokens.
            assert length == config.max_new_tokens, tokens
            without_eos += 1
        prompt_mask = batch.attention_mask[i, :width]
        assert torch.equal(batch.attention_mask[i], torch.cat([prompt_mask, batch.response_mask[i, width:].long()]))
    # Not vacuous: both endings occur, some rows carry PAD after their EOS, every EOS id ends something.
    assert with_eos and without_eos and pad_after_eos
    assert ended_by == eos_ids


# --- (d) RNG: the global one is untouched, the sampler's own is seeded --------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama-lora"])
def test_global_rng_untouched_and_seed_determines_the_batch(models, arch):
    model = models[arch]
    torch.manual_seed(1234)
    random.seed(1234)
    before, python_before = torch.get_rng_state(), random.getstate()
    first = draw(model, seed=21)
    assert torch.equal(torch.get_rng_state(), before)
    assert random.getstate() == python_before

    torch.manual_seed(999)  # a different global state must not matter
    again = draw(model, seed=21)
    for name in ("input_ids", "attention_mask", "response_mask"):
        assert torch.equal(getattr(again, name), getattr(first, name))
    assert again.seed == first.seed == 21

    different = draw(model, seed=22)
    assert different.seed == 22
    assert [response_tokens(different, i) for i in range(len(different))] != \
        [response_tokens(first, i) for i in range(len(first))]
    # Responses to the same prompt are different draws, not copies.
    assert any(response_tokens(first, 2 * g) != response_tokens(first, 2 * g + 1) for g in range(len(PROMPTS)))


# --- (e) left padding ----------------------------------------------------------------------------

def test_prompts_are_left_padded_to_one_width(models):
    prompts = [[3], [4, 5, 6, 7, 8], [PAD, 9], [10, 11]]  # a PAD id inside a prompt is still a prompt token
    config = SamplingConfig(max_new_tokens=3)
    batch = sample_batch(models["gpt2"], prompts, config, eos_token_id=EOS, pad_token_id=PAD, seed=0)
    width = 5
    assert batch.prompt_length == width
    assert batch.config == config
    assert len(batch) == 4 and batch.group.tolist() == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        padding = width - len(prompt)
        assert batch.input_ids[i, :width].tolist() == [PAD] * padding + prompt
        assert batch.attention_mask[i, :width].tolist() == [0] * padding + [1] * len(prompt)
        assert not batch.response_mask[i, :width].any()
        assert batch.response_mask[i, width]  # the first response token always counts
    assert batch.input_ids.dtype == torch.long


# --- (e) decoding options: a static KV cache and a compiled step draw the same E -----------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_static_cache_and_compiled_step_draw_the_same_batch(models, arch, monkeypatch):
    """DecodeOptions change how the forward runs, not what is drawn: same tokens, log-probs to
    float32 rounding (the static cache attends over its full preallocated length). The compiled
    step is traced by dynamo with the eager backend here (what CI can run in seconds); on CUDA
    it compiles with inductor in "reduce-overhead" mode."""
    model = models[arch]
    dynamic = draw(model, seed=21)
    static = draw(model, seed=21, decode=DecodeOptions(cache="static"))
    monkeypatch.setattr(sampling_module, "compile_options", lambda device: {"backend": "eager"})
    monkeypatch.setattr(sampling_module, "_COMPILED", sampling_module.weakref.WeakKeyDictionary())
    compiled = draw(model, seed=21, decode=DecodeOptions(cache="static", compile=True))
    assert model in sampling_module._COMPILED  # the compiled forward really ran
    for other in (static, compiled):
        for name in ("input_ids", "attention_mask", "response_mask"):
            assert torch.equal(getattr(other, name), getattr(dynamic, name)), name
        torch.testing.assert_close(other.sampler_log_probs, dynamic.sampler_log_probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options, message", [
    (dict(cache="paged"), "decode.cache must be 'dynamic' or 'static'"),
    (dict(compile=True), "decode.compile needs decode.cache='static'"),
    (dict(cache="static", compile="yes"), "decode.compile must be True or False"),
])
def test_bad_decode_options(options, message):
    with pytest.raises(ValueError, match=message):
        DecodeOptions(**options)
