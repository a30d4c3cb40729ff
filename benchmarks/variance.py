"""Standard errors with and without score control variates (docs/method.md §5), side by side.

Run:  .venv/bin/python benchmarks/variance.py [--draws 4] [--threads 2]

Two settings, each probed as ``EntropyProbe`` probes (one derivative pass of order 2, one value
pass at θ₀ and one at θ₀ + Δθ), on several independent draws of E:

- toy      the default run's GRPOModule (``configs/toy_grpo.yaml``) after ``--toy-steps`` GRPO
           steps, one more real AdamW step as Δθ, E = its 20 held-out prompts x 8 responses
           of 3 tokens;
- llama    a random Llama h256 x 4 layers, vocab 32000, E = 16 prompts x 4 responses of 64
           tokens, Δθ = ``--step-size`` · N(0, 1).

For Ĥ, the measured ΔH, g′ and g″ it prints the ratio RMS SE(plain) / RMS SE(controlled) over
the draws (> 1: the control variates help), and the time the controls add to a probe: the
statistics with controls against the passes. The passes are run once per draw and both
summaries read the same per-sequence terms, so the two SEs differ only by the correction.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import prepare, random_llama, random_step  # noqa: E402
from entropy_callbacks import SamplingConfig, sample_batch  # noqa: E402
from entropy_callbacks.engine import (measurement_terms, prediction_terms, summarize_measurement,  # noqa: E402
                                      summarize_prediction)
from entropy_callbacks.precision import resolve_precision  # noqa: E402

QUANTITIES = ("entropy", "measured ΔH", "g′", "g″")


@dataclass
class Setting:
    name: str
    model: torch.nn.Module
    base: dict
    delta: dict
    prompts: list[list[int]]
    config: SamplingConfig
    responses: int
    eos: int | list[int]
    pad: int


def toy_setting(args) -> Setting:
    import yaml

    from entropy_callbacks.toy import GRPOModule

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "configs/toy_grpo.yaml").read_text())
    init = config["model"]["init_args"]
    init["sampling"] = SamplingConfig(**init["sampling"])
    module = GRPOModule(**init)
    optimizer = module.configure_optimizers()
    for step in range(args.toy_steps + 1):
        if step == args.toy_steps:
            base = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
        loss, _ = module.policy_loss(module.update_batch(seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    delta = {n: p.detach() - base[n] for n, p in module.policy.named_parameters()}
    probe = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EntropyProbe"))["init_args"]
    prompts = [module._encode(p) for p in probe["prompts"]]
    return Setting("toy", module.policy.eval(), base, delta, prompts, SamplingConfig(**probe["sampling"]),
                   probe["responses_per_prompt"], module.tokenizer.eos_token_id, module.tokenizer.pad_token_id)


def llama_setting(args) -> Setting:
    model = random_llama(vocab=32000, hidden=256, layers=4, heads=4, max_positions=16 + 64, seed=args.seed)
    base, delta = random_step(model, args.step_size, args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, 32000, (16 - i % 3,), generator=gen).tolist() for i in range(16)]
    # EOS = 2 can be sampled: lengths vary, as in real responses.
    return Setting("llama", model, base, delta, prompts, SamplingConfig(max_new_tokens=64), 4, 2, 0)


def probe_ses(setting: Setting, seed: int) -> tuple[dict, dict, float, float]:
    """SEs without and with controls on one draw of E; seconds of the passes and of the controls."""
    batch = sample_batch(setting.model, setting.prompts, setting.config, eos_token_id=setting.eos,
                         pad_token_id=setting.pad, responses_per_prompt=setting.responses, seed=seed)
    precision = resolve_precision("auto", setting.model)
    start = time.perf_counter()
    prediction = prediction_terms(setting.model, batch, setting.base, setting.delta, order=2, estimator="rb",
                                  microbatch_size=64, precision=precision)
    measurement = measurement_terms(setting.model, batch, setting.base, setting.delta, scales=(1.0,),
                                    estimator="rb", microbatch_size=64, precision=precision, origin=prediction)
    passes = time.perf_counter() - start
    ses, extra = {}, 0.0
    for controlled in (False, True):
        start = time.perf_counter()
        predicted = summarize_prediction(prediction, "token", control_variates=controlled)
        measured = summarize_measurement(measurement, (1.0,), "token", warn=False,
                                         controls=prediction.controls if controlled else None)
        spent = time.perf_counter() - start
        extra += spent if controlled else -spent
        ses[controlled] = dict(zip(QUANTITIES, (measured.entropy_before_se, measured.delta_se[0],
                                                predicted.linear_se, predicted.curvature_se)))
    return ses[False], ses[True], passes, extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draws", type=int, default=4, help="independent draws of E per setting")
    p.add_argument("--toy-steps", type=int, default=60, help="GRPO steps before the probed step (toy)")
    p.add_argument("--step-size", type=float, default=1e-4, help="llama: Δθ = step_size · N(0, 1)")
    p.add_argument("--settings", default="toy,llama")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    prepare(args.threads, "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.draws} draws of E per setting")
    print(f"{'setting':8} " + " ".join(f"{q:>14}" for q in QUANTITIES) + "   controls' time / passes")
    for name in args.settings.split(","):
        torch.manual_seed(args.seed)
        setting = {"toy": toy_setting, "llama": llama_setting}[name](args)
        plain, controlled, passes, extra = {q: [] for q in QUANTITIES}, {q: [] for q in QUANTITIES}, 0.0, 0.0
        for draw in range(args.draws):
            without, with_, spent, added = probe_ses(setting, seed=1000 + draw)
            for q in QUANTITIES:
                plain[q].append(without[q])
                controlled[q].append(with_[q])
            passes, extra = passes + spent, extra + added
        rms = lambda xs: math.sqrt(sum(x * x for x in xs) / len(xs))  # noqa: E731
        ratios = [rms(plain[q]) / rms(controlled[q]) for q in QUANTITIES]
        print(f"{name:8} " + " ".join(f"{r:>13.2f}x" for r in ratios) + f"   {100 * extra / passes:+.1f} %",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
