"""How the probe's cost grows with the size of E and with the response length.

Run:  .venv/bin/python benchmarks/scaling.py [--seqs 16,64,256] [--tokens 16,64,256] [--repeats 3] ...

On a Llama-style model with random weights (as benchmarks/engine.py: hidden 256, 4 layers,
vocab 512, prompts of ~16 tokens, EOS outside the vocabulary so every response is full length),
it times, side by side in one run:

- forward     one teacher-forced no-grad forward of E (default attention kernel), for reference
- sampling    ``sample_batch`` drawing E (KV-cached decoding, one step per response token)
- one scale   ``measure_delta_h(scales=(1,))``: the θ₀ pass plus one scaled pass
- order 1     ``predict_delta_h(order=1)``: one JVP pass
- order 2     ``predict_delta_h(order=2)``: one nested JVP pass

at every E size (``--seqs``, sequences, at ``--fixed-tokens`` response tokens) and every
response length (``--tokens``, at ``--fixed-seqs`` sequences). Repeats are interleaved: each
repeat runs every (size, operation) once, in an order rotated from repeat to repeat, so drift
and load from other work hit all sizes alike; each time is the median over repeats.

The exponent of an operation is the least-squares slope of log(time) against log(size); the
slope between the two largest sizes ("last") is the asymptotic one, free of fixed per-call
costs. Linear growth is exponent 1. Attention is quadratic in the number of columns (prompt +
response), so the length exponent of a full pass rises above 1 as attention's share grows; the
breakdown (on by default for the length sweep, CPU only) profiles one call per length with
``torch.profiler`` and splits the time into ``aten::scaled_dot_product_attention`` (QKᵀ, softmax,
·V, with their tangents) and the rest (projections, MLP, norms, LM head, entropies), and fits an
exponent to each part.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import check_run_arguments, add_model_arguments, add_run_arguments, prepare, random_llama, random_step, timer  # noqa: E402
from entropy_callbacks import SamplingConfig, measure_delta_h, predict_delta_h, sample_batch  # noqa: E402

OPS = ("forward", "sampling", "one scale", "order 1", "order 2")
OP_FLAGS = {"forward": "forward", "sampling": "sampling", "measure": "one scale", "order1": "order 1",
            "order2": "order 2"}
ATTENTION_OP = "aten::scaled_dot_product_attention"


def sizes(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be integers >= 1, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seqs", type=sizes, default=[16, 64, 256], help="E sizes (sequences) for the E sweep")
    p.add_argument("--tokens", type=sizes, default=[16, 64, 256], help="response lengths for the length sweep")
    p.add_argument("--fixed-tokens", type=int, default=64, help="response length during the E sweep")
    p.add_argument("--fixed-seqs", type=int, default=16, help="E size during the length sweep")
    p.add_argument("--ops", default="forward,sampling,measure,order1,order2",
                   help=f"operations to time, from {','.join(OP_FLAGS)}")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats (after one warm-up)")
    p.add_argument("--max-order2-tokens", type=int, default=0,
                   help="skip order 2 where E size x response length exceeds this (0 = never skip)")
    p.add_argument("--microbatch", type=int, default=None,
                   help="rows per probe pass (microbatch_size) for one scale / order 1 / order 2 (default: all of E)")
    add_model_arguments(p)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence (lengths vary by up to 2)")
    p.add_argument("--step-size", type=float, default=1e-3, help="delta-theta = step_size * randn, every parameter")
    p.add_argument("--max-exponent", type=float, default=1.15, help="an exponent up to this counts as linear")
    p.add_argument("--no-breakdown", action="store_true", help="skip the profiled attention / rest breakdown")
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    check_run_arguments(p, args)
    if args.prompt < 3:
        p.error("--prompt must be >= 3")
    unknown = [o for o in args.ops.split(",") if o and o not in OP_FLAGS]
    if unknown:
        p.error(f"--ops: unknown {unknown}; choose from {list(OP_FLAGS)}")
    args.op_names = [name for flag, name in OP_FLAGS.items() if flag in args.ops.split(",")]
    return args


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    longest = args.prompt + max(max(args.tokens), args.fixed_tokens)
    return random_llama(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                        max_positions=longest, seed=args.seed, device=args.device, dtype=args.dtype)

def operations(model, args, prompts, seqs: int, tokens: int, base, delta) -> tuple[dict[str, Callable], object]:
    """The operations at one (E size, response length) point, and E (drawn once here)."""
    config = SamplingConfig(max_new_tokens=tokens)
    # EOS = the id random_llama never samples: every response has exactly `tokens` tokens.
    sample = lambda: sample_batch(model, prompts[:seqs], config, eos_token_id=[args.vocab],  # noqa: E731
                                  pad_token_id=0, seed=args.seed)
    batch = sample()
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    mb = args.microbatch

    def forward():
        with torch.no_grad():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                         use_cache=False).logits

    ops = {
        "forward": forward,
        "sampling": sample,
        "one scale": lambda: measure_delta_h(model, batch, base, delta, scales=(1.0,), microbatch_size=mb),
        "order 1": lambda: predict_delta_h(model, batch, base, delta, order=1, microbatch_size=mb),
        "order 2": lambda: predict_delta_h(model, batch, base, delta, order=2, microbatch_size=mb),
    }
    return {name: ops[name] for name in args.op_names}, batch


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x (nan with fewer than two points)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0 and math.isfinite(y)]
    if len(pairs) < 2:
        return math.nan
    lx, ly = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(lx, ly, 1)[0])


def last_slope(xs: list[float], ys: list[float]) -> float:
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0 and math.isfinite(y)]
    if len(pairs) < 2:
        return math.nan
    (x0, y0), (x1, y1) = pairs[-2], pairs[-1]
    return math.log(y1 / y0) / math.log(x1 / x0)


def attention_share(fn: Callable[[], object]) -> float:
    """Share of one profiled call's time in aten ops that is spent inside
    aten::scaled_dot_product_attention (its children included). Both parts are op times from the
    same profile, so load from other processes scales them alike; Python glue between ops is
    left out of both."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    in_ops = sum(e.self_cpu_time_total for e in events)
    attention = sum(e.cpu_time_total for e in events if e.key == ATTENTION_OP)
    return min(attention / in_ops, 1.0) if in_ops > 0 else math.nan


def fmt_time(t: float | None) -> str:
    if t is None:
        return "—"
    return f"{t:.3f}" if t < 10 else f"{t:.1f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    # sample_batch passes past_key_values=, which this transformers deprecates: keep the tables clean.
    exit_code = prepare(args.threads, args.device)
    if exit_code is not None:
        return exit_code

    started = time.perf_counter()
    model = build_model(args)
    base, delta = random_step(model, args.step_size, args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed)
    largest = max(max(args.seqs), args.fixed_seqs)
    # Prompt ids avoid pad (0); lengths vary a little so left padding is exercised. Smaller E
    # sizes take the first prompts of the same list.
    prompts = [torch.randint(3, args.vocab, (args.prompt - (i % 3),), generator=gen).tolist()
               for i in range(largest)]

    e_points = [(s, args.fixed_tokens) for s in args.seqs]
    t_points = [(args.fixed_seqs, t) for t in args.tokens]
    points = list(dict.fromkeys(e_points + t_points))  # the shared point is timed once
    cap = args.max_order2_tokens
    skipped = {p for p in points if cap and p[0] * p[1] > cap}

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model     Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
          f"{n_params / 1e6:.2f}M params, {args.dtype}, {args.device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"E sweep   {args.seqs} sequences x {args.fixed_tokens} response tokens; length sweep "
          f"{args.fixed_seqs} sequences x {args.tokens} tokens; prompts {args.prompt - 2}..{args.prompt} tokens, "
          f"responses full length (EOS outside the vocabulary)")
    print(f"passes    microbatch_size {args.microbatch or 'None (all of E in one pass)'}"
          + (f"; order 2 skipped where E x T > {cap}: {sorted(skipped)}" if skipped else ""))
    print(f"repeats   {args.repeats} interleaved over all sizes, after one warm-up of each; "
          f"{'wall-clock' if args.clock == 'wall' else 'process CPU'} time", flush=True)

    ops_at, batches = {}, {}
    for point in points:
        ops_at[point], batches[point] = operations(model, args, prompts, *point, base, delta)
    items = [(point, name) for point in points for name in args.op_names
             if not (name == "order 2" and point in skipped)]
    for point, name in items:  # warm-up
        ops_at[point][name]()

    clock = timer(args.device, args.clock)
    times: dict[tuple, list[float]] = {item: [] for item in items}
    for r in range(args.repeats):
        shift = (r * len(args.op_names) + r) % len(items)
        order = items[shift:] + items[:shift]
        if r % 2:
            order = order[::-1]
        for item in order:
            times[item].append(clock(ops_at[item[0]][item[1]]))
    median = {item: statistics.median(ts) for item, ts in times.items()}
    get = lambda point, name: median.get((point, name))  # noqa: E731

    def sweep_table(title: str, pts: list[tuple[int, int]], key: int) -> None:
        print()
        print(title)
        head = f"{'E size' if key == 0 else 'tokens':>8}{'columns':>9}"
        for name in args.op_names:
            head += f"{name + ' s':>14}{'×fwd':>7}" if name != "forward" and "forward" in args.op_names \
                else f"{name + ' s':>14}"
        print(head)
        print("-" * len(head))
        for point in pts:
            columns = batches[point].input_ids.shape[1]
            row = f"{point[key]:>8}{columns:>9}"
            fwd = get(point, "forward")
            for name in args.op_names:
                t = get(point, name)
                row += f"{fmt_time(t):>14}"
                if name != "forward" and "forward" in args.op_names:
                    row += f"{t / fwd:>6.1f}×" if t is not None and fwd else f"{'—':>7}"
            print(row)

    sweep_table(f"E sweep: time vs sequences in E, at {args.fixed_tokens} response tokens (median s, × the forward)",
                e_points, 0)
    sweep_table(f"length sweep: time vs response tokens, at {args.fixed_seqs} sequences (median s, × the forward)",
                t_points, 1)

    e_x = [float(s) for s, _ in e_points]
    t_x = [float(t) for _, t in t_points]
    c_x = [float(batches[p].input_ids.shape[1]) for p in t_points]
    print()
    print("fitted exponents: time ∝ size^k  (fit: least squares over all sizes; last: between the two largest)")
    head = (f"{'operation':<12}{'E fit':>8}{'E last':>8}{'T fit':>8}{'T last':>8}{'cols fit':>10}  result")
    print(head)
    print("-" * 78)
    exponents = {}
    for name in args.op_names:
        e_y = [get(p, name) for p in e_points]
        t_y = [get(p, name) for p in t_points]
        k = (slope(e_x, e_y), last_slope(e_x, e_y), slope(t_x, t_y), last_slope(t_x, t_y), slope(c_x, t_y))
        exponents[name] = k
        verdicts = []
        if math.isfinite(k[0]):
            verdicts.append(f"E {'≤ linear' if k[0] <= args.max_exponent else 'SUPERLINEAR'}")
        if math.isfinite(k[2]):
            verdicts.append(f"T {'≤ linear' if k[2] <= args.max_exponent else 'superlinear (see breakdown)'}")
        cells = "".join(f"{v:>8.2f}" if math.isfinite(v) else f"{'—':>8}" for v in k[:4])
        cells += f"{k[4]:>10.2f}" if math.isfinite(k[4]) else f"{'—':>10}"
        print(f"{name:<12}{cells}  {', '.join(verdicts)}")
    print(f"'≤ linear': fitted exponent ≤ {args.max_exponent:g}. cols: against prompt + response columns, the length each pass "
          "runs over (a fixed prompt flattens the T exponent at short lengths). Below 1: fixed per-call cost not yet "
          "amortised (sampling pays per decoding step, whatever E).")

    breakdown_ok = not args.no_breakdown and args.device == "cpu" and len(t_points) >= 2
    if breakdown_ok:
        print()
        print(f"breakdown of the length sweep (one profiled call per length: share of its time in aten ops spent "
              f"inside {ATTENTION_OP})")
        head = f"{'operation':<12}" + "".join(f"{'T=' + str(t):>9}" for _, t in t_points) + \
            f"{'attn exp':>10}{'rest exp':>10}{'rest last':>10}"
        print(head)
        print("-" * len(head))
        for name in args.op_names:
            shares, attn_t, rest_t = [], [], []
            for point in t_points:
                if (point, name) not in median:
                    shares.append(None)
                    attn_t.append(None)
                    rest_t.append(None)
                    continue
                share = attention_share(ops_at[point][name])
                shares.append(share)
                attn_t.append(share * median[(point, name)])
                rest_t.append((1 - share) * median[(point, name)])
            cells = "".join(f"{s:>8.0%} " if s is not None else f"{'—':>9}" for s in shares)
            a, b, c = slope(t_x, attn_t), slope(t_x, rest_t), last_slope(t_x, rest_t)
            print(f"{name:<12}{cells}" + "".join(f"{v:>10.2f}" if math.isfinite(v) else f"{'—':>10}" for v in (a, b, c)))
        print("attn / rest exp: exponents (vs T) of median time × share and × (1 − share). Attention is O(columns²)")
        print("per pass (O(columns) per decoding step for cached sampling, O(columns²) in all); everything else is")
        print("O(columns) per pass, so 'rest' should stay near 1 while attention's growing share lifts the total.")

    print()
    print(f"total run time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
