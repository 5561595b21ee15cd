"""Token-reduction methods for timm Vision Transformers, behind one registry.

    import leanvit
    leanvit.apply_reduction(model, "evit", keep_rate=0.7)        # same as leanvit.apply_evit(model, 0.7)
    method = leanvit.reduction.applied_reduction(model)           # the EViT method
    method.set_strength(model, 0.5)                               # its knob (keep_rate)

Registered: ``evit`` (EViT, fused inattentive token), ``evit-drop`` (EViT dropping them) and ``tome``
(ToMe token merging, knob ``r``). They reduce every backbone family (:mod:`leanvit.reduction.families`): timm
``VisionTransformer`` (ViT, DeiT, DeiT III) and timm ``Eva`` (DINOv3, EVA-02: rotary positions travel with the
tokens, :mod:`leanvit.reduction.positions`).
A setting as users write it (``"evit:0.7"``, ``{method: evit, keep_rate: 0.7}``, the older ``keep_rate``) is
read once into a :class:`ReductionSpec` (``spec.py``).
A new method is one module plus :func:`register_reduction` (see CONTRIBUTING.md); token pruning by any score
is a :class:`~leanvit.reduction.pruning.PruningMethod` with one method to write.
"""
from leanvit.reduction import (
    evit,  # noqa: F401,E402  (registers "evit" and "evit-drop")
    tome,  # noqa: F401,E402  (registers "tome")
)
from leanvit.reduction.families import BackboneFamily, family_of, register_family
from leanvit.reduction.fixed import AtStrength
from leanvit.reduction.pruning import PruningMethod
from leanvit.reduction.registry import (
    ReductionMethod,
    applied_reduction,
    apply_reduction,
    cosine_schedule,
    get_reduction,
    list_reductions,
    reduction_spec,
    register_reduction,
    remove_reduction,
)
from leanvit.reduction.spec import (
    ReductionSpec,
    apply_reduction_spec,
    is_none_text,
    parse_reduction_spec,
    parse_strengths,
)

__all__ = ["ReductionMethod", "register_reduction", "get_reduction", "list_reductions", "apply_reduction",
           "remove_reduction", "applied_reduction", "reduction_spec", "apply_reduction_spec",
           "parse_reduction_spec", "parse_strengths", "is_none_text", "ReductionSpec", "cosine_schedule",
           "PruningMethod", "BackboneFamily", "family_of", "register_family", "AtStrength"]
