"""One token-reduction setting, :class:`ReductionSpec`: a registered method, its strength (the method's knob,
e.g. EViT's ``keep_rate``) and any further options, read and checked in one place from every form users
write it in:

- command-line text: ``"evit:0.7"``, ``"tome:8"``, ``"evit"`` (the method at its default strength), ``"none"``;
- a mapping, as recipes and checkpoints record it: ``{"method": "evit", "keep_rate": 0.7, "locations": [3, 6, 9]}``;
- the older EViT-only keys ``keep_rate`` / ``locations`` (``create_model(..., keep_rate=0.7)``, ``--keep-rate``,
  the recipe keys ``keep_rate`` / ``evit_locations``), translated by :meth:`ReductionSpec.parse` only;
- ``None`` / ``"none"`` / ``"off"``: no reduction (``parse`` returns None).

Options the spec does not know are carried through untouched (in ``options``, in order) to the method's
``apply`` and to what checkpoints record, so a method or a model family can take settings of its own (for
example a restoration strategy for dense backbones) without any change here; the method itself rejects
options it does not accept.

    spec = ReductionSpec.parse("evit:0.7")
    spec.to_dict()                      # {"method": "evit", "keep_rate": 0.7}
    spec.apply(model)                   # leanvit.apply_reduction(model, "evit", keep_rate=0.7)
    method, values = parse_strengths("evit:1.0,0.7,0.5")   # several strengths (bench, sweep)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.reduction.registry import ReductionMethod, apply_reduction, get_reduction

__all__ = ["ReductionSpec", "parse_strengths", "parse_reduction_spec", "apply_reduction_spec", "is_none_text",
           "NONE_WORDS"]

#: text that means "no reduction" where a list of reductions is given (bench, sweep)
NONE_WORDS = ("none", "off", "-")
#: the older EViT-only keys, and the EViT methods they may be combined with
_LEGACY_METHODS = ("evit", "evit-drop")


def is_none_text(text) -> bool:
    return isinstance(text, str) and text.strip().lower() in NONE_WORDS


def _read_strength(method: ReductionMethod, text: str, source: str):
    """One strength from text: a value the method cannot read, or one out of its range, is a clear error that
    names the method, its knob and (from the method's own check) the valid range."""
    if not text:
        raise LeanvitError(f"'{source}': a {method.knob} value is missing (e.g. {method.name}:V or "
                           f"{method.name}:V1,V2)")
    try:
        return method.parse_strength(text)
    except LeanvitError as e:  # the method's own check: its message names the valid range
        raise LeanvitError(f"'{source}': {e}") from None
    except (TypeError, ValueError):
        raise LeanvitError(f"'{source}': cannot read '{text}' as a {method.knob} ({method.name})") from None


def parse_strengths(text: str) -> Tuple[ReductionMethod, List[Any]]:
    """``"evit:1.0,0.7,0.5"`` -> (the EViT method, [1.0, 0.7, 0.5]); ``"evit"`` -> (method, []).

    A colon with nothing after it (``"evit:"``), an empty item (``"evit:0.7,,0.5"``) or a value out of the
    knob's range (``"evit:0"``: keep rates are in (0, 1]) is an error naming the method and the range."""
    name, colon, values = str(text).partition(":")
    method = get_reduction(name.strip())
    if not colon:
        return method, []
    return method, [_read_strength(method, v.strip(), str(text)) for v in values.split(",")]


@dataclass(frozen=True)
class ReductionSpec:
    """A token reduction: ``method`` (a registered name), ``strength`` (its knob's value, already checked;
    None: the method's or the model's default) and ``options`` (every other setting, passed through as
    given)."""

    method: str
    strength: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)

    # -- reading ----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, value: Any = None, keep_rate: Any = None, locations: Optional[Sequence[int]] = None,
              what: str = "reduction") -> Optional["ReductionSpec"]:
        """The spec ``value`` describes (text, a mapping, a :class:`ReductionSpec` or None), with the older
        EViT keys ``keep_rate`` / ``locations`` folded in (they select EViT when ``value`` names no method and
        may only be combined with an EViT method). None when neither gives a reduction.

        ``what`` names the setting in error messages (e.g. a recipe key)."""
        spec = cls._from_value(value, what)
        if keep_rate is None and locations is None:
            return spec
        if spec is not None and spec.method not in _LEGACY_METHODS:
            raise LeanvitError(f"keep_rate/locations are EViT settings, but the {what} is '{spec.method}'")
        spec = spec or cls("evit")
        if keep_rate is not None:
            spec = replace(spec, strength=get_reduction(spec.method).check_strength(keep_rate))
        if locations is not None:
            spec = spec.with_options(locations=list(locations))
        return spec

    @classmethod
    def _from_value(cls, value: Any, what: str) -> Optional["ReductionSpec"]:
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            if not value.strip() or is_none_text(value):
                return None
            method, values = parse_strengths(value)
            if len(values) > 1:
                raise LeanvitError(f"{what} takes one strength here, got '{value}'")
            return cls(method.name, values[0] if values else None)
        if isinstance(value, Mapping):
            opts = dict(value)
            name = opts.pop("method", None)
            if name is None:
                if not opts:
                    return None
                raise LeanvitError(f"{what} needs a method (one of the registered methods, e.g. evit), got "
                                   f"{dict(value)}")
            method = get_reduction(name)
            strength = opts.pop(method.knob, None)
            if strength is not None:
                strength = method.check_strength(strength)
            return cls(method.name, strength, opts)
        raise LeanvitError(f"{what} must be text such as evit:0.7 or a mapping such as "
                           f"{{method: evit, keep_rate: 0.7}}, got {value!r}")

    # -- using ------------------------------------------------------------------------------------
    @property
    def reduction(self) -> ReductionMethod:
        """The registered method."""
        return get_reduction(self.method)

    @property
    def knob(self) -> str:
        return self.reduction.knob

    def with_options(self, **options) -> "ReductionSpec":
        return replace(self, options={**self.options, **options})

    def kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of the method's ``apply``: the strength under its knob's name, then the options."""
        out = {} if self.strength is None else {self.knob: self.strength}
        out.update(self.options)
        return out

    def to_dict(self) -> Dict[str, Any]:
        """``{"method": ..., <knob>: strength, **options}``: what recipes write and checkpoints record."""
        return {"method": self.method, **self.kwargs()}

    def apply(self, model: nn.Module) -> nn.Module:
        """:func:`leanvit.apply_reduction` with these settings; returns ``model``."""
        return apply_reduction(model, self.method, **self.kwargs())

    def label(self) -> str:
        """``evit:0.7`` (``evit`` without a strength): the text form :meth:`parse` reads back (options aside)."""
        if self.strength is None:
            return self.method
        return f"{self.method}:{self.reduction.format_strength(self.strength)}"

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.label()} ({opts})" if opts else self.label()


#: the earlier name of :func:`parse_strengths`
parse_reduction_spec = parse_strengths


def apply_reduction_spec(model: nn.Module, spec: Any) -> nn.Module:
    """Apply a reduction given in any form :meth:`ReductionSpec.parse` reads (None: leave ``model`` as it is)."""
    spec = ReductionSpec.parse(spec)
    return model if spec is None else spec.apply(model)
