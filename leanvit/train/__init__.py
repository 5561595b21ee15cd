"""Training: ``train(recipe, **overrides)`` and the shipped recipes (``leanvit train``)."""
from leanvit.train.engine import train
from leanvit.train.recipes import DEFAULTS, defaults, list_recipes, load_recipe, resolve_config

__all__ = ["train", "DEFAULTS", "defaults", "list_recipes", "load_recipe", "resolve_config"]
