"""Typed recipes: schema, YAML loading, dotted overrides and readable errors."""

from .load import apply_overrides, dump_recipe, load_recipe, looks_local, pipeline_defaults
from .schema import Recipe

__all__ = ["Recipe", "apply_overrides", "dump_recipe", "load_recipe", "looks_local", "pipeline_defaults"]
