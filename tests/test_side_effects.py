"""No side effects: after every public function the model's parameters, ``.grad``s,
train/eval flags and gradient-checkpointing setup, and the process-global state (RNGs, grad mode,
patched functions, SDPA backend flags) are exactly as before, for a full model and a LoRA model
with the default attention implementation."""

from __future__ import annotations

import copy
import math
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from entropy_callbacks import (SamplingConfig, entropy_estimate, measure_delta_h, predict_delta_h,
                               sample_batch, Estimate, Measurement, Prediction)
from tiny_models import EOS, PAD, add_lora, random_step, tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*is deprecated.*:UserWarning")]

PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
CONFIG = SamplingConfig(max_new_tokens=5, temperature=0.8, top_k=6)
KINDS = ("gpt2-full", "llama-lora")

FUNCTIONS = {
    "sample_batch": lambda m, b, base, delta: sample_batch(m, PROMPTS, CONFIG, eos_token_id=EOS,
                                                           pad_token_id=PAD, responses_per_prompt=2, seed=4),
    "entropy_estimate": lambda m, b, base, delta: entropy_estimate(m, b),
    "measure_delta_h": lambda m, b, base, delta: measure_delta_h(m, b, base, delta, scales=(0.5, 1.0)),
    "predict_delta_h-order1": lambda m, b, base, delta: predict_delta_h(m, b, base, delta, order=1),
    "predict_delta_h-order2": lambda m, b, base, delta: predict_delta_h(m, b, base, delta, order=2),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """kind -> (model in eval mode, its batch E, θ₀, Δθ); tests work on deep copies."""
    directory = tmp_path_factory.mktemp("side-effect-models")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in KINDS:
            arch, variant = kind.split("-")
            model = tiny_model(arch, directory, init_std=0.2)
            if variant == "lora":
                model = add_lora(model)
            model.eval()
            batch = sample_batch(model, PROMPTS, CONFIG, eos_token_id=EOS, pad_token_id=PAD,
                                 responses_per_prompt=2, seed=1)
            base, delta = random_step(model, scale=1e-3, seed=2)
            out[kind] = (model, batch, base, delta)
    return out


def inner_config(model):
    return getattr(model, "get_base_model", lambda: model)().config


def set_up_user_state(model, checkpointing: bool) -> None:
    """What a training loop leaves behind: train mode with one submodule in eval, some .grads set
    (others None), maybe gradient checkpointing on."""
    model.train()
    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    next(layer.children()).eval()  # one submodule deliberately in eval mode
    gen = torch.Generator().manual_seed(0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for i, p in enumerate(trainable):
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) if i % 2 == 0 else None
    if checkpointing:
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8).clone()


def hook_names(hooks) -> list[str]:
    return [getattr(h, "__qualname__", repr(h)) for h in hooks.values()]


def global_state() -> dict:
    return {
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "grad_enabled": torch.is_grad_enabled(),
        "layer_norm": F.layer_norm,
        "sdpa": F.scaled_dot_product_attention,
        "sdp_flags": (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                      torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()),
        "default_dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul_precision": (torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision,
                             torch.backends.cuda.matmul.fp32_precision),
    }


def headline(result) -> float:
    """The number each function is for (the sampler: the sampled tokens' total log-probability)."""
    if isinstance(result, Estimate):
        return result.value
    if isinstance(result, Measurement):
        return result.delta[-1]
    if isinstance(result, Prediction):
        return result.quadratic if result.quadratic is not None else result.linear
    return float(result.sampler_log_probs.sum())


def model_state(model) -> dict:
    named = dict(model.named_parameters())
    return {
        "param_ids": {n: id(p) for n, p in named.items()},
        "param_bits": {n: bits(p) for n, p in named.items()},
        "param_dtypes": {n: p.dtype for n, p in named.items()},
        "requires_grad": {n: p.requires_grad for n, p in named.items()},
        "grads": {n: None if p.grad is None else bits(p.grad) for n, p in named.items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "checkpointing": {n: m.gradient_checkpointing for n, m in model.named_modules()
                          if hasattr(m, "gradient_checkpointing")},
        "is_checkpointing": model.is_gradient_checkpointing,
        "attn_implementation": inner_config(model)._attn_implementation,
        # The user's hooks (e.g. HF's input-require-grads hook) are all still there afterwards.
        "forward_hooks": {n: hook_names(m._forward_hooks) for n, m in model.named_modules()},
        "forward_pre_hooks": {n: hook_names(m._forward_pre_hooks) for n, m in model.named_modules()},
    }


def assert_same_model_state(before: dict, after: dict) -> None:
    assert after["param_ids"] == before["param_ids"], "parameter objects were replaced"
    assert after["param_dtypes"] == before["param_dtypes"]
    changed = [n for n in before["param_bits"] if not torch.equal(before["param_bits"][n], after["param_bits"][n])]
    assert not changed, f"parameters changed: {changed[:5]}"
    assert after["requires_grad"] == before["requires_grad"]
    for name, grad in before["grads"].items():
        if grad is None:
            assert after["grads"][name] is None, f"{name}.grad was None and is now set"
        else:
            assert after["grads"][name] is not None, f"{name}.grad was cleared"
            assert torch.equal(after["grads"][name], grad), f"{name}.grad changed"
    flipped = [n for n, flag in before["training"].items() if after["training"][n] != flag]
    assert not flipped, f"train/eval flags changed on: {flipped[:5]}"
    assert after["checkpointing"] == before["checkpointing"]
    assert after["is_checkpointing"] == before["is_checkpointing"]
    assert after["attn_implementation"] == before["attn_implementation"]
    assert after["forward_hooks"] == before["forward_hooks"]
    assert after["forward_pre_hooks"] == before["forward_pre_hooks"]


def assert_same_global_state(before: dict, after: dict) -> None:
    assert torch.equal(after["torch_rng"], before["torch_rng"]), "the global torch RNG moved"
    assert after["python_rng"] == before["python_rng"]
    assert np.array_equal(after["numpy_rng"], before["numpy_rng"])
    for key in ("grad_enabled", "sdp_flags", "default_dtype", "deterministic"):
        assert after[key] == before[key], key
    assert after["layer_norm"] is before["layer_norm"], "F.layer_norm is still patched"
    assert after["sdpa"] is before["sdpa"]


def assert_checkpointing_still_works(model) -> None:
    """A training step after the call still recomputes the checkpointed layers in backward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert model.is_gradient_checkpointing
    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    target = list(layer.children())[-1]  # a submodule in train mode
    calls = []
    handle = target.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        ids = torch.tensor([[3, 4, 5, 6, 7]])
        loss = model(input_ids=ids, labels=ids).loss
        assert len(calls) == 1
        loss.backward()
    finally:
        handle.remove()
    assert len(calls) == 2, "the layer was not recomputed in backward: checkpointing is off"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_no_side_effects(prepared, kind, function, checkpointing):
    original, batch, base, delta = prepared[kind]
    model = copy.deepcopy(original)
    assert inner_config(model)._attn_implementation == "sdpa"  # the default, left alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_up_user_state(model, checkpointing)
        random.seed(17)
        np.random.seed(17)
        torch.manual_seed(17)
        model_before, global_before = model_state(model), global_state()

        result = FUNCTIONS[function](model, batch, base, delta)

        model_after, global_after = model_state(model), global_state()
    assert math.isfinite(headline(result)) and headline(result) != 0
    assert_same_model_state(model_before, model_after)
    assert_same_global_state(global_before, global_after)
    if checkpointing:
        assert_checkpointing_still_works(model)


@pytest.mark.parametrize("kind", KINDS)
def test_results_do_not_depend_on_train_mode(prepared, kind):
    """Probe passes run in eval mode (no dropout; the LoRA model has lora_dropout=0.1), so the
    model's own mode changes nothing."""
    original, batch, base, delta = prepared[kind]
    model = copy.deepcopy(original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = []
        for train in (False, True):
            model.train(train)
            sampled = sample_batch(model, PROMPTS, CONFIG, eos_token_id=EOS, pad_token_id=PAD, seed=9)
            results.append((sampled.input_ids, entropy_estimate(model, batch).value,
                            measure_delta_h(model, batch, base, delta).delta[0],
                            predict_delta_h(model, batch, base, delta, order=1).linear))
    (ids_eval, *values_eval), (ids_train, *values_train) = results
    assert torch.equal(ids_eval, ids_train)
    assert values_eval == values_train


def test_functions_called_twice_agree(prepared):
    """A call leaves nothing behind that changes the next one (same model, same inputs)."""
    model, batch, base, delta = prepared["gpt2-full"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = predict_delta_h(model, batch, base, delta, order=2)
        second = predict_delta_h(model, batch, base, delta, order=2)
    assert (first.linear, first.curvature) == (second.linear, second.curvature)
