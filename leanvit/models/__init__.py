"""Models: the Shunted Transformer (``shunted_t/s/b``), the registered ``evit_*`` models and
:func:`create_model`. Importing this package registers them with timm."""
from leanvit.models import evit as _evit_models  # noqa: F401  (registers evit_*)
from leanvit.models import shunted  # noqa: F401  (registers shunted_t/s/b)
from leanvit.models.factory import create_model, suggest_models

__all__ = ["create_model", "suggest_models"]
