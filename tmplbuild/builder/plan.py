"""The bootstrap plan: which packages debootstrap installs, resolved in Python with debootstrap's own rules,
and the argv that runs it. Pure functions: tested without root, without network."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tmplbuild.builder.archive import Package, resolve

WRAPPER = Path(__file__).with_name("debootstrap.sh")

# debootstrap's scripts/debian-common: bookworm needs usr-is-merged in the required set; from bookworm on the
# usrmerge migration package must never be pulled in by a dependency.
PRE_MERGED_USR = frozenset({"buster", "bullseye", "stretch", "jessie"})


@dataclass(frozen=True)
class BootstrapPlan:
    required: tuple[str, ...]
    base: tuple[str, ...]
    debs: tuple[Package, ...]  # in the index's order, as debootstrap would have downloaded them

    def debpaths(self) -> str:
        """debootstrap/debpaths: `name path` per package; debootstrap's debfor() reads it to find the debs."""
        return "".join(f"{p.name} /var/cache/apt/archives/{p.deb_name}\n" for p in self.debs)


def _without(names: list[str], drop: set[str] | frozenset[str]) -> list[str]:
    return sorted(set(names) - set(drop))


def make_plan(
    packages: dict[str, Package],
    *,
    codename: str,
    variant: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    https_mirror: bool,
) -> BootstrapPlan:
    """Mirror debootstrap's work_out_debs + resolve_deps. Names in no index stay in the lists; the caller
    reports them with missing_packages()."""
    required = [n for n, p in packages.items() if p.priority == "required"]
    exclude_dependency: set[str] = set()
    if codename == "bookworm":
        required.append("usr-is-merged")
    if codename not in PRE_MERGED_USR:
        exclude_dependency.add("usrmerge")
    if variant == "buildd":
        base = ["apt", "build-essential"]
    elif variant == "minbase":
        base = ["apt"]
    else:
        base = [n for n, p in packages.items() if p.priority == "important"]
    if https_mirror:
        base.append("ca-certificates")
    base = _without(base + list(include), set(exclude))
    required = _without(required, set(exclude))
    req = resolve(required, packages, frozenset(exclude_dependency))
    bas = _without(resolve(base, packages, frozenset(exclude_dependency)), set(req))
    wanted = set(req) | set(bas)
    debs = tuple(p for n, p in packages.items() if n in wanted)
    return BootstrapPlan(required=tuple(req), base=tuple(bas), debs=debs)


def missing_packages(plan: BootstrapPlan) -> list[str]:
    have = {p.name for p in plan.debs}
    return [n for n in plan.required + plan.base if n not in have]


def debootstrap_argv(
    *,
    suite: str,
    target: Path,
    mirror: str,
    arch: str,
    variant: str,
    components: tuple[str, ...],
    plan_tarball: Path,
) -> list[str]:
    """argv for installing a verified plan. The plan tarball carries debootstrap/{required,base,debpaths};
    the lists and the .debs are already in the target, checked against the signed Release."""
    argv = [str(WRAPPER), f"--arch={arch}", f"--components={','.join(components)}",
            f"--unpack-tarball={plan_tarball}"]
    if variant != "-":
        argv.append(f"--variant={variant}")
    return argv + [suite, str(target), mirror]


def lists_name(mirror: str, path: str) -> str:
    """apt's (and debootstrap's apt_dest) file name under var/lib/apt/lists for a URL."""
    url = f"{mirror}_{path}"
    url = url.split("://", 1)[1] if "://" in url else url
    return url.replace("/", "_")
