"""Parameters placed layer by layer during one forward pass.

A probe pass evaluates the model at θ = θ₀ + s·Δθ, often in a wider dtype than the model's
(float64 on a bf16 model: docs/method.md, "Precision"). Materialising θ for the whole model
would cost a copy of every weight (4× a bf16 model in float64). Instead the model is cut into
*units* — each block of a ``ModuleList`` (a transformer layer), each peft tuner layer, and any
other module that owns parameters — and a unit's parameters are computed when its forward
starts and dropped when it returns, so at most one unit's worth exists at a time. A weight
shared by two units (an LM head tied to the embedding) is computed at each use.

``value_of(name, parameter)`` gives the tensor to use for a parameter (``name`` as in
``model.named_parameters()``); it may return dual or functorch-wrapped tensors, so derivative
passes place their tangents the same way.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

ValueOf = Callable[[str, torch.nn.Parameter], Tensor]


def _is_tuner_layer(module: torch.nn.Module) -> bool:
    # peft casts a LoRA layer's input to its adapter's dtype before calling the adapter, so the
    # adapter and its base layer must change dtype together.
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, BaseTunerLayer)


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose parameters are placed together (disjoint subtrees covering every
    parameter of the model)."""
    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module, in_list: bool) -> None:
        if in_list or _is_tuner_layer(module) or next(module.parameters(recurse=False), None) is not None:
            found.append(module)
            return
        for child in module.children():
            visit(child, isinstance(module, torch.nn.ModuleList))

    visit(model, False)
    return found


class Placement:
    """What ``parameters_at`` yields: ``held(unit)`` keeps one unit's parameters placed across
    several calls (the LM head applied chunk by chunk), instead of placing them at every call."""

    def __init__(self, place, restore, unit_ids: set[int]):
        self._place, self._restore, self._unit_ids = place, restore, unit_ids
        self.held_units: set[int] = set()

    @contextlib.contextmanager
    def held(self, unit: torch.nn.Module) -> Iterator[None]:
        if id(unit) not in self._unit_ids or id(unit) in self.held_units:
            yield  # not a unit of its own (or held already): placed at each call as usual
            return
        self._place(unit, ())
        self.held_units.add(id(unit))
        try:
            yield
        finally:
            self.held_units.discard(id(unit))
            self._restore(unit, (), None)


@contextlib.contextmanager
def parameters_at(model: torch.nn.Module, value_of: ValueOf) -> Iterator[Placement]:
    """Inside, every forward of ``model`` sees ``value_of(name, p)`` in place of each parameter p
    (computed unit by unit); on exit the model holds its own parameters again, also after an
    exception."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    placed: dict[tuple[int, str], tuple[torch.nn.Module, str, torch.nn.Parameter]] = {}

    def slots(unit: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
        return [(m, local) for m in unit.modules() for local, p in m._parameters.items() if p is not None]

    blocks = units(model)
    unit_slots = {id(u): slots(u) for u in blocks}

    def place(unit, args):
        for module, local in unit_slots[id(unit)]:
            key = (id(module), local)
            if key in placed:  # a module shared with a unit that is still running: already placed
                continue
            original = module._parameters[local]
            placed[key] = (module, local, original)
            module._parameters[local] = value_of(canonical[id(original)], original)

    def restore(unit, args, output):
        if id(unit) in placement.held_units:
            return
        for module, local in unit_slots[id(unit)]:
            entry = placed.pop((id(module), local), None)
            if entry is not None:
                module._parameters[local] = entry[2]

    placement = Placement(place, restore, {id(u) for u in blocks})
    handles = []
    try:
        for unit in blocks:
            handles.append(unit.register_forward_pre_hook(place))
            handles.append(unit.register_forward_hook(restore, always_call=True))
        yield placement
    finally:
        for handle in handles:
            handle.remove()
        for module, local, original in placed.values():
            module._parameters[local] = original
        placed.clear()
