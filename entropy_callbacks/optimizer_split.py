r"""A torch optimizer's last step, split into what is linear in the gradient and the rest.

With the optimizer state after the step held fixed (Adam's second moment v_t, a step count),
the step of each parameter is

    Δθ = γ ⊙ g + momentum + weight decay        (docs/method.md §6, Attribution)

with g the gradient applied (``.grad``: after clipping and unscaling), γ an elementwise gain,
"momentum" the part carried over from earlier steps and "weight decay" the part from θ₀.
Read back from the state the optimizer left, for torch's semantics:

- **Adam / AdamW** (``amsgrad`` and ``maximize`` off): m_t = β1 m_{t−1} + (1−β1) g',
  P = 1 / (√(v_t / bc2) + ε), Δθ = −lr P m_t / bc1 (− lr λ θ₀ for AdamW), with bc_k = 1 − β_k^t
  and g' = g (AdamW) or g + λθ₀ (Adam's L2 decay). So γ = −lr (1−β1) P / bc1 and
  momentum = −lr P (m_t − (1−β1) g') / bc1, i.e. −lr β1 P m_{t−1} / bc1.
- **SGD** (``maximize`` off): d = g + λθ₀, b_t = μ b_{t−1} + k d (k = 1 − dampening; k = 1 at the
  first step, where torch starts the buffer at d), Δθ = −lr b_t, or −lr (d + μ b_t) with Nesterov.
  So γ = −lr k (−lr (1 + μk) with Nesterov) and momentum = −lr (b_t − k d) (times μ with Nesterov).

Other optimizers have no such split here (``split_step`` returns None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor


@dataclass
class StepSplit:
    """Per parameter name: the gain γ (elementwise or scalar), the applied gradient g, and the
    momentum and weight-decay parts of Δθ (float64 tensors)."""

    gain: dict[str, Tensor]
    gradient: dict[str, Tensor]
    momentum: dict[str, Tensor]
    weight_decay: dict[str, Tensor]


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


def _adam(group: dict, state: dict, grad: Tensor, origin: Tensor, decoupled: bool):
    beta1, beta2 = group["betas"]
    lr, eps, decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    t = float(state["step"])
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    precondition = 1.0 / (_f64(state["exp_avg_sq"]).sqrt() / bc2 ** 0.5 + eps)
    applied = grad if decoupled else grad + decay * origin
    gain = -lr * (1 - beta1) * precondition / bc1
    momentum = -lr * precondition * (_f64(state["exp_avg"]) - (1 - beta1) * applied) / bc1
    weight_decay = -lr * decay * origin if decoupled else gain * decay * origin
    return gain, momentum, weight_decay


def _sgd(group: dict, state: dict, grad: Tensor, origin: Tensor):
    lr, mu, decay = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
    direction = grad + decay * origin if decay else grad
    if mu == 0:
        gain, momentum = torch.tensor(-lr, dtype=torch.float64), torch.zeros_like(grad)
    else:
        buffer = _f64(state["momentum_buffer"])
        first = torch.equal(buffer, direction)  # torch starts the buffer at d, undamped
        k = 1.0 if first else 1.0 - float(group["dampening"])
        carried = buffer - k * direction  # μ·b_{t−1}
        if group["nesterov"]:
            gain, momentum = torch.tensor(-lr * (1 + mu * k), dtype=torch.float64), -lr * mu * carried
        else:
            gain, momentum = torch.tensor(-lr * k, dtype=torch.float64), -lr * carried
    return gain, momentum, gain * decay * origin


def split_step(optimizer: torch.optim.Optimizer, names: Mapping[int, str],
               base: Mapping[str, Tensor]) -> StepSplit | None:
    """The split of the step ``optimizer`` just took from ``base`` (θ₀), for the parameters in
    ``names`` (id(parameter) → name); None for an optimizer or setting it does not cover."""
    kind = type(optimizer)
    if not issubclass(kind, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
        return None
    split = StepSplit({}, {}, {}, {})
    for group in optimizer.param_groups:
        if group.get("maximize") or group.get("amsgrad"):
            return None
        for p in group["params"]:
            name = names.get(id(p))
            if name is None or p.grad is None or name not in base:
                continue
            grad, origin, state = _f64(p.grad), _f64(base[name]), optimizer.state[p]
            if isinstance(optimizer, torch.optim.SGD):
                parts = _sgd(group, state, grad, origin)
            else:
                decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
                parts = _adam(group, state, grad, origin, decoupled)
            split.gain[name], split.momentum[name], split.weight_decay[name] = parts
            split.gradient[name] = grad
    return split
