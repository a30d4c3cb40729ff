r"""Taylor-mode forward differentiation to second order along one direction.

For the second directional derivatives of docs/method.md §4 the model runs once on *jets*: every
tensor x(s) along θ₀ + sΔθ is carried as (x, ẋ, ẍ) = (x(0), dx/ds, d²x/ds²), with ẋ or ẍ None
where they are identically 0 (a frozen weight, the parameters' ẍ). Each operation maps jets to a
jet by the chain rule to second order:

    linear L:      (L x, L ẋ, L ẍ)
    bilinear B:    (B(a, b), B(ȧ, b) + B(a, ḃ), B(ä, b) + 2 B(ȧ, ḃ) + B(a, b̈))
    pointwise f:   (f(x), f′(x) ẋ, f′(x) ẍ + f″(x) ẋ²)
    log_softmax:   l = x − lse(x),  l̇ = ẋ − ⟨p, ẋ⟩,  l̈ = ẍ − ⟨p, ẍ⟩ − Var_p(ẋ)       (p = softmax x)
    softmax:       p,  ṗ = p l̇,  p̈ = p (l̈ + l̇²)

Nested ``torch.func.jvp`` gets the same numbers from four streams (x, ẋ twice, ẍ), and a linear
layer with a moving weight costs 13 matrix products there against 5 here (x W, ẋ W, x Ẇ, ẍ W,
ẋ Ẇ); a frozen weight costs 3. Values are computed exactly as a plain forward computes them, so
they are bitwise a forward's.

``Jet`` is a tensor subclass: it runs any model whose operations (after PyTorch's own
decompositions) have a rule in ``_RULES``, and names the operation it has none for.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import Tensor

from .forward_mode import layer_norm_exact

aten = torch.ops.aten


_degree = 2  # the highest derivative carried (``degree``)


@contextlib.contextmanager
def degree(highest: int) -> Iterator[None]:
    """Carry derivatives up to ``highest`` (1 or 2) inside: at 1 a jet is a dual number (x, ẋ),
    and no rule computes a second-derivative term."""
    global _degree
    if highest not in (1, 2):
        raise ValueError(f"degree must be 1 or 2, got {highest!r}")
    previous, _degree = _degree, highest
    try:
        yield
    finally:
        _degree = previous


class Jet(Tensor):
    """A tensor with its first and second derivatives along one direction (None: zero)."""

    value: Tensor
    first: Tensor | None
    second: Tensor | None
    # Whether another jet views this one's memory (set by the view rules); an in-place op on
    # either is refused (``_in_place`` cannot write through to the other)
    viewed: bool = False

    @staticmethod
    def __new__(cls, value: Tensor, first: Tensor | None = None, second: Tensor | None = None) -> Jet:
        # The value's strides, so that PyTorch's decompositions (reshape: view or copy?) decide
        # as they would for the value itself; views of the coefficients go through ``_view``.
        jet = Tensor._make_wrapper_subclass(cls, value.shape, strides=value.stride(),
                                            storage_offset=value.storage_offset(), dtype=value.dtype,
                                            device=value.device, layout=value.layout, requires_grad=False)
        jet.value, jet.first, jet.second = value, first, second
        return jet

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Jet(value={self.value!r}, first={self.first!r}, second={self.second!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        rule = _RULES.get(func) or _RULES.get(func.overloadpacket)
        if rule is None:
            raise NotImplementedError(f"Taylor mode has no rule for {func}; this model's derivative passes "
                                      "need one in entropy_callbacks/taylor.py")
        return rule(func, *args, **(kwargs or {}))


def coefficients(x) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(x, ẋ, ẍ) of a jet, or (x, None, None) of anything else."""
    return (x.value, x.first, x.second) if isinstance(x, Jet) else (x, None, None)


def _jet(value: Tensor, first: Tensor | None, second: Tensor | None):
    return value if first is None and second is None else Jet(value, first, second)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _scale(a: Tensor | None, factor) -> Tensor | None:
    return None if a is None else a if factor == 1 else a * factor  # a·1 would be a copy of a


# An aten op's arguments nest at most one level (Tensor[] and Tensor?[] lists), so these walk
# lists, tuples and dicts directly, without torch's pytree (part of the jets' Python overhead).

def _nth(x, k: int):
    """The k-th coefficient of every jet in (lists, tuples, dicts of) arguments; the rest unchanged."""
    if isinstance(x, Jet):
        return (x.value, x.first, x.second)[k]
    if isinstance(x, (list, tuple)):
        return type(x)(_nth(t, k) for t in x) if any(isinstance(t, (Jet, list, tuple)) for t in x) else x
    if isinstance(x, dict):
        return {name: _nth(t, k) for name, t in x.items()}
    return x


def _any_jet(x) -> bool:
    """Whether a jet is among (lists, tuples, dicts of) arguments."""
    if isinstance(x, Jet):
        return True
    if isinstance(x, (list, tuple)):
        return any(_any_jet(t) for t in x)
    if isinstance(x, dict):
        return any(_any_jet(t) for t in x.values())
    return False


# ---------------------------------------------------------------------------------------------
# Rules. Each takes (func, *args, **kwargs) as dispatched and returns plain tensors or jets.
# ---------------------------------------------------------------------------------------------

def _value_only(func, *args, **kwargs):
    """Outputs without derivatives (comparisons, shapes, indices, fresh tensors)."""
    return func(*_nth(args, 0), **_nth(kwargs, 0))


def _detach(func, x):
    # As forward-mode AD: a detached tensor has no tangent.
    return coefficients(x)[0].detach()


def _structural(func, x, *args, **kwargs):
    """Linear in its first argument, the rest are structure (shapes, dims, indices, dtypes)."""
    if _any_jet(args) or _any_jet(kwargs):
        raise NotImplementedError(f"Taylor mode: {func} with a moving argument after the first")
    if "out" in kwargs:  # each coefficient would be written into out in turn: it would hold the last
        raise NotImplementedError(f"Taylor mode: {func} with out=")
    value, first, second = coefficients(x)
    out = func(value, *args, **kwargs)
    head = out[0] if isinstance(out, (list, tuple)) and out else out
    if isinstance(head, Tensor) and not (head.is_floating_point() or head.is_complex()):
        return out  # an integer or boolean result (a cast, ...) is constant along s
    firsts = None if first is None else func(first, *args, **kwargs)
    seconds = None if second is None else func(second, *args, **kwargs)
    if isinstance(out, (list, tuple)):
        return _mark_views(x, type(out)(_jet(v, None if firsts is None else f, None if seconds is None else s)
                                        for v, f, s in zip(out, firsts or out, seconds or out)))
    return _mark_views(x, _jet(out, firsts, seconds))


def _view(func, x, size):
    """view/_unsafe_view: the coefficients' strides may differ from the value's, so reshape."""
    value, first, second = coefficients(x)
    return _mark_views(x, _jet(func(value, size), None if first is None else first.reshape(size),
                               None if second is None else second.reshape(size)))


def _mark_views(x, out):
    """Flag a jet and the jets that view its memory (a structural op's outputs), for ``_in_place``."""
    if isinstance(x, Jet):
        memory = x.value.untyped_storage().data_ptr()
        views = [t for t in (out if isinstance(out, (list, tuple)) else (out,))
                 if isinstance(t, Jet) and t.value.untyped_storage().data_ptr() == memory]
        for t in views:
            t.viewed = True
        if views:
            x.viewed = True
    return out


def _concatenate(func, tensors, *args, **kwargs):
    """cat/stack: linear in the listed tensors jointly; a missing coefficient is zero."""
    if _any_jet(args) or _any_jet(kwargs) or "out" in kwargs:  # out= would hold the last coefficient written
        raise NotImplementedError(f"Taylor mode: {func} with out= or a moving argument after the tensors")
    value = func([coefficients(t)[0] for t in tensors], *args, **kwargs)

    def order(k: int):
        parts = [coefficients(t)[k] for t in tensors]
        if all(part is None for part in parts):
            return None
        return func([torch.zeros_like(coefficients(t)[0]) if part is None else part
                     for t, part in zip(tensors, parts)], *args, **kwargs)

    return _jet(value, order(1), order(2))


def _add_rule(func, a, b, *, alpha=1):
    sign = -alpha if func.overloadpacket is aten.sub else alpha
    (a0, a1, a2), (b0, b1, b2) = coefficients(a), coefficients(b)
    value = func(a0, b0, alpha=alpha) if alpha != 1 else func(a0, b0)

    def combine(x, y):
        if y is None:
            return None if x is None else _broadcast(x, value)
        # ±1 without multiplying by it: a pass over the tensor less (x + 1·y is x + y bitwise)
        if x is None:
            return _broadcast(y if sign == 1 else -y if sign == -1 else sign * y, value)
        return _broadcast(x + y if sign == 1 else x - y if sign == -1 else x + sign * y, value)

    return _jet(value, combine(a1, b1), combine(a2, b2))


def _broadcast(x: Tensor, like: Tensor) -> Tensor:
    return x if x.shape == like.shape else x.expand(like.shape)


def _rsub(func, x, other, alpha=1):
    value, first, second = coefficients(x)
    return _jet(func(value, other, alpha=alpha), _scale(first, -alpha), _scale(second, -alpha))


def _where(func, condition, a, b):
    (a0, a1, a2), (b0, b1, b2) = coefficients(a), coefficients(b)
    value = torch.where(condition, a0, b0)

    def order(x, y):
        if x is None and y is None:
            return None
        return torch.where(condition, 0.0 if x is None else x, 0.0 if y is None else y).expand(value.shape)

    return _jet(value, order(a1, b1), order(a2, b2))


def _masked_fill(func, x, mask, fill):
    if isinstance(fill, Jet):
        raise NotImplementedError(f"Taylor mode: {func} with a moving fill value")
    value, first, second = coefficients(x)
    zero = lambda t: None if t is None else t.masked_fill(mask, 0.0)  # noqa: E731
    return _jet(value.masked_fill(mask, fill), zero(first), zero(second))


def _mul(func, a, b):
    """a ⊙ b (broadcasting): ȧ b + a ḃ and ä b + 2 ȧ ḃ + a b̈."""
    (a0, a1, a2), (b0, b1, b2) = coefficients(a), coefficients(b)
    value = a0 * b0
    first = _fma(None if a1 is None else a1 * b0, a0, b1)
    second = _fma(None if a2 is None else a2 * b0, a0, b2)
    if _degree == 2:
        second = _fma(second, a1, b1, 2)
    return _jet(value, None if first is None else _broadcast(first, value),
                None if second is None else _broadcast(second, value))


def _fma(acc: Tensor | None, x: Tensor | None, y: Tensor | None, factor: float = 1) -> Tensor | None:
    """acc + factor·x·y, fused where possible (None: zero). Every caller passes an ``acc`` it
    has just computed and holds no other reference to, so it is added into in place when it
    already has the result's shape and dtype (an out-of-place addcmul allocates and first-touches
    a tensor of that size: 3.7 against 3.2 ms at [1280, 688] in float64 on a CPU)."""
    if x is None or y is None:
        return acc
    if acc is None:
        return x * y if factor == 1 else torch.mul(x, y).mul_(factor)
    # _infer_size is torch.broadcast_shapes in C++ (0.5 against 55 µs a call)
    shape = torch._C._infer_size(torch._C._infer_size(acc.shape, x.shape), y.shape)
    if acc.shape == shape and acc.dtype == torch.promote_types(acc.dtype, torch.promote_types(x.dtype, y.dtype)):
        return acc.addcmul_(x, y, value=factor)
    return torch.addcmul(acc.expand(shape), x, y, value=factor)


def _matmul_derivatives(op: Callable[[Tensor, Tensor], Tensor], a, b) -> tuple[Tensor | None, Tensor | None]:
    """The first and second derivatives of A B, for mm and bmm: ȦB + AḂ and ÄB + 2ȦḂ + AB̈, each
    product only where both factors are present. With the value's own product that is 5
    products for a layer with a moving weight and 3 for a frozen one. (Stacking [Ȧ; Ä] into one
    product was slower on CPU: the copy cost more than the larger GEMM saved.) The value is
    left to the caller, computed as the plain forward does, so that it is bitwise a forward's
    (Ĥ does not depend on the order of the pass)."""
    (a0, a1, a2), (b0, b1, b2) = coefficients(a), coefficients(b)
    first = _products(op, [(a1, b0, 1), (a0, b1, 1)])
    second = _products(op, [(a2, b0, 1), (a1, b1, 2 if _degree == 2 else 0), (a0, b2, 1)])
    return first, second


_ACCUMULATING = {torch.mm: Tensor.addmm_, torch.bmm: Tensor.baddbmm_}  # in place: out-of-place copies the sum first


def _products(op: Callable[[Tensor, Tensor], Tensor], terms) -> Tensor | None:
    """Σ α·op(x, y) over the (x, y, α) whose factors are both present and α ≠ 0 (None if none):
    the first product written fresh, each further one accumulated into it by the GEMM itself
    (addmm_/baddbmm_), which saves a pass over the output per product."""
    total = None
    for x, y, alpha in terms:
        if x is None or y is None or alpha == 0:
            continue
        if total is None:
            total = op(x, y) if alpha == 1 else op(x, y).mul_(alpha)
        else:
            total = _ACCUMULATING[op](total, x, y, alpha=alpha)
    return total


def _matmul(op: Callable[[Tensor, Tensor], Tensor]):
    def rule(func, a, b):
        return _jet(func(coefficients(a)[0], coefficients(b)[0]), *_matmul_derivatives(op, a, b))

    return rule


def _addmm(func, bias, a, b, *, beta=1, alpha=1):
    p1, p2 = _matmul_derivatives(torch.mm, a, b)
    c0, c1, c2 = coefficients(bias)
    value = func(c0, coefficients(a)[0], coefficients(b)[0], beta=beta, alpha=alpha)
    first = _add(_scale(c1, beta), _scale(p1, alpha))
    second = _add(_scale(c2, beta), _scale(p2, alpha))
    return _jet(value, None if first is None else _broadcast(first, value),
                None if second is None else _broadcast(second, value))


def _div(func, a, b):
    """a / b: the value by the division itself (bitwise a forward's), the derivatives as a · (1/b)."""
    if not isinstance(b, Jet):
        return _structural(func, a, b)
    _, first, second = coefficients(_mul(aten.mul.Tensor, a, _pointwise_rule(_reciprocal_d)(aten.reciprocal.default, b)))
    return _jet(func(coefficients(a)[0], coefficients(b)[0]), first, second)


def _pointwise_rule(derivatives: Callable[..., tuple]):
    """f(x) (the dispatched op) with (f′, a function giving f″) = derivatives(x, f(x)): f″ is
    computed only at degree 2. f′ may also be given as the map t ↦ f′(x)·t, where torch has it
    as one fused kernel (the *_backward ops)."""

    def rule(func, x, *args, **kwargs):
        value, first, second = coefficients(x)
        out = func(value, *args, **kwargs)
        if first is None and second is None:
            return out
        d1, d2 = derivatives(value, out, *args, **kwargs)
        times = d1 if callable(d1) else d1.mul
        y1 = None if first is None else times(first)
        y2 = None if second is None else times(second)
        if first is not None and _degree == 2:
            y2 = _fma(y2, d2() * first, first)
        return _jet(out, y1, y2)

    return rule


def _reciprocal_d(x, y):
    return -y.square(), lambda: 2 * y.square() * y


def _exp_d(x, y):
    return y, lambda: y


def _log_d(x, y):
    r = x.reciprocal()
    return r, lambda: -r.square()


def _rsqrt_d(x, y):
    y3 = y.square() * y
    return -0.5 * y3, lambda: 0.75 * y3 * y.square()


def _sqrt_d(x, y):
    r = y.reciprocal()
    return 0.5 * r, lambda: -0.25 * r.square() * r


def _pow_d(x, y, exponent):
    if exponent == 2:  # RMSNorm's x²: x.pow(1) would be a copy of x
        return _square_d(x, y)
    if exponent in (0, 1):  # not e·x^(e−1) with e = 0 or e − 1 = 0: at x = 0 that is 0·inf = NaN
        constant = torch.full_like(x, float(exponent))
        return constant, lambda: torch.zeros_like(x)
    return exponent * x.pow(exponent - 1), lambda: exponent * (exponent - 1) * x.pow(exponent - 2)


def _square_d(x, y):
    return 2 * x, lambda: torch.full_like(x, 2.0)


def _tanh_d(x, y):
    return lambda t: aten.tanh_backward(t, y), lambda: -2 * y * (1 - y.square())


def _sigmoid_d(x, y):
    return lambda t: aten.sigmoid_backward(t, y), lambda: y * (1 - y) * (1 - 2 * y)


def _silu_d(x, y):
    def second():
        s = torch.sigmoid(x)
        return s * (1 - s) * (2 + x * (1 - 2 * s))

    return lambda t: aten.silu_backward(t, x), second


def _gelu_d(x, y, approximate="none"):
    if approximate != "none":
        raise NotImplementedError("Taylor mode: gelu(approximate='tanh') has no rule yet")
    pdf = torch.exp(-0.5 * x.square()) / math.sqrt(2 * math.pi)
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * pdf, lambda: pdf * (2 - x.square())


def _abs_d(x, y):
    return torch.sign(x), lambda: torch.zeros_like(x)


def _sin_d(x, y):
    return torch.cos(x), lambda: -y


def _cos_d(x, y):
    return -torch.sin(x), lambda: -y


def _softmax_family(log: bool):
    def rule(func, x, dim, *args):
        value, first, second = coefficients(x)
        out = func(value, dim, *args)
        if first is None and second is None:
            return out
        p = out.exp() if log else out
        mean = lambda t: (p * t).sum(dim, keepdim=True)  # noqa: E731  (0·t where p = 0)
        # l1, l2 are fresh tensors of this rule's own, so the rest updates them in place
        l1 = None if first is None else first - mean(first)
        l2 = None if second is None else second - mean(second)
        if l1 is not None and _degree == 2:
            spread = mean(l1.square())
            l2 = (-spread).expand(out.shape).clone() if l2 is None else l2.sub_(spread)
        if log:
            return _jet(out, l1, l2)
        # a fully masked row of _safe_softmax: p = 0 and every coefficient 0
        if l1 is not None and _degree == 2:
            l2 = l2.add_(l1.square())
        return _jet(out, None if l1 is None else l1.mul_(p), None if l2 is None else l2.mul_(p))

    return rule


def _clamp(func, x, min=None, max=None):
    value, first, second = coefficients(x)
    out = func(value, min, max)
    inside = torch.ones_like(value, dtype=torch.bool)
    if min is not None:
        inside &= value >= min
    if max is not None:
        inside &= value <= max
    zero = lambda t: None if t is None else torch.where(inside, t, 0.0)  # noqa: E731
    return _jet(out, zero(first), zero(second))


def _sorted_values(func, x, *args, **kwargs):
    """sort/topk: the values move with their own tokens (ties aside), the indices do not."""
    value, first, second = coefficients(x)
    values, indices = func(value, *args, **kwargs)
    if func.overloadpacket is aten.topk:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
    else:
        dim = args[0] if args else kwargs.get("dim", -1)
    pick = lambda t: None if t is None else t.gather(dim, indices)  # noqa: E731
    return _jet(values, pick(first), pick(second)), indices


def _native_layer_norm(func, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """The value from the kernel itself (bitwise a forward's), its derivatives from the same
    function written with mean/rsqrt, run on jets by the rules above."""
    value, mean, rstd = func(*_nth((x, normalized_shape, weight, bias, eps), 0))
    if not any(isinstance(t, Jet) for t in (x, weight, bias)):
        return value, mean, rstd
    through = layer_norm_exact(x, normalized_shape, weight, bias, eps)
    _, first, second = coefficients(through)
    return _jet(value, first, second), mean, rstd


def _local_scalar(func, x):
    return func(coefficients(x)[0])


def _in_place(func_out_of_place):
    """An in-place op on a jet: computed out of place, then the jet's coefficients replaced.
    Replacing cannot reach a jet that views the same memory (coefficients may be shared between
    jets, so writing into them is no way out), so an op on a view or on a viewed jet is refused,
    as is one that would change the jet's shape or dtype (torch would raise or keep the dtype)."""

    def rule(func, target, *args, **kwargs):
        if not isinstance(target, Jet):
            raise NotImplementedError(f"Taylor mode: {func} writes a jet into a plain tensor")
        if target.viewed:
            raise NotImplementedError(f"Taylor mode: {func} on a jet that is a view or has views")
        result = _RULES[func_out_of_place](func_out_of_place, target, *args, **kwargs)
        value, first, second = coefficients(result)
        if value.shape != target.shape or value.dtype != target.dtype:
            raise NotImplementedError(f"Taylor mode: {func} that would change the shape or dtype of its target")
        target.value, target.first, target.second = value, first, second
        return target

    return rule


_STRUCTURAL = [aten.embedding, aten.expand, aten.t, aten.transpose, aten.unsqueeze, aten.squeeze,
               aten.slice, aten.select, aten.alias, aten.clone, aten.index, aten.gather, aten.sum, aten.mean,
               aten.neg, aten.cumsum, aten._to_copy, aten.split, aten.split_with_sizes, aten.unbind,
               aten.permute, aten.reshape, aten.contiguous, aten.flip, aten.narrow, aten.index_select,
               aten.repeat, aten.unfold, aten.diagonal, aten.squeeze_copy, aten.view_as_real, aten.roll,
               aten.expand_copy, aten.lift_fresh]
_VALUE_ONLY = [aten.eq, aten.ne, aten.le, aten.lt, aten.ge, aten.gt, aten.bitwise_and, aten.bitwise_or,
               aten.bitwise_not, aten.logical_and, aten.logical_or, aten.logical_not, aten.isnan, aten.isinf,
               aten.isfinite, aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like, aten.new_ones,
               aten.new_zeros, aten.new_empty, aten.new_full, aten.argmax, aten.argmin, aten.argsort,
               aten.any, aten.all, aten.sign, aten.scalar_tensor, aten.arange, aten.is_nonzero, aten.floor,
               aten.ceil, aten.round, aten.bucketize, aten.searchsorted]

_RULES: dict = {}
_RULES.update({op: _structural for op in _STRUCTURAL})
_RULES.update({op: _value_only for op in _VALUE_ONLY})
_RULES.update({
    aten.detach: _detach,
    aten.view: _view,
    aten._unsafe_view: _view,
    aten.cat: _concatenate,
    aten.stack: _concatenate,
    aten.add.Tensor: _add_rule,
    aten.sub.Tensor: _add_rule,
    aten.rsub.Scalar: _rsub,
    aten.where.self: _where,
    aten.masked_fill.Scalar: _masked_fill,
    aten.masked_fill.Tensor: _masked_fill,
    aten.mul.Tensor: _mul,
    aten.mul.Scalar: _structural,
    aten.div.Tensor: _div,
    aten.div.Scalar: _structural,
    aten.mm.default: _matmul(torch.mm),
    aten.bmm.default: _matmul(torch.bmm),
    aten.addmm.default: _addmm,
    aten.exp.default: _pointwise_rule(_exp_d),
    aten.log.default: _pointwise_rule(_log_d),
    aten.rsqrt.default: _pointwise_rule(_rsqrt_d),
    aten.sqrt.default: _pointwise_rule(_sqrt_d),
    aten.reciprocal.default: _pointwise_rule(_reciprocal_d),
    aten.pow.Tensor_Scalar: _pointwise_rule(_pow_d),
    aten.square.default: _pointwise_rule(_square_d),
    aten.tanh.default: _pointwise_rule(_tanh_d),
    aten.sigmoid.default: _pointwise_rule(_sigmoid_d),
    aten.silu.default: _pointwise_rule(_silu_d),
    aten.gelu.default: _pointwise_rule(_gelu_d),
    aten.abs.default: _pointwise_rule(_abs_d),
    aten.sin.default: _pointwise_rule(_sin_d),
    aten.cos.default: _pointwise_rule(_cos_d),
    aten._log_softmax.default: _softmax_family(log=True),
    aten._softmax.default: _softmax_family(log=False),
    aten._safe_softmax.default: _softmax_family(log=False),
    aten.clamp.default: _clamp,
    aten.sort.default: _sorted_values,
    aten.sort.stable: _sorted_values,
    aten.topk.default: _sorted_values,
    aten._local_scalar_dense.default: _local_scalar,
    aten.native_layer_norm.default: _native_layer_norm,
})
_RULES.update({
    aten.add_.Tensor: _in_place(aten.add.Tensor),
    aten.sub_.Tensor: _in_place(aten.sub.Tensor),
    aten.mul_.Tensor: _in_place(aten.mul.Tensor),
    aten.mul_.Scalar: _in_place(aten.mul.Scalar),
    aten.div_.Tensor: _in_place(aten.div.Tensor),
    aten.div_.Scalar: _in_place(aten.div.Scalar),
})
