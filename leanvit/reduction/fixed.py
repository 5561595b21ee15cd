"""A reduced model run at one fixed strength: the view benchmarks, sweeps and dense sweeps time side by side."""
from __future__ import annotations

import torch.nn as nn

from leanvit.reduction.registry import ReductionMethod, get_reduction

__all__ = ["AtStrength"]


class AtStrength(nn.Module):
    """``model`` (reduced by ``method``) run at strength ``value``: the strength is set for each forward and the
    model's own strength put back afterwards, so several views of one model (sharing its weights) can be timed
    interleaved and the model is left as it was. Works for classifiers and for dense models (the method finds the
    reduced ViT inside); other attributes are the model's."""

    def __init__(self, model: nn.Module, method, value):
        super().__init__()
        self.model = model
        self.method: ReductionMethod = get_reduction(method) if isinstance(method, str) else method
        self.value = self.method.check_strength(value)

    def set_point(self) -> None:
        """Put the model at this view's strength (what :meth:`forward` does first)."""
        self.method.set_strength(self.model, self.value)

    def forward(self, *args, **kwargs):
        own = self.method.get_strength(self.model)
        self.set_point()
        try:
            return self.model(*args, **kwargs)
        finally:
            self.method.set_strength(self.model, own)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)
