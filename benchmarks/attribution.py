"""Cost of ``attribute_delta_h`` as a multiple of one no-grad forward of E plus one of U.

Run:  .venv/bin/python benchmarks/attribution.py [--repeats 5] [--threads 2]

A random Llama (hidden 256, 4 layers, vocab 512), E = ``--seqs`` sequences and U = ``--rollouts``
rollouts of ``--tokens`` sampled tokens each, REINFORCE per-sample losses with random advantages,
one AdamW step after one warm-up step. It times, interleaved with the unit (a forward of E then
one of U, no grad) and reported as medians of ratios:

- attribution            ``attribute_delta_h`` with the clip factor fitted (a reverse pass over U)
- attribution (c given)  the same with ``clip_factor=1.0``
- predict order 1        ``predict_delta_h(order=1)`` on E, for scale

The passes inside: a value pass and a reverse pass over E for ∇Ĥ; for AdamW two JVPs over U
(v_t fixed, and with v_t's Jacobian); the fitted c adds one reverse pass over U.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import add_model_arguments, add_run_arguments, check_run_arguments, prepare, random_llama, timer  # noqa: E402
from entropy_callbacks import SamplingConfig, attribute_delta_h, predict_delta_h, sample_batch  # noqa: E402


def per_sample_losses(model, rollouts, advantages):
    ids, mask, width = rollouts.input_ids, rollouts.attention_mask, rollouts.prompt_length
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    counted = rollouts.response_mask[:, width:].float()

    def losses(params):
        logits = functional_call(model, dict(params), (), {"input_ids": ids, "attention_mask": mask,
                                                           "position_ids": positions, "use_cache": False}).logits
        log_q = logits[:, width - 1:-1].float().log_softmax(-1).gather(-1, ids[:, width:, None]).squeeze(-1)
        return -advantages * (log_q * counted).sum(-1) / counted.sum(-1) / len(advantages)
    return losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    add_run_arguments(p, dtype=False)
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--rollouts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    code = prepare(args.threads, args.device)
    if code is not None:
        return code
    model = random_llama(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                         max_positions=16 + args.tokens, seed=args.seed, device=args.device)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = lambda count: [torch.randint(3, args.vocab, (16,), generator=gen).tolist() for _ in range(count)]  # noqa: E731
    config = SamplingConfig(max_new_tokens=args.tokens)
    kwargs = dict(eos_token_id=[args.vocab - 1], pad_token_id=0)  # EOS never asked for: full-length rows
    batch_e = sample_batch(model, prompt(args.seqs), config, seed=1, **kwargs)
    rollouts = sample_batch(model, prompt(args.rollouts), config, seed=2, **kwargs)
    advantages = torch.randn(args.rollouts, generator=gen).to(args.device)
    losses = per_sample_losses(model, rollouts, advantages)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    for step in range(2):
        if step == 1:
            base = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad()
        losses(dict(model.named_parameters())).sum().backward()
        optimizer.step()
    delta = {n: p.detach() - base[n] for n, p in model.named_parameters()}

    def unit():
        with torch.no_grad():
            for batch in (batch_e, rollouts):
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    ops = {
        "attribution": lambda: attribute_delta_h(model, batch_e, base, optimizer, losses),
        "attribution (c given)": lambda: attribute_delta_h(model, batch_e, base, optimizer, losses, clip_factor=1.0),
        "predict order 1": lambda: predict_delta_h(model, batch_e, base, delta, order=1),
    }
    run = timer(args.device, args.clock)
    for fn in (unit, *ops.values()):
        fn()  # warm-up
    ratios = {name: [] for name in ops}
    for repeat in range(args.repeats):
        for name, fn in ops.items():
            before, seconds, after = run(unit), run(fn), run(unit)
            ratios[name].append(seconds / (0.5 * (before + after)))
    found = attribute_delta_h(model, batch_e, base, optimizer, losses)
    print(f"Llama h{args.hidden} x {args.layers}L, vocab {args.vocab}, {torch.get_num_threads()} threads; "
          f"E {args.seqs} x {args.tokens} tokens, U {args.rollouts} x {args.tokens}; one unit (E + U forward) = "
          f"{statistics.median([run(unit) for _ in range(3)]) * 1e3:.0f} ms")
    for name, values in ratios.items():
        print(f"{name:24}{statistics.median(values):>8.2f}x")
    print(f"split: Σ a_u {float(found.per_sample.sum()):+.3e}, momentum {found.momentum:+.3e}, weight decay "
          f"{found.weight_decay:+.3e}, residual {found.residual:+.1e} of linear {found.linear:+.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
