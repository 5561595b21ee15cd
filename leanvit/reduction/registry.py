"""The registry of token-reduction methods and the protocol each one implements.

A method is a :class:`ReductionMethod` registered under a name (``"evit"``, ``"evit-drop"``, ...). Tools,
the training engine and checkpoints speak only this protocol, so a new method is one module in
``leanvit/reduction/`` that subclasses :class:`ReductionMethod` and calls :func:`register_reduction`.

Every method has one *strength knob* (EViT: ``keep_rate`` in (0, 1], 1 = no reduction), which can be read
and set on an applied model, scheduled during training and overridden per forward call. A setting as users
write it ("evit:0.7", a recipe mapping) is read by :class:`leanvit.reduction.spec.ReductionSpec`.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from leanvit.errors import LeanvitError

__all__ = ["ReductionMethod", "register_reduction", "get_reduction", "list_reductions", "apply_reduction",
           "remove_reduction", "applied_reduction", "reduction_spec", "cosine_schedule"]

_REGISTRY: Dict[str, "ReductionMethod"] = {}


def cosine_schedule(step: int, target: float, none_value: float, start_step: int = 0, span_steps: int = 0) -> float:
    """``none_value`` (no reduction) before ``start_step``, then a half cosine to ``target`` over
    ``span_steps`` steps, ``target`` afterwards (``span_steps=0``: straight to ``target``)."""
    if step < start_step:
        return none_value
    t = step - start_step
    if span_steps <= 0 or t >= span_steps:
        return target
    return target + (none_value - target) * (math.cos(math.pi * t / span_steps) + 1.0) / 2.0


class ReductionMethod:
    """What a token-reduction method provides: its whole job, so that nothing outside ``leanvit/reduction/``
    names a method.

    Subclasses set ``name``, ``knob`` and ``none_value`` and implement :meth:`apply`, :meth:`remove`,
    :meth:`is_applied`, :meth:`get_strength`, :meth:`set_strength` and :meth:`options`. Optional, each with a
    working default: dense restorations (``restorations``, :meth:`restored_tokens`, :meth:`restore_room`),
    what its picture shows (``picture``, drawn by :func:`leanvit.viz.draw_reduction`), a training loss of its own
    (:meth:`training_loss`, ``loss_weight``). Token pruning by a score gets all of them from
    :class:`leanvit.reduction.pruning.PruningMethod`.
    """

    name: str = ""
    knob: str = ""            # the strength knob's keyword, e.g. "keep_rate"
    none_value: Any = None    # the knob value that computes exactly the unmodified model
    description: str = ""
    #: dense restoration strategies (the default first); empty: the method cannot run in a dense backbone
    restorations: Tuple[str, ...] = ()
    #: what its picture shows (``leanvit viz``): ``"kept_tokens"`` (the patches still tokens after each reducing
    #: block) or ``"merged_groups"`` (the patches merged together); empty: no picture
    picture: str = ""
    #: weight of :meth:`training_loss` in the training objective
    loss_weight: float = 0.0

    # -- applying -------------------------------------------------------------------------------
    def apply(self, model: nn.Module, **options) -> nn.Module:
        """Patch ``model`` in place (``options`` include the knob); returns it."""
        raise NotImplementedError

    def remove(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`apply` in place; returns ``model``."""
        raise NotImplementedError

    def is_applied(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def reduced_module(self, model: nn.Module) -> nn.Module:
        """``model`` if the method is applied to it, else its first submodule that has it (the ViT of a
        dense backbone, segmenter or detector): what the strength knob acts on."""
        if self.is_applied(model):
            return model
        for m in model.modules():
            if self.is_applied(m):
                return m
        raise LeanvitError(f"{type(model).__name__} has no {self.name} reduction applied")

    # -- the strength knob ----------------------------------------------------------------------
    def get_strength(self, model: nn.Module):
        raise NotImplementedError

    def set_strength(self, model: nn.Module, value) -> None:
        raise NotImplementedError

    def check_strength(self, value):
        """``value`` validated (a clear :class:`LeanvitError` otherwise)."""
        return value

    def check_runs_as_given(self, model: nn.Module, value) -> None:
        """A clear error when the applied ``model`` would not run ``value`` as given (e.g. a merge count above
        what a block can merge, clamped at run time): training refuses what it would record wrongly."""

    def parse_strength(self, text: str):
        """A knob value from command-line text (e.g. ``"0.7"``)."""
        return self.check_strength(float(text))

    def format_strength(self, value) -> str:
        if isinstance(value, (list, tuple)):
            return "/".join(f"{v:g}" for v in value)
        return f"{value:g}"

    def forward_kwargs(self, value) -> Dict[str, Any]:
        """Keyword arguments that make one forward call run at strength ``value``."""
        return {self.knob: value}

    def schedule(self, step: int, target, start_step: int = 0, span_steps: int = 0):
        """The knob at a training step: no reduction, then a cosine to ``target`` (EViT's schedule)."""
        if isinstance(target, (list, tuple)):  # per-layer values are used as they are
            return target
        return cosine_schedule(step, float(target), float(self.none_value), start_step, span_steps)

    # -- dense prediction ------------------------------------------------------------------------
    def is_off(self, model: nn.Module) -> bool:
        """The applied ``model`` computes exactly the unreduced model (its strength is ``none_value``)."""
        value = self.get_strength(model)
        values = value if isinstance(value, (list, tuple)) else (value,)
        return all(v == self.none_value for v in values)

    def restore_room(self, model: nn.Module) -> Tuple[int, str]:
        """How many last blocks a ``reactivate`` restoration can run on every patch, and where they are."""
        return 0, "to reactivate"

    def restored_tokens(self, model: nn.Module, x: torch.Tensor, restore) -> torch.Tensor:
        """The last block's patch tokens (B, patches, C) after the final norm, filled by ``restore`` (a
        :class:`leanvit.reduction.restore.Restore` among ``restorations``)."""
        raise LeanvitError(f"reduction '{self.name}' has no restoration strategy for dense prediction")

    # -- training and pictures -------------------------------------------------------------------
    def training_loss(self, model: nn.Module) -> Optional[torch.Tensor]:
        """A loss of the method's own, read after each training forward (e.g. DynamicViT's keep-ratio loss),
        added to the objective times ``loss_weight``; None: no loss."""
        return None

    # -- what checkpoints record ----------------------------------------------------------------
    def options(self, model: nn.Module) -> Dict[str, Any]:
        """The options that rebuild the applied state (the knob included), JSON/YAML friendly."""
        raise NotImplementedError

    def spec(self, model: nn.Module) -> Dict[str, Any]:
        return {"method": self.name, **self.options(model)}

    def __repr__(self) -> str:
        return f"<reduction {self.name!r} ({self.knob})>"


def register_reduction(method: ReductionMethod) -> ReductionMethod:
    if not method.name:
        raise ValueError("a reduction method needs a name")
    _REGISTRY[method.name] = method
    return method


def list_reductions() -> List[str]:
    return sorted(_REGISTRY)


def get_reduction(name: str) -> ReductionMethod:
    method = _REGISTRY.get(str(name).lower())
    if method is None:
        raise LeanvitError(f"unknown reduction method '{name}' (known: {', '.join(list_reductions())})")
    return method


def applied_reduction(model: nn.Module) -> Optional[ReductionMethod]:
    """The registered method applied to ``model``, or None."""
    for method in _REGISTRY.values():
        if method.is_applied(model):
            return method
    return None


def apply_reduction(model: nn.Module, method: str, **options) -> nn.Module:
    """Apply the registered reduction ``method`` to ``model`` in place, e.g.
    ``apply_reduction(model, "evit", keep_rate=0.7)``; a method applied before is removed first."""
    m = get_reduction(method)
    params = inspect.signature(m.apply).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [n for n in params if n not in ("self", "model")]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise LeanvitError(f"reduction '{m.name}' takes no option {', '.join(repr(u) for u in unknown)} "
                               f"(its options: {', '.join(known)})")
    if m.knob in options:
        options[m.knob] = m.check_strength(options[m.knob])
    current = applied_reduction(model)
    if current is not None and current is not m:
        current.remove(model)
    return m.apply(model, **options)


def remove_reduction(model: nn.Module) -> nn.Module:
    current = applied_reduction(model)
    return current.remove(model) if current is not None else model


def reduction_spec(model: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"method": name, **options}`` of the reduction applied to ``model`` (None if none)."""
    current = applied_reduction(model)
    return current.spec(model) if current is not None else None
