"""Recipes: TOML files describing a template, loaded into frozen, fully validated `Recipe` records.

The names below are imported on first use: the client needs `tmplbuild.recipe.validate`'s URL rule, not the
recipe parser, and `tmplbuild fetch` should not pay for loading it."""
from __future__ import annotations

from typing import Any

__all__ = ["AptRepository", "Bootstrap", "Compression", "FileEntry", "Recipe", "Script", "Stage", "load_recipe"]


def __getattr__(name: str) -> Any:
    if name == "load_recipe":
        from tmplbuild.recipe.load import load_recipe

        return load_recipe
    if name in __all__:
        from tmplbuild.recipe import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
