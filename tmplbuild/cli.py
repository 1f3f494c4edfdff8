"""Command line. The only place where exceptions become exit codes and one-line messages."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

from tmplbuild import __version__
from tmplbuild.errors import ExitCode, TmplbuildError, UsageError


def default_cache_dir() -> Path:
    if os.environ.get("TMPLBUILD_CACHE_DIR"):
        return Path(os.environ["TMPLBUILD_CACHE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/cache/tmplbuild")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tmplbuild"


def host_arch() -> str | None:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def find_recipe(arg: str) -> Path:
    """A recipe path, or a bare name looked up in ./recipes/."""
    path = Path(arg)
    if path.suffix == ".toml" or path.exists():
        return path
    candidate = Path("recipes") / f"{arg}.toml"
    if candidate.exists():
        return candidate
    raise UsageError("recipe", f"{arg}: no such file, and no recipes/{arg}.toml")


def cmd_build(args: argparse.Namespace) -> int:
    from tmplbuild.build.builder import BuildOptions, build
    from tmplbuild.recipe import load_recipe

    recipe = load_recipe(find_recipe(args.recipe))
    arch = args.arch
    if arch is None:
        native = host_arch()
        arch = native if native in recipe.architectures else recipe.architectures[0]
    opts = BuildOptions(arch=arch, out_dir=Path(args.out), cache_dir=Path(args.cache_dir or default_cache_dir()),
                        mirror=args.mirror, security_mirror=args.security_mirror, force=args.force, use_tmpfs=not args.no_tmpfs,
                        zstd_level=args.zstd_level)
    build(recipe, opts)
    return 0


def cmd_recipe_check(args: argparse.Namespace) -> int:
    from tmplbuild.recipe import load_recipe

    for name in args.recipes:
        recipe = load_recipe(find_recipe(name))
        print(f"{recipe.path}: ok ({recipe.name}, {recipe.suite}, {', '.join(recipe.architectures)})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tmplbuild", description="Build, sign, publish and fetch OS templates.")
    p.add_argument("--version", action="version", version=f"tmplbuild {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)

    b = sub.add_parser("build", help="build a template from a recipe")
    b.add_argument("recipe", help="recipe file, or a name in ./recipes/")
    b.add_argument("--arch", help="architecture to build (default: the host's, if the recipe lists it)")
    b.add_argument("--out", default="out", help="output directory (default: ./out)")
    b.add_argument("--cache-dir", help="shared package cache (default: /var/cache/tmplbuild as root, "
                                       "or $TMPLBUILD_CACHE_DIR)")
    b.add_argument("--mirror", help="Debian mirror URL (default: $TMPLBUILD_MIRROR, the recipe, the host's apt "
                                    "sources)")
    b.add_argument("--security-mirror", help="Debian security mirror, for *-security extra suites (default: "
                                             "$TMPLBUILD_SECURITY_MIRROR, the recipe, the host's apt sources)")
    b.add_argument("--force", action="store_true", help="replace an existing template of the same version")
    b.add_argument("--zstd-level", type=int, default=9, choices=range(1, 23), metavar="1-22",
                   help="zstd level (default 9, with a 128 MiB long-distance window; 19 is near xz's size, slower)")
    b.add_argument("--no-tmpfs", action="store_true", help="build on disk instead of a tmpfs (low-memory hosts)")
    b.set_defaults(func=cmd_build)

    c = sub.add_parser("check", help="parse and validate recipes without building")
    c.add_argument("recipes", nargs="+")
    c.set_defaults(func=cmd_recipe_check)
    return p


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (systemd stop, CI timeout) takes the same path as Ctrl-C: unmount, remove temporaries, exit.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors are exit 2 already, --help/--version exit 0
        return int(exc.code or 0)
    try:
        return args.func(args)
    except TmplbuildError as exc:
        print(f"tmplbuild: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("tmplbuild: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place a bug becomes a message instead of a traceback
        if os.environ.get("TMPLBUILD_DEBUG"):
            traceback.print_exc()
        print(f"tmplbuild: internal error: {type(exc).__name__}: {exc} (a bug: please report it; "
              f"TMPLBUILD_DEBUG=1 shows the traceback)", file=sys.stderr)
        return int(ExitCode.INTERNAL)
