"""Parameter mappings: checking ``base`` (θ₀) and ``delta`` (Δθ), and building θ₀ + s·Δθ."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor


def _check_names(kind: str, mapping: Mapping[str, Tensor], params: dict[str, torch.nn.Parameter]) -> None:
    unknown = sorted(set(mapping) - set(params))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{kind} names {len(unknown)} tensors that are not parameters of the model: {shown}; "
                         "use the names from model.named_parameters()")


def _check_tensors(kind: str, mapping: Mapping[str, Tensor], params: dict[str, torch.nn.Parameter]) -> None:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{kind} must be a mapping from parameter names to tensors, got {type(mapping).__name__}")
    _check_names(kind, mapping, params)
    for name, value in mapping.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{kind}[{name!r}] is a {type(value).__name__}, expected a tensor")
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"{kind}[{name!r}] has shape {tuple(value.shape)} but the parameter has "
                             f"shape {tuple(params[name].shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{kind}[{name!r}] has dtype {value.dtype}; expected a floating-point tensor")


def check_point(model: torch.nn.Module, base: Mapping[str, Tensor], kind: str = "base") -> dict[str, torch.nn.Parameter]:
    """Validate a θ₀ mapping (names, shapes, dtypes); returns the model's named parameters."""
    params = dict(model.named_parameters())
    _check_tensors(kind, base, params)
    for name, value in base.items():
        if value.dtype != params[name].dtype:
            raise ValueError(f"{kind}[{name!r}] has dtype {value.dtype} but the parameter is {params[name].dtype}; "
                             "pass values in the parameter's own dtype")
    return params


def check_step(model: torch.nn.Module, base: Mapping[str, Tensor],
               delta: Mapping[str, Tensor]) -> dict[str, torch.nn.Parameter]:
    """Validate θ₀ and Δθ against the model; returns the model's named parameters.

    ``delta`` must name trainable parameters with matching shapes and finite floating values;
    ``base`` must name parameters with matching shape and dtype.
    """
    params = check_point(model, base)
    _check_tensors("delta", delta, params)
    if not delta:
        raise ValueError("delta is empty; pass Δθ for at least one trainable parameter")
    frozen = sorted(n for n in delta if not params[n].requires_grad)
    if frozen:
        raise ValueError(f"delta names parameters that are not trainable (requires_grad=False): {frozen[:5]}; "
                         "Δθ should cover the trainable parameters only (e.g. the LoRA tensors)")
    # One fused norm per tensor instead of an isfinite pass each (NaN/inf propagate into it).
    norms = torch._foreach_norm([v.detach() for v in delta.values()])
    if not bool(torch.isfinite(torch.stack([n.to("cpu", torch.float64) for n in norms])).all()):
        bad = next(name for name, value in delta.items() if not bool(torch.isfinite(value).all()))
        raise ValueError(f"delta[{bad!r}] contains NaN or inf; the captured step is not usable")
    return params


def check_scales(scales) -> tuple[float, ...]:
    if isinstance(scales, (int, float)) or not hasattr(scales, "__iter__"):
        raise ValueError(f"scales must be a sequence of step scales such as (1.0,), got {scales!r}")
    scales = tuple(float(s) for s in scales)
    if not scales:
        raise ValueError("scales is empty; pass at least one step scale, e.g. (1.0,)")
    bad = [s for s in scales if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"scales must be finite and > 0, got {bad}")
    return scales


@dataclass(frozen=True)
class StepPoint:
    """θ = θ₀ + s·Δθ, computed one tensor at a time when a pass places it (``layerwise``).

    ``dtype``: the pass's compute dtype; None keeps each parameter's own dtype (θ is formed in at
    least float32 and rounded to it). Parameters named in neither ``base`` nor ``delta`` keep
    the model's current values.
    """

    base: Mapping[str, Tensor]
    delta: Mapping[str, Tensor]
    scale: float
    dtype: torch.dtype | None = None

    def __call__(self, name: str, param: torch.nn.Parameter) -> Tensor:
        origin = self.base.get(name, param).detach()
        step = self.delta.get(name)
        moves = step is not None and self.scale != 0.0
        if self.dtype is not None:
            if not moves:
                return origin.to(param.device, self.dtype)
            # θ₀ + s·Δθ as one fused kernel into one new tensor: Δθ is upcast inside the kernel (the
            # same float64 arithmetic as a converted copy), so a float64 pass over a float32 model
            # allocates one float64 weight, not three (on a CPU each is page faults: a 151,936-token
            # embedding is 1.1 GB in float64)
            step = step.detach().to(param.device)
            if origin.dtype == self.dtype and torch.promote_types(self.dtype, step.dtype) == self.dtype:
                # nothing to convert: one out-of-place add reads θ₀ once instead of copying it first
                return torch.add(origin.to(param.device), step, alpha=self.scale)
            value = origin.to(param.device, self.dtype, copy=True)
            return value.add_(step, alpha=self.scale)
        if not moves:
            return origin.to(param.device)
        wide = torch.promote_types(param.dtype, torch.float32)
        value = torch.add(origin.to(param.device, wide), step.detach().to(param.device, wide), alpha=self.scale)
        return value.to(param.dtype)
