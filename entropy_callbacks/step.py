"""Capturing the real optimizer step: snapshot θ₀ of the trainable parameters, diff after."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def snapshot(model: torch.nn.Module, device: Literal["auto", "cpu"] = "auto") -> dict[str, Tensor]:
    """θ₀: a copy of every trainable parameter (on its own device, or on the CPU)."""
    target = (lambda p: torch.device("cpu")) if device == "cpu" else (lambda p: p.device)
    return {n: p.detach().to(target(p), copy=True) for n, p in trainable_parameters(model).items()}


@torch.no_grad()
def step_delta(model: torch.nn.Module, before: dict[str, Tensor]) -> dict[str, Tensor]:
    """Δθ = θ₁ − θ₀ for the snapshotted parameters, whatever produced θ₁ (any optimizer,
    clipping, scheduler), computed in at least float32."""
    params = dict(model.named_parameters())
    delta = {}
    for name, old in before.items():
        new = params[name].detach()
        wide = torch.promote_types(new.dtype, torch.float32)
        delta[name] = new.to(wide) - old.to(new.device, wide)
    return delta


def step_norm(delta: dict[str, Tensor]) -> float:
    return float(torch.sqrt(sum(d.double().square().sum().cpu() for d in delta.values())))


def is_skipped(delta: dict[str, Tensor]) -> bool:
    """True when no parameter moved (e.g. an AMP grad scaler skipped a step with inf grads)."""
    return all(not bool(d.any()) for d in delta.values())
