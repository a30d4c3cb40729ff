"""In which floating-point precision the probe's passes compute (docs/method.md, "Precision").

The measured ΔH = Ĥ(θ₀ + sΔθ) − Ĥ(θ₀) is a difference of two numbers of size H. At the
learning rates of RL fine-tuning ΔH is 1e-9…1e-6 of H, below the rounding of a float32
(~1e-7 H) or bf16 (~1e-3 H) forward, so the value passes must compute in float64 — with the
weights upcast layer by layer (``layerwise``), not as a copy of the model. Derivative passes
have no such cancellation: float32 (or the model's float64) is enough for them.

Policies (``precision=``):

- ``"auto"`` (default): value passes in float64 (float32 on backends without float64, such as
  mps); derivative passes in float32 (float64 for a float64 model). On GPUs with full-rate FP64
  (A100, H100, H200, B200) a float64 pass costs about what an exact float32 one does; on others
  it is 16-64× slower, and "float32" is the cheaper, less exact choice.
- ``"float64"``: every pass in float64.
- ``"float32"``: every pass in float32 (the vocabulary side of value passes in float64).
- ``"model"``: the model's own dtypes (the cheapest; exact only for float64 models).

Whatever the policy, probe passes run with float32 matmuls in IEEE precision (no TF32, no
oneDNN bf16x3) and outside any autocast region; ``exact_numerics`` restores every flag exactly
afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal

import torch

from .model_guard import hf_model

Precision = Literal["auto", "float64", "float32", "model"]
PRECISIONS = ("auto", "float64", "float32", "model")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}; "
                         "'auto' measures in float64 (docs/method.md, Precision)")


@dataclass(frozen=True)
class PassPrecision:
    """Compute dtypes of the value (measurement) and derivative (prediction) passes; None means
    the model's own parameter dtypes."""

    values: torch.dtype | None
    derivatives: torch.dtype | None


def _widest_float(model: torch.nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _has_float64(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda", "xpu")  # mps has none


def resolve_precision(precision: str, model: torch.nn.Module) -> PassPrecision:
    """The compute dtypes a policy means for this model on its device."""
    check_precision(precision)
    if precision == "model":
        return PassPrecision(None, None)
    if precision in ("float64", "float32"):
        dtype = getattr(torch, precision)
        return PassPrecision(dtype, dtype)
    device = next(model.parameters()).device
    values = torch.float64 if _has_float64(device) else torch.float32
    return PassPrecision(values, _widest_float(model))


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand (half the machine epsilon)."""
    return torch.finfo(dtype).eps / 2


def effective_dtype(dtype: torch.dtype | None, model: torch.nn.Module) -> torch.dtype:
    """The precision a pass actually rounds in: its dtype, or the model's narrowest float dtype."""
    if dtype is not None:
        return dtype
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return max(dtypes, key=unit_roundoff)


def partner_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a pass is re-run in to estimate its rounding error: float32 for a float64
    pass (whose error, scaled by the ratio of unit roundoffs, estimates the float64 one), float64
    for a float32 pass and float32 for narrower ones (the difference is then the error itself).

    A float32 error does not scale down from a bf16 one: measured on Qwen2, it was up to 300×
    larger than the bf16 error scaled by 2^-16."""
    return torch.float32 if dtype == torch.float64 else (torch.float64 if dtype == torch.float32 else torch.float32)


# ---------------------------------------------------------------------------- flags
_FP32_PRECISION_ATTRS = (
    (), ("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul"), ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)  # () is torch.backends' own, which the others inherit while "none": set and restored before them


def _backend(path: tuple[str, ...]):
    obj = torch.backends
    for part in path:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if hasattr(obj, "fp32_precision") else None


@contextlib.contextmanager
def exact_numerics(device: torch.device) -> Iterator[None]:
    """float32 matmuls/convolutions in IEEE precision (no TF32, no bf16x3 on CPU) and autocast
    off, for the duration; every flag is put back exactly as it was."""
    try:
        matmul = torch.get_float32_matmul_precision()
    except RuntimeError:  # the run set the per-backend fp32_precision API, which the legacy getter refuses to mix
        matmul = None
    saved = [(b, b.fp32_precision) for b in map(_backend, _FP32_PRECISION_ATTRS) if b is not None]
    try:
        if matmul is not None:
            torch.set_float32_matmul_precision("highest")
        for backend, _ in saved:
            backend.fp32_precision = "ieee"
        with contextlib.ExitStack() as stack:
            for device_type in {"cpu", device.type}:
                if device_type in ("cpu", "cuda", "xpu", "mps"):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)
        for backend, value in saved:
            backend.fp32_precision = value


# ---------------------------------------------------------------------------- float64 norms
def _rms_norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # HF's Llama-family RMSNorm, without its cast to float32 (a no-op below float64).
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _is_llama_rms_norm(module: torch.nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


@contextlib.contextmanager
def float64_safe(model: torch.nn.Module) -> Iterator[None]:
    """Remove the float32 islands that would round a float64 pass at float32 precision:
    Llama-family RMSNorm casts its input to float32 (the same function, computed in the input
    dtype, replaces it), and eager attention takes its softmax in float32 (SDPA, computed in the
    input dtype, replaces it where the model supports it)."""
    norms = [m for m in model.modules() if _is_llama_rms_norm(m)]
    inner = hf_model(model)
    original = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    switch = original == "eager" and getattr(inner, "_supports_sdpa", False) and hasattr(
        inner, "set_attn_implementation")
    own = [m.__dict__.get("forward") for m in norms]  # e.g. an accelerate hook's instance forward
    try:
        for m in norms:
            m.forward = _rms_norm_in_input_dtype.__get__(m)
        if switch:
            inner.set_attn_implementation("sdpa")
        yield
    finally:
        for m, forward in zip(norms, own):
            if forward is None:
                del m.forward
            else:
                m.forward = forward
        if switch:
            inner.set_attn_implementation(original)


@contextlib.contextmanager
def pass_numerics(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Everything a probe pass in ``dtype`` (None: the model's dtypes) needs around it."""
    with exact_numerics(next(model.parameters()).device), contextlib.ExitStack() as stack:
        if effective_dtype(dtype, model) == torch.float64:
            stack.enter_context(float64_safe(model))
        yield
