"""Attribution of a probed step to its rollouts, for ``entropy-callbacks probe`` (docs/method.md §6).

A module opts in by defining ``entropy_probe_losses(U) -> Tensor[n]``: the per-rollout losses
of its update batch, summing to the loss it trains on. This file turns those into the
``update_losses`` of ``attribute_delta_h`` and writes the per-rollout record (a_u, and what the
module's optional ``entropy_probe_rollouts(U)`` says of each rollout: text, reward, advantage,
log-prob, length); ``experiment.leave_one_out`` checks it against the step retaken without
rollout u.
"""

from __future__ import annotations

import math
import torch

from .attribution import UpdateLosses
from .layerwise import parameters_at
from .results import Attribution

PROTOCOL = "entropy_probe_losses"


def supports_attribution(module) -> bool:
    return callable(getattr(module, PROTOCOL, None))


def module_update_losses(module, policy: torch.nn.Module, update) -> UpdateLosses:
    """``update_losses(params)``: the module's per-rollout losses of ``update`` with the policy's
    parameters replaced by ``params`` (placed layer by layer, as the probe's own passes)."""
    def losses(params):
        with parameters_at(policy, lambda name, p: params.get(name, p)):
            return getattr(module, PROTOCOL)(update)
    return losses


INFO = "entropy_probe_rollouts"  # optional: text, reward, advantage, log_prob, length per sample


def rollout_info(module, batches: list) -> dict[str, list] | None:
    """The module's ``entropy_probe_rollouts`` over the step's micro-batches, concatenated; None
    when it has none."""
    if not callable(getattr(module, INFO, None)):
        return None
    parts = [getattr(module, INFO)(batch) for batch in batches]
    return {key: [v for part in parts for v in part[key]] for key in parts[0]}


def top_rows(attribution: Attribution, info: dict[str, list] | None, top_k: int) -> list[dict]:
    """The ``top_k`` samples by |a_u|, with a_u's SE and share, and what ``info`` says of each."""
    a, se = attribution.per_sample.tolist(), attribution.per_sample_se
    value = lambda name, u: info[name][u] if info is not None and name in info else None  # noqa: E731
    order = sorted(range(len(a)), key=lambda u: -abs(a[u]))[:top_k]
    return [{"rollout": u, "a": a[u], "a_se": math.nan if se is None else float(se[u]),
             "share": a[u] / attribution.linear if attribution.linear else math.nan,
             **{name: value(name, u) for name in ("text", "reward", "advantage", "length")}} for u in order]


def attribution_record(attribution: Attribution, info: dict[str, list] | None, top_k: int) -> dict:
    """What results.json keeps of one trial's attribution."""
    out = {"linear": attribution.linear, "momentum": attribution.momentum,
           "weight_decay": attribution.weight_decay, "residual": attribution.residual,
           "clip_factor": attribution.clip_factor, "note": attribution.note}
    if attribution.per_sample is None:
        return out
    per_rollout = {"a": attribution.per_sample.tolist()}
    if attribution.per_sample_jacobian is not None:
        per_rollout["a_jacobian"] = attribution.per_sample_jacobian.tolist()
    if attribution.per_sample_se is not None:
        per_rollout["a_se"] = attribution.per_sample_se.tolist()
    for name in ("reward", "advantage", "length"):
        if info is not None and name in info:
            per_rollout[name] = info[name]
    out["per_rollout"] = per_rollout
    out["top"] = top_rows(attribution, info, top_k)
    return out


def chosen_for_leave_one_out(a: list[float], count: int) -> list[int]:
    """``count`` rollouts spread evenly over the ranks of a_u (not only the largest: a
    correlation over the top few alone would overstate agreement)."""
    order = sorted(range(len(a)), key=lambda u: a[u])
    if count >= len(order):
        return order
    return [order[round(k * (len(order) - 1) / (count - 1))] for k in range(count)] if count > 1 else [order[-1]]


def fit_line(x: list[float], y: list[float]) -> dict:
    """Pearson r and the least-squares slope of y on x."""
    tx, ty = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    if len(x) < 2 or float(tx.std()) == 0 or float(ty.std()) == 0:
        return {"pearson_r": math.nan, "slope": math.nan}
    xc, yc = tx - tx.mean(), ty - ty.mean()
    return {"pearson_r": float((xc * yc).sum() / (xc.norm() * yc.norm())), "slope": float((xc * yc).sum() / (xc * xc).sum())}


def concatenated_losses(module, policy: torch.nn.Module, batches: list) -> UpdateLosses:
    """``update_losses`` over the step's micro-batches (gradient accumulation): their per-sample
    losses, concatenated in order."""
    parts = [module_update_losses(module, policy, batch) for batch in batches]
    return lambda params: torch.cat([part(params) for part in parts])


def cui_proxy(log_prob: list[float], advantage: list[float], lr: float) -> torch.Tensor:
    """Cui et al.'s per-rollout covariance proxy of the entropy change: −lr·(log π_u − mean)(A_u − mean)/n,
    whose sum is −lr·Cov(log π, A)."""
    lp, adv = torch.tensor(log_prob, dtype=torch.float64), torch.tensor(advantage, dtype=torch.float64)
    return -lr * (lp - lp.mean()) * (adv - adv.mean()) / len(lp)


def record_fields(attribution: Attribution, info: dict | None, lr: float, top_k: int) -> dict:
    """The ProbeRecord fields of one step's attribution (``info``: the module's
    ``rollout_info``, or None)."""
    fields = {"attribution_linear": attribution.linear, "attribution_momentum": attribution.momentum,
              "attribution_weight_decay": attribution.weight_decay, "attribution_residual": attribution.residual}
    if attribution.per_sample is None:
        return fields
    a = attribution.per_sample.tolist()
    fields["rollout_a"] = a
    if attribution.per_sample_jacobian is not None:
        fields["rollout_a_jacobian"] = attribution.per_sample_jacobian.tolist()
    fields["top_rollouts"] = top_rows(attribution, info, top_k)
    if info is not None and "log_prob" in info and "advantage" in info and math.isfinite(lr):
        fields["cui_pearson"] = fit_line(cui_proxy(info["log_prob"], info["advantage"], lr).tolist(), a)["pearson_r"]
    return fields
