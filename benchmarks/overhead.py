"""What EntropyProbe costs a training run: wall time and peak memory, side by side in one run.

Run:  .venv/bin/python benchmarks/overhead.py [--steps 30] [--repeats 5] [--device cpu|cuda] [--long] ...

The run trains ``entropy_callbacks.toy.GRPOModule`` (GRPO on the toy copy task, a tiny random
Llama; by default U = 8 prompts x 8 rollouts of up to 3 tokens per optimizer step) with an
EntropyProbe whose batch E is as large as one training batch: 8 held-out prompts x 8 responses,
sampled like the rollouts. ``--long`` adds a second setting with a larger model and longer
responses (``--long-hidden``, ``--long-layers``, ``--long-max-new-tokens``).

Wall time (the callback issue's target: at every_n_steps = 10, <= 10 % extra with order 1 and
<= 20 % with order 2). Five configurations, each a ``Trainer.fit`` of ``--steps`` optimizer steps
from the same seed: no probe (the baseline), and the probe at every_n_steps 1 and 10 with order
1 and 2. The timed span is the training loop (on_train_start to on_train_end), so Trainer setup
is left out. Repeats are interleaved: each repeat runs B c1 B c2 B c3 B c4 B (B = baseline, c =
the probed configurations in an order rotated from repeat to repeat), and each ratio is the
median over repeats of (run time / mean of the two baselines around it), so drift and load from
other work on the machine hit numerator and denominator alike. Every configuration runs once
for 2 steps before the timed repeats (warm-up). Each run also checks that the probe left
training untouched: the final parameters must equal the baseline's bit for bit.

Peak memory (the benchmarks issue's target: the probe's peak <= the training step's peak).
One training step (rollouts + loss + backward + AdamW step) against one probe of the same size
(begin: sampling E and the theta0 snapshot; finish: the order-1 or order-2 prediction and the
measurement), both counted as the peak of tensor memory above the state they start from (the
model, its AdamW state, no gradients). The probe runs as in training: begin after the backward
pass, finish after the optimizer step, so E and the snapshot are held across the step. Its
peak is max(peak of begin, held + peak of finish); "step + probe" is the peak of the whole
probed step (backward, begin, optimizer step, finish) against the plain step. The probe runs
with E at once and with each ``--microbatch-sizes`` value, to show that a microbatch bounds it.
On CPU the counts come from torch.profiler(profile_memory=True) (every allocation and free of
the CPU allocator, summed in time order); on CUDA from torch.cuda.max_memory_allocated.
Each measurement starts from a fresh module with the same seed, after one unmeasured step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from harness import check_run_arguments, prepare  # noqa: E402
from entropy_callbacks import EntropyProbe, SamplingConfig  # noqa: E402
from entropy_callbacks.step_probe import ProbeOptions, StepProbe  # noqa: E402
from entropy_callbacks.toy import GRPOModule, TinyModelOptions  # noqa: E402

TIME_TARGETS = {(10, 1): 0.10, (10, 2): 0.20}  # extra wall time at (every_n_steps, order)
PROBED = [(1, 1), (1, 2), (10, 1), (10, 2)]  # (every_n_steps, order)


# ---------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Setting:
    name: str
    hidden: int
    layers: int
    heads: int
    max_new_tokens: int
    reward: str

    def model(self, seed: int) -> TinyModelOptions:
        # The toy default's proportions (intermediate = 2 x hidden); room for prompt + response.
        return TinyModelOptions(hidden_size=self.hidden, num_layers=self.layers, num_heads=self.heads,
                                intermediate_size=2 * self.hidden, max_positions=max(32, self.max_new_tokens + 16),
                                seed=seed)

    def describe(self) -> str:
        return (f"Llama hidden {self.hidden}, {self.layers} layers, {self.heads} heads, "
                f"max_new_tokens {self.max_new_tokens}, reward {self.reward!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per timed training run")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats (after one warm-up)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--hidden", type=int, default=64, help="hidden size (the toy default)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--max-new-tokens", type=int, default=3, help="response tokens at most (rollouts and E)")
    p.add_argument("--reward", default="copy", choices=("copy", "contains", "exact_match"),
                   help="GRPO reward (copy: the toy default; its responses shrink to 2 tokens as it learns)")
    p.add_argument("--long", action="store_true", help="add a second setting: larger model, longer responses")
    p.add_argument("--long-hidden", type=int, default=256, help="hidden size of the --long setting")
    p.add_argument("--long-layers", type=int, default=4, help="decoder layers of the --long setting")
    p.add_argument("--long-max-new-tokens", type=int, default=24, help="max_new_tokens of the --long setting")
    p.add_argument("--long-reward", default="contains", choices=("copy", "contains", "exact_match"),
                   help="reward of the --long setting (contains: rewards any response holding the answer, so "
                        "responses stay at max_new_tokens instead of collapsing to 2 tokens)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per optimizer step (and in E)")
    p.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (and responses per prompt in E)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the GRPO module")
    p.add_argument("--timing-microbatch-size", type=int, default=None,
                   help="the probe's microbatch_size in the timed runs (default: all of E at once)")
    p.add_argument("--microbatch-sizes", type=int, nargs="*", default=[16, 4],
                   help="probe microbatch sizes measured for memory, besides all of E at once")
    p.add_argument("--memory-only", action="store_true", help="skip the timing section")
    p.add_argument("--timing-only", action="store_true", help="skip the memory section")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared CPU, cpu device only)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    if args.memory_only and args.timing_only:
        p.error("--memory-only and --timing-only exclude each other")
    check_run_arguments(p, args)
    if args.group_size < 2:
        p.error("--group-size must be >= 2 (GRPO normalises within groups)")
    if any(m < 1 for m in args.microbatch_sizes) or (args.timing_microbatch_size or 1) < 1:
        p.error("microbatch sizes must be >= 1")
    return args


def settings(args: argparse.Namespace) -> list[Setting]:
    rows = [Setting("toy" if (args.hidden, args.layers, args.max_new_tokens) == (64, 2, 3) else "main",
                    args.hidden, args.layers, args.heads, args.max_new_tokens, args.reward)]
    if args.long:
        rows.append(Setting("long", args.long_hidden, args.long_layers, args.heads, args.long_max_new_tokens,
                            args.long_reward))
    return rows


def make_module(setting: Setting, args: argparse.Namespace) -> GRPOModule:
    pl.seed_everything(args.seed, verbose=False)
    module = GRPOModule(model=setting.model(args.seed), sampling=SamplingConfig(max_new_tokens=setting.max_new_tokens),
                        reward=setting.reward, group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                        lr=args.lr, seed=args.seed)
    if args.prompts_per_step > len(module.held_out_items):
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step}: the toy task has only "
                         f"{len(module.held_out_items)} held-out prompts for E")
    return module


def held_out_prompts(module: GRPOModule, args: argparse.Namespace) -> list[str]:
    """E's prompts: as many held-out prompts as a training batch has prompts."""
    return [item.prompt for item in module.held_out_items[: args.prompts_per_step]]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- timing
class LoopTimer(Callback):
    """Times the training loop (on_train_start to on_train_end) and records U's response lengths."""

    def __init__(self, device: str, now: Callable[[], float]) -> None:
        self.device, self.now = device, now
        self.seconds = float("nan")
        self.lengths: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        sync(self.device)
        self._start = self.now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = trainer.callback_metrics.get("train/response_length")
        if value is not None:
            self.lengths.append(float(value))

    def on_train_end(self, trainer, pl_module) -> None:
        sync(self.device)
        self.seconds = self.now() - self._start


@dataclass
class RunResult:
    seconds: float
    digest: str
    probes: int
    errors: int
    e_tokens_per_seq: float
    u_tokens_per_seq: float
    probe_seconds: float  # mean of the records' own probe_seconds


def params_digest(module: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_run(setting: Setting, args: argparse.Namespace, steps: int, probe_config: tuple[int, int] | None,
              now: Callable[[], float]) -> RunResult:
    module = make_module(setting, args)
    timer = LoopTimer(args.device, now)
    callbacks: list[Callback] = [timer]
    probe = None
    if probe_config is not None:
        every, order = probe_config
        probe = EntropyProbe(prompts=held_out_prompts(module, args), sampling=module.sampling, every_n_steps=every,
                             responses_per_prompt=args.group_size, order=order,
                             microbatch_size=args.timing_microbatch_size, seed=args.seed, on_error="warn",
                             log_samples=0, jsonl=False)
        probe.print_summary = False
        callbacks.append(probe)
    with tempfile.TemporaryDirectory(prefix="overhead-") as root:
        trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_steps=steps,
                             max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=root, callbacks=callbacks,
                             num_sanity_val_steps=0)
        trainer.fit(module)
    records = [r for r in (probe.records if probe else []) if not r.skipped]
    e_tokens = (sum(r.num_tokens for r in records) / max(1, sum(r.num_sequences for r in records))
                if records else float("nan"))
    return RunResult(
        seconds=timer.seconds,
        digest=params_digest(module.policy),
        probes=len(records),
        errors=probe.probe_errors if probe else 0,
        e_tokens_per_seq=e_tokens,
        u_tokens_per_seq=statistics.fmean(timer.lengths) if timer.lengths else float("nan"),
        probe_seconds=statistics.fmean(r.probe_seconds for r in records) if records else float("nan"),
    )


def config_label(config: tuple[int, int] | None) -> str:
    return "baseline (no probe)" if config is None else f"every {config[0]}, order {config[1]}"


def timing(setting: Setting, args: argparse.Namespace) -> int:
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"\n== {'wall' if args.clock == 'wall' else 'CPU'} time: {setting.name} ({setting.describe()}) ==", flush=True)
    for config in [None] + PROBED:  # warm-up: lazy imports, first-call allocations, kernel selection
        train_run(setting, args, min(args.steps, 2), config, now)

    started = time.perf_counter()
    baselines: list[RunResult] = []
    runs: dict[tuple[int, int], list[tuple[RunResult, float]]] = {c: [] for c in PROBED}
    for r in range(args.repeats):
        order = PROBED[r % len(PROBED):] + PROBED[:r % len(PROBED)]
        previous = train_run(setting, args, args.steps, None, now)
        baselines.append(previous)
        for config in order:
            result = train_run(setting, args, args.steps, config, now)
            following = train_run(setting, args, args.steps, None, now)
            baselines.append(following)
            runs[config].append((result, 0.5 * (previous.seconds + following.seconds)))
            previous = following
        print(f"  repeat {r + 1}/{args.repeats} done ({time.perf_counter() - started:.0f} s)", flush=True)

    reference = baselines[0].digest
    changed = [config_label(c) for c in PROBED for res, _ in runs[c] if res.digest != reference]
    changed += ["baseline"] * sum(b.digest != reference for b in baselines)
    errors = sum(res.errors for c in PROBED for res, _ in runs[c])
    first = runs[PROBED[0]][0][0]
    base_s = [b.seconds for b in baselines]
    print(f"U         {args.prompts_per_step} prompts x {args.group_size} rollouts per step, "
          f"{baselines[0].u_tokens_per_seq:.2f} response tokens per rollout (mean over the run)")
    print(f"E         {args.prompts_per_step} held-out prompts x {args.group_size} responses, "
          f"{first.e_tokens_per_seq:.2f} response tokens per sequence (mean over the probes); microbatch "
          f"{args.timing_microbatch_size or 'all of E'}")
    print(f"runs      {args.steps} steps each, {args.repeats} interleaved repeats, "
          f"{'wall-clock' if args.clock == 'wall' else 'process CPU'} time of the training loop; "
          f"baseline {statistics.median(base_s) / args.steps * 1e3:.1f} ms per step")
    print()
    print(f"{'configuration':<22}{'probes':>7}{'median s':>10}{'× baseline':>12}{'range ×':>14}{'extra':>9}"
          f"{'ms/probe':>10}{'target':>10}  result")
    print("-" * 100)
    pairs = list(zip(base_s[:-1], base_s[1:]))
    noise = [a / b for a, b in pairs]
    print(f"{config_label(None):<22}{0:>7}{statistics.median(base_s):>10.3f}{1.0:>11.3f}×"
          f"{f'{min(noise):.3f}–{max(noise):.3f}':>14}{'':>9}{'':>10}{'':>10}  (range: neighbouring baselines)")
    failed = 0
    for config in PROBED:
        results = runs[config]
        ratios = [res.seconds / unit for res, unit in results]
        ratio = statistics.median(ratios)
        probes = results[0][0].probes
        per_probe = statistics.median([(res.seconds - unit) / max(1, res.probes) for res, unit in results])
        target = TIME_TARGETS.get(config)
        verdict, target_text = "", ""
        if target is not None:
            ok = ratio - 1 <= target
            failed += not ok
            verdict, target_text = ("pass" if ok else "FAIL"), f"≤ +{target:.0%}"
        print(f"{config_label(config):<22}{probes:>7}{statistics.median([r.seconds for r, _ in results]):>10.3f}"
              f"{ratio:>11.3f}×{f'{min(ratios):.3f}–{max(ratios):.3f}':>14}{ratio - 1:>+9.1%}"
              f"{per_probe * 1e3:>10.1f}{target_text:>10}  {verdict}")
    print()
    print("× baseline: median over repeats of run time / mean of the baseline runs just before and after it;")
    print("ms/probe: (run time − that baseline) / probes in the run; range: min–max of the per-repeat ratios")
    own = {config_label(c): statistics.fmean(res.probe_seconds for res, _ in runs[c]) * 1e3 for c in PROBED}
    print("probe_seconds logged by the probe itself (mean ms): "
          + ", ".join(f"{k}: {v:.1f}" for k, v in own.items()))
    print(f"training unchanged by the probe (final θ equal to the baseline's in every run): "
          f"{'yes' if not changed else 'NO: ' + ', '.join(sorted(set(changed)))}; probe errors: {errors}")
    return failed + bool(changed) + bool(errors)


# ---------------------------------------------------------------------------- memory
@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (kineto prints a line at every profiler start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def measure(fn: Callable[[], None], device: str) -> tuple[int, int]:
    """(peak, net): the most tensor memory in use above the level at the start while ``fn`` ran,
    and what it left allocated at the end, in bytes."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak, running


def sequence_peak(phases: list[tuple[int, int]]) -> int:
    """Peak of phases run one after another, from each phase's (peak, net)."""
    offset = peak = 0
    for phase_peak, net in phases:
        peak = max(peak, offset + phase_peak)
        offset += net
    return peak


class Stepper:
    """A fresh GRPO module and its AdamW, one unmeasured step taken (AdamW state exists)."""

    def __init__(self, setting: Setting, args: argparse.Namespace) -> None:
        self.module = make_module(setting, args).to(args.device)
        self.module.train()
        self.optimizer = self.module.configure_optimizers()
        self.backward(seed=10_000)
        self.step()
        self.tokens = float("nan")

    def backward(self, seed: int) -> None:
        rollouts = self.module.update_batch(seed)  # rollouts of prompts_per_step prompts x group_size
        self.tokens = float(rollouts.batch.response_lengths.float().mean())
        loss, _ = self.module.policy_loss(rollouts)
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def probe(self, args: argparse.Namespace, order: int, microbatch: int | None) -> StepProbe:
        module = self.module
        options = ProbeOptions(sampling=module.sampling, every_n_steps=1, responses_per_prompt=args.group_size,
                               order=order, microbatch_size=microbatch, seed=args.seed)
        prompts = [module._encode(p) for p in held_out_prompts(module, args)]
        return StepProbe(options, prompts, eos_token_id=module.tokenizer.eos_token_id,
                         pad_token_id=module.tokenizer.pad_token_id)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def memory(setting: Setting, args: argparse.Namespace) -> int:
    device = args.device
    method = "torch.cuda.max_memory_allocated" if device == "cuda" else "torch.profiler(profile_memory=True)"
    print(f"\n== peak memory: {setting.name} ({setting.describe()}), {method} ==", flush=True)
    seed = 1

    # Warm-up: every code path once (lazy imports, first-call allocations).
    warm = Stepper(setting, args)
    probe = warm.probe(args, order=2, microbatch=None)
    warm.backward(seed)
    probe.begin(warm.module.policy, step=1)
    warm.step()
    probe.finish(warm.module.policy)
    del warm, probe
    gc.collect()

    def train_row() -> dict:
        s = Stepper(setting, args)
        gc.collect()
        backward = measure(lambda: s.backward(seed), device)
        step = measure(s.step, device)
        return {"peak": sequence_peak([backward, step]), "tokens": s.tokens,
                "params": sum(p.numel() * p.element_size() for p in s.module.policy.parameters())}

    def probe_row(order: int, microbatch: int | None) -> dict:
        s = Stepper(setting, args)
        core = s.probe(args, order, microbatch)
        gc.collect()
        out = {}
        backward = measure(lambda: s.backward(seed), device)
        begin = measure(lambda: out.setdefault("batch_tokens", float(core.begin(s.module.policy, step=1)
                                                                          .response_lengths.float().mean())), device)
        step = measure(s.step, device)
        finish = measure(lambda: out.setdefault("record", core.finish(s.module.policy)), device)
        held = begin[1]
        return {"peak": max(begin[0], held + max(0, finish[0])), "held": held,
                "step_with_probe": sequence_peak([backward, begin, step, finish]), "tokens": out["batch_tokens"],
                "ok": not out["record"].skipped}

    train = train_row()
    rows = []
    for microbatch in [None] + list(args.microbatch_sizes):
        for order in (1, 2):
            rows.append((order, microbatch, probe_row(order, microbatch)))
            print(f"  probe order {order}, microbatch {microbatch or 'all'} measured", flush=True)

    n = args.prompts_per_step * args.group_size
    print(f"U         {n} rollouts ({args.prompts_per_step} prompts x {args.group_size}), "
          f"{train['tokens']:.2f} response tokens per rollout; parameters {fmt_bytes(train['params'])} "
          f"(the θ₀ snapshot holds as much)")
    print(f"E         {n} sequences ({args.prompts_per_step} held-out prompts x {args.group_size}), "
          f"{rows[0][2]['tokens']:.2f} response tokens per sequence")
    print()
    print(f"{'measurement':<34}{'peak':>12}{'held':>12}{'× step':>9}{'target':>9}  {'result':<8}"
          f"{'step + probe':>14}")
    print("-" * 100)
    print(f"{f'training step ({n} rollouts)':<34}{fmt_bytes(train['peak']):>12}{'':>12}{1.0:>8.2f}×")
    failed = 0
    for order, microbatch, row in rows:
        ratio = row["peak"] / train["peak"] if train["peak"] else float("inf")
        ok = row["peak"] <= train["peak"] and row["ok"]
        failed += not ok
        label = f"probe order {order}, microbatch {microbatch or 'all'}"
        combined = row["step_with_probe"] / train["peak"] if train["peak"] else float("inf")
        print(f"{label:<34}{fmt_bytes(row['peak']):>12}{fmt_bytes(row['held']):>12}{ratio:>8.2f}×{'≤ 1×':>9}  "
              f"{'pass' if ok else 'FAIL':<8}{combined:>13.2f}×")
    print()
    print("peak: the most tensor memory above the start state (model + AdamW state, no gradients);")
    print("held: E and the θ₀ snapshot, kept from begin (before the optimizer step) to finish;")
    print("probe peak = max(peak of begin, held + peak of finish); step + probe: the peak of a probed step")
    print("(backward, begin, optimizer step, finish) as a multiple of the plain training step's peak")
    return failed


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    # sample_batch passes past_key_values=, which this transformers deprecates; Lightning chatters.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(num_workers|eval mode|log_every_n_steps|does not have many workers).*")
    warnings.filterwarnings("ignore", message=".*outside θ₀'s top-k/top-p support.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    exit_code = prepare(args.threads, args.device)
    if exit_code is not None:
        return exit_code

    import lightning

    print(f"device    {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, lightning {lightning.__version__}")
    print(f"module    entropy_callbacks.toy.GRPOModule (copy-task prompts), AdamW lr {args.lr:g}, seed {args.seed}")
    failed = 0
    for setting in settings(args):
        if not args.memory_only:
            failed += timing(setting, args)
        if not args.timing_only:
            failed += memory(setting, args)
    print(f"\n{failed} target(s) missed or check(s) failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
