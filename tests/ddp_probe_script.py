"""EntropyProbe under DDP, run as a standalone script (not collected by pytest).

Lightning's "ddp" strategy on CPU re-launches ``sys.argv`` for the other ranks, so this must be
a script of its own. ``test_callback.py::test_ddp_*`` runs it in a subprocess with 2 ranks and
compares what it writes against ``run(..., devices=1)`` called in-process.

    python tests/ddp_probe_script.py MODEL_DIR OUT_DIR DEVICES

Every rank writes OUT_DIR/rank{R}.json with its records, the prompt indices of its share, the
groups of the E rows it sampled, and the entropy/* metrics it passed to its logger. Rank 0's
JSONL file is OUT_DIR/entropy_probe.jsonl.

Both ranks train on identical batches (``use_distributed_sampler=False``) with the same
global-RNG stream (same seed), so the DDP-averaged gradient is bitwise the single-process one
and θ follows the same path: every probe value must match a single process over all prompts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]  # the helpers, and the checkout this script lives in

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from entropy_callbacks import EntropyProbe, SamplingConfig  # noqa: E402
from lightning_modules import MemoryLogger, TinyPolicyModule, random_token_loader  # noqa: E402

# Five prompts of different lengths over two ranks: uneven shares (3 + 2), and each rank
# left-pads to a different width than a single process does.
PROMPTS = [[2, 3, 4, 5], [2, 5], [6], [3, 3, 8], [4, 9, 5, 5, 6]]
SAMPLING = SamplingConfig(max_new_tokens=5, top_p=0.9)
MAX_STEPS = 2
THREADS = 1


class ShareSpy(Callback):
    """Records the groups of the E batch this rank sampled at every probe."""

    def __init__(self, probe: EntropyProbe) -> None:
        self.probe = probe
        self.groups: list[list[int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pending = self.probe.core.pending
        if pending is not None:
            self.groups.append(pending.batch.group.tolist())


def run(model_dir: str, out_dir: str, devices: int, fail_on_rank: int | None = None) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # Lightning gives each CPU DDP rank its share of the cores
    if fail_on_rank is not None:
        _fail_first_measurement_on(fail_on_rank)
    try:
        return _run(model_dir, out_dir, devices)
    finally:
        torch.set_num_threads(threads)


def _fail_first_measurement_on(rank: int) -> None:
    """Make the first probe's measurement fail on one rank only (the others must not hang)."""
    from entropy_callbacks import step_probe

    original, calls = step_probe.measurement_terms, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1 and int(os.environ.get("LOCAL_RANK", "0")) == rank:
            raise RuntimeError(f"injected failure on rank {rank}")
        return original(*args, **kwargs)

    step_probe.measurement_terms = failing


def _run(model_dir: str, out_dir: str, devices: int) -> dict:
    pl.seed_everything(0, verbose=False)
    policy = AutoModelForCausalLM.from_pretrained(model_dir).train()
    module = TinyPolicyModule(policy, lr=1e-2)
    probe = EntropyProbe(prompts=PROMPTS, sampling=SAMPLING, every_n_steps=1, responses_per_prompt=2,
                         scales=[1.0, 2.0], log_samples=0)
    spy = ShareSpy(probe)
    logger = MemoryLogger()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        use_distributed_sampler=False, max_steps=MAX_STEPS, logger=logger, callbacks=[probe, spy],
        default_root_dir=out_dir, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, random_token_loader(num=16, batch_size=8))
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "prompt_indices": probe.core.prompt_indices,
        "groups": spy.groups,
        "records": [r.to_json() for r in probe.records],
        "logged": [(step, {k: v for k, v in m.items() if k.startswith("entropy/")}) for step, m in logger.logged],
        "param_sum": float(sum(p.detach().double().sum() for p in policy.parameters())),
        "probe_errors": probe.probe_errors,
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / f"rank{trainer.global_rank}.json", "w") as f:
        json.dump(result, f, allow_nan=True)
    return result


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
