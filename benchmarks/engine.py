"""Cost of the entropy-callbacks passes, each as a ratio to one no-grad forward of the same batch.

Run:  .venv/bin/python benchmarks/engine.py [--repeats 15] [--device cpu|cuda] [--dtype float32] ...

On a Llama-style model with random weights (default: hidden 256, 4 layers, vocab 512), or with
``--preset qwen2.5-0.5b|qwen2.5-1.5b`` a Qwen2 of that real model's shape (vocab 151936; on a CPU
add e.g. ``--layers 2 --tokens 32``), and a batch E of 16 sequences x 64 sampled tokens, it times,
side by side in one run:

- forward        one teacher-forced ``model(input_ids, attention_mask, position_ids,
                 use_cache=False)`` of E under ``torch.no_grad`` -- the unit of every ratio
- sampling       ``sample_batch`` drawing E (no target)
- one scale      ``measure_delta_h(scales=(1,))``: the theta0 pass plus one scaled pass, plus the
                 partner pass of its rounding floor (a quarter of E in the partner precision), also
                 timed on its own (``engine.floor_partner_pass``) beside it
- further scale  ``measure_delta_h(scales=(1, 2))`` minus ``measure_delta_h(scales=(1,))``
- order 1        ``predict_delta_h(order=1)``: one pass on jets cut at degree 1 (dual numbers)
- order 2        ``predict_delta_h(order=2)``: one Taylor-mode pass (``entropy_callbacks.taylor``)
- with ``--compare-engines`` also both orders on torch's own forward AD (dual tensors, nested
  jvp), for the side-by-side the jets have to win (on a GPU: kernel launches and Python dispatch)

Repeats are interleaved: each repeat runs every operation once, in a rotated order, with a
forward timed between consecutive operations, and every ratio is the median over repeats of
(operation time / mean of the two forwards around it), so drift and load from other work on the
machine hit numerator and denominator alike. ``--clock cpu`` (with ``--threads 1``) times this
process's CPU time instead, which is much steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (PRESETS, add_model_arguments, add_run_arguments, check_run_arguments, prepare,  # noqa: E402
                     random_llama, random_qwen2, random_step, timer)
from entropy_callbacks import SamplingConfig, measure_delta_h, predict_delta_h, sample_batch  # noqa: E402
from entropy_callbacks.engine import floor_partner_pass  # noqa: E402
from entropy_callbacks.precision import PRECISIONS, effective_dtype, resolve_precision  # noqa: E402
from entropy_callbacks.scoring import torch_forward_ad  # noqa: E402

TARGETS = {  # CPU targets with --dtype float64 (the precision policy then has nothing to do), × one forward
    "one scale": 2.2,
    "further scale": 1.1,
    "order 1": 3.0,
    "order 2": 6.0,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=15, help="interleaved timed repeats (after one warm-up)")
    add_model_arguments(p)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a real model's shape (Qwen2, vocab 151936) instead of the small Llama; --layers overrides its depth")
    p.add_argument("--compare-engines", action="store_true",
                   help="also time both orders on torch's own forward AD (dual tensors, nested jvp) instead of jets")
    p.add_argument("--seqs", type=int, default=16, help="sequences in E")
    p.add_argument("--tokens", type=int, default=64, help="response tokens per sequence (max_new_tokens)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence")
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling top-p (1 = off)")
    p.add_argument("--step-size", type=float, default=1e-3, help="delta-theta = step_size * randn, every parameter")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the passes' precision policy (auto: float64 values, float32 derivatives; float64 for a "
                        "float64 model); ratios are always to a forward of the model as it is")
    p.add_argument("--skip-sampling", action="store_true", help="do not time sampling (on a GPU it takes long)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timings, profile one call of each pass and print its N costliest operations")
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    check_run_arguments(p, args)
    return args


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.preset is not None:
        layers = args.layers if "--layers" in sys.argv else None
        model = random_qwen2(args.preset, layers=layers, max_positions=args.prompt + args.tokens, seed=args.seed,
                             device=args.device, dtype=args.dtype)
        args.vocab = model.config.vocab_size - 1  # prompts below it, EOS (never drawn) at it
        args.hidden, args.layers = model.config.hidden_size, model.config.num_hidden_layers
        args.heads = model.config.num_attention_heads
        return model
    return random_llama(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                        max_positions=args.prompt + args.tokens, seed=args.seed, device=args.device, dtype=args.dtype)

def draw_batch(model, args: argparse.Namespace, config: SamplingConfig):
    gen = torch.Generator().manual_seed(args.seed)
    # Prompt ids avoid pad (0); lengths vary a little so left padding is exercised.
    prompts = [torch.randint(3, args.vocab, (args.prompt - (i % 3),), generator=gen).tolist()
               for i in range(args.seqs)]
    # EOS = the id random_llama never samples: every response has exactly --tokens tokens.
    kwargs = dict(eos_token_id=[args.vocab], pad_token_id=0, seed=args.seed)
    return lambda: sample_batch(model, prompts, config, **kwargs)


def on_torch_ad(run: Callable[[], object]) -> object:
    with torch_forward_ad():
        return run()


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_code = prepare(args.threads, args.device)
    if exit_code is not None:
        return exit_code

    model = build_model(args)
    config = SamplingConfig(max_new_tokens=args.tokens, top_k=args.top_k, top_p=args.top_p)
    sample = draw_batch(model, args, config)
    batch = sample()
    base, delta = random_step(model, args.step_size, args.seed + 1)

    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lengths = batch.response_lengths

    def forward():
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).logits

    # the floor's partner pass as measure_delta_h runs it (no prediction beside it to serve as partner)
    rounds_in = effective_dtype(resolve_precision(args.precision, model).values, model)
    on_device = batch.to(args.device)
    ops: dict[str, Callable[[], object]] = {
        "forward": forward,
        "sampling": sample,
        "measure (1,)": lambda: measure_delta_h(model, batch, base, delta, scales=(1.0,), precision=args.precision),
        "floor partner": lambda: floor_partner_pass(model, on_device, base, delta, rounds_in, "rb", None),
        "measure (1,2)": lambda: measure_delta_h(model, batch, base, delta, scales=(1.0, 2.0),
                                                 precision=args.precision),
        "order 1": lambda: predict_delta_h(model, batch, base, delta, order=1, precision=args.precision),
        "order 2": lambda: predict_delta_h(model, batch, base, delta, order=2, precision=args.precision),
    }
    if args.compare_engines:
        ops["order 1, torch AD"] = lambda: on_torch_ad(lambda: ops["order 1"]())
        ops["order 2, torch AD"] = lambda: on_torch_ad(lambda: ops["order 2"]())
    if args.skip_sampling:
        del ops["sampling"]

    n_params = sum(p.numel() for p in model.parameters())
    kind = f"Qwen2 ({args.preset} shape, {model.config.num_key_value_heads} KV heads)" if args.preset else "Llama"
    print(f"model     {kind}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab} + EOS, "
          f"{n_params / 1e6:.2f}M params, {args.dtype}, {args.device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"batch     {len(batch)} sequences x {batch.input_ids.shape[1]} columns (prompt width "
          f"{batch.prompt_length}), response tokens per sequence {int(lengths.min())}..{int(lengths.max())}, "
          f"{int(lengths.sum())} in all; top_k={args.top_k}, top_p={args.top_p}")
    print(f"step      delta-theta = {args.step_size:g} * randn on all {len(delta)} parameter tensors; "
          f"precision={args.precision!r}")
    print(f"repeats   {args.repeats} interleaved, after one warm-up of each operation; "
          f"{'wall-clock' if args.clock == 'wall' else 'process CPU'} time", flush=True)

    clock = timer(args.device, args.clock)
    for fn in ops.values():  # warm-up (first-call allocation, lazy imports, kernel selection)
        fn()

    # Each repeat runs F u1 F u2 F u3 F u4 F (F = forward, u = a unit of work, in an order rotated
    # from repeat to repeat); each unit's unit of cost is the mean of the two forwards around it.
    # The two measurements stay adjacent (order alternating) so their difference sees the same load.
    units = [("sampling",), ("measure (1,)", "measure (1,2)", "floor partner"), ("order 1",), ("order 2",)]
    if args.compare_engines:
        units += [("order 1, torch AD",), ("order 2, torch AD",)]
    units = [unit for unit in units if unit[0] in ops]
    times: dict[str, list[float]] = {n: [] for n in ops}
    unit_of: dict[str, list[float]] = {n: [] for n in ops}
    for r in range(args.repeats):
        order = units[r % len(units):] + units[:r % len(units)]
        previous = clock(forward)
        times["forward"].append(previous)
        for unit in order:
            unit = unit if r % 2 == 0 else unit[::-1]
            spent = {name: clock(ops[name]) for name in unit}
            following = clock(forward)
            times["forward"].append(following)
            for name, t in spent.items():
                times[name].append(t)
                unit_of[name].append(0.5 * (previous + following))
            previous = following

    fwd = times["forward"]
    further = [two - one for one, two in zip(times["measure (1,)"], times["measure (1,2)"])]
    value_passes = [one - floor for one, floor in zip(times["measure (1,)"], times["floor partner"])]
    rows = [
        ("forward (no grad)", fwd, fwd, None),
        *([("sampling", times["sampling"], unit_of["sampling"], None)] if "sampling" in ops else []),
        ("one scale (incl. θ₀ pass)", times["measure (1,)"], unit_of["measure (1,)"], "one scale"),
        ("  its floor's partner pass", times["floor partner"], unit_of["floor partner"], None),
        ("  its value passes", value_passes, unit_of["measure (1,)"], None),
        ("each further scale", further, unit_of["measure (1,)"], "further scale"),
        ("order-1 prediction", times["order 1"], unit_of["order 1"], "order 1"),
        ("order-2 prediction", times["order 2"], unit_of["order 2"], "order 2"),
    ]
    if args.compare_engines:
        rows += [("order 1, dual tensors", times["order 1, torch AD"], unit_of["order 1, torch AD"], None),
                 ("order 2, nested jvp", times["order 2, torch AD"], unit_of["order 2, torch AD"], None)]
    fastest = {"forward (no grad)": min(fwd), "each further scale": min(times["measure (1,2)"]) - min(times["measure (1,)"]),
               "  its value passes": min(times["measure (1,)"]) - min(times["floor partner"])}
    med = statistics.median
    print()
    print(f"{'operation':<28}{'median s':>10}{'× forward':>11}{'range ×':>15}{'best ×':>9}{'target':>9}  result")
    print("-" * 90)
    failed = 0
    for label, ts, units_s, key in rows:
        ratios = [t / u for t, u in zip(ts, units_s)]
        ratio = med(ratios)
        target = TARGETS.get(key) if key else None
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}"
        best = fastest.get(label, min(ts)) / min(fwd)
        if target is None:
            verdict, target_text = "", ""
        else:
            ok = ratio <= target
            failed += not ok
            verdict = "pass" if ok else "FAIL"
            target_text = f"≤ {target:g}×"
            if args.device != "cpu" or args.dtype != "float64":
                verdict += " (targets: CPU, float64)"
        print(f"{label:<28}{med(ts):>10.4f}{ratio:>10.2f}×{spread:>15}{best:>8.2f}×{target_text:>9}  {verdict}")
    print()
    print("× forward: median over repeats of time / mean of the forwards timed just before and after it;")
    print("range: min–max of those ratios; best ×: fastest time / fastest forward;")
    print("its value passes = one scale − its floor's partner pass (timed beside it);")
    print(f"further scale = measure(scales=(1, 2)) − measure(scales=(1,)); {failed} target(s) missed")
    if args.profile:
        for name in ("forward", "measure (1,)", "order 1", "order 2"):
            profile(name, ops[name], args.device, args.profile)
    return 0


def profile(name: str, fn: Callable[[], object], device: str, rows: int) -> None:
    """One call of ``fn`` under torch.profiler: its ``rows`` costliest operations by self time on
    the device (CPU time on a CPU). A profiler that fails (no CUPTI) is reported, not fatal."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    print(f"\nprofile of one call: {name}", flush=True)
    try:
        with torch_profile(activities=activities) as prof:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48), flush=True)
    except Exception as error:  # noqa: BLE001 - a profile is an extra; the timings above stand
        print(f"(profiler failed: {type(error).__name__}: {error})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
