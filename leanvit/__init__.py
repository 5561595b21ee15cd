"""leanvit: lean vision transformers on timm.

- EViT token reorganization for any timm ViT with a class token (:func:`apply_evit`, ``evit_*`` models)
- DeiT III models and recipes (timm's ``deit3_*`` models, leanvit's training engine)
- Shunted Transformer T/S/B (``shunted_t/s/b``)

Importing leanvit registers its models with timm, so ``timm.create_model("evit_deit_small_patch16_224")``
works afterwards.
"""
from leanvit.errors import LeanvitError
from leanvit.flops import gmacs
from leanvit.evit import apply_evit, keep_rate_schedule, kept_token_masks
from leanvit.checkpoints import load_checkpoint, save_checkpoint
from leanvit.factory import create_model
from leanvit import shunted  # noqa: F401  (registers shunted_t/s/b)

__version__ = "0.1.0"

__all__ = [
    "LeanvitError",
    "apply_evit",
    "keep_rate_schedule",
    "kept_token_masks",
    "load_checkpoint",
    "save_checkpoint",
    "gmacs",
    "create_model",
    "__version__",
]
