"""leanvit: lean vision transformers on timm.

- token reduction for any timm ViT with a class token, behind one registry (:func:`apply_reduction`):
  EViT token reorganization (:func:`apply_evit`, ``evit_*`` models)
- DeiT III models and recipes (timm's ``deit3_*`` models, leanvit's training engine)
- Shunted Transformer T/S/B (``shunted_t/s/b``)

Importing leanvit registers its models with timm, so ``timm.create_model("evit_deit_small_patch16_224")``
works afterwards. Layout: ``models/``, ``reduction/``, ``dense/``, ``data/``, ``tasks/``, ``train/``, ``measure/``,
``deploy/``, ``viz/`` and ``utils.py`` are the library; ``tools/`` holds the commands (see README, "Layout").
"""
from leanvit.checkpoints import load_checkpoint, save_checkpoint
from leanvit.errors import LeanvitError
from leanvit.measure.flops import gmacs
from leanvit.models import create_model
from leanvit.reduction import apply_reduction, list_reductions, remove_reduction
from leanvit.reduction.evit import apply_evit, keep_rate_schedule, kept_token_masks, remove_evit

__version__ = "0.1.0"

__all__ = [
    "LeanvitError",
    "apply_reduction",
    "remove_reduction",
    "list_reductions",
    "apply_evit",
    "remove_evit",
    "keep_rate_schedule",
    "kept_token_masks",
    "load_checkpoint",
    "save_checkpoint",
    "gmacs",
    "create_model",
    "__version__",
]
