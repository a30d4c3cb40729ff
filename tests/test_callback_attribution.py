"""EntropyProbe's attribution of each probed step to the rollouts of its update batch (docs/method.md §6),
through the toy GRPOModule's ``entropy_probe_losses``: the split closes, the records carry it,
and it never alters or stops training."""

from __future__ import annotations

import json
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import entropy_callbacks.callback as callback_module
from entropy_callbacks import EntropyProbe, SamplingConfig
from entropy_callbacks.toy import GRPOModule

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")]

PROMPTS = ["2 3 =", "0 8 =", "1 1 =", "0 7 =", "4 8 =", "1 3 =", "0 1 =", "9 1 ="]


class ScheduledGRPO(GRPOModule):
    """The toy module with a per-step scheduler: lr × 0.25 after every step."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.25 ** k)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TwoStepsPerBatchGRPO(GRPOModule):
    """Manual optimization with two optimizer steps per batch (each on the whole batch here)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, prompt_indices, batch_idx: int):
        optimizer = self.optimizers()
        for _ in range(2):
            loss = super().training_step(prompt_indices, batch_idx)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()


def fit(tmp_path, attribution: bool = True, steps: int = 3, accumulate: int = 1, quiet: bool = True,
        module_class=GRPOModule):
    pl.seed_everything(0)
    module = module_class(sampling=SamplingConfig(max_new_tokens=3), group_size=4, prompts_per_step=4)
    probe = EntropyProbe(prompts=PROMPTS, tokenizer="tokenizer", sampling=SamplingConfig(max_new_tokens=3),
                         every_n_steps=1, responses_per_prompt=4, order=1, attribution=attribution)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name=""),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accumulate_grad_batches=accumulate, log_every_n_steps=1, callbacks=[probe])
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        trainer.fit(module)
    def reject(constant: str):
        raise AssertionError(f"{constant} in the JSONL file: not strict JSON")

    lines = (tmp_path / "version_0" / "entropy_probe.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=reject) for line in lines]
    return module, records


@pytest.mark.parametrize("accumulate", [1, 2])
def test_each_step_is_split_among_its_rollouts(tmp_path, accumulate):
    _, records = fit(tmp_path, accumulate=accumulate)
    assert len(records) == 3
    for record in records:
        a = record["rollout_a"]
        assert len(a) == len(record["rollout_a_jacobian"]) == 4 * 4 * accumulate  # every micro-batch's rollouts
        total = sum(a) + record["attribution_momentum"] + record["attribution_weight_decay"]
        assert abs(record["attribution_residual"]) <= 1e-4 * abs(record["attribution_linear"])
        assert total + record["attribution_residual"] == pytest.approx(record["attribution_linear"], rel=1e-9)
        # the same linear prediction as the probe's (which adds control variates, hence not exact)
        assert record["attribution_linear"] == pytest.approx(record["delta_linear"], rel=0.3)
        assert len(record["top_rollouts"]) == 5 and all(isinstance(r["text"], str) for r in record["top_rollouts"])
        assert all(r["a_se"] is None and r["length"] >= 1 for r in record["top_rollouts"])  # no SEs in the callback
        assert math.isfinite(record["cui_pearson"])
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(tmp_path / "version_0"), size_guidance={"histograms": 0,
                                                                                       "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"entropy/attribution/momentum_share", "entropy/attribution/residual_share",
            "entropy/attribution/cui_pearson"} <= set(tags["scalars"])
    assert "entropy/attribution/rollout_share_of_abs_pct" in tags["histograms"]
    assert any("attribution/top_rollouts" in tag for tag in tags["tensors"])
    # Adam's m_0 = 0: no momentum at the first step (to float32 rounding of m_1), some after
    assert abs(records[0]["attribution_momentum"]) <= 1e-6 * abs(records[0]["attribution_linear"])
    assert abs(records[1]["attribution_momentum"]) > 1e-3 * abs(records[1]["attribution_linear"])


def test_a_per_step_scheduler_does_not_change_the_split(tmp_path):
    """The split uses the lr, gradients and moments the step used: taken as the step returns,
    before Lightning steps the scheduler (with the next step's lr the split was 4× too small)."""
    _, records = fit(tmp_path, module_class=ScheduledGRPO)
    assert [r["lr"] for r in records] == pytest.approx([3e-4 * 0.25 ** k for k in range(3)])
    for record in records:
        assert abs(record["attribution_residual"]) <= 1e-4 * abs(record["attribution_linear"])


def test_a_batch_with_several_steps_is_not_attributed(tmp_path):
    """Two optimizer steps per batch (manual optimization): which samples made which step is the
    module's, so attribution is skipped with a warning; the probe's own numbers stand."""
    with pytest.warns(RuntimeWarning, match="several optimizer steps"):
        _, records = fit(tmp_path, steps=4, quiet=False, module_class=TwoStepsPerBatchGRPO)
    assert len(records) == 4
    assert all(math.isfinite(r["delta_linear"]) and r["attribution_linear"] is None and not r["rollout_a"] for r in records)


def test_attribution_changes_nothing_in_training(tmp_path):
    with_split, records = fit(tmp_path / "on")
    without, plain = fit(tmp_path / "off", attribution=False)
    for (name, a), (_, b) in zip(with_split.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), name
    assert not plain[0]["rollout_a"] and records[0]["rollout_a"]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("attribution", "rollout", "top_", "cui"))  # noqa: E731
                       and k not in ("probe_seconds", "run_id")}
    assert [strip(r) for r in records] == [strip(r) for r in plain]


def test_a_failing_attribution_leaves_the_probe_and_training_alone(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("attribution broke")

    monkeypatch.setattr(callback_module, "attribute_delta_h", broken)
    with pytest.warns(RuntimeWarning, match="attribution at step 0 failed"):
        module, records = fit(tmp_path, steps=2, quiet=False)
    assert len(records) == 2 and all(math.isfinite(r["delta_measured"]) and not r["rollout_a"] for r in records)
