"""The picture of a model's token reduction, as its method says it is (``ReductionMethod.picture``)."""
from __future__ import annotations

from leanvit.errors import LeanvitError
from leanvit.reduction import applied_reduction
from leanvit.viz.merges import visualize_merges
from leanvit.viz.tokens import visualize

__all__ = ["draw_reduction", "DRAWERS"]

#: what a method's picture shows -> the function drawing it
DRAWERS = {"kept_tokens": visualize, "merged_groups": visualize_merges}


def draw_reduction(model, images, out_dir, names, class_names=None, batch_size: int = 16):
    """Draw what the reduction applied to ``model`` did to ``images`` into ``out_dir``, as its method says its
    picture is (``ReductionMethod.picture``): the tokens kept (``kept_tokens.png``) or the patches merged
    (``merged_tokens.png``). Returns the written paths, the grid of all images last."""
    method = applied_reduction(model)
    if method is None or method.picture not in DRAWERS:
        what = "no token reduction" if method is None else f"reduction '{method.name}', which has no picture"
        raise LeanvitError(f"{type(model).__name__} runs {what}")
    return DRAWERS[method.picture](model, images, out_dir, names=names, class_names=class_names,
                                   batch_size=batch_size)
