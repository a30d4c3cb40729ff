"""What the probe costs on a real model: SmolLM2-135M-Instruct with LoRA, as configs/smollm2_grpo.yaml.

Run:  .venv/bin/python benchmarks/real_model.py [--repeats 3] [--orders 1 2] [--config configs/smollm2_grpo.yaml]
(after ``bash scripts/setup.sh --real``; run it alone: a second torch process on 2 cores
distorts both).

The module, its LoRA adapter, E (prompts, responses per prompt, sampling) and the probe's
options are read from the config, so the numbers are those of the README's real-model run.
Each repeat takes, interleaved, one plain training step (rollouts of prompts_per_step x
group_size, GRPO loss, backward, AdamW step) and, for every order, one probed step whose probe
is timed apart from it: ``begin`` (E sampled, θ₀ kept) after the backward pass, ``finish``
(prediction and measurement) after the optimizer step, as the callback runs them. Printed:
medians over repeats of the step and of the probe, the probe as a multiple of a step, and the
overhead of a probe every 10 steps (probe / (10 x step)).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from entropy_callbacks.sampling import SamplingConfig  # noqa: E402
from entropy_callbacks.step_probe import ProbeOptions, StepProbe  # noqa: E402
from entropy_callbacks.toy import GRPOModule, LoraOptions  # noqa: E402
from harness import prepare  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "smollm2_grpo.yaml"))
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (after one warm-up step)")
    p.add_argument("--orders", type=int, nargs="+", default=[1, 2], help="probe orders to time")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    return p.parse_args(argv)


def load(config_path: str) -> tuple[GRPOModule, dict]:
    config = yaml.safe_load(Path(config_path).read_text())
    model_args = dict(config["model"]["init_args"])
    model_args["lora"] = LoraOptions(**model_args["lora"])
    model_args["sampling"] = SamplingConfig(**model_args["sampling"])
    probe = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EntropyProbe"))
    torch.manual_seed(config.get("seed_everything", 0))
    return GRPOModule(**model_args).train(), probe["init_args"]


def main(argv=None) -> int:
    args = parse_args(argv)
    code = prepare(args.threads, "cpu")
    if code is not None:
        return code
    module, probe_args = load(args.config)
    optimizer = module.configure_optimizers()
    prompts = [module._encode(text) for text in probe_args["prompts"]]  # chat-formatted as the config says

    def core(order: int) -> StepProbe:
        options = ProbeOptions(sampling=SamplingConfig(**probe_args["sampling"]), every_n_steps=1,
                               responses_per_prompt=probe_args["responses_per_prompt"], order=order,
                               precision=probe_args.get("precision", "auto"))
        return StepProbe(options, prompts, eos_token_id=module.tokenizer.eos_token_id,
                         pad_token_id=module.tokenizer.pad_token_id)

    seed = iter(range(1_000, 10_000))

    def training_step(probe: StepProbe | None = None) -> tuple[float, float]:
        """(seconds of the step, seconds of its probe)."""
        started = time.perf_counter()
        loss, _ = module.policy_loss(module.update_batch(next(seed)))
        loss.backward()
        step_seconds = time.perf_counter() - started
        probe_seconds = 0.0
        if probe is not None:
            started = time.perf_counter()
            probe.begin(module.policy, step=0)
            probe_seconds += time.perf_counter() - started
        started = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds += time.perf_counter() - started
        if probe is not None:
            started = time.perf_counter()
            probe.finish(module.policy)
            probe_seconds += time.perf_counter() - started
        return step_seconds, probe_seconds

    training_step()  # warm-up; AdamW state exists from here on
    steps: list[float] = []
    probes: dict[int, list[float]] = {order: [] for order in args.orders}
    for repeat in range(args.repeats):
        steps.append(training_step()[0])
        for order in args.orders:
            probes[order].append(training_step(core(order))[1])
        print(f"repeat {repeat + 1}/{args.repeats}: step {steps[-1]:.1f} s, "
              + ", ".join(f"probe order {o} {probes[o][-1]:.1f} s" for o in args.orders), flush=True)

    step = statistics.median(steps)
    e_rows = len(prompts) * probe_args["responses_per_prompt"]
    print(f"\nSmolLM2-135M-Instruct + LoRA, {torch.get_num_threads()} threads; U = "
          f"{module.hparams.prompts_per_step} x {module.hparams.group_size} rollouts, E = {len(prompts)} x "
          f"{probe_args['responses_per_prompt']} = {e_rows} sequences, max_new_tokens "
          f"{probe_args['sampling']['max_new_tokens']}, precision {probe_args.get('precision', 'auto')}")
    print(f"{'':16}{'seconds':>10}{'x step':>10}{'overhead @ every 10':>22}")
    print(f"{'training step':16}{step:>10.1f}{1.0:>10.2f}{'':>22}")
    for order in args.orders:
        probe = statistics.median(probes[order])
        print(f"{f'probe order {order}':16}{probe:>10.1f}{probe / step:>10.2f}{probe / (10 * step):>21.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
