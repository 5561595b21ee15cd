"""Models: the Shunted Transformer (``shunted_t/s/b``), the registered ``evit_*`` models, :func:`create_model`
and :func:`build_model` (a ready model from a name and/or a checkpoint). Importing this package registers the
models with timm."""
from leanvit.models import evit as _evit_models  # noqa: F401  (registers evit_*)
from leanvit.models import shunted  # noqa: F401  (registers shunted_t/s/b)
from leanvit.models.build import BuiltModel, build_model
from leanvit.models.factory import create_model, suggest_models

__all__ = ["create_model", "suggest_models", "build_model", "BuiltModel"]
