"""Recipes: TOML files describing a template, loaded into frozen, fully validated `Recipe` records."""
from __future__ import annotations

from tmplbuild.recipe.load import load_recipe
from tmplbuild.recipe.model import AptRepository, Bootstrap, Compression, FileEntry, Recipe, Script, Stage

__all__ = ["AptRepository", "Bootstrap", "Compression", "FileEntry", "Recipe", "Script", "Stage", "load_recipe"]
