"""EntropyProbe reports the real step's ΔH under the precisions people train with.

Each run trains a tiny Llama for two steps at a realistic learning rate under a Lightning
precision setting, probing every step; a spy after the probe keeps θ₀, θ₁ and E. Every record
must match the same E and step scored on a float64 copy of the same weights.
"""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from entropy_callbacks import EntropyProbe, SamplingConfig, measure_delta_h, predict_delta_h
from lightning_modules import TinyPolicyModule, random_token_loader
from test_precision import build
from tiny_models import float64_rmsnorm

PROMPTS = [[2, 5, 7], [3, 4], [9, 10, 11, 6], [8], [4, 4, 2], [7, 3]]


class Capture(Callback):
    """After the probe: θ₀ and θ₁ of each optimizer step, and the E the probe drew for it."""

    def __init__(self, probe: EntropyProbe, policy: torch.nn.Module) -> None:
        self.probe, self.policy = probe, policy
        self.before, self.after, self.batches = {}, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        self.before[step] = {n: p.detach().clone() for n, p in self.policy.named_parameters()}
        self.batches[step] = self.probe.core.pending.batch  # drawn by the probe's hook, just before

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = {n: p.detach().clone() for n, p in self.policy.named_parameters()}


def float64_truth(policy, before, after, batch):
    """(Ĥ, ΔH, g′) of the step before → after on a float64 copy (Δθ exact in float64)."""
    copy64 = copy.deepcopy(policy).double()
    with torch.no_grad():
        for name, p in copy64.named_parameters():
            p.copy_(before[name].double())
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    base = {n: before[n].double() for n in trainable}
    delta = {n: after[n].double() - before[n].double() for n in trainable}
    with float64_rmsnorm(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = measure_delta_h(copy64, batch, base, delta, precision="model")
        linear = predict_delta_h(copy64, batch, base, delta, order=1, precision="model").linear
    return measured.entropy_before, measured.delta[0], linear


def fp16_mixed_on_cpu():
    # Lightning turns "16-mixed" on CPU into bf16; this is the plugin it builds on a GPU.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


CASES = {
    "bf16-mixed": dict(kind="llama-fp32", lr=1e-5, trainer=dict(precision="bf16-mixed")),
    "16-mixed": dict(kind="llama-fp32", lr=1e-5, trainer=dict(plugins=[fp16_mixed_on_cpu()])),
    "bf16-true": dict(kind="llama-fp32", lr=1e-4, trainer=dict(precision="bf16-true")),
    "bf16-base+lora": dict(kind="llama-bf16+lora-fp32", lr=1e-5, trainer=dict(precision="bf16-mixed")),
    "bf16-base+bf16-lora": dict(kind="qwen2-bf16+lora-bf16", lr=1e-4, trainer=dict()),
}


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("case", list(CASES))
def test_probe_records_match_float64_under_training_precisions(tmp_path, case, device):
    setting = CASES[case]
    trainer_options = dict(setting["trainer"])
    if device == "cuda":
        # Lightning's own 16-mixed (CUDA GradScaler), and TF32 on as Lightning advises on Ampere+.
        if case == "16-mixed":
            trainer_options = dict(precision="16-mixed")
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
    policy = build(setting["kind"], tmp_path)
    probe = EntropyProbe(prompts=PROMPTS, sampling=SamplingConfig(max_new_tokens=6), every_n_steps=1,
                         responses_per_prompt=3, order=1, log_samples=0, on_error="raise", jsonl=False)
    capture = Capture(probe, policy)
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[probe, capture], default_root_dir=str(tmp_path), **trainer_options)
    pl.seed_everything(0, verbose=False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*below the estimated rounding error.*")  # none expected
            trainer.fit(TinyPolicyModule(policy, lr=setting["lr"]), random_token_loader(num=16, batch_size=8))
    finally:
        if device == "cuda":
            assert torch.get_float32_matmul_precision() == "high"  # the probe restored it
            torch.set_float32_matmul_precision(previous)
    records = [r for r in probe.records if not r.skipped]
    assert len(records) == 2, [r.skipped for r in probe.records]
    for record in records:
        step = record.step
        entropy, measured, linear = float64_truth(policy, capture.before[step], capture.after[step],
                                                  capture.batches[step])
        assert record.delta_measured == pytest.approx(measured, rel=1e-2), step
        assert record.delta_linear == pytest.approx(linear, rel=1e-2), step
        assert record.entropy_before == pytest.approx(entropy, rel=1e-6), step
        assert record.delta_measured_floor < 1e-2 * abs(measured), step
