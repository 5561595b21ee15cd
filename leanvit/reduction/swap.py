"""How a reduction method is applied to a timm ViT: by swapping classes, in place.

The model and the blocks that reduce keep their objects, names, weights and hooks; only their classes are
swapped for subclasses that mix the method in (``EViTBlock`` = ``PruningBlockMixin`` + timm's ``Block``).
This module holds what every method needs for that: the cache of the made subclasses, undoing a swap and
pickling (the made classes cannot be imported by name). Which models a method can reduce is the backbone
families' business (:mod:`leanvit.reduction.families`).
"""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn

__all__ = ["SwappedClass", "swap_class", "restore_class"]

_MADE: dict = {}


class SwappedClass:
    """Base of every method mixin. Instances of a made subclass pickle (``torch.save(model)``, spawn
    multiprocessing) as their importable timm class plus the mixin, and come back as the same subclass."""

    def __reduce__(self):
        state = self.__getstate__() if hasattr(self, "__getstate__") else self.__dict__
        return _new_swapped_object, (self._swap_base, self._swap_mixin, self._swap_prefix), state


def _made_class(base: type, mixin: type, prefix: str) -> type:
    key = (base, mixin, prefix)
    if key not in _MADE:
        _MADE[key] = type(f"{prefix}{base.__name__}", (mixin, base),
                          {"_swap_base": base, "_swap_mixin": mixin, "_swap_prefix": prefix})
    return _MADE[key]


def _new_swapped_object(base: type, mixin: type, prefix: str):
    """Unpickling: an empty instance of the made subclass (its state is set afterwards)."""
    cls = _made_class(base, mixin, prefix)
    return cls.__new__(cls)


def swap_class(module: nn.Module, mixin: type, prefix: str) -> nn.Module:
    """Give ``module`` the class ``prefix + its class name`` = ``mixin`` + its class; returns it."""
    if not issubclass(mixin, SwappedClass):
        raise TypeError(f"{mixin.__name__} must derive from SwappedClass")
    module.__class__ = _made_class(type(module), mixin, prefix)
    return module


def restore_class(module: nn.Module, attrs: Iterable[str] = ()) -> nn.Module:
    """Undo :func:`swap_class` (if it was applied) and drop the instance attributes the method set."""
    if isinstance(module, SwappedClass):
        module.__class__ = module._swap_base
        for attr in attrs:
            module.__dict__.pop(attr, None)
    return module
