"""`tmplbuild check --resolve`: a recipe's package set against the signed Debian archive index, without building.

A well-formed but misspelt package name (`nginx-lite`) passes every check of the loader; only the archive knows
it has no such package. This takes the builder's own steps with the builder's own functions: the suites' InRelease
fetched and verified with the recipe's keyring and checked for freshness (plan_inputs), each component's Packages
checked against its signed hash and kept in the index cache (fetch_packages), the bootstrap plan made with
debootstrap's rules (make_plan, missing_packages). It never runs debootstrap and writes nothing but the index
cache: not the build's plan cache, whose trimmed index only debootstrap reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tmplbuild.errors import RecipeError, UsageError
from tmplbuild.recipe.locate import quote
from tmplbuild.recipe.model import Recipe


@dataclass(frozen=True)
class Resolution:
    arch: str
    suites: tuple[str, ...]  # the main suite first
    packages: int  # in the resolved plan
    missing: tuple[RecipeError, ...]  # one per package the archive lacks, in file and line order


def resolve_packages(recipe: Recipe, path: Path, *, cache_dir: Path, arch: str | None = None,
                     mirror: str | None = None, security_mirror: str | None = None) -> Resolution:
    """Resolve the bootstrap plan of `recipe` (loaded from `path`, as given) for `arch` against the verified
    archive index, and name each package of it the archive does not have: a package of `packages.include` at its
    entry in the file that lists it, any other against the recipe itself. Raises UsageError (architecture,
    mirror), AuthenticityError, FreshnessError, TransportError, LocalIOError as a build would."""
    from tmplbuild.builder import archive
    from tmplbuild.builder.builder import BuildOptions, default_arch, fetch_indices, plan_inputs, plan_packages
    from tmplbuild.builder.plan import missing_packages
    from tmplbuild.recipe.load import include_origins

    arch = arch or default_arch(recipe)
    if arch not in recipe.architectures:
        raise UsageError("arch", f"{arch} is not among the recipe's architectures ({', '.join(recipe.architectures)})")
    # out_dir is never written: nothing is built.
    opts = BuildOptions(arch=arch, out_dir=cache_dir, cache_dir=cache_dir, mirror=mirror,
                        security_mirror=security_mirror)
    fetcher = archive.Fetcher()
    try:
        planned = plan_inputs(recipe, opts, fetcher)
        indices = fetch_indices(fetcher, recipe, planned.suites, arch, cache_dir)
    finally:
        fetcher.close()
    plan = plan_packages(recipe, planned.suites, indices, planned.mirror)
    suites = tuple(x.suite for x in planned.suites)
    where = f"not in {', '.join(suites)} ({'/'.join(recipe.bootstrap.components)}) for {arch}"
    origins = include_origins(path)
    missing = []
    for name in missing_packages(plan):
        if name in recipe.include and name in origins:
            missing.append(origins[name].error(f"found {quote(name)}, {where}"))
        else:  # debootstrap's own: the required and base packages of the archive and variant
            missing.append(RecipeError(str(path), None, "packages", f"found {quote(name)} in the bootstrap plan"
                                       f" (debootstrap's required and base packages), {where}"))
    missing.sort(key=lambda e: (e.path, e.line or 0))
    return Resolution(arch=arch, suites=suites, packages=len(plan.debs), missing=tuple(missing))
