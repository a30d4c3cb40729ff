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

Holding v_t fixed is exact for SGD, whose step is affine in g, but not for Adam, whose v_t
depends on g too. ``jacobian_gain`` is Adam's exact elementwise ∂Δθ/∂g at the applied gradient,

    J = −(lr / bc1) [ (1−β1) P − m_t P² (1−β2) g' / (bc2 √(v_t / bc2)) ],

the first-order effect of a change in g through both moments (None for SGD, where J = γ).

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
    jacobian_gain: dict[str, Tensor] | None = None  # Adam: ∂Δθ/∂g with v_t's dependence on g


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


def _adam(group: dict, state: dict, grad: Tensor, origin: Tensor, decoupled: bool):
    beta1, beta2 = group["betas"]
    lr, eps, decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    t = float(state["step"])
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    root = _f64(state["exp_avg_sq"]).sqrt() / bc2 ** 0.5
    precondition = 1.0 / (root + eps)
    applied = grad if decoupled else grad + decay * origin
    gain = -lr * (1 - beta1) * precondition / bc1
    first_moment = _f64(state["exp_avg"])
    momentum = -lr * precondition * (first_moment - (1 - beta1) * applied) / bc1
    weight_decay = -lr * decay * origin if decoupled else gain * decay * origin
    # d√(v/bc2)/dg' = (1−β2) g' / (bc2 √(v/bc2)); 0 where v = 0 (then g' = 0 too)
    through_v = torch.where(root > 0, (1 - beta2) * applied / (bc2 * root), 0.0)
    jacobian = gain + lr * first_moment * precondition.square() * through_v / bc1
    return gain, momentum, weight_decay, jacobian


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
    return gain, momentum, gain * decay * origin, None


def split_step(optimizer: torch.optim.Optimizer, names: Mapping[int, str],
               base: Mapping[str, Tensor]) -> StepSplit | None:
    """The split of the step ``optimizer`` just took from ``base`` (θ₀), for the parameters in
    ``names`` (id(parameter) → name); None for an optimizer or setting it does not cover."""
    kind = type(optimizer)
    if not issubclass(kind, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
        return None
    split = StepSplit({}, {}, {}, {}, {} if not issubclass(kind, torch.optim.SGD) else None)
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
            split.gain[name], split.momentum[name], split.weight_decay[name], jacobian = parts
            split.gradient[name] = grad
            if split.jacobian_gain is not None:
                split.jacobian_gain[name] = jacobian
    return split
