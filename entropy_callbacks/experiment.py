"""Controlled one-step experiments from one training state (``entropy-callbacks probe``).

For each trial k the module and optimizer are restored to the checkpointed state, a fresh
update batch U is drawn (seeded by k), one real optimizer step is taken, and ΔH is predicted
and measured on the same E at every scale of a sweep. The module is restored exactly between
trials, so trials differ only by U.

The module must provide ``update_batch(seed)`` (draw U) and ``policy_loss(U) -> (loss, stats)``;
``entropy_callbacks.toy.GRPOModule`` is the reference.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch

from .attribution import attribute_delta_h
from .engine import (measure_delta_h, measurement_terms, predict_delta_h, prediction_terms, summarize_measurement,
                     summarize_prediction)
from .rollout_attribution import (attribution_record, chosen_for_leave_one_out, fit_line, module_update_losses,
                                  rollout_info, supports_attribution)
from .precision import resolve_precision
from .model_guard import preserved_rng
from .policy import resolve_policy, sampling_mismatch, special_tokens
from .reporting import SMALL_G, small_g_message
from .prompts import load_prompts, tokenize_prompts
from .sampling import DecodeOptions, ProbeBatch, SamplingConfig, sample_batch
from .step import snapshot, step_delta, step_norm
from .step_probe import DEFAULT_DEFENSIVE, ProbeOptions, check_sampled


@dataclass
class ProbeExperiment:
    """Options of a standalone probe experiment.

    Args:
        prompts: held-out prompts for E (strings, token-id lists or a .txt/.jsonl path);
            None: the module's ``held_out_items``.
        chat_template: format string prompts with the tokenizer's chat template (None: as the
            module's own ``chat_template`` hyperparameter, else no).
        sampling: how E is sampled.
        trials: number of one-step trials (K).
        scales: step scales of the sweep.
        responses_per_prompt: R.
        order, normalize, estimator, microbatch_size, precision, defensive, control_variates, decode,
            sampler: as for EntropyProbe (``sampler`` draws E from your own rollout engine, e.g.
            ``entropy_callbacks.hf_sampler.HFGenerateSampler``).
        attribution: when the module defines ``entropy_probe_losses(U)`` (per-rollout losses
            summing to its loss), split each trial's linear prediction among U's rollouts
            (docs/method.md §6) and keep the ``attribution_top_k`` largest with their text;
            ``attribution_se`` adds each a_u's jackknife SE over E's prompt groups (G + 1 more
            JVPs over U per trial).
        leave_one_out: in trial 0, retake the step without this many rollouts and compare the
            effect with a_u (Pearson r and slope in results.json); 0: off.
        lr: the learning rate of every trial's step (None: the optimizer's, as checkpointed).
            Probing one state at lr 1e-6…1e-4 shows what a realistic step does to entropy.
        seed: E and the trials' update batches derive from it.
        output_root: a timestamped directory is made under it.
    """

    prompts: Union[str, list[str], list[list[int]], None] = None
    chat_template: bool | None = None
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=3))
    trials: int = 8
    scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    responses_per_prompt: int = 8
    order: int = 2
    normalize: Literal["token", "sequence"] = "token"
    estimator: Literal["rb", "naive"] = "rb"
    microbatch_size: int | None = 64
    precision: Literal["auto", "float64", "float32", "model"] = "auto"
    defensive: float = DEFAULT_DEFENSIVE
    control_variates: bool = False
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    sampler: Optional[Callable[..., ProbeBatch]] = None
    attribution: bool = True
    attribution_top_k: int = 5
    attribution_se: bool = False
    leave_one_out: int = 8
    lr: float | None = None
    seed: int = 0
    output_root: str = "runs/probe"

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"experiment.trials must be >= 1, got {self.trials}")
        for name in ("attribution_top_k", "leave_one_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"experiment.{name} must be an integer >= 0, got {value!r}")
        if self.leave_one_out == 1:
            raise ValueError("experiment.leave_one_out must be 0 (off) or >= 2: a correlation needs two rollouts")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"experiment.lr must be a positive number or null, got {self.lr!r}")
        # Reuse the callback's validation of the shared options.
        ProbeOptions(sampling=self.sampling, responses_per_prompt=self.responses_per_prompt, order=self.order,
                     scales=tuple(self.scales), normalize=self.normalize, estimator=self.estimator,
                     microbatch_size=self.microbatch_size, seed=self.seed, precision=self.precision,
                     defensive=self.defensive, control_variates=self.control_variates, decode=self.decode)
        if self.sampler is not None and not callable(self.sampler):
            raise ValueError(f"experiment.sampler must be callable (model, prompts, config, *, responses_per_prompt, "
                             f"seed) -> ProbeBatch, got {type(self.sampler).__name__}")


def trial_seed(seed: int, trial: int) -> int:
    digest = hashlib.blake2b(f"probe-trial/{seed}/{trial}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def _optimizer(module) -> torch.optim.Optimizer:
    config = module.configure_optimizers()
    if isinstance(config, torch.optim.Optimizer):
        return config
    if isinstance(config, dict):
        return config["optimizer"]
    if isinstance(config, (list, tuple)):
        first = config[0]
        return first[0] if isinstance(first, (list, tuple)) else first
    raise ValueError("configure_optimizers() must return an optimizer, a dict with 'optimizer', or a list")


def log_log_fit(scales: list[float], deltas: list[float]) -> tuple[float, float]:
    """Slope and R² of log|ΔH| against log s (1 means linear, 2 quadratic)."""
    points = [(math.log(s), math.log(abs(d))) for s, d in zip(scales, deltas) if d != 0 and math.isfinite(d)]
    if len(points) < 2:
        return math.nan, math.nan
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    xc, yc = x - x.mean(), y - y.mean()
    slope = float((xc * yc).sum() / (xc * xc).sum())
    total = float((yc * yc).sum())
    residual = float(((yc - slope * xc) ** 2).sum())
    return slope, (1 - residual / total) if total > 0 else math.nan


def _relative_error(predicted: float | None, measured: float) -> float:
    if predicted is None or measured == 0:
        return math.nan
    return abs(predicted - measured) / abs(measured)


def _take_step(module, optimizer, update, seed: int, without: int | None = None):
    """One optimizer step on U (without rollout ``without``: its per-rollout loss left out)."""
    torch.manual_seed(seed)  # dropout in the update pass is part of the trial's randomness
    module.train()
    optimizer.zero_grad(set_to_none=True)
    if without is None:
        loss, stats = module.policy_loss(update)
    else:
        losses = module.entropy_probe_losses(update)
        keep = torch.ones_like(losses)
        keep[without] = 0.0
        loss, stats = (losses * keep).sum(), {}
    loss.backward()
    optimizer.step()
    return loss, stats


def run_trial(module, policy, optimizer, batch_e, experiment: ProbeExperiment, trial: int) -> dict:
    """One trial: one optimizer step on a fresh U, then predict and measure ΔH on E, and (when
    the module defines ``entropy_probe_losses``) attribute the prediction to U's rollouts."""
    seed = trial_seed(experiment.seed, trial)
    before = snapshot(policy)
    update = module.update_batch(seed)
    loss, stats = _take_step(module, optimizer, update, seed)
    delta = step_delta(policy, before)
    kwargs = dict(estimator=experiment.estimator, microbatch_size=experiment.microbatch_size,
                  precision=resolve_precision(experiment.precision, policy))
    # As the callback: the prediction's pass gives the controls and stands in for a θ₀ pass.
    derivatives = prediction_terms(policy, batch_e, before, delta, order=experiment.order, **kwargs)
    values = measurement_terms(policy, batch_e, before, delta, scales=experiment.scales, origin=derivatives,
                               **kwargs)
    controlled = experiment.control_variates
    prediction = summarize_prediction(derivatives, experiment.normalize, controlled)
    measurement = summarize_measurement(values, experiment.scales, experiment.normalize,
                                        controls=derivatives.controls if controlled else None)
    per_scale = []
    for k, scale in enumerate(measurement.scales):
        linear, quadratic = prediction.at_scale(scale)
        per_scale.append({
            "scale": scale, "measured": measurement.delta[k], "measured_se": measurement.delta_se[k],
            "measured_floor": measurement.delta_floor,
            "linear": linear, "quadratic": quadratic,
            "linear_relative_error": _relative_error(linear, measurement.delta[k]),
            "quadratic_relative_error": _relative_error(quadratic, measurement.delta[k]),
            "ess_fraction": measurement.ess_fraction[k], "outside_support": measurement.outside_support[k],
            "measured_usable": measurement.usable[k],
        })
    slope, r2 = log_log_fit(list(measurement.scales), measurement.delta)
    attribution = None
    if experiment.attribution and supports_attribution(module):
        # Right after the step: the optimizer's .grad and state are the ones it applied.
        found = attribute_delta_h(policy, batch_e, before, optimizer, module_update_losses(module, policy, update),
                                  normalize=experiment.normalize, estimator=experiment.estimator,
                                  microbatch_size=experiment.microbatch_size, precision=experiment.precision,
                                  standard_errors=experiment.attribution_se)
        attribution = attribution_record(found, rollout_info(module, [update]), experiment.attribution_top_k)
    return {
        "trial": trial, "seed": seed, "loss": float(loss.detach()),
        "reward": float(stats.get("reward", math.nan)),
        "step_norm": step_norm(delta), "entropy_before": measurement.entropy_before,
        "entropy_before_se": measurement.entropy_before_se, "linear": prediction.linear,
        "linear_se": prediction.linear_se, "curvature": prediction.curvature,
        "control_variates": measurement.control_variates,
        "loglog_slope": slope, "loglog_r2": r2, "per_scale": per_scale, "attribution": attribution,
    }


def leave_one_out(module, policy, optimizer, batch_e, experiment: ProbeExperiment, record: dict, restore) -> dict:
    """Retake trial ``record``'s step without each of ``experiment.leave_one_out`` rollouts (spread
    over the ranks of a_u) and compare the change of the linear prediction and of the measured ΔH
    (no control variates: both sides on the same footing) with a_u and, for Adam, with the
    exact-Jacobian influence. Ends with the module and optimizer restored."""
    a = record["attribution"]["per_rollout"]["a"]
    jacobian = record["attribution"]["per_rollout"].get("a_jacobian")
    kwargs = dict(normalize=experiment.normalize, estimator=experiment.estimator,
                  microbatch_size=experiment.microbatch_size, precision=experiment.precision)

    def step(without: int | None) -> tuple[float, float]:
        restore()
        before = snapshot(policy)
        _take_step(module, optimizer, module.update_batch(record["seed"]), record["seed"], without)
        delta = step_delta(policy, before)
        linear = predict_delta_h(policy, batch_e, before, delta, order=1, control_variates=False, **kwargs).linear
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the full trial has warned already
            measured = measure_delta_h(policy, batch_e, before, delta, **kwargs).delta[0]
        return linear, measured

    try:
        full = step(None)
        chosen = chosen_for_leave_one_out(a, experiment.leave_one_out)
        effects = [tuple(f - w for f, w in zip(full, step(u))) for u in chosen]
    finally:
        restore()
    out = {"rollouts": chosen, "a": [a[u] for u in chosen],
           "linear_effect": [e[0] for e in effects], "measured_effect": [e[1] for e in effects]}
    fits = {"a_vs_linear_effect": fit_line(out["a"], out["linear_effect"]),
            "a_vs_measured_effect": fit_line(out["a"], out["measured_effect"])}
    if jacobian is not None:
        out["a_jacobian"] = [jacobian[u] for u in chosen]
        fits["a_jacobian_vs_linear_effect"] = fit_line(out["a_jacobian"], out["linear_effect"])
        fits["a_jacobian_vs_measured_effect"] = fit_line(out["a_jacobian"], out["measured_effect"])
    out["fits"] = fits
    return out


def _mean_se(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    t = torch.tensor(finite, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(len(finite))) if len(finite) > 1 else math.nan
    return float(t.mean()), se


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])


def aggregate(trials: list[dict], scales: list[float]) -> dict:
    """Means over trials with their standard errors (across trials).

    The aggregate relative errors compare the mean predictions with the mean measured ΔH, and the
    aggregate log-log slope is fitted to the mean measured ΔH: a mean of per-trial ratios is
    dominated by any trial whose measured ΔH happens to be near 0 (their medians are kept too).
    """
    out = {"num_trials": len(trials), "per_scale": []}
    for k, scale in enumerate(scales):
        row = {"scale": scale}
        for name in ("measured", "measured_se", "linear", "quadratic", "ess_fraction", "outside_support"):
            mean, se = _mean_se([t["per_scale"][k][name] for t in trials])
            row[name] = mean
            row[f"{name}_across_trials_se"] = se
        for order in ("linear", "quadratic"):
            predicted = row[order] if math.isfinite(row[order]) else None
            row[f"{order}_relative_error"] = _relative_error(predicted, row["measured"])
            row[f"{order}_relative_error_trial_median"] = _median(
                [t["per_scale"][k][f"{order}_relative_error"] for t in trials])
        out["per_scale"].append(row)
    for name in ("linear", "curvature", "step_norm", "entropy_before"):
        mean, se = _mean_se([t[name] for t in trials])
        out[name] = mean
        out[f"{name}_across_trials_se"] = se
    out["loglog_slope"], out["loglog_r2"] = log_log_fit(list(scales), [row["measured"] for row in out["per_scale"]])
    for name in ("loglog_slope", "loglog_r2"):
        mean, se = _mean_se([t[name] for t in trials])
        out[f"{name}_trial_mean"] = mean
        out[f"{name}_trial_mean_se"] = se
    return out


def _output_dir(root: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(root) / stamp, 1
    while path.exists():
        path, n = Path(root) / f"{stamp}-{n}", n + 1
    path.mkdir(parents=True)
    return path


def load_training_state(module, optimizer, ckpt_path: str | None) -> None:
    if ckpt_path is None:
        return
    if not Path(ckpt_path).is_file():
        raise ValueError(f"ckpt_path {ckpt_path!r} does not exist")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path {ckpt_path!r} is not a Lightning checkpoint (it has no 'state_dict')")
    _warn_on_hparam_mismatch(module, checkpoint.get("hyper_parameters") or {}, ckpt_path)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"the checkpoint {ckpt_path!r} does not fit the configured model; set `model:` to the "
                         f"module config of the run that wrote it (its config.yaml / hparams.yaml).\n{error}") from None
    states = checkpoint.get("optimizer_states") or []
    if states:
        try:
            optimizer.load_state_dict(states[0])
        except ValueError as error:
            raise ValueError(f"the optimizer state in {ckpt_path!r} does not fit the model's optimizer "
                             f"(configure_optimizers): {error}") from None


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _warn_on_hparam_mismatch(module, saved: dict, ckpt_path: str) -> None:
    """The probe rebuilds the module from its config, not from the checkpoint: say so when the two
    differ (a different lr or sampling would probe a different step than training took)."""
    current = getattr(module, "hparams", None) or {}
    differ = [f"{name}: checkpoint {_plain(saved[name])!r}, config {_plain(current[name])!r}"
              for name in current if name in saved and not name.startswith("_")
              and _plain(saved[name]) != _plain(current[name])]
    if differ:
        warnings.warn(f"the model config differs from the hyperparameters saved in {ckpt_path!r}: "
                      + "; ".join(differ), stacklevel=3)


def run_experiment(module, experiment: ProbeExperiment, ckpt_path: str | None = None,
                   config_text: str | None = None, progress: bool = True) -> Path:
    """Run the K trials; returns the output directory."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    policy = resolve_policy(module, None, owner="entropy-callbacks probe")
    optimizer = _optimizer(module)
    load_training_state(module, optimizer, ckpt_path)
    if experiment.lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = experiment.lr
    tokenizer = getattr(module, "tokenizer", None)
    if experiment.prompts is None:
        held_out = getattr(module, "held_out_items", None)
        if not held_out:
            raise ValueError("experiment.prompts is not set and the module has no held_out_items; give prompts")
        prompts = [item.prompt for item in held_out]
    else:
        prompts = load_prompts(experiment.prompts)
    chat_template = experiment.chat_template
    if chat_template is None:
        chat_template = bool(module.hparams.get("chat_template", False))
    prompt_ids = tokenize_prompts(prompts, tokenizer, chat_template)
    mismatch = sampling_mismatch(policy, experiment.sampling)
    if mismatch:
        warnings.warn(f"entropy-callbacks probe: {mismatch}", UserWarning, stacklevel=2)
    if len(prompt_ids) < SMALL_G:
        warnings.warn(small_g_message("entropy-callbacks probe", len(prompt_ids)), UserWarning, stacklevel=2)
    eos, pad = special_tokens(policy, tokenizer)

    out = _output_dir(experiment.output_root)
    if config_text is not None:
        (out / "config.yaml").write_text(config_text)
    module_state = copy.deepcopy(module.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    with preserved_rng():
        seed = trial_seed(experiment.seed, -1)
        if experiment.sampler is None:
            batch_e = sample_batch(policy, prompt_ids, experiment.sampling, eos_token_id=eos, pad_token_id=pad,
                                   responses_per_prompt=experiment.responses_per_prompt, seed=seed,
                                   batch_size=experiment.microbatch_size, defensive=experiment.defensive,
                                   decode=experiment.decode)
        else:
            batch_e = check_sampled(experiment.sampler(policy, prompt_ids, experiment.sampling,
                                                       responses_per_prompt=experiment.responses_per_prompt, seed=seed),
                                    experiment.sampling, len(prompt_ids), experiment.responses_per_prompt)
    plan = {"ckpt_path": ckpt_path, "trials": experiment.trials, "scales": list(experiment.scales),
            "trial_seeds": [trial_seed(experiment.seed, k) for k in range(experiment.trials)],
            "num_prompts": len(prompt_ids), "responses_per_prompt": experiment.responses_per_prompt,
            "num_sequences": len(batch_e), "num_tokens": int(batch_e.response_lengths.sum()),
            "experiment": asdict(experiment)}
    (out / "plan.json").write_text(json.dumps(plan, indent=2, default=str))

    writer = SummaryWriter(str(out))
    trials = []
    with preserved_rng(), (out / "trials.jsonl").open("w") as lines:
        for trial in tqdm(range(experiment.trials), desc="probe trials", disable=not progress):
            try:
                record = run_trial(module, policy, optimizer, batch_e, experiment, trial)
            finally:
                module.load_state_dict(module_state)
                optimizer.load_state_dict(copy.deepcopy(optimizer_state))
            trials.append(record)
            lines.write(_json(record) + "\n")
            for row in record["per_scale"]:
                tag = f"{row['scale']:g}"
                writer.add_scalar(f"probe/measured@{tag}", row["measured"], trial)
                writer.add_scalar(f"probe/linear@{tag}", row["linear"], trial)
                if row["quadratic"] is not None:
                    writer.add_scalar(f"probe/quadratic@{tag}", row["quadratic"], trial)
    results = {"trials": trials, "aggregate": aggregate(trials, list(experiment.scales))}
    first = trials[0].get("attribution")
    if experiment.leave_one_out and first is not None and "per_rollout" in first:
        def restore():
            module.load_state_dict(module_state)
            optimizer.load_state_dict(copy.deepcopy(optimizer_state))

        with preserved_rng():
            results["leave_one_out"] = leave_one_out(module, policy, optimizer, batch_e, experiment, trials[0],
                                                     restore)
    _report_by_scale(writer, out, results["aggregate"])
    writer.close()
    (out / "results.json").write_text(_json(results, indent=2))
    return out


def _report_by_scale(writer, out: Path, summary: dict) -> None:
    """ΔH against the step scale: a log–log picture (PNG and TensorBoard) and custom-scalar
    charts whose x axis is the scale's index in the sweep (TensorBoard steps are integers)."""
    from .figures import save, scale_figure

    rows = summary["per_scale"]
    column = lambda name: [row[name] for row in rows]  # noqa: E731
    quadratic = [q if math.isfinite(q) else None for q in column("quadratic")]
    save(scale_figure(column("scale"), column("measured"), column("measured_across_trials_se"), column("linear"),
                      quadratic), out / "delta_vs_scale.png")
    writer.add_figure("probe/delta_vs_scale", scale_figure(column("scale"), column("measured"),
                                                           column("measured_across_trials_se"), column("linear"),
                                                           quadratic), 0)
    for index, row in enumerate(rows):
        for name in ("measured", "linear", "quadratic"):
            if math.isfinite(row[name]):
                writer.add_scalar(f"probe/by_scale/{name}", row[name], index)
        writer.add_scalar("probe/by_scale/scale", row["scale"], index)
    names = ("measured", "linear") + (("quadratic",) if all(q is not None for q in quadratic) else ())
    writer.add_custom_scalars({"probe": {
        "mean ΔH over trials by scale index (probe/by_scale/scale gives each index's scale)":
            ["Multiline", [f"^probe/by_scale/{name}$" for name in names]]}})


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _json(value, **kwargs) -> str:
    """Strict JSON: a number that is undefined (NaN, e.g. a slope from one scale) is written as null."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


def results_table(results: dict) -> str:
    def number(value, spec: str) -> str:
        # "—" where there is no number (no quadratic at order 1, no slope from one scale).
        if value is None or not math.isfinite(value):
            width = re.match(r"[<>^]?(\d*)", spec).group(1)
            return format("—", f">{width}")
        return format(value, spec)

    agg = results["aggregate"]
    lines = [f"{'scale':>6} {'measured ΔH':>13} {'± SE':>10} {'linear':>12} {'quadratic':>12} "
             f"{'rel.err lin':>11} {'rel.err quad':>12} {'ESS':>6}"]
    for row in agg["per_scale"]:
        lines.append(f"{row['scale']:>6g} {number(row['measured'], '>13.4e')} {number(row['measured_se'], '>10.2e')} "
                     f"{number(row['linear'], '>12.4e')} {number(row['quadratic'], '>12.4e')} "
                     f"{number(row['linear_relative_error'], '>11.3f')} "
                     f"{number(row['quadratic_relative_error'], '>12.3f')} {number(row['ess_fraction'], '>6.3f')}")
    lines.append(f"log|ΔH| vs log s: slope {number(agg['loglog_slope'], '.3f')}, "
                 f"R² {number(agg['loglog_r2'], '.3f')}")
    check = results.get("leave_one_out")
    if check is not None:
        fits = check["fits"]
        line = (f"attribution vs leave-one-out ({len(check['rollouts'])} rollouts of trial 0): linear effect "
                f"r {number(fits['a_vs_linear_effect']['pearson_r'], '.3f')}, measured effect r "
                f"{number(fits['a_vs_measured_effect']['pearson_r'], '.3f')}")
        if "a_jacobian_vs_linear_effect" in fits:
            line += (f"; with Adam's v_t (Jacobian): r {number(fits['a_jacobian_vs_linear_effect']['pearson_r'], '.3f')}"
                     f", slope {number(fits['a_jacobian_vs_linear_effect']['slope'], '.3f')} (v_t fixed: slope "
                     f"{number(fits['a_vs_linear_effect']['slope'], '.3f')})")
        lines.append(line)
    return "\n".join(lines)
