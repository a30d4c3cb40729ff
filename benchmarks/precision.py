"""Accuracy and cost of the precision policies at the learning rates people train with.

Run:  .venv/bin/python benchmarks/precision.py [--device cpu|cuda] [--tf32 off|on|both] ...

On a Qwen2/Llama-style model with random weights (default: hidden 256, 4 layers, vocab 4096)
and E = 12 prompts × 4 responses × 24 tokens, for each model setting

- fp32           full fine-tuning, fp32 weights
- bf16+LoRA      bf16 base, fp32 LoRA adapters (r 8 on q/v/o)
- bf16-mixed     fp32 weights, the probe called inside a bf16 autocast region (as the training
                 step runs under Lightning's "bf16-mixed")

and each lr in 1e-6, 1e-5, 1e-4 — a step in which every trainable coordinate moves by ±lr, the
size of a first AdamW step — it prints, against a float64 reference (a float64 copy of the same
weights, same E, same step): the relative error of the measured ΔH, of the linear prediction
and of Ĥ, the rounding floor the probe reports (as a multiple of the actual error: ≥ 1 means
it bounds it), and the cost of ``measure_delta_h`` and ``predict_delta_h(order=1)`` as a
multiple of one no-grad forward of E by the model as it is (under autocast for bf16-mixed).

Policies: ``model``, ``float32``, ``float64`` and ``auto`` (the default), and design (b) of
docs/method.md: the difference-free measurement g(1) − g(0) = ∫₀¹ g′(u) du by n-node
Gauss–Legendre quadrature of JVPs at θ₀ + uΔθ, with the SNIS log-weights S_i(1) − S_i(0)
integrated the same way (no difference of two large numbers anywhere), in the model's own
dtype ("quad-n model") and in float32 ("quad-n float32").

Timing: median over ``--repeats`` of (operation time / mean of the forwards timed around it).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import add_run_arguments, check_run_arguments, prepare, timer  # noqa: E402
from entropy_callbacks import SamplingConfig, measure_delta_h, predict_delta_h, sample_batch  # noqa: E402
from entropy_callbacks import estimators  # noqa: E402
from entropy_callbacks.model_guard import forward_kwargs, probe_mode  # noqa: E402
from entropy_callbacks.precision import pass_numerics  # noqa: E402
from entropy_callbacks.scoring import score_derivatives  # noqa: E402

SETTINGS = ("fp32", "bf16+LoRA", "bf16-mixed")
LRS = (1e-6, 1e-5, 1e-4)
POLICIES = ("model", "float32", "float64", "auto")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--responses", type=int, default=4)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nodes", type=int, nargs="*", default=[2, 3], help="Gauss-Legendre nodes of design (b)")
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--lrs", type=float, nargs="*", default=list(LRS))
    p.add_argument("--tf32", default="off", choices=("off", "on", "both"),
                   help="torch.set_float32_matmul_precision('high') outside the probe, as Lightning advises on GPUs")
    add_run_arguments(p, dtype=False)
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    return args


def build(setting: str, args) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=max(1, args.heads // 2), max_position_embeddings=args.tokens + 64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # initialise where it runs (a 1.5B model takes a minute on a CPU)
        model = AutoModelForCausalLM.from_config(config).eval()
    if setting == "bf16+LoRA":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model.to(torch.bfloat16),
                               LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                          target_modules=["q_proj", "v_proj", "o_proj"]))
        gen = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():  # a trained adapter: B is not zero
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = (0.02 * torch.randn(p.shape, generator=gen)).to(p.device, torch.float32)
    return model


def sign_step(model, lr: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    base, delta = {}, {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            sign = (torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1).to(p.device)
            after = (p.detach().float() + lr * sign).to(p.dtype)
            base[name] = p.detach().clone()
            delta[name] = after.float() - p.detach().float()
    return base, delta


def reference(model, batch, base, delta):
    copy64 = copy.deepcopy(model).double()
    base64 = {n: t.double() for n, t in base.items()}
    delta64 = {n: t.double() for n, t in delta.items()}
    m = measure_delta_h(copy64, batch, base64, delta64, precision="model")
    p = predict_delta_h(copy64, batch, base64, delta64, order=1, precision="model")
    del copy64
    return m.entropy_before, m.delta[0], p.linear


def quadrature_delta(model, batch, base, delta, nodes: int, dtype) -> float:
    """Design (b): ΔH(1) from JVPs at the Gauss–Legendre nodes u_j of [0, 1], no differences.

    ΔS_i = Σ_j w_j S'_i(u_j), Δf_i = Σ_j w_j f'_i(u_j), ω_i = exp(ΔS_i) and, with g₀ = Ĥ(θ₀),
    ΔH = [Σ ω_i Δf_i + Σ (ω_i − 1)(f_i(0) − g₀ c_i)] / Σ ω_i c_i  (token normalisation).
    """
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(nodes)
    us, ws = (x + 1) / 2, w / 2
    d_log_prob = d_integrand = 0.0
    with probe_mode(model), pass_numerics(model, dtype):
        origin = score_derivatives(model, batch, base, delta, dtype, "rb", 1, at=0.0)
        for u, weight in zip(us, ws):
            node = score_derivatives(model, batch, base, delta, dtype, "rb", 1, at=float(u))
            d_log_prob = d_log_prob + weight * node.d_log_prob.double().cpu()
            d_integrand = d_integrand + weight * node.d_integrand.double().cpu()
    f0 = origin.integrand.double().cpu()
    c = estimators.normaliser(batch.response_lengths, "token")
    g0 = f0.sum() / c.sum()
    omega_minus_1 = torch.expm1(d_log_prob)
    omega = omega_minus_1 + 1
    return float(((omega * d_integrand).sum() + (omega_minus_1 * (f0 - g0 * c)).sum()) / (omega * c).sum())


def relative(value: float, truth: float) -> float:
    return abs(value - truth) / abs(truth) if truth else math.inf


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_code = prepare(args.threads, args.device)
    if exit_code is not None:
        return exit_code
    warnings.filterwarnings("ignore", message=".*below the estimated rounding error.*")
    tf32_modes = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.tf32]
    clock = timer(args.device, args.clock)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# precision policies — {device_name}, torch {torch.__version__}, Qwen2 h{args.hidden}×{args.layers}L "
          f"vocab {args.vocab}, E = {args.prompts}×{args.responses}×{args.tokens}, {args.repeats} repeats")
    print("| setting | TF32 outside | lr | policy | ΔH rel. err | floor / err | linear rel. err | Ĥ rel. err "
          "| measure × fwd | order 1 × fwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    prompts = [[3 + (11 * i + j) % (args.vocab - 3) for j in range(4 + i % 3)] for i in range(args.prompts)]
    config = SamplingConfig(max_new_tokens=args.tokens)
    for setting in args.settings:
        model = build(setting, args)
        batch = sample_batch(model, prompts, config, eos_token_id=2, pad_token_id=0,
                             responses_per_prompt=args.responses, seed=args.seed).to(args.device)
        autocast = (torch.autocast(args.device, dtype=torch.bfloat16) if setting == "bf16-mixed"
                    else torch.autocast(args.device, enabled=False))
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = forward_kwargs(model, batch.input_ids, batch.attention_mask, position_ids)

        def forward():
            with torch.no_grad(), autocast:
                model(**kwargs, use_cache=False)

        forward()
        for lr in args.lrs:
            base, delta = sign_step(model, lr, args.seed)
            entropy, truth, linear_truth = reference(model, batch, base, delta)
            for tf32 in tf32_modes:
                torch.set_float32_matmul_precision("high" if tf32 == "on" else "highest")
                rows = [(policy, lambda policy=policy: measure_delta_h(model, batch, base, delta, precision=policy),
                         lambda policy=policy: predict_delta_h(model, batch, base, delta, order=1,
                                                               precision=policy))
                        for policy in POLICIES]
                for n in args.nodes:
                    for dtype in (None, torch.float32):
                        rows.append((f"quad-{n} {'model' if dtype is None else 'float32'}",
                                     lambda n=n, dtype=dtype: quadrature_delta(model, batch, base, delta, n, dtype),
                                     None))
                for label, measure, predict in rows:
                    with autocast:
                        result = measure()
                        prediction = predict() if predict else None
                    times, ptimes = [], []
                    for _ in range(args.repeats):
                        unit = (clock(forward) + clock(forward)) / 2
                        with autocast:
                            times.append(clock(measure) / unit)
                            if predict:
                                ptimes.append(clock(predict) / unit)
                    measured = result if isinstance(result, float) else result.delta[0]
                    err = relative(measured, truth)
                    if isinstance(result, float):
                        floor, h_err = "—", "—"
                    else:
                        floor = f"{result.delta_floor / max(abs(measured - truth), 1e-300):.1e}" if measured != truth \
                            else "exact"
                        h_err = f"{relative(result.entropy_before, entropy):.0e}"
                    lin = f"{relative(prediction.linear, linear_truth):.1e}" if prediction else "—"
                    cost = f"{statistics.median(ptimes):.2f}" if ptimes else "—"
                    print(f"| {setting} | {tf32} | {lr:g} | {label} | {err:.1e} | {floor} | {lin} | {h_err} "
                          f"| {statistics.median(times):.2f} | {cost} |", flush=True)
        torch.set_float32_matmul_precision("highest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
