"""Bad input gets a ValueError that says what to fix."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from entropy_callbacks import (SamplingConfig, entropy_estimate, measure_delta_h, predict_delta_h,
                               sample_batch)
from tiny_models import EOS, PAD, VOCAB, add_lora, random_step, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PROMPTS = [[3, 4, 5], [6, 7]]
CONFIG = SamplingConfig(max_new_tokens=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A full GPT-2 with one frozen parameter, a LoRA Llama, a batch, and a valid step for each."""
    directory = tmp_path_factory.mktemp("bad-input-models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = tiny_model("gpt2", directory).eval()
        full.transformer.wpe.weight.requires_grad_(False)
        lora = add_lora(tiny_model("llama", directory)).eval()
    batch = sample_batch(full, PROMPTS, CONFIG, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=2)
    lora_batch = sample_batch(lora, PROMPTS, CONFIG, eos_token_id=EOS, pad_token_id=PAD, responses_per_prompt=2)
    return {"full": (full, batch, *random_step(full, seed=1)), "lora": (lora, lora_batch, *random_step(lora, seed=2))}


def call(name, model, batch, base, delta, **kwargs):
    if name == "entropy_estimate":
        return entropy_estimate(model, batch, **kwargs)
    if name == "measure_delta_h":
        return measure_delta_h(model, batch, base, delta, **kwargs)
    if name == "predict_delta_h-order1":
        return predict_delta_h(model, batch, base, delta, order=1, **kwargs)
    return predict_delta_h(model, batch, base, delta, order=2, **kwargs)


ENGINE = ["entropy_estimate", "measure_delta_h", "predict_delta_h-order1", "predict_delta_h-order2"]
STEP_FUNCTIONS = ENGINE[1:]


def first_name(mapping):
    return next(iter(mapping))


# --- SamplingConfig -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan"), float("inf")])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        SamplingConfig(max_new_tokens=4, temperature=temperature)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5, float("nan")])
def test_top_p_must_be_in_unit_interval(top_p):
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        SamplingConfig(max_new_tokens=4, top_p=top_p)


@pytest.mark.parametrize("top_k", [-1, -50, 2.5])
def test_top_k_must_be_a_non_negative_integer(top_k):
    with pytest.raises(ValueError, match=r"top_k must be an integer >= 0"):
        SamplingConfig(max_new_tokens=4, top_k=top_k)


@pytest.mark.parametrize("max_new_tokens", [0, -3, 2.0])
def test_max_new_tokens_must_be_at_least_one(max_new_tokens):
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 1"):
        SamplingConfig(max_new_tokens=max_new_tokens)


def test_valid_edge_values_are_accepted():
    SamplingConfig(max_new_tokens=1, temperature=1e-3, top_p=1.0, top_k=0)
    SamplingConfig(max_new_tokens=1, top_p=1e-6, top_k=1)


# --- sample_batch --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("prompt_length, max_new_tokens", [(60, 8), (70, 1), (64, 1)])
def test_prompts_longer_than_the_context(setup, kind, prompt_length, max_new_tokens):
    model = setup[kind][0]  # both tiny models have 64 positions
    prompts = [[3, 4], [5] * prompt_length]
    with pytest.raises(ValueError, match=r"exceeds the model's context of 64 positions"):
        sample_batch(model, prompts, SamplingConfig(max_new_tokens=max_new_tokens),
                     eos_token_id=EOS, pad_token_id=PAD)


def test_prompt_plus_response_exactly_filling_the_context_is_fine(setup):
    model = setup["full"][0]  # GPT-2 would index past its position table if this were off by one
    batch = sample_batch(model, [[5] * 56], SamplingConfig(max_new_tokens=8), eos_token_id=EOS, pad_token_id=PAD)
    assert batch.input_ids.shape[1] <= 64
    entropy_estimate(model, batch)


@pytest.mark.parametrize("prompts, match", [
    ([], r"prompts must be a non-empty sequence"),
    ("hello", r"prompts must be a non-empty sequence of token-id lists; tokenize"),
    (["hello"], r"prompt 0 is a string; pass token ids"),
    ([[3, 4], []], r"prompt 1 is empty"),
    ([[3, VOCAB]], r"prompt 0 has token ids outside \[0, 12\)"),
    ([[3, -1]], r"prompt 0 has token ids outside \[0, 12\)"),
])
def test_bad_prompts(setup, prompts, match):
    with pytest.raises(ValueError, match=match):
        sample_batch(setup["full"][0], prompts, CONFIG, eos_token_id=EOS, pad_token_id=PAD)


@pytest.mark.parametrize("kwargs, match", [
    ({"responses_per_prompt": 0}, r"responses_per_prompt must be >= 1"),
    ({"batch_size": 0}, r"batch_size must be >= 1 or None"),
    ({"prompt_indices": [0]}, r"prompt_indices has 1 entries for 2 prompts"),
    ({"eos_token_id": []}, r"eos_token_id must be an int or a non-empty sequence"),
])
def test_bad_sampling_options(setup, kwargs, match):
    kwargs = {"eos_token_id": EOS, "pad_token_id": PAD, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_batch(setup["full"][0], PROMPTS, CONFIG, **kwargs)


def test_config_must_be_a_sampling_config(setup):
    with pytest.raises(ValueError, match=r"config must be a SamplingConfig"):
        sample_batch(setup["full"][0], PROMPTS, {"max_new_tokens": 4}, eos_token_id=EOS, pad_token_id=PAD)


# --- the batch -----------------------------------------------------------------------------------

@pytest.mark.parametrize("function", ENGINE)
def test_empty_batch(setup, function):
    model, batch, base, delta = setup["full"]
    empty = batch.select([])
    assert len(empty) == 0
    with pytest.raises(ValueError, match=r"batch is empty"):
        call(function, model, empty, base, delta)


@pytest.mark.parametrize("function", ENGINE)
def test_batch_must_be_a_probe_batch(setup, function):
    model, batch, base, delta = setup["full"]
    with pytest.raises(ValueError, match=r"batch must be a ProbeBatch"):
        call(function, model, {"input_ids": batch.input_ids}, base, delta)


def test_sequence_without_response_tokens(setup):
    model, batch, _, _ = setup["full"]
    mask = batch.response_mask.clone()
    mask[0] = False
    with pytest.raises(ValueError, match=r"every sequence in the batch needs at least one response token"):
        entropy_estimate(model, dataclasses.replace(batch, response_mask=mask))


# --- parameter mappings --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("function", STEP_FUNCTIONS)
@pytest.mark.parametrize("which", ["base", "delta"])
def test_unknown_parameter_names(setup, kind, function, which):
    model, batch, base, delta = setup[kind]
    mappings = {"base": dict(base), "delta": dict(delta)}
    mappings[which]["transformer.no_such.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=rf"{which} names 1 tensors that are not parameters of the model: "
                                         r"transformer\.no_such\.weight; use the names from model\.named_parameters"):
        call(function, model, batch, mappings["base"], mappings["delta"])


def test_unknown_names_in_entropy_estimate_params(setup):
    model, batch, _, _ = setup["full"]
    with pytest.raises(ValueError, match=r"not parameters of the model: lm_head\.bias"):
        entropy_estimate(model, batch, params={"lm_head.bias": torch.zeros(VOCAB)})


@pytest.mark.parametrize("function", STEP_FUNCTIONS)
def test_delta_on_frozen_parameters(setup, function):
    # LoRA: the base weights are frozen; full model: the position embedding was frozen.
    for kind, name in (("lora", "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"),
                       ("full", "transformer.wpe.weight")):
        model, batch, base, delta = setup[kind]
        param = dict(model.named_parameters())[name]
        assert not param.requires_grad
        with pytest.raises(ValueError, match=r"not trainable \(requires_grad=False\)"):
            call(function, model, batch, base, {**delta, name: torch.zeros_like(param)})


@pytest.mark.parametrize("function", STEP_FUNCTIONS)
@pytest.mark.parametrize("which", ["base", "delta"])
def test_shape_mismatch(setup, function, which):
    model, batch, base, delta = setup["full"]
    mappings = {"base": dict(base), "delta": dict(delta)}
    name = first_name(mappings[which])
    shape = tuple(mappings[which][name].shape)
    mappings[which][name] = mappings[which][name].flatten()[:-1]
    with pytest.raises(ValueError, match=rf"{which}\[{name!r}\] has shape .* but the parameter has shape "
                                         rf"{shape}".replace("(", r"\(").replace(")", r"\)")):
        call(function, model, batch, mappings["base"], mappings["delta"])


def test_shape_mismatch_in_entropy_estimate_params(setup):
    model, batch, _, _ = setup["full"]
    with pytest.raises(ValueError, match=r"has shape \(12, 15\) but the parameter has shape \(12, 16\)"):
        entropy_estimate(model, batch, params={"transformer.wte.weight": torch.zeros(12, 15)})


@pytest.mark.parametrize("function", STEP_FUNCTIONS)
def test_base_dtype_mismatch(setup, function):
    model, batch, base, delta = setup["full"]
    name = first_name(base)
    with pytest.raises(ValueError, match=r"has dtype torch\.float64 but the parameter is torch\.float32"):
        call(function, model, batch, {**base, name: base[name].double()}, delta)


def test_params_dtype_mismatch_in_entropy_estimate(setup):
    model, batch, base, _ = setup["full"]
    name = first_name(base)
    with pytest.raises(ValueError, match=r"has dtype torch\.float16 but the parameter is torch\.float32"):
        entropy_estimate(model, batch, params={name: base[name].half()})


@pytest.mark.parametrize("function", STEP_FUNCTIONS)
@pytest.mark.parametrize("which", ["base", "delta"])
def test_integer_tensors_are_rejected(setup, function, which):
    model, batch, base, delta = setup["full"]
    mappings = {"base": dict(base), "delta": dict(delta)}
    name = first_name(mappings[which])
    mappings[which][name] = torch.zeros_like(mappings[which][name], dtype=torch.long)
    with pytest.raises(ValueError, match=r"dtype torch\.int64.*floating-point"):
        call(function, model, batch, mappings["base"], mappings["delta"])


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("function", STEP_FUNCTIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_delta(setup, kind, function, bad):
    model, batch, base, delta = setup[kind]
    name = list(delta)[-1]
    broken = delta[name].clone()
    broken.view(-1)[0] = bad
    with pytest.raises(ValueError, match=rf"delta\[{name!r}\] contains NaN or inf"):
        call(function, model, batch, base, {**delta, name: broken})


@pytest.mark.parametrize("function", STEP_FUNCTIONS)
def test_empty_delta(setup, function):
    model, batch, base, _ = setup["full"]
    with pytest.raises(ValueError, match=r"delta is empty"):
        call(function, model, batch, base, {})


@pytest.mark.parametrize("function", STEP_FUNCTIONS)
@pytest.mark.parametrize("which", ["base", "delta"])
def test_mappings_must_be_mappings(setup, function, which):
    model, batch, base, delta = setup["full"]
    mappings = {"base": base, "delta": delta}
    mappings[which] = list(mappings[which].values())
    with pytest.raises(ValueError, match=rf"{which} must be a mapping from parameter names to tensors"):
        call(function, model, batch, mappings["base"], mappings["delta"])


@pytest.mark.parametrize("function", STEP_FUNCTIONS)
def test_non_tensor_values(setup, function):
    model, batch, base, delta = setup["full"]
    name = first_name(delta)
    with pytest.raises(ValueError, match=rf"delta\[{name!r}\] is a list, expected a tensor"):
        call(function, model, batch, base, {**delta, name: delta[name].tolist()})


# --- options ---------------------------------------------------------------------------------------

BAD_OPTIONS = [
    *[("precision", value, r"precision must be one of 'auto', 'float64', 'float32', 'model'")
      for value in ("fp64", "bfloat16", None)],
    *[("normalize", value, r"normalize must be 'token' or 'sequence'") for value in ("tokens", "mean", None)],
    *[("estimator", value, r"estimator must be 'rb' \(Rao-Blackwell\) or 'naive'") for value in ("RB", "exact", None)],
    *[("microbatch_size", value, r"microbatch_size must be a positive integer or None") for value in (0, -2, 1.5, True)],
]


@pytest.mark.parametrize("function", ENGINE)
@pytest.mark.parametrize("option, value, message", BAD_OPTIONS, ids=[f"{o}={v!r}" for o, v, _ in BAD_OPTIONS])
def test_bad_option_is_rejected(setup, function, option, value, message):
    model, batch, base, delta = setup["full"]
    with pytest.raises(ValueError, match=message):
        call(function, model, batch, base, delta, **{option: value})


def test_unknown_precision_is_rejected_by_probe_experiments():
    from entropy_callbacks.experiment import ProbeExperiment

    with pytest.raises(ValueError, match=r"precision must be one of"):
        ProbeExperiment(precision="half")


@pytest.mark.parametrize("order", [0, 3, -1, "2"])
def test_bad_order(setup, order):
    model, batch, base, delta = setup["full"]
    with pytest.raises(ValueError, match=r"order must be 1 \(linear\) or 2"):
        predict_delta_h(model, batch, base, delta, order=order)


@pytest.mark.parametrize("scales, match", [
    ((), r"scales is empty; pass at least one step scale"),
    ((0.0,), r"scales must be finite and > 0, got \[0\.0\]"),
    ((1.0, -1.0), r"scales must be finite and > 0, got \[-1\.0\]"),
    ((float("nan"),), r"scales must be finite and > 0"),
    ((float("inf"),), r"scales must be finite and > 0"),
])
def test_bad_scales(setup, scales, match):
    model, batch, base, delta = setup["full"]
    with pytest.raises(ValueError, match=match):
        measure_delta_h(model, batch, base, delta, scales=scales)
