"""Cost of drawing E: the library's sampler against HF ``generate``, side by side in one run.

Run:  .venv/bin/python benchmarks/sampling.py [--repeats 5] [--rows 32] [--new-tokens 64] [--device cpu|cuda] ...

On a Llama-style model with random weights (default: hidden 256, 4 layers, vocab 512; use
``--vocab 151936`` for a Qwen-sized vocabulary), E = ``--rows`` sequences with 16-token prompts,
every row forced to run all ``--new-tokens`` steps (EOS is a token the model is never asked to
stop at), timed as ratios to one no-grad forward of the same-sized batch:

- sample_batch            the library's sampler (counter-based Gumbel noise, preallocated mask)
- sample_batch (static)   the same with ``DecodeOptions(cache="static")``
- sample_batch (compiled) ``DecodeOptions(cache="static", compile=True)`` (with ``--compile``:
                          compiling takes tens of seconds, outside the timed calls)
- generate (dynamic)      ``HFGenerateSampler()``: HF generate with its default cache, plus scores
- generate (static)       ``HFGenerateSampler(cache_implementation="static")``

and, per decoding step, the noise alone for all rows: ``counter_uniforms`` (one set of tensor
ops for every row) against one ``torch.Generator`` draw per row (what the sampler did before),
together with the number of aten operations each issues, counted with TorchDispatchMode, for
``--rows`` and for 4 times as many rows. Repeats are interleaved and each ratio is a median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import add_model_arguments, add_run_arguments, check_run_arguments, prepare, random_llama, timer  # noqa: E402
from entropy_callbacks import DecodeOptions, SamplingConfig, sample_batch  # noqa: E402
from entropy_callbacks.hf_sampler import HFGenerateSampler  # noqa: E402
from entropy_callbacks.sampling import _signed, counter_uniforms, row_seed  # noqa: E402


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def per_row_generators(rows: int, vocab: int, device: str) -> torch.Tensor:
    generators = [torch.Generator(device=device).manual_seed(row_seed(0, i, 0)) for i in range(rows)]
    return torch.stack([torch.rand(vocab, generator=g, device=device) for g in generators])


def counter_based(rows: int, vocab: int, device: str) -> torch.Tensor:
    keys = torch.tensor([_signed(row_seed(0, i, 0)) for i in range(rows)], device=device)
    return counter_uniforms(keys, 0, vocab)


def ops(fn) -> int:
    with OpCounter() as counter:
        fn()
    return counter.count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    add_run_arguments(p)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the compiled decoding step")
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    code = prepare(args.threads, args.device)
    if code is not None:
        return code
    model = random_llama(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                         max_positions=16 + args.new_tokens, seed=args.seed, device=args.device, dtype=args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, args.vocab, (args.rows, 16), generator=gen).tolist()
    config = SamplingConfig(max_new_tokens=args.new_tokens)
    eos, pad = args.vocab - 1, 0
    # A forward of the size of E (prompt + response) is the unit.
    full = torch.randint(3, args.vocab, (args.rows, 16 + args.new_tokens), generator=gen).to(args.device)
    run = timer(args.device, args.clock)

    def forward():
        with torch.no_grad():
            model(input_ids=full, use_cache=False)

    candidates = {
        "sample_batch": lambda: sample_batch(model, prompts, config, eos_token_id=eos, pad_token_id=pad, seed=1),
        "sample_batch (static)": lambda: sample_batch(model, prompts, config, eos_token_id=eos, pad_token_id=pad,
                                                      seed=1, decode=DecodeOptions(cache="static")),
        "generate (dynamic)": lambda: HFGenerateSampler(eos_token_id=eos, pad_token_id=pad)(
            model, prompts, config, responses_per_prompt=1, seed=1),
        "generate (static)": lambda: HFGenerateSampler(cache_implementation="static", eos_token_id=eos,
                                                       pad_token_id=pad)(model, prompts, config,
                                                                         responses_per_prompt=1, seed=1),
        **({"sample_batch (compiled)": lambda: sample_batch(
            model, prompts, config, eos_token_id=eos, pad_token_id=pad, seed=1,
            decode=DecodeOptions(cache="static", compile=True))} if args.compile else {}),
        "noise: counter-based": lambda: counter_based(args.rows, args.vocab, args.device),
        "noise: a Generator per row": lambda: per_row_generators(args.rows, args.vocab, args.device),
    }
    for fn in [forward, *candidates.values()]:
        fn()  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in candidates}
    for repeat in range(args.repeats):
        names = list(candidates)
        names = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in names:
            before, seconds, after = run(forward), run(candidates[name]), run(forward)
            ratios[name].append(seconds / (0.5 * (before + after)))
    unit = statistics.median([run(forward) for _ in range(3)])
    print(f"Llama h{args.hidden} x {args.layers}L, vocab {args.vocab}, {args.dtype} on {args.device}; E = "
          f"{args.rows} rows x (16 + {args.new_tokens}) tokens; one forward = {unit * 1e3:.1f} ms")
    print(f"{'':28}{'x forward':>10}")
    for name, values in ratios.items():
        print(f"{name:28}{statistics.median(values):>10.2f}")
    print("\naten operations for one step's noise (rows, 4 x rows):")
    for name, fn in (("counter-based", counter_based), ("a Generator per row", per_row_generators)):
        print(f"  {name:26}{ops(lambda: fn(args.rows, args.vocab, args.device)):>6}"
              f"{ops(lambda: fn(4 * args.rows, args.vocab, args.device)):>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
