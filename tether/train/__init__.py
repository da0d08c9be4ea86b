"""Training: one trainer (`trainer.py`), recipes as configs (`recipes/`, `configs/`)."""

from . import recipes  # noqa: F401  (registers the recipes)
from .recipe import RECIPES, Recipe, register_recipe
from .trainer import Trainer
