"""EntropyProbe, the Lightning front end: it never alters the run, probes real optimizer steps
(gradient accumulation, AMP skips), contains its own failures, survives a resume, combines DDP
ranks exactly, works with LoRA / SGD / schedulers / clipping, logs every TensorBoard tag and
JSONL line, rejects bad options with a useful message, and reports its calibration."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import AutoModelForCausalLM

import entropy_callbacks.step_probe as step_probe_module
from entropy_callbacks import EntropyProbe, SamplingConfig
from entropy_callbacks.step_probe import ProbeRecord
from lightning_modules import MemoryLogger, SeededAdvantageModule, TinyPolicyModule, random_token_loader
from tiny_models import add_lora, tiny_model

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*outside θ₀'s top-k/top-p support:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode:UserWarning"),
]

PROMPTS = [[2, 3, 4], [2, 5], [2, 6, 7], [3, 3]]
T3 = 3.182446305284263  # t_{0.975, 3}: the 95 % multiplier with 4 prompt groups (G − 1 = 3 dof)
SAMPLING = SamplingConfig(max_new_tokens=5)
HERE = Path(__file__).resolve().parent

# Fields of a record that are not functions of the training state (wall-clock time, run id).
UNTIMED = ("probe_seconds", "run_id")
ATTRIBUTION_FIELDS = ("attribution_", "rollout_", "top_rollouts", "cui_pearson")


# ---------------------------------------------------------------------------- helpers
def load_policy(directory: Path, arch: str = "llama", **config):
    """The tiny model of ``arch`` saved under ``directory`` (built on first use), loaded fresh,
    in train mode; ``config`` overrides config fields before the modules are built.

    ``from_pretrained`` returns a model in eval mode and Lightning (>= 2.2) keeps submodules'
    modes as it finds them, so without ``.train()`` dropout would never be active in training."""
    path = Path(directory) / f"{arch}-0"
    if not path.exists():
        tiny_model(arch, directory)
    return AutoModelForCausalLM.from_pretrained(path, **config).train()


def is_checkpointing(policy: torch.nn.Module) -> bool:
    """transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing."""
    if hasattr(type(policy), "is_activation_checkpointing"):
        return bool(policy.is_activation_checkpointing)
    return bool(policy.is_gradient_checkpointing)


def make_trainer(root: Path, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, default_root_dir=str(root), logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   log_every_n_steps=1)
    options.update(kwargs)
    return pl.Trainer(**options)


def probe(**kwargs) -> EntropyProbe:
    options = dict(prompts=PROMPTS, sampling=SAMPLING, every_n_steps=1, log_samples=0)
    options.update(kwargs)
    return EntropyProbe(**options)


def flat_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_strict_jsonl(path: Path) -> list[dict]:
    """Like read_jsonl, but NaN / Infinity (which Python's json writes and reads, and strict
    JSON readers reject) fail the parse."""
    return [json.loads(line, parse_constant=_reject_constant) for line in Path(path).read_text().splitlines()]


def assert_records_finite(records: list[ProbeRecord]) -> None:
    for r in records:
        assert not r.skipped
        numbers = {k: v for k, v in r.to_json().items() if isinstance(v, float)}
        bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
        assert not bad, f"step {r.step}: non-finite {bad}"
        for name in ("delta_measured_at", "delta_measured_se_at", "ess_at", "per_sequence_linear"):
            assert all(math.isfinite(v) for v in getattr(r, name)), (r.step, name)
        assert r.curvature is not None and math.isfinite(r.curvature)
        assert r.num_sequences == len(r.per_sequence_linear) > 0 and r.num_tokens >= r.num_sequences
        assert sum(r.per_sequence_linear) == pytest.approx(r.delta_linear, rel=1e-9, abs=1e-12)


class StepSpy(Callback):
    """Put after the probe: sees each real optimizer step (its lr, θ before and after) and the
    policy's state right after the probe's hooks ran."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.policy = policy
        self.lr: dict[int, float] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer_steps: list[int] = []
        self.batches = 0
        self.states: list[tuple[list[bool], bool]] = []  # (training flags, checkpointing) after the probe

    def _state(self):
        return [m.training for m in self.policy.modules()], is_checkpointing(self.policy)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        self.optimizer_steps.append(step)
        self.lr[step] = float(optimizer.param_groups[0]["lr"])
        self.before[step] = {n: p.detach().clone() for n, p in self.policy.named_parameters() if p.requires_grad}
        self.states.append(self._state())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        last = trainer.global_step - 1
        if last in self.before and last not in self.after:
            self.after[last] = {n: p.detach().clone() for n, p in self.policy.named_parameters() if p.requires_grad}
        self.states.append(self._state())

    def step_norm(self, step: int) -> float:
        return float(torch.sqrt(sum((self.after[step][n].double() - self.before[step][n].double()).square().sum()
                                    for n in self.before[step])))


# ---------------------------------------------------------------------------- never alters the run
def _bitwise_run(model_dir: Path, with_probe: bool, steps: int = 30):
    policy = load_policy(model_dir, "gpt2")  # GPT-2's default resid/embd/attn dropout is 0.1
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in policy.modules())
    policy.gradient_checkpointing_enable()
    assert is_checkpointing(policy)
    module = TinyPolicyModule(policy, lr=1e-2)  # draws torch.randn (global RNG) every step
    spy = StepSpy(policy)
    callbacks = [probe(every_n_steps=3, sampling=SamplingConfig(max_new_tokens=4, top_p=0.9))] if with_probe else []
    trainer = make_trainer(model_dir / ("with" if with_probe else "without"), max_steps=steps,
                           callbacks=callbacks + [spy])
    pl.seed_everything(1234, verbose=False)  # after load_policy: building the model seeds torch
    trainer.fit(module, random_token_loader(num=64, batch_size=8))
    assert trainer.global_step == steps
    return policy, module, spy, (callbacks[0] if callbacks else None)


def test_probe_never_alters_the_run(tmp_path):
    """With dropout on, gradient checkpointing on and the global RNG drawn in every training
    step, 30 steps with the probe (10 probes) leave bitwise the parameters (and optimizer
    state) of 30 steps without it; the train flags and checkpointing flag are as before."""
    plain_policy, plain_module, _, _ = _bitwise_run(tmp_path, with_probe=False)
    policy, module, spy, entropy_probe = _bitwise_run(tmp_path, with_probe=True)

    # the probes really ran, on every due step, and measured something
    assert [r.step for r in entropy_probe.records] == list(range(0, 30, 3))
    assert_records_finite(entropy_probe.records)
    # dropout was live in the training step (two train-mode forwards differ)
    tokens = torch.tensor([[2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert not torch.equal(policy(input_ids=tokens).logits, policy(input_ids=tokens).logits)

    # bitwise identical parameters and optimizer state
    plain, probed = flat_params(plain_policy), flat_params(policy)
    assert plain.keys() == probed.keys()
    different = [n for n in plain if not torch.equal(plain[n], probed[n])]
    assert not different, f"parameters differ after 30 steps: {different[:5]}"
    plain_state = plain_module.trainer.optimizers[0].state_dict()["state"]
    probed_state = module.trainer.optimizers[0].state_dict()["state"]
    for key in plain_state:
        for name, value in plain_state[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(probed_state[key][name])), (key, name)

    # right after each probe hook: every module in train mode, checkpointing still on
    assert spy.states
    for training, checkpointing in spy.states:
        assert all(training)
        assert checkpointing
    assert is_checkpointing(policy)
    assert all(m.gradient_checkpointing for m in policy.modules()
               if isinstance(getattr(m, "gradient_checkpointing", None), bool))


# ---------------------------------------------------------------------------- gradient accumulation
def test_gradient_accumulation_probes_each_real_optimizer_step_once(tmp_path):
    """accumulate_grad_batches=2: 10 batches are 5 optimizer steps; with every_n_steps=2 the
    probe records optimizer steps 0, 2, 4 exactly once each, and each record's Δθ is the
    real optimizer step of that index (not a micro-batch, not batch_idx)."""
    policy = load_policy(tmp_path)
    module = TinyPolicyModule(policy, lr=1e-2)
    entropy_probe = probe(every_n_steps=2)
    spy = StepSpy(policy)
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path, max_steps=5, accumulate_grad_batches=2, logger=logger,
                           callbacks=[entropy_probe, spy])
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, random_token_loader(num=80, batch_size=8))

    assert spy.batches == 10 and spy.optimizer_steps == [0, 1, 2, 3, 4]
    assert [r.step for r in entropy_probe.records] == [0, 2, 4]
    assert_records_finite(entropy_probe.records)
    for r in entropy_probe.records:
        assert r.step_norm == pytest.approx(spy.step_norm(r.step), rel=1e-6)
    # logged once per record, under the optimizer-step index
    assert sorted(logger.values("entropy/delta_measured")) == [0, 2, 4]
    assert sum("entropy/delta_measured" in m for _, m in logger.logged) == 3
    assert len(read_jsonl(tmp_path / "entropy_probe.jsonl")) == 3


# ---------------------------------------------------------------------------- skipped (AMP) step
class InfLossAt(TinyPolicyModule):
    """Makes the loss infinite at one optimizer step, so the AMP grad scaler skips that step."""

    def __init__(self, policy, skip_step: int, **kwargs) -> None:
        super().__init__(policy, **kwargs)
        self.skip_step = skip_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == self.skip_step else loss


def test_step_skipped_by_the_grad_scaler_is_recorded_as_skipped(tmp_path):
    """A real torch.amp.GradScaler (16-mixed on CPU) finds inf gradients at step 2 and skips
    the optimizer step: the closure and on_before_optimizer_step ran, θ did not move. The probe
    records that step as skipped (not measured), counts it, and probes the next steps normally."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    policy = load_policy(tmp_path)
    module = InfLossAt(policy, skip_step=2, lr=1e-2)
    entropy_probe = probe()
    spy = StepSpy(policy)
    logger = MemoryLogger()
    precision = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer = make_trainer(tmp_path, max_steps=4, plugins=[precision], logger=logger,
                           callbacks=[entropy_probe, spy])
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, random_token_loader(num=32, batch_size=8))

    assert spy.step_norm(2) == 0.0 and spy.step_norm(1) > 0  # the scaler really skipped step 2
    records = {r.step: r for r in entropy_probe.records}
    assert sorted(records) == [0, 1, 2, 3]
    skipped = records.pop(2)
    assert skipped.skipped
    assert math.isnan(skipped.delta_measured) and math.isnan(skipped.delta_linear)
    assert skipped.lr == pytest.approx(1e-2)
    assert_records_finite(list(records.values()))
    assert entropy_probe.skipped_steps == 1
    assert logger.values("entropy/skipped_steps") == {2: 1.0}
    assert 2 not in logger.values("entropy/delta_measured")
    assert sorted(logger.values("entropy/delta_measured")) == [0, 1, 3]
    assert entropy_probe.calibration.compute()["count"] == 3  # not in the calibration
    lines = read_jsonl(tmp_path / "entropy_probe.jsonl")
    assert [(line["step"], line["skipped"]) for line in lines] == [(0, False), (1, False), (2, True), (3, False)]
    assert "skipped 1" in entropy_probe.summary_table()


# ---------------------------------------------------------------------------- error containment
class _FailOnce:
    def __init__(self, original) -> None:
        self.original = original
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected probe failure")
        return self.original(*args, **kwargs)


@pytest.mark.parametrize("target", ["measurement_terms", "sample_batch", "summarize_measurement"],
                         ids=["in-finish", "in-begin", "in-summary"])
def test_probe_failure_is_contained_with_on_error_warn(tmp_path, monkeypatch, target):
    """A failure inside the probe (after the optimizer step while measuring or summarising, or
    before it while sampling E) with on_error="warn": one RuntimeWarning, entropy/probe_errors
    counts it, training finishes, the next due probe runs normally."""
    failing = _FailOnce(getattr(step_probe_module, target))
    monkeypatch.setattr(step_probe_module, target, failing)
    policy = load_policy(tmp_path)
    module = TinyPolicyModule(policy, lr=1e-2)
    entropy_probe = probe(every_n_steps=2, on_error="warn")
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path, max_steps=4, logger=logger, callbacks=[entropy_probe])
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, random_token_loader(num=32, batch_size=8))

    probe_warnings = [w for w in caught if "EntropyProbe: the probe at step" in str(w.message)]
    assert len(probe_warnings) == 1, [str(w.message) for w in probe_warnings]
    assert issubclass(probe_warnings[0].category, RuntimeWarning)
    assert "injected probe failure" in str(probe_warnings[0].message)
    assert trainer.global_step == 4  # training finished
    assert failing.calls == 2
    # the failed probe (step 0) left no record; the next due one (step 2) ran normally
    assert [r.step for r in entropy_probe.records] == [2]
    assert_records_finite(entropy_probe.records)
    assert entropy_probe.core.pending is None
    assert entropy_probe.probe_errors == 1 and entropy_probe.state_dict()["probe_errors"] == 1
    errors = logger.values("entropy/probe_errors")
    assert errors and set(errors.values()) == {1.0}
    assert errors[2] == 1.0  # carried on the next record
    assert policy.training and all(m.training for m in policy.modules())


def test_probe_failure_is_raised_with_on_error_raise(tmp_path, monkeypatch):
    monkeypatch.setattr(step_probe_module, "measurement_terms", _FailOnce(step_probe_module.measurement_terms))
    module = TinyPolicyModule(load_policy(tmp_path), lr=1e-2)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[probe(on_error="raise")])
    with pytest.raises(RuntimeError, match="injected probe failure"):
        trainer.fit(module, random_token_loader(num=16, batch_size=8))


# ---------------------------------------------------------------------------- resume
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resumed_run_logs_the_same_records_and_carries_calibration(tmp_path):
    """Run A: 4 steps probing every step, with a ModelCheckpoint every 2 steps. Run B: a new
    Trainer resumes from the step-2 checkpoint. B's probes at steps 2 and 3 equal A's (same E,
    same θ path), and B's calibration state holds all 4 probes, as A's does.

    Lightning restores neither the global RNG nor a plain DataLoader's position, so the module
    draws its advantages from a generator seeded by the step and every batch holds the same
    tokens (one batch per epoch): training after the resume is then exactly A's."""
    model_dir = tmp_path / "model"
    loader = lambda: random_token_loader(num=8, batch_size=8)  # noqa: E731 - one batch per epoch

    pl.seed_everything(0, verbose=False)
    probe_a = probe(scales=[1.0, 2.0])
    logger_a = MemoryLogger()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer_a = make_trainer(tmp_path / "a", max_steps=4, logger=logger_a, enable_checkpointing=True,
                             callbacks=[probe_a, checkpoint])
    trainer_a.fit(SeededAdvantageModule(load_policy(model_dir), lr=1e-2), loader())
    ckpt = tmp_path / "ckpt" / "step=2.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "EntropyProbe" in k]
    assert len(state["calibration"]["history"]) == 2  # probes 0 and 1 are in the checkpoint

    pl.seed_everything(0, verbose=False)
    probe_b = probe(scales=[1.0, 2.0])
    logger_b = MemoryLogger()
    checkpoint_b = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer_b = make_trainer(tmp_path / "b", max_steps=4, logger=logger_b, enable_checkpointing=True,
                             callbacks=[probe_b, checkpoint_b])
    trainer_b.fit(SeededAdvantageModule(load_policy(model_dir), lr=1e-2), loader(), ckpt_path=str(ckpt))

    lines_a = read_jsonl(tmp_path / "a" / "entropy_probe.jsonl")
    lines_b = read_jsonl(tmp_path / "b" / "entropy_probe.jsonl")
    assert [line["step"] for line in lines_a] == [0, 1, 2, 3]
    assert [line["step"] for line in lines_b] == [2, 3]
    for a, b in zip(lines_a[2:], lines_b):
        for key in a:
            if key not in UNTIMED and a[key] is None:  # e.g. no attribution: this module has no per-sample losses
                assert b[key] is None, (a["step"], key)
            elif key not in UNTIMED:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12, nan_ok=True), (a["step"], key)
    assert_records_finite(probe_b.records)

    # calibration carried through the checkpoint: same state, same logged calibration metrics
    state_a, state_b = probe_a.state_dict(), probe_b.state_dict()
    assert len(state_b["calibration"]["history"]) == 4
    for row_a, row_b in zip(state_a["calibration"]["history"], state_b["calibration"]["history"]):
        assert row_b == pytest.approx(row_a, rel=1e-6, abs=1e-12)
    assert (state_b["probe_errors"], state_b["skipped_steps"]) == (state_a["probe_errors"], state_a["skipped_steps"])
    assert probe_b.calibration.compute() == pytest.approx(probe_a.calibration.compute(), rel=1e-6)
    calibration_tags = {t for _, m in logger_a.logged for t in m if t.startswith("entropy/calibration/")}
    assert "entropy/calibration/pearson_linear" in calibration_tags
    for tag in calibration_tags:
        assert logger_b.values(tag)[3] == pytest.approx(logger_a.values(tag)[3], rel=1e-6), tag
    assert probe_b.summary_table() == probe_a.summary_table()


# ---------------------------------------------------------------------------- DDP
def test_ddp_shards_prompts_and_matches_a_single_process(tmp_path):
    """2 gloo ranks, each sampling a disjoint share of 5 prompts (3 + 2): the combined
    statistics and the logged values equal a single process over all prompts (≤ 1e-6
    relative), only rank 0 logs and writes the JSONL file."""
    import ddp_probe_script as script

    tiny_model("llama", tmp_path)
    model_dir = str(tmp_path / "llama-0")
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    done = subprocess.run([sys.executable, str(HERE / "ddp_probe_script.py"), model_dir, str(ddp_out), "2"],
                          capture_output=True, text=True, timeout=300, cwd=str(HERE.parent))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    single = script.run(model_dir, str(single_out), 1)
    ranks = [json.loads((ddp_out / f"rank{r}.json").read_text()) for r in (0, 1)]

    # disjoint shares that cover all prompts; each rank sampled only its own prompts
    n_prompts = len(script.PROMPTS)
    assert [r["world_size"] for r in ranks] == [2, 2]
    shares = [set(r["prompt_indices"]) for r in ranks]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(range(n_prompts))
    for r, share in zip(ranks, shares):
        assert len(r["groups"]) == script.MAX_STEPS
        assert all(set(groups) == share for groups in r["groups"])
    assert single["prompt_indices"] == list(range(n_prompts))

    # identical training on both sides (same batches, same RNG), so θ₀, Δθ agree at every probe
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"] == single["param_sum"]

    # records: combined over ranks, equal on both ranks and to the single process
    expected = single["records"]
    assert [r["step"] for r in expected] == list(range(script.MAX_STEPS))
    for rank in ranks:
        assert len(rank["records"]) == len(expected)
        for got, want in zip(rank["records"], expected):
            assert got["num_sequences"] == want["num_sequences"] == 2 * n_prompts
            assert got["num_tokens"] == want["num_tokens"]
            for key, value in want.items():
                # attribution is single-process only (off under DDP: ∇Ĥ would span the ranks' shares)
                if key in UNTIMED or key == "per_sequence_linear" or key.startswith(ATTRIBUTION_FIELDS):
                    continue
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), (rank["rank"], want["step"], key)
            assert got["per_sequence_linear"] == pytest.approx(want["per_sequence_linear"], rel=1e-6, abs=1e-9)

    # only rank 0 logs; its logged values equal the single process's
    assert not [m for _, m in ranks[1]["logged"] if m], "rank 1 logged entropy metrics"
    logged_ddp = {(step, tag): v for step, m in ranks[0]["logged"] for tag, v in m.items()}
    logged_single = {(step, tag): v for step, m in single["logged"] for tag, v in m.items()
                     if tag.startswith("entropy/")}
    assert logged_ddp.keys() == logged_single.keys()
    assert ("entropy/delta_measured@2" in {tag for _, tag in logged_ddp})
    for key, value in logged_single.items():
        if key[1] != "entropy/probe_seconds":
            assert logged_ddp[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key

    # the JSONL file was written once (by rank 0), one line per probe
    lines = read_jsonl(ddp_out / "entropy_probe.jsonl")
    assert [line["step"] for line in lines] == list(range(script.MAX_STEPS))
    for line, want in zip(lines, expected):
        assert line["delta_measured"] == pytest.approx(want["delta_measured"], rel=1e-6)


# ---------------------------------------------------------------------------- LoRA, optimizers, schedules
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lora_policy_with_optimizer_scheduler_and_clipping(tmp_path, optimizer):
    """peft LoRA policy, SGD (momentum) or AdamW, a StepLR scheduler stepping every optimizer
    step (×0.5 every 3), gradient clipping: records are finite, Δθ covers exactly the
    trainable (LoRA) tensors, and the lr logged is the optimizer's lr at that step."""
    policy = add_lora(load_policy(tmp_path))
    lr = 0.05 if optimizer == "sgd" else 1e-2
    module = TinyPolicyModule(policy, lr=lr, optimizer=optimizer, scheduler=True)
    entropy_probe = probe(every_n_steps=3)
    spy = StepSpy(policy)
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path, max_steps=7, gradient_clip_val=0.5, logger=logger,
                           callbacks=[entropy_probe, spy])
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, random_token_loader(num=56, batch_size=8))

    records = entropy_probe.records
    assert [r.step for r in records] == [0, 3, 6]
    assert_records_finite(records)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(spy.before[0]) == trainable
    logged_lr = logger.values("entropy/lr")
    for r in records:
        assert r.lr == spy.lr[r.step] == pytest.approx(lr * 0.5 ** (r.step // 3))
        assert logged_lr[r.step] == pytest.approx(spy.lr[r.step], rel=1e-12)
        assert r.delta_linear_per_lr == pytest.approx(r.delta_linear / r.lr)
        assert r.step_norm == pytest.approx(spy.step_norm(r.step), rel=1e-6)
        assert r.step_norm > 0


# ---------------------------------------------------------------------------- TensorBoard + JSONL
TB_SCALARS = {  # tag -> value in the JSONL record
    "entropy/before": lambda r: r["entropy_before"],
    "entropy/before_se": lambda r: r["entropy_before_se"],
    "entropy/delta_measured": lambda r: r["delta_measured"],
    "entropy/delta_measured_se": lambda r: r["delta_measured_se"],
    "entropy/delta_linear": lambda r: r["delta_linear"],
    "entropy/delta_linear_se": lambda r: r["delta_linear_se"],
    "entropy/delta_quadratic": lambda r: r["delta_quadratic"],
    "entropy/taylor_error": lambda r: r["taylor_error"],
    "entropy/ess": lambda r: r["ess"],
    "entropy/step_norm": lambda r: r["step_norm"],
    "entropy/lr": lambda r: r["lr"],
    "entropy/delta_linear_per_lr": lambda r: r["delta_linear_per_lr"],
    "entropy/probe_seconds": lambda r: r["probe_seconds"],
    "entropy/delta_measured@2": lambda r: r["delta_measured_at"][1],
    "entropy/outside_support": lambda r: r["outside_support"][0],
}


def test_tensorboard_event_file_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    policy = load_policy(tmp_path)
    module = TinyPolicyModule(policy, lr=1e-2)
    entropy_probe = probe(every_n_steps=2, scales=[1.0, 2.0], responses_per_prompt=2, log_samples=2,
                          sampling=SamplingConfig(max_new_tokens=5, top_p=0.9), figure_every=2)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    trainer = make_trainer(tmp_path, max_steps=3, logger=logger, callbacks=[entropy_probe])
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, random_token_loader(num=24, batch_size=8))
    logger.finalize("success")

    accumulator = event_accumulator.EventAccumulator(
        logger.log_dir, size_guidance={k: 0 for k in event_accumulator.DEFAULT_SIZE_GUIDANCE})
    accumulator.Reload()
    tags = accumulator.Tags()
    probe_steps = [0, 2]

    # JSONL: one parseable line per probe, in the logger's directory
    lines = read_strict_jsonl(Path(logger.log_dir) / "entropy_probe.jsonl")
    assert [line["step"] for line in lines] == probe_steps
    assert [line["step"] for line in lines] == [r.step for r in entropy_probe.records]

    # every scalar tag at every probed step, carrying the JSONL numbers
    missing = sorted(set(TB_SCALARS) - set(tags["scalars"]))
    assert not missing, f"missing scalar tags {missing}; have {sorted(tags['scalars'])}"
    for tag, field in TB_SCALARS.items():
        events = {e.step: e.value for e in accumulator.Scalars(tag)}
        assert sorted(events) == probe_steps, tag
        for line in lines:
            want = field(line)
            assert math.isfinite(want), (tag, line["step"])
            assert events[line["step"]] == pytest.approx(float(np.float32(want)), rel=1e-6, abs=1e-30), tag
    assert any(line["outside_support"][0] > 0 for line in lines)  # top_p < 1 really truncated

    # histogram of the per-sequence linear contributions, in % of |ΔH linear| (they sum to ±100)
    assert "entropy/per_sequence_share_pct" in tags["histograms"]
    histograms = {e.step: e.histogram_value for e in accumulator.Histograms("entropy/per_sequence_share_pct")}
    assert sorted(histograms) == probe_steps
    for line in lines:
        histogram = histograms[line["step"]]
        assert histogram.num == line["num_sequences"] == 2 * len(PROMPTS)
        assert histogram.sum == pytest.approx(math.copysign(100, line["delta_linear"]), rel=1e-5)

    # text samples
    text_tags = [t for t in tags["tensors"] if t.startswith("entropy/samples")]
    assert text_tags, tags["tensors"]
    assert text_tags[0] in accumulator.PluginTagToContent("text")
    texts = accumulator.Tensors(text_tags[0])
    assert sorted(e.step for e in texts) == probe_steps
    first = texts[0].tensor_proto.string_val[0].decode()
    header, rule, *rows = first.splitlines()
    assert header == "| prompt | response | a_i (share of g′) | SNIS weight | tokens |"
    prompts_shown = [row.split("|")[1].split(":")[0].strip() for row in rows]
    assert prompts_shown == ["0", str(len(PROMPTS) - 1)]  # log_samples=2: different prompts, spread over E
    record = entropy_probe.records[0]
    for row, g in zip(rows, prompts_shown):
        a = float(row.split("|")[3].split()[0])
        group = record.per_sequence_linear[int(g) * 2:int(g) * 2 + 2]  # R = 2
        assert a == pytest.approx(max(group, key=abs), rel=1e-2)

    # pictures: in TensorBoard every figure_every probes, and as PNGs beside the JSONL at the end
    assert {"entropy/calibration", "entropy/entropy_over_run"} <= set(tags["images"])
    assert [e.step for e in accumulator.Images("entropy/calibration")] == [2]
    for png in entropy_probe.figure_paths(trainer):
        assert png.parent == Path(logger.log_dir) and png.read_bytes()[:4] == b"\x89PNG"

    # custom-scalars layout: stored as a tensor summary, tag "custom_scalars__config__",
    # plugin "custom_scalars", holding a serialized Layout proto
    assert "custom_scalars__config__" in tags["tensors"]
    assert "custom_scalars__config__" in accumulator.PluginTagToContent("custom_scalars")
    (layout_event,) = accumulator.Tensors("custom_scalars__config__")  # written once
    layout = layout_pb2.Layout.FromString(layout_event.tensor_proto.string_val[0])
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    scalars = set(tags["scalars"])
    # Multiline tags are regexes; TensorBoard's custom-scalars plugin keeps the tags t with
    # re.compile(pattern).match(t). Each pattern must pick exactly the one tag it names.
    series = {}  # "ΔH predicted vs measured": one tag in three runs, so three colours
    for name in ("measured", "linear", "quadratic"):
        run = event_accumulator.EventAccumulator(str(Path(logger.log_dir) / "delta_H" / name))
        run.Reload()
        scalars |= set(run.Tags()["scalars"])
        series[name] = {e.step: e.value for e in run.Scalars("entropy/delta")}
    matched = {title: [[t for t in scalars if re.compile(p).match(t)] for p in chart.multiline.tag]
               for title, chart in charts.items() if chart.HasField("multiline")}
    assert matched == {
        "ΔH predicted vs measured": [["entropy/delta"]],
        "Relative Taylor error |measured − predicted| / |measured|": [["entropy/taylor_error_relative"]],
    }
    for name in ("measured", "linear", "quadratic"):
        assert series[name] == {line["step"]: pytest.approx(float(np.float32(line[f"delta_{name}"])), rel=1e-6)
                                for line in lines}
    # Margin series name tags exactly (value, lower, upper), and every one is logged.
    margins = {title: [(s.value, s.lower, s.upper) for s in chart.margin.series]
               for title, chart in charts.items() if chart.HasField("margin")}
    assert margins == {
        "ΔH measured, 95 % band (± t·SE, G − 1 dof)": [("entropy/delta_measured", "entropy/delta_measured_lower",
                                                        "entropy/delta_measured_upper")],
        "Entropy Ĥ, 95 % band (± t·SE, G − 1 dof)": [("entropy/before", "entropy/before_lower",
                                                      "entropy/before_upper")],
    }
    assert {t for series in margins.values() for triple in series for t in triple} <= scalars


# ---------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(every_n_steps=0), r"every_n_steps must be an integer >= 1, got 0"),
        (dict(every_n_steps=-3), r"every_n_steps must be an integer >= 1"),
        (dict(order=3), r"order must be 1 \(linear\) or 2"),
        (dict(order=0), r"order must be 1 \(linear\) or 2"),
        (dict(scales=[1.0, 0.0]), r"scales must be finite and > 0, got \[0.0\]"),
        (dict(scales=[-2.0]), r"scales must be finite and > 0, got \[-2.0\]"),
        (dict(prompts=[]), r"prompts is empty; pass at least one"),
        (dict(precision="bf16"), r"precision must be one of 'auto', 'float64', 'float32', 'model', got 'bf16'"),
    ],
    ids=["every_n_steps=0", "every_n_steps<0", "order=3", "order=0", "scale=0", "scale<0", "no-prompts",
         "precision"],
)
def test_bad_options_fail_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        probe(**options)


@pytest.mark.parametrize("content", ["", "\n   \n\n"], ids=["empty", "blank-lines"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_prompt_file_fails_at_construction(tmp_path, content, suffix):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"holds no prompts; add at least one non-empty line"):
        probe(prompts=str(path))


def test_missing_prompt_file_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist"):
        probe(prompts=str(tmp_path / "nope.txt"))


def test_unknown_policy_path_fails_at_setup(tmp_path):
    module = TinyPolicyModule(load_policy(tmp_path))
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[probe(policy="model.backbone")])
    with pytest.raises(ValueError, match=r"has no attribute 'model\.backbone'.*causal LMs found on it: \['policy'\]"):
        trainer.fit(module, random_token_loader(num=8, batch_size=8))


# ---------------------------------------------------------------------------- calibration
class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_calibration_table_printed_and_tags_logged(tmp_path):
    from lightning_utilities.core import rank_zero as rank_zero_module

    policy = load_policy(tmp_path)
    module = TinyPolicyModule(policy, lr=1e-2)
    entropy_probe = probe(every_n_steps=1)
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path, max_steps=3, logger=logger, callbacks=[entropy_probe])
    handler = _Collect()
    rank_zero_log = rank_zero_module.log  # where rank_zero_info writes
    rank_zero_log.addHandler(handler)
    try:
        pl.seed_everything(0, verbose=False)
        trainer.fit(module, random_token_loader(num=24, batch_size=8))
    finally:
        rank_zero_log.removeHandler(handler)

    (table,) = [m for m in handler.messages if "EntropyProbe calibration" in m]
    for row in ("probes                 3  (errors 0, skipped 0, non-finite 0)", "Pearson r  linear",
                "Pearson r  quadratic",
                "MAE        linear", "MAE        quadratic", "sign agreement", "in the 95 % t band"):
        assert row in table, row

    records = entropy_probe.records
    assert [r.step for r in records] == [0, 1, 2]
    linear = np.array([r.delta_linear for r in records])
    quadratic = np.array([r.delta_quadratic for r in records])
    measured = np.array([r.delta_measured for r in records])
    expected = {
        "mae_linear": np.abs(linear - measured).mean(),
        "mae_quadratic": np.abs(quadratic - measured).mean(),
        "pearson_linear": np.corrcoef(linear, measured)[0, 1],
        "pearson_quadratic": np.corrcoef(quadratic, measured)[0, 1],
        "sign_agreement": np.mean(np.sign(quadratic) == np.sign(measured)),
        "coverage_95": np.mean([abs(r.delta_quadratic - r.delta_measured) <= T3 * r.delta_measured_se
                                 for r in records]),
    }
    for name, value in expected.items():
        logged = logger.values(f"entropy/calibration/{name}")
        assert logged[2] == pytest.approx(value, rel=1e-6, abs=1e-12), name
    # MAE from the first probe on; Pearson needs three probes (two give ±1 whatever they are)
    assert sorted(logger.values("entropy/calibration/mae_linear")) == [0, 1, 2]
    assert sorted(logger.values("entropy/calibration/pearson_linear")) == [2]
    assert f"{expected['pearson_linear']:.4f}" in table
    assert f"{expected['mae_linear']:.3e}" in table


def test_ddp_failure_on_one_rank_skips_the_probe_on_all_ranks(tmp_path):
    """A probe that fails on rank 1 only (on_error="warn") must not leave rank 0 waiting in
    the gather: both ranks skip that probe, count one error, and the next probe runs."""
    tiny_model("llama", tmp_path)
    model_dir = str(tmp_path / "llama-0")
    out = tmp_path / "ddp-fail"
    done = subprocess.run([sys.executable, str(HERE / "ddp_probe_script.py"), model_dir, str(out), "2", "1"],
                          capture_output=True, text=True, timeout=240, cwd=str(HERE.parent))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert [r["step"] for r in rank["records"]] == [1]  # step 0 skipped everywhere, step 1 normal
        assert rank["probe_errors"] == 1
    assert "injected failure on rank 1" in done.stderr
    assert "failed on another rank" in done.stderr


class _SkipOptimizerStepAt(TinyPolicyModule):
    """Calls the closure but not optimizer.step() at one step: Lightning then never runs
    on_before_optimizer_step for it, yet global_step advances."""

    def __init__(self, policy, skip_step: int):
        super().__init__(policy, lr=1e-2)
        self.skip_step = skip_step

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.trainer.global_step == self.skip_step:
            optimizer_closure()
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


def test_step_skipped_without_optimizer_hook_is_recorded_as_skipped(tmp_path):
    policy = load_policy(tmp_path)
    module = _SkipOptimizerStepAt(policy, skip_step=2)
    entropy_probe = probe(every_n_steps=1)
    trainer = make_trainer(tmp_path, max_steps=4, logger=MemoryLogger(), callbacks=[entropy_probe])
    trainer.fit(module, random_token_loader(num=32, batch_size=8))
    steps = [(r.step, r.skipped) for r in entropy_probe.records]
    assert steps == [(0, False), (1, False), (2, True), (3, False)], steps
    assert entropy_probe.skipped_steps == 1
    lines = read_jsonl(entropy_probe.jsonl_path(trainer))
    assert [line["skipped"] for line in lines] == [False, False, True, False]
    # strict JSON: NaN is written as null
    assert all("NaN" not in json.dumps(line) for line in lines)


# ---------------------------------------------------------------------------- calibration edge cases
def test_non_finite_pairs_are_counted_not_poisoning_calibration_even_after_resume():
    from entropy_callbacks.metrics import Calibration

    calibration = Calibration()
    for linear, measured in [(1e-4, 1.1e-4), (float("nan"), 2e-4), (-3e-4, -2.9e-4), (2e-4, float("nan")),
                             (5e-4, 5.2e-4)]:
        calibration.update(linear, linear, measured, 1e-5, 3)
    values = calibration.compute()
    assert values["count"] == 3 and values["non_finite"] == 2
    assert all(math.isfinite(values[k]) for k in ("pearson_linear", "mae_linear", "sign_agreement", "coverage_95"))
    resumed = Calibration()
    resumed.load_state_dict(calibration.state_dict())
    assert resumed.compute() == values
    resumed.update(float("inf"), None, 1e-4, 1e-5, 3)
    assert resumed.compute()["non_finite"] == 3 and math.isfinite(resumed.compute()["pearson_linear"])


def test_pearson_of_two_probes_is_shown_as_a_dash(tmp_path):
    entropy_probe = probe(every_n_steps=1)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[entropy_probe])
    trainer.fit(TinyPolicyModule(load_policy(tmp_path)), random_token_loader(num=16, batch_size=8))
    table = entropy_probe.summary_table()
    assert "Pearson r  linear      —" in table and "Pearson r  quadratic   —" in table
    assert "1.0000" not in table


def test_summary_says_so_when_every_probe_failed(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no memory left")

    monkeypatch.setattr(step_probe_module, "measurement_terms", fail)
    entropy_probe = probe(every_n_steps=1)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[entropy_probe])
    with pytest.warns(RuntimeWarning, match="no memory left"):
        trainer.fit(TinyPolicyModule(load_policy(tmp_path)), random_token_loader(num=16, batch_size=8))
    table = entropy_probe.summary_table()
    assert "probes                 0  (errors 2," in table and "every probe failed" in table


def test_jsonl_keeps_one_branch_per_directory_with_run_ids(tmp_path):
    """logger=False writes to default_root_dir. A resumed run keeps the records before the step it
    resumes from and replaces the abandoned branch's later ones; a fresh run starts the file anew."""
    model_dir, root = tmp_path / "model", tmp_path / "run"
    loader = lambda: random_token_loader(num=8, batch_size=8)  # noqa: E731
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    make_trainer(root, max_steps=4, enable_checkpointing=True, callbacks=[probe(), checkpoint]).fit(
        SeededAdvantageModule(load_policy(model_dir), lr=1e-2), loader())
    first = read_strict_jsonl(root / "entropy_probe.jsonl")
    assert [line["step"] for line in first] == [0, 1, 2, 3] and len({line["run_id"] for line in first}) == 1

    resumed = probe()
    make_trainer(root, max_steps=4, callbacks=[resumed]).fit(
        SeededAdvantageModule(load_policy(model_dir), lr=1e-2), loader(), ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    lines = read_strict_jsonl(root / "entropy_probe.jsonl")
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert [line["run_id"] for line in lines] == [first[0]["run_id"]] * 2 + [resumed.run_id] * 2

    fresh = probe()
    make_trainer(root, max_steps=2, callbacks=[fresh]).fit(TinyPolicyModule(load_policy(model_dir)), loader())
    lines = read_strict_jsonl(root / "entropy_probe.jsonl")
    assert [(line["step"], line["run_id"]) for line in lines] == [(0, fresh.run_id), (1, fresh.run_id)]


def test_two_named_probes_run_side_by_side(tmp_path):
    """Two prompt sets, two probes: separate tags, files and checkpointed state."""
    math_probe = probe(name="math", prompts=PROMPTS[:2])
    code_probe = probe(name="code", prompts=PROMPTS[2:], scales=[1.0, 2.0, 2.0])
    assert code_probe.options.scales == (1.0, 2.0)  # duplicate scales, duplicate tags: dropped
    logger = MemoryLogger()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path, max_steps=2, logger=logger, enable_checkpointing=True,
                           callbacks=[math_probe, code_probe, checkpoint])
    trainer.fit(TinyPolicyModule(load_policy(tmp_path)), random_token_loader(num=16, batch_size=8))
    tags = {t for _, m in logger.logged for t in m}
    assert {"entropy/math/delta_measured", "entropy/code/delta_measured", "entropy/code/delta_measured@2"} <= tags
    assert not any(t.startswith("entropy/delta") for t in tags)
    assert [r.step for r in math_probe.records] == [r.step for r in code_probe.records] == [0, 1]
    assert math_probe.records[0].entropy_before != code_probe.records[0].entropy_before
    assert math_probe._last_batch is None and math_probe.core.pending is None  # E is not kept between probes
    saved = torch.load(tmp_path / "ckpt" / "step=2.ckpt", weights_only=False)["callbacks"]
    assert {math_probe.state_key, code_probe.state_key} <= set(saved) and math_probe.state_key != code_probe.state_key
    with pytest.raises(ValueError, match="name must be letters"):
        probe(name="has space")


class TwoStepsPerBatch(TinyPolicyModule):
    """Manual optimization: two optimizer steps in every training_step, with θ kept around each."""

    def __init__(self, policy, lr: float = 1e-2):
        super().__init__(policy, lr=lr)
        self.automatic_optimization = False
        self.thetas: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        (tokens,) = batch
        for half in (tokens[: len(tokens) // 2], tokens[len(tokens) // 2:]):
            logits = self.policy(input_ids=half, use_cache=False).logits[:, :-1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, half[:, 1:, None]).squeeze(-1)
            opt.zero_grad()
            self.manual_backward(-(torch.randn(len(half), 1) * logp).mean())
            self.thetas.append({n: p.detach().clone() for n, p in self.policy.named_parameters()})
            opt.step()
        self.thetas.append({n: p.detach().clone() for n, p in self.policy.named_parameters()})


def test_manual_optimization_probes_each_real_step(tmp_path):
    module = TwoStepsPerBatch(load_policy(tmp_path).eval())  # eval: no dropout between the snapshots
    entropy_probe = probe(every_n_steps=1, order=1)
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[entropy_probe])
    trainer.fit(module, random_token_loader(num=16, batch_size=8))
    records = list(entropy_probe.records)
    assert [(r.step, r.skipped) for r in records] == [(0, False), (1, False), (2, False), (3, False)]
    # θ before each step: thetas[0], [1] in batch 0 (then [2] after both), [3], [4] in batch 1
    befores = [module.thetas[i] for i in (0, 1, 3, 4)]
    afters = [module.thetas[i] for i in (1, 2, 4, 5)]
    for record, before, after in zip(records, befores, afters):
        norm = math.sqrt(sum(float((after[n].double() - before[n].double()).square().sum()) for n in before))
        assert record.step_norm == pytest.approx(norm, rel=1e-6)


def test_a_failing_report_does_not_end_training(tmp_path, monkeypatch):
    import entropy_callbacks.figures as figures

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(figures, "save", broken)
    monkeypatch.setattr(figures, "calibration_figure", broken)
    entropy_probe = probe(every_n_steps=1, figure_every=1)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    trainer = make_trainer(tmp_path, max_steps=2, logger=logger, callbacks=[entropy_probe])
    with pytest.warns(RuntimeWarning, match="disk full"):
        trainer.fit(TinyPolicyModule(load_policy(tmp_path)), random_token_loader(num=16, batch_size=8))
    assert trainer.global_step == 2 and [r.step for r in entropy_probe.records] == [0, 1]


def test_figures_keep_their_cadence_once_records_are_trimmed(tmp_path, monkeypatch):
    """`records` keeps only the last RECORDS_KEPT probes; figures still come every figure_every probes."""
    import entropy_callbacks.callback as callback_module
    from tensorboard.backend.event_processing import event_accumulator

    monkeypatch.setattr(callback_module, "RECORDS_KEPT", 2)
    entropy_probe = probe(every_n_steps=1, figure_every=2)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    trainer = make_trainer(tmp_path, max_steps=6, logger=logger, callbacks=[entropy_probe])
    trainer.fit(TinyPolicyModule(load_policy(tmp_path)), random_token_loader(num=48, batch_size=8))
    logger.finalize("success")
    assert len(entropy_probe.records) == 2
    accumulator = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Images("entropy/calibration")] == [1, 3, 5]
